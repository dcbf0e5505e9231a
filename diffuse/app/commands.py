"""What each `diffuse` command does once its flags are parsed (cli.py parses them and imports this module only then,
so `diffuse --help` and a mistyped flag answer without loading it). `sample` and `edit` are requests
(app/requests.py): built from the flags, resolved, executed, written; `segment` writes what app/segment.py makes."""

from __future__ import annotations

import dataclasses
import datetime
import warnings
from pathlib import Path

import tomli_w
import torch
from safetensors.torch import save
from tqdm import tqdm

from .. import metrics, speed
from ..checkpoint import append_json_record, read_json_records, write_atomically
from ..config import apply_overrides, check_unused, config_path, config_summary, load_config, packaged_configs, to_dict
from ..data import load_dataset, load_image
from ..data.segmentation import load_folder
from .demo import run_demo
from .toy import run_toy_demo
from ..generate import default_labels, generate_in_chunks
from ..guidance import Conditioned
from ..kinds import ignored_sections, unused_rows
from ..kinds.clip import evaluate_run as evaluate_clip
from ..kinds.unclip import evaluate_run as evaluate_prior
from ..kinds.diffusion import sample_config_kwargs
from ..kinds.segmentation import SegmentationRun
from ..likelihood import check_likelihood, ode_bits_per_dim, vlb_bits_per_dim
from ..precision import autocast_dtype
from ..export import export_diffusers
from ..runs import check_guidance, check_kind, evaluate_autoencoder, load_run, locate, open_run, write_run
from ..samplers import SAMPLERS, check_plan
from ..schedule import Schedule
from ..stages import space
from ..tasks.image_to_image import training_condition
from ..train import digit_classifier_folder, dry_run, feature_network, progress_disabled, train
from ..visualize import save_image, save_samples, save_video, to_uint8
from .webui import Limits, read_auth, serve
from .requests import EditRequest, Plan, SampleRequest, execute, resolve, save_before_after, video_sheet
from .segment import Segmented, check_segmenter, output_paths


def train_command(args) -> None:
    cfg = apply_overrides(load_config(args.config), args.set or [])
    if args.dry_run:
        print(dry_run(cfg))
        return
    run = train(cfg, args.out, inexact_resume=args.inexact_resume)
    print(f"run folder: {run}")


VIDEO_OUT = (".gif", ".mp4")  # what a video run writes (visualize.save_video), with its contact sheet beside


def check_out(out: Path) -> None:
    if out.suffix not in (".png", ".npy", *VIDEO_OUT):
        raise ValueError(f"--out must end in .png (an image grid) or .npy (an array of shape (N, C, H, W) in [0, 1]); a video "
                         f"run's in .gif or .mp4; got {out}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name a file in it, e.g. {out / 'samples.png'}")


def check_video_out(out: Path, plan: Plan) -> None:
    """A video plan (a video run's) writes .gif, .mp4 or .npy; any other plan .png or .npy. ValueError naming the fix."""
    video = bool(plan.model_frames)
    if video and out.suffix == ".png":
        raise ValueError(f"--out {out}: {plan.request.run} is a video run; write {out.with_suffix('.gif')} (or .mp4, or .npy "
                         "for the array); the contact sheet PNG is written beside it")
    if not video and out.suffix in VIDEO_OUT:
        raise ValueError(f"--out {out}: {plan.request.run} draws images, not videos; write {out.with_suffix('.png')} or .npy")


def write_video(x: torch.Tensor, out: Path, before: list[torch.Tensor] = (), observed: torch.Tensor | None = None) -> str:
    """Videos x (N, C, F, H, W) in [-1, 1] written as OUT (.gif or .mp4: the N tiled in every frame; .npy: the array in
    [0, 1]) with the contact sheet OUT.png beside a .gif or .mp4 (rows: `before`, then each video; given frames, observed
    (F,) bool, framed in red). Returns what was written, for the message."""
    if out.suffix == ".npy":
        save_samples(x, out)
        return str(out)
    save_video(x, out)
    sheet = out.with_suffix(".png")
    save_image(video_sheet(torch.cat([b.to(x) for b in before] + [x]), observed), sheet)
    return f"{out} and its contact sheet {sheet}"


