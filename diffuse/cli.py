"""The `diffuse` command: train, sample, demo.

    diffuse train CONFIG [--set key=value ...] --out RUN      (again on RUN: resume)
    diffuse sample RUN --n N --sampler ddpm|ddim --steps K --seed S --out FILE.png|FILE.npy
    diffuse demo [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

from .config import ConfigError, apply_overrides, load_config
from .samplers import SAMPLERS
from .train import NonFiniteLoss, ResumeError


def _train(args) -> None:
    from .train import train

    cfg = apply_overrides(load_config(args.config), args.set or [])
    run = train(cfg, args.out, inexact_resume=args.inexact_resume)
    print(f"run folder: {run}")


def _sample(args) -> None:
    import torch
    from tqdm import tqdm

    from .train import generate, load_run
    from .visualize import save_grid, to_unit

    out = Path(args.out)
    if out.suffix not in (".png", ".npy"):
        raise ValueError(f"--out must end in .png (an image grid) or .npy (an array of shape (N, C, H, W) in [0, 1]), got {out}")
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, den, num_classes = load_run(args.run, ema=not args.no_ema, device=device)
    s, d = cfg.sample, cfg.data
    if num_classes and cfg.model.class_conditional:
        labels = torch.arange(args.n, device=device) % num_classes
        den.net = functools.partial(den.net, y=labels)
    steps = args.steps if args.steps is not None else s.steps
    steps = None if steps == 0 else steps
    bar = tqdm(total=steps or den.schedule.T, unit="step", desc=f"{args.sampler or s.sampler}")
    x = generate(den, args.n, (d.channels, d.image_size, d.image_size), sampler=args.sampler or s.sampler, steps=steps,
                 spacing=args.spacing or s.spacing, eta=s.eta if args.eta is None else args.eta, variance=s.variance,
                 clip=not args.no_clip and s.clip, seed=args.seed, device=device, callback=lambda step: bar.update(1))
    bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, to_unit(x).numpy())
    else:
        save_grid(x, out)
    print(f"wrote {args.n} samples to {out}")


def _demo(args) -> None:
    from .demo import run_demo

    paths = run_demo(args.out, time_limit=args.time_limit)
    print("demo figures:")
    for name, path in paths.items():
        print(f"  {name:20s} {path}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffuse", description="Denoising diffusion models: train, sample, demo.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a TOML config into a run folder (resumes an existing one)")
    t.add_argument("config", help="TOML config, e.g. configs/mnist.toml or RUN/config.toml")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.lr=1e-4 (repeatable)")
    t.add_argument("--out", required=True, help="run folder (created, or resumed if it holds a run)")
    t.add_argument("--inexact-resume", action="store_true", help="resume from the weights even if training state is missing or the config changed")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run", help="run folder written by `diffuse train`")
    s.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--sampler", choices=sorted(SAMPLERS), help="default: the run's sample.sampler")
    s.add_argument("--steps", type=int, help="denoiser calls (default: the run's sample.steps; 0 = every one of the T steps)")
    s.add_argument("--spacing", choices=["leading", "trailing", "linspace"], help="timestep spacing (default: the run's)")
    s.add_argument("--eta", type=float, help="DDIM eta (default: the run's sample.eta)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    s.add_argument("--out", required=True, help="FILE.png (grid) or FILE.npy (array (N, C, H, W) in [0, 1])")
    s.set_defaults(func=_sample)

    d = sub.add_parser("demo", help="train on the bundled MNIST digits (~10 min on a 2-core CPU) and write figures")
    d.add_argument("--out", default="demo", help="output folder (default ./demo)")
    d.add_argument("--time-limit", type=float, help="seconds of training (default: the demo config's)")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, NonFiniteLoss, ResumeError) as e:
        print(f"diffuse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffuse {args.command}: interrupted; the last committed checkpoint is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
