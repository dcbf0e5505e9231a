"""Requests: what `diffuse sample` / `diffuse edit` and the web page's Sample and Edit tabs ask of a run, resolved once.

    request = SampleRequest(run, n=8, label=3)     or SampleRequest.from_args(namespace), from the command line's flags
    plan = resolve(request)                        every check, before any model loads (RequestError names the field)
    result = execute(plan, callback)               the samples or edits, the images shown before them, the calls
    plan.argv()                                    the `diffuse sample|edit ...` command that draws the same pixels

A request field left None takes the run's [sample] setting, as a flag left out of the command line does. The command
line and the page build requests and show what `resolve` and `execute` say, so the two cannot drift: the page's
pixels are the command's, and its messages are the command's with each flag named by the page's label
(`RequestError.named`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .. import speed, tasks
from ..tasks import semantic, unclip
from ..tasks.semantic import AMOUNT_LIMIT
from ..checkpoint import checkpoint_folders, load_checkpoint, read_state
from ..config import load_config
from ..data import load_image, load_mask
from ..generate import CHUNK, chunk_seed, default_labels, generate, generate_in_chunks, invert
from ..kinds.clip import check_guiding_clip, clip_guidance, load_clip, prompt_embedding
from ..kinds.diffae import sample_pair
from ..kinds.unclip import check_clip, clip_run, load_prior, sample_image_embeddings
from ..precision import autocast_dtype
from ..guidance import check_guidance_scale, check_prompts
from ..runs import SEMANTIC_EDITS, UNCLIP_EDITS, VIDEO_EDITS, Run, check_guidance, check_kind, open_run, prompt_condition
from ..samplers import OPTIONS, SAMPLERS, CountCalls, Step, check_plan
from ..schedule import SPACINGS, Schedule
from ..stages import check_same_space, diffusion_shape
from ..tasks.editing import check_mask, latent_edit, latent_factor
from ..tasks.image_to_image import (CASCADE_FILE, EDITS, EXAMPLE_CONFIGS, TRAINED_TASKS, check_cascade, edit_name,
                                    input_condition, read_cascade, viewable)
from ..tasks.video import SCHEMES, sample_long, sample_masked, sample_reconstruction, sample_replacement
from ..tasks.video import interpolation_stages, sample_stages, sdedit_video
from ..data.video import fit_frames, read_video
from ..visualize import contact_sheet, save_grid

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
VIDEO_FIELDS = ("video", "given", "method", "guidance_weight")  # a video edit's own fields (predict, interpolate)
CODED = ("invert", *SEMANTIC_EDITS)  # the edits that invert the input image to x_T first (generate.invert)
EDIT_TASKS = (*EDITS, *TRAINED_TASKS, *CODED, "predict", "variations", "textdiff")  # every `diffuse edit` task
TASK_FIELDS = {"strength": ("sdedit",), "to": ("interpolate", "textdiff"), "factor": ("ilvr",), "t_stop": ("ilvr",), "mask": ("inpaint",),
               "repaint_jumps": ("inpaint",), "repaint_length": ("inpaint",),
               "attribute": ("manipulate",), "amount": ("manipulate",), "encode_steps": (*CODED, *UNCLIP_EDITS),
               "refine": (*CODED, *UNCLIP_EDITS), "reconstruct": ("invert",), **{f: VIDEO_EDITS for f in VIDEO_FIELDS},
               "from_prompt": ("textdiff",), "theta": ("textdiff",), "invert": ("variations", "interpolate")}  # an edit's own fields -> the tasks taking them
TASK_FIELDS["video"] = (*VIDEO_EDITS, "sdedit")  # SDEdit of a video run reads --video too (tasks.video.sdedit_video)
MAX_SEED = 2**63 - 1
VIDEO_METHODS = ("masked", "reconstruction", "replacement")  # tasks/video.py: how given frames condition the rest
LONG_SCHEMES = tuple(SCHEMES)  # autoregressive, hierarchy-2 (Harvey et al. 2022)
RECONSTRUCTION_WEIGHT = 2.0  # w_r of reconstruction guidance by default (Ho et al. 2022 take w_r > 1)


# --- the requests --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleRequest:
    """`diffuse sample RUN ...` and the Sample tab: n samples of a run (or a cascade folder). None takes the run's
    [sample] setting."""

    run: str
    n: int = 64
    sampler: str | None = None
    steps: int | None = None                   # 0: every step of the schedule
    spacing: str | None = None
    eta: float | None = None                   # DDIM / Euler-ancestral eta
    options: tuple[str, ...] = ()              # sampler options as KEY=VALUE (--opt)
    label: int | None = None                   # None: every class in turn (class-conditional runs)
    prompt: str | None = None                  # the caption to draw (text-conditional runs)
    negative_prompt: str | None = None         # guided away from, in place of the empty caption
    guidance: float | None = None              # classifier-free w, or the classifier scale with `classifier`
    guidance_interval: tuple[float, ...] | None = None  # (lo, hi] of sigma/alpha where guidance acts; (): every level
    classifier: str | None = None              # a noisy-classifier run for classifier guidance
    threshold: str | None = None               # static, none or dynamic:P
    clip: bool = True                          # False: --no-clip
    mixed_precision: str | None = None
    compile: str | None = None                 # torch.compile the network (speed.MODES); None: the run's sample.compile
    seed: int = 0
    ema: bool = True                           # False: the raw weights (--no-ema)
    device: str | None = None                  # None: cuda if available, else cpu
    batch_size: int = CHUNK                    # samples drawn at once; chunk k > 0 has its own seed
    frames: int | None = None                  # a video run: frames per video (None: its data.frames)
    scheme: str | None = None                  # a video run, frames beyond the model's: LONG_SCHEMES (FDM)
    clip_run: str | None = None                # a CLIP run guiding towards --prompt (--clip; GLIDE, k-diffusion)
    clip_scale: float | None = None            # its scale s (--clip-scale); needed with clip_run
    clip_cutouts: int | None = None            # a plain CLIP: augmented copies of x_0 it reads (None: 1)
    prior_guidance: float | None = None        # an unCLIP pipeline: the prior's classifier-free w (None: unclip.toml's,
    #                                            else the prior run's sample.guidance); `guidance` is the decoder's on z_i
    best_of: int | None = None                 # an unCLIP pipeline: prior draws per image (None: unclip.toml's, else 2)

    def __post_init__(self):  # lists from a caller become tuples, so equal requests compare equal
        object.__setattr__(self, "options", tuple(self.options or ()))
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", tuple(self.guidance_interval))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SampleRequest:
        """The request of `diffuse sample`'s parsed flags."""
        return cls(run=args.run, n=args.n, batch_size=args.batch_size, frames=getattr(args, "frames", None),
                   scheme=getattr(args, "scheme", None), clip_run=getattr(args, "clip_run", None),
                   clip_scale=getattr(args, "clip_scale", None), clip_cutouts=getattr(args, "clip_cutouts", None),
                   prior_guidance=getattr(args, "prior_guidance", None), best_of=getattr(args, "best_of", None),
                   **_sampling_args(args))

    def argv(self) -> list[str]:
        """The `diffuse sample` command line of this request (after `diffuse`, without --out)."""
        batch = [] if self.batch_size == CHUNK else ["--batch-size", str(int(self.batch_size))]
        video = ([] if self.frames is None else ["--frames", str(int(self.frames))]) + \
            ([] if self.scheme is None else ["--scheme", self.scheme])
        clip = ([] if self.clip_run is None else _option("--clip", self.clip_run)) + \
            ([] if self.clip_scale is None else ["--clip-scale", repr(float(self.clip_scale))]) + \
            ([] if self.clip_cutouts is None else ["--clip-cutouts", str(int(self.clip_cutouts))])
        clip += ([] if self.prior_guidance is None else ["--prior-guidance", repr(float(self.prior_guidance))]) + \
            ([] if self.best_of is None else ["--best-of", str(int(self.best_of))])
        return ["sample", self.run, "--n", str(int(self.n)), *batch, *video, *clip, *_sampling_argv(self)]


@dataclass(frozen=True)
class EditRequest(SampleRequest):
    """`diffuse edit TASK RUN ...` and the Edit tab: n outputs of one input image (`image`; ILVR's reference). The
    task's own fields (TASK_FIELDS) are left at their defaults by the other tasks."""

    n: int = 8
    task: str = "sdedit"                       # EDIT_TASKS
    image: str = ""                            # the input image file (ilvr: --reference)
    mask: str | None = None                    # inpaint: white = generate, black = keep
    strength: float | None = None              # sdedit, in [0, 1] (tasks.editing.STRENGTH_HELP)
    factor: int | None = None                  # ilvr: the low-pass factor N
    t_stop: float = 0.0                        # ilvr: condition only while t >= t_stop
    repaint_jumps: int = 1                     # inpaint: RePaint's resamplings r per jump point
    repaint_length: int = 10                   # inpaint: RePaint's jump length in grid steps
    mean: bool = False                         # the mean of the n outputs, an estimate of E[x | input]
    to: str | None = None                      # interpolate: the second image
    attribute: str | None = None               # manipulate: a diffae_classifier run, RUN:CLASS for a class direction
    amount: float | None = None                # manipulate: the step s along the direction, in units of sqrt(d)
    encode_steps: int = 250                    # the coded edits: DDIM steps of the inversion to x_T (the paper: 250)
    refine: int = 0                            # the coded edits: fixed-point iterations per inversion step
    reconstruct: bool = False                  # invert: also render x_T back
    video: str | None = None                   # predict, interpolate: the input video file (.gif, .mp4)
    given: tuple[int, ...] | None = None       # predict, interpolate: the given frames' indices (None: the task's)
    method: str | None = None                  # predict, interpolate: VIDEO_METHODS (None: masked where trained, else
    #                                            reconstruction)
    guidance_weight: float | None = None       # reconstruction: w_r (None: RECONSTRUCTION_WEIGHT)
    from_prompt: str | None = None             # textdiff: the old caption (--from); `to` is the new one
    theta: float | None = None                 # textdiff: the share of the angle from z_i towards the text diff (None:
    #                                            unclip.THETA_PAPER)
    invert: bool = False                       # unCLIP variations, interpolate: x_T by DDIM inversion of the input(s)

    def __post_init__(self):
        super().__post_init__()
        if self.given is not None and not isinstance(self.given, str):
            object.__setattr__(self, "given", tuple(self.given))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EditRequest:
        """The request of `diffuse edit TASK`'s parsed flags."""
        image = args.reference if args.task == "ilvr" else getattr(args, "image", None)
        return cls(run=args.run, n=args.n, task=args.task, image=image or "", frames=getattr(args, "frames", None),
                   video=getattr(args, "video", None), given=getattr(args, "given", None), scheme=getattr(args, "scheme", None),
                   method=getattr(args, "method", None), guidance_weight=getattr(args, "guidance_weight", None),
                   mask=getattr(args, "mask", None), strength=getattr(args, "strength", None),
                   factor=getattr(args, "factor", None), t_stop=getattr(args, "t_stop", 0.0),
                   repaint_jumps=getattr(args, "repaint_jumps", 1), repaint_length=getattr(args, "repaint_length", 10),
                   mean=getattr(args, "mean", False), to=getattr(args, "to", None), attribute=getattr(args, "attribute", None),
                   amount=getattr(args, "amount", None), encode_steps=getattr(args, "encode_steps", 250),
                   refine=getattr(args, "refine", 0), reconstruct=getattr(args, "reconstruct", False),
                   from_prompt=getattr(args, "from_prompt", None), theta=getattr(args, "theta", None),
                   invert=getattr(args, "invert", False), **_sampling_args(args))

    def argv(self) -> list[str]:
        """The `diffuse edit TASK` command line of this request (after `diffuse`, without --out)."""
        own = [*_option(flag("image", self.task), self.image)] if self.image else []
        if self.video is not None:
            own += _option("--video", self.video)
        if self.frames is not None:
            own += ["--frames", str(int(self.frames))]
        if self.given is not None:
            own += ["--given", ",".join(str(int(i)) for i in self.given)]
        if self.scheme is not None:
            own += ["--scheme", self.scheme]
        if self.method is not None:
            own += ["--method", self.method]
        if self.guidance_weight is not None:
            own += ["--guidance-weight", repr(float(self.guidance_weight))]
        if self.mask is not None:
            own += _option("--mask", self.mask)
        if self.strength is not None:
            own += ["--strength", repr(float(self.strength))]
        if self.factor is not None:
            own += ["--factor", str(int(self.factor))]
        if self.t_stop != 0:
            own += ["--t-stop", repr(float(self.t_stop))]
        if self.repaint_jumps != 1:
            own += ["--repaint-jumps", str(int(self.repaint_jumps))]
        if self.repaint_length != 10:
            own += ["--repaint-length", str(int(self.repaint_length))]
        if self.to is not None:
            own += _option("--to", self.to)
        if self.attribute is not None:
            own += _option("--attribute", self.attribute)
        if self.amount is not None:
            own += [f"--amount={float(self.amount)!r}"]
        if self.encode_steps != 250:
            own += ["--encode-steps", str(int(self.encode_steps))]
        if self.refine != 0:
            own += ["--refine", str(int(self.refine))]
        if self.reconstruct:
            own += ["--reconstruct"]
        if self.from_prompt is not None:
            own += _option("--from", self.from_prompt)
        if self.theta is not None:
            own += ["--theta", repr(float(self.theta))]
        if self.invert:
            own += ["--invert"]
        n = [] if self.task == "invert" else ["--n", str(int(self.n))]  # invert has one output, and no --n
        return ["edit", self.task, self.run, *own, *n, *(["--mean"] if self.mean else []), *_sampling_argv(self)]


