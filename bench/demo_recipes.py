"""How the demo's recipe was chosen: quality per CPU second for candidate models and recipes.

    python bench/demo_recipes.py --budget 240 --n-samples 500 [--only NAME ...]

Each candidate is configs/mnist.toml with a few overrides, trained for the same wall-clock
budget on this machine (one at a time), then sampled with the config's sampler and scored by
FID against the 5,000 bundled digits in the fixed digit-classifier feature space
(diffuse.metrics). Prints one JSON line per candidate; figures go into bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from diffuse.config import apply_overrides, load_config
from diffuse.data import load_dataset
from diffuse.metrics import fid
from diffuse.train import digit_classifier
from diffuse.generate import generate
from diffuse.runs import load_run
from diffuse.train import train

ROOT = Path(__file__).resolve().parents[1]
# the screening baseline: the first demo config (eps, L_simple, batch 64); candidates change one thing
BASELINE = ["model.prediction=eps", "train.loss_weighting=none", "train.batch_size=64", "train.lr=1e-3"]
SMALL = BASELINE + ["model.channels=16", "model.channel_mult=[1,2,4]", "model.num_res_blocks=2"]
CANDIDATES = {
    "c16-124-b2": SMALL,
    "c16-124-b2-minsnr": SMALL + ["train.loss_weighting=min_snr"],
    "c16-124-b2-v-minsnr": SMALL + ["model.prediction=v", "train.loss_weighting=min_snr"],
    "c16-124-b2-cosine": SMALL + ["schedule.kind=cosine"],
    "c16-124-b2-bs32": SMALL + ["train.batch_size=32", "train.lr=7e-4"],
    "c32-122-b1": BASELINE + ["model.channels=32", "model.channel_mult=[1,2,2]", "model.num_res_blocks=1"],
    "c24-123-b2": BASELINE + ["model.channels=24", "model.channel_mult=[1,2,3]", "model.num_res_blocks=2"],
    "c16-124-b2-lr2e-3": SMALL + ["train.lr=2e-3"],
    "c16-124-b2-minsnr-lr2e-3": SMALL + ["train.loss_weighting=min_snr", "train.lr=2e-3"],
    "c16-124-b2-minsnr-bs32": SMALL + ["train.loss_weighting=min_snr", "train.batch_size=32"],
    "c16-124-b2-minsnr-cosine": SMALL + ["train.loss_weighting=min_snr", "schedule.kind=cosine"],
    # around the chosen demo recipe (configs/mnist.toml: v, min-SNR-5, batch 32)
    "demo": [],
    "demo-ema0.9995": ["train.ema_decay=0.9995"],
    "demo-lr2e-3": ["train.lr=2e-3"],
    # third round: patching (space-to-depth, model.patch_size) trades resolution for width
    "p2-c32-12": ["model.patch_size=2", "model.channels=32", "model.channel_mult=[1,2]"],
    "p2-c48-12": ["model.patch_size=2", "model.channels=48", "model.channel_mult=[1,2]"],
    "p2-c32-12-b3": ["model.patch_size=2", "model.channels=32", "model.channel_mult=[1,2]", "model.num_res_blocks=3"],
}
SAMPLERS = {"ddim50": dict(sampler="ddim", steps=50), "ddim100": dict(sampler="ddim", steps=100),
            "ddpm250": dict(sampler="ddpm", steps=250, spacing="linspace")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=240)
    p.add_argument("--n-samples", type=int, default=500)
    p.add_argument("--only", nargs="*")
    p.add_argument("--samplers", nargs="*", default=["ddim50"])
    args = p.parse_args()
    base = load_config(ROOT / "configs" / "mnist.toml")
    classifier = digit_classifier()
    real = torch.stack([x for x, _ in load_dataset(base.data)])
    for name, overrides in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        cfg = apply_overrides(base, overrides + [f"train.time_limit={args.budget}", "train.sample_every=0"])
        with tempfile.TemporaryDirectory() as run:
            start = time.perf_counter()
            train(cfg, run, progress=False)
            seconds = time.perf_counter() - start
            steps = json.loads(Path(run, "log.jsonl").read_text().splitlines()[-1])["step"]
            _, den, _ = load_run(run)
            for sname in args.samplers:
                t0 = time.perf_counter()
                x = torch.cat([generate(den, n, (1, 28, 28), seed=i, **SAMPLERS[sname])
                               for i, n in enumerate([250] * (args.n_samples // 250))])
                hist = torch.bincount(classifier(x).argmax(1), minlength=10).tolist()
                print(json.dumps({"candidate": name, "sampler": sname, "train_s": round(seconds), "steps": steps,
                                  "images_per_s": round(steps * cfg.train.batch_size / seconds, 1),
                                  "sample_s": round(time.perf_counter() - t0), "fid": round(fid(real, x, classifier), 2),
                                  "class_histogram": hist}), flush=True)


if __name__ == "__main__":
    main()
