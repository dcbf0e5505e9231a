"""Diffusion autoencoders (Preechakul et al. 2022) measured on the bundled MNIST digits (issue 33).

    python bench/diffae.py inversion
        DDIM inversion then DDIM sampling with the exact denoiser of Gaussian data, float64: the round trip's error per
        process and step count, its measured order, and what fixed-point refinement buys
    python bench/diffae.py table --diffae runs/diffae --prior runs/diffae_prior --mnist runs/mnist [--ae runs/ae_mnist]
        on the 500 held-out digits (every tenth, 50 of each class, which the diffusion autoencoder and the autoencoder never saw):
        reconstruction (inferred x_T at 10/20/50/100/250 steps, random x_T, plain DDIM inversion of the demo's
        unconditional model, the KL autoencoder): MSE, SSIM, class kept; linear probes from z_sem and from x_T;
        manipulation of thickness, slant and class over the amount; interpolation path length, slerp against lerp;
        unconditional samples through the latent DDIM against the demo model at equal network calls (digit FID)
    python bench/diffae.py cost --diffae runs/diffae --mnist runs/mnist
        seconds per training step of each recipe (run it alone: the figure for "equal training time")

Each part prints Markdown tables and writes JSON under --out (default bench/out/diffae). The classifiers on codes the
table needs (thickness, slant, label) are trained here from configs/diffae_thickness.toml into OUT/classifiers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from skimage.metrics import structural_similarity
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from diffuse.config import apply_overrides, load_config
from diffuse.data import load_dataset
from diffuse.data.attributes import measure
from diffuse.denoiser import Denoiser
from diffuse.generate import generate, invert
from diffuse.kinds.autoencoder import held_out
from diffuse.app.requests import Direction
from diffuse.kinds.diffae import denormalise, load_diffae, normalise, sample_pair, semantic_codes
from diffuse.metrics import extract_features, feature_statistics, frechet_distance
from diffuse.runs import open_run
from diffuse.samplers import ddim
from diffuse.schedule import Schedule, ScheduleConfig
from diffuse.stages import load_autoencoder
from diffuse.tasks.semantic import decode, edit_code, interpolation, lerp
from diffuse.train import Trainer, feature_network, train
from diffuse.checkpoint import load_checkpoint
from results import table  # bench/results.py, beside this script

STEPS = (10, 20, 50, 100, 250)
BATCH = 250




# --- the analytic round trip -------------------------------------------------------------------------------------
def gaussian_eps(schedule, mu: float, std: float):
    """E[eps | x_t] for x_0 ~ N(mu, std^2 I): sigma (x_t - alpha mu) / (alpha^2 std^2 + sigma^2)."""
    def eps(x, model_time):
        t = schedule.t_from_model_time(model_time)
        a = schedule.alpha(t).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        s = schedule.sigma(t).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        return s * (x - a * mu) / (a**2 * std**2 + s**2)
    return eps


def inversion_part(out: Path) -> None:
    rows = []
    for kind in ("linear", "cosine", "vp_cosine", "edm", "flow"):
        s = Schedule.from_config(ScheduleConfig(kind=kind))
        den = Denoiser(gaussian_eps(s, 0.3, 0.5), s, prediction="eps", bounded=False)
        x0 = 0.3 + 0.5 * torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        row = {"process": kind}
        for n in (25, 50, 100, 200, 400):
            g = s.grid(n, s.default_spacing).double()
            row[f"{n}"] = float((ddim.sample(den, ddim.invert(den, x0, g), g) - x0).abs().max())
        row["order"] = math.log2(row["50"] / row["400"]) / 3
        g = s.grid(50, s.default_spacing).double()
        for k in (1, 3, 10):
            row[f"50, refine {k}"] = float((ddim.sample(den, ddim.invert(den, x0, g, refine=k), g) - x0).abs().max())
        rows.append(row)
    print("max |x0 - DDIM(invert(x0))|, data N(0.3, 0.5^2), 256 x 16 values, float64\n")
    print(table(rows, ["process", "25", "50", "100", "200", "400", "order", "50, refine 1", "50, refine 3", "50, refine 10"]))
    (out / "inversion.json").write_text(json.dumps(rows, indent=1))


# --- the held-out digits ----------------------------------------------------------------------------------------
def ssim(a: Tensor, b: Tensor) -> float:
    """Mean SSIM (Wang et al. 2004, scikit-image's structural_similarity, 7x7 window) of images in [-1, 1]."""
    a, b = a.clamp(-1, 1).numpy(), b.clamp(-1, 1).numpy()
    return float(np.mean([structural_similarity(x[0], y[0], data_range=2.0) for x, y in zip(a, b)]))


def scores(x: Tensor, rec: Tensor, digits) -> dict:
    """MSE (per pixel, [-1, 1] range), SSIM and the share of images whose digit-classifier class the reconstruction keeps."""
    with torch.no_grad():
        keep = (digits(rec.clamp(-1, 1)).argmax(1) == digits(x).argmax(1)).float().mean()
    return {"mse": float(((rec.clamp(-1, 1) - x) ** 2).mean()), "ssim": ssim(x, rec), "class kept": float(keep)}


def in_batches(fn, *tensors, batch: int = BATCH) -> Tensor:
    return torch.cat([fn(*(t[i:i + batch] for t in tensors)) for i in range(0, len(tensors[0]), batch)])


def classifiers(diffae: Path, out: Path) -> dict[str, Path]:
    """The linear classifiers on runs/diffae's codes the table moves along: thickness, slant, label."""
    runs = {}
    for target in ("thickness", "slant", "label"):
        run = out / "classifiers" / target
        cfg = apply_overrides(load_config("configs/diffae_thickness.toml"),
                              [f"semantic.run={json.dumps(str(diffae))}", f"semantic.target={target}", "semantic.run_step=0"])
        if not (run / "config.toml").is_file() or load_config(run / "config.toml").semantic.run_step != open_run(diffae).step:
            train(cfg, run, progress=False)
        runs[target] = run
    return runs


def direction(run: Path, row: int) -> tuple[Tensor, Tensor, Tensor]:
    """(w, mean, std) of a classifier run on codes, as `diffuse edit manipulate` reads them (app.requests.Direction)."""
    state = load_checkpoint(run).state
    d = Direction(open_run(run), row, torch.tensor(state["mean"]), torch.tensor(state["std"]))
    return d.vector(), d.mean, d.std


def table_part(args, out: Path) -> None:
    torch.manual_seed(0)
    cfg, den, step = load_diffae(args.diffae)
    data = load_dataset(cfg.data)
    _, test = held_out(len(data))
    x, cond = data.batch(test)
    labels = cond["label"]
    digits = feature_network("digits")
    mnist = open_run(args.mnist).denoiser()
    result = {"diffae": str(args.diffae), "diffae_step": step, "n_held_out": len(x), "torch_threads": torch.get_num_threads()}
    t0 = time.time()

    # (a) reconstruction
    rows, x_T100 = [], None
    with torch.no_grad():
        z = in_batches(den.net.encode, x)
    for n in STEPS:
        x_T = in_batches(lambda xb, zb: invert(den, xb, steps=n, cond={"z_sem": zb}), x, z)
        rec = in_batches(lambda zb, tb: decode(den, zb, tb, steps=n), z, x_T)
        rows.append({"method": "diffusion autoencoder, inferred x_T", "steps": n, **scores(x, rec, digits)})
        if n == 100:
            x_T100 = x_T
        print(rows[-1], f"{time.time() - t0:.0f} s", flush=True)
    for n in (20, 100):
        rec = in_batches(lambda zb, i: decode(den, zb, None, steps=n, seed=int(i[0])), z, torch.arange(len(z)))
        rows.append({"method": "diffusion autoencoder, random x_T (z_sem only)", "steps": n, **scores(x, rec, digits)})
    for n in STEPS:
        x_T = in_batches(lambda xb: invert(mnist, xb, steps=n), x)
        rec = in_batches(lambda tb: generate(mnist, len(tb), tuple(x.shape[1:]), sampler="ddim", eta=0.0, steps=n,
                                             clip=False, start=(tb, 1.0)), x_T)
        rows.append({"method": "DDIM inversion of the demo's unconditional model", "steps": n, **scores(x, rec, digits)})
        print(rows[-1], f"{time.time() - t0:.0f} s", flush=True)
    if args.ae:
        ae_cfg, ae = load_autoencoder(args.ae)
        size = ae_cfg.data.image_size
        resize = lambda v, s: torch.nn.functional.interpolate(v, size=(s, s), mode="bilinear", antialias=True)  # noqa: E731
        with torch.no_grad():
            rec = in_batches(lambda xb: resize(ae.decode(ae.encode(resize(xb, size))), x.shape[-1]), x)
            there = in_batches(lambda xb: resize(resize(xb, size), x.shape[-1]), x)
        rows.append({"method": f"KL autoencoder ({size} px, resized back)", "steps": 1, **scores(x, rec, digits)})
        rows.append({"method": f"(resizing alone, 28 -> {size} -> 28)", "steps": 0, **scores(x, there, digits)})
    result["reconstruction"] = rows
    print("\n" + table(rows, ["method", "steps", "mse", "ssim", "class kept"]), flush=True)

    # (b) linear probes: z_sem against x_T
    codes = semantic_codes(args.diffae, step)
    train_labels = data.batch(codes["index"])[1]["label"]
    probe = LogisticRegression(max_iter=3000)
    probe.fit(normalise(codes["codes"], codes).numpy(), train_labels.numpy())
    zn = normalise(z, codes).numpy()
    probes = {"z_sem, trained on the 4,500 training codes": float(probe.score(zn, labels.numpy())),
              "z_sem, 5-fold CV on the 500": float(cross_val_score(LogisticRegression(max_iter=3000), zn, labels.numpy(), cv=5).mean()),
              "x_T (100 steps), 5-fold CV on the 500": float(cross_val_score(LogisticRegression(max_iter=3000),
                                                                             x_T100.flatten(1).numpy(), labels.numpy(), cv=5).mean()),
              "pixels x_0, 5-fold CV on the 500": float(cross_val_score(LogisticRegression(max_iter=3000),
                                                                        x.flatten(1).numpy(), labels.numpy(), cv=5).mean())}
    result["probes"] = probes
    print("\n" + table([{"features": k, "digit accuracy": v} for k, v in probes.items()], ["features", "digit accuracy"]),
          flush=True)

    # (c) manipulation over the amount, rendered with the same x_T (100 steps), on the first 100 held-out digits
    clf = classifiers(Path(args.diffae).resolve(), out)
    m = 100
    base_attr = measure(x[:m], ["thickness", "slant"], empty="nan")
    with torch.no_grad():
        base_class = digits(x[:m]).argmax(1)
    rows = []
    for target, want in (("thickness", 0.25), ("slant", 0.05)):
        w, mean, std = direction(clf[target], 0)
        for s in (-0.6, -0.3, 0.0, 0.3, 0.6):
            edited = edit_code(z[:m], w, s, mean, std)
            img = in_batches(lambda zb, tb: decode(den, zb, tb, steps=100), edited, x_T100[:m])
            attr = measure(img, [target], empty="nan")[target]
            delta = attr - base_attr[target]
            with torch.no_grad():
                kept = float((digits(img.clamp(-1, 1)).argmax(1) == base_class).float().mean())
            moved = (delta * math.copysign(1, s) > want).float().nanmean() if s else float("nan")
            rows.append({"attribute": target, "amount": s, "mean change": float(delta.nanmean()),
                         "success (moved > threshold)": float(moved), "class kept": kept, "threshold": want})
            print(rows[-1], f"{time.time() - t0:.0f} s", flush=True)
    for s in (0.3, 0.6, 1.0):  # towards the next digit, (y + 1) mod 10, along that class's weight row
        goal = (base_class + 1) % 10
        edited = torch.cat([edit_code(z[i:i + 1], direction(clf["label"], int(goal[i]))[0], s,
                                      *direction(clf["label"], 0)[1:3]) for i in range(m)])
        img = in_batches(lambda zb, tb: decode(den, zb, tb, steps=100), edited, x_T100[:m])
        with torch.no_grad():
            pred = digits(img.clamp(-1, 1)).argmax(1)
        rows.append({"attribute": "class -> next digit", "amount": s, "mean change": float("nan"),
                     "success (moved > threshold)": float((pred == goal).float().mean()),
                     "class kept": float((pred == base_class).float().mean()), "threshold": "classified as the goal"})
        print(rows[-1], f"{time.time() - t0:.0f} s", flush=True)
    result["manipulation"] = rows
    print("\n" + table(rows, ["attribute", "amount", "mean change", "success (moved > threshold)", "class kept", "threshold"]),
          flush=True)

    # (d) interpolation: path length in the digit classifier's feature space, 50 pairs, 10 frames, 100 steps
    rows = []
    for how in ("slerp", "lerp"):
        lengths = []
        for i in range(50):
            a, b = 2 * i, 2 * i + 1
            zs, xs = interpolation(z[a], z[b], x_T100[a], x_T100[b], 10)
            if how == "lerp":
                xs = lerp(x_T100[a], x_T100[b], torch.linspace(0, 1, 10))
            img = decode(den, zs, xs, steps=100)
            with torch.no_grad():
                f = digits.features(img.clamp(-1, 1))
            lengths.append(float((f[1:] - f[:-1]).norm(dim=1).sum() / (f[-1] - f[0]).norm().clamp_min(1e-8)))
        rows.append({"x_T path": how, "path length / endpoint distance (mean)": float(np.mean(lengths)),
                     "median": float(np.median(lengths))})
    result["interpolation"] = rows
    print("\n" + table(rows, ["x_T path", "path length / endpoint distance (mean)", "median"]), flush=True)

    # (e) unconditional samples: latent DDIM + decoder against the demo model, equal U-Net calls (20 DDIM steps)
    real = extract_features(data.batch(torch.arange(len(data)))[0], digits)
    mu, sigma = feature_statistics(real)
    prior_run = open_run(args.prior)
    prior = prior_run.denoiser()
    stats = semantic_codes(args.diffae, prior_run.cfg.semantic.run_step)
    n = args.fid_samples
    pair = torch.cat([sample_pair(prior, den, stats, prior_run.cfg, min(BATCH, n - i), tuple(x.shape[1:]), seed=i,
                                  decoder_kw=dict(sampler="ddim", steps=20, clip=True)) for i in range(0, n, BATCH)])
    demo = torch.cat([generate(mnist, min(BATCH, n - i), tuple(x.shape[1:]), sampler="ddim", steps=20, seed=i)
                      for i in range(0, n, BATCH)])
    z_random = torch.randn(n, z.shape[1], generator=torch.Generator().manual_seed(0))
    noprior = torch.cat([decode(den, denormalise(z_random[i:i + BATCH], stats), None, steps=20, seed=i, clip=True)
                         for i in range(0, n, BATCH)])
    rows = []
    for name, imgs in (("diffusion autoencoder: latent DDIM (200 MLP steps) + decoder (20 DDIM steps)", pair),
                       ("demo's unconditional model (20 DDIM steps)", demo),
                       ("diffusion autoencoder, z_sem ~ N(mean, std) without the latent DDIM", noprior)):
        f = extract_features(imgs.clamp(-1, 1), digits)
        rows.append({"samples": name, "digit FID": frechet_distance(mu, sigma, *feature_statistics(f)), "n": n})
        print(rows[-1], flush=True)
    result["fid"] = rows
    print("\n" + table(rows, ["samples", "digit FID", "n"]))
    result["seconds"] = time.time() - t0
    (out / "table.json").write_text(json.dumps(result, indent=1))


def cost_part(args, out: Path) -> None:
    """Seconds per training step of the recipes (the same U-Net; the autoencoder adds its encoder; its latent DDIM is an
    MLP on cached codes), the median of 60 steps after 10 of warm-up, one after the other in this process."""

    rows = []
    for name, config, extra in (("demo (configs/mnist.toml)", "configs/mnist.toml", []),
                                ("diffusion autoencoder (configs/diffae_digits.toml)", "configs/diffae_digits.toml", []),
                                ("its latent DDIM (configs/diffae_prior.toml)", "configs/diffae_prior.toml",
                                 [f"semantic.run={json.dumps(str(Path(args.diffae).resolve()))}"])):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = apply_overrides(load_config(config), ["train.steps=70", "train.time_limit=0", "train.checkpoint_every=1000",
                                                        *extra])
            trainer = Trainer(cfg, Path(tmp) / "r", progress=False)
            times = []
            for _ in range(70):
                t = time.perf_counter()
                trainer.train_step()
                times.append(time.perf_counter() - t)
            rows.append({"recipe": name, "s/step": float(np.median(times[10:])), "threads": torch.get_num_threads()})
            print(rows[-1], flush=True)
    print("\n" + table(rows, ["recipe", "s/step", "threads"]))
    (out / "cost.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["inversion", "table", "cost"])
    p.add_argument("--diffae", default="runs/diffae")
    p.add_argument("--prior", default="runs/diffae_prior")
    p.add_argument("--mnist", default="runs/mnist")
    p.add_argument("--ae", default=None)
    p.add_argument("--fid-samples", type=int, default=2000)
    p.add_argument("--out", default="bench/out/diffae")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, float32")
    {"inversion": lambda: inversion_part(out), "table": lambda: table_part(args, out),
     "cost": lambda: cost_part(args, out)}[args.part]()


if __name__ == "__main__":
    main()