def _sampling_args(args: argparse.Namespace) -> dict:
    """The fields `sample` and `edit` share, from their parsed flags (cli._sampling_flags)."""
    return dict(sampler=args.sampler, steps=args.steps, spacing=args.spacing, eta=args.eta, options=tuple(args.opt or ()),
                label=args.label, prompt=args.prompt, negative_prompt=args.negative_prompt, guidance=args.guidance,
                guidance_interval=args.guidance_interval, classifier=args.classifier, threshold=args.threshold,
                clip=not args.no_clip, mixed_precision=args.mixed_precision, compile=args.compile, seed=args.seed,
                ema=not args.no_ema,
                device=args.device)


def _option(name: str, text: str) -> list[str]:
    """A flag and its text; as one word --flag=TEXT when the text starts with '-' (argparse would take it for a flag)."""
    return [f"{name}={text}"] if text.startswith("-") else [name, text]


def _sampling_argv(req: SampleRequest) -> list[str]:
    """The shared flags of a request, those left at their defaults left out (floats by repr: they read back exactly)."""
    out = []
    for field, value in (("sampler", req.sampler), ("steps", req.steps), ("spacing", req.spacing), ("eta", req.eta)):
        if value is not None:
            out += [flag(field), str(int(value)) if field == "steps" else repr(float(value)) if field == "eta" else value]
    for pair in req.options:
        out += ["--opt", pair]
    if req.label is not None:
        out += ["--label", str(int(req.label))]
    for field in ("prompt", "negative_prompt"):
        if getattr(req, field) is not None:
            out += _option(flag(field), getattr(req, field))
    if req.guidance is not None:
        out += ["--guidance", repr(float(req.guidance))]
    if req.guidance_interval is not None:
        out += ["--guidance-interval", ",".join(repr(float(v)) for v in req.guidance_interval) or "all"]
    for field in ("classifier", "threshold", "mixed_precision", "compile"):
        if getattr(req, field) is not None:
            out += _option(flag(field), getattr(req, field))
    out += ["--seed", str(int(req.seed))]
    out += [] if req.clip else ["--no-clip"]
    out += [] if req.ema else ["--no-ema"]
    return out + ([] if req.device is None else ["--device", req.device])


# --- errors that name their field ----------------------------------------------------------------------------------
FLAGS = {"ema": "--no-ema", "clip": "--no-clip", "options": "--opt", "run": "RUN", "task": "TASK", "clip_run": "--clip",
         "from_prompt": "--from"}


def flag(field: str, task: str | None = None) -> str:
    """The command line's name of a request field: --guidance, --no-ema, --reference (ILVR's image)."""
    if field == "image" and task == "ilvr":
        return "--reference"
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def field_of(name: str) -> str:
    """The request field of a flag (`flag`'s inverse)."""
    fields = {v: k for k, v in FLAGS.items()} | {"--reference": "image"}
    return fields.get(name, name.removeprefix("--").replace("-", "_"))


class RequestError(ValueError):
    """A request that cannot be served: `field` names the request field at fault. The message is the command line's,
    naming fields by their flags (str(e)); `named(names)` names them otherwise, e.g. by the page's labels."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    def named(self, names: dict[str, str]) -> str:
        """The message with every flag whose field `names` has (field -> name) replaced by that name."""
        return re.sub(r"--[a-z][a-z0-9-]*", lambda m: names.get(field_of(m.group()), m.group()), str(self))


def _raise_as(field: str, check: Callable, *args, **kwargs):
    """check(*args, **kwargs), its ValueError raised again as a RequestError of `field` (the same message)."""
    try:
        return check(*args, **kwargs)
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError(field, str(e)) from None


# --- checks of the values themselves (the command line's parser makes them; the page and Python callers need them) ----
def _number(req, field: str, kind: type, low: float, high: float | None = None):
    """The field as an int or float in [low, high]; RequestError naming the field otherwise."""
    value = getattr(req, field)
    try:
        x = kind(value)
        ok = (not isinstance(value, bool) and math.isfinite(x) and low <= x and (high is None or x <= high)
              and (kind is not int or float(value) == x))
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        where = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
        raise RequestError(field, f"{flag(field, getattr(req, 'task', None))} must be "
                                  f"{'a whole number' if kind is int else 'a number'} {where}, got {value!r}")
    return x


def _choice(req, field: str, choices) -> None:
    value = getattr(req, field)
    if value is not None and value not in choices:
        raise RequestError(field, f"{flag(field)} {value!r} is not one of {', '.join(choices)}")


def _checked(req: SampleRequest) -> SampleRequest:
    """The request with its numbers checked (type, finite, range) and made int or float: what the command line's
    parser checks of each flag. RequestError naming the field otherwise."""
    _choice(req, "sampler", SAMPLERS)
    _choice(req, "spacing", SPACINGS)
    _choice(req, "mixed_precision", MIXED_PRECISION)
    _choice(req, "compile", speed.MODES)
    _choice(req, "scheme", LONG_SCHEMES)
    numbers = {"n": _number(req, "n", int, 1), "seed": _number(req, "seed", int, 0, MAX_SEED),
               "batch_size": _number(req, "batch_size", int, 1)}
    for field, kind, low, high in (("steps", int, 0, None), ("eta", float, 0, 100), ("label", int, 0, None),
                                   ("guidance", float, 0, None), ("frames", int, 1, None), ("clip_scale", float, 0, None),
                                   ("clip_cutouts", int, 1, None), ("prior_guidance", float, 0, None),
                                   ("best_of", int, 1, None)):
        if getattr(req, field) is not None:
            numbers[field] = _number(req, field, kind, low, high)
    interval = req.guidance_interval
    if interval is not None and interval != () and not (
            len(interval) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)
            and 0 <= interval[0] < interval[1] and math.isfinite(interval[0]) and not math.isnan(interval[1])):
        raise RequestError("guidance_interval", f"--guidance-interval must be LO,HI with 0 <= LO < HI and LO finite, or "
                                                f"all, got {interval!r}")
    for field in ("run", "prompt", "negative_prompt", "classifier", "threshold", "device", "clip_run"):
        if getattr(req, field) is not None and not isinstance(getattr(req, field), str):
            raise RequestError(field, f"{flag(field)} must be text, got {getattr(req, field)!r}")
    if not all(isinstance(pair, str) for pair in req.options):
        raise RequestError("options", f"--opt takes KEY=VALUE text, got {req.options!r}")
    if isinstance(req, EditRequest):
        if req.batch_size != CHUNK:
            raise RequestError("batch_size", "--batch-size does nothing here: an edit draws its n outputs in one batch; "
                                             "leave it out")
        if req.task not in EDIT_TASKS:
            raise RequestError("task", f"unknown edit {req.task!r}; choose one of {', '.join(EDIT_TASKS)}")
        for field in ("clip_run", "clip_scale", "clip_cutouts"):
            if getattr(req, field) is not None:
                raise RequestError(field, f"{flag(field)} does nothing here: CLIP guidance is `diffuse sample`'s (--clip "
                                          "CLIPRUN --prompt TEXT --clip-scale S); leave it out")
        for field in ("prior_guidance", "best_of"):
            if getattr(req, field) is not None:
                raise RequestError(field, f"{flag(field)} does nothing here: the edits start from input images, whose "
                                          "embeddings the decoder's CLIP makes (no prior runs); leave it out")
        for field, tasks_taking in TASK_FIELDS.items():
            if getattr(req, field) != getattr(EditRequest, field) and req.task not in tasks_taking:
                raise RequestError(field, f"{flag(field)} does nothing here: only edit {' and '.join(tasks_taking)} "
                                          "takes it; leave it out")
        for field, kind, low, high in (("strength", float, 0, 1), ("factor", int, 1, None), ("t_stop", float, 0, 1),
                                       ("repaint_jumps", int, 1, 100), ("repaint_length", int, 1, None),
                                       ("amount", float, -AMOUNT_LIMIT, AMOUNT_LIMIT), ("encode_steps", int, 1, None),
                                       ("refine", int, 0, 100), ("guidance_weight", float, 0, None),
                                       ("theta", float, 0, 1)):
            if getattr(req, field) is not None or getattr(EditRequest, field) is not None:  # None: only where optional
                numbers[field] = _number(req, field, kind, low, high)
        for field in ("to", "attribute", "from_prompt"):
            if req.task == "textdiff" and field != "attribute":  # captions: _resolve_unclip names an empty one
                if getattr(req, field) is not None and not isinstance(getattr(req, field), str):
                    raise RequestError(field, f"{flag(field)} must be a caption (text), got {getattr(req, field)!r}")
                continue
            if getattr(req, field) is not None and not (isinstance(getattr(req, field), str) and getattr(req, field)):
                raise RequestError(field, f"{flag(field)} must be text, got {getattr(req, field)!r}")
        if req.scheme is not None and req.task != "predict":
            raise RequestError("scheme", "--scheme does nothing here: only edit predict of a video longer than the model "
                                         "(--frames N) takes it, and `diffuse sample RUN --frames N --scheme ...`; leave "
                                         "it out")
        if is_video_edit(req):
            _check_video_fields(req)
        elif req.task == "interpolate" and not req.image:
            raise RequestError("image", "edit interpolate needs --video IN.gif|.mp4 (a video run: the frames between the "
                                        "--given ones generated) or --image and --to (a diffusion autoencoder)")
        elif not (isinstance(req.image, str) and req.image):
            raise RequestError("image", f"edit {req.task} needs {flag('image', req.task)}, the image file to edit" +
                               (" (a video run: --video IN.gif|.mp4)" if req.task == "sdedit" else ""))
        needs = {"sdedit": [("strength", "--strength S in [0, 1]")], "ilvr": [("factor", "--factor N")],
                 "inpaint": [("mask", "--mask, the image of the region to generate (white)")],
                 "interpolate": [("to", "--to, the image to interpolate towards")],
                 "manipulate": [("attribute", "--attribute, a classifier run on the codes (configs/diffae_thickness.toml; "
                                              "RUN:CLASS for a class of a label classifier)"),
                                ("amount", "--amount S, the step along the attribute (the paper: 0.3; negative: less)")]
                 }.get(req.task, [])
        for field, what in needs if not (is_video_edit(req) and req.task in VIDEO_EDITS) else ():
            if getattr(req, field) is None:
                raise RequestError(field, f"edit {req.task} needs {what}")
    return dataclasses.replace(req, **numbers)


def is_video_edit(req: EditRequest) -> bool:
    """Whether an edit is a video run's: predict, or interpolate or sdedit of a --video (interpolate of --image and --to
    is a diffusion autoencoder's, sdedit of an --image a model of images')."""
    return req.task == "predict" or (req.task in ("interpolate", "sdedit") and req.video is not None)


def _check_video_fields(req: EditRequest) -> None:
    """A video edit's own fields as values: the video file named, --given distinct whole numbers >= 0, the method one
    of VIDEO_METHODS, --guidance-weight only for reconstruction, and no image fields. RequestError naming the field."""
    if not (isinstance(req.video, str) and req.video):
        raise RequestError("video", f"edit {req.task} needs --video IN.gif|.mp4, the video whose --given frames are kept")
    for field in ("image", "to"):
        if getattr(req, field):
            raise RequestError(field, f"{flag(field)} does nothing here: edit {req.task} of a video reads --video; leave "
                                      "it out")
    for field in ("encode_steps", "refine"):
        if getattr(req, field) != getattr(EditRequest, field):
            raise RequestError(field, f"{flag(field)} does nothing here: it is a diffusion autoencoder's; leave it out")
    if req.given is not None:
        given = req.given
        if not (isinstance(given, tuple) and given and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                           for i in given)):
            raise RequestError("given", f"--given takes the given frames' indices as whole numbers >= 0, e.g. 0,1,2,3; "
                                        f"got {given!r}")
        if len(set(given)) != len(given):
            raise RequestError("given", f"--given names a frame twice: {','.join(map(str, given))}; name each once")
    _choice(req, "method", VIDEO_METHODS)
    if req.guidance_weight is not None and req.method != "reconstruction":
        raise RequestError("guidance_weight", "--guidance-weight is w_r of reconstruction guidance: pass --method "
                                              "reconstruction, or leave it out")
    if req.mean:
        raise RequestError("mean", "--mean does nothing here: the mean of videos is a blur; leave it out")


def parse_given(text: str) -> tuple[int, ...]:
    """--given's text, e.g. '0,1,2,3', as a tuple of indices; ValueError naming the form otherwise."""
    try:
        out = tuple(int(part) for part in text.split(","))
    except ValueError:
        out = ()
    if not out or any(i < 0 for i in out):
        raise ValueError(f"--given takes the given frames' indices separated by commas, e.g. 0,1,2,3; got {text!r}")
    return out


