"""CLIP, CLIP guidance and unCLIP on the captioned shapes, measured (issue 34, "How it is checked").

Trains (or reuses with --reuse) every model of the comparison for a fixed number of steps, each about the demo's
8-minute CPU budget at the rate its config states (fixed steps, so a loaded machine changes the wall time, not the
model; the wall time of each is reported):

    clip          configs/clip_shapes.toml, plain, seed 0: the CLIP that guides x_0 (k-diffusion's way)
    clip-seed1    the same, seed 1: a second CLIP that never guides, the judge of adversarial gain (and FID features)
    clip-noised   clip.noise_aware on x_t of the rectified flow (GLIDE's noised CLIP): guides x_t
    uncond        configs/text_shapes.toml without its text (an unconditional pixel model of the same size and process)
    cfg-pixel     configs/text_shapes.toml: text-conditioned, classifier-free guidance, pixels (the same space as uncond)
    ae, cfg-latent   configs/ae_shapes.toml + configs/ldm_shapes.toml with the chars encoder (the latent CFG model)

then, on --n captions of scenes outside every training set (captions.shapes_data seed 12345), one sample per caption
per method and scale:
    - the detector's prompt following (captions.prompt_scores: "all" criteria and each criterion), a judge no
      generator was trained against;
    - FID-CLIP1: the Frechet distance between the samples and the held-out scenes' own renders in the image-embedding
      space of clip-seed1 (64 dimensions; not Inception FID), beside the distance between two disjoint real sets;
    - the guiding CLIP's mean cosine score of sample and prompt beside clip-seed1's: a gain the second CLIP does not
      see is adversarial.
Each part prints a Markdown table; all go into --out/results.json and, unless --no-results, bench/RESULTS.md.

    python bench/clip.py                      # train everything (~60 min of 2-core CPU), then measure
    python bench/clip.py --reuse              # the runs in --runs already trained: measure only
    python bench/clip.py --smoke              # the whole pipeline with tiny settings; writes no RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch

from diffuse.config import apply_overrides, load_config
from diffuse.data import load_dataset
from diffuse.data.captions import digit_caption, prompt_scores, shapes_data
from diffuse.generate import generate
from diffuse.guidance import ClipX0Guidance, NoisyClipGuidance
from diffuse.data.captions import detect
from diffuse.kinds.clip import evaluate_run, load_clip
from diffuse.kinds.unclip import evaluate_run as evaluate_prior, load_prior, sample_image_embeddings
from diffuse.tasks.unclip import (decode, fixed_noise, image_embeddings, interpolation, invert_image, text_diff,
                                  text_direction, variations)
from diffuse.kinds.diffusion import sample_config_kwargs
from diffuse.metrics import extract_features, feature_statistics, frechet_distance
from diffuse.runs import load_run, open_run
from diffuse.stages import space
from diffuse.train import digit_classifier, train
from results import cpu_description, publish, say, table, trained_steps  # bench/results.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TITLE = "CLIP guidance, classifier-free guidance and unCLIP on captioned shapes and digits (bench/clip.py, issue 34"
UNCOND = ["model.text_encoder=", "model.context_dim=0", "model.cross_attention_resolutions=[]",
          "train.condition_dropout={}", "model.max_tokens=0", "sample.guidance=0"]
DIGITS = ["data.source=mnist", "data.channels=1", "data.image_size=28"]
DIGITS_UNCOND = ["model.class_conditional=false", "train.condition_dropout={}", "sample.guidance=0",
                 "sample.guidance_interval=[]"]
CHARS = ["model.text_encoder=chars", "model.context_dim=64"]  # ldm_shapes.toml's default is MiniLM (the [text] extra)
RUNS = {  # name: (config, overrides, steps: about 8 minutes at the rate the config states)
    "clip": ("clip_shapes.toml", ["train.seed=0"], 2000),
    "clip-seed1": ("clip_shapes.toml", ["train.seed=1"], 2000),
    "clip-noised": ("clip_shapes.toml", ["clip.noise_aware=true", "schedule.kind=flow"], 1800),
    "uncond": ("text_shapes.toml", UNCOND, 900),
    "cfg-pixel": ("text_shapes.toml", [], 900),
    "ae": ("ae_shapes.toml", [], 500),
    "clip-digits": ("clip_shapes.toml", DIGITS, 1000),
    "cfg-latent": ("ldm_shapes.toml", CHARS, 800),  # + latent.autoencoder = the ae run
    "prior": ("unclip_prior_shapes.toml", [], 1500),  # + unclip.clip = the clip run (so is the decoder's)
    "decoder": ("unclip_decoder_shapes.toml", [], 1200),
    # digits: the demo's class-conditional flow model (CFG) against its unconditional twin guided by a digits CLIP
    "digits-cond": ("mnist_cond.toml", [], 1900),
    "digits-uncond": ("mnist_cond.toml", DIGITS_UNCOND, 1900),
    "clip-digits-noised": ("clip_shapes.toml", [*DIGITS, "clip.noise_aware=true", "schedule.kind=flow"], 1000),
}






# --- the runs ----------------------------------------------------------------------------------------------------


def run_config(name: str, args, steps: int, runs: Path):
    """RUNS[name]'s config with its overrides, its upstream run (the ae for cfg-latent, the clip for prior and decoder)
    and a fixed step count (no time limit, a checkpoint every 200 steps, no previews)."""
    config, overrides, _ = RUNS[name]
    extra = ([f"latent.autoencoder={runs / 'ae'}"] if name == "cfg-latent" else
             [f"unclip.clip={runs / 'clip'}"] if name in ("prior", "decoder") else [])
    limit = [f"train.steps={steps}", "train.time_limit=0", "train.checkpoint_every=200", "train.sample_every=0"]
    if args.smoke:
        limit += ["train.warmup_steps=1", "train.batch_size=8"] + ([] if name == "prior" or name.startswith(("digits", "clip-digits")) else ["data.crops=64"])
    return apply_overrides(load_config(CONFIGS / config), overrides + extra + limit)


def train_runs(args) -> dict[str, dict]:
    """Every run of RUNS trained for its steps (--smoke: 3) into --runs/NAME, or reused (--reuse) where it holds one.
    Returns {name: {"path", "steps", "train_s", "overrides"}}; SystemExit for a run folder that exists without --reuse."""
    out = {}
    for name, (config, overrides, steps) in RUNS.items():
        path = args.runs / name
        if path.exists() and not args.reuse:
            raise SystemExit(f"{path} exists: pass --reuse to measure the runs there, or another --runs to train anew")
        n = 3 if args.smoke else steps
        cfg = run_config(name, args, n, args.runs)
        t0 = time.perf_counter()
        if not (args.reuse and trained_steps(path) >= n):
            train(cfg, path, progress=False)  # a new run, or (--reuse) one stopped short: resumed from its checkpoint
        out[name] = {"path": str(path), "steps": open_run(path).step, "train_s": time.perf_counter() - t0,
                     "overrides": " ".join(overrides) or "as is"}
        say(f"run {name}: {out[name]['steps']} steps ({out[name]['train_s']:.0f} s here)")
    return out


# --- part 0: each run's training cost, timed alone -----------------------------------------------------------------
def timing_part(args, runs, result) -> None:
    """Each run's seconds per training step, timed over steps 50-100 of a fresh copy (--smoke: 2-4, log every 2) on
    this machine with nothing else running, and projected to the run's steps: the CPU budget the issue states, which
    the wall times of a long run shared with other work do not show."""
    first, last = (2, 4) if args.smoke else (50, 100)
    rows = []
    for name, (config, _, _) in RUNS.items():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = apply_overrides(run_config(name, args, last, args.runs), [f"train.log_every={first}"])
            train(cfg, Path(tmp) / name, progress=False)
            times = {r["step"]: r["time"] for r in map(json.loads, (Path(tmp) / name / "log.jsonl").read_text().splitlines())}
        per_step = (times[last] - times[first]) / (last - first)
        rows.append({"run": name, "config": config, "overrides": runs[name]["overrides"],
                     "steps": runs[name]["steps"], "s / step": per_step, "projected min": per_step * runs[name]["steps"] / 60,
                     "threads": torch.get_num_threads()})
        say(json.dumps(rows[-1]))
    result["timing"] = rows


# --- part 1: the CLIPs' held-out retrieval -------------------------------------------------------------------------
def retrieval_part(args, runs, result) -> None:
    rows = []
    for name in ("clip", "clip-seed1", "clip-noised", "clip-digits"):
        rec = evaluate_run(runs[name]["path"])
        for level, r in ((k, v) for k, v in rec.items() if k.startswith("t=")):
            rows.append({"CLIP": name, "t": level[2:], "t2i R@1": r["t2i_r@1"], "i2t R@1": r["i2t_r@1"],
                         "t2i R@5": r["t2i_r@5"], "i2t R@5": r["i2t_r@5"],
                         "zero-shot digit accuracy": r.get("zero_shot_accuracy", ""), "gallery": rec["n_held_out"],
                         "distinct captions": rec["distinct_captions"]})
            say(json.dumps(rows[-1]))
    result["retrieval"] = rows


# --- part 2: guidance curves ------------------------------------------------------------------------------------------
def held_out(n: int) -> tuple[torch.Tensor, list[str]]:
    """n scenes outside every training set (seed 12345) as images (n, 3, 32, 32) in [-1, 1] and their captions."""
    images, captions = shapes_data(n, 32, seed=12345)
    return torch.from_numpy(images).float() / 127.5 - 1, captions


def clip_features(clip, x: torch.Tensor) -> torch.Tensor:
    """A plain CLIP's image embeddings (N, D) of images in [-1, 1], batched."""
    with torch.no_grad():
        return torch.cat([clip.image_embedding(part) for part in x.split(256)])


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Frechet distance of two feature sets (N, D)."""
    stats = lambda f: (f.double().mean(0).numpy(), torch.cov(f.double().T).numpy())  # noqa: E731
    return float(frechet_distance(*stats(a), *stats(b)))


def clip_score(clip, x: torch.Tensor, captions: list[str], model_time=None) -> float:
    """Mean cosine f(x) . g(caption) of a CLIP over the samples (a noise-aware one at the process's clean time)."""
    with torch.no_grad():
        f = torch.cat([clip.image_embedding(part, model_time) for part in x.split(256)])
        g = clip.text_embedding(clip.tokenize(captions))
    return float((f * g).sum(-1).mean())


def sample_method(method: str, scale: float, runs: dict, captions: list[str], args) -> torch.Tensor:
    """One sample per caption, images (n, 3, 32, 32) in [-1, 1], by a method at a scale, with the run's [sample]
    sampler; the same seed (so the same x_T) for every method and scale."""
    n = len(captions)
    if method in ("cfg-pixel", "cfg-latent"):
        cfg, den, _ = load_run(runs[method]["path"])
        s = space(cfg)
        tokens = den.net.text_encoder.tokenize(captions)
        z = generate(den, n, s.shape, cond={"text": tokens}, seed=args.seed,
                     **{**sample_config_kwargs(cfg.sample), "steps": args.steps, "guidance": scale})
        return s.decode(z).clamp(-1, 1)
    if method == "unCLIP":
        z = sample_image_embeddings(load_prior(runs["prior"]["path"]), captions, guidance=args.prior_guidance,
                                    best_of=2, seed=args.seed)
        cfg, den, _ = load_run(runs["decoder"]["path"])
        return generate(den, n, space(cfg).shape, cond={"image_embed": z}, seed=args.seed,
                        **{**sample_config_kwargs(cfg.sample), "steps": args.steps, "guidance": scale}).clamp(-1, 1)
    cfg, den, _ = load_run(runs["uncond"]["path"])
    clip_run = "clip-noised" if method == "noisy CLIP" else "clip"
    _, clip = load_clip(runs[clip_run]["path"])
    text = clip.text_embedding(clip.tokenize(captions))
    guided = (NoisyClipGuidance(den, clip, text, scale) if method == "noisy CLIP"
              else ClipX0Guidance(den, clip, text, scale, cutouts=args.cutouts, seed=args.seed))
    return generate(guided, n, space(cfg).shape, seed=args.seed,
                    **{**sample_config_kwargs(cfg.sample), "steps": args.steps, "guidance": 0.0}).clamp(-1, 1)


def guidance_part(args, runs, result) -> None:
    real, captions = held_out(args.n)
    _, judge = load_clip(runs["clip-seed1"]["path"])
    _, plain = load_clip(runs["clip"]["path"])
    noised_cfg, noised = load_clip(runs["clip-noised"]["path"])
    real_f = clip_features(judge, real)
    other, _ = held_out(2 * args.n)  # a second real set: the first n of seed 12345 again, so take the other half
    floor = frechet(real_f, clip_features(judge, other[args.n:]))
    methods = {"cfg-latent": args.cfg_scales, "cfg-pixel": args.cfg_scales, "noisy CLIP": args.noisy_scales,
               "x0 CLIP": args.x0_scales, "unCLIP": args.cfg_scales}
    rows = []
    for method, scales in methods.items():
        for scale in scales:
            t0 = time.perf_counter()
            x = sample_method(method, scale, runs, captions, args)
            seconds = time.perf_counter() - t0
            if not torch.isfinite(x).all():
                raise SystemExit(f"{method} at scale {scale} gave non-finite samples")
            frac = prompt_scores(x, captions)["fraction"]
            guiding = (clip_score(noised, x, captions) if method == "noisy CLIP" else clip_score(plain, x, captions))
            rows.append({"method": method, "scale": scale, **{k: frac[k] for k in ("all", "colour", "shape", "size", "count", "position")},
                         "FID-CLIP1": frechet(real_f, clip_features(judge, x)),
                         "guiding CLIP score": guiding, "clip-seed1 score": clip_score(judge, x, captions),
                         "s / image": seconds / len(captions)})
            say(json.dumps(rows[-1]))
    result["guidance"] = rows
    result["fid_floor"] = floor
    result["real_scores"] = {"clip": clip_score(plain, real, captions), "clip-seed1": clip_score(judge, real, captions),
                             "clip-noised": clip_score(noised, real, captions),
                             "detector all": prompt_scores(real, captions)["fraction"]["all"]}
    del noised_cfg


# --- part 2b: the same comparison on digits, judged by the digit classifier --------------------------------------------
def digits_part(args, runs, result) -> None:
    """On "a handwritten DIGIT", args.n prompts (each digit n/10 times), one sample each from the same x_T: CFG of the
    class-conditional model at the label against its unconditional twin (same size, process and steps) guided by the
    noise-aware digits CLIP on x_t or the plain one on x_0. Judged by the digit classifier of the FD metrics (trained
    on MNIST labels, never a generator's guide): the fraction classified as the prompted digit, and FD-digits against
    the 5,000 bundled digits; beside the guiding CLIP's own zero-shot accuracy on the samples."""
    judge = digit_classifier()
    cfg_real = run_config("digits-cond", args, 1, args.runs)
    real = torch.stack([x for x, _ in load_dataset(cfg_real.data)])
    stats_real = feature_statistics(extract_features(real, judge))
    fd = lambda x: float(frechet_distance(*stats_real, *feature_statistics(extract_features(x, judge))))  # noqa: E731
    labels = torch.arange(args.n) % 10
    captions = [digit_caption(int(y)) for y in labels]
    g = torch.Generator().manual_seed(args.seed)
    floor = fd(real[torch.randperm(len(real), generator=g)[:args.n]])
    clips = {name: load_clip(runs[name]["path"])[1] for name in ("clip-digits", "clip-digits-noised")}
    prompts = {name: c.text_embedding(c.tokenize([digit_caption(d) for d in range(10)])) for name, c in clips.items()}

    def zero_shot(name, x):
        with torch.no_grad():
            f = torch.cat([clips[name].image_embedding(part) for part in x.split(256)])
        return float(((f @ prompts[name].T).argmax(1) == labels).float().mean())

    models = {name: load_run(runs[name]["path"]) for name in ("digits-cond", "digits-uncond")}
    rows = []
    methods = {"CFG (label)": args.digit_cfg_scales, "noisy CLIP": args.noisy_scales, "x0 CLIP": args.x0_scales}
    for method, scales in methods.items():
        guiding = "clip-digits-noised" if method == "noisy CLIP" else "clip-digits"  # CFG: scored, not guiding
        clip = clips[guiding]
        cfg, den, _ = models["digits-cond" if method == "CFG (label)" else "digits-uncond"]
        kw = {**sample_config_kwargs(cfg.sample), "steps": args.steps, "seed": args.seed}
        for scale in scales:
            t0 = time.perf_counter()
            if method == "CFG (label)":
                x = generate(den, args.n, space(cfg).shape, labels=labels, **{**kw, "guidance": scale})
            else:
                text = clip.text_embedding(clip.tokenize(captions))
                guided = (NoisyClipGuidance(den, clip, text, scale) if method == "noisy CLIP"
                          else ClipX0Guidance(den, clip, text, scale, cutouts=args.cutouts, seed=args.seed))
                x = generate(guided, args.n, space(cfg).shape, **{**kw, "guidance": 0.0})
            seconds = time.perf_counter() - t0
            x = x.clamp(-1, 1)
            if not torch.isfinite(x).all():
                raise SystemExit(f"digits: {method} at scale {scale} gave non-finite samples")
            with torch.no_grad():
                accuracy = float((judge(x).argmax(1) == labels).float().mean())
            rows.append({"method": method, "scale": scale, "digit classifier accuracy": accuracy, "FD-digits": fd(x),
                         "guiding CLIP": guiding if method != "CFG (label)" else f"({guiding}, not guiding)",
                         "its zero-shot accuracy": zero_shot(guiding, x), "s / image": seconds / args.n})
            say(json.dumps(rows[-1]))
    result["digits"] = rows
    result["digits_floor"] = floor


# --- part 3: the unCLIP prior ----------------------------------------------------------------------------------------
def prior_part(args, runs, result) -> None:
    rows = []
    for w in sorted({0.0, args.prior_guidance}):
        rec = evaluate_prior(runs["prior"]["path"], guidance=w)
        rows.append({"guidance w": w, **{k: v for k, v in rec.items() if k.startswith(("cos_", "share_", "baseline_"))}})
        say(json.dumps(rows[-1]))
    result["prior"] = rows


# --- part 4: unCLIP's manipulations -------------------------------------------------------------------------------------
COLOURS = ("red", "green", "blue", "yellow", "white")


def recoloured(caption: str) -> str | None:
    """The caption with its one colour word swapped (red -> blue, any other -> red); None for a caption naming no colour
    or more than one object (relations and counts), which a single text diff does not describe."""
    words = caption.split()
    named = [i for i, w in enumerate(words) if w in COLOURS]
    if len(named) != 1 or any(w in words for w in ("two", "three", "above", "below", "of")):
        return None
    words[named[0]] = "blue" if words[named[0]] == "red" else "red"
    return " ".join(words)


def unclip_part(args, runs, result) -> None:
    """Variations keep the caption's content while pixels differ; interpolation midpoints are scenes; text diffs change
    the colour named and keep the rest (the detector judges each)."""
    real, captions = held_out(max(args.n, 4 * args.edits))
    cfg, den, _ = load_run(runs["decoder"]["path"])
    _, clip = load_clip(runs["clip"]["path"])
    kw = {"steps": args.steps}
    rows = []
    m = args.edits
    x, caps = real[:m], captions[:m]
    z = image_embeddings(clip, x)
    k = 4
    var = torch.cat([variations(den, z[i], k, seed=args.seed + i, sampler="ddim", clip=True, **kw) for i in range(m)])
    rep = [c for c in caps for _ in range(k)]
    frac = prompt_scores(var, rep)["fraction"]
    spread = (var.view(m, k, -1) - var.view(m, k, -1).mean(1, keepdim=True)).abs().mean()
    rows.append({"manipulation": f"variations ({k} per image)", "images": m, "detector all (own caption)": frac["all"],
                 "colour": frac["colour"], "shape": frac["shape"], "position": frac["position"],
                 "mean |x - input|": float((var.view(m, k, *x.shape[1:]) - x[:, None]).abs().mean()),
                 "mean |x - mean of its variations|": float(spread)})
    say(json.dumps(rows[-1]))
    a, b = real[m:2 * m], real[2 * m:3 * m]
    ca, cb = captions[m:2 * m], captions[2 * m:3 * m]
    za, zb = image_embeddings(clip, a), image_embeddings(clip, b)
    mids = torch.cat([decode(den, interpolation(za[i], zb[i], 3)[1:2], fixed_noise(den, 1, args.seed + i), **kw)
                      for i in range(m)]).clamp(-1, 1)
    either = prompt_scores(mids, ca)["per_image"]["all"] | prompt_scores(mids, cb)["per_image"]["all"]
    objects = sum(len(detect(im)) > 0 for im in mids) / m
    rows.append({"manipulation": "interpolation midpoint (theta 0.5, x_T fixed)", "images": m,
                 "detector all (own caption)": float(either.mean()), "note": f"all = matches either end's caption; "
                 f"{objects:.2f} of midpoints hold a detected object"})
    say(json.dumps(rows[-1]))
    pairs = [(i, recoloured(c)) for i, c in enumerate(captions) if recoloured(c)][:m]
    idx = torch.tensor([i for i, _ in pairs])
    x, old, new = real[idx], [captions[i] for i, _ in pairs], [c for _, c in pairs]
    z = image_embeddings(clip, x)
    x_T = invert_image(den, x, z, **kw)
    for theta in (0.25, 0.5):
        zt = torch.stack([text_diff(z[i], text_direction(clip, old[i], new[i]), theta) for i in range(len(pairs))])
        out = decode(den, zt, x_T, **kw).clamp(-1, 1)
        to_new, to_old = prompt_scores(out, new)["fraction"], prompt_scores(out, old)["fraction"]
        rows.append({"manipulation": f"text diff colour -> new colour, theta {theta}", "images": len(pairs),
                     "detector all (own caption)": to_new["all"], "colour": to_new["colour"], "shape": to_new["shape"],
                     "position": to_new["position"], "note": f"the old colour kept in {to_old['colour']:.2f}",
                     "mean |x - input|": float((out - x).abs().mean())})
        say(json.dumps(rows[-1]))
    recon = decode(den, z, x_T, **kw).clamp(-1, 1)
    rows.append({"manipulation": "reconstruction (theta 0: inverted x_T, own z_i)", "images": len(pairs),
                 "detector all (own caption)": prompt_scores(recon, old)["fraction"]["all"],
                 "mean |x - input|": float((recon - x).abs().mean())})
    say(json.dumps(rows[-1]))
    result["unclip"] = rows


# --- RESULTS.md ------------------------------------------------------------------------------------------------------
def results_section(args, result: dict) -> str:
    r = result
    runs = ", ".join(f"{n} ({v['steps']} steps; {v['overrides']})" for n, v in r["runs"].items())
    lines = [f"## {TITLE}, {r['date']})", "",
             f"Device: {r['device']}; torch {torch.__version__}, float32. `python bench/clip.py --n {args.n} "
             f"--steps {args.steps}{' --reuse' if args.reuse else ''}`. Runs: {runs}. Held-out: {args.n} captions of "
             "scenes outside every training set (seed 12345), one sample each, the same x_T for every method and scale "
             f"(seed {args.seed}); each run's own sampler at {args.steps} steps.", ""]
    if "timing" in r:
        lines += ["### Training cost of each model, timed alone", "",
                  f"Seconds per step over steps 50-100 of a fresh copy of each run at {r['timing'][0]['threads']} threads, "
                  "nothing else running, projected to the steps trained (the issue's budget: about 8 minutes each).", "",
                  table(r["timing"], ["run", "config", "overrides", "steps", "s / step", "projected min"]), ""]
    if "retrieval" in r:
        lines += ["### The CLIPs: held-out retrieval recall", "",
                  "Held-out gallery: every tenth image of each CLIP's data (clip-digits: the 5,000 bundled MNIST digits "
                  "captioned \"a handwritten seven\", ...; its zero-shot accuracy is the argmax over the ten prompts, "
                  "which it saw as captions in training, so it is retrieval among ten captions, not zero-shot in "
                  "CLIP's sense of unseen class names).", "",
                  table(r["retrieval"], ["CLIP", "t", "gallery", "distinct captions", "t2i R@1", "i2t R@1", "t2i R@5",
                                         "i2t R@5", "zero-shot digit accuracy"]), ""]
    if "guidance" in r:
        rs = r["real_scores"]
        lines += ["### Prompt following, FID and CLIP scores against the guidance scale", "",
                  "Detector: captions.prompt_scores, the fraction of prompts met in every respect (all) and per criterion "
                  f"(with {args.n} prompts a fraction near 0.3 carries a standard error of about "
                  f"{math.sqrt(0.3 * 0.7 / args.n):.2f}). FID-CLIP1: Frechet distance in clip-seed1's embedding space "
                  f"against the held-out scenes' renders (two disjoint real sets: {r['fid_floor']:.3g}). Scores: mean "
                  "cosine of sample and prompt; the guiding CLIP is clip-noised for noisy CLIP, clip otherwise (for CFG "
                  f"rows it guides nothing). Real scenes: detector all {rs['detector all']:.3f}, clip {rs['clip']:.3f}, "
                  f"clip-seed1 {rs['clip-seed1']:.3f}, clip-noised {rs['clip-noised']:.3f}.", "",
                  table(r["guidance"], ["method", "scale", "all", "colour", "shape", "size", "count", "position",
                                        "FID-CLIP1", "guiding CLIP score", "clip-seed1 score", "s / image"]), ""]
    if "digits" in r:
        lines += ["### The same comparison on digits, judged by the digit classifier", "",
                  f"Prompts \"a handwritten DIGIT\", {args.n} (each digit {args.n // 10} times), one sample each, the same x_T "
                  "for every method and scale. CFG: digits-cond (configs/mnist_cond.toml) at the label; CLIP guidance: "
                  "digits-uncond, its unconditional twin (same size, process, steps), guided by clip-digits-noised on x_t "
                  "or clip-digits on x_0. Digit classifier: the FD metrics' fixed network (trained on MNIST labels, no "
                  "generator's guide); FD-digits against the 5,000 bundled digits (as many random real digits: "
                  f"{r['digits_floor']:.3g}). The guiding CLIP's zero-shot accuracy on the samples beside it shows any "
                  "gain the classifier does not see.", "",
                  table(r["digits"], ["method", "scale", "digit classifier accuracy", "FD-digits", "guiding CLIP",
                                      "its zero-shot accuracy", "s / image"]), ""]
    if "prior" in r:
        lines += ["### The unCLIP prior: cosines of best-of-2 draws on the CLIP's held-out captions", "",
                  "cos_pred_image: to the caption's true image embedding; cos_pred_text: to the caption's text "
                  "embedding; unrelated: to the next held-out image of another caption; baselines need no prior "
                  "(kinds.unclip.prior_cosines).", "", table(r["prior"], list(r["prior"][0])), ""]
    if "unclip" in r:
        lines += ["### unCLIP's manipulations, judged by the detector", "",
                  f"The decoder, DDIM {args.steps} steps; held-out scenes. Variations: z_i of the input, new x_T. "
                  "Interpolation: slerp of two inputs' z_i, x_T fixed. Text diff: z_d from the caption and the caption "
                  "with its colour swapped, x_T by DDIM inversion (sec. 3.3).", "",
                  table(r["unclip"], ["manipulation", "images", "detector all (own caption)", "colour", "shape",
                                      "position", "mean |x - input|", "mean |x - mean of its variations|", "note"]), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reuse", action="store_true", help="reuse the runs in --runs that exist instead of training them")
    p.add_argument("--runs", type=Path, default=None, help="the runs' folder (default OUT/runs)")
    p.add_argument("--out", type=Path, default=None, help="results.json goes here (default bench/out/clip)")
    p.add_argument("--parts", nargs="+", default=["timing", "retrieval", "guidance", "digits", "prior", "unclip"],
                   choices=["timing", "retrieval", "guidance", "digits", "prior", "unclip"])
    p.add_argument("--n", type=int, default=200, help="held-out captions (default 200)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cutouts", type=int, default=4, help="augmented x_0 views per step of CLIP guidance on x_0")
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--noisy-scales", type=float, nargs="+", default=[0, 30, 100, 300, 1000])
    p.add_argument("--digit-cfg-scales", type=float, nargs="+", default=[0, 1.5, 3],
                   help="CFG weights of the class-conditional digits model (its config guides with 1.5)")
    p.add_argument("--x0-scales", type=float, nargs="+", default=[10, 30, 100, 300, 1000])
    p.add_argument("--prior-guidance", type=float, default=1.0, help="the unCLIP prior's guidance w (default 1)")
    p.add_argument("--edits", type=int, default=48, help="held-out images per unCLIP manipulation (default 48)")
    p.add_argument("--smoke", action="store_true", help="tiny settings end to end; no RESULTS.md")
    p.add_argument("--no-results", action="store_true", help="leave bench/RESULTS.md alone")
    args = p.parse_args()
    if args.smoke:
        args.n, args.steps, args.no_results, args.edits = 4, 2, True, 4
        args.cfg_scales, args.noisy_scales, args.x0_scales, args.digit_cfg_scales = [1.0], [30.0], [100.0], [1.5]
    if min(args.n, args.steps, args.cutouts) < 1 or args.n < 4:
        p.error("--n must be >= 4, --steps and --cutouts >= 1")
    args.out = args.out or ROOT / "bench" / "out" / ("clip-smoke" if args.smoke else "clip")
    args.runs = args.runs or args.out / "runs"
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"date": datetime.date.today().isoformat(), "device": cpu_description()}
    earlier = args.out / "results.json"
    if args.reuse and earlier.is_file():
        result = {**{k: v for k, v in json.loads(earlier.read_text()).items() if k not in result}, **result}
    result["runs"] = train_runs(args)
    parts = {"timing": timing_part, "retrieval": retrieval_part, "guidance": guidance_part, "digits": digits_part,
             "prior": prior_part, "unclip": unclip_part}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name in args.parts:
            parts[name](args, result["runs"], result)
            earlier.write_text(json.dumps(result, indent=1, default=float))
    section = results_section(args, result)
    publish(section, args.no_results)
    say(f"{time.perf_counter() - t0:.0f} s; results.json in {args.out}")


if __name__ == "__main__":
    main()
