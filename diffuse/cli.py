"""The `diffuse` command: train, sample, edit, eval, demo.

    diffuse train CONFIG [--set key=value ...] --out RUN      (again on RUN: resume)
    diffuse sample RUN --n N --sampler NAME --steps K --seed S --out FILE.png|FILE.npy
                  [--label L] [--guidance W] [--classifier RUN] [--threshold static|none|dynamic:P] [--opt KEY=VALUE]
    diffuse edit sdedit RUN --image IMG --strength S --out OUT.png     (also inpaint --mask, ilvr --reference --factor)
    diffuse eval RUN --metric fid|kid|is|pr|nll|vlb [--n N] [--features NET] [--sampler NAME --steps K]
    diffuse serve RUN [RUN ...] [--port P] [--host 127.0.0.1]     (the local web UI; pip install -e ".[ui]")
    diffuse demo [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path


from .config import ConfigError, apply_overrides, load_config
from .generate import CHUNK
from .samplers import OPTIONS, SAMPLERS
from .schedule import SPACINGS
from .tasks.editing import STRENGTH_HELP
from .tasks.image_to_image import EXAMPLE_CONFIGS, TRAINED_TASKS, edit_name
from .train import NonFiniteLoss, ResumeError


def _train(args) -> None:
    from .train import dry_run, train

    cfg = apply_overrides(load_config(args.config), args.set or [])
    if args.dry_run:
        print(dry_run(cfg))
        return
    run = train(cfg, args.out, inexact_resume=args.inexact_resume)
    print(f"run folder: {run}")


def parse_threshold(text: str) -> tuple[bool, float]:
    """'static' | 'none' | 'dynamic:P' -> (clip, dynamic percentile)."""
    if text == "static":
        return True, 0.0
    if text == "none":
        return False, 0.0
    kind, _, p = text.partition(":")
    try:
        value = float(p)
    except ValueError:
        value = -1.0
    if kind != "dynamic" or not 0 < value <= 1:
        raise ValueError(f"--threshold {text!r} is not valid; use static, none or dynamic:P with a percentile P in (0, 1], "
                         "e.g. dynamic:0.995")
    return False, value


def guidance_interval(text: str) -> tuple[float, ...]:
    """An argparse `type` for --guidance-interval: 'LO,HI' -> (lo, hi), noise levels sigma/alpha with 0 <= lo < hi
    (HI may be inf); 'all' -> () (guidance at every level)."""
    if text.strip() == "all":
        return ()
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO,HI (two numbers, e.g. 0.3,5) or all") from None
    if not (0 <= lo < hi and math.isfinite(lo)) or math.isnan(hi):
        raise argparse.ArgumentTypeError(f"needs 0 <= LO < HI with LO finite, got {text!r}")
    return lo, hi


def parse_options(pairs: list[str], sampler: str) -> dict:
    """--opt KEY=VALUE pairs -> sampler keyword options, each checked against what the sampler takes and the
    values the option allows (type, finite, range)."""
    valid = SAMPLERS[sampler].options
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in valid:
            raise ValueError(f"--opt {pair!r}: sampler {sampler} takes {', '.join(valid) or 'no options'} (as KEY=VALUE)")
        try:
            out[key] = OPTIONS[key].parse(key, raw)
        except ValueError as e:
            raise ValueError(f"--opt {pair!r}: {e}") from None
    return out


def number(kind: type = float, *, low: float | None = None, above: bool = False, high: float | None = None):
    """An argparse `type` for a finite number of `kind` (int or float) >= low (> low if `above`) and <= high:
    'abc', 'nan', 'inf' and values out of range fail when the command line is parsed, naming the option."""

    def parse(text: str):
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value

    return parse


def _check_out(out: Path) -> None:
    if out.suffix not in (".png", ".npy"):
        raise ValueError(f"--out must end in .png (an image grid) or .npy (an array of shape (N, C, H, W) in [0, 1]), got {out}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name a file in it, e.g. {out / 'samples.png'}")


def _sampling(args, n: int):
    """What `sample` and `edit` share: the run's config and denoiser and generate's keyword arguments, resolved from the
    command line and the run's [sample] section, every flag checked before the model loads. Returns (cfg, counted
    denoiser, generate kwargs, progress bar, the run's space: latent.PixelSpace, or the LatentSpace samples are decoded
    from)."""
    import torch
    from tqdm import tqdm

    from .samplers import CountCalls
    from .stages import check_same_space, space
    from .generate import default_labels
    from .precision import autocast_dtype
    from .runs import check_guidance, load_classifier, load_run, prompt_condition, run_config

    cfg = run_config(args.run)  # everything the command line says is checked before the model loads
    s = cfg.sample
    sampler = args.sampler or s.sampler
    _refuse_unused(args, sampler)
    _check_plan(args, cfg)  # the sampler on this process and its grid: before the model loads and the bar starts
    options = {"eta": s.eta, "variance": s.variance}
    if args.eta is not None:
        if "eta" not in SAMPLERS[sampler].options:
            raise ValueError(f"--eta: sampler {sampler} takes no eta (samplers with one: ddim, euler-ancestral)")
        options["eta"] = args.eta
    options.update(parse_options(args.opt or [], sampler))
    clip, dyn = parse_threshold(args.threshold) if args.threshold is not None else (s.clip, s.dynamic_threshold)
    if cfg.latent.autoencoder and args.threshold not in (None, "none"):
        raise ValueError(f"--threshold {args.threshold}: {args.run} is a latent-diffusion run, whose latents have no [-1, 1] "
                         "range to clip to; leave --threshold out")
    if args.no_clip:
        clip = False
    guidance = s.guidance if args.guidance is None else args.guidance
    prompt, negative = getattr(args, "prompt", None), getattr(args, "negative_prompt", None)
    if not cfg.model.text_encoder and (prompt is not None or negative is not None):
        raise ValueError(f"--prompt and --negative-prompt need a text-conditional run (model.text_encoder); {args.run} "
                         "takes no captions" + (" (it is class-conditional: use --label)" if cfg.model.class_conditional else ""))
    if cfg.model.text_encoder and prompt is None:
        raise ValueError(f'{args.run} is a text-conditional run: say what to draw with --prompt, e.g. --prompt "a red circle"')
    if negative is not None and not guidance:
        raise ValueError("--negative-prompt replaces the empty caption of classifier-free guidance, so it needs a guidance "
                         "weight: pass --guidance W (e.g. 4)")
    interval = tuple(s.guidance_interval) if args.guidance_interval is None else args.guidance_interval
    check_guidance(cfg, guidance, classifier=args.classifier is not None)
    if args.classifier is not None:  # it must read what this run diffuses (pixels, or the same latents)
        check_same_space(cfg, run_config(args.classifier), f"the classifier {args.classifier}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    autocast_dtype(args.mixed_precision or s.mixed_precision, device, "--mixed-precision")  # fp16 on a CPU fails here
    cfg, den, num_classes = load_run(args.run, ema=not args.no_ema, device=device)
    latent_space = space(cfg, device)
    text_cond = {} if prompt is None else prompt_condition(den, n, prompt, negative, device)
    conditional = cfg.model.class_conditional and num_classes > 0
    classifier, labels = None, None
    if args.classifier is not None:
        _, classifier = load_classifier(args.classifier, device=device)
        if classifier.num_classes != num_classes and num_classes:
            raise ValueError(f"the classifier knows {classifier.num_classes} classes, the model {num_classes}")
        num_classes = classifier.num_classes
    if args.label is not None:
        if not (conditional or classifier is not None):
            raise ValueError("--label needs a class-conditional model or a --classifier to guide with")
        if not 0 <= args.label < num_classes:
            raise ValueError(f"--label must be a class index in 0..{num_classes - 1}, got {args.label}")
        labels = torch.full((n,), args.label)
    elif conditional or classifier is not None:
        labels = default_labels(n, num_classes)
    steps = (args.steps if args.steps is not None else s.steps) or None  # 0: every step
    counted = CountCalls(den)
    bar = tqdm(total=(steps or getattr(den.schedule, "top_step", None)) if SAMPLERS[sampler].calls_per_step else None,
               unit="step", desc=sampler, disable=progress_disabled())
    kw = dict(sampler=sampler, steps=steps, spacing=args.spacing or s.spacing, clip=clip, dynamic_threshold=dyn,
              labels=labels, guidance=guidance, guidance_interval=interval or None, classifier=classifier, seed=args.seed, device=device,
              mixed_precision=args.mixed_precision or s.mixed_precision, callback=lambda step: bar.update(1), **text_cond,
              **options)
    return cfg, counted, kw, bar, latent_space


def progress_disabled() -> bool:
    """TQDM_DISABLE read now (tqdm reads it once, when it is imported): 1, true, yes ... silence every progress bar."""
    import os

    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def _check_plan(args, cfg) -> None:
    """The sampler, steps and spacing `_sampling` resolves for a run (flags over its [sample] section) checked against
    its process (samplers.check_plan: e.g. sde-em on a flow run, more steps than T), before anything loads."""
    from .samplers import check_plan
    from .schedule import Schedule

    s = cfg.sample
    steps = (args.steps if args.steps is not None else s.steps) or None  # 0: every step
    check_plan(Schedule.from_config(cfg.schedule), args.sampler or s.sampler, steps, args.spacing or s.spacing)


def _with_condition(kw: dict, cond: dict | None) -> dict:
    """generate's keyword arguments from `_sampling` with `cond` (an input image's condition) joined to the prompt's
    condition that `_sampling` may have put there, so a text-conditional task or cascade stage gets both."""
    both = {**(kw.get("cond") or {}), **(cond or {})}
    return {**kw, "cond": both or None}


def _write(x, out: Path) -> None:
    """The samples or edits as OUT (.npy or .png), atomically: a failed write leaves an earlier OUT as it was."""
    from .visualize import save_samples

    save_samples(x, out)


def _sample(args) -> None:
    from .generate import generate_in_chunks
    from .runs import run_config
    from .tasks.image_to_image import CASCADE_FILE

    out = Path(args.out)
    _check_out(out)
    if (Path(args.run) / CASCADE_FILE).is_file():
        return _sample_cascade(args, out)
    kind = run_config(args.run).task.kind
    if kind != "none":
        raise ValueError(f"{args.run} is a {kind} run (task.kind = '{kind}'): it makes an image from an input image, so "
                         f"use `diffuse edit {edit_name(kind)} {args.run} --image IMAGE --out OUT.png`")
    cfg, counted, kw, bar, latent_space = _sampling(args, args.n)
    chunks = -(-args.n // args.batch_size)
    if bar.total and chunks > 1:
        bar.total *= chunks
    x = latent_space.decode(generate_in_chunks(counted, args.n, latent_space.shape, chunk=args.batch_size, **kw))
    bar.close()
    _write(x, out)
    print(f"wrote {args.n} samples to {out} ({counted.calls} denoiser calls)")


def _sample_cascade(args, out: Path) -> None:
    """`diffuse sample CASCADE`: the base run's samples, then each super-resolution stage conditioned on the previous
    stage's output (Ho et al. 2021), its input noised to the cascade's (or its own) aug_level. The sampling flags
    apply to every stage; --label and --guidance to the first."""
    import copy
    import dataclasses

    import torch

    from .generate import generate
    from .runs import run_config
    from .tasks.image_to_image import check_cascade, input_condition, read_cascade

    stages, level = read_cascade(args.run)
    configs = [run_config(s) for s in stages]
    check_cascade(configs)  # before any model loads
    for cfg in configs:  # every stage's sampler and grid, before the first stage draws
        _check_plan(args, cfg)
    x, calls = None, 0
    for k, stage in enumerate(stages):
        stage_args = copy.copy(args)
        stage_args.run = str(stage)
        if k > 0:  # the class, its guidance and a negative prompt steer the first stage; later ones follow its image
            stage_args.label, stage_args.guidance, stage_args.classifier = None, None, None
            stage_args.negative_prompt = None
            if not run_config(stage).model.text_encoder:  # a text-conditional stage reads the prompt too (Imagen)
                stage_args.prompt = None
        cfg, counted, kw, bar, latent_space = _sampling(stage_args, args.n)
        d, cond = cfg.data, None
        if k > 0:
            task = cfg.task if level is None else dataclasses.replace(cfg.task, aug_level=level)
            g = torch.Generator(kw["device"]).manual_seed(args.seed + k)
            cond = input_condition(task, x, d.image_size, counted.schedule, generator=g)
        kw["seed"] = args.seed + 1000 * k  # each stage its own noise
        x = latent_space.decode(generate(counted, args.n, latent_space.shape, **_with_condition(kw, cond)))  # latent: decoded
        bar.close()
        calls += counted.calls
    _write(x, out)
    print(f"wrote {args.n} samples of the {len(stages)}-stage cascade {args.run} to {out} ({calls} denoiser calls)")


def _edit(args) -> None:
    """`diffuse edit TASK RUN ...`: n outputs for one input image, written as OUT with a before/after figure beside it
    (OUT's name + _before_after.png). sdedit, ilvr and inpaint work with any model of images (tasks/editing.py);
    superres, colorize, uncrop and restore need a run trained for that task (tasks/image_to_image.py), and inpaint
    uses an inpainting-trained run's own network when given one."""
    import torch

    from . import tasks
    from .data import load_image, load_mask
    from .tasks.editing import latent_edit
    from .generate import generate
    from .runs import run_config
    from .tasks.image_to_image import input_condition, viewable
    from .visualize import save_grid

    out = Path(args.out)
    _check_out(out)
    cfg = run_config(args.run)
    d, kind = cfg.data, cfg.task.kind
    trained = TRAINED_TASKS.get(args.task) or ("inpaint" if args.task == "inpaint" and kind == "inpaint" else None)
    if trained is not None and kind != trained:
        raise ValueError(f"edit {args.task} needs a run trained for it (task.kind = '{trained}', e.g. "
                         f"{EXAMPLE_CONFIGS[trained]}); {args.run} has task.kind = '{kind}'")
    if trained is None and kind != "none":
        raise ValueError(f"edit {args.task} works on a model of images (task.kind = 'none'); {args.run} is a '{kind}' model, "
                         f"which needs its condition image: use `diffuse edit {edit_name(kind)} {args.run} ...`")
    if trained == "inpaint" and args.repaint_jumps != 1:
        raise ValueError(f"--repaint-jumps does nothing here: {args.run} was trained for inpainting and sees the mask "
                         "itself; leave it out")
    # every input is read and checked before the model loads
    side = d.image_size // cfg.task.factor if trained == "superres" else d.image_size
    source = args.reference if args.task == "ilvr" else args.image
    image, geometry = load_image(source, 1 if trained == "colorize" else d.channels, side)
    mask = load_mask(args.mask, geometry) if args.task == "inpaint" else None
    if args.task == "ilvr":
        tasks.low_pass(image, args.factor)  # a factor that does not divide the size fails here
    if args.task == "inpaint":
        tasks.editing.check_mask(mask, image)
    _, counted, kw, bar, latent_space = _sampling(args, args.n)
    batch = image.expand(args.n, *image.shape[1:]).to(kw["device"])
    if latent_space.latent:  # the editing tasks run on z = s E(x), their outputs decoded (tasks.editing.latent_edit)
        own = {"sdedit": lambda: dict(strength=args.strength),  # each task's own flags
               "ilvr": lambda: dict(factor=args.factor, options={"t_stop": args.t_stop}),
               "inpaint": lambda: dict(options={"jump_length": args.repaint_length, "jump_n_samples": args.repaint_jumps})}
        x = latent_edit(args.task, counted, latent_space, batch, mask, **own[args.task](), **kw)
        before = [image * mask] if args.task == "inpaint" else [image]
    elif trained is not None:
        g = torch.Generator(kw["device"]).manual_seed(args.seed + 1)  # the augmentation noise of a cascade's stage 2
        cond = input_condition(cfg.task, batch, d.image_size, counted.schedule, mask=mask, generator=g)
        x = generate(counted, args.n, (d.channels, d.image_size, d.image_size), **_with_condition(kw, cond))
        before = [viewable(cond["image"][:1], d.channels)]
    elif args.task == "sdedit":
        x = tasks.sdedit(counted, batch, args.strength, **kw)
        before = [image]
    elif args.task == "inpaint":
        x = tasks.inpaint(counted, batch, mask, jump_length=args.repaint_length, jump_n_samples=args.repaint_jumps, **kw)
        before = [image * mask]  # the region to generate shown as mid-grey (0 in [-1, 1])
    else:
        x = tasks.ilvr(counted, batch, args.factor, t_stop=args.t_stop, **kw)
        before = [image, tasks.low_pass(image, args.factor)]  # the reference and the low-pass the outputs share
    bar.close()
    if args.mean:  # samples of p(x | input) average towards E[x | input]: more PSNR, less detail (Blau & Michaeli 2018)
        x = x.mean(0, keepdim=True)
    _write(x, out)
    figure = out.with_name(out.stem + "_before_after.png")
    save_grid(torch.cat([b.to(x) for b in before] + [x]), figure, nrow=len(before) + len(x), scale=4)
    print(f"wrote {'the mean of ' if args.mean else ''}{args.n} {args.task} outputs to {out} and the input beside them to {figure} ({counted.calls} denoiser calls)")


def _eval(args) -> None:
    import dataclasses
    import datetime

    import torch

    from . import metrics
    from .checkpoint import read_json_records
    from .data import load_dataset
    from .precision import autocast_dtype
    from .guidance import Conditioned
    from .likelihood import check_likelihood, ode_bits_per_dim, vlb_bits_per_dim
    from .schedule import Schedule
    from .tasks.image_to_image import training_condition
    from .pretrained import is_model_folder
    from .stages import space
    from .generate import default_labels, generate_in_chunks
    from .runs import check_guidance, load_run, run_config
    from .kinds.diffusion import sample_config_kwargs
    from .visualize import to_uint8

    cfg = run_config(args.run)
    read_json_records(Path(args.run) / "eval.json")  # a broken eval.json fails now, not after the measurement
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.model.kind == "autoencoder":
        return _eval_autoencoder(args, cfg, device)
    if args.metric in (None, "recon"):
        raise ValueError(f"{args.run} is a diffusion run: pass --metric fid, kid, is, pr, nll or vlb (recon measures "
                         "autoencoder runs)")
    sample_metric = args.metric in ("fid", "kid", "is", "pr")
    _refuse_unused(args, args.sampler, metric=args.metric)
    least = {"kid": metrics.KID_MIN_IMAGES, "is": metrics.is_min_images(), "pr": 4}.get(args.metric, 2)
    if args.n < least:
        raise ValueError(f"--metric {args.metric} needs --n {least} or more, got {args.n}"
                         + {"kid": " (random subsets of half the images, at least 2 each)",
                            "is": " (10 splits of at least 2 images)", "pr": " (3 nearest neighbours besides each image)"}.get(args.metric, ""))
    if cfg.latent.autoencoder and args.metric in ("nll", "vlb"):
        raise ValueError(f"--metric {args.metric} of a latent-diffusion run would measure its latents, not images (the "
                         "decoder's likelihood is not part of the model); use --metric fid, kid, is or pr")
    if cfg.model.text_encoder and args.real is not None:
        raise ValueError("--real gives images without captions, and a text-conditional run needs captions to draw from; "
                         "leave --real out (the run's own captioned data are used)")
    if sample_metric:
        check_guidance(cfg, cfg.sample.guidance if args.guidance is None else args.guidance, classifier=False)
        _check_plan(args, cfg)  # the sampler on this process and its grid
    else:  # nll needs a variance-preserving process, vlb its discrete steps
        check_likelihood(Schedule.from_config(cfg.schedule), args.metric)
    cfg, den, num_classes = load_run(args.run, ema=not args.no_ema, device=device)
    latent_space = space(cfg, device)
    s, d = cfg.sample, cfg.data
    if args.real is not None:  # the run's own shape, the user's images
        d = dataclasses.replace(d, source="folder", path=args.real)
    elif is_model_folder(args.run) and args.metric != "is":  # IS reads no real images
        raise ValueError(f"{args.run} is a diffusers model folder, which names no data set; pass --real FOLDER, the real "
                         "images to compare with (e.g. the CIFAR-10 training images saved as PNG files)")
    if args.real is None and is_model_folder(args.run):
        pick, real = torch.zeros(0, dtype=torch.long), torch.zeros(0, d.channels, d.image_size, d.image_size)
    else:
        data = load_dataset(d)
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:args.n]
        real = torch.stack([data[int(i)][0] for i in pick])
        if cfg.model.text_encoder and args.real is None:  # a text model draws the captions of the real images it is compared with
            captions = [data.captions[int(pick[k % len(pick)])] for k in range(args.n)]
            task_text = {"text": den.net.text_encoder.tokenize(captions).to(device)}
            record_caption = "the captions of the real images"
    record: dict = {"metric": args.metric, "n": args.n, "n_real": len(real), "seed": args.seed,
                    "date": datetime.date.today().isoformat()}
    if cfg.model.text_encoder:
        record["condition"] = record_caption
    if len(real) < args.n and args.metric != "is":  # IS reads no real images
        if len(real) < least:
            raise ValueError(f"the run's dataset has {len(real)} images; --metric {args.metric} needs {least} or more")
        warnings.warn(f"the run's dataset has {len(real)} images, fewer than --n {args.n}: "
                      + (f"the metric compares {len(real)} real images with {args.n} samples, and its bias depends on "
                         "both counts, so compare it only with figures of the same counts (n_real, n_fake in eval.json)"
                         if args.metric in ("fid", "kid", "pr") else f"the figure is the mean over those {len(real)}"),
                      UserWarning, stacklevel=1)
    # a task model is measured given its input made from each real image: log p(x | y), samples of p(x | y)
    task_cond = {} if cfg.task.kind == "none" else training_condition(
        cfg.task, real.to(device), pick[:len(real)], den.schedule, level=cfg.task.aug_level if cfg.task.noise_aug_max > 0 else None)
    if task_cond:
        record["condition"] = f"task {cfg.task.kind}: the input made from each real image"
    if args.metric in ("nll", "vlb"):
        x0 = real.to(device)
        cond = dict(task_cond)
        if cfg.model.class_conditional and num_classes:  # the null label: log p(x), comparable with unconditional models
            cond["label"] = torch.full((len(x0),), num_classes, device=device)
            record["condition"] = "the null label (the unconditional density)" + (" and " + record["condition"] if task_cond else "")
        if args.metric == "nll":
            rtol = 1e-5 if args.rtol is None else args.rtol
            bpd, nfe = ode_bits_per_dim(Conditioned(den, **cond), x0, rtol=rtol, atol=rtol,
                                        generator=torch.Generator().manual_seed(args.seed))
            record.update(bits_per_dim=float(bpd.mean()), bits_per_dim_std=float(bpd.std()), nfe=nfe, rtol=rtol)
        else:
            out = vlb_bits_per_dim(den, x0, samples=args.vlb_samples, generator=torch.Generator().manual_seed(args.seed), **cond)
            record.update(bits_per_dim=float(out["total"].mean()), bits_per_dim_std=float(out["total"].std()),
                          prior_bits_per_dim=float(out["prior"].mean()), terms="all" if args.vlb_samples is None else args.vlb_samples)
    else:
        features = "digits" if args.features is None else args.features
        if features == "digits" and d.channels != 1:
            raise ValueError("the digit-classifier feature space is made for 1-channel digits and this run has "
                             f"data.channels = {d.channels}; pass --features inception:PATH (the FID Inception-v3 "
                             "weights file) or --features MODULE:ATTR (your own nn.Module)")
        net = metrics.feature_network(features, device=device)  # before sampling: a bad spec fails fast
        sampler = args.sampler or s.sampler
        steps = s.steps if args.steps is None else args.steps  # 0: every step, as in `diffuse sample`
        kw = {**sample_config_kwargs(s), "sampler": sampler, "steps": steps, "spacing": args.spacing or s.spacing}
        if args.guidance is not None:
            kw["guidance"] = args.guidance
        if args.guidance_interval is not None:
            kw["guidance_interval"] = args.guidance_interval or None
        if args.mixed_precision is not None:
            kw["mixed_precision"] = args.mixed_precision
        n_fake = len(real) if task_cond else args.n  # one sample per real image's input
        cond = task_cond or (task_text if cfg.model.text_encoder else None)
        fake = latent_space.decode(generate_in_chunks(
            den, n_fake, latent_space.shape, chunk=args.batch_size, seed=args.seed, device=device, cond=cond,
            labels=default_labels(n_fake, num_classes if cfg.model.class_conditional else 0), **kw))
        # rounded to 8 bits as the real images are, and as samples saved to PNG are in published FIDs
        fake = torch.from_numpy(to_uint8(fake)).permute(0, 3, 1, 2).float() / 127.5 - 1
        adaptive = SAMPLERS[sampler].calls_per_step == 0
        amp = autocast_dtype(kw["mixed_precision"], device)  # what the network ran in: float32 unless autocast
        record.update(n_fake=len(fake), sampler=sampler, steps="adaptive" if adaptive else steps or getattr(den.schedule, "top_step", None),
                      spacing="adaptive" if adaptive else kw["spacing"], mixed_precision=kw["mixed_precision"],
                      precision=str(amp or torch.float32).removeprefix("torch."), features=features)
        if args.metric == "fid":
            record["fid"] = metrics.fid(real, fake, net)
        elif args.metric == "kid":
            record["kid"], record["kid_std"] = metrics.kid(real, fake, net)
            record["kid_subset_size"] = metrics.kid_subset_size(len(real), len(fake))
        elif args.metric == "is":
            record["inception_score"], record["inception_score_std"] = metrics.inception_score(fake, net)
        else:
            record["precision"], record["recall"] = metrics.precision_recall(real, fake, net)
    _report(record, Path(args.run) / "eval.json")