# --- the plan --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Plan:
    """A request resolved against its run, every check made and no weights loaded: `generate`'s keyword arguments
    (those that need no model), the shape it draws (C, H, W) (pixels or latents), the device; an edit's input image
    (1, C', h, w) in [-1, 1] and mask (1, 1, H, W) (1 = keep) and the trained task its run runs (None: a training-free
    edit); a cascade's plan per stage and the augmentation level of its inputs."""

    request: SampleRequest
    run: Run | None                            # None for a cascade (each stage has its own)
    device: str
    shape: tuple[int, ...]
    generate_kw: dict
    classifier: Run | None = None
    image: Tensor | None = None
    mask: Tensor | None = None
    trained: str | None = None
    stages: tuple[Plan, ...] = ()
    aug_level: float | None = None
    to: Tensor | None = None                   # interpolate: the second image (1, C, H, W)
    direction: Direction | None = None         # manipulate: the classifier's direction and the codes' statistics
    decoder: Run | None = None                 # a diffae_prior run's diffusion autoencoder, which decodes its codes
    compiled: bool = False                     # the network torch.compiled for sampling (speed.compile_network)
    model_frames: int = 0                      # a video run: the model's frames (shape[1] beyond it: a long scheme)
    video: Tensor | None = None                # a video edit's input (1, C, F, H, W) in [-1, 1]
    observed: Tensor | None = None             # a video edit's given frames (F,) bool
    method: str | None = None                  # a video edit's VIDEO_METHODS
    clip_run: Run | None = None                # the CLIP run guiding the samples (--clip)
    clip_path: Path | None = None              # unCLIP's edits: the decoder's CLIP run (at its unclip.clip_step)
    prior: Run | None = None                   # an unCLIP pipeline's prior (`run` is its decoder)
    prior_kw: dict | None = None               # its sample_image_embeddings arguments: guidance, best_of

    def argv(self) -> list[str]:
        """The command (after `diffuse`, without --out) that draws the same pixels: `sample ...` or `edit TASK ...`."""
        return self.request.argv()

    def command(self, out: str) -> str:
        """The whole command line, writing `out`."""
        return shlex.join(["diffuse", *self.argv(), "--out", out])


def resolve(req: SampleRequest, run: Run | None = None) -> Plan:
    """Check a request against its run (opened with `open_run` unless given) and plan it, before any model loads: the
    command line's checks and messages, each error a RequestError naming its field (OSError for a missing file)."""
    req = _checked(req)
    if run is None and unclip.is_pipeline(req.run):
        return _resolve_pipeline(req)
    _refuse_pipeline_fields(req)
    if isinstance(req, EditRequest):
        run = run or open_run(req.run)
        if is_video_edit(req) or run.capabilities.video:
            return _resolve_video_edit(req, run)
        _refuse_frames(req, f"{req.run} is a model of images ({run.kind})")
        return _resolve_edit(req, run)
    if run is None and (Path(req.run) / CASCADE_FILE).is_file():
        _refuse_frames(req, f"{req.run} is a cascade of image models")
        return _resolve_cascade(req)
    run = run or open_run(req.run)
    if run.capabilities.video:
        return _resolve_video_sample(req, run)
    _refuse_frames(req, f"{req.run} is a model of images ({run.kind})")
    if run.kind == "diffae":
        raise RequestError("run", f"{req.run} is a diffusion autoencoder, whose decoder draws an image from a semantic "
                                  "code: sample its latent DDIM (`diffuse train configs/diffae_prior.toml --out PRIOR`, then "
                                  f"`diffuse sample PRIOR`), or use `diffuse edit reconstruct {req.run} --image IMAGE`")
    if run.kind == "diffae_prior":
        return _resolve_pair(req, run)
    if run.cfg.model.image_embed_dim:
        raise RequestError("run", f"{req.run} is unCLIP's decoder: it draws an image from a CLIP image embedding, not "
                                  f"from noise alone; use `diffuse edit variations {req.run} --image IMAGE` (or "
                                  "interpolate, textdiff), or a pipeline with a prior that makes the embedding of a prompt")
    if run.kind == "unclip_prior":
        raise RequestError("run", f"{req.run} is an unCLIP prior, which draws CLIP image embeddings, not images: an unCLIP "
                                  "decoder turns them into images (chain the two in a pipeline folder); draw embeddings with "
                                  "kinds.unclip.sample_image_embeddings, measure them with "
                                  f"`diffuse eval {req.run} --metric prior`")
    kind = run.capabilities.trained_task
    if kind != "none":
        raise RequestError("run", f"{req.run} is a {kind} run (task.kind = '{kind}'): it makes an image from an input "
                                  f"image, so use `diffuse edit {edit_name(kind)} {req.run} --image IMAGE --out OUT.png`")
    return _sampling(req, run)


def _refuse_unused(req: SampleRequest, sampler: str) -> None:
    """Fields that would do nothing under the chosen sampler are errors, not silently dropped."""
    if sampler in SAMPLERS and SAMPLERS[sampler].calls_per_step == 0:
        for field in ("steps", "spacing"):
            if getattr(req, field) is not None:
                raise RequestError(field, f"{flag(field)} does nothing here: {sampler} chooses its own steps (set its "
                                          "tolerance with --opt rtol=...); leave it out")


def _check_plan(req: SampleRequest, cfg) -> tuple[str, int | None, str]:
    """The sampler, steps and spacing of a request on a run (the request over its [sample] section), checked against
    its process (samplers.check_plan: e.g. sde-em on a flow run, more steps than T)."""
    s = cfg.sample
    sampler, steps, spacing = req.sampler or s.sampler, (req.steps if req.steps is not None else s.steps) or None, \
        req.spacing or s.spacing
    schedule = Schedule.from_config(cfg.schedule)
    if sampler in SAMPLERS:  # (an unknown one: check_plan says so)
        _raise_as("sampler", SAMPLERS[sampler].check_schedule, schedule, sampler)
    _raise_as("steps", check_plan, schedule, sampler, steps, spacing)
    return sampler, steps, spacing


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


def _check_weights(run: Run, kind: str, field: str) -> None:
    """What loading the run's weights would refuse, said before they load: another kind of run, no valid checkpoint."""
    _raise_as(field, check_kind, run.path, run.cfg, kind)
    if run.step is None and not run.diffusers:
        load_checkpoint(run.path)  # raises FileNotFoundError naming why (no checkpoint, or none valid)


def _sampling(req: SampleRequest, run: Run) -> Plan:
    """What `sample` and `edit` share: generate's arguments from the request over the run's [sample] section, every
    field checked in the command line's order."""
    cfg, s, caps = run.cfg, run.cfg.sample, run.capabilities
    sampler = req.sampler or s.sampler
    _refuse_unused(req, sampler)
    sampler, steps, spacing = _check_plan(req, cfg)  # before anything loads or a progress bar starts
    options = {"eta": s.eta, "variance": s.variance}
    if req.eta is not None:
        if "eta" not in SAMPLERS[sampler].options:
            raise RequestError("eta", f"--eta: sampler {sampler} takes no eta (samplers with one: ddim, euler-ancestral)")
        options["eta"] = req.eta
    options.update(_raise_as("options", parse_options, list(req.options), sampler))
    clip, dyn = _raise_as("threshold", parse_threshold, req.threshold) if req.threshold is not None else \
        (s.clip, s.dynamic_threshold)
    if caps.latent and req.threshold not in (None, "none"):
        raise RequestError("threshold", f"--threshold {req.threshold}: {req.run} is a latent-diffusion run, whose latents "
                                        "have no [-1, 1] range to clip to; leave --threshold out")
    if not req.clip:
        clip = False
    guidance = s.guidance if req.guidance is None else req.guidance
    prompt, negative = req.prompt, req.negative_prompt
    if not caps.text and ((prompt is not None and req.clip_run is None) or negative is not None):
        raise RequestError("prompt" if prompt is not None and req.clip_run is None else "negative_prompt",
                           f"--prompt and --negative-prompt need a text-conditional run (model.text_encoder); {req.run} "
                           "takes no captions; --clip CLIPRUN --clip-scale S guides it towards --prompt" +
                           (" (it is class-conditional: use --label)" if cfg.model.class_conditional else ""))
    if caps.text and prompt is None:
        raise RequestError("prompt", f'{req.run} is a text-conditional run: say what to draw with --prompt, e.g. --prompt '
                                     '"a red circle"')
    if negative is not None and not guidance:
        raise RequestError("negative_prompt", "--negative-prompt replaces the empty caption of classifier-free guidance, "
                                              "so it needs a guidance weight: pass --guidance W (e.g. 4)")
    interval = tuple(s.guidance_interval) if req.guidance_interval is None else req.guidance_interval
    _raise_as("guidance", check_guidance, cfg, guidance, classifier=req.classifier is not None)
    classifier = None
    if req.classifier is not None:  # it must read what this run diffuses (pixels, or the same latents)
        classifier = open_run(req.classifier)
        _raise_as("classifier", check_same_space, cfg, classifier.cfg, f"the classifier {req.classifier}")
    clip_run = _clip_run(req, run)
    device = req.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mixed_precision = req.mixed_precision or s.mixed_precision
    _raise_as("mixed_precision", autocast_dtype, mixed_precision, device, "--mixed-precision")  # fp16 on a CPU fails here
    compiled = _raise_as("compile", speed.wanted, req.compile or s.compile, device, "--compile")
    _check_weights(run, "denoiser", "run")
    if clip_run is not None:
        _raise_as("clip_run", load_checkpoint, clip_run.path)  # FileNotFoundError naming why: no valid checkpoint
    num_classes, conditional = run.num_classes, caps.classes > 0
    if classifier is not None:
        _check_weights(classifier, "classifier", "classifier")
        if classifier.num_classes != num_classes and num_classes:
            raise RequestError("classifier", f"the classifier knows {classifier.num_classes} classes, the model "
                                             f"{num_classes}")
        num_classes = classifier.num_classes
    labels = None
    if req.label is not None:
        if not (conditional or classifier is not None):
            raise RequestError("label", "--label needs a class-conditional model or a --classifier to guide with")
        if not 0 <= req.label < num_classes:
            raise RequestError("label", f"--label must be a class index in 0..{num_classes - 1}, got {req.label}")
        labels = torch.full((req.n,), req.label)
    elif conditional or classifier is not None:
        labels = default_labels(req.n, num_classes)
    kw = dict(sampler=sampler, steps=steps, spacing=spacing, clip=clip, dynamic_threshold=dyn, labels=labels,
              guidance=guidance, guidance_interval=interval or None, seed=req.seed, device=device,
              mixed_precision=mixed_precision, **options)
    return Plan(req, run, device, diffusion_shape(cfg), kw, classifier=classifier, compiled=compiled, clip_run=clip_run)