class Progress:
    """A progress bar per stage that draws (`execute`'s on_stage), moved by every sampler step; closed before the
    output is written."""

    def __init__(self):
        self.bar = None

    def stage(self, plan: Plan, total: int | None) -> None:
        self.close()
        self.bar = tqdm(total=total, unit="step", desc=plan.generate_kw["sampler"], disable=progress_disabled())

    def step(self, step) -> None:
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def sample_command(args) -> None:
    """`diffuse sample RUN`: n samples of a run, or of a cascade folder's stages, written as OUT."""
    out = Path(args.out)
    check_out(out)
    args.run = locate(args.run, args.revision)  # a Hugging Face model id: its snapshot in the cache
    plan = resolve(SampleRequest.from_args(args))  # every flag checked before a model loads
    check_video_out(out, plan)
    progress = Progress()
    result = execute(plan, progress.step, on_stage=progress.stage)
    progress.close()
    if plan.model_frames:
        scheme = f", by the {args.scheme} scheme" if getattr(args, "scheme", None) else ""
        print(f"wrote {args.n} videos of {plan.shape[1]} frames{scheme} to {write_video(result.x, out)} "
              f"({result.calls} denoiser calls)")
        return
    save_samples(result.x, out)  # atomically: a failed write leaves an earlier OUT as it was
    what = f"samples of the {len(plan.stages)}-stage cascade {args.run}" if plan.stages else "samples"
    if plan.prior is not None:  # an unCLIP pipeline folder: its prior's embeddings of the prompt, then its decoder
        what = f"images of {args.prompt!r} by the unCLIP pipeline {args.run} (prior {plan.prior.path}, decoder {plan.run.path})"
    req = plan.request
    guided = "" if req.clip_run is None else (f", guided by the CLIP {req.clip_run} towards {req.prompt!r} at scale "
                                              f"{req.clip_scale:g}")
    print(f"wrote {args.n} {what} to {out}{guided} ({result.calls} denoiser calls)")


def edit_command(args) -> None:
    """`diffuse edit TASK RUN ...`: n outputs for one input image, written as OUT with a before/after figure beside it
    (OUT's name + _before_after.png). sdedit, ilvr and inpaint work with any model of images (tasks/editing.py);
    superres, colorize, uncrop and restore need a run trained for that task (tasks/image_to_image.py), and inpaint
    uses an inpainting-trained run's own network when given one."""
    out = Path(args.out)
    if args.task == "invert":
        if out.suffix != ".safetensors" or out.is_dir():
            raise ValueError(f"--out of edit invert is the file x_T is written to, NAME.safetensors; got {out}")
    else:
        check_out(out)
    args.run = locate(args.run, args.revision)
    plan = resolve(EditRequest.from_args(args))  # the input image and mask read and checked before a model loads
    check_video_out(out, plan)
    progress = Progress()
    result = execute(plan, progress.step, on_stage=progress.stage)
    progress.close()
    if plan.model_frames:
        given = "" if plan.observed is None else ",".join(str(i) for i in plan.observed.nonzero()[:, 0].tolist())
        how = f"{plan.method}, frames {given} given" if plan.observed is not None else f"strength {args.strength:g}"
        print(f"wrote {args.n} {args.task} outputs ({how}) to "
              f"{write_video(result.x, out, result.before, plan.observed)} ({result.calls} denoiser calls)")
        return
    if args.task == "invert":
        return _write_inverted(plan, result, out)
    save_samples(result.x, out)
    figure = out.with_name(out.stem + "_before_after.png")
    save_before_after(result, figure)
    mean = "the mean of " if getattr(args, "mean", False) else ""
    print(f"wrote {mean}{args.n} {args.task} outputs to {out} and the input beside them to {figure} ({result.calls} "
          "denoiser calls)")


