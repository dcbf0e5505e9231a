"""Issue 19, "half the demo's FID in the same 10 minutes, and 1,000 samples several times faster": today's demo recipe
(configs/mnist_cond_vp.toml, a frozen copy of configs/mnist_cond.toml before the issue) against the demo's recipe now
(configs/mnist_cond.toml, with train.mixed_precision and sample.mixed_precision "auto": bf16 autocast on CPUs with
native bf16), and the new recipe in fp32, trained one after the other for --budget seconds each in one run.

For each recipe, as `diffuse demo` and `diffuse sample RUN --n 1000` do it: train; rebuild the post-hoc EMA the demo
samples with (today: sigma_rel 0.03, the demo's then; now: demo.DEMO_SIGMA_REL); draw --n samples with the run's
default sampler, labels 0..9 in turn, at the recipe's guidance and without guidance (and, for the new recipe, at each
weight of --guidance-grid), in the chunks the CLI uses (today: all at once; now: sample.CHUNK). Prints training steps and images/s, the forward rate inside a training step (3 x images/s: the
backward pass costs about two forwards), sampling seconds, network images x steps per second in sampling, FID against
the 5,000 bundled digits in the digit-classifier feature space (samples rounded to 8 bits), the classifier's accuracy
on the intended labels and its class histogram. A "real" row scores --n real digits (the same share of each class
as the samples have) the same way: against the 5,000 (a subset of the reference, as a model that copied its training
digits would score) and against the other digits (as new digits of the same distribution would score, roughly: the
reference is then smaller). Then --speed-rounds rounds of --speed-steps training steps of each recipe, interleaved
(today, now, now-fp32, today, ...), for a training-speed ratio that the machine's drift over half an hour does not
bias.

    python bench/cpu_budget.py --budget 480 --n 1000 --out bench/out/cpu_budget

Run it alone: it times training and sampling by wall clock. Prints one JSON line per row.

One run of each recipe is one draw from a wide spread: today's recipe has scored guided FID 33 to 81 over seven runs
of the same code. `--seeds 0,1,2` trains and samples each recipe once per seed (train.seed and the sampling seed)
and ends with a summary per recipe and guidance weight: the median, min and max FID and accuracy over the seeds, the
ratio of the new recipe's median FID to today's, and in how many of the seeds x seeds pairings (each new run against
each of today's) the FID target (at most --target x today's) and the accuracy target (no lower) hold. `--steps N`
trains each run for exactly N steps instead of --budget seconds: the recipes train at the same images/s (the
interleaved rounds, 1.0x in fp32), so N = the steps the budget gives gives the same comparison, reproducible and
independent of the machine's load (the sampling seconds are then only indicative).

    python bench/cpu_budget.py --seeds 0,1,2 --steps 1400 --only today now --speed-rounds 0

`--variant NAME=KEY=VALUE,KEY=VALUE` adds a recipe: the new one with those config overrides, trained, sampled and
summarized like the others (e.g. --variant now-lr2e-3=train.lr=0.002 --only now-lr2e-3, against runs of today and
now already in --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from diffuse.config import ConfigError, apply_overrides, load_config
from diffuse.data import load_dataset
from diffuse.app.demo import DEMO_SIGMA_REL
from diffuse.metrics import fid
from diffuse.train import digit_classifier
from diffuse.runs import write_run
from diffuse.generate import CHUNK, generate_in_chunks
from diffuse.runs import load_run
from diffuse.kinds.diffusion import sample_config_kwargs
from diffuse.samplers import CountCalls
from diffuse.train import train
from diffuse.visualize import to_uint8

ROOT = Path(__file__).resolve().parents[1]
# (config, overrides, sampling chunk: None = all at once). Today's recipe trained in fp32 ("auto" meant fp32 on CPUs);
# now "auto" is bf16 autocast on CPUs with native bf16 (AMX, AVX512-BF16), and "now-fp32" shows what that adds.
# Today's recipe also sampled in fp32 (sample.mixed_precision did not exist). (config, overrides, sampling chunk,
# post-hoc EMA length)
FP32 = ["train.mixed_precision=no", "sample.mixed_precision=no"]
RECIPES = {"today": (ROOT / "configs" / "mnist_cond_vp.toml", FP32, None, 0.03),
           "now": (ROOT / "configs" / "mnist_cond.toml", [], CHUNK, DEMO_SIGMA_REL),
           "now-fp32": (ROOT / "configs" / "mnist_cond.toml", FP32, CHUNK, DEMO_SIGMA_REL)}


def train_recipe(config: Path, overrides: list[str], run: Path, budget: float, seed: int = 0, steps: int | None = None) -> dict:
    """Train a recipe with train.seed = `seed` for `budget` seconds, or for exactly `steps` steps when given (skipped
    when `run` holds a finished run); its steps and images/s."""
    limit = [f"train.steps={steps}", "train.time_limit=0"] if steps else [f"train.time_limit={budget}"]
    if not (run / "config.toml").is_file():
        train(apply_overrides(load_config(config), [*overrides, *limit, f"train.seed={seed}"]), run, progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in log[1:] if "images_per_s" in r]
    img_s = sum(rates) / max(len(rates), 1)
    return {"train_steps": log[-1]["step"], "train_img_s": round(img_s, 1), "train_forward_img_s": round(3 * img_s, 1)}


def real_row(real: torch.Tensor, labels: torch.Tensor, n: int, classifier) -> dict:
    """n real digits, n / 10 of each class (as the samples are drawn), scored as samples are: FID against all the
    real digits (they are among them) and against the others, the classifier's accuracy and histogram."""
    g = torch.Generator().manual_seed(0)
    picked = torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=g)[:n // 10]]
                        for c in range(10)])
    rest = torch.ones(len(real), dtype=torch.bool)
    rest[picked] = False
    x = real[picked]
    return {"recipe": "real digits", "n": len(x), "fid": round(fid(real, x, classifier), 2),
            "fid_against_the_others": round(fid(real[rest], x, classifier), 2), **class_scores(classifier, x, labels[picked])}


