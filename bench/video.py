"""Video diffusion on moving digits, measured (issue 35, "How it is checked"): trains the runs it needs from
configs/video_digits.toml for the same wall-clock budget each (or reuses them with --reuse), then on held-out videos
(the test split: digit instances never trained on):

    1. prediction 4 -> 4 (frames 0-3 given, 4-7 generated) and interpolation (0, 1, 6, 7 given, 2-5 generated) with the
       masked-conditioning model ("masked"), and with a model of the same config trained without given frames
       ("joint-uncond": video.max_observed = 0) by reconstruction guidance (Ho et al. 2022 eq. 7, weight --weight) and
       by replacement: PSNR and SSIM over the generated frames (MCVD's protocol: the mean over --k samples and the best
       of them per video), the digit kept (the classifier's label constant over all 8 frames; and the true label),
       the trajectory error (pixels, centre of mass against MovingDigits' physics) and the acceleration between bounces,
       FD-digits-video (not FVD); beside them the trivial "nearest given frame, copied" baseline;
    2. joint image-video training (the config: a quarter of the examples independent frames) against video-only
       (video.p_images = 0) at equal training time: per-frame FID (digit-classifier features, frames of unconditional
       videos against test frames), the video metrics of unconditional videos, and the prediction metrics;
    3. 64-frame videos from the 8-frame masked model, 4 frames given: FDM's autoregressive against hierarchy-2
       (identity, trajectory error, acceleration);
    4. sampling speed (frames/s) and peak memory (the peak resident set, ru_maxrss, of a fresh process that loads the
       model and samples one video of F frames, beside its resident set before sampling) against the frame count.

Metrics: diffuse/video_metrics.py. Each part prints a Markdown table; all go into --out/results.json (rewritten after
every part) and, unless --no-results or --smoke, a dated section of bench/RESULTS.md.

    python bench/video.py                      # ~25 min of training (3 x 480 s) then ~1-2 h of sampling, 2-core CPU
    python bench/video.py --reuse              # the runs in --runs already trained: measure only
    python bench/video.py --smoke              # the whole pipeline with tiny settings, ~1-2 min; writes no RESULTS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from diffuse.app.requests import video_limits
from diffuse.config import apply_overrides, load_config
from diffuse.data.video import MovingDigits, bundled_digits
from diffuse.generate import chunk_seed
from diffuse.metrics import fid
from diffuse.nets.unet import fold_frames
from diffuse.runs import open_run
from diffuse.tasks.video import SCHEMES, sample_long, sample_masked, sample_reconstruction, sample_replacement
from diffuse.train import digit_classifier, train
from diffuse.video_metrics import (acceleration, best_of_k, fd_digits_video, frame_labels, identity_kept, over_generated,
                                   psnr, ssim, trajectory_error, true_centres)
from results import cpu_description, publish, say, table, trained_steps  # bench/results.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "video_digits.toml"
TITLE = "Video diffusion on moving digits (bench/video.py, issue 35"
RUNS = {  # name: overrides of configs/video_digits.toml
    "masked": [],
    "video-only": ["video.p_images=0"],
    "joint-uncond": ["video.max_observed=0", "model.video_observed=false"],
}
TASKS = {"prediction 4 -> 4": [True] * 4 + [False] * 4, "interpolation 0,1 + 6,7 -> 2-5": [True, True] + [False] * 4 + [True, True]}








# --- the runs ----------------------------------------------------------------------------------------------------


def train_runs(args) -> dict[str, dict]:
    """Each run of RUNS trained for the same budget (train.time_limit = --budget; --smoke: 2 steps) into --runs/NAME,
    or reused (--reuse) when it holds a checkpoint. Returns {name: {"path", "steps", "train_s"}}. SystemExit for a run
    folder that exists without --reuse (training into it would resume it for another budget)."""
    out = {}
    for name, overrides in RUNS.items():
        path = args.runs / name
        if path.exists() and not args.reuse:
            raise SystemExit(f"{path} exists: pass --reuse to measure the runs there, or remove it (or pass another --runs) "
                             "to train them anew; training into it would resume it for another --budget")
        if args.smoke:
            limit = ["train.steps=2", "train.time_limit=0", "train.warmup_steps=1"]
        elif args.train_steps:  # equal steps = equal compute: every run's batch has the same shape (images are frames)
            limit = [f"train.steps={args.train_steps}", "train.time_limit=0"]
        else:
            limit = [f"train.time_limit={args.budget}"]
        cfg = apply_overrides(load_config(CONFIG), overrides + limit + ["train.checkpoint_every=100"])
        t0 = time.perf_counter()
        done = args.reuse and trained_steps(path) >= (args.train_steps or 1)
        if not done:  # a new run, or (--reuse --train-steps) one stopped short of its steps: resumed from its checkpoint
            train(cfg, path, progress=False)
        run = open_run(path)
        out[name] = {"path": str(path), "steps": run.step, "train_s": time.perf_counter() - t0, "overrides": overrides}
        say(f"run {name}: {run.step} steps ({out[name]['train_s']:.0f} s here)")
    return out


def test_videos(cfg, n: int, frames: int | None = None):
    """The first n videos of the test split (digit instances never trained on), their trajectories and the digits'
    glyphs (for the true centres)."""
    data = MovingDigits(cfg.data if frames is None else dataclasses.replace(cfg.data, frames=frames), split="test")
    x, _ = data.batch(torch.arange(n))
    return x, [data.trajectory(i) for i in range(n)], bundled_digits(data.digit_size)[0], data.digit_size


# --- part 1: prediction and interpolation ------------------------------------------------------------------------
def nearest_given(video: torch.Tensor, observed: list[bool]) -> torch.Tensor:
    """The trivial baseline: every generated frame a copy of the nearest given frame (the earlier one on a tie)."""
    given = [i for i, o in enumerate(observed) if o]
    pick = [min(given, key=lambda g: (abs(g - f), g)) for f in range(len(observed))]
    return video[:, :, pick]


def sample_k(method: str, den, videos, observed, args, seed: int) -> torch.Tensor:
    """K = args.k samples of every video by one method, in batches of args.batch: (K, B, C, F, H, W)."""
    kw = dict(sampler="ddim", steps=args.steps, eta=0.0, clip=True)
    fn = {"masked": lambda v, s: sample_masked(den, v, observed, seed=s, **kw),
          "replacement": lambda v, s: sample_replacement(den, v, observed, seed=s, **kw),
          "reconstruction guidance": lambda v, s: sample_reconstruction(den, v, observed, args.weight, seed=s, **kw)}[method]
    return torch.stack([torch.cat([fn(videos[lo:lo + args.batch], chunk_seed(seed + j, lo)) for lo in range(0, len(videos), args.batch)])
                        for j in range(args.k)])


def score(samples: torch.Tensor, real: torch.Tensor, trajectories, glyphs, side: int, observed, classifier) -> dict:
    """The video metrics of K samples (K, B, C, F, H, W) of the true videos real (B, C, F, H, W)."""
    generated = ~torch.tensor(observed)
    ps = torch.stack([psnr(s, real, generated) for s in samples])  # MCVD's: the MSE over the generated frames, then the log
    ss = torch.stack([over_generated(ssim(s, real), generated) for s in samples])
    labels = torch.cat([frame_labels(s, classifier, crop=side) for s in samples])
    true = torch.tensor([t.labels[0] for t in trajectories]).repeat(len(samples))
    centres = true_centres(trajectories, glyphs)
    err = torch.stack([trajectory_error(s, centres, generated) for s in samples])
    acc = torch.stack([acceleration(s, trajectories, generated) for s in samples])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few videos: FD's covariances are singular (said in the table)
        fd = fd_digits_video(real, samples[0], classifier)
    p, s = best_of_k(ps), best_of_k(ss)
    kept = identity_kept(labels, true)
    return {"PSNR mean": p["mean"], "PSNR best": p["best"], "SSIM mean": s["mean"], "SSIM best": s["best"],
            "label constant": kept["constant"], "true label": kept["true"], "trajectory px": float(err.nanmean()),
            "empty frame": float(torch.isnan(err).double().mean()),
            "acceleration px/f^2": float(acc.nanmean()), "FD-digits-video": fd}


def tasks_part(args, runs, classifier, result) -> None:
    cfg = load_config(CONFIG)
    real, trs, glyphs, side = test_videos(cfg, args.videos)
    masked, uncond = open_run(runs["masked"]["path"]).denoiser(), open_run(runs["joint-uncond"]["path"]).denoiser()
    rows = []
    for task, observed in TASKS.items():
        base = nearest_given(real, observed)[None]
        rows.append({"task": task, "method": "nearest given frame, copied", **score(base, real, trs, glyphs, side, observed, classifier)})
        for method, den in (("masked", masked), ("reconstruction guidance", uncond), ("replacement", uncond)):
            if method not in args.methods:
                continue
            t0 = time.perf_counter()
            samples = sample_k(method, den, real, observed, args, seed=0)
            rows.append({"task": task, "method": method, "sample s": time.perf_counter() - t0,
                         **score(samples, real, trs, glyphs, side, observed, classifier)})
            say(json.dumps(rows[-1]))
    result["tasks"] = rows


# --- part 2: joint image-video against video-only ------------------------------------------------------------------
def joint_part(args, runs, classifier, result) -> None:
    cfg = load_config(CONFIG)
    real, trs, glyphs, side = test_videos(cfg, args.uncond)
    frames = real.shape[2]
    rows = []
    for name in ("masked", "video-only"):
        run = open_run(runs[name]["path"])
        den = run.denoiser()
        t0 = time.perf_counter()
        x = torch.cat([sample_masked(den, real[lo:lo + args.batch], [False] * frames, seed=chunk_seed(7, lo), sampler="ddim",
                                     steps=args.steps, eta=0.0, clip=True) for lo in range(0, len(real), args.batch)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            row = {"run": name, "p_images": run.cfg.video.p_images, "train steps": runs[name]["steps"],
                   "per-frame FID": fid(fold_frames(real), fold_frames(x), classifier),
                   "FD-digits-video": fd_digits_video(real, x, classifier),
                   "label constant (unconditional)": identity_kept(frame_labels(x, classifier, crop=side))["constant"]}
        pred = TASKS["prediction 4 -> 4"]
        few = args.videos
        samples = sample_k("masked", den, real[:few], pred, args, seed=0)
        s = score(samples, real[:few], trs[:few], glyphs, side, pred, classifier)
        row.update({f"prediction {k}": v for k, v in s.items() if k in ("PSNR mean", "SSIM mean", "label constant", "trajectory px")})
        row["sample s"] = time.perf_counter() - t0
        rows.append(row)
        say(json.dumps(row))
    result["joint"] = rows


# --- part 3: long videos -------------------------------------------------------------------------------------------
def long_part(args, runs, classifier, result) -> None:
    cfg = load_config(CONFIG)
    F, given = cfg.data.frames, 4
    real, trs, glyphs, side = test_videos(cfg, args.long_videos, frames=args.long_frames)
    run = open_run(runs["masked"]["path"])
    den = run.denoiser()
    cap, span = video_limits(run)  # each stage conditions on at most the given frames training gave (the nearest)
    generated = torch.arange(args.long_frames) >= given
    centres = true_centres(trs, glyphs)
    true = torch.tensor([t.labels[0] for t in trs])
    rows = []
    for name, scheme in SCHEMES.items():
        stages = list(scheme(F, args.long_frames, given, max_observed=cap))
        t0 = time.perf_counter()
        x = torch.cat([sample_long(den, stages, real[lo:lo + args.batch], given, frames=F, max_observed=cap, span=span,
                                   seed=lo, sampler="ddim", steps=args.steps, eta=0.0, clip=True)
                       for lo in range(0, len(real), args.batch)])
        kept = identity_kept(frame_labels(x, classifier, crop=side), true)
        err = trajectory_error(x, centres, generated)
        last = trajectory_error(x, centres, torch.arange(args.long_frames) >= args.long_frames - F)
        rows.append({"scheme": name, "stages": len(stages), "label constant": kept["constant"], "true label": kept["true"],
                     "trajectory px": float(err.nanmean()), "empty frame": float(torch.isnan(err).double().mean()),
                     f"trajectory px, last {F}": float(last.nanmean()),
                     "acceleration px/f^2": float(acceleration(x, trs, generated).nanmean()),
                     "sample s": time.perf_counter() - t0})
        say(json.dumps(rows[-1]))
    result["long"] = rows


# --- part 4: speed and memory against the frame count ----------------------------------------------------------------
def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident set now (field VmRSS) or its high-water mark (VmHWM) from Linux /proc/self/status, MiB;
    NaN where there is no /proc."""
    try:
        return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(field + ":")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux: "5" into /proc/self/clear_refs); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(run: str, frames: int, steps: int) -> None:
    """In a fresh process: load the run, sample one video (the run's size) of `frames` frames (none given) with DDIM `steps` steps,
    print {"frames", "s", "rss_before_mib", "maxrss_mib", "sampling_peak_mib"}: the resident set before sampling, the
    process's peak (loading included) and the peak during sampling alone (the high-water mark reset just before it)."""
    opened = open_run(run)
    den, d = opened.denoiser(), opened.cfg.data
    video = torch.zeros(1, d.channels, frames, d.image_size, d.image_size)
    before = rss_mib()
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    sample_masked(den, video, [False] * frames, sampler="ddim", steps=steps, eta=0.0, clip=True)
    print(json.dumps({"frames": frames, "s": time.perf_counter() - t0, "rss_before_mib": before,
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "sampling_peak_mib": rss_mib("VmHWM") if reset else float("nan")}))