def _report(record: dict, path: Path) -> None:
    """Print an eval record and append it to the run's eval.json, rewritten atomically (checkpoint.append_json_record):
    a failed write (a full disk, a kill) leaves every earlier record in place."""
    from .checkpoint import append_json_record

    for k, v in record.items():
        print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")
    append_json_record(path, record)
    print(f"appended to {path}")


def _eval_autoencoder(args, cfg, device) -> None:
    """`diffuse eval AE_RUN`: reconstruction PSNR, rFID and codebook statistics on the held-out images
    (kinds.autoencoder.evaluate_autoencoder), printed and appended to RUN/eval.json."""
    import datetime

    from .kinds.autoencoder import evaluate_autoencoder

    sampling = [f for f in ("sampler", "steps", "spacing", "guidance", "guidance_interval", "mixed_precision", "real", "rtol",
                            "vlb_samples")
                if getattr(args, f, None) is not None]
    if sampling or args.no_ema or args.metric not in (None, "recon"):
        flags = ", ".join(f"--{f.replace('_', '-')}" for f in sampling) or ("--no-ema" if args.no_ema else f"--metric {args.metric}")
        raise ValueError(f"{flags} does nothing for an autoencoder run: `diffuse eval` measures its reconstructions of the "
                         "held-out images (PSNR, rFID, codebook usage); leave it out")
    record = {**evaluate_autoencoder(args.run, args.features, device), "date": datetime.date.today().isoformat()}
    _report(record, Path(args.run) / "eval.json")