def class_scores(classifier, x: torch.Tensor, labels: torch.Tensor) -> dict:
    """The digit classifier's accuracy on images x (N, 1, 28, 28) in [-1, 1] against their labels (N,), and the
    histogram of the classes it reads (10 counts)."""
    with torch.no_grad():
        predicted = classifier(x).argmax(1)
    return {"accuracy": round(float((predicted == labels).double().mean()), 4),
            "histogram": torch.bincount(predicted, minlength=10).tolist()}


def draw(den, cfg, w: float, n: int, chunk: int | None, seed: int, real: torch.Tensor, classifier) -> dict:
    """n samples of a run at guidance w with its default sampler (labels 0..9 in turn), as `diffuse sample` draws
    them, timed and scored: FID against `real`, the classifier's accuracy and histogram."""
    d, s = cfg.data, cfg.sample
    labels = torch.arange(n) % 10
    counted = CountCalls(den)
    start = time.perf_counter()
    x = generate_in_chunks(counted, n, (d.channels, d.image_size, d.image_size), chunk=chunk, seed=seed, labels=labels,
                           **{**sample_config_kwargs(s), "guidance": w})
    seconds = time.perf_counter() - start
    x = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return {"sampler": s.sampler, "sample_steps": s.steps, "sample_precision": s.mixed_precision, "guidance": w, "n": n,
            "interval": list(s.guidance_interval) if w else [], "chunk": chunk or n, "sample_s": round(seconds, 1),
            "net_images_per_call": counted.images / max(counted.calls, 1),
            "sample_forward_img_s": round(counted.images / seconds, 1), "fid": round(fid(real, x, classifier), 2),
            **class_scores(classifier, x, labels)}