def _write_inverted(plan: Plan, result, out: Path) -> None:
    """`diffuse edit invert`: x_T (1, C, H, W) to OUT.safetensors with the grid it was inverted on (its steps, spacing and
    the run's step as metadata); with --reconstruct the rendering OUT.png and OUT_before_after.png beside it."""
    req, kw = plan.request, plan.generate_kw
    meta = {"run": str(plan.run.path), "step": str(plan.run.step), "encode_steps": str(req.encode_steps),
            "spacing": str(kw["spacing"] or "default"), "refine": str(req.refine),
            "image": str(req.image)}
    write_atomically(out, save({"x_T": result.x_T.contiguous()}, metadata=meta))
    line = f"wrote x_T {tuple(result.x_T.shape)} of {req.image} to {out} ({result.calls} denoiser calls)"
    if req.reconstruct:
        png = out.with_suffix(".png")
        save_samples(result.x, png)
        figure = out.with_name(out.stem + "_before_after.png")
        save_before_after(result, figure)
        err = float((result.x.cpu() - result.before[0].cpu()).abs().mean())
        line += f", its reconstruction to {png} (mean |error| {err:.4f} in [-1, 1]) and both to {figure}"
    print(line)


def segment_command(args) -> None:
    """`diffuse segment RUN --image IMG ... --out MASK.png|FOLDER`: each image's labels by a segmentation run, written
    as a palette PNG of class indices at the model's size with its overlay figure beside it (app/segment.py), and a
    line per image: the classes found, their share of the pixels and the mean uncertainty. --out, the run's kind and
    every image are checked before the model loads, so a bad one writes nothing."""
    paths = output_paths(args.image, Path(args.out))
    run = open_run(args.run)  # a folder that is not a run fails here, naming the fix
    check_segmenter(run)
    d = run.cfg.data
    x = torch.cat([load_image(image, d.channels, d.image_size)[0] for image in args.image])  # (B, C, S, S); fitted, noted
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = SegmentationRun(args.run, device, feature_network=feature_network)
    labels, uncertainty = model.segment(x)
    for k, (image, (mask, overlay)) in enumerate(zip(args.image, paths)):
        result = Segmented(x[k], labels[k], uncertainty[k], model.class_names)
        result.write(mask, overlay)
        print(f"{image}: {result.summary()} -> {mask}, {overlay}")