def _refuse_unused(args, sampler: str | None, metric: str | None = None) -> None:
    """Flags that would do nothing under the chosen sampler or metric are errors, not silently dropped."""
    given = lambda flag: getattr(args, flag, None) is not None  # noqa: E731
    unused = []
    if sampler is not None and SAMPLERS[sampler].calls_per_step == 0:
        unused += [(f, f"{sampler} chooses its own steps (set its tolerance with --opt rtol=...)") for f in ("steps", "spacing")]
    if metric in ("nll", "vlb"):
        unused += [(f, f"--metric {metric} measures real images and draws no samples")
                   for f in ("sampler", "steps", "spacing", "guidance", "guidance_interval", "mixed_precision", "features")]
    if metric is not None and metric != "nll":
        unused.append(("rtol", "only --metric nll solves an ODE"))
    if metric is not None and metric != "vlb":
        unused.append(("vlb_samples", "only --metric vlb sums bound terms"))
    for flag, why in unused:
        if given(flag):
            raise ValueError(f"--{flag.replace('_', '-')} does nothing here: {why}; leave it out")


def _ema(args) -> None:
    from .runs import write_run

    out = write_run(args.run, args.sigma_rel, args.out, step=args.step)
    print(f"wrote the post-hoc EMA with sigma_rel = {args.sigma_rel:g} to {out}; sample it with `diffuse sample {out} ...`")


