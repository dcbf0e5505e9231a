"""Issue 19, training speed: where a training step of the demo network spends its time, in fp32 and in bf16 autocast,
against the machine's measured matrix-multiply peak in each precision.

For each precision: the peak of a 2048 x 2048 x 2048 matmul (GFLOP/s); the FLOPs of one training step of the demo
recipe (configs/mnist_cond.toml, batch 32) by torch.utils.flop_counter, split into convolutions and the rest; the step
time; and torch.profiler's self time per operator class over --steps steps (convolutions forward and backward, matrix
products and attention, GroupNorm, elementwise work, the optimizer and EMA updates, the rest), with the convolutions'
achieved GFLOP/s. From these: the step time if every convolution ran at the matmul peak and nothing else changed,
i.e. the most a faster convolution could buy.

    python bench/step_profile.py --steps 20

Run it alone: it times by wall clock.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from diffuse.config import apply_overrides, load_config
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
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.train_step()
    shares = defaultdict(float)
    for event in prof.key_averages():
        shares[op_class(event.key)] += event.self_cpu_time_total / 1e6 / steps  # seconds per step
    total = sum(shares.values())
    conv_s = (shares["conv forward"] + shares["conv backward"]) / total * step_s  # scaled to the unprofiled step
    return {"precision": mode, "step_s": round(step_s, 4), "images_per_s": round(cfg.train.batch_size / step_s, 1),
            "gflop_per_step": round(total_flops / 1e9, 2), "conv_share_of_flops": round(conv_flops / total_flops, 3),
            "achieved_gflop_s": round(total_flops / step_s / 1e9, 1), "conv_gflop_s": round(conv_flops / conv_s / 1e9, 1),
            "time_shares": {k: round(v / total, 3) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
            "conv_s": conv_s, "conv_flops": conv_flops}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    peaks = {"no": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(json.dumps({"matmul_peak_gflop_s": {k: round(v, 1) for k, v in peaks.items()}}), flush=True)
    rows = {}
    for mode in ("no", "bf16", "no", "bf16"):  # twice, interleaved: the second pair is reported beside the first
        row = profile_precision(mode, args.steps)
        at_peak = row["step_s"] - row["conv_s"] + row["conv_flops"] / (peaks[mode] * 1e9)
        row["step_s_if_convs_at_matmul_peak"] = round(at_peak, 4)
        row["images_per_s_if_convs_at_matmul_peak"] = round(32 / at_peak, 1)
        out = {k: v for k, v in row.items() if k not in ("conv_s", "conv_flops")}
        print(json.dumps(out), flush=True)
        rows.setdefault(mode, []).append(row)
    fp32, bf16 = (min(rows[m], key=lambda r: r["step_s"]) for m in ("no", "bf16"))
    print(json.dumps({"bf16_over_fp32_best": round(fp32["step_s"] / bf16["step_s"], 3)}), flush=True)


if __name__ == "__main__":
    main()
