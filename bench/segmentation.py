"""Segmentation from diffusion features against the baselines of Baranchuk et al. 2022's table (issue 36).

Every method is the same pixel-MLP ensemble (configs/segment_*.toml: 10 members, 128 -> 32 -> C) on other features,
or a U-Net trained end to end on the same labelled images; every run is trained by the one Trainer and scored by
SegmentationRun.evaluate on the same 100 held-out images (mIoU over classes, background included):

    diffusion         the diffusion run's decoder activations at DDPM's steps 50, 150, 250 (the method)
    random            the same U-Net with random weights (controls for the architecture)
    pixels            the pixel values and their (x, y) coordinates
    autoencoder       the KL autoencoder's latents, bilinearly upsampled (at the autoencoder's own image size: the
                      digits' is 32 px, so their labels are the 32 px digits')
    digit_classifier  the digit classifier's two conv maps, upsampled (digits only)
    unet              a U-Net (lecture 003's contracting and expanding paths) trained end to end on the labelled images

    python bench/segmentation.py table --digits runs/mnist --shapes runs/shapes --ae-digits runs/ae_mnist \
        --ae-shapes runs/ae_shapes [--seeds 5] [--labelled 10 20]
    python bench/segmentation.py ablation --digits runs/mnist          the (block, time) grid, 20 digits, seed 0
    python bench/segmentation.py cost --digits runs/mnist              seconds and peak memory (run it alone)

Each part prints a Markdown table and writes JSON under --out (default bench/out/segmentation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffuse.config import apply_overrides, load_config
from PIL import Image

from diffuse.kinds.segmentation import Features, SegmentationRun, load_labelled, source_network
from diffuse.train import feature_network, train
from diffuse.visualize import save_image, to_uint8

CONFIGS = {"digits": "configs/segment_digits.toml", "shapes": "configs/segment_shapes.toml"}
METHODS = {"digits": ("diffusion", "random", "pixels", "autoencoder", "digit_classifier", "unet"),
           "shapes": ("diffusion", "random", "pixels", "autoencoder", "unet")}
UNET = ["segment.head=unet", "model.channels=16", "model.channel_mult=[1, 2, 2]", "model.num_res_blocks=1",
        "model.attention_resolutions=[]", "model.norm_groups=8", "model.dropout=0.1", "train.batch_size=8",
        "train.steps=600"]  # the end-to-end baseline: a small U-Net, 8 labelled images a step


def overrides(method: str, source: str, autoencoder: str) -> list[str]:
    """The --set lines that turn a segment config into `method`."""
    if method == "diffusion":
        return [f"segment.source={source}"]
    if method == "random":
        return [f"segment.source={source}", "segment.features=random"]
    if method == "autoencoder":
        size = load_config(Path(autoencoder) / "config.toml").data.image_size  # its own size (32 for configs/ae_mnist)
        return [f"segment.source={autoencoder}", "segment.features=autoencoder", f"data.image_size={size}"]
    if method == "unet":
        return ['segment.source=""', *UNET]
    return ['segment.source=""', f"segment.features={method}"]  # pixels, digit_classifier


def run(dataset: str, sets: list[str], out: Path) -> dict:
    """Train one segmentation run and score it on its held-out images: the record with mIoU and seconds."""
    cfg = apply_overrides(load_config(CONFIGS[dataset]), ["train.fid_every=0", "train.sample_every=0", *sets])
    if cfg.segment.head == "unet":  # its checkpoint step follows train.steps
        cfg = apply_overrides(cfg, [f"train.checkpoint_every={cfg.train.steps}"])
    start = time.perf_counter()
    train(cfg, out, progress=False)
    trained = time.perf_counter() - start
    result = SegmentationRun(out, feature_network=feature_network).evaluate()
    return {"miou": result["miou"], "iou": result["iou"], "train_s": trained, "total_s": time.perf_counter() - start}


def table(args) -> None:
    """mIoU mean and std over seeds, per dataset, labelled count and method."""
    rows = []
    for dataset in ("digits", "shapes"):
        source, ae = getattr(args, dataset), getattr(args, f"ae_{dataset}")
        if not source:
            continue
        for n in args.labelled:
            for method in METHODS[dataset]:
                scores = []
                for seed in range(args.seeds):
                    name = f"{dataset}_{n}_{method}_{seed}"
                    rec = run(dataset, [f"segment.train_images={n}", f"train.seed={seed}", *overrides(method, source, ae)],
                              args.out / "runs" / name)
                    scores.append(rec["miou"])
                    print(f"{name}: mIoU {rec['miou']:.3f} ({rec['total_s']:.0f} s)", flush=True)
                rows.append({"dataset": dataset, "labelled": n, "method": method, "miou": scores,
                             "mean": statistics.mean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0})
    write(args.out / "table.json", rows)
    print("\n| data | labelled | " + " | ".join(METHODS["digits"]) + " |\n|---|---|" + "---|" * len(METHODS["digits"]))
    for dataset in ("digits", "shapes"):
        for n in args.labelled:
            cells = {r["method"]: f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}" for r in rows
                     if r["dataset"] == dataset and r["labelled"] == n}
            if cells:
                print(f"| {dataset} | {n} | " + " | ".join(cells.get(m, "-") for m in METHODS["digits"]) + " |")


def ablation(args) -> None:
    """mIoU of the diffusion features of one decoder block at one time, every block against every time (the paper's
    figure), 20 labelled digits, seed 0; plus every block at each time and the config's default."""
    cfg = apply_overrides(load_config(CONFIGS["digits"]), [f"segment.source={args.digits}"])
    layout = source_network(cfg, "cpu")[1].net.decoder_layout()
    times = [0.05, 0.15, 0.25, 0.5]
    grid = {}
    for b, (width, side) in enumerate(layout):
        for t in times:
            rec = run("digits", [f"segment.source={args.digits}", f"segment.blocks=[{b}]", f"segment.times=[{t}]"],
                      args.out / "ablation" / f"block{b}_t{t}")
            grid[f"{b},{t}"] = rec["miou"]
            print(f"block {b} ({width} x {side}px), t {t}: mIoU {rec['miou']:.3f}", flush=True)
    for t in times:
        rec = run("digits", [f"segment.source={args.digits}", f"segment.times=[{t}]"], args.out / "ablation" / f"all_t{t}")
        grid[f"all,{t}"] = rec["miou"]
    write(args.out / "ablation.json", {"layout": layout, "times": times, "miou": grid})
    print("\n| block (width x side) | " + " | ".join(f"t = {t}" for t in times) + " |\n|---|" + "---|" * len(times))
    for b, (width, side) in enumerate(layout):
        print(f"| {b} ({width} x {side}) | " + " | ".join(f"{100 * grid[f'{b},{t}']:.1f}" for t in times) + " |")
    print("| all | " + " | ".join(f"{100 * grid[f'all,{t}']:.1f}" for t in times) + " |")


