"""The trained image-to-image tasks against their inputs (issue "Image-to-image and editing"), each trained here for a
CPU budget and measured on held-out images, and the cascade against the single-stage model at the same CPU time.

    sr        configs/sr_digits.toml (14 -> 28) trained --sr-budget s on 4,500 of the 5,000 bundled digits; on the
              500 held out (50 per class): PSNR and digit-classifier accuracy of one SR sample per image against
              the bicubic upsample of the same 14x14 input (and the truth's accuracy)
    cascade   configs/cascade_base.toml (14x14) and configs/cascade_sr.toml (with noise-conditioning augmentation)
              trained --cascade-budget / 2 s each, against the demo recipe (configs/mnist_cond.toml) trained
              --cascade-budget s, all on the 5,000 digits; FID (digit features) of 1,000 samples, labels 0..9 in
              turn at w = 1, for a sweep of the augmentation level at sampling
    jpeg      configs/jpeg_photos.toml trained --photo-budget s; on 500 other crops of the photos (seed 1; the same
              seven photos, other places): PSNR of the restored image and of its JPEG input (quality drawn 5..30)
    colorize  configs/colorize_photos.toml trained --photo-budget s; on the same held-out crops: the mean absolute
              chroma error (Cb, Cr of ITU-R BT.601, in [0, 255] units) of the outputs and of the grayscale input
              (chroma 0), and the luma error of the outputs

    python bench/image_to_image.py sr cascade jpeg colorize

Runs already in --out are reused (delete them to retrain). Training is timed by wall clock: run it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from diffuse import checkpoint as ckpt
from diffuse.config import apply_overrides, load_config
from diffuse.data import ImageDataset, load_dataset
from diffuse.data.images import _photo_crops
from diffuse.metrics import fid
from diffuse.nets.digits import classifier_accuracy
from diffuse.train import digit_classifier
from diffuse.generate import generate
from diffuse.runs import load_run
from diffuse.tasks.image_to_image import downsample, input_condition, to_gray, training_condition, upsample, viewable
from diffuse.train import Trainer
from diffuse.visualize import save_grid, to_uint8

ROOT = Path(__file__).resolve().parents[1]


def quantize(x: torch.Tensor) -> torch.Tensor:
    """As saved to a PNG: 8 bits."""
    return torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() / 127.5 - 1


def psnr(x: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over images of 10 log10(MAX^2 / MSE) with MAX = 2, the width of [-1, 1] (= 255 in 0..255 units)."""
    mse = (x - truth).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4 / mse)).mean())


def fit(config: str, run: Path, budget: float, dataset=None, sets=()) -> tuple[Path, dict]:
    """Train a config for `budget` seconds into `run` (reused if present); returns the run and its training figures."""
    if not (run / "config.toml").is_file():
        cfg = apply_overrides(load_config(ROOT / "configs" / config), [f"train.time_limit={budget}", *sets])
        start = time.perf_counter()
        Trainer(cfg, run, progress=False, dataset=dataset).fit()
        print(json.dumps({"trained": config, "seconds": round(time.perf_counter() - start)}), flush=True)
    step = ckpt.latest_step(run)
    loss = ckpt.read_state(run, step).get("last_loss")
    return run, {"steps": step, "last_loss": None if loss is None else round(loss, 4)}


def split_digits():
    """The 5,000 bundled digits: 4,500 to train on, 500 held out (every tenth; 50 per class)."""
    data = load_dataset(load_config(ROOT / "configs" / "sr_digits.toml").data)
    held = torch.arange(len(data)) % 10 == 9
    train = ImageDataset(data.labels[~held], data.class_names, 1, 28, images=data.images[~held])
    x, cond = data.batch(torch.nonzero(held)[:, 0])
    return train, x, cond["label"]


def bench_sr(out: Path, budget: float) -> None:
    train, x, labels = split_digits()
    run, figures = fit("sr_digits.toml", out / "sr_digits", budget, dataset=train)
    cfg, den, _ = load_run(run)
    low = downsample(x, 2)
    bicubic = quantize(upsample(low, 28))
    sr = quantize(generate(den, len(x), (1, 28, 28), cond=input_condition(cfg.task, low, 28, den.schedule),
                           sampler=cfg.sample.sampler, steps=cfg.sample.steps, seed=0))
    clf = digit_classifier()
    row = {"task": "sr 14->28 digits", **figures, "psnr_sr": round(psnr(sr, x), 2), "psnr_bicubic": round(psnr(bicubic, x), 2),
           "acc_sr": round(classifier_accuracy(clf, sr, labels), 3), "acc_bicubic": round(classifier_accuracy(clf, bicubic, labels), 3),
           "acc_truth": round(classifier_accuracy(clf, x, labels), 3)}
    save_grid(torch.cat([upsample(low[:10], 28), sr[:10], x[:10]]), out / "sr_digits.png", nrow=10, scale=2)
    print(json.dumps(row), flush=True)