def eval_command(args) -> None:
    """`diffuse eval RUN`: a sample-quality metric (fid, kid, is, pr) or a likelihood (nll, vlb, in bits/dim) of a
    diffusion run, an autoencoder run's reconstructions, or a segmentation run's mIoU; printed and appended to
    RUN/eval.json."""
    args.run = locate(args.run, args.revision)
    run = open_run(args.run)  # what the run can measure, said once (runs.Capabilities)
    cfg, can = run.cfg, run.capabilities
    if can.video:
        raise ValueError(f"{args.run} is a video run: `diffuse eval`'s metrics measure images, not videos. A video run "
                         f"draws videos (`diffuse sample {args.run} --frames N --out V.gif`) and edits them (`diffuse edit "
                         "predict|interpolate RUN --video IN.gif --given 0,1`); its training FID is per frame "
                         "(train.fid_every)")
    read_json_records(Path(args.run) / "eval.json")  # a broken eval.json fails now, not after the measurement
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if run.kind == "clip":
        return _eval_clip(args, can.metrics, device)
    if run.kind == "unclip_prior":
        return _eval_prior(args, can.metrics, device)
    if "recon" in can.metrics:
        return _eval_autoencoder(args, cfg, device, run.step)
    if "miou" in can.metrics:
        return _eval_segmenter(args, can.metrics, device)
    if run.kind == "diffae_prior":
        return _eval_pair(args, run, device)
    if run.kind == "diffae":
        raise ValueError(f"{args.run} is a diffusion autoencoder, which samples through its latent DDIM: measure that run "
                         "(`diffuse eval PRIOR --metric fid`); bench/diffae.py measures its reconstructions")
    check_kind(args.run, cfg, "denoiser")  # a noisy classifier has no metric of its own
    if args.metric in (None, "recon", "miou"):
        raise ValueError(f"{args.run} is a diffusion run: pass --metric {_either(can.metrics)} (recon measures "
                         "autoencoder runs, miou segmentation runs)")
    sample_metric = args.metric in ("fid", "kid", "is", "pr")
    _refuse_unused(args, args.sampler, metric=args.metric)
    least = {"kid": metrics.KID_MIN_IMAGES, "is": metrics.is_min_images(), "pr": 4}.get(args.metric, 2)
    if args.n < least:
        raise ValueError(f"--metric {args.metric} needs --n {least} or more, got {args.n}"
                         + {"kid": " (random subsets of half the images, at least 2 each)",
                            "is": " (10 splits of at least 2 images)", "pr": " (3 nearest neighbours besides each image)"}.get(args.metric, ""))
    if can.latent and args.metric in ("nll", "vlb"):
        raise ValueError(f"--metric {args.metric} of a latent-diffusion run would measure its latents, not images (the "
                         "decoder's likelihood is not part of the model); use --metric fid, kid, is or pr")
    if can.text and args.real is not None:
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
    elif run.diffusers and args.metric != "is":  # IS reads no real images
        raise ValueError(f"{args.run} is a diffusers model folder, which names no data set; pass --real FOLDER, the real "
                         "images to compare with (e.g. the CIFAR-10 training images saved as PNG files)")
    if args.real is None and run.diffusers:
        pick, real = torch.zeros(0, dtype=torch.long), torch.zeros(0, d.channels, d.image_size, d.image_size)
    else:
        data = load_dataset(d)
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:args.n]
        real = torch.stack([data[int(i)][0] for i in pick])
        if can.text and args.real is None:  # a text model draws the captions of the real images it is compared with
            captions = [data.captions[int(pick[k % len(pick)])] for k in range(args.n)]
            task_text = {"text": den.net.text_encoder.tokenize(captions).to(device)}
    # what changes the number: the run's step and the draws (seed, counts) here; how the samples were drawn below
    record: dict = {"metric": args.metric, "step": run.step, "n": args.n, "n_real": len(real), "seed": args.seed,
                    "prompts": _prompt_set(can.text, args.real is None), "date": datetime.date.today().isoformat()}
    if len(real) < args.n and args.metric != "is":  # IS reads no real images
        if len(real) < least:
            raise ValueError(f"the run's dataset has {len(real)} images; --metric {args.metric} needs {least} or more")
        warnings.warn(f"the run's dataset has {len(real)} images, fewer than --n {args.n}: "
                      + (f"the metric compares {len(real)} real images with {args.n} samples, and its bias depends on "
                         "both counts, so compare it only with figures of the same counts (n_real, n_fake in eval.json)"
                         if args.metric in ("fid", "kid", "pr") else f"the figure is the mean over those {len(real)}"),
                      UserWarning, stacklevel=1)
    # a task model is measured given its input made from each real image: log p(x | y), samples of p(x | y)
    task_cond = {} if can.trained_task == "none" else training_condition(
        cfg.task, real.to(device), pick[:len(real)], den.schedule, level=cfg.task.aug_level if cfg.task.noise_aug_max > 0 else None)
    if task_cond:
        record["condition"] = f"task {cfg.task.kind}: the input made from each real image"
    if args.metric in ("nll", "vlb"):
        x0 = real.to(device)
        cond = dict(task_cond)
        if can.classes:  # the null label: log p(x), comparable with unconditional models
            cond["label"] = torch.full((len(x0),), num_classes, device=device)
            record["condition"] = "the null label (the unconditional density)" + (" and " + record["condition"] if task_cond else "")
        record.update(labels="the null label" if can.classes else "none (not class-conditional)", dtype="float32")
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
        net = feature_network(features, device=device)  # before sampling: a bad spec fails fast
        sampler = args.sampler or s.sampler
        steps = s.steps if args.steps is None else args.steps  # 0: every step, as in `diffuse sample`
        kw = {**sample_config_kwargs(s), "sampler": sampler, "steps": steps, "spacing": args.spacing or s.spacing}
        if args.guidance is not None:
            kw["guidance"] = args.guidance
        if args.guidance_interval is not None:
            kw["guidance_interval"] = args.guidance_interval or None
        if args.mixed_precision is not None:
            kw["mixed_precision"] = args.mixed_precision
        compiled = speed.wanted(getattr(args, "compile", None) or s.compile, device, "--compile")
        if compiled:  # 50,000 samples repay the compile many times over
            speed.compile_network(den.net, device, sampling=True)
        n_fake = len(real) if task_cond else args.n  # one sample per real image's input
        cond = task_cond or (task_text if can.text else None)
        adaptive = SAMPLERS[sampler].calls_per_step == 0
        grid_steps = None if adaptive else steps or getattr(den.schedule, "top_step", None)
        chunks = -(-n_fake // (args.batch_size or n_fake))
        bar = _bar(f"sampling ({sampler})", grid_steps and grid_steps * chunks, "step")
        fake = latent_space.decode(generate_in_chunks(
            den, n_fake, latent_space.shape, chunk=args.batch_size, seed=args.seed, device=device, cond=cond,
            labels=default_labels(n_fake, can.classes), callback=lambda step: bar.update(1), **kw))
        bar.close()
        # rounded to 8 bits as the real images are, and as samples saved to PNG are in published FIDs
        fake = torch.from_numpy(to_uint8(fake)).permute(0, 3, 1, 2).float() / 127.5 - 1
        amp = autocast_dtype(kw["mixed_precision"], device)  # what the network ran in: float32 unless autocast
        record.update(n_fake=len(fake), sampler=sampler, steps="adaptive" if adaptive else grid_steps,
                      spacing="adaptive" if adaptive else kw["spacing"], guidance=kw["guidance"],
                      guidance_interval=list(kw["guidance_interval"] or []),
                      labels=_label_policy(can.classes, bool(task_cond)), mixed_precision=kw["mixed_precision"], compiled=compiled,
                      dtype=str(amp or torch.float32).removeprefix("torch."), **_feature_space(features))
        _measure(record, args.metric, real, fake, net)
    _report(record, Path(args.run) / "eval.json")


def _bar(desc: str, total: int | None, unit: str) -> tqdm:
    """A progress bar of `diffuse eval` or `ema` (silenced as every bar is: TQDM_DISABLE, train.progress_disabled)."""
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=progress_disabled())