def cost_part(args, runs, result) -> None:
    rows = []
    for frames in args.frame_counts:
        out = subprocess.run([sys.executable, __file__, "--memory-child", runs["masked"]["path"], str(frames), str(args.speed_steps)],
                             capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"frames": frames, "DDIM steps": args.speed_steps, "seconds": r["s"], "frames/s": frames / r["s"],
                     "RSS before sampling MiB": r["rss_before_mib"], "peak RSS MiB": r["maxrss_mib"],
                     "sampling peak RSS MiB": r["sampling_peak_mib"],
                     "sampling's peak above MiB": r["sampling_peak_mib"] - r["rss_before_mib"]})
        say(json.dumps(rows[-1]))
    result["cost"] = rows


# --- RESULTS.md ------------------------------------------------------------------------------------------------------
def results_section(args, result: dict) -> str:
    date = datetime.date.today().isoformat()
    r = result
    train_flag = f"--train-steps {args.train_steps}" if args.train_steps else f"--budget {args.budget:g}"
    trained = (f"{args.train_steps} steps (equal compute: every run's batches have the same shape)" if args.train_steps
               else f"{args.budget:g} s (train.time_limit)")
    lines = [f"## {TITLE}{', ' + args.title if args.title else ''}, {date})", "",
             f"Device: {cpu_description()}; torch {torch.__version__} ({torch.get_num_threads()} threads), float32. "
             f"`python bench/video.py {train_flag} --videos {args.videos} --k {args.k} --steps {args.steps}"
             f"{' --reuse' if args.reuse else ''}`. Runs from `configs/video_digits.toml`, "
             + ("reused from earlier: " if args.reuse else f"each trained {trained}, one after the other: ")
             + ", ".join(f"{n} ({v['steps']} steps; {' '.join(v['overrides']) or 'as is'})" for n, v in r["runs"].items()) + ". "
             f"Sampling: DDIM {args.steps} steps, eta 0, clipped. Held-out videos: the test split (digit instances never "
             "trained on). Metrics (diffuse/video_metrics.py) over the generated frames only; PSNR of a video from its "
             "squared error over them (MCVD's), SSIM with a Gaussian window (sigma 1.5, MCVD's); both the mean over "
             f"{args.k} samples and best of them per video (MCVD); label: the digit classifier on each frame's "
             "digit-sized crop around its centre of mass, the share of videos whose label is the same in all frames "
             "(and is the true one); trajectory: mean distance in pixels between the centre of mass and the true one, "
             "over the videos without an empty generated frame (empty frame: the share of videos with one); "
             "acceleration: mean |second difference| of the centre where the truth moves at constant velocity; "
             f"FD-digits-video: Frechet distance of per-video digit-classifier features (mean, std, mean |difference| over "
             f"frames; 384 dimensions, so from {args.videos} videos strongly biased: compare rows only), not FVD.", ""]
    cols = ["task", "method", "PSNR mean", "PSNR best", "SSIM mean", "SSIM best", "label constant", "true label",
            "trajectory px", "empty frame", "acceleration px/f^2", "FD-digits-video", "sample s"]
    if "tasks" in r:
        lines += ["### Prediction and interpolation: masked model, reconstruction guidance "
                  f"(w_r = {args.weight:g}), replacement", "", table(r["tasks"], cols), ""]
    if "joint" in r:
        lines += [f"### Joint image-video against video-only training, equal {'compute' if args.train_steps else 'time'}", "",
                  f"Per-frame FID: frames of {args.uncond} unconditional videos against the frames of as many test videos, "
                  "digit-classifier features of whole 32x32 frames. Prediction columns: 4 -> 4, mean over samples.", "",
                  table(r["joint"], ["run", "p_images", "train steps", "per-frame FID", "FD-digits-video",
                                 "label constant (unconditional)", "prediction PSNR mean", "prediction SSIM mean",
                                 "prediction label constant", "prediction trajectory px", "sample s"]), ""]
    F = load_config(CONFIG).data.frames
    if "long" in r:
        lines += [f"### {args.long_frames}-frame videos from the {F}-frame masked model, 4 frames given, "
                  f"{args.long_videos} videos", "",
                  table(r["long"], ["scheme", "stages", "label constant", "true label", "trajectory px", "empty frame",
                                f"trajectory px, last {F}", "acceleration px/f^2", "sample s"]), ""]
    if "cost" in r:
        lines += ["### Sampling cost against the frame count (one video, none given, a fresh process each)", "",
                  "Peak RSS: the process's high-water mark (ru_maxrss), loading included. Sampling peak: the high-water mark "
                  "reset (/proc/self/clear_refs) just before sampling and read after it; the last column is that peak "
                  "above the resident set before sampling: the memory sampling F frames needs.", "",
                  table(r["cost"], ["frames", "DDIM steps", "seconds", "frames/s", "RSS before sampling MiB", "peak RSS MiB",
                                    "sampling peak RSS MiB", "sampling's peak above MiB"]), ""]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--memory-child":
        return memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=480, help="training seconds per run (default 480, the config's)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="train every run this many steps instead of --budget seconds (equal compute, immune to load)")
    p.add_argument("--parts", nargs="+", default=["tasks", "joint", "long", "cost"],
                   choices=["tasks", "joint", "long", "cost"], help="which parts to measure (default all)")
    p.add_argument("--methods", nargs="+", default=["masked", "reconstruction guidance", "replacement"],
                   choices=["masked", "reconstruction guidance", "replacement"], help="the tasks part's methods")
    p.add_argument("--title", default="", help="words added to the RESULTS.md heading (a second section the same day)")
    p.add_argument("--reuse", action="store_true", help="reuse the runs in --runs that exist instead of training them")
    p.add_argument("--runs", type=Path, default=None, help="the runs' folder (default OUT/runs; --smoke: a temporary one)")
    p.add_argument("--out", type=Path, default=None, help="results.json goes here (default bench/out/video)")
    p.add_argument("--videos", type=int, default=32, help="held-out videos per task (default 32)")
    p.add_argument("--k", type=int, default=4, help="samples per video, MCVD's best-of-k (default 4)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of every sample (default 25)")
    p.add_argument("--weight", type=float, default=2.0, help="reconstruction guidance weight w_r (default 2)")
    p.add_argument("--uncond", type=int, default=64, help="unconditional videos per run for the per-frame FID (default 64)")
    p.add_argument("--long-frames", type=int, default=64, help="long videos' frames (default 64)")
    p.add_argument("--long-videos", type=int, default=8, help="long videos per scheme (default 8)")
    p.add_argument("--frame-counts", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="frame counts of the cost table")
    p.add_argument("--speed-steps", type=int, default=10, help="DDIM steps of the cost table (default 10)")
    p.add_argument("--batch", type=int, default=16, help="videos per sampling call (default 16)")
    p.add_argument("--smoke", action="store_true", help="the whole pipeline with tiny settings (~1-2 min); no RESULTS.md")
    p.add_argument("--no-results", action="store_true", help="leave bench/RESULTS.md alone")
    args = p.parse_args()
    if args.smoke:
        args.videos, args.k, args.steps, args.uncond, args.long_frames, args.long_videos = 2, 2, 2, 3, 16, 2
        args.frame_counts, args.speed_steps, args.batch, args.no_results = [4, 8], 2, 4, True
    if min(args.videos, args.k, args.steps, args.long_videos, args.speed_steps, args.batch) < 1 or args.uncond < 2:
        p.error("--videos, --k, --steps, --long-videos, --speed-steps and --batch must be >= 1, --uncond >= 2")
    if args.long_frames <= 4 or args.budget <= 0:
        p.error("--long-frames must exceed the 4 given frames and --budget be > 0 seconds")
    args.out = args.out or ROOT / "bench" / "out" / ("video-smoke" if args.smoke else "video")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="video-smoke-runs-") as tmp:  # --smoke trains anew into a fresh folder
        args.runs = args.runs or (Path(tmp) if args.smoke else args.out / "runs")
        measure(args)


def measure(args) -> None:
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, float32")
    t0 = time.perf_counter()
    classifier = digit_classifier()
    result = {"date": datetime.date.today().isoformat(), "device": cpu_description(), "args": {k: str(v) for k, v in vars(args).items()}}
    earlier = args.out / "results.json"
    if args.reuse and earlier.is_file():  # parts measured earlier on these runs are kept unless measured again
        result = {**{k: v for k, v in json.loads(earlier.read_text()).items() if k in ("tasks", "joint", "long", "cost")}, **result}
    result["runs"] = train_runs(args)
    parts = {"tasks": lambda: tasks_part(args, result["runs"], classifier, result),
             "joint": lambda: joint_part(args, result["runs"], classifier, result),
             "long": lambda: long_part(args, result["runs"], classifier, result),
             "cost": lambda: cost_part(args, result["runs"], result)}
    for name in args.parts:
        parts[name]()
        (args.out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    result["seconds"] = time.perf_counter() - t0
    (args.out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    section = results_section(args, result)
    publish(section, args.no_results)
    say(f"{result['seconds']:.0f} s; results.json in {args.out}")


if __name__ == "__main__":
    main()
