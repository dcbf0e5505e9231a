"""Learned against fixed variance (Nichol & Dhariwal 2021) on the bundled digits: the variational bound in
bits/dim during training, and few-step ancestral sampling.

    python bench/learned_variance.py [--steps 3000] [--eval-every 1000] [--n-vlb 128] [--n-samples 500]
                                     [--sample-steps 10,25,50,100]

Two runs of configs/mnist.toml with eps-prediction and plain L_simple weighting (the setting of the
paper) and the same seed, data order and step count: "fixed" (L_simple) and "learned"
(model.learned_variance, train.loss = hybrid, lambda = 0.001). Every --eval-every steps the full bound
L_T + sum_t L_{t-1} + L_0 (all T terms, EMA weights) of --n-vlb fixed digits; at the end FID of
--n-samples DDPM samples at each of --sample-steps in the digit-classifier feature space: the fixed
model with both of Ho et al.'s variances (beta-tilde, beta), the learned one with its own. Prints one
JSON line per measurement.
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
from diffuse.likelihood import vlb_bits_per_dim
from diffuse.metrics import extract_features, feature_statistics, frechet_distance
from diffuse.train import digit_classifier
from diffuse.generate import generate
from diffuse.kinds.diffusion import build_denoiser
from diffuse.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["model.prediction=eps", "train.loss_weighting=none", "train.time_limit=0", "train.sample_every=0", "train.checkpoint_every=100000"]
VARIANTS = {"fixed": [], "learned": ["model.learned_variance=true", "train.loss=hybrid"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--n-vlb", type=int, default=128)
    p.add_argument("--n-samples", type=int, default=500)
    p.add_argument("--sample-steps", default="10,25,50,100", help="comma-separated DDPM step counts")
    args = p.parse_args()
    sample_steps = [int(k) for k in args.sample_steps.split(",")]
    base = load_config(ROOT / "configs" / "mnist.toml")
    data = load_dataset(base.data)
    real = torch.stack([x for x, _ in data])
    x_vlb = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(123))[:args.n_vlb]]
    classifier = digit_classifier()
    real_stats = feature_statistics(extract_features(real, classifier))  # once, not per FID
    def fid_to_real(x):
        return frechet_distance(*real_stats, *feature_statistics(extract_features(x, classifier)))

    for name, overrides in VARIANTS.items():
        cfg = apply_overrides(base, COMMON + overrides + [f"train.steps={args.eval_every}"])
        with tempfile.TemporaryDirectory() as run:
            trainer = Trainer(cfg, run, progress=False)
            start = time.perf_counter()
            while trainer.step < args.steps:
                trainer.cfg.train.steps = trainer.step + args.eval_every
                trainer.fit()
                den = build_denoiser(trainer.cfg, trainer.ema.model)
                vlb = vlb_bits_per_dim(den, x_vlb, generator=torch.Generator().manual_seed(0))
                print(json.dumps({"variant": name, "step": trainer.step, "train_s": round(time.perf_counter() - start),
                                  "vlb_bits_per_dim": round(float(vlb["total"].mean()), 4),
                                  "L0_bits_per_dim": round(float(vlb["terms"][:, -1].mean()), 4)}), flush=True)
            den = build_denoiser(trainer.cfg, trainer.ema.model)
            for variance in ("beta_tilde", "beta") if name == "fixed" else ("learned",):
                for steps in sample_steps:
                    x = generate(den, args.n_samples, (1, 28, 28), sampler="ddpm", steps=steps, spacing="linspace",
                                 seed=1, variance="beta_tilde" if variance == "learned" else variance)
                    print(json.dumps({"variant": name, "variance": variance, "sampler": f"ddpm {steps} steps",
                                      "n": args.n_samples, "fid": round(fid_to_real(x), 2)}), flush=True)


if __name__ == "__main__":
    main()
