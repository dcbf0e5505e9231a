"""Issue 19, training speed: where a training step of the demo network spends its time, in fp32 and in bf16 autocast,
against the machine's measured matrix-multiply peak in each precision (fp32 only on a CPU without native bf16, where
bf16 is emulated).

For each precision: the peak of a 2048 x 2048 x 2048 matmul (GFLOP/s); the FLOPs of one training step of the demo
recipe (configs/mnist_cond.toml, batch 32) by torch.utils.flop_counter, split into convolutions and the rest; the step
time; and torch.profiler's self time per operator class over --steps steps (convolutions forward and backward, matrix
products and attention, GroupNorm, elementwise work, the optimizer and EMA updates, the rest), with the convolutions'
achieved GFLOP/s. The bytes side: the machine's memory bandwidth (a copy of 256 MB), and the bytes the memory-bound
operator classes (elementwise, GroupNorm, optimizer + EMA) read and write per step, estimated from the profiled
operators' input shapes and dtypes (leaf operators only; an out-of-place operator also writes its largest input's
size), against their measured time. From these: the step time if every convolution ran at the matmul peak and
nothing else changed, i.e. the most a faster convolution could buy, and the roofline floor: convolutions at the
matmul peak and the memory-bound classes at the bandwidth.

    python bench/step_profile.py --steps 20

Run it alone: it times by wall clock.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from diffuse.config import apply_overrides, load_config
from diffuse.precision import cpu_has_native_bf16
from diffuse.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [("conv backward", ("convolution_backward",)), ("conv forward", ("convolution",)),
           ("matmul + attention", ("mm", "bmm", "addmm", "linear", "softmax", "scaled_dot_product", "attention")),
           ("group norm", ("group_norm",)), ("optimizer + EMA", ("_foreach", "adam", "lerp")),
           ("elementwise", ("silu", "add", "mul", "copy", "_to_copy", "div", "sub", "clamp", "fill", "sum", "mean",
                            "cat", "where", "neg", "pow", "sqrt", "exp", "sigmoid", "zero", "clone", "sin", "cos", "abs",
                            "randn", "rand", "normal", "index", "gather", "scatter", "masked", "embedding", "t_"))]


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of an n x n x n matmul in `dtype` (best of `reps`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


MEMORY_BOUND = ("elementwise", "group norm", "optimizer + EMA")
BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4, "bool": 1,
         "unsigned char": 1, "signed char": 1, "short int": 2}


def memory_bandwidth(mb: int = 256, reps: int = 10) -> float:
    """GB/s of copying an `mb` MB float32 tensor into another (bytes read + written; best of `reps`)."""
    a = torch.randn(mb * 2 ** 20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.numel() * 4 / best / 1e9


def _tensor_bytes(shapes, dtypes) -> list[int]:
    """Bytes of each tensor argument of a profiled operator (scalars and empty shapes skipped; lists of tensors,
    as the _foreach_ operators take, flattened)."""
    out = []
    for shape, dtype in zip(shapes, dtypes):
        if shape and isinstance(shape[0], list):
            out += _tensor_bytes(shape, [dtype] * len(shape))
        elif shape:
            out.append(math.prod(shape) * BYTES.get(dtype, 4))
    return out


def operator_bytes(event) -> int:
    """Bytes a leaf operator reads and writes, estimated from its inputs: all of them read, and unless it works in
    place (a trailing underscore), an output the size of its largest input written."""
    sizes = _tensor_bytes(event.input_shapes, event.input_dtypes)
    if not sizes:
        return 0
    in_place = event.name.rstrip("_") != event.name
    return sum(sizes) + (0 if in_place else max(sizes))


def op_class(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def profile_precision(mode: str, steps: int) -> dict:
    cfg = apply_overrides(load_config(ROOT / "configs" / "mnist_cond.toml"), [f"train.mixed_precision={mode}"])
    trainer = Trainer(cfg, tempfile.mkdtemp(), progress=False)
    for _ in range(10):
        trainer.train_step()
    with FlopCounterMode(display=False) as counter:
        trainer.train_step()
    flops = counter.get_flop_counts()["Global"]
    conv_flops = sum(v for k, v in flops.items() if "convolution" in str(k))
    total_flops = sum(flops.values())
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    step_s = (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            trainer.train_step()
    shares = defaultdict(float)
    for event in prof.key_averages():
        shares[op_class(event.key)] += event.self_cpu_time_total / 1e6 / steps  # seconds per step
    moved = sum(operator_bytes(e) for e in prof.events() if not e.cpu_children and op_class(e.name) in MEMORY_BOUND) / steps
    total = sum(shares.values())
    conv_s = (shares["conv forward"] + shares["conv backward"]) / total * step_s  # scaled to the unprofiled step
    memory_s = sum(shares[c] for c in MEMORY_BOUND) / total * step_s
    return {"precision": mode, "step_s": round(step_s, 4), "images_per_s": round(cfg.train.batch_size / step_s, 1),
            "gflop_per_step": round(total_flops / 1e9, 2), "conv_share_of_flops": round(conv_flops / total_flops, 3),
            "achieved_gflop_s": round(total_flops / step_s / 1e9, 1), "conv_gflop_s": round(conv_flops / conv_s / 1e9, 1),
            "time_shares": {k: round(v / total, 3) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
            "memory_bound_gb_per_step": round(moved / 1e9, 3), "memory_bound_s": round(memory_s, 4),
            "memory_bound_gb_s": round(moved / memory_s / 1e9, 1),
            "conv_s": conv_s, "conv_flops": conv_flops, "memory_bytes": moved}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    native_bf16 = cpu_has_native_bf16()  # without it bf16 is emulated (about 9x slower than fp32): fp32 only
    peaks = {"no": matmul_peak(torch.float32), **({"bf16": matmul_peak(torch.bfloat16)} if native_bf16 else {})}
    bandwidth = memory_bandwidth()
    print(json.dumps({"cpu_has_native_bf16": native_bf16, "matmul_peak_gflop_s": {k: round(v, 1) for k, v in peaks.items()},
                      "memory_bandwidth_gb_s": round(bandwidth, 1)}), flush=True)
    rows = {}
    for mode in [*peaks, *peaks]:  # twice, interleaved: the second pair is reported beside the first
        row = profile_precision(mode, args.steps)
        at_peak = row["step_s"] - row["conv_s"] + row["conv_flops"] / (peaks[mode] * 1e9)
        row["step_s_if_convs_at_matmul_peak"] = round(at_peak, 4)
        row["images_per_s_if_convs_at_matmul_peak"] = round(32 / at_peak, 1)
        # the roofline floor: convolutions at the matmul peak, the memory-bound classes at the bandwidth, the rest as is
        floor = at_peak - row["memory_bound_s"] + row["memory_bytes"] / (bandwidth * 1e9)
        row["images_per_s_at_roofline"] = round(32 / floor, 1)
        out = {k: v for k, v in row.items() if k not in ("conv_s", "conv_flops", "memory_bytes")}
        print(json.dumps(out), flush=True)
        rows.setdefault(mode, []).append(row)
    best = {m: min(r, key=lambda row: row["step_s"]) for m, r in rows.items()}
    if "bf16" in best:
        print(json.dumps({"bf16_over_fp32_best": round(best["no"]["step_s"] / best["bf16"]["step_s"], 3)}), flush=True)


if __name__ == "__main__":
    main()