def _measure(record: dict, metric: str, real: torch.Tensor, fake: torch.Tensor, net) -> None:
    """A sample metric of `fake` against `real` in `net`'s feature space, added to `record`; a progress bar over the
    images of the feature pass."""
    bar = _bar("features", len(fake) if metric == "is" else len(real) + len(fake), "image")
    if metric == "fid":
        record["fid"] = metrics.fid(real, fake, net, on_batch=bar.update)
    elif metric == "kid":
        record["kid"], record["kid_std"] = metrics.kid(real, fake, net, on_batch=bar.update)
        record["kid_subset_size"] = metrics.kid_subset_size(len(real), len(fake))
    elif metric == "is":
        record["inception_score"], record["inception_score_std"] = metrics.inception_score(fake, net, on_batch=bar.update)
    else:
        record["precision"], record["recall"] = metrics.precision_recall(real, fake, net, on_batch=bar.update)
    bar.close()


def _label_policy(classes: int, task: bool = False) -> str:
    """eval.json's `labels`: which labels the samples were drawn with (generate.default_labels)."""
    if not classes:
        return "none (" + ("a task model, given each real image's input" if task else "not class-conditional") + ")"
    return f"classes 0-{classes - 1} in turn"


def _prompt_set(text: bool, own_data: bool) -> str:
    """eval.json's `prompts`: the captions a text-conditional run's samples were drawn with."""
    return "the captions of the real images picked by --seed" if text and own_data else "none (not text-conditional)"


def _feature_space(features: str) -> dict:
    """eval.json's feature network: the --features spec, and for the digit classifier its cached run's name (its
    version and the hash of its layers and recipe: another name, another feature space)."""
    return {"features": features, **({"feature_network": digit_classifier_folder().name} if features == "digits" else {})}