def summarize(rows: list[dict], target: float) -> None:
    """One JSON line per recipe and guidance weight over the seeds (median, min and max FID and accuracy), and for each
    weight of the new recipe against today's default draw (guided) or today's unguided draw (w = 0): the ratio of the
    median FIDs and the share of the (new seed, today seed) pairings in which FID <= target x today's and the accuracy
    is no lower."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["recipe"], r["guidance"]), []).append(r)
    for (name, w), rs in groups.items():
        fids, accs = [r["fid"] for r in rs], [r["accuracy"] for r in rs]
        print(json.dumps({"summary": name, "guidance": w, "seeds": [r["seed"] for r in rs],
                          "fid_median": statistics.median(fids), "fid_range": [min(fids), max(fids)],
                          "accuracy_median": statistics.median(accs), "accuracy_range": [min(accs), max(accs)]}), flush=True)
    today = {w: rs for (name, w), rs in groups.items() if name == "today"}
    if not today:
        return
    guided_today = max(today)  # today's default weight (its only guided draw)
    for (name, w), rs in groups.items():
        if name == "today":
            continue
        base = today[guided_today if w else 0.0]
        pairs = [(r, b) for r in rs for b in base]
        print(json.dumps({"verdict": name, "guidance": w, "against_today_guidance": guided_today if w else 0.0,
                          "fid_ratio_of_medians": round(statistics.median(r["fid"] for r in rs)
                                                        / statistics.median(b["fid"] for b in base), 3),
                          "pairs": len(pairs),
                          "fid_target_met": sum(r["fid"] <= target * b["fid"] for r, b in pairs),
                          "accuracy_target_met": sum(r["accuracy"] >= b["accuracy"] for r, b in pairs),
                          "both_met": sum(r["fid"] <= target * b["fid"] and r["accuracy"] >= b["accuracy"] for r, b in pairs)}),
              flush=True)


def interleaved_speed(names: list[str], rounds: int, steps: int) -> None:
    """Training images/s of each recipe in `rounds` interleaved rounds of `steps` steps (after 10 warm-up steps), one
    JSON line per round and one with the medians and their ratios to today's."""
    import tempfile

    from diffuse.train import Trainer

    trainers = {}
    for name in names:
        config, overrides = RECIPES[name][:2]
        trainers[name] = Trainer(apply_overrides(load_config(config), overrides), tempfile.mkdtemp(), progress=False)
        for _ in range(10):
            trainers[name].train_step()
    rates = {name: [] for name in names}
    for k in range(rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            rates[name].append(steps * trainer.cfg.train.batch_size / (time.perf_counter() - start))
        print(json.dumps({"speed_round": k, **{name: round(r[-1], 1) for name, r in rates.items()}}), flush=True)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print(json.dumps({"speed_median_img_s": {n: round(m, 1) for n, m in medians.items()},
                      "ratio_to_today": {n: round(m / medians["today"], 3) for n, m in medians.items() if "today" in medians}}),
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=480)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "cpu_budget"))
    p.add_argument("--only", nargs="+", help=f"these recipes (default: all, in this order): {', '.join(RECIPES)} or a --variant")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE,...",
                   help="another recipe: the new one with these config overrides (repeatable)")
    p.add_argument("--guidance-grid", default="2,2.5", help="more guidance weights for the new recipe (comma-separated)")
    p.add_argument("--speed-rounds", type=int, default=5, help="interleaved training-speed rounds after the runs (0: none)")
    p.add_argument("--speed-steps", type=int, default=60, help="training steps per recipe and round")
    p.add_argument("--seeds", default=None, help="train and sample each recipe once per seed (comma-separated integers; "
                   "default: seed 0, in folders named by the recipe alone; with --seeds, RECIPE_seedK)")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps instead of --budget seconds")
    p.add_argument("--target", type=float, default=0.5, help="the FID target: at most this x today's (issue 19: 0.5)")
    args = p.parse_args()
    for spec in args.variant:
        name, _, sets = spec.partition("=")
        if not name or not sets or name in RECIPES:
            p.error(f"--variant takes NAME=KEY=VALUE[,KEY=VALUE...] with a new name, got {spec!r}")
        config, overrides, chunk, sigma_rel = RECIPES["now"]
        try:  # a bad key or value fails here, before any training
            apply_overrides(load_config(config), sets.split(","))
        except ConfigError as e:
            p.error(f"--variant {spec!r}: {e}")
        RECIPES[name] = (config, [*overrides, *sets.split(",")], chunk, sigma_rel)
    unknown = sorted(set(args.only or ()) - set(RECIPES))
    if unknown:
        p.error(f"--only: unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    try:
        seeds = [int(s) for s in (args.seeds or "0").split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers such as 0,1,2, got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        p.error(f"--seeds needs at least one seed and no repeats, got {args.seeds!r}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    classifier = digit_classifier()
    data = load_dataset(load_config(RECIPES["now"][0]).data)
    real = torch.stack([x for x, _ in data])
    print(json.dumps(real_row(real, torch.stack([c["label"] for _, c in data]), args.n, classifier)), flush=True)
    rows = []
    for seed, (name, (config, overrides, chunk, sigma_rel)) in ((s, r) for s in seeds for r in RECIPES.items()):
        if args.only and name not in args.only:
            continue
        run = Path(args.out) / (name if args.seeds is None else f"{name}_seed{seed}")
        row = {"recipe": name, "seed": seed, **train_recipe(config, overrides, run, args.budget, seed, args.steps)}
        cfg = load_config(run / "config.toml")
        weights = write_run(run, sigma_rel, run / f"posthoc_ema_{sigma_rel}") if cfg.train.posthoc_ema else run
        cfg, den, num_classes = load_run(weights)
        if num_classes != 10:
            raise SystemExit(f"{run} is a model of {num_classes} classes; this bench scores the 10 digits")
        s = cfg.sample
        grid = [float(w) for w in args.guidance_grid.split(",") if w] if name != "today" else []
        drawn = run / "draws.jsonl"  # each finished draw, so that a rerun with more recipes or weights redoes none
        done = {}
        if drawn.is_file():
            done = {(r["guidance"], r["n"]): r for r in map(json.loads, drawn.read_text().splitlines())}
        for w in (s.guidance, 0.0, *grid):
            if (w, args.n) not in done:
                done[(w, args.n)] = draw(den, cfg, w, args.n, chunk, seed, real, classifier)
                with drawn.open("a") as f:
                    f.write(json.dumps(done[(w, args.n)]) + "\n")
            rows.append({**row, **done[(w, args.n)]})
            print(json.dumps({**row, "sigma_rel": sigma_rel, **done[(w, args.n)]}), flush=True)
    summarize(rows, args.target)
    if args.speed_rounds > 0:
        interleaved_speed([n for n in RECIPES if not args.only or n in args.only], args.speed_rounds, args.speed_steps)


if __name__ == "__main__":
    main()
