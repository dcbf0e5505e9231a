"""Issue 19, "the network's images x steps per second in sampling at least the forward rate inside a training step",
measured in interleaved rounds, so that a machine whose speed drifts by 20% over minutes (a shared virtual CPU)
does not decide the comparison.

The demo recipe (configs/mnist_cond.toml, in the precision its "auto" picks here) builds a Trainer; each round then
times, one after the other:
- `train`: --steps training steps of batch 32; the forward rate inside them is taken two ways: 3 x the images/s (the
  backward pass costs about two forwards, the issue's own rule), and directly, the loss's forward pass alone with
  autograd recording (`train_forward_direct`, --steps passes of batch 32);
- `sample`: --n samples drawn as `diffuse sample RUN --n N` draws them (generate_in_chunks, chunks of sample.CHUNK,
  the run's default sampler, guidance and interval, labels 0..9 in turn), with guidance's doubled batch run as two
  calls of the chunk (guidance.SplitCalls, what generate does);
- `sample_one_call`: the same draw with guidance's 2 x chunk images in one call, as generate did before SplitCalls
  (SplitCalls replaced by the identity for this row only).
Each sampling row reports network images x steps per second: the images the network saw (CountCalls) over the
seconds. The last line gives each quantity's median over the rounds and the ratios the target asks about.

    python bench/sampling_rate.py --rounds 7 --steps 30 --n 512

The weights do not change the time of a forward pass, so the untrained network serves. Run it alone: it times by wall
clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import diffuse.generate as sample_module
from diffuse.config import load_config
from diffuse.losses import l_simple
from diffuse.generate import CHUNK, generate_in_chunks
from diffuse.precision import autocast_dtype
from diffuse.kinds.diffusion import sample_config_kwargs
from diffuse.samplers import CountCalls
from diffuse.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def train_rate(trainer: Trainer, steps: int) -> float:
    """Training images/s over `steps` steps."""
    trainer.model.train()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return steps * trainer.cfg.train.batch_size / (time.perf_counter() - start)


def train_forward_rate(trainer: Trainer, passes: int) -> float:
    """Images/s of the training loss's forward pass alone (batch 32, autograd recording, under the trainer's autocast,
    the graph dropped unused): the forward inside a training step, measured instead of inferred."""
    trainer.model.train()
    den, B = trainer.denoiser, trainer.cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn((B, *trainer.space.shape), generator=g), torch.randn((B, *trainer.space.shape), generator=g)
    t, label = den.schedule.sample_t(B, g), torch.randint(0, 10, (B,), generator=g)
    amp = trainer.amp_dtype
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        l_simple(den, x0, t, eps, label=label).sum()  # warm-up
        start = time.perf_counter()
        for _ in range(passes):
            l_simple(den, x0, t, eps, label=label).sum()
        return passes * B / (time.perf_counter() - start)


def sample_rate(trainer: Trainer, n: int, one_call: bool) -> float:
    """Network images x steps per second of drawing n samples as `diffuse sample` does; `one_call`: guidance's
    doubled batch in one call (before SplitCalls)."""
    cfg, split = trainer.cfg, sample_module.SplitCalls
    trainer.model.eval()
    counted = CountCalls(trainer.denoiser)
    d = cfg.data
    if one_call:
        sample_module.SplitCalls = lambda denoiser, max_batch: denoiser
    try:
        start = time.perf_counter()
        generate_in_chunks(counted, n, (d.channels, d.image_size, d.image_size), chunk=CHUNK,
                           labels=torch.arange(n) % 10, **sample_config_kwargs(cfg.sample))
        seconds = time.perf_counter() - start
    finally:
        sample_module.SplitCalls = split
        trainer.model.train()
    return counted.images / seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=30, help="training steps (and forward passes) per round")
    p.add_argument("--n", type=int, default=512, help="samples per sampling row and round")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "mnist_cond.toml")
    trainer = Trainer(cfg, tempfile.mkdtemp(), progress=False)
    for _ in range(10):
        trainer.train_step()
    amp = autocast_dtype(cfg.sample.mixed_precision, "cpu")
    print(json.dumps({"train_precision": str(trainer.amp_dtype or torch.float32), "sample_precision": str(amp or torch.float32),
                      "chunk": CHUNK, "sampler": cfg.sample.sampler, "steps": cfg.sample.steps, "guidance": cfg.sample.guidance,
                      "interval": list(cfg.sample.guidance_interval), "threads": torch.get_num_threads()}), flush=True)
    rows = {k: [] for k in ("train_forward_3x", "train_forward_direct", "sample", "sample_one_call")}
    for k in range(args.rounds):
        rows["train_forward_3x"].append(3 * train_rate(trainer, args.steps))
        rows["train_forward_direct"].append(train_forward_rate(trainer, args.steps))
        rows["sample"].append(sample_rate(trainer, args.n, one_call=False))
        rows["sample_one_call"].append(sample_rate(trainer, args.n, one_call=True))
        print(json.dumps({"round": k, **{name: round(v[-1], 1) for name, v in rows.items()}}), flush=True)
    med = {name: statistics.median(v) for name, v in rows.items()}
    within = [s / f for s, f in zip(rows["sample"], rows["train_forward_3x"])]
    print(json.dumps({"median": {name: round(v, 1) for name, v in med.items()},
                      "sample_over_train_forward_3x": round(med["sample"] / med["train_forward_3x"], 3),
                      "sample_over_train_forward_direct": round(med["sample"] / med["train_forward_direct"], 3),
                      "sample_over_one_call": round(med["sample"] / med["sample_one_call"], 3),
                      "rounds_sample_above_train_3x": f"{sum(r > 1 for r in within)}/{len(within)}",
                      "per_round_ratio_min_max": [round(min(within), 3), round(max(within), 3)]}), flush=True)


if __name__ == "__main__":
    main()
