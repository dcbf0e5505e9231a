"""VP against EDM against rectified flow at the demo's CPU budget (issue "The core, generalised"): the demo recipe
(configs/mnist_cond.toml) and its two twins (configs/mnist_edm.toml, configs/mnist_flow.toml: the same U-Net, batch,
learning rate, label dropout and guidance) trained one after the other for --budget seconds each, then --n samples of
each with its config's sampler (DPM-Solver++(2M), 20 steps; EDM on its rho = 7 grid), labels 0..9 in turn, at the
config's guidance w = 1 and at w = 0; FID against the 5,000 bundled digits in the digit-classifier feature space
(samples rounded to 8 bits) and the classifier's accuracy on the intended labels.

    python bench/processes.py --budget 480 --n 1000 --out bench/out/processes

Run it alone: it times training by wall clock. Prints one JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffuse.config import apply_overrides, load_config
from diffuse.data import load_dataset
from diffuse.metrics import fid
from diffuse.train import digit_classifier
from diffuse.runs import load_run
from diffuse.train import train
from diffuse.visualize import to_uint8

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from samplers import draw  # noqa: E402  (bench/samplers.py)

CONFIGS = {"vp (demo)": "mnist_cond.toml", "edm": "mnist_edm.toml", "flow": "mnist_flow.toml"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=480)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "processes"))
    args = p.parse_args()
    classifier = digit_classifier()
    real = None
    for name, config in CONFIGS.items():
        run = Path(args.out) / config.removesuffix(".toml")
        if not (run / "config.toml").is_file():
            cfg = apply_overrides(load_config(ROOT / "configs" / config), [f"train.time_limit={args.budget}"])
            start = time.perf_counter()
            train(cfg, run, progress=False)
            seconds = time.perf_counter() - start
            log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            print(json.dumps({"process": name, "trained_s": round(seconds), "steps": log[-1]["step"],
                              "img_s": round(sum(r["images_per_s"] for r in log[1:]) / max(len(log) - 1, 1), 1),
                              "last_loss": round([r for r in log if "loss" in r][-1]["loss"], 4)}), flush=True)
        cfg, den, num_classes = load_run(run)
        d, s = cfg.data, cfg.sample
        if real is None:
            real = torch.stack([x for x, _ in load_dataset(d)])
        labels = torch.arange(args.n) % num_classes
        for w in (s.guidance, 0.0):
            x, nfe, seconds = draw(den, args.n, (d.channels, d.image_size, d.image_size), labels, sampler=s.sampler,
                                   steps=s.steps, spacing=s.spacing, guidance=w)
            x = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() / 127.5 - 1
            with torch.no_grad():
                acc = float((classifier(x).argmax(1) == labels).double().mean())
            print(json.dumps({"process": name, "sampler": s.sampler, "steps": s.steps, "spacing": s.spacing, "guidance": w,
                              "sample_s": round(seconds, 1), "fid": round(fid(real, x, classifier), 2),
                              "accuracy": round(acc, 4)}), flush=True)


if __name__ == "__main__":
    main()
