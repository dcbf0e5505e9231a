"""Issue 15, latent diffusion against pixel diffusion at the same CPU time (Rombach et al. 2022's claim: the
autoencoder's compression buys quality per FLOP).

digits: the demo's recipe in pixel space (configs/mnist_cond.toml, --budget seconds) against the same recipe on the
latents of a KL autoencoder (configs/ae_mnist.toml for --ae-budget seconds, then configs/ldm_mnist.toml for the rest of
--budget), and of a VQ one (configs/ae_mnist_vq.toml, "latent-vq"): 1,000 samples each with the run's default sampler, guided and unguided, FID in the digit-classifier feature
space against the 5,000 bundled digits as each model's data config renders them (the pixel model's 28x28, the
latent model's 32x32: resampling 32 -> 28 alone moves real digits by ~110 in this feature space, while two disjoint
real sets at one size are 6-9 apart; so the demo's recipe also trains at 32x32, "pixel-32"), accuracy on the intended labels, sampling seconds per image (decoding included).

shapes: text-to-image on the captioned shapes: configs/ae_shapes.toml + configs/ldm_shapes.toml with the byte-level
"chars" text encoder (latent) against
configs/text_shapes.toml (pixels), each given --budget seconds in all (the autoencoder's counted for the latent model);
prompt-following accuracy (captions.prompt_scores, "all" criteria) of --n held-out captions against the guidance
weight; the pixel model also trains for --pixel-factor x --budget with a checkpoint every --every steps, and the
accuracy of each checkpoint at the latent model's best weight gives the pixel model's training cost for the same
accuracy.

    python bench/latent.py digits --budget 480 --ae-budget 150
    python bench/latent.py shapes --budget 600 --ae-budget 150 --n 500
    python bench/latent.py encoders --n 500      (after shapes: its chars model against MiniLM-L6, same steps)

Run it alone: it times training and sampling by wall clock. Prints one JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffuse.data.captions import prompt_scores, shapes_data
from diffuse.config import apply_overrides, load_config
from diffuse.runs import evaluate_autoencoder
from diffuse.stages import space
from diffuse.generate import CHUNK, generate_in_chunks
from diffuse.runs import load_run
from diffuse.kinds.diffusion import sample_config_kwargs
from diffuse.train import train
from diffuse.visualize import to_uint8

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def train_for(config: str, overrides: list[str], run: Path, seconds: float) -> dict:
    """Train `config` for `seconds` into `run` (skipped when it holds a finished run); steps, images/s and seconds."""
    if not (run / "config.toml").is_file():
        train(apply_overrides(load_config(CONFIGS / config), [*overrides, f"train.time_limit={seconds}"]), run, progress=False)
    log = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "time" in r]  # not held-out rows
    rates = [r["images_per_s"] for r in log[1:] if "images_per_s" in r] or [log[-1]["images_per_s"]]
    return {"steps": log[-1]["step"], "img_s": round(sum(rates) / len(rates), 1), "seconds": round(log[-1]["time"], 1)}


def draw(run: Path, n: int, cond: dict | None = None, step: int | None = None, **override) -> tuple[torch.Tensor, float]:
    """n samples of a run with its [sample] defaults (and `override`), decoded; (images in [-1, 1] rounded to 8 bits, s)."""
    cfg, den, num_classes = load_run(run, step=step)
    s = space(cfg)
    labels = torch.arange(n) % num_classes if num_classes and cfg.model.class_conditional else None
    start = time.perf_counter()
    z = generate_in_chunks(den, n, s.shape, chunk=CHUNK, labels=labels, cond=cond, **{**sample_config_kwargs(cfg.sample), **override})
    x = s.decode(z)
    seconds = time.perf_counter() - start
    return torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() / 127.5 - 1, seconds


def digits(args) -> None:
    from diffuse.data import load_dataset
    from diffuse.metrics import fid
    from diffuse.train import digit_classifier

    out = Path(args.out) / "digits"
    classifier = digit_classifier()
    ae = {}
    for kind, config in (("kl", "ae_mnist.toml"), ("vq", "ae_mnist_vq.toml")):  # the first stages' held-out scores
        run = out / ("ae" if kind == "kl" else "ae_vq")
        ae[kind] = train_for(config, [], run, args.ae_budget)
        print(json.dumps({"task": "digits", "model": f"autoencoder-{kind}", "train": ae[kind], **evaluate_autoencoder(run)}),
              flush=True)
    rows = {"pixel": {"train": train_for("mnist_cond.toml", [], out / "pixel", args.budget)},
            "pixel-32": {"train": train_for("mnist_cond.toml", ["data.image_size=32", "model.attention_resolutions=[8]"],
                                            out / "pixel-32", args.budget)},
            **{name: {"autoencoder": ae[kind], "train": train_for("ldm_mnist.toml", [f"latent.autoencoder={out / folder}"],
                                                                  out / name, args.budget - ae[kind]["seconds"])}
               for name, kind, folder in (("latent", "kl", "ae"), ("latent-vq", "vq", "ae_vq"))}}
    labels = torch.arange(args.n) % 10
    for name, row in rows.items():
        run = out / name
        cfg = load_config(run / "config.toml")
        real = torch.stack([x for x, _ in load_dataset(cfg.data)])  # the digits at the model's own resolution
        guidance = cfg.sample.guidance
        for w in (guidance, 0.0):
            x, seconds = draw(run, args.n, guidance=w)
            with torch.no_grad():
                predicted = classifier(x).argmax(1)
            print(json.dumps({"task": "digits", "model": name, **row, "guidance": w, "sample_s_per_image": round(seconds / args.n, 4),
                              "fid": round(fid(real, x, classifier), 2),
                              "accuracy": round(float((predicted == labels).double().mean()), 4),
                              "histogram": torch.bincount(predicted, minlength=10).tolist()}), flush=True)


def accuracy(run: Path, captions: list[str], w: float, step: int | None = None) -> tuple[float, dict, float]:
    """Prompt-following accuracy ("all" criteria) of one sample per caption at guidance w; per-criterion fractions, s."""
    _, den, _ = load_run(run, step=step)
    cond = {"text": den.net.text_encoder.tokenize(captions)}
    x, seconds = draw(run, len(captions), cond=cond, step=step, guidance=w)
    scores = prompt_scores(x, captions)["fraction"]
    return scores["all"], {k: round(v, 3) for k, v in scores.items()}, seconds


def shapes(args) -> None:
    import diffuse.checkpoint as ckpt

    out = Path(args.out) / "shapes"
    _, captions = shapes_data(args.n, 32, seed=12345)  # scenes the training set (seed 0) does not hold
    ae = train_for("ae_shapes.toml", [], out / "ae", args.ae_budget)
    chars = ["model.text_encoder=chars", "model.context_dim=64"]  # the encoder that needs nothing; `encoders`: MiniLM
    latent = train_for("ldm_shapes.toml", [f"latent.autoencoder={out / 'ae'}", *chars], out / "latent",
                       args.budget - ae["seconds"])
    best = (-1.0, 0.0)
    for w in args.weights:
        acc, parts, seconds = accuracy(out / "latent", captions, w)
        best = max(best, (acc, w))
        print(json.dumps({"task": "shapes", "model": "latent", "autoencoder": ae, "train": latent, "guidance": w,
                          "accuracy": round(acc, 4), "criteria": parts, "sample_s_per_image": round(seconds / args.n, 4)}), flush=True)
    pixel = train_for("text_shapes.toml", [f"train.checkpoint_every={args.every}", "train.keep_checkpoints=1000"],
                      out / "pixel", args.pixel_factor * args.budget)
    log = {r["step"]: r["time"] for r in map(json.loads, (out / "pixel" / "log.jsonl").read_text().splitlines()) if "time" in r}
    for step in sorted(ckpt._candidates(out / "pixel" / ckpt.CHECKPOINTS)):
        seconds_at = min((t for s, t in log.items() if s >= step), default=max(log.values()))  # the last checkpoint: the end
        acc, parts, seconds = accuracy(out / "pixel", captions, best[1], step=step)
        print(json.dumps({"task": "shapes", "model": "pixel", "train": pixel, "step": step, "train_seconds": seconds_at,
                          "guidance": best[1], "accuracy": round(acc, 4), "criteria": parts,
                          "sample_s_per_image": round(seconds / args.n, 4)}), flush=True)


def encoders(args) -> None:
    """The shapes latent model's text encoder: "chars" (trained with the U-Net; the run of `shapes`) against the frozen
    MiniLM-L6 of the [text] extra (model.context_dim = 384), on the same autoencoder for the same number of steps as
    the chars run took in its budget, so the comparison does not hang on the machine's speed that hour."""
    import diffuse.checkpoint as ckpt

    out = Path(args.out) / "shapes"
    _, captions = shapes_data(args.n, 32, seed=12345)
    steps = ckpt.latest_step(out / "latent")
    if steps is None:
        raise SystemExit(f"no chars run in {out / 'latent'}: run `python bench/latent.py shapes` first")
    run = out / "latent-minilm"
    if not (run / "config.toml").is_file():
        overrides = [f"latent.autoencoder={out / 'ae'}", "model.text_encoder=minilm", "model.context_dim=384",
                     f"train.steps={steps}", "train.time_limit=0"]
        train(apply_overrides(load_config(CONFIGS / "ldm_shapes.toml"), overrides), run, progress=False)
    for w in args.weights:
        acc, parts, seconds = accuracy(run, captions, w)
        print(json.dumps({"task": "encoders", "model": "latent-minilm", "steps": steps, "guidance": w, "accuracy": round(acc, 4),
                          "criteria": parts, "sample_s_per_image": round(seconds / args.n, 4)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("task", choices=["digits", "shapes", "encoders"])
    p.add_argument("--budget", type=float, default=480, help="seconds of CPU training per model, autoencoder included")
    p.add_argument("--ae-budget", type=float, default=150)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0, 6.0])
    p.add_argument("--pixel-factor", type=float, default=2.0)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "latent"))
    args = p.parse_args()
    {"digits": digits, "shapes": shapes, "encoders": encoders}[args.task](args)


if __name__ == "__main__":
    main()