def _clip_run(req: SampleRequest, run: Run) -> Run | None:
    """The CLIP run of --clip, checked against the run (kinds.clip.check_guiding_clip) with the fields it needs: a
    non-empty --prompt and --clip-scale; --clip-cutouts only for a plain CLIP. Without --clip, its fields are refused.
    RequestError naming the field."""
    if req.clip_run is None:
        for field in ("clip_scale", "clip_cutouts"):
            if getattr(req, field) is not None:
                raise RequestError(field, f"{flag(field)} needs --clip CLIPRUN, the CLIP run to guide with; pass it, or "
                                          f"leave {flag(field)} out")
        return None
    if req.prompt is None:
        raise RequestError("prompt", '--clip guides the samples towards a caption: pass it with --prompt, e.g. --prompt '
                                     '"a red circle"')
    _raise_as("prompt", check_prompts, req.prompt)
    if req.clip_scale is None:
        raise RequestError("clip_scale", "--clip needs --clip-scale S, the guidance scale (0: none; a noise-aware CLIP "
                                         "multiplies the cosine f(x_t, t) . g(c), so GLIDE's grad_scale 3 is S = 300; "
                                         "a plain CLIP its spherical distance on x_0, k-diffusion's default S = 500)")
    clip = _raise_as("clip_run", open_run, req.clip_run)
    _raise_as("clip_run", check_guiding_clip, run.cfg, clip.cfg, f"the CLIP {req.clip_run}")
    if req.clip_cutouts is not None and clip.cfg.clip.noise_aware:
        raise RequestError("clip_cutouts", f"--clip-cutouts does nothing here: the CLIP {req.clip_run} is noise-aware and "
                                           "guides x_t itself (cutouts are augmented copies of the predicted x_0 that a "
                                           "plain CLIP reads); leave it out")
    return clip


# --- videos (model.video: tasks/video.py) ---------------------------------------------------------------------------
def _refuse_frames(req: SampleRequest, what: str) -> None:
    """--frames and --scheme are a video run's; RequestError naming the fix for any other run."""
    for field in ("frames", "scheme"):
        if getattr(req, field) is not None:
            raise RequestError(field, f"{flag(field)} draws videos, and {what}: leave {flag(field)} out, or sample a video "
                                      "run (model.video = true, e.g. `diffuse train video_digits --out RUN`)")


def _video_sampling(req: SampleRequest, run: Run) -> Plan:
    """`_sampling` of a video run: classifier guidance refused (noisy classifiers read images), the shape (C, F, H, W)."""
    if req.clip_run is not None:
        raise RequestError("clip_run", f"--clip guides with a CLIP of images; {req.run} draws videos: leave it out")
    if req.classifier is not None:
        raise RequestError("classifier", f"--classifier guides with a noisy classifier of images; {req.run} draws videos: "
                                         "leave it out (classifier-free guidance, --guidance, works on a class-conditional "
                                         "video run)")
    return _sampling(req, run)


def video_limits(run: Run) -> tuple[int | None, int]:
    """(max_observed, span) of a video run: the most given frames its training ever gave (video.max_observed; None for
    a model without the observed channel: replacement and reconstruction guidance have no indicator and no limit) and
    the frames its training examples spread over (max(video.max_span, data.frames)), which long-video stages should
    not exceed (tasks.video.warn_span)."""
    cfg = run.cfg
    return (cfg.video.max_observed if run.capabilities.observed else None), max(cfg.video.max_span, cfg.data.frames)


def _resolve_video_sample(req: SampleRequest, run: Run) -> Plan:
    """`diffuse sample VIDEO_RUN [--frames N] [--scheme S]`: N frames (default the run's data.frames) drawn at once when
    they fit the model's F frames; more by a long-video scheme (tasks.video.SCHEMES) of a masked-conditioning model,
    each stage conditioned on frames already drawn. RequestError naming the fix otherwise."""
    caps, d = run.capabilities, run.cfg.data
    model, frames = caps.frames, req.frames if req.frames is not None else caps.frames
    if frames > model:
        if not caps.observed:
            raise RequestError("frames", f"--frames {frames} is more than the {model} frames of {req.run}; a longer video is "
                                         "drawn in stages, each conditioned on frames already drawn, which needs a masked-"
                                         "conditioning model (model.video_observed = true, e.g. configs/video_digits.toml); "
                                         f"pass --frames {model} or fewer")
        if req.scheme is None:
            raise RequestError("scheme", f"--frames {frames} is more than the {model} frames of {req.run}: a longer video is "
                                         f"drawn in stages by a scheme; pass --scheme {' or --scheme '.join(LONG_SCHEMES)}")
        cap = video_limits(run)[0]  # sizes the scheme cannot cut
        _raise_as("scheme", lambda: list(SCHEMES[req.scheme](model, frames, max_observed=cap)))
    elif req.scheme is not None:
        raise RequestError("scheme", f"--scheme does nothing here: {frames} frames fit the {model} of {req.run} and are "
                                     f"drawn at once; leave it out, or pass --frames more than {model}")
    plan = _video_sampling(req, run)
    return dataclasses.replace(plan, shape=(d.channels, frames, d.image_size, d.image_size), model_frames=model)