def _eval_pair(args, run, device) -> None:
    """`diffuse eval PRIOR --metric fid|kid|is|pr`: a diffusion autoencoder's unconditional samples (its latent DDIM's
    codes, decoded: `diffuse sample PRIOR`, the sampling flags applying to the decoder) against its data's images (or
    --real), printed and appended to PRIOR/eval.json."""
    if args.metric not in ("fid", "kid", "is", "pr"):
        raise ValueError(f"{args.run} is a diffusion autoencoder's latent DDIM: pass --metric fid, kid, is or pr (its "
                         "decoded samples against real images)")
    for flag in ("guidance", "guidance_interval", "rtol", "vlb_samples"):
        if getattr(args, flag, None) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} does nothing here: the latent DDIM draws unconditional codes; "
                             "leave it out")
    decoder = open_run(run.cfg.semantic.run)
    d = decoder.cfg.data if args.real is None else dataclasses.replace(decoder.cfg.data, source="folder", path=args.real)
    features = "digits" if args.features is None else args.features
    net = feature_network(features, device=device)
    data = load_dataset(d)
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:args.n]
    real = data.batch(pick)[0]
    plan = resolve(SampleRequest(run=args.run, n=args.n, seed=args.seed, batch_size=args.batch_size, sampler=args.sampler,
                                 steps=args.steps, spacing=args.spacing, mixed_precision=args.mixed_precision,
                                 ema=not args.no_ema, device=device))
    progress = Progress()
    fake = execute(plan, progress.step, on_stage=progress.stage).x
    progress.close()
    fake = torch.from_numpy(to_uint8(fake)).permute(0, 3, 1, 2).float() / 127.5 - 1  # 8 bits, as the real images
    kw = plan.generate_kw
    amp = autocast_dtype(kw["mixed_precision"], device)
    record: dict = {"metric": args.metric, "step": run.step, "n": args.n, "n_real": len(real), "n_fake": len(fake),
                    "seed": args.seed, "latent_sampler": run.cfg.sample.sampler, "latent_steps": run.cfg.sample.steps,
                    "sampler": kw["sampler"], "steps": kw["steps"], "spacing": kw["spacing"],
                    "guidance": 0.0, "guidance_interval": [],  # unguided codes and decoding "labels": _label_policy(0), "prompts": _prompt_set(False, True),
                    "mixed_precision": kw["mixed_precision"], "dtype": str(amp or torch.float32).removeprefix("torch."),
                    **_feature_space(features), "decoder": str(decoder.path), "decoder_step": run.cfg.semantic.run_step,
                    "date": datetime.date.today().isoformat()}
    _measure(record, args.metric, real, fake, net)
    _report(record, Path(args.run) / "eval.json")


def _either(names) -> str:
    """'a, b or c'."""
    names = list(names)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def _report(record: dict, path: Path) -> None:
    """Print an eval record (a dict value one indented line per entry) and append it to the run's eval.json, rewritten
    atomically (checkpoint.append_json_record): a failed write (a full disk, a kill) leaves every earlier record in
    place."""
    shown = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)  # noqa: E731
    for k, v in record.items():
        print(f"{k}:" if isinstance(v, dict) else f"{k}: {shown(v)}")
        for name, value in (v.items() if isinstance(v, dict) else ()):
            print(f"  {name}: {shown(value)}")
    append_json_record(path, record)
    print(f"appended to {path}")


def _eval_autoencoder(args, cfg, device, step: int) -> None:
    """`diffuse eval AE_RUN`: reconstruction PSNR, rFID and codebook statistics on the held-out images
    (runs.evaluate_autoencoder), printed and appended to RUN/eval.json."""
    sampling = [f for f in ("sampler", "steps", "spacing", "guidance", "guidance_interval", "mixed_precision", "real", "rtol",
                            "vlb_samples")
                if getattr(args, f, None) is not None]
    if sampling or args.no_ema or args.metric not in (None, "recon"):
        flags = ", ".join(f"--{f.replace('_', '-')}" for f in sampling) or ("--no-ema" if args.no_ema else f"--metric {args.metric}")
        raise ValueError(f"{flags} does nothing for an autoencoder run: `diffuse eval` measures its reconstructions of the "
                         "held-out images (PSNR, rFID, codebook usage); leave it out")
    record = {**evaluate_autoencoder(args.run, args.features, device), "step": step, "date": datetime.date.today().isoformat()}
    _report(record, Path(args.run) / "eval.json")


