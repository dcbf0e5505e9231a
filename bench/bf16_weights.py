"""Issue 19, training speed, the open lead: the demo network trained with its weights themselves in bf16 (and a float32
master copy that the optimizer updates), against bf16 autocast and float32, in interleaved rounds.

Under autocast every GroupNorm and SiLU runs in float32 between bf16 convolutions, and the casts took 29% of a bf16
step on the AMX Xeon (bench/RESULTS.md, "CPU budget", third run). With bf16 weights and bf16 activations there are no
casts: each step copies the float32 master weights into the bf16 network, runs forward and backward in bf16 (the loss
in float32), copies the gradients back to float32, and lets AdamW update the master copy. The three loops are the
same bare step of the demo network (configs/mnist_cond.toml, batch 32: its rectified flow, Liu et al. 2022, through
losses.l_simple) with gradient clipping and AdamW, without the trainer's EMA and logging, so the
ratios between them are what the precision buys. Also prints the loss of one fixed batch after --check-steps steps
of each loop from the same start, so a speed-up that costs accuracy shows.

    python bench/bf16_weights.py --rounds 5 --steps 20

On a CPU without native bf16 (cpu_has_native_bf16() False) bf16 is emulated and about 9x slower than float32; the
script says so and runs anyway. Run it alone: it times by wall clock.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from diffuse.config import apply_overrides, load_config
from diffuse.losses import l_simple
from diffuse.kinds.diffusion import build_denoiser, build_model
from diffuse.precision import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]


class Loop:
    """One training loop of the demo network in a precision: "fp32", "autocast" (bf16 autocast) or "bf16-weights".
    Its loss is the run's own: losses.l_simple through the demo config's denoiser (rectified flow, velocity target)."""

    def __init__(self, cfg, net: torch.nn.Module, mode: str, lr: float = 1e-3):
        self.mode, self.master, self.net = mode, net, net
        if mode == "bf16-weights":
            self.net = copy.deepcopy(net).to(torch.bfloat16)
            # the denoiser hands the U-Net float32 x_t, and the U-Net computes its sinusoidal time embedding in float32
            self.net.register_forward_pre_hook(lambda module, args: (args[0].to(torch.bfloat16), *args[1:]))
            self.net.time_mlp.register_forward_pre_hook(lambda module, args: (args[0].to(torch.bfloat16),))
        self.denoiser = build_denoiser(cfg, self.net)
        self.optimizer = torch.optim.AdamW(self.master.parameters(), lr=lr)

    def loss(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The batch mean of l_simple (Ho et al. 2020, eq. 14, here the velocity target eps - x_0), in float32."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.mode == "autocast"):
            return l_simple(self.denoiser, x0, t, eps, label=label).mean()

    def step(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, label: torch.Tensor) -> float:
        if self.mode == "bf16-weights":
            with torch.no_grad():
                for low, p in zip(self.net.parameters(), self.master.parameters()):
                    low.copy_(p)
        self.net.zero_grad(set_to_none=True)
        loss = self.loss(x0, t, eps, label)
        loss.backward()
        loss = loss.detach()
        if self.mode == "bf16-weights":
            for low, p in zip(self.net.parameters(), self.master.parameters()):
                p.grad = None if low.grad is None else low.grad.float()
        torch.nn.utils.clip_grad_norm_(self.master.parameters(), 1.0)
        self.optimizer.step()
        return loss.item()


def batch(generator: torch.Generator, b: int = 32):
    """A batch of demo-shaped inputs: x_0 in [-1, 1] (1, 28, 28), t ~ U(0, 1), eps ~ N(0, I), labels 0..9."""
    return (torch.rand(b, 1, 28, 28, generator=generator) * 2 - 1, torch.rand(b, generator=generator),
            torch.randn(b, 1, 28, 28, generator=generator), torch.randint(0, 10, (b,), generator=generator))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="steps per loop and round")
    p.add_argument("--check-steps", type=int, default=20, help="steps from the same start before the loss check")
    args = p.parse_args()
    native = cpu_has_native_bf16()
    print(json.dumps({"cpu_has_native_bf16": native, **({} if native else {
        "note": "bf16 is emulated on this CPU: the bf16 rows measure the emulation, not the lead"})}), flush=True)
    cfg = apply_overrides(load_config(ROOT / "configs" / "mnist_cond.toml"), [])
    torch.manual_seed(0)
    start = build_model(cfg, 10)
    modes = ("fp32", "autocast", "bf16-weights")
    # accuracy: the same start and batches for each loop, then the loss of one held-out batch in float32
    held = batch(torch.Generator().manual_seed(1))
    for mode in modes:
        loop, g = Loop(cfg, copy.deepcopy(start), mode), torch.Generator().manual_seed(0)
        losses = [loop.step(*batch(g)) for _ in range(args.check_steps)]
        with torch.no_grad():
            check = float(Loop(cfg, loop.master, "fp32").loss(*held))
        print(json.dumps({"mode": mode, "train_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
                          "held_out_loss_fp32": round(check, 4)}), flush=True)
    loops, g = {mode: Loop(cfg, copy.deepcopy(start), mode) for mode in modes}, torch.Generator().manual_seed(2)
    for loop in loops.values():
        for _ in range(3):
            loop.step(*batch(g))
    rates = {mode: [] for mode in modes}
    for k in range(args.rounds):
        for mode, loop in loops.items():
            data = [batch(g) for _ in range(args.steps)]
            began = time.perf_counter()
            for b in data:
                loop.step(*b)
            rates[mode].append(32 * args.steps / (time.perf_counter() - began))
        print(json.dumps({"round": k, **{m: round(r[-1], 1) for m, r in rates.items()}}), flush=True)
    medians = {m: statistics.median(r) for m, r in rates.items()}
    print(json.dumps({"median_img_s": {m: round(v, 1) for m, v in medians.items()},
                      "over_fp32": {m: round(v / medians["fp32"], 3) for m, v in medians.items()}}), flush=True)


if __name__ == "__main__":
    main()