def default_given(task: str, frames: int, max_observed: int | None = None) -> tuple[int, ...]:
    """The given frames when --given is left out: predict the first half (at most max_observed, the most a masked
    model given the frames at once was trained with), interpolate the first and the last."""
    half = max(1, frames // 2) if max_observed is None else max(1, min(frames // 2, max_observed))
    return tuple(range(half)) if task == "predict" else (0, frames - 1)


def read_video_input(path: str, channels: int, size: int, frames: int) -> Tensor:
    """The first `frames` frames of a video file as (1, channels, frames, size, size) in [-1, 1] (data.video.read_video,
    fit_frames: grayscale or RGB, scaled and centre-cropped); reading stops there (read_video's max_frames), however
    long the file. ValueError when the file has fewer frames."""
    raw = read_video(path, max_frames=frames)
    if len(raw) < frames:
        raise ValueError(f"--video {path} has {len(raw)} frame{'s' * (len(raw) != 1)}, fewer than the {frames} asked; pass --frames {len(raw)} "
                         "or a longer video")
    x = torch.from_numpy(fit_frames(raw[:frames], channels, size)).float() / 127.5 - 1
    return x[None]


def _resolve_video_edit(req: EditRequest, run: Run) -> Plan:
    """`diffuse edit predict|interpolate VIDEO_RUN --video IN --given I,J,...`: the video read (its first F frames, F =
    --frames or the run's), the given frames kept and the rest generated by the method (masked: a masked-conditioning
    model; reconstruction guidance or replacement: any video run). More frames than the model's are edited in stages
    by a masked-conditioning model (`video_stages`: predict by --scheme, default autoregressive; interpolate by
    tasks.video.interpolation_stages). `edit sdedit --video` goes to `_resolve_video_sdedit`. Every check before the
    model loads."""
    caps, d = run.capabilities, run.cfg.data
    if not caps.video:
        if req.task == "predict":
            raise RequestError("task", f"edit predict needs a video run (model.video = true, e.g. `diffuse train "
                                       f"video_digits --out RUN`); {req.run} is a model of images, whose edits are "
                                       f"{', '.join(caps.edits) or 'none'}")
        raise RequestError("video", f"--video needs a video run (model.video = true); {req.run} is a model of images: "
                                    "leave --video out (edit interpolate of a diffusion autoencoder takes --image and --to)")
    if req.task not in (*VIDEO_EDITS, "sdedit"):
        raise RequestError("task", f"edit {req.task} edits images, and {req.run} is a video run: its edits are predict, "
                                   f"interpolate (--video IN.gif --given 0,1,2,3) and sdedit (--video IN.gif --strength S), "
                                   f"and `diffuse sample {req.run} --frames N` draws videos")
    if not is_video_edit(req):
        raise RequestError("video", f"{req.run} is a video run: edit {req.task} takes --video IN.gif|.mp4" +
                                    (" and --given" if req.task == "interpolate" else "") + ", not --image")
    model = caps.frames
    frames = req.frames if req.frames is not None else model
    if req.task == "sdedit":
        return _resolve_video_sdedit(req, run, frames)
    method = req.method or ("masked" if caps.observed else "reconstruction")
    if method == "masked" and not caps.observed:
        raise RequestError("method", f"--method masked needs a masked-conditioning model (model.video_observed = true), "
                                     f"trained with given frames; {req.run} was not: pass --method reconstruction (Ho et "
                                     "al. 2022) or --method replacement")
    if frames > model and method != "masked":
        raise RequestError("frames", f"--frames {frames} is more than the {model} frames of {req.run}; a longer video is "
                                     "edited in stages, each conditioned on frames given or generated before, which needs "
                                     "a masked-conditioning model (model.video_observed = true) and --method masked; pass "
                                     f"--frames {model} or fewer")
    if req.scheme is not None and frames <= model:
        raise RequestError("scheme", f"--scheme does nothing here: {frames} frames fit the {model} of {req.run} and are "
                                     f"edited at once; leave it out, or pass --frames more than {model}")
    cap = video_limits(run)[0] if method == "masked" else None
    given = req.given if req.given is not None else default_given(req.task, frames, cap if frames <= model else None)
    outside = [i for i in given if i >= frames]
    if outside:
        raise RequestError("given", f"--given {','.join(map(str, given))}: frame {outside[0]} is outside the video's "
                                    f"{frames} frames 0..{frames - 1}" +
                                    ("" if req.frames is not None else " (--frames N edits its first N frames)"))
    if len(given) >= frames:
        raise RequestError("given", f"--given names every one of the {frames} frames: nothing to generate; leave some out")
    free = [f for f in range(frames) if f not in given]
    if req.task == "predict" and sorted(given) != list(range(len(given))):
        raise RequestError("given", f"edit predict keeps the first frames (--given 0,1,...,k-1) and generates the rest; "
                                    f"--given {','.join(map(str, given))} leaves a gap: use edit interpolate")
    if req.task == "interpolate" and not any(min(given) < f < max(given) for f in free):
        raise RequestError("given", f"edit interpolate generates frames between given ones, and --given "
                                    f"{','.join(map(str, given))} has none between: use edit predict, or give frames "
                                    "on both sides of a gap")
    if frames <= model and method == "masked" and len(given) > cap:
        raise RequestError("given", f"--given names {len(given)} frames, more than the {cap} {req.run} was trained with "
                                    f"(video.max_observed = {cap}): the masked model never saw more given frames; pass at "
                                    f"most {cap} in --given, or --method reconstruction (guidance of any number of given "
                                    "frames)")
    if frames > model:  # the stages (sizes a scheme cannot cut fail here)
        _raise_as("scheme" if req.task == "predict" else "given", video_stages, req.task, model, frames, given, req.scheme,
                  cap)
    video = _raise_as("video", read_video_input, req.video, d.channels, d.image_size, frames)
    observed = torch.zeros(frames, dtype=torch.bool)
    observed[list(given)] = True
    plan = _video_sampling(req, run)
    return dataclasses.replace(plan, shape=(d.channels, frames, d.image_size, d.image_size), model_frames=model,
                               video=video, observed=observed, method=method)


def video_stages(task: str, model: int, frames: int, given, scheme: str | None = None,
                 max_observed: int | None = None) -> list:
    """The stages (obs_indices, latent_indices) of a video edit longer than the model's `model` frames (Harvey et al.
    2022): predict, the given first frames then `scheme`'s stages (default autoregressive; tasks.video.SCHEMES);
    interpolate, tasks.video.interpolation_stages (each gap filled from both sides); each stage conditioned on at most
    `max_observed` done frames, the nearest (the run's video.max_observed, `video_limits`). ValueError for sizes that
    do not fit."""
    if task == "predict":
        return list(SCHEMES[scheme or "autoregressive"](model, frames, len(given), max_observed=max_observed))
    return interpolation_stages(model, frames, sorted(given), max_observed=max_observed)


def _resolve_video_sdedit(req: EditRequest, run: Run, frames: int) -> Plan:
    """`diffuse edit sdedit VIDEO_RUN --video IN --strength S`: the video's first `frames` frames (at most the model's:
    the whole video is noised and denoised at once) read before the model loads."""
    d, model = run.cfg.data, run.capabilities.frames
    if frames > model:
        raise RequestError("frames", f"--frames {frames}: edit sdedit noises and denoises the whole video at once, at most "
                                     f"the {model} frames of {req.run}; pass --frames {model} or fewer")
    video = _raise_as("video", read_video_input, req.video, d.channels, d.image_size, frames)
    plan = _video_sampling(req, run)
    return dataclasses.replace(plan, shape=(d.channels, frames, d.image_size, d.image_size), model_frames=model,
                               video=video)


def video_sheet(rows: Tensor, observed: Tensor | None = None, scale: int = 2) -> "Image.Image":
    """A contact sheet (visualize.contact_sheet: a row per video, a column per frame, each column's index under it) of
    videos (B, C, F, H, W) in [-1, 1], in RGB, each given frame (observed (F,) bool) framed in red in every row."""
    sheet = contact_sheet(rows, scale).convert("RGB")
    if observed is not None:
        draw = ImageDraw.Draw(sheet)
        pad, (h, w) = 2, rows.shape[-2:]  # contact_sheet's pad between tiles, in pixels before scaling
        for i in range(rows.shape[0]):
            for j in observed.nonzero()[:, 0].tolist():
                left, top = scale * (pad + j * (w + pad)), scale * (pad + i * (h + pad))
                draw.rectangle([left - scale * pad, top - scale * pad, left + scale * (w + pad) - 1,
                                top + scale * (h + pad) - 1], outline=(255, 0, 0), width=scale * pad)
    return sheet


@dataclass(frozen=True, eq=False)
class Direction:
    """An edit direction of a diffusion autoencoder: row `row` of a diffae_classifier run's weights, with the codes'
    mean and std it was trained on (Preechakul et al. 2022, sec. 4.2)."""

    run: Run
    row: int
    mean: Tensor
    std: Tensor

    def vector(self) -> Tensor:
        """The direction w (d,): the one row of a binary attribute's classifier; for class k of a softmax classifier
        w_k - mean_j w_j, since softmax is unchanged by a vector added to every row (only the differences between rows
        are trained; the common part is what initialisation left)."""
        weights = load_checkpoint(self.run.path).tensors["model"]["weight"]
        return weights[self.row] - (weights.mean(0) if len(weights) > 1 else 0)


def _resolve_direction(req: EditRequest, run: Run) -> Direction:
    """--attribute RUN[:CLASS]: a diffae_classifier run trained on this run's codes at its newest checkpoint (the codes
    of another step are other codes), and for a label classifier the class. RequestError naming the fix otherwise."""
    path, _, cls = req.attribute.rpartition(":") if ":" in req.attribute and not Path(req.attribute).exists() else \
        (req.attribute, "", "")
    clf = _raise_as("attribute", open_run, path)
    c = clf.cfg
    if clf.kind != "diffae_classifier":
        raise RequestError("attribute", f"--attribute {path} is a {clf.kind} run, not a classifier of codes; train one with "
                                        f"`diffuse train configs/diffae_thickness.toml --set semantic.run={req.run}`")
    if Path(c.semantic.run).resolve() != run.path.resolve() or c.semantic.run_step != run.step:
        raise RequestError("attribute", f"--attribute {path} was trained on the codes of {c.semantic.run} at step "
                                        f"{c.semantic.run_step}, not of {req.run} at step {run.step}: the directions of other "
                                        f"codes do not apply; train it again on this run (--set semantic.run={req.run} "
                                        "--set semantic.run_step=0), which takes seconds")
    state = _raise_as("attribute", load_checkpoint, clf.path).state
    if c.semantic.target == "label":
        if not cls.strip().isdigit() or not 0 <= int(cls) < clf.num_classes:
            raise RequestError("attribute", f"--attribute {path} is a classifier of {clf.num_classes} classes: name the class "
                                            f"to move towards, --attribute {path}:K with K in 0..{clf.num_classes - 1}")
        row = int(cls)
    else:
        if cls:
            raise RequestError("attribute", f"--attribute {path} is the one direction of '{c.semantic.target}' (more of it "
                                            "with a positive --amount); leave ':" + cls + "' out")
        row = 0
    return Direction(clf, row, torch.tensor(state["mean"]), torch.tensor(state["std"]))


def _resolve_pair(req: SampleRequest, run: Run) -> Plan:
    """`diffuse sample PRIOR`: codes from the latent DDIM (its own [sample] sampler and steps), decoded by its diffusion
    autoencoder with the request's sampling fields over that run's [sample] section (Preechakul et al. 2022, sec. 3.3)."""
    decoder = _raise_as("run", open_run, run.cfg.semantic.run)
    if decoder.kind != "diffae" or decoder.step != run.cfg.semantic.run_step:  # its decoder reads the codes of that step
        raise RequestError("run", f"{req.run} draws the codes of {run.cfg.semantic.run} at step {run.cfg.semantic.run_step}, "
                                  f"and that run is now at step {decoder.step} (its encoder, so its codes, have changed); "
                                  f"train the latent DDIM again on it (`diffuse train {run.path / 'config.toml'} --out NEW "
                                  "--set semantic.run_step=0`, a few minutes)")
    _check_weights(run, "denoiser", "run")
    for field in ("clip_run", "label", "prompt", "classifier", "guidance"):
        if getattr(req, field) is not None:
            raise RequestError(field, f"{flag(field)} does nothing here: a diffusion autoencoder's latent DDIM draws "
                                      "unconditional codes; leave it out")
    plan = _sampling(dataclasses.replace(req, run=str(decoder.path)), decoder)
    return dataclasses.replace(plan, request=req, run=run, decoder=decoder)


def _resolve_edit(req: EditRequest, run: Run) -> Plan:
    """`diffuse edit TASK RUN`: the task against the run, the input image and mask read and checked, then the sampling
    fields as `sample`'s."""
    if req.task in ("variations", "textdiff") or run.cfg.model.image_embed_dim:
        return _resolve_unclip(req, run)
    if req.task in CODED:
        return _resolve_coded(req, run)
    if run.kind == "diffae":
        raise RequestError("task", f"{req.run} is a diffusion autoencoder; its edits are {', '.join(CODED)}")
    cfg, caps = run.cfg, run.capabilities
    d, kind = cfg.data, caps.trained_task
    trained = TRAINED_TASKS.get(req.task) or ("inpaint" if req.task == "inpaint" and kind == "inpaint" else None)
    if trained is not None and kind != trained:
        raise RequestError("task", f"edit {req.task} needs a run trained for it (task.kind = '{trained}', e.g. "
                                   f"{EXAMPLE_CONFIGS[trained]}); {req.run} has task.kind = '{kind}'")
    if trained is None and kind != "none":
        raise RequestError("task", f"edit {req.task} works on a model of images (task.kind = 'none'); {req.run} is a "
                                   f"'{kind}' model, which needs its condition image: use `diffuse edit {edit_name(kind)} "
                                   f"{req.run} ...`")
    if trained == "inpaint" and req.repaint_jumps != 1:
        raise RequestError("repaint_jumps", f"--repaint-jumps does nothing here: {req.run} was trained for inpainting and "
                                            "sees the mask itself; leave it out")
    # every input is read and checked before the model loads
    side = d.image_size // cfg.task.factor if trained == "superres" else d.image_size
    image, geometry = _raise_as("image", load_image, req.image, 1 if trained == "colorize" else d.channels, side)
    mask = _raise_as("mask", load_mask, req.mask, geometry) if req.task == "inpaint" else None
    if req.task == "ilvr":
        _raise_as("factor", tasks.low_pass, image, req.factor)  # a factor that does not divide the size fails here
        if caps.latent:  # and one that is no whole number of latent cells
            _raise_as("factor", latent_factor, req.factor, diffusion_shape(cfg), d.image_size)
    if req.task == "inpaint":
        _raise_as("mask", check_mask, mask, image)
    plan = _sampling(req, run)
    return dataclasses.replace(plan, image=image, mask=mask, trained=trained)


def _resolve_unclip(req: EditRequest, run: Run) -> Plan:
    """`diffuse edit variations|interpolate|textdiff DECODER`: unCLIP's manipulations (tasks/unclip.py) with the decoder's
    own CLIP (unclip.clip at its pinned step), checked against the decoder, the input images read, the captions and theta
    checked, before any weights load. Inversion (textdiff; --invert) renders with deterministic DDIM, unguided, as
    _resolve_coded; variations without --invert sample as `diffuse sample` does, guidance on z_i included."""
    cfg, caps = run.cfg, run.capabilities
    if req.task not in UNCLIP_EDITS:
        raise RequestError("task", f"{req.run} is unCLIP's decoder (model.image_embed_dim); its edits are "
                                   f"{', '.join(UNCLIP_EDITS)}")
    if not cfg.model.image_embed_dim:
        raise RequestError("run", f"edit {req.task} needs unCLIP's decoder (a denoiser with model.image_embed_dim, e.g. "
                                  f"configs/unclip_decoder_shapes.toml); {req.run} is a {run.kind} run without a CLIP "
                                  "image embedding")
    path, clip_cfg = _raise_as("run", clip_run, cfg.unclip.clip, "the decoder's unclip.clip")
    _raise_as("run", check_clip, cfg, clip_cfg, f"the decoder's unclip.clip ({path})")
    if cfg.unclip.clip_step and cfg.unclip.clip_step not in checkpoint_folders(path):
        raise RequestError("run", f"{req.run} was trained on the embeddings of {path} at step {cfg.unclip.clip_step}, which "
                                  "that run no longer holds: restore the checkpoint (the decoder reads only that CLIP's "
                                  "embeddings)")
    if caps.text and req.prompt is None:
        raise RequestError("prompt", f"{req.run} is also text-conditional: give the caption it decodes with, --prompt")
    if req.task == "interpolate" and req.to is None:
        raise RequestError("to", "edit interpolate needs --to, the second image to interpolate towards")
    if req.task == "interpolate" and req.n < 2:
        raise RequestError("n", f"--n must be at least 2 for edit interpolate (the frames include both ends), got {req.n}")
    if req.task == "textdiff":
        for field, what in (("from_prompt", "--from, the caption of what the image shows now"),
                            ("to", "--to, the caption of what it should show")):
            if getattr(req, field) is None or not getattr(req, field).strip():
                raise RequestError(field, f"edit textdiff needs {what} (non-empty), e.g. --from \"a red circle\" --to "
                                          "\"a blue circle\"")
    inverted = req.task == "textdiff" or req.invert
    if inverted:
        if req.guidance:
            raise RequestError("guidance", "--guidance does nothing here: x_T comes from DDIM inversion, which runs the "
                                           "decoder unguided (guided DDIM does not invert); leave it out, or drop --invert")
        if req.sampler not in (None, "ddim"):
            raise RequestError("sampler", f"edit {req.task} with x_T inverted renders with DDIM (the inverse of the "
                                          "inversion): leave --sampler out, or pass --sampler ddim")
        if req.task == "variations" and not req.eta:
            raise RequestError("eta", "edit variations --invert decodes the image's own x_T, which with eta = 0 gives the "
                                      "image back n times: pass --eta E > 0 (the paper's variations; 1 is DDPM-like)")
        if req.task != "variations" and req.eta:
            raise RequestError("eta", f"edit {req.task} renders the inverted x_T with deterministic DDIM: leave --eta out")
        if (req.spacing or cfg.sample.spacing) == "leading":
            raise RequestError("spacing", "--spacing leading starts each grid at another top, so x_T inverted on "
                                          "--encode-steps would be rendered from another noise level; use trailing")
        top = getattr(Schedule.from_config(cfg.schedule), "top_step", None)
        if top is not None and req.encode_steps > top:
            raise RequestError("encode_steps", f"--encode-steps {req.encode_steps} is more than the {top} steps of "
                                               f"{req.run}'s process; give at most {top}")
    else:
        for field in ("encode_steps", "refine"):
            if getattr(req, field) != getattr(EditRequest, field):
                raise RequestError(field, f"{flag(field)} does nothing here: edit {req.task} draws x_T at random; pass "
                                          "--invert to invert the input, or leave it out")
    image, _ = _raise_as("image", load_image, req.image, cfg.data.channels, cfg.data.image_size)
    to = _raise_as("to", load_image, req.to, cfg.data.channels, cfg.data.image_size)[0] \
        if req.task == "interpolate" else None
    if inverted:
        req = dataclasses.replace(req, sampler="ddim", eta=0.0 if req.eta is None else req.eta,
                                  mixed_precision=req.mixed_precision or "no")  # float32: bf16 rounding is not inverted
    plan = _sampling(req, run)
    return dataclasses.replace(plan, image=image, to=to, clip_path=path)


def _resolve_coded(req: EditRequest, run: Run) -> Plan:
    """The edits through x_T: invert (any model of images, pixels or latents) and a diffusion autoencoder's reconstruct,
    manipulate and interpolate. Inputs read and checked, the direction resolved, before any weights load."""
    cfg = run.cfg
    if req.task in SEMANTIC_EDITS and run.kind != "diffae":
        raise RequestError("run", f"edit {req.task} needs a diffusion autoencoder (model.kind = 'diffae', "
                                  f"configs/diffae_digits.toml); {req.run} is a {run.kind} run" +
                                  ("; `diffuse edit invert` inverts any model of images" if run.kind == "denoiser" else ""))
    if run.kind not in ("denoiser", "diffae"):  # before its [data] shapes an input image it never reads
        raise RequestError("run", f"edit invert needs a model of images (a denoiser or diffusion autoencoder run); "
                                  f"{req.run} is a {run.kind} run")
    if run.capabilities.trained_task != "none":
        raise RequestError("run", f"edit invert needs a model of images (task.kind = 'none'); {req.run} is a "
                                  f"'{run.capabilities.trained_task}' model")
    if run.capabilities.text and req.prompt is None:
        raise RequestError("prompt", f"{req.run} is text-conditional: give the caption the image is inverted under, --prompt")
    if run.capabilities.classes and req.label is None:
        raise RequestError("label", f"{req.run} is class-conditional: give the class the image is inverted under, --label K")
    if req.guidance:
        raise RequestError("guidance", "--guidance does nothing here: inversion runs the model unguided (guided DDIM does "
                                       "not invert); leave it out")
    if req.classifier is not None:
        raise RequestError("classifier", "--classifier does nothing here: inversion and rendering run the model unguided; "
                                         "leave it out" + ("; the edit's direction is --attribute" if req.task ==
                                                           "manipulate" else ""))
    if req.label is not None and not run.capabilities.classes:
        raise RequestError("label", f"--label does nothing here: {req.run} is not class-conditional; leave it out" +
                                    ("; a label classifier's class is --attribute RUN:K" if req.task == "manipulate"
                                     else ""))
    if req.sampler not in (None, "ddim") or req.eta:  # (before _sampling, which would name --eta for a sampler without)
        raise RequestError("sampler" if req.sampler not in (None, "ddim") else "eta",
                           f"edit {req.task} renders x_T back with deterministic DDIM (the inverse of its inversion): "
                           "leave --sampler and --eta out, or pass --sampler ddim --eta 0")
    if req.task == "interpolate" and req.n < 2:
        raise RequestError("n", f"--n must be at least 2 for edit interpolate (the frames include both ends), got {req.n}")
    if cfg.model.self_condition:
        raise RequestError("run", f"{req.run} is self-conditioned: each step takes the previous step's x_0 estimate, which "
                                  "runs the other way when the walk is inverted, so DDIM inversion does not invert it")
    if (req.spacing or cfg.sample.spacing) == "leading":
        raise RequestError("spacing", "--spacing leading starts each grid at another top (it depends on the steps), so "
                                      "x_T inverted on --encode-steps would be rendered from another noise level; use "
                                      "trailing (the default), linspace, log_snr or karras")
    top = getattr(Schedule.from_config(cfg.schedule), "top_step", None)
    if top is not None and req.encode_steps > top:
        raise RequestError("encode_steps", f"--encode-steps {req.encode_steps} is more than the {top} steps of {req.run}'s "
                                           f"process; give at most {top}")
    image, _ = _raise_as("image", load_image, req.image, cfg.data.channels, cfg.data.image_size)
    to = _raise_as("to", load_image, req.to, cfg.data.channels, cfg.data.image_size)[0] if req.to is not None else None
    direction = _resolve_direction(req, run) if req.task == "manipulate" else None
    req = dataclasses.replace(req, sampler="ddim", eta=0.0 if req.eta is None else req.eta,
                              n=1 if req.task == "invert" else req.n,  # invert: one output (its command has no --n)
                              mixed_precision=req.mixed_precision or "no")  # float32: bf16 rounding is not inverted
    plan = _sampling(req, run)
    return dataclasses.replace(plan, image=image, to=to, direction=direction)


def _resolve_cascade(req: SampleRequest) -> Plan:
    """`diffuse sample CASCADE`: every stage's request (the sampling fields apply to every stage; the label, guidance,
    classifier and negative prompt to the first, the prompt to every text-conditional stage) resolved before the first
    stage draws."""
    if req.clip_run is not None:
        raise RequestError("clip_run", f"--clip guides one run, and {req.run} is a cascade: guide its base run "
                                       "(`diffuse sample BASE --clip ...`) or leave --clip out")
    stages, level = read_cascade(req.run)
    runs = [open_run(s) for s in stages]
    check_cascade([r.cfg for r in runs])  # before any model loads
    for r in runs:  # every stage's sampler and grid first
        _check_plan(req, r.cfg)
    plans = []
    for k, (stage, r) in enumerate(zip(stages, runs)):
        stage_req = dataclasses.replace(req, run=str(stage))
        if k > 0:  # the class, its guidance and a negative prompt steer the first stage; later ones follow its image
            stage_req = dataclasses.replace(stage_req, label=None, guidance=None, classifier=None, negative_prompt=None,
                                            prompt=req.prompt if r.capabilities.text else None)  # (Imagen: text stages)
        plans.append(_sampling(stage_req, r))
    return Plan(req, None, plans[0].device, plans[-1].shape, {}, stages=tuple(plans), aug_level=level)


# --- running a plan ----------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """A run's weights on a device: its denoiser and the space it diffuses (stages.PixelSpace, or the LatentSpace its
    samples are decoded from)."""

    denoiser: object
    space: object


def load(run: Run, ema: bool, device: str) -> Loaded:
    """The run's EMA (or raw) weights on `device`, and its space (a latent run's autoencoder loaded too)."""
    return Loaded(run.denoiser(ema=ema, device=device), run.space(device))


@dataclass
class Result:
    """What a plan made: x (n, C, H, W) in [-1, 1] (an edit's mean: one image), the images a before/after figure shows
    before the outputs (an edit's input, masked input, or reference and its low-pass; none for samples), and the
    denoiser's calls; `x_T` the inverted noise of `diffuse edit invert` (1, ...) (None otherwise), and for invert
    without reconstruct, x is empty."""

    x: Tensor
    before: list[Tensor]
    calls: int
    x_T: Tensor | None = None


def save_before_after(result: Result, path: str | Path) -> Path:
    """The before/after figure of an edit: the images before the outputs, then the outputs, in one row, 4x."""
    x = result.x
    return save_grid(torch.cat([b.to(x) for b in result.before] + [x]), path, nrow=len(result.before) + len(x), scale=4)


def _with_condition(kw: dict, cond: dict | None) -> dict:
    """generate's keyword arguments with `cond` (an input image's condition) joined to the prompt's condition that may
    be there, so a text-conditional task or cascade stage gets both."""
    both = {**(kw.get("cond") or {}), **(cond or {})}
    return {**kw, "cond": both or None}


def _model_kw(plan: Plan, loaded: Loaded, callback) -> dict:
    """generate's keyword arguments: the plan's, the prompt's condition (tokenized by the run's text encoder), the
    classifier's weights, the callback."""
    req = plan.request
    if plan.compiled:
        speed.compile_network(loaded.denoiser.net, plan.device, sampling=True)
    text = {} if req.prompt is None or not plan.run.capabilities.text else \
        prompt_condition(loaded.denoiser, req.n, req.prompt, req.negative_prompt, plan.device)
    classifier = None if plan.classifier is None else plan.classifier.classifier(device=plan.device)
    guide = {} if plan.clip_run is None else {"guide": clip_guide(plan, loaded)}
    return {**plan.generate_kw, "callback": callback, "classifier": classifier, **text, **guide}