def _eval_segmenter(args, measures: tuple[str, ...], device) -> None:
    """`diffuse eval SEG_RUN [--real FOLDER]`: mIoU, per-class IoU and pixel accuracy of a segmentation run's labels on
    its own held-out images (SegmentationRun.evaluate) or on a labelled folder (data.segmentation.load_folder: images/
    with PNG masks/ of class indices), printed and appended to RUN/eval.json. A class neither in the masks nor
    predicted has no IoU (null in eval.json) and is left out of the mean."""
    if args.metric not in (None, *measures):
        raise ValueError(f"--metric {args.metric} does not apply to a segmentation run, which measures --metric "
                         f"{_either(measures)}: the mean IoU of its labels on its held-out images (or on --real FOLDER, "
                         "images/ with masks/); sample metrics and likelihoods measure diffusion runs")
    unused = [f for f in ("sampler", "steps", "spacing", "guidance", "guidance_interval", "mixed_precision", "rtol",
                          "vlb_samples", "features") if getattr(args, f, None) is not None] + (["no_ema"] if args.no_ema else [])
    if unused:
        raise ValueError(f"--{unused[0].replace('_', '-')} does nothing for a segmentation run: `diffuse eval` scores its "
                         "labels (mIoU) with its own features and head; leave it out")
    d = load_config(Path(args.run) / "config.toml").data  # a bad folder is named before the run's weights load
    real = None if args.real is None else load_folder(args.real, d.channels, d.image_size)
    model = SegmentationRun(args.run, device, feature_network=feature_network)
    data = model.held_out() if real is None else real
    result = model.evaluate(data)
    record = {"metric": "miou", "data": str(args.real) if args.real is not None else "held-out (segment.test_images)",
              "miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"],
              "iou": result["iou"],
              "images": result["images"], "step": result["step"], "date": datetime.date.today().isoformat()}
    _report(record, Path(args.run) / "eval.json")


def _eval_clip(args, measures: tuple[str, ...], device) -> None:
    """`diffuse eval CLIPRUN --metric retrieval`: held-out text->image and image->text recall@1/5 (per noise level for
    a noise-aware CLIP) and zero-shot digit accuracy for a CLIP trained on captioned digits (kinds.clip.evaluate_run),
    printed and appended to RUN/eval.json."""
    if args.metric not in (None, *measures):
        raise ValueError(f"--metric {args.metric} does not apply to a CLIP run, which measures --metric {_either(measures)}: "
                         "held-out retrieval recall; sample metrics and likelihoods measure diffusion runs")
    unused = [f for f in ("sampler", "steps", "spacing", "guidance", "guidance_interval", "mixed_precision", "rtol",
                          "vlb_samples", "features", "real", "compile") if getattr(args, f, None) is not None]
    if unused or args.no_ema:
        flag = unused[0].replace("_", "-") if unused else "no-ema"
        raise ValueError(f"--{flag} does nothing for a CLIP run: `diffuse eval` ranks its held-out images and captions "
                         "by its own embeddings (raw weights, no EMA); leave it out")
    _report(evaluate_clip(args.run, device, args.seed), Path(args.run) / "eval.json")