def bench_cascade(out: Path, budget: float, n: int) -> None:
    base, fb = fit("cascade_base.toml", out / "cascade" / "base", budget / 2)
    sr, fs = fit("cascade_sr.toml", out / "cascade" / "sr", budget / 2)
    single, f1 = fit("mnist_cond.toml", out / "single", budget)
    clf = digit_classifier()
    real = torch.stack([x for x, _ in load_dataset(load_config(ROOT / "configs" / "mnist_cond.toml").data)])
    labels = torch.arange(n) % 10
    cfg1, den1, _ = load_run(single)
    start = time.perf_counter()
    x1 = quantize(generate(den1, n, (1, 28, 28), labels=labels, guidance=cfg1.sample.guidance, sampler=cfg1.sample.sampler,
                           steps=cfg1.sample.steps, seed=0))
    print(json.dumps({"model": "single stage 28x28", **f1, "fid": round(fid(real, x1, clf), 2),
                      "accuracy": round(classifier_accuracy(clf, x1, labels), 3),
                      "sample_s": round(time.perf_counter() - start, 1)}), flush=True)
    cfgb, denb, _ = load_run(base)
    cfgs, dens, _ = load_run(sr)
    start = time.perf_counter()
    low = generate(denb, n, (1, 14, 14), labels=labels, guidance=cfgb.sample.guidance, sampler=cfgb.sample.sampler,
                   steps=cfgb.sample.steps, seed=0)
    base_s = time.perf_counter() - start
    for level in (0.0, 0.05, 0.1, 0.2, 0.3):
        start = time.perf_counter()
        task = dataclasses.replace(cfgs.task, aug_level=level)
        cond = input_condition(task, low, 28, dens.schedule, generator=torch.Generator().manual_seed(1))
        x = quantize(generate(dens, n, (1, 28, 28), cond=cond, sampler=cfgs.sample.sampler, steps=cfgs.sample.steps, seed=1))
        print(json.dumps({"model": f"cascade 14 -> 28, aug_level {level}", "base": fb, "sr": fs, "fid": round(fid(real, x, clf), 2),
                          "accuracy": round(classifier_accuracy(clf, x, labels), 3),
                          "sample_s": round(base_s + time.perf_counter() - start, 1)}), flush=True)
        if level == 0.1:
            save_grid(torch.cat([upsample(low[:20], 28), x[:20], x1[:20]]), out / "cascade.png", nrow=20, scale=2)


def held_out_photos(n: int) -> torch.Tensor:
    cfg = load_config(ROOT / "configs" / "jpeg_photos.toml").data
    cfg.crops = n
    return _photo_crops(cfg, seed=1).batch(torch.arange(n))[0]


def photo_task(config: str, out: Path, budget: float, n: int):
    """Train a photo task (reused if present), then one sample per held-out crop: (truth, condition image, outputs,
    training figures), with a figure of the first ten (input, output, truth)."""
    run, figures = fit(config, out / config.removesuffix(".toml"), budget)
    cfg, den, _ = load_run(run)
    x = held_out_photos(n)
    image = training_condition(cfg.task, x, torch.arange(n), den.schedule)["image"]
    y = quantize(generate(den, n, (3, 32, 32), cond={"image": image}, sampler=cfg.sample.sampler, steps=cfg.sample.steps,
                          seed=0))
    save_grid(torch.cat([viewable(image[:10], 3), y[:10], x[:10]]), out / f"{run.name}.png", nrow=10, scale=3)
    return x, image, y, figures


def bench_jpeg(out: Path, budget: float, n: int, k: int = 4) -> None:
    """One restoration per input, and the mean of k (samples of p(x | y) average towards E[x | y], the estimate PSNR
    rewards; one sample trades PSNR for detail, the perception-distortion trade-off of Blau & Michaeli 2018)."""
    x, compressed, restored, figures = photo_task("jpeg_photos.toml", out, budget, n)
    cfg, den, _ = load_run(out / "jpeg_photos")
    mean = sum(generate(den, n, (3, 32, 32), cond={"image": compressed}, sampler=cfg.sample.sampler,
                        steps=cfg.sample.steps, seed=seed) for seed in range(k)) / k
    print(json.dumps({"task": "jpeg restoration, photo crops 32x32", **figures, "psnr_restored": round(psnr(restored, x), 2),
                      f"psnr_mean_of_{k}": round(psnr(quantize(mean), x), 2),
                      "psnr_jpeg_input": round(psnr(compressed, x), 2)}), flush=True)


def chroma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 2, H, W): Cb, Cr of ITU-R BT.601 in [0, 255] units."""
    w = x.new_tensor([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    return torch.einsum("kc,bchw->bkhw", w, (x + 1) * 127.5)


def bench_colorize(out: Path, budget: float, n: int) -> None:
    x, gray, colour, figures = photo_task("colorize_photos.toml", out, budget, n)
    print(json.dumps({"task": "colorization, photo crops 32x32", **figures,
                      "chroma_error_output": round(float((chroma(colour) - chroma(x)).abs().mean()), 2),
                      "chroma_error_gray_input": round(float(chroma(x).abs().mean()), 2),
                      "luma_error_output_255": round(float((to_gray(colour) - gray).abs().mean()) * 127.5, 2)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("benches", nargs="+", choices=["sr", "cascade", "jpeg", "colorize"])
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "image_to_image"))
    p.add_argument("--sr-budget", type=float, default=300)
    p.add_argument("--cascade-budget", type=float, default=480)
    p.add_argument("--photo-budget", type=float, default=600)
    p.add_argument("--n", type=int, default=1000)
    args = p.parse_args()
    out = Path(args.out)
    for b in args.benches:
        if b == "sr":
            bench_sr(out, args.sr_budget)
        elif b == "cascade":
            bench_cascade(out, args.cascade_budget, args.n)
        elif b == "jpeg":
            bench_jpeg(out, args.photo_budget, min(args.n, 500))
        else:
            bench_colorize(out, args.photo_budget, min(args.n, 500))


if __name__ == "__main__":
    main()