def clip_guide(plan: Plan, loaded: Loaded) -> Callable:
    """generate's `guide` of a plan with --clip: the CLIP run loaded on the plan's device, the prompt embedded by its
    text tower (RequestError naming --prompt when it is too long for it), and (denoiser, the draw's seed: a chunk's
    own) -> kinds.clip.clip_guidance(...)
    (the decoder of a latent run's space passed to a plain CLIP, which reads the decoded x_0)."""
    req = plan.request
    _, clip = load_clip(plan.clip_run.path, plan.device)
    text_emb = _raise_as("prompt", prompt_embedding, clip, req.prompt)
    space = loaded.space
    decode = space.decode_with_grad if space.latent and not clip.noise_aware else None
    cutouts = 1 if req.clip_cutouts is None else req.clip_cutouts
    return lambda denoiser, seed: clip_guidance(denoiser, clip, text_emb, req.clip_scale, cutouts, seed, decode)


def _steps_total(plan: Plan, schedule, chunks: int = 1) -> int | None:
    """The sampler steps a stage reports (None: an adaptive solver's own count), for a progress bar."""
    kw = plan.generate_kw
    total = (kw["steps"] or getattr(schedule, "top_step", None)) if SAMPLERS[kw["sampler"]].calls_per_step else None
    return total * chunks if total and chunks > 1 else total


