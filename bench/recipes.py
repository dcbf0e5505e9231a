"""Issue 16's training options against the demo's recipe, at the demo's CPU budget, in one run.

    python bench/recipes.py [--budget 480] [--n-samples 500] [--only NAME ...] [--out bench/out/recipes.jsonl]

Each candidate is configs/mnist_cond.toml (the `diffuse demo` recipe: v-prediction, min-SNR-5, class labels with
dropout 0.1) with one option on, trained for the same wall-clock budget on this machine, one at a time, then sampled
as the demo samples (DPM-Solver++(2M), 20 steps, guidance 1, the classes in turn) and scored by FID against the 5,000
bundled digits in the digit-classifier feature space, with the class histogram and the accuracy of the classifier
on the asked-for labels. The plain run also tracks post-hoc EMAs (EDM2), and the sweep rebuilds several sigma_rel
from its snapshots and scores each the same way, beside the run's own EMA. One JSON line per result, to stdout and
appended to --out (so a cut session keeps what finished); the table in bench/RESULTS.md is written from them.
Timings need a quiet machine: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from diffuse import checkpoint as ckpt
from diffuse.config import apply_overrides, load_config
from diffuse.data import load_dataset
from diffuse.metrics import fid
from diffuse.train import digit_classifier
from diffuse.ema import reconstruct
from diffuse.generate import default_labels, generate
from diffuse.kinds.diffusion import build_denoiser, build_model
from diffuse.runs import load_run
from diffuse.kinds.diffusion import sample_config_kwargs
from diffuse.train import train

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = {  # configs/mnist_cond.toml tracks post-hoc EMAs since this bench; before it, the first row added them
    "demo recipe": [],
    "offset noise 0.1": ["train.offset_noise=0.1"],
    "zero terminal SNR": ["schedule.zero_terminal_snr=true", "train.loss_weighting=none"],  # min-SNR gives step T weight 0
    "self-conditioning": ["model.self_condition=true"],
    "cosine lr decay": ["train.lr_schedule=cosine", "train.steps=2100"],  # decays to 0 at about the budget's last step
    "augment p=0.12": ["train.augment_p=0.12"],
    "P2 weighting": ["train.loss_weighting=p2", "train.p2_gamma=1.0"],
    "demo recipe, no post-hoc tracks": ["train.posthoc_ema=[]", "train.ema_snapshot_every=500"],  # the baseline again, last: the machine's speed drifts
}
SWEEP = (0.03, 0.05, 0.10, 0.15, 0.22)


def score(den, cfg, n: int, real: torch.Tensor, classifier) -> dict:
    """FID of n samples drawn as the demo draws them, their class histogram and accuracy, and the sampling time."""
    t0 = time.perf_counter()
    labels = default_labels(n, 10)
    x = torch.cat([generate(den, len(chunk), (1, 28, 28), labels=chunk, seed=i, **sample_config_kwargs(cfg.sample))
                   for i, chunk in enumerate(labels.split(250))])
    seconds = time.perf_counter() - t0
    predicted = classifier(x).argmax(1)
    return {"fid": round(fid(real, x, classifier), 2), "accuracy": round(float((predicted == labels).double().mean()), 3),
            "class_histogram": torch.bincount(predicted, minlength=10).tolist(), "sample_s": round(seconds)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=480)
    p.add_argument("--n-samples", type=int, default=500)
    p.add_argument("--only", nargs="*")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "recipes.jsonl"))
    args = p.parse_args()
    base = load_config(ROOT / "configs" / "mnist_cond.toml")
    classifier = digit_classifier()
    real = torch.stack([x for x, _ in load_dataset(base.data)])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def emit(row: dict) -> None:
        row = {"date": time.strftime("%Y-%m-%d"), "budget_s": args.budget, "n_samples": args.n_samples, **row}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    torch.set_num_threads(torch.get_num_threads())
    for name, overrides in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        cfg = apply_overrides(base, overrides + [f"train.time_limit={args.budget}", "train.sample_every=0"])
        with tempfile.TemporaryDirectory() as run:
            start = time.perf_counter()
            train(cfg, run, progress=False)
            seconds = time.perf_counter() - start
            steps = ckpt.latest_step(run)
            _, den, _ = load_run(run)
            emit({"candidate": name, "overrides": overrides, "train_s": round(seconds), "steps": steps,
                  "images_per_s": round(steps * cfg.train.batch_size / seconds, 1), **score(den, cfg, args.n_samples, real, classifier)})
            if name == "demo recipe":  # the post-hoc EMA sweep of the same run
                for sigma_rel in SWEEP:
                    net = build_model(cfg, 10)
                    try:
                        net.load_state_dict(reconstruct(Path(run) / "ema_snapshots", sigma_rel))
                    except ValueError as e:
                        emit({"candidate": f"post-hoc EMA sigma_rel={sigma_rel}", "error": str(e)})
                        continue
                    emit({"candidate": f"post-hoc EMA sigma_rel={sigma_rel}", "steps": steps,
                          **score(build_denoiser(cfg, net.eval()), cfg, args.n_samples, real, classifier)})


if __name__ == "__main__":
    main()
