"""Our demo pipeline against diffusers on the same CPU, the same digits and the same wall-clock budget.

    python bench/cpu_demo_vs_diffusers.py --budget 480 --n-samples 1000 --out bench/out

1. ours: each --config (default: the demo's configs/mnist_cond.toml, class-conditional with
   classifier-free guidance, and its unconditional twin configs/mnist.toml; read now, whatever
   they hold) trained by diffuse.train.Trainer for --budget seconds, then N samples with the
   config's own sampler and guidance (load_run + generate; labels 0..9 in turn);
2. the peer: diffusers UNet2DModel (the unconditional-training tutorial's design, scaled to
   28x28 and to our parameter count) trained by the tutorial's loop (DDPMScheduler(1000, linear)
   add_noise, MSE on eps, AdamW with warm-up, gradient clipping at 1) on the same images with
   our batch size for the same budget, then N samples with DDIMScheduler, 50 steps, eta 0.

The two run one after the other in this process on the same torch threads. Each is scored by
training images/s, sampling time and FID of its N samples against the 5,000 bundled digits in
the feature space of diffuse.metrics.digit_classifier() (held fixed; trained once and cached),
with the classifier's histogram of predicted digits. Sample grids go to --out; a dated section
of bench/RESULTS.md is replaced or appended (unless --no-results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import tempfile
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_constant_schedule_with_warmup
from torch import Tensor

from diffuse.config import load_config
from diffuse.data import DataConfig, load_dataset
from diffuse.metrics import fid
from diffuse.train import digit_classifier
from diffuse.generate import generate
from diffuse.runs import load_run
from diffuse.train import Trainer
from diffuse.visualize import save_grid
from results import cpu_description, publish, say  # bench/results.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
TITLE = "CPU: demo pipeline vs diffusers at the same wall-clock budget"

# The peer's recipe: the diffusers unconditional-training tutorial (lr 1e-4, 500 warm-up steps,
# clipping at 1), with lr at the top of its usual 1e-4..2e-4 range (faster at short budgets)
# and a constant LR after warm-up (its cosine decay needs a step count a time budget lacks).
PEER_LR = 2e-4
PEER_WARMUP = 500
PEER_DDIM_STEPS = 50
CHUNK = 250  # images sampled per batch, for both models






def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def chunks(n: int) -> list[int]:
    return [min(CHUNK, n - i) for i in range(0, n, CHUNK)]


# --- ours -------------------------------------------------------------------------------------
def run_ours(config: Path, budget: float, n: int, seed: int) -> tuple[dict, Tensor]:
    cfg = load_config(config)
    if cfg.data.source != "mnist":
        raise SystemExit(f"{config} trains on data.source = {cfg.data.source!r}; this bench compares models on the bundled "
                         "MNIST digits: use a config with data.source = \"mnist\"")
    cfg.train.time_limit, cfg.train.steps = budget, 10**9  # the budget, not a step count, ends training
    cfg.train.sample_every = 0  # the peer's loop draws no sample grids while training either
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as run_dir:
        trainer = Trainer(cfg, run_dir, progress=False)
        say(f"ours: {n_params(trainer.model):,} parameters, batch {cfg.train.batch_size}, training {budget:g} s ...")
        start = time.perf_counter()
        trainer.fit()
        train_s = time.perf_counter() - start
        steps = trainer.step

        cfg, den, _ = load_run(run_dir)
        s, d = cfg.sample, cfg.data
        net = den.net
        start, out = time.perf_counter(), []
        for i, m in enumerate(chunks(n)):
            # class-conditional: balanced labels, as the Trainer's sample grids
            y = torch.arange(i * CHUNK, i * CHUNK + m) % net.num_classes if net.num_classes else None
            out.append(generate(den, m, (d.channels, d.image_size, d.image_size), sampler=s.sampler, steps=s.steps,
                                spacing=s.spacing, eta=s.eta, variance=s.variance, clip=s.clip, labels=y,
                                guidance=s.guidance, seed=seed + i))
            say(f"  ours: {sum(map(len, out))}/{n} samples, {time.perf_counter() - start:.0f} s")
        sample_s = time.perf_counter() - start
    sampler = (f"{s.sampler} {s.steps} steps" + (f", eta {s.eta:g}" if s.sampler == "ddim" else "")
               + (f", guidance {s.guidance:g}" if net.num_classes and s.guidance else ""))
    row = {"model": f"diffuse ({config.name}{', class-conditional' if net.num_classes else ''})", "params": n_params(net),
           "sampler": sampler, "steps": steps, "batch": cfg.train.batch_size, "train_s": train_s, "sample_s": sample_s}
    return row, torch.cat(out)


# --- the diffusers peer -----------------------------------------------------------------------
def peer_unet(width: int, image_size: int, channels: int) -> UNet2DModel:
    """The tutorial's UNet2DModel (2 ResNet layers per block, attention one level up from the bottom),
    with three levels (28 -> 14 -> 7) instead of six, since 28 halves only twice."""
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=2,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=math.gcd(width, 32),
    )


def matched_width(target_params: int, image_size: int, channels: int) -> int:
    """The base width (a multiple of 8) whose peer parameter count is nearest ours, in ratio."""
    with torch.device("meta"):  # counts parameters without allocating them
        counts = {w: n_params(peer_unet(w, image_size, channels)) for w in range(8, 257, 8)}
    return min(counts, key=lambda w: abs(math.log(counts[w] / target_params)))


def batches(n: int, batch_size: int, g: torch.Generator):
    """Index batches of endless epoch-wise permutations, the last partial batch dropped (as our Trainer does)."""
    while True:
        yield from (idx for idx in torch.randperm(n, generator=g).split(batch_size) if len(idx) == batch_size)


def run_peer(images: Tensor, batch_size: int, target_params: int, budget: float, n: int, seed: int) -> tuple[dict, Tensor]:
    _, c, size, _ = images.shape
    if size % 4:
        raise SystemExit(f"the peer UNet2DModel halves the image twice: image_size {size} must be divisible by 4")
    torch.manual_seed(seed)
    width = matched_width(target_params, size, c)
    model = peer_unet(width, size, c)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEER_LR)
    lr_scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=PEER_WARMUP)
    g = torch.Generator().manual_seed(seed)
    say(f"diffusers: UNet2DModel width {width}, {n_params(model):,} parameters, batch {batch_size}, training {budget:g} s ...")

    model.train()
    steps, start = 0, time.perf_counter()
    for idx in batches(len(images), batch_size, g):
        clean = images[idx]
        noise = torch.randn(clean.shape, generator=g)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(model(noisy, timesteps, return_dict=False)[0], noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        if time.perf_counter() - start >= budget:
            break
    train_s = time.perf_counter() - start

    model.eval()
    ddim = DDIMScheduler.from_config(noise_scheduler.config)
    ddim.set_timesteps(PEER_DDIM_STEPS)
    start, out = time.perf_counter(), []
    with torch.no_grad():
        for i, m in enumerate(chunks(n)):
            gen = torch.Generator().manual_seed(seed + i)
            x = torch.randn((m, c, size, size), generator=gen)
            for t in ddim.timesteps:
                x = ddim.step(model(x, t).sample, t, x, eta=0.0, generator=gen).prev_sample
            out.append(x.clamp(-1, 1))
            say(f"  diffusers: {sum(map(len, out))}/{n} samples, {time.perf_counter() - start:.0f} s")
    sample_s = time.perf_counter() - start
    row = {"model": "diffusers UNet2DModel + DDPMScheduler", "params": n_params(model),
           "sampler": f"DDIM {PEER_DDIM_STEPS} steps, eta 0", "steps": steps, "batch": batch_size,
           "train_s": train_s, "sample_s": sample_s}
    return row, torch.cat(out)


# --- scoring and reporting --------------------------------------------------------------------
@torch.no_grad()
def score(row: dict, samples: Tensor, real: Tensor, classifier) -> dict:
    row["fid"] = fid(real, samples, classifier)
    row["classes"] = torch.cat([classifier(x).argmax(1) for x in samples.split(500)]).bincount(minlength=10).tolist()
    if "steps" in row:
        row["images_per_s"] = row["steps"] * row["batch"] / row["train_s"]
    return row


def results_section(rows: list[dict], budget: float, n: int, configs: list[Path]) -> str:
    date = datetime.date.today().isoformat()
    shown = ", ".join(f"`{c.relative_to(ROOT) if c.is_relative_to(ROOT) else c}`" for c in configs)
    lines = [
        f"## {TITLE} ({date})",
        "",
        f"Device: {cpu_description()}; torch {torch.__version__} ({torch.get_num_threads()} threads), diffusers {diffusers.__version__}.",
        f"Each model trained for {budget:g} s of wall clock, one after the other in one process, on the 5,000 bundled "
        f"MNIST digits; ours from {shown}. FID of {n} samples against the 5,000 digits in the "
        "feature space of `diffuse.metrics.digit_classifier()` (lower is better; the last row is the floor that "
        f"{n} real digits reach). `python bench/cpu_demo_vs_diffusers.py --budget {budget:g} --n-samples {n}`",
        "",
        "| model | parameters | train steps | train images/s | sampler | sampling time (s) | FID |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        if "steps" in r:
            lines.append(f"| {r['model']} | {r['params']:,} | {r['steps']:,} | {r['images_per_s']:.1f} | {r['sampler']} | "
                         f"{r['sample_s']:.1f} | {r['fid']:.2f} |")
        else:
            lines.append(f"| {r['model']} | | | | | | {r['fid']:.2f} |")
    lines += ["", "Digits the classifier sees in the samples:", "",
              "| model | " + " | ".join(map(str, range(10))) + " |", "|---|" + "---:|" * 10]
    lines += [f"| {r['model']} | " + " | ".join(map(str, r["classes"])) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=480, help="training seconds per model (default 480)")
    p.add_argument("--n-samples", type=int, default=1000, help="samples per model for FID (default 1000)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="folder for sample grids and results.json")
    p.add_argument("--config", type=Path, nargs="+", default=[ROOT / "configs" / "mnist_cond.toml", ROOT / "configs" / "mnist.toml"],
                   help="our run configs (default: configs/mnist_cond.toml, the demo's, and configs/mnist.toml)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-results", action="store_true", help="do not touch bench/RESULTS.md")
    args = p.parse_args()
    if args.budget <= 0 or args.n_samples < 2:
        p.error("--budget must be > 0 seconds and --n-samples at least 2 (FID needs a covariance; use ~1000)")
    args.out.mkdir(parents=True, exist_ok=True)

    classifier = digit_classifier()  # trained once and cached: outside both budgets
    digits = load_dataset(DataConfig(source="mnist"))
    real = digits.images.float() / 127.5 - 1  # (5000, 1, 28, 28)

    rows, grids = [], {}
    for config in args.config:
        ours, x_ours = run_ours(config.absolute(), args.budget, args.n_samples, args.seed)
        say(f"ours ({config.name}): {ours['steps']} steps in {ours['train_s']:.1f} s, {args.n_samples} samples in {ours['sample_s']:.1f} s")
        rows.append(score(ours, x_ours, real, classifier))
        grids[f"ours_{config.stem}"] = x_ours
    cfg = load_config(args.config[0])
    train_images = load_dataset(cfg.data).images.float() / 127.5 - 1  # the exact images ours trained on
    peer, x_peer = run_peer(train_images, cfg.train.batch_size, rows[0]["params"], args.budget, args.n_samples, args.seed)
    say(f"diffusers: {peer['steps']} steps in {peer['train_s']:.1f} s, {args.n_samples} samples in {peer['sample_s']:.1f} s")
    grids["diffusers"] = x_peer

    floor = {"model": f"real digits ({args.n_samples} of the 5,000)"}
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(args.seed))[:args.n_samples]
    rows += [score(peer, x_peer, real, classifier), score(floor, real[pick], real, classifier)]
    for name, x in grids.items():
        save_grid(x[:100], args.out / f"{name}_samples.png", nrow=10, scale=2)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))

    section = results_section(rows, args.budget, args.n_samples, [c.absolute() for c in args.config])
    publish(section, args.no_results)
    say(f"sample grids and results.json in {args.out}")


if __name__ == "__main__":
    main()