def execute(plan: Plan, callback: Callable[[Step], None] | None = None, *,
            load: Callable[[Run, bool, str], Loaded] = load,
            on_stage: Callable[[Plan, int | None], None] | None = None) -> Result:
    """Run a resolved plan: load the weights (`load`; the page passes its cache), then draw (in chunks of the request's
    batch_size), edit, or run a cascade's stages. `callback` gets every sampler step; `on_stage(stage plan, steps)`
    is told when a stage (the one stage of a sample or edit) starts drawing, after its weights load."""
    if plan.prior is not None:
        return _execute_pipeline(plan, callback, load, on_stage)
    if plan.stages:
        return _execute_cascade(plan, callback, load, on_stage)
    if plan.decoder is not None:
        return _execute_pair(plan, callback, load, on_stage)
    if plan.model_frames:
        return _execute_video(plan, callback, load, on_stage)
    req = plan.request
    loaded = load(plan.run, req.ema, plan.device)
    kw = _model_kw(plan, loaded, callback)
    counted = CountCalls(loaded.denoiser)
    space = loaded.space
    if isinstance(req, EditRequest) and plan.clip_path is not None:
        if on_stage is not None:  # the inversions' moves, then the renderings' steps
            inverted = (2 if req.task == "interpolate" else 1) if req.task == "textdiff" or req.invert else 0
            on_stage(plan, inverted * req.encode_steps + (_steps_total(plan, counted.schedule) or 0))
        return _unclip_edit(plan, counted, kw)
    if isinstance(req, EditRequest) and req.task in CODED:
        if on_stage is not None:  # the inversions' moves, then the renderings' steps
            render = _steps_total(plan, counted.schedule) or 0
            inversions = 2 if req.task == "interpolate" else 1
            renders = {"invert": int(req.reconstruct), "reconstruct": 1 + (req.n > 1)}.get(req.task, 1)
            on_stage(plan, inversions * req.encode_steps + renders * render)
        return _coded_edit(plan, space, counted, kw)
    if isinstance(req, EditRequest):
        if on_stage is not None:
            on_stage(plan, _steps_total(plan, counted.schedule))
        x, before = _edit(plan, space, counted, kw)
    else:
        if on_stage is not None:
            on_stage(plan, _steps_total(plan, counted.schedule, -(-req.n // req.batch_size)))
        x = space.decode(generate_in_chunks(counted, req.n, space.shape, chunk=req.batch_size, **kw))
        before = []
    return Result(x, before, counted.calls)


def _execute_video(plan: Plan, callback, load, on_stage) -> Result:
    """A video run's plan: n videos (B, C, F, H, W) drawn at once (F within the model's frames), or by the request's
    long-video scheme per chunk of batch_size (tasks.video.sample_long); or a video edit, the given frames kept by the
    plan's method (tasks.video.sample_masked, sample_reconstruction, sample_replacement)."""
    req, dev, shape = plan.request, plan.device, plan.shape
    loaded = load(plan.run, req.ema, dev)
    kw = _model_kw(plan, loaded, callback)
    counted = CountCalls(loaded.denoiser)
    steps = _steps_total(plan, counted.schedule) or 0
    rest = {k: v for k, v in kw.items() if k not in ("seed", "device", "labels")}
    labels = kw.get("labels")
    cap, span = video_limits(plan.run)
    if plan.video is not None:  # an edit: the n outputs in one batch
        long = shape[1] > plan.model_frames
        stages = video_stages(req.task, plan.model_frames, shape[1], plan.observed.nonzero()[:, 0].tolist(),
                              req.scheme, cap) if long else []
        if on_stage is not None:
            on_stage(plan, steps * max(1, len(stages)) if steps else None)
        video = plan.video.expand(req.n, *shape).to(dev)
        common = dict(seed=req.seed, device=dev, labels=labels, **rest)
        if plan.method != "masked" and plan.run.capabilities.observed:  # its unconditional mode: no frame observed
            common["cond"] = {**(rest.get("cond") or {}),
                              "observed": torch.zeros(req.n, shape[1], dtype=torch.bool, device=dev)}
        if req.task == "sdedit":
            return Result(sdedit_video(counted, video, req.strength, **common).cpu(), [plan.video], counted.calls)
        if long:
            x = sample_stages(counted, stages, video, plan.observed.nonzero()[:, 0].tolist(), frames=plan.model_frames,
                              max_observed=cap, span=span, **common)
        elif plan.method == "masked":
            x = sample_masked(counted, video, plan.observed, **common)
        elif plan.method == "replacement":
            x = sample_replacement(counted, video, plan.observed, **common)
        else:
            weight = RECONSTRUCTION_WEIGHT if req.guidance_weight is None else req.guidance_weight
            x = sample_reconstruction(counted, video, plan.observed, weight, **common)
        given = plan.observed.to(plan.video.dtype)[None, None, :, None, None]
        return Result(x.cpu(), [plan.video * given], counted.calls)  # the frames not given shown mid-grey
    chunks = -(-req.n // req.batch_size)
    if shape[1] <= plan.model_frames:
        if on_stage is not None:
            on_stage(plan, steps * chunks if steps else None)
        cond = {"observed": torch.zeros(req.n, shape[1], dtype=torch.bool)} if plan.run.capabilities.observed else None
        x = generate_in_chunks(counted, req.n, shape, chunk=req.batch_size, **_with_condition(kw, cond))
        return Result(x, [], counted.calls)
    stages = list(SCHEMES[req.scheme](plan.model_frames, shape[1], max_observed=cap))
    if on_stage is not None:
        on_stage(plan, steps * len(stages) * chunks if steps else None)
    out = []
    for k, lo in enumerate(range(0, req.n, req.batch_size)):
        b = min(req.batch_size, req.n - lo)
        part = None if labels is None else labels[lo:lo + b]
        out.append(sample_long(counted, stages, torch.zeros(b, *shape), 0, frames=plan.model_frames, max_observed=cap,
                               span=span, seed=chunk_seed(req.seed, k), device=dev, labels=part, **rest).cpu())
    return Result(torch.cat(out), [], counted.calls)


def _edit(plan: Plan, space, counted, kw: dict) -> tuple[Tensor, list[Tensor]]:
    """The edit: a latent run edits its latents (tasks.editing.latent_edit), a trained-task run draws from its
    condition, a model of images runs SDEdit, inpainting (RePaint) or ILVR."""
    req, cfg, image, mask = plan.request, plan.run.cfg, plan.image, plan.mask
    d = cfg.data
    batch = image.expand(req.n, *image.shape[1:]).to(plan.device)
    if space.latent:  # the editing tasks run on z = s E(x), their outputs decoded
        own = {"sdedit": dict(strength=req.strength), "ilvr": dict(factor=req.factor, options={"t_stop": req.t_stop}),
               "inpaint": dict(options={"jump_length": req.repaint_length, "jump_n_samples": req.repaint_jumps})}
        x = latent_edit(req.task, counted, space, batch, mask, **own[req.task], **kw)
        before = [image * mask] if req.task == "inpaint" else [image]
    elif plan.trained is not None:
        g = torch.Generator(plan.device).manual_seed(req.seed + 1)  # the augmentation noise of a cascade's stage 2
        cond = input_condition(cfg.task, batch, d.image_size, counted.schedule, mask=mask, generator=g)
        x = generate(counted, req.n, (d.channels, d.image_size, d.image_size), **_with_condition(kw, cond))
        before = [viewable(cond["image"][:1], d.channels)]
    elif req.task == "sdedit":
        x = tasks.sdedit(counted, batch, req.strength, **kw)
        before = [image]
    elif req.task == "inpaint":
        x = tasks.inpaint(counted, batch, mask, jump_length=req.repaint_length, jump_n_samples=req.repaint_jumps, **kw)
        before = [image * mask]  # the region to generate shown as mid-grey (0 in [-1, 1])
    else:
        x = tasks.ilvr(counted, batch, req.factor, t_stop=req.t_stop, **kw)
        before = [image, tasks.low_pass(image, req.factor)]  # the reference and the low-pass the outputs share
    if req.mean:  # samples of p(x | input) average towards E[x | input]: more PSNR, less detail (Blau & Michaeli 2018)
        x = x.mean(0, keepdim=True)
    return x, before


def _coded_edit(plan: Plan, space, counted, kw: dict) -> Result:
    """invert, reconstruct, manipulate, interpolate: the input's x_T by DDIM inversion (req.encode_steps, under z_sem for
    a diffusion autoencoder, in latent space for a latent run), then deterministic DDIM back at the plan's steps,
    unclipped unless --threshold says otherwise (clipping is not inverted)."""
    req, dev = plan.request, plan.device
    common = dict(spacing=kw["spacing"], mixed_precision=kw["mixed_precision"], device=dev)
    inv = dict(common, steps=req.encode_steps, refine=req.refine, callback=kw["callback"])
    render = dict(common, steps=kw["steps"], seed=req.seed, callback=kw["callback"],
                  clip=kw["clip"] if req.threshold is not None else False)
    image = plan.image.to(dev)
    if req.task == "invert" and plan.run.kind == "diffae":  # x_T under the image's own z_sem
        z, x_T = semantic.encode(counted, image, **inv)
        x = semantic.decode(counted, z, x_T, **render) if req.reconstruct else image[:0]
        return Result(x, [image], counted.calls, x_T=x_T.cpu())
    if req.task == "invert":
        cond = {**(kw.get("cond") or {}), **({"label": kw["labels"][:1].to(dev)} if kw.get("labels") is not None else {})}
        x0 = space.encode(image)
        x_T = invert(counted, x0, cond=cond or None, **inv)
        x = image[:0]
        if req.reconstruct:
            x = space.decode(generate(counted, 1, space.shape, sampler="ddim", eta=0.0, cond=cond or None,
                                      start=(x_T, 1.0), **render))
        return Result(x, [image], counted.calls, x_T=x_T.cpu())
    z, x_T = semantic.encode(counted, image, **inv)
    if req.task == "reconstruct":  # the inferred x_T, then z_sem's variations from random x_T
        x = semantic.decode(counted, z, x_T, **render)
        if req.n > 1:
            x = torch.cat([x, semantic.decode(counted, z.expand(req.n - 1, -1), None, **render)])
        return Result(x, [image], counted.calls)
    if req.task == "manipulate":  # amounts 0 .. s along the direction, the same x_T (one image: s alone)
        d = plan.direction
        w, steps = d.vector(), semantic.amounts(req.amount, req.n)
        codes = torch.cat([semantic.edit_code(z, w, a, d.mean, d.std) for a in steps])
        x = semantic.decode(counted, codes, x_T.expand(len(steps), *x_T.shape[1:]), **render)
        return Result(x, [image], counted.calls)
    z_b, x_b = semantic.encode(counted, plan.to.to(dev), **inv)  # interpolate: lerp of z_sem, slerp of x_T
    codes, noises = semantic.interpolation(z[0], z_b[0], x_T[0], x_b[0], req.n)
    return Result(semantic.decode(counted, codes, noises, **render), [image, plan.to], counted.calls)


def _unclip_edit(plan: Plan, counted, kw: dict) -> Result:
    """variations, interpolate, textdiff of unCLIP's decoder (tasks/unclip.py): z_i of the input(s) by the decoder's
    CLIP, x_T drawn (from --seed) or inverted (--encode-steps; textdiff always), then decoded. A caption's tokens
    (text-conditional decoders) go with every call."""
    req, dev = plan.request, plan.device
    _, clip = load_clip(plan.clip_path, dev, plan.run.cfg.unclip.clip_step or None)
    image = plan.image.to(dev)
    z = unclip.image_embeddings(clip, image)  # (1, D)

    def text(n: int) -> dict:
        return {k: v[:1].expand(n, *v.shape[1:]) for k, v in (kw.get("cond") or {}).items()}

    common = dict(spacing=kw["spacing"], mixed_precision=kw["mixed_precision"], device=dev)
    inv = dict(common, steps=req.encode_steps, refine=req.refine, callback=kw["callback"])
    render = dict(common, steps=kw["steps"], seed=req.seed, callback=kw["callback"],
                  clip=kw["clip"] if req.threshold is not None else False)
    if req.task == "variations" and not req.invert:  # z_i fixed, each output its own x_T
        rest = {k: v for k, v in kw.items() if k not in ("cond", "labels", "classifier", "device", "seed")}
        x = unclip.variations(counted, z[0], req.n, seed=req.seed, cond=text(req.n) or None, device=dev, **rest)
        return Result(x, [image], counted.calls)
    if req.task == "variations":  # the image's own x_T, decoded by DDIM with eta > 0
        x_T = unclip.invert_image(counted, image, z, cond=text(1) or None, **inv)
        x = unclip.decode(counted, z.expand(req.n, -1), x_T.expand(req.n, *x_T.shape[1:]), cond=text(req.n) or None,
                          eta=req.eta, **render)
        return Result(x, [image], counted.calls)
    if req.task == "interpolate":
        to = plan.to.to(dev)
        z_b = unclip.image_embeddings(clip, to)
        codes = unclip.interpolation(z[0], z_b[0], req.n)
        if req.invert:  # both ends inverted, x_T by slerp: the ends reconstruct their images
            x_a = unclip.invert_image(counted, image, z, cond=text(1) or None, **inv)
            x_b = unclip.invert_image(counted, to, z_b, cond=text(1) or None, **inv)
            noises = semantic.slerp(x_a[0], x_b[0], torch.linspace(0, 1, req.n, dtype=torch.float64))
        else:  # one x_T for the whole path
            noises = unclip.fixed_noise(counted, req.n, req.seed, dev)
        return Result(unclip.decode(counted, codes, noises, cond=text(req.n) or None, **render), [image, plan.to],
                      counted.calls)
    z_d = unclip.text_direction(clip, req.from_prompt, req.to, dev)  # textdiff: theta 0 .. theta from the inverted x_T
    theta = unclip.THETA_PAPER if req.theta is None else req.theta
    thetas = torch.tensor([theta] if req.n == 1 else torch.linspace(0, theta, req.n).tolist(), dtype=torch.float64)
    codes = unclip.text_diff(z[0], z_d, thetas)
    x_T = unclip.invert_image(counted, image, z, cond=text(1) or None, **inv)
    x = unclip.decode(counted, codes, x_T.expand(len(codes), *x_T.shape[1:]), cond=text(len(codes)) or None, **render)
    return Result(x, [image], counted.calls)


def _execute_pair(plan: Plan, callback, load, on_stage) -> Result:
    """`diffuse sample PRIOR`: the latent DDIM's codes (kinds.diffae.sample_pair), decoded by its diffusion autoencoder
    at the plan's sampling settings, in chunks of the request's batch size."""
    req, prior_run = plan.request, plan.run
    prior = CountCalls(load(prior_run, req.ema, plan.device).denoiser)
    decoder = CountCalls(load(plan.decoder, req.ema, plan.device).denoiser)
    if on_stage is not None:
        on_stage(plan, _steps_total(plan, decoder.schedule, -(-req.n // req.batch_size)))
    state = read_state(prior_run.path, prior_run.step)  # the training codes' mean and std, saved with the latent DDIM
    stats = {"mean": torch.tensor(state["mean"]), "std": torch.tensor(state["std"])}
    kw = {k: v for k, v in plan.generate_kw.items() if k not in ("labels", "guidance", "guidance_interval", "seed", "device")}
    out = []
    for k, lo in enumerate(range(0, req.n, req.batch_size)):
        out.append(sample_pair(prior, decoder, stats, prior_run.cfg, min(req.batch_size, req.n - lo), plan.shape,
                               seed=chunk_seed(req.seed, k), device=plan.device, decoder_kw=kw, callback=callback))
    return Result(torch.cat(out), [], prior.calls + decoder.calls)


def _execute_cascade(plan: Plan, callback, load, on_stage) -> Result:
    """The base run's samples, then each super-resolution stage conditioned on the previous stage's output (Ho et al.
    2021), its input noised to the cascade's (or its own) aug_level; each stage its own noise."""
    x, calls = None, 0
    for k, stage in enumerate(plan.stages):
        req = stage.request
        loaded = load(stage.run, req.ema, stage.device)
        kw = _model_kw(stage, loaded, callback)
        counted = CountCalls(loaded.denoiser)
        if on_stage is not None:
            on_stage(stage, _steps_total(stage, counted.schedule))
        cond = None
        if k > 0:
            cfg = stage.run.cfg
            task = cfg.task if plan.aug_level is None else dataclasses.replace(cfg.task, aug_level=plan.aug_level)
            g = torch.Generator(stage.device).manual_seed(req.seed + k)
            cond = input_condition(task, x, cfg.data.image_size, counted.schedule, generator=g)
        kw["seed"] = req.seed + 1000 * k  # each stage its own noise
        x = loaded.space.decode(generate(counted, req.n, loaded.space.shape, **_with_condition(kw, cond)))
        calls += counted.calls
    return Result(x, [], calls)


# --- unCLIP pipelines (FOLDER/unclip.toml: tasks/unclip.py read_pipeline) --------------------------------------------
def _refuse_pipeline_fields(req: SampleRequest) -> None:
    """--prior-guidance and --best-of are an unCLIP pipeline's; RequestError naming the fix for any other run."""
    for field in ("prior_guidance", "best_of"):
        if getattr(req, field) is not None:
            raise RequestError(field, f"{flag(field)} steers the prior of an unCLIP pipeline folder (one holding "
                                      f"{unclip.PIPELINE_FILE}), and {req.run} is none: leave it out, or sample a "
                                      "pipeline folder")


def _open_pipeline(req: SampleRequest) -> tuple[unclip.Pipeline, Run, Run]:
    """The pipeline folder's unclip.toml read, its two runs opened and checked as one pipeline (same CLIP checkpoint),
    before any weights load. RequestError of `run` (FileNotFoundError for a missing run folder) naming the problem."""
    pipe = _raise_as("run", unclip.read_pipeline, req.run)
    configs = [_raise_as("run", load_config, path / "config.toml") for path in (pipe.prior, pipe.decoder)]
    _raise_as("run", unclip.check_pipeline, pipe, *configs)  # before either run's checkpoint is looked at
    return pipe, open_run(str(pipe.prior)), open_run(str(pipe.decoder))


def _resolve_pipeline(req: SampleRequest) -> Plan:
    """`diffuse sample PIPE --prompt ...` (the prior draws z_i, the decoder the images) or `diffuse edit
    variations|interpolate|textdiff PIPE ...` (the decoder's edits, as `diffuse edit TASK DECODER`), every check made
    before any weights load. An edit's plan is its decoder's, with the request naming the folder (Plan.argv)."""
    pipe, prior, decoder = _open_pipeline(req)
    if isinstance(req, EditRequest):
        if req.task not in UNCLIP_EDITS:
            raise RequestError("task", f"{req.run} is an unCLIP pipeline; its edits are {', '.join(UNCLIP_EDITS)} (by its "
                                       f"decoder {pipe.decoder})")
        plan = _resolve_unclip(dataclasses.replace(req, run=str(pipe.decoder)), decoder)
        return dataclasses.replace(plan, request=dataclasses.replace(plan.request, run=req.run))
    _refuse_frames(req, f"{req.run} is an unCLIP pipeline of images")
    for field in ("clip_run", "label", "classifier", "negative_prompt"):
        if getattr(req, field) is not None:
            raise RequestError(field, f"{flag(field)} does nothing here: an unCLIP pipeline draws from --prompt alone (its "
                                      "prior reads the caption, its decoder the prior's image embedding); leave it out")
    if req.prompt is None:
        raise RequestError("prompt", f'{req.run} is an unCLIP pipeline: say what to draw with --prompt, e.g. --prompt '
                                     '"a red circle"')
    _raise_as("prompt", check_prompts, req.prompt)
    w = req.prior_guidance if req.prior_guidance is not None else \
        pipe.prior_guidance if pipe.prior_guidance is not None else prior.cfg.sample.guidance
    w = _raise_as("prior_guidance", check_guidance_scale, w, "prior's classifier-free guidance", "--prior-guidance")
    best_of = req.best_of or pipe.best_of or unclip.BEST_OF_PAPER
    if prior.step is None:
        load_checkpoint(prior.path)  # raises FileNotFoundError naming why (no checkpoint, or none valid)
    stage = dataclasses.replace(req, run=str(pipe.decoder), prior_guidance=None, best_of=None,
                                prompt=req.prompt if decoder.capabilities.text else None)
    plan = _sampling(stage, decoder)  # the sampling flags and --guidance (on z_i) are the decoder's
    return dataclasses.replace(plan, request=req, prior=prior, prior_kw={"guidance": w, "best_of": best_of})


def _execute_pipeline(plan: Plan, callback, load, on_stage) -> Result:
    """unCLIP (Ramesh et al. 2022, fig. 2): n image embeddings z_i ~ p(z_i | y) of the prompt y, each the best of k
    prior draws (kinds.unclip.sample_image_embeddings, the prior's own sampler and steps, from --seed), then the decoder's
    images x ~ p(x | z_i) (and the caption's tokens where the decoder reads text), drawn with the plan's sampling
    settings in chunks of the request's batch size from --seed + 1000 (its own noise, as a cascade's second stage)."""
    req, dev = plan.request, plan.device
    prior = load_prior(plan.prior.path, dev, ema=req.ema)
    prior = dataclasses.replace(prior, denoiser=CountCalls(prior.denoiser))
    z = _raise_as("prompt", sample_image_embeddings, prior, [req.prompt] * req.n, plan.prior_kw["guidance"],
                  best_of=plan.prior_kw["best_of"], seed=req.seed)  # (n, D) unit, on the CPU
    loaded = load(plan.run, req.ema, dev)
    kw = _with_condition(_model_kw(plan, loaded, callback), {"image_embed": z.to(dev)})
    counted = CountCalls(loaded.denoiser)
    if on_stage is not None:
        on_stage(plan, _steps_total(plan, counted.schedule, -(-req.n // req.batch_size)))
    kw["seed"] = pipeline_decoder_seed(req.seed)
    x = loaded.space.decode(generate_in_chunks(counted, req.n, loaded.space.shape, chunk=req.batch_size, **kw))
    return Result(x, [], prior.denoiser.calls + counted.calls)


def pipeline_decoder_seed(seed: int) -> int:
    """The seed of an unCLIP pipeline's decoder draws: --seed + 1000 (the prior draws from --seed itself)."""
    return seed + 1000