def cost(args) -> None:
    """Seconds of `diffuse train configs/segment_digits.toml` (features of 20 digits, the ensemble, no held-out score),
    of segmenting one image in a loaded run and of the `diffuse segment` command, and the peak RSS of computing the
    features of N images (a fresh process each)."""
    out = args.out / "cost"
    sets = [f"segment.source={args.digits}", "train.fid_every=0", "train.sample_every=0"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffuse", "train", CONFIGS["digits"], "--out", str(out / "run"),
                    *[a for s in sets for a in ("--set", s)]], check=True, env=quiet())
    train_s = time.perf_counter() - start
    seg = SegmentationRun(out / "run")
    x = load_labelled(seg.cfg).images[:1]
    seg.segment(x)  # warm
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        seg.segment(x)
        times.append(time.perf_counter() - t0)
    image = out / "digit.png"
    from_tensor_png(x[0], image)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffuse", "segment", str(out / "run"), "--image", str(image), "--out",
                    str(out / "digit_mask.png")], check=True, env=quiet(), capture_output=True)
    command_s = time.perf_counter() - t0
    memory = {n: peak_rss(out / "run", n) for n in (10, 20, 50, 100, 200)}
    rec = {"train_s": train_s, "segment_one_image_s": statistics.median(times), "segment_command_s": command_s,
           "feature_peak_rss_mb": memory, "feature_dim": Features(seg.cfg, "cpu", feature_network).dim}
    write(args.out / "cost.json", rec)
    print(json.dumps(rec, indent=1))


def peak_rss(run_dir: Path, n: int) -> dict:
    """Peak RSS (MB) of a fresh process that loads a segmentation run's features and computes them for n images."""
    code = (f"import resource, torch; from diffuse.kinds.segmentation import Features, SegmentationRun, load_labelled; "
            f"r = SegmentationRun({str(run_dir)!r}); x = load_labelled(r.cfg).images[:{n}]; "
            f"base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; f = r.features(x); "
            f"print(base / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, f.numel() * 4 / 2**20)")
    line = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=quiet()).stdout.split()
    before, peak, held = map(float, line)
    return {"peak_mb": peak, "before_mb": before, "features_mb": held}


def from_tensor_png(x: torch.Tensor, path: Path) -> None:
    """A 1-channel image (1, H, W) in [-1, 1] as a grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(Image.fromarray(to_uint8(x[None])[0, :, :, 0], "L"), path)


def quiet() -> dict:
    return {**os.environ, "TQDM_DISABLE": "1"}


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["table", "ablation", "cost"])
    p.add_argument("--digits", default="", help="the digits' diffusion run (configs/mnist.toml)")
    p.add_argument("--shapes", default="", help="the shapes' diffusion run (configs/shapes.toml)")
    p.add_argument("--ae-digits", default="", help="the digits' autoencoder run (configs/ae_mnist.toml)")
    p.add_argument("--ae-shapes", default="", help="the shapes' autoencoder run (configs/ae_shapes.toml)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--labelled", type=int, nargs="+", default=[10, 20])
    p.add_argument("--out", type=Path, default=Path("bench/out/segmentation"))
    args = p.parse_args()
    {"table": table, "ablation": ablation, "cost": cost}[args.part](args)


if __name__ == "__main__":
    main()
