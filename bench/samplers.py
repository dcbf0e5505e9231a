"""Sample quality against the number of denoiser calls (NFE) for every sampler, and the class accuracy
of classifier-free guidance against its weight w, on a class-conditional digits model.

    python bench/samplers.py --run bench/out/cond [--train-budget 480] [--n 500]

1. --run: a run of configs/mnist_cond.toml (trained here for --train-budget seconds if missing).
2. For each (sampler, steps) below: N samples, labels 0..9 in turn and w = 0 (the conditional
   model), scored by FID against the 5,000 bundled digits in the fixed digit-classifier feature
   space (diffuse.metrics), with the NFE counted by samplers.CountCalls and the seconds taken.
3. For w in W_SWEEP: the same labels with dpmpp-2m 20 steps; the digit classifier's accuracy
   on the intended labels, and the FID.
Prints one JSON line per row; the tables go into bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffuse.config import apply_overrides, load_config
from diffuse.data import load_dataset
from diffuse.metrics import fid
from diffuse.train import digit_classifier
from diffuse.samplers import CountCalls
from diffuse.generate import generate
from diffuse.runs import load_run
from diffuse.train import train

ROOT = Path(__file__).resolve().parents[1]
# (sampler, steps, spacing, options): few-step settings, each at comparable NFE
GRID = [
    ("ddim", 10, "trailing", {}), ("ddim", 20, "trailing", {}), ("ddim", 50, "trailing", {}),
    ("ddpm", 50, "trailing", {}),
    ("dpmpp-2m", 10, "trailing", {}), ("dpmpp-2m", 20, "trailing", {}),
    ("dpmpp-3m", 10, "trailing", {}), ("dpmpp-3m", 20, "trailing", {}),
    ("dpmpp-2s", 10, "trailing", {}),
    ("euler", 20, "karras", {}),
    ("heun", 10, "karras", {}), ("heun", 10, "karras", {"s_churn": 5.0}),
    ("dpm2", 10, "karras", {}),
    ("euler-ancestral", 20, "karras", {}), ("euler-ancestral", 50, "karras", {}),
    ("sde-em", 100, "trailing", {}),
    ("sde-pc", 50, "trailing", {}),
    ("ode-rk45", 2, "trailing", {"rtol": 1e-2, "atol": 1e-2}),
]
W_SWEEP = [0.0, 0.5, 1.0, 2.0, 4.0]
CHUNK = 250


def draw(den, n: int, shape, labels_all: torch.Tensor, **kw) -> tuple[torch.Tensor, int, float]:
    counted = CountCalls(den)
    start, out = time.perf_counter(), []
    for i in range(0, n, CHUNK):
        y = labels_all[i:i + CHUNK]
        out.append(generate(counted, len(y), shape, labels=y, seed=i, **kw))
    calls_per_image_batch = counted.calls / len(out)
    return torch.cat(out), round(calls_per_image_batch), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default=str(ROOT / "bench" / "out" / "cond"))
    p.add_argument("--train-budget", type=float, default=480)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--only", nargs="*", help="sampler names to run (default: all)")
    p.add_argument("--skip", nargs="*", default=[], help="sampler names to leave out")
    p.add_argument("--skip-guidance", action="store_true")
    args = p.parse_args()
    run = Path(args.run)
    if not (run / "config.toml").is_file():
        cfg = apply_overrides(load_config(ROOT / "configs" / "mnist_cond.toml"), [f"train.time_limit={args.train_budget}"])
        start = time.perf_counter()
        train(cfg, run, progress=False)
        print(json.dumps({"trained_s": round(time.perf_counter() - start)}), flush=True)
    cfg, den, num_classes = load_run(run)
    d = cfg.data
    shape = (d.channels, d.image_size, d.image_size)
    classifier = digit_classifier()
    real = torch.stack([x for x, _ in load_dataset(d)])
    labels = torch.arange(args.n) % num_classes
    for name, steps, spacing, options in GRID:
        if (args.only and name not in args.only) or name in args.skip:
            continue
        x, nfe, seconds = draw(den, args.n, shape, labels, sampler=name, steps=steps, spacing=spacing, **options)
        print(json.dumps({"sampler": name, "steps": steps, "spacing": spacing, **options, "nfe": nfe,
                          "seconds": round(seconds, 1), "fid": round(fid(real, x, classifier), 2)}), flush=True)
    if args.skip_guidance:
        return
    for w in W_SWEEP:
        x, nfe, seconds = draw(den, args.n, shape, labels, sampler="dpmpp-2m", steps=20, spacing="trailing", guidance=w)
        with torch.no_grad():
            acc = float((classifier(x).argmax(1) == labels).double().mean())
        print(json.dumps({"guidance": w, "sampler": "dpmpp-2m", "steps": 20, "nfe": nfe, "seconds": round(seconds, 1),
                          "accuracy": round(acc, 4), "fid": round(fid(real, x, classifier), 2)}), flush=True)


if __name__ == "__main__":
    main()