def _eval_prior(args, measures: tuple[str, ...], device) -> None:
    """`diffuse eval PRIORRUN --metric prior`: the cosines of the prior's best-of-2 image embeddings for --n of its
    CLIP's held-out captions to the true image embedding, to the caption's text embedding and to an unrelated caption's
    image (kinds.unclip.evaluate_run), with --sampler, --steps, --guidance (default: the run's), printed and appended
    to RUN/eval.json."""
    if args.metric not in (None, *measures):
        raise ValueError(f"--metric {args.metric} does not apply to an unCLIP prior run, which measures --metric "
                         f"{_either(measures)}: cosines of its image embeddings; its images come from a decoder")
    unused = [f for f in ("spacing", "guidance_interval", "mixed_precision", "rtol", "vlb_samples", "features", "real",
                          "compile") if getattr(args, f, None) is not None]
    if unused or args.no_ema:
        flag = unused[0].replace("_", "-") if unused else "no-ema"
        raise ValueError(f"--{flag} does nothing for an unCLIP prior run: `diffuse eval` draws its EMA embeddings with "
                         "--sampler, --steps and --guidance only; leave it out")
    _report(evaluate_prior(args.run, device, args.seed, args.n, args.guidance, args.steps, args.sampler),
            Path(args.run) / "eval.json")


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


def _check_plan(args, cfg) -> None:
    """The sampler, steps and spacing of `diffuse eval` on a run (flags over its [sample] section) checked against its
    process (samplers.check_plan), before anything loads."""
    s = cfg.sample
    steps = (args.steps if args.steps is not None else s.steps) or None  # 0: every step
    check_plan(Schedule.from_config(cfg.schedule), args.sampler or s.sampler, steps, args.spacing or s.spacing)


def ema_command(args) -> None:
    """`diffuse ema RUN --sigma-rel S --out OUT` (runs.write_run), with a progress bar over the snapshots it reads."""
    bar = _bar(f"post-hoc EMA {args.sigma_rel:g}", None, "snapshot")

    def read(done: int, total: int) -> None:
        bar.total = total
        bar.update(1)

    out = write_run(args.run, args.sigma_rel, args.out, step=args.step, on_snapshot=read)
    bar.close()
    print(f"wrote the post-hoc EMA with sigma_rel = {args.sigma_rel:g} to {out}; sample it with `diffuse sample {out} ...`")


def serve_command(args) -> None:
    given = dict(upload_mb=args.max_upload_mb, upload_pixels=args.max_upload_pixels, queue=args.queue_size,
                 per_client=args.jobs_per_client)
    limits = Limits(**{k: v for k, v in given.items() if v is not None})  # the rest at Limits' defaults
    serve([locate(run, args.revision) for run in args.runs], host=args.host, port=args.port, device=args.device,
          auth=read_auth(args.auth, args.auth_file), limits=limits)


def export_command(args) -> None:
    """`diffuse export RUN --format diffusers --out DIR`: the run as a diffusers pipeline folder (export.py)."""
    out = export_diffusers(args.run, args.out, ema=not args.no_ema, step=args.step)
    print(f"wrote {args.run} as a diffusers folder {out}: DDPMPipeline.from_pretrained({str(out)!r}) (or DDIMPipeline, as "
          f"{out / 'model_index.json'} names) samples it, and so does `diffuse sample {out}`")


def demo_command(args) -> None:
    if args.toy:
        paths = run_toy_demo(args.out or "demo_toy", time_limit=args.time_limit)
    else:
        paths = run_demo(args.out or "demo", time_limit=args.time_limit)
    print("demo figures:")
    for name, path in paths.items():
        print(f"  {name:20s} {path}")


def config_command(args) -> None:
    if args.action == "list":
        for name in packaged_configs():
            print(f"{name:20s} {config_summary(name)}")
        return
    cfg = apply_overrides(load_config(args.config), args.set or [])
    check_unused(cfg, unused_rows(cfg))  # what `diffuse train` would refuse before writing anything
    print(f"# {config_path(args.config)}" + "".join(f" --set {s}" for s in args.set or []) + ", resolved: every key")
    print(tomli_w.dumps({k: v for k, v in to_dict(cfg).items() if k not in ignored_sections(cfg)}), end="")


COMMANDS = {"train": train_command, "sample": sample_command, "edit": edit_command, "segment": segment_command,
            "eval": eval_command, "ema": ema_command, "serve": serve_command, "export": export_command, "demo": demo_command,
            "config": config_command}