def _serve(args) -> None:
    from .webui import serve

    serve(args.runs, host=args.host, port=args.port, device=args.device)


def _demo(args) -> None:
    from .demo import run_demo

    paths = run_demo(args.out, time_limit=args.time_limit)
    print("demo figures:")
    for name, path in paths.items():
        print(f"  {name:20s} {path}")


SEED = number(int, low=0, high=2**63 - 1)


def device_arg(text: str) -> str:
    """An argparse `type` for --device: a torch device string that exists on this machine."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda was asked for but this machine has no CUDA device; use cpu")
    return text


MIXED_PRECISION_HELP = ("the network under autocast while sampling (the sampler steps in float32): auto (bf16 on GPUs and "
                        "CPUs with native bf16: AMX, AVX512-BF16), no (float32), bf16, fp16 (CUDA); default: the run's "
                        "sample.mixed_precision")


def _sampling_flags(s: argparse.ArgumentParser) -> None:
    """The flags of `sample` and `edit`: sampler, grid, options, class and guidance, thresholding, seed, weights, device, out."""
    s.add_argument("--sampler", choices=list(SAMPLERS), metavar="NAME",
                   help="default: the run's sample.sampler; one of: " + "; ".join(f"{k} ({v.about})" for k, v in SAMPLERS.items()))
    s.add_argument("--steps", type=number(int, low=0), help="grid steps (default: the run's sample.steps; 0 = every one of the T steps)")
    s.add_argument("--spacing", choices=list(SPACINGS), help="timestep spacing (default: the run's)")
    s.add_argument("--eta", type=number(low=0, high=100), help="DDIM / Euler-ancestral eta (default: the run's sample.eta)")
    s.add_argument("--opt", action="append", metavar="KEY=VALUE", help="a sampler option, e.g. s_churn=10 for heun (repeatable)")
    s.add_argument("--label", type=number(int, low=0), help="draw this class (class-conditional model or --classifier); default: all classes in turn")
    s.add_argument("--guidance", type=number(low=0), help="guidance weight: classifier-free w, or the classifier scale with --classifier")
    s.add_argument("--guidance-interval", type=guidance_interval, metavar="LO,HI",
                   help="classifier-free guidance only at noise levels sigma/alpha in (LO, HI] (Kynkaanniemi et al. 2024; "
                        "e.g. 0.3,5); all: every level (default: the run's sample.guidance_interval)")
    s.add_argument("--classifier", metavar="RUN", help="a noisy-classifier run (model.kind = 'classifier') for classifier guidance")
    s.add_argument("--prompt", help='the caption to draw, for a text-conditional run (model.text_encoder), e.g. "a red circle '
                                    'above a blue square"')
    s.add_argument("--negative-prompt", metavar="TEXT", help="guide away from this caption instead of the empty one (needs "
                                                             "--prompt and guidance > 0)")
    s.add_argument("--threshold", help="x_0 thresholding: static (clip to [-1, 1]), none, or dynamic:P (Imagen, e.g. dynamic:0.995)")
    s.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], help=MIXED_PRECISION_HELP)
    s.add_argument("--seed", type=SEED, default=0)
    s.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--device", type=device_arg, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--out", required=True, help="FILE.png (grid) or FILE.npy (array (N, C, H, W) in [0, 1])")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffuse", description="Denoising diffusion models: train, sample, demo.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a TOML config into a run folder (resumes an existing one)")
    t.add_argument("config", help="TOML config, e.g. configs/mnist.toml or RUN/config.toml")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.lr=1e-4 (repeatable)")
    t.add_argument("--out", required=True, help="run folder (created, or resumed if it holds a run)")
    t.add_argument("--inexact-resume", action="store_true", help="resume from the weights even if training state is missing or the config changed")
    t.add_argument("--dry-run", action="store_true",
                   help="print the parameter count, FLOPs per image and peak memory of one training step, then stop "
                        "(nothing is written to --out)")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run", help="run folder written by `diffuse train`")
    s.add_argument("--n", type=number(int, low=1), default=64, help="number of samples (default 64)")
    s.add_argument("--batch-size", type=number(int, low=1), default=CHUNK,
                   help=f"draw in chunks of this many (default {CHUNK}, fast on CPUs); chunk k > 0 has its own seed from (--seed, k)")
    _sampling_flags(s)
    s.set_defaults(func=_sample)

    ed = sub.add_parser("edit", help="edit an image with a trained run, without training: sdedit, inpaint (RePaint), ilvr")
    tasks_sub = ed.add_subparsers(dest="task", required=True)
    about = {"sdedit": "SDEdit (Meng et al. 2022): noise a guide image (a sketch, strokes) to --strength, then denoise",
             "inpaint": "fill the white region of --mask, keep the rest (RePaint, Lugmayr et al. 2022; or a Palette "
                        "inpainting run's own network)",
             "ilvr": "samples that share the --factor x --factor block means of --reference (ILVR, Choi et al. 2021)",
             "superres": "a super-resolution run (SR3, task.kind = 'superres'): --image is the low-resolution input",
             "colorize": "a colorization run (Palette, task.kind = 'colorize'): --image is made grayscale and coloured",
             "uncrop": "an uncropping run (Palette, task.kind = 'uncrop'): the border of --image is generated",
             "restore": "a JPEG-restoration run (Palette, task.kind = 'jpeg'): --image is the compressed input"}
    for task, text in about.items():
        tp = tasks_sub.add_parser(task, help=text, description=text)
        tp.add_argument("run", help="run folder written by `diffuse train`")
        if task == "ilvr":
            tp.add_argument("--reference", required=True, help="reference image (resized to the model's size with a note)")
            tp.add_argument("--factor", type=number(int, low=1), required=True, help="downsampling factor N of the low-pass filter; must divide the image size")
            tp.add_argument("--t-stop", type=number(low=0, high=1), default=0.0, help="condition only while t >= this (0: every step)")
        else:
            tp.add_argument("--image", required=True, help="input image (resized to the model's size with a note)")
        if task == "sdedit":
            tp.add_argument("--strength", type=number(low=0, high=1), required=True, help="in [0, 1]: " + STRENGTH_HELP)
        if task == "inpaint":
            tp.add_argument("--mask", required=True, help="mask image of the same size as --image: white = generate, black = keep")
            tp.add_argument("--repaint-jumps", type=number(int, low=1, high=100), default=1,
                            help="RePaint's resamplings r per jump point (1: plain replacement; the paper: 10; costs ~r times the steps)")
            tp.add_argument("--repaint-length", type=number(int, low=1), default=10, help="RePaint's jump length in grid steps (the paper: 10)")
        tp.add_argument("--n", type=number(int, low=1), default=8, help="outputs of the one input (default 8)")
        tp.add_argument("--mean", action="store_true",
                        help="write the mean of the --n outputs, an estimate of E[x | input]: higher PSNR, less detail "
                             "(JPEG restoration: 4 samples beat the input's PSNR where one does not, bench/RESULTS.md)")
        _sampling_flags(tp)
        tp.set_defaults(func=_edit)

    e = sub.add_parser("eval", help="evaluate a run: sample quality (fid, kid, is, pr) or likelihood (nll, vlb), in bits/dim")
    e.add_argument("run", help="run folder written by `diffuse train`")
    e.add_argument("--metric", choices=["fid", "kid", "is", "pr", "nll", "vlb", "recon"],
                   help="fid / kid / is / pr of --n samples against --n real images (in the --features space); "
                        "nll: probability-flow ODE bits/dim of --n real images; vlb: the variational bound in bits/dim; "
                        "recon (the only one, and the default, for an autoencoder run): PSNR, rFID and codebook usage of "
                        "the held-out images' reconstructions")
    e.add_argument("--features", metavar="NET",
                   help="feature network of fid/kid/is/pr: digits (default; the cached digit classifier), "
                        "inception:PATH (the standard FID Inception-v3 from a local weights file, "
                        "pt_inception-2015-12-05-6726825d.pth; PATH defaults to $DIFFUSE_INCEPTION_WEIGHTS), "
                        "or MODULE:ATTR / FILE.py:ATTR (your nn.Module, or a function returning one)")
    e.add_argument("--n", type=number(int, low=2), default=1000, help="images (default 1000)")
    e.add_argument("--real", metavar="FOLDER",
                   help="the real images to compare with or to measure (default: the run's data set; a diffusers model "
                        "folder needs it), fitted to the run's image size and channels")
    e.add_argument("--batch-size", type=number(int, low=1), default=CHUNK,
                   help=f"draw the samples in chunks of this many (default {CHUNK}); chunk k > 0 has its own seed from (--seed, k)")
    e.add_argument("--sampler", choices=list(SAMPLERS), metavar="NAME", help="sampler for fid/kid/is/pr (default: the run's)")
    e.add_argument("--steps", type=number(int, low=0), help="sampler steps (default: the run's; 0 = every one of the T steps)")
    e.add_argument("--spacing", choices=list(SPACINGS))
    e.add_argument("--guidance", type=number(low=0), help="classifier-free guidance weight (default: the run's)")
    e.add_argument("--guidance-interval", type=guidance_interval, metavar="LO,HI",
                   help="guide only at noise levels sigma/alpha in (LO, HI]; all: every level (default: the run's)")
    e.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], help="fid/kid/is/pr: " + MIXED_PRECISION_HELP)
    e.add_argument("--rtol", type=number(low=0, above=True, high=1), help="nll: the ODE solver's tolerance (default 1e-5)")
    e.add_argument("--vlb-samples", type=number(int, low=1), help="vlb: estimate from this many random steps (default: all T terms)")
    e.add_argument("--seed", type=SEED, default=0)
    e.add_argument("--no-ema", action="store_true")
    e.add_argument("--device", type=device_arg, help="cpu or cuda (default: cuda if available)")
    e.set_defaults(func=_eval)

    m = sub.add_parser("ema", help="rebuild an EMA of any length from a run's post-hoc EMA snapshots (EDM2) into a run folder")
    m.add_argument("run", help="run folder trained with train.posthoc_ema (it holds RUN/ema_snapshots)")
    m.add_argument("--sigma-rel", type=number(low=0, above=True, high=0.3), required=True,
                   help="the EMA length as a fraction of training, e.g. 0.05 (EDM2's best are 0.05-0.15)")
    m.add_argument("--step", type=number(int, low=1), help="rebuild the EMA at this snapshot's step (default: the last)")
    m.add_argument("--out", required=True, help="output run folder, e.g. RUN/ema_005; `diffuse sample` and `eval` read it")
    m.set_defaults(func=_ema)

    w = sub.add_parser("serve", help="a local web page to sample, edit and inspect runs (Gradio; the [ui] extra)")
    w.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or diffusers model folders) to offer")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=number(int, low=1, high=65535), default=7860, help="port (default 7860)")
    w.add_argument("--device", type=device_arg, help="cpu or cuda (default: cuda if available)")
    w.set_defaults(func=_serve)

    d = sub.add_parser("demo", help="train on the bundled MNIST digits (~10 min on a 2-core CPU) and write figures")
    d.add_argument("--out", default="demo", help="output folder (default ./demo)")
    d.add_argument("--time-limit", type=number(low=0),
                   help="seconds of training (default: the demo config's 480; 0 = no limit, as train.time_limit = 0)")
    d.set_defaults(func=_demo)
    return p


def _end_progress_bars() -> None:
    """Close every progress bar still drawn, so that an error raised mid-way prints on a line of its own, not on the
    bar's."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    formatwarning = warnings.formatwarning  # warnings print as "diffuse CMD: warning: ...", like the errors
    warnings.formatwarning = lambda message, *_, **__: f"diffuse {args.command}: warning: {message}\n"
    try:
        args.func(args)
    except (ConfigError, ValueError, OSError, ImportError, NonFiniteLoss, ResumeError) as e:  # OSError: missing, unreadable,
        # unwritable; ImportError: an optional extra (its message names the install command)
        _end_progress_bars()
        print(f"diffuse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OverflowError as e:
        _end_progress_bars()
        print(f"diffuse {args.command}: error: a value overflowed ({e}); use smaller option values", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_progress_bars()
        print(f"diffuse {args.command}: interrupted; the last committed checkpoint is kept", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
    return 0


if __name__ == "__main__":
    sys.exit(main())
