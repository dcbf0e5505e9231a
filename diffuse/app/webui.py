"""`diffuse serve`: a local web page (Gradio) to sample from, edit with and inspect trained runs.

    diffuse serve RUN [RUN ...] [--port 7860] [--host 127.0.0.1] [--device cpu|cuda] [--auth-file FILE]
                  [--max-upload-mb 20] [--max-upload-pixels 16777216] [--queue-size 16] [--jobs-per-client 2]
                                                                                    (pip install -e ".[ui]")

The page has up to five tabs (Sample and Edit for the diffusion runs served, Autoencode for the diffusion
autoencoders, Segment for the segmentation runs):
    Sample  the run (a denoiser, or a diffusion autoencoder's latent DDIM, whose codes its autoencoder decodes at
            these settings), sampler, steps, spacing, guidance weight, class label (or, for a text-conditional run, the
            prompt and a negative prompt), seed and number of images; the predicted x_0 shown as it forms (decoded,
            for a latent-diffusion run), a progress bar, the final grid and a GIF of the trajectory x_t to download, and
            the `diffuse sample ...` command line that reproduces the grid pixel for pixel.
    Edit    an uploaded image (or one of the last samples) in an image editor: inpaint the drawn region, SDEdit the
            drawn strokes, ILVR on the image as reference, or the trained task of a superres / colorize / uncrop /
            restore / inpainting run; the before/after figure, the files and the `diffuse edit ...` command line.
            (`diffuse edit invert`, whose output is the noise x_T in a .safetensors file, is the command line's only.)
    Autoencode  an uploaded image through a diffusion autoencoder (model.kind = "diffae", Preechakul et al. 2022):
            reconstruct it (and its code's variations), manipulate it along an attribute (a served diffae_classifier
            run trained on its codes; a label classifier's class) by an amount, or interpolate to a second upload, as a
            strip of frames; encode and render steps; the strip, the before/after figure, the files and the
            `diffuse edit reconstruct|manipulate|interpolate ...` command line.
    unCLIP  an unCLIP pipeline folder (FOLDER/unclip.toml: a prior and a decoder on one CLIP) or a decoder run: a prompt
            -> images (a folder's prior draws z_i, best of k, its decoder the images), an uploaded image -> its
            variations, two images -> an interpolation strip, an image and two captions -> a text diff by theta; the
            outputs, the before/after figure, the files and the `diffuse sample|edit ... FOLDER` command line. A
            decoder served here is offered on this tab only (Sample and Edit refuse it).
    Segment an uploaded image segmented by a segmentation run (model.kind = "segmenter"): the overlay figure of
            `diffuse segment` (the image, its labels over it with a legend, the uncertainty map in nats), a table of
            each class's share of the pixels and mean uncertainty, and the mask and figure files to download.
    Runs    each run's config, loss curve, sample grids over training and eval.json figures, read again whenever the
            tab is shown (a `diffuse ema` folder: its parent run's log and grids); an empty box says why it is empty.

It is a thin layer over the library: the widgets make a request (app/requests.py: `page_request`), which `resolve`
checks and `execute` runs as they run `diffuse sample` / `diffuse edit`, so the command line printed under a result
(`Plan.argv`) reproduces it pixel for pixel, and a bad choice gets the command line's message with each flag named by
its widget (`LABELS`). Long jobs (sampling, editing, segmenting) run one at a time on the device in the order they
came (`DeviceQueue`: at most `Limits.queue` running or waiting, `Limits.per_client` of them from one address), each
in a worker thread that the Cancel button stops at its next sampler step; every run's model is loaded once and kept.
Bad inputs (a file that is not an image, a mask of another size, a guidance weight the run cannot use) give a message
on the page, never a traceback, and the server keeps serving. An upload is checked on its header before it is decoded
(`Limits.upload_pixels`; its bytes by `Limits.upload_mb` as it arrives) and reduced to a working size near the model's
(`working_size`), so a small file of huge dimensions costs neither memory nor the editor's strokes.

Nothing leaves the machine: Gradio's analytics are off (GRADIO_ANALYTICS_ENABLED=False, set before Gradio is
imported), no share link is ever made, and the server listens on 127.0.0.1 unless --host says otherwise; any other
host needs a login (--auth, --auth-file or $DIFFUSE_AUTH: `read_auth`, `check_exposure`). Ctrl+C and SIGTERM close the
server and remove the folder of the jobs' files.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import math
import os
import queue
import shlex
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import tomli_w
import torch
from PIL import Image
from torch import Tensor

from .. import pretrained
from .requests import (CODED, VIDEO_METHODS, parse_given, video_sheet, EditRequest, Loaded, RequestError, SampleRequest, execute, load, resolve,
                           save_before_after)
from ..checkpoint import read_json_records, read_log, read_state, write_atomically
from ..config import load_config, to_dict
from ..data import load_image, open_image
from ..data.images import ImageTooLarge
from ..kinds.segmentation import SegmentationRun
from ..runs import SEMANTIC_EDITS, Run, open_run
from ..samplers import SAMPLERS, Step
from ..schedule import SPACINGS
from ..stages import diffusion_shape
from ..tasks.editing import STRENGTH_HELP, latent_factor
from ..tasks import unclip
from ..tasks.semantic import amounts
from ..train import feature_network
from ..data.video import gif_frame_count, imageio_v3
from ..visualize import grid, save_gif, save_grid, save_image, save_video
from .segment import Segmented, check_segmenter, output_paths

INSTALL = 'pip install -e ".[ui]"'
ALL_CLASSES = "all classes in turn"
EDITS = {  # edit name -> what it does, as the page says it
    "inpaint": "fill the region painted on the image (any brush colour), keep the rest (RePaint)",
    "sdedit": "noise the image with the strokes painted over it (pick their colours) to the strength, then denoise "
              "(SDEdit)",
    "ilvr": "new samples that share the image's block means at the factor (ILVR)",
    "superres": "the image is the low-resolution input of the super-resolution run",
    "colorize": "the image is made grayscale and coloured by the colorization run",
    "uncrop": "the border of the image is generated by the uncropping run",
    "restore": "the image is the compressed input of the JPEG-restoration run",
}
PREVIEWS = 20        # predicted-x_0 previews (and GIF frames) per job, at most
MAX_IMAGES = 64      # images per job: one batch, within one chunk of `diffuse sample` (128), so the command draws them alike
DISPLAY_SIDE = 320   # images on the page are scaled up (nearest neighbour) to about this width
EDITOR_SIDE = 256    # an image in the editor is scaled up by a whole factor to at least this side, for drawing
GRIDS = 24           # sample grids over training the Runs tab shows, at most
PACKAGE = Path(__file__).resolve().parent  # warnings raised in here are a job's notes
SERVED_KINDS = ("denoiser", "segmenter", "diffae", "diffae_prior", "diffae_classifier")  # model.kind of the runs a
#   page serves: Sample and Edit (denoisers; Sample also a latent DDIM), Segment, Autoencode (its attribute classifiers)
#   (and unCLIP: pipeline folders, FOLDER/unclip.toml, whose prior is an "unclip_prior" run, and decoders)
UNCLIP_MODES = {  # the unCLIP tab's modes -> what each does, as the page says it (tasks/unclip.py; requests.py)
    "prompt": "the prior draws CLIP image embeddings z_i for the prompt (best of k), the decoder draws an image from each "
              "(`diffuse sample PIPE --prompt ...`; a pipeline folder only)",
    "variations": "the image's CLIP embedding z_i kept, a new decoder noise x_T for each output",
    "interpolate": "z_i slerped from the image to the second image, one x_T for the whole strip (both ends included)",
    "textdiff": "z_i rotated towards the difference of the captions' text embeddings by theta (0 .. theta along the "
                "strip), decoded from the image's inverted x_T",
}
MODEL_KINDS = ("denoiser", "diffae", "diffae_prior")  # the served kinds with a denoiser to load
SEMANTIC_ABOUT = {  # a diffusion autoencoder's edit -> what it does, as the page says it (tasks/semantic.py)
    "reconstruct": "the image's semantic code z_sem and its noise x_T (DDIM inversion) rendered back, then variations of "
                   "z_sem from random x_T (what the code alone holds)",
    "manipulate": "the image's code moved along the attribute's direction, amounts 0 .. the amount along the strip, "
                  "rendered with the image's own x_T",
    "interpolate": "frames from the image to the second image: z_sem by lerp, x_T by slerp (both ends included)",
}
SHARE_HEADERS = ["class", "share of the pixels", "mean uncertainty (nats)"]  # the Segment tab's table
CSS = """
#s-image img, #e-image img, #a-strip img, #a-inputs img, #s-gif img {object-fit: contain; image-rendering: pixelated;
  padding-top: 30px; box-sizing: border-box}
#r-grids img {image-rendering: pixelated}
#r-loss img, #e-figure img, #a-figure img, #g-figure img {object-fit: contain}
"""  # grids fill their box (Gradio's images only shrink to fit), scaled up as pixels, not blurred, below the label
CANCELLED = "cancelled: nothing was saved (an image above is the last preview)"  # neutral: no error
AUTH_ENV = "DIFFUSE_AUTH"  # USER:PASSWORD of the page's login, when --auth / --auth-file are not given
HINTS = {  # one line under a sampling control: what it changes
    "sampler": "the update rule: ddim and dpmpp-2m are deterministic and good in 10-25 steps; ddpm, euler-ancestral and "
               "the sde ones add fresh noise each step and want more",
    "spacing": "where the steps fall in time: trailing, karras and log_snr start at pure noise; leading starts one "
               "stride below it (Lin et al. 2024)",
    "guidance": "classifier-free w: eps = (1 + w) eps(x, c) - w eps(x); 0 is the conditional model, larger follows the "
                "label or prompt more closely and varies less",
}


@dataclass(frozen=True)
class Limits:
    """What one server takes (each a flag of `diffuse serve`): an upload's file size in MB (--max-upload-mb, refused by
    Gradio as it arrives), its pixels (--max-upload-pixels, checked on the file's header before it is decoded), the jobs
    running or waiting on the device (--queue-size) and of them from one client address (--jobs-per-client)."""

    upload_mb: float = 20            # a phone photo is 2-12 MB
    upload_pixels: int = 4096 * 4096  # 16.8 million: 64 MB decoded as RGBA; a JPEG over it is decoded at 1/2..1/8 scale
    queue: int = 16                  # jobs on the device, running or waiting
    per_client: int = 2              # of those, from one client address: one running and one waiting

    def __post_init__(self):
        for name, low in (("upload_mb", 0), ("upload_pixels", 1), ("queue", 1), ("per_client", 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < low or (name == "upload_mb" and value * 2**20 < 1):
                raise ValueError(f"--{FLAGS[name]} must be a number {'> 0' if low == 0 else '>= 1'}, got {value!r}")


FLAGS = {"upload_mb": "max-upload-mb", "upload_pixels": "max-upload-pixels", "queue": "queue-size",
         "per_client": "jobs-per-client"}  # Limits' fields as `diffuse serve` flags


def _gradio():
    """Gradio, imported with its analytics off. Raises ValueError naming the install command when it is missing or
    older than 6 (Gradio 5's page loads fonts and a script from the internet, and its editor and messages differ)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError as e:
        raise ValueError(f"the web UI needs Gradio, which is not installed ({e}); install it with {INSTALL}") from e
    major = gradio.__version__.split(".")[0]
    if not major.isdigit() or int(major) < 6:
        raise ValueError(f"the web UI needs Gradio 6 or newer, found {gradio.__version__} (older pages fetch fonts and "
                         f"scripts from the internet); upgrade with pip install -U \"gradio>=6\"")
    return gradio


# --- what the page asks for: requests of app/requests.py, built from the widgets --------------------------------------
LABELS = {  # request field -> how the page names it, in place of the command line's flag (RequestError.named)
    "run": "the run", "n": "the number of images", "sampler": "the sampler", "steps": "the steps", "spacing": "the spacing",
    "guidance": "the guidance weight", "label": "the class label", "seed": "the seed", "ema": "the EMA weights",
    "prompt": "the prompt", "negative_prompt": "the negative prompt", "task": "the edit", "image": "the image",
    "mask": "the mask", "strength": "the SDEdit strength", "factor": "the ILVR factor", "t_stop": "ILVR's t_stop",
    "repaint_jumps": "RePaint's resamplings", "repaint_length": "RePaint's jump length",
}
AE_COUNT = {  # the Autoencode tab's number of images, as it reads in each mode
    "reconstruct": "number of images (the reconstruction, then variations of its code)",
    "manipulate": "number of images (amounts 0 .. the amount)",
    "interpolate": "number of frames (both images included)",
}
AUTOENCODE_LABELS = LABELS | {  # the Autoencode tab's widgets
    "run": "the diffusion autoencoder run", "task": "the mode", "image": "the image", "to": "the second image",
    "attribute": "the attribute", "amount": "the amount", "encode_steps": "the encode steps", "steps": "the render steps",
}


UNCLIP_LABELS = LABELS | {  # the unCLIP tab's widgets
    "run": "the pipeline or decoder", "task": "the mode", "image": "the image", "to": "the second image (interpolate), the caption to (textdiff)",
    "from_prompt": "the caption from", "theta": "theta", "guidance": "the decoder's guidance weight",
    "prior_guidance": "the prior's guidance weight", "best_of": "best of k", "steps": "the decoder's steps",
}


def page_request(cls, run: Run | None, name: str, sampler, steps, spacing, guidance, label, seed, n, ema, prompt,
                 negative, device: str | None = None, **extra) -> SampleRequest:
    """A SampleRequest (or EditRequest, with the edit's own `extra` fields) of the page's widgets for the served run
    `run` (None: a run this server does not offer, refused by `Models.run`): what a widget shows is what the request
    asks, except that an adaptive solver is given no steps or spacing (it picks its own), a run that cannot take
    guidance no weight, an empty prompt box no prompt, and a run without captions none of the hidden prompt boxes.
    `device`: the server's --device, said in the command line only when the server was given one."""
    caps = run.capabilities if run is not None else None
    adaptive = sampler in SAMPLERS and SAMPLERS[sampler].calls_per_step == 0
    if isinstance(n, (int, float)) and n > MAX_IMAGES:
        raise RequestError("n", f"--n is at most {MAX_IMAGES} on this page (one batch on the device; the command line "
                                f"draws any number), got {n}")
    text = caps is not None and caps.text
    return cls(run=name, n=n, sampler=sampler, steps=None if adaptive else steps, spacing=None if adaptive else spacing,
               guidance=guidance if caps is None or caps.guidance_keys else None,
               label=None if label in (None, ALL_CLASSES) else _whole(label), seed=seed, ema=bool(ema),
               prompt=(prompt or None) if text else None, negative_prompt=(negative or None) if text else None,
               device=device, **extra)


def edit_fields(task: str, strength, factor, t_stop, jumps, length, mask: str | None) -> dict:
    """The Edit tab's widgets of `task`'s own fields (app.requests.TASK_FIELDS); the others stay at their defaults."""
    return {"sdedit": dict(strength=strength), "ilvr": dict(factor=factor or 1, t_stop=t_stop or 0.0),
            "inpaint": dict(mask=mask, repaint_jumps=jumps or 1, repaint_length=length or 10)}.get(task, {})


def _whole(value):
    """A dropdown's text as a whole number when it is one (the request checks it either way)."""
    try:
        return int(value) if float(value) == int(value) else value
    except (TypeError, ValueError):
        return value


# --- models and jobs ---------------------------------------------------------------------------------------------
@dataclass
class Model:
    """A served run: what it can do (runs.open_run), its weights and space on the server's device (app.requests.Loaded),
    and the warnings loading them gave (e.g. an EMA that is still mostly the initial weights), which the page repeats
    with every job on it."""

    run: Run
    loaded: Loaded
    notes: list[str]


class Models:
    """The runs a server offers, each opened once (`opened`: what it can do) and its weights loaded once (EMA or raw)
    and kept on the device: `runs` the runs to sample from (Sample: denoisers and diffusion autoencoders' latent DDIMs,
    whose autoencoders, `decoders`, are loaded and kept too), `editors` the denoisers (Edit), `autoencoders` the
    diffusion autoencoders (Autoencode) and `attributes` the classifiers of their codes, `segmenters` the segmentation
    runs (Segment), `all` of them, in the order given (Runs).

    Raises FileNotFoundError for a folder that is not a run (or a latent DDIM whose autoencoder is gone) and ValueError
    for a run of a kind the page does not serve."""

    def __init__(self, runs: list[str], device: str):
        if not runs:
            raise ValueError("give at least one run folder to serve")
        given = list(dict.fromkeys(str(r) for r in runs))
        self.pipelines = {run: self._pipeline(run) for run in given if unclip.is_pipeline(run)}  # unCLIP folders
        parts = [str(p) for pipe in self.pipelines.values() for p in (pipe.prior, pipe.decoder)]
        self.all = list(dict.fromkeys([r for r in given if r not in self.pipelines] + parts))  # (Runs: each run)
        self.device = device
        self.opened = {run: open_run(run) for run in self.all}  # a folder that is not a run fails here, by name
        for run, r in self.opened.items():
            if r.kind not in SERVED_KINDS and not (r.kind == "unclip_prior" and run in parts):
                raise ValueError(f"{run} holds a {r.kind} (model.kind = {r.kind!r}), not a denoiser to sample from or a "
                                 "segmenter to segment with; serve denoiser, diffusion autoencoder or segmentation runs")
        kinds = lambda *k: [run for run in self.all if self.opened[run].kind in k]  # noqa: E731
        decoders = [run for run in kinds("denoiser") if self.opened[run].cfg.model.image_embed_dim]  # unCLIP's
        self.unclips = list(self.pipelines) + [run for run in decoders if run in given]  # the unCLIP tab's
        self.runs = [run for run in kinds("denoiser", "diffae_prior") if run not in decoders]
        self.editors = [run for run in kinds("denoiser") if not self.opened[run].capabilities.video and run not in decoders]
        self.videos = [run for run in kinds("denoiser") if self.opened[run].capabilities.video]  # the Video tab's
        self.autoencoders, self.attributes, self.segmenters = kinds("diffae"), kinds("diffae_classifier"), kinds("segmenter")
        self.decoders = {run: self._decoder(run) for run in kinds("diffae_prior")}
        self._loaded: dict[tuple[str, bool], Model] = {}
        self._segmenters: dict[str, SegmentationRun] = {}
        self._lock = threading.Lock()

    def _pipeline(self, folder: str) -> unclip.Pipeline:
        """An unCLIP pipeline folder read and checked (tasks/unclip.py: both runs there, of their kinds, on one CLIP
        checkpoint) as `diffuse sample FOLDER` checks it: ValueError or FileNotFoundError naming the problem."""
        pipe = unclip.read_pipeline(folder)
        unclip.check_pipeline(pipe, *(load_config(p / "config.toml") for p in (pipe.prior, pipe.decoder)))
        return pipe

    def unclip_decoder(self, run: str) -> str:
        """The served name of the decoder an unCLIP tab choice uses: a pipeline folder's decoder, or the decoder itself."""
        return str(self.pipelines[run].decoder) if run in self.pipelines else run

    def prior_defaults(self, run: str) -> tuple[float | None, int | None]:
        """(the prior's guidance weight, best-of k) a pipeline folder samples with when a request leaves them out: its
        unclip.toml's, else the prior run's sample.guidance and the paper's 2; (None, None) for a decoder."""
        if run not in self.pipelines:
            return None, None
        pipe = self.pipelines[run]
        w = pipe.prior_guidance if pipe.prior_guidance is not None else self.opened[str(pipe.prior)].cfg.sample.guidance
        return w, pipe.best_of or unclip.BEST_OF_PAPER

    def unclip_run(self, run: str) -> Run:
        """The decoder run (opened) of an unCLIP tab choice (ValueError for one this server does not offer)."""
        if run not in self.unclips:
            raise ValueError(f"{run!r} is not one of the unCLIP pipelines or decoders served: {', '.join(self.unclips)}")
        return self.opened[self.unclip_decoder(run)]

    def _decoder(self, run: str) -> Run:
        """The diffusion autoencoder whose codes the served latent DDIM `run` draws (FileNotFoundError naming both when
        its folder is gone)."""
        source = self.opened[run].cfg.semantic.run
        try:
            return open_run(source)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{run} draws the codes of the diffusion autoencoder {source}, which is gone ({e}); "
                                    "restore it, or train the latent DDIM again on another") from None

    def run(self, run: str) -> Run:
        """The served run of that name (ValueError for a run this server does not offer)."""
        if run not in self.opened:
            raise ValueError(f"{run!r} is not one of the runs served: {', '.join(self.all)}")
        return self.opened[run]

    def get(self, run: str, ema: bool = True) -> Model:
        """The run's model, loaded on first use (ValueError for a run this server does not offer, or one with no model
        to sample from: a segmentation run, a classifier of codes)."""
        opened = self.run(run)
        if opened.kind not in MODEL_KINDS:
            raise ValueError(f"{run} is " + ("a segmentation run, with nothing to sample or edit; segment images with it "
                                             "on the Segment tab" if opened.kind == "segmenter" else
                                             "a classifier of a diffusion autoencoder's codes, with nothing to sample; "
                                             "choose it as the attribute on the Autoencode tab"))
        return self._model(run, opened, ema)

    def _model(self, key: str, opened: Run, ema: bool) -> Model:
        with self._lock:
            if (key, ema) not in self._loaded:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    loaded = load(opened, ema, self.device)  # a latent-diffusion run's autoencoder, loaded once too
                self._loaded[key, ema] = Model(opened, loaded, [str(w.message) for w in caught])
            return self._loaded[key, ema]

    def segmenter(self, run: str) -> SegmentationRun:
        """The segmentation run of that name, its head and features loaded on first use and kept (ValueError for a run
        this server does not offer, or one that is not a segmentation run, naming what it is for)."""
        check_segmenter(self.run(run))
        with self._lock:
            if run not in self._segmenters:
                self._segmenters[run] = SegmentationRun(run, self.device, feature_network=feature_network)
            return self._segmenters[run]

    def load(self, run: Run, ema: bool, device: str) -> Loaded:
        """`execute`'s loader: the kept weights of a served run, or of a run a served one needs (a latent DDIM's
        diffusion autoencoder), its loading notes said again (warnings)."""
        name = next((name for name, r in self.opened.items() if r.path.resolve() == run.path.resolve()), None)
        model = self.get(name, ema) if name is not None else self._model(str(run.path.resolve()), run, ema)
        for note in model.notes:
            warnings.warn(note)
        return model.loaded


class Cancelled(Exception):
    """A job stopped by the Cancel button (raised in its worker at the next sampler step)."""


class Job:
    """One long task on the device, run in a worker thread so the page can follow it and cancel it.

    `work(report)` samples with `report` as the sampler's callback. The job puts (kind, payload) events on `events`:
    ("step", Step) for every step, ("preview", Step) instead for about PREVIEWS of them, ("note", text) for each
    warning the library raises (data.load_image's fitting, generate's grid), then ("done", result) or ("error",
    exception). After `cancel()` the next report raises Cancelled. `device_lock`, held when the job starts (its turn
    in the DeviceQueue took it), is released when the worker ends, so a cancelled job has stopped before the next one
    begins (and jobs, one at a time, never overlap their warning filters).
    """

    def __init__(self, work: Callable, device_lock: threading.Lock):
        self.work, self.lock = work, device_lock
        self.events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._caught: list = []
        self._told = 0

    def report(self, step: Step) -> None:
        if self._cancel.is_set():
            raise Cancelled
        self._tell()
        every = max(1, step.total // PREVIEWS) if step.total else 1  # total 0: an adaptive solver's accepted steps
        preview = step.x0 is not None and (step.index % every == 0 or step.index == step.total - 1)
        self.events.put(("preview" if preview else "step", step))

    def cancel(self) -> None:
        self._cancel.set()

    def start(self) -> None:
        """Run the work in a worker thread; the caller holds `device_lock`, which the worker releases at its end (a
        cancelled job's worker stops at its next step)."""
        threading.Thread(target=self._run, daemon=True, name="diffuse-webui-job").start()

    def _tell(self) -> None:
        for w in self._caught[self._told:]:
            if Path(w.filename).resolve().is_relative_to(PACKAGE):  # not the server's own, from other threads
                self.events.put(("note", str(w.message)))
        self._told = len(self._caught)

    def _run(self) -> None:
        try:
            with warnings.catch_warnings(record=True) as self._caught:
                warnings.simplefilter("always")
                result = self.work(self.report)
            self._tell()
            self.events.put(("done", result))
        except BaseException as e:  # reported on the page; the server goes on
            self._tell()
            self.events.put(("error", e))
        finally:
            self.lock.release()


class DeviceQueue:
    """The jobs on the device in order of arrival: each `enter`s (refused with a message when `size` jobs are running or
    waiting, or `per_client` of them are the client's), waits until it is first and `lock` (the device) is free, which
    `take` then acquires for it, and `leave`s when it ends, run or not. Whoever took the lock releases it."""

    def __init__(self, lock: threading.Lock, size: int, per_client: int):
        self.lock, self.size, self.per_client = lock, size, per_client
        self._tickets: list[tuple[int, str]] = []  # (ticket, client), in order of arrival
        self._count = itertools.count()
        self._changed = threading.Condition()

    def enter(self, client: str) -> int:
        """A ticket for a job of `client` (an address). ValueError naming the limit, its flag and what to do when the
        queue is full or the client has its share in it."""
        with self._changed:
            mine = sum(c == client for _, c in self._tickets)
            if mine >= self.per_client:
                raise ValueError(f"you have {mine} jobs running or waiting on this server, the most one client may have "
                                 f"(diffuse serve --jobs-per-client {self.per_client}); wait for one to finish, or cancel "
                                 "it")
            if len(self._tickets) >= self.size:
                raise ValueError(f"the server is busy: {len(self._tickets)} jobs are running or waiting, the most it holds "
                                 f"(diffuse serve --queue-size {self.size}); try again when one has finished")
            ticket = next(self._count)
            self._tickets.append((ticket, client))
            return ticket

    def __len__(self) -> int:
        """The jobs running or waiting."""
        with self._changed:
            return len(self._tickets)

    def ahead(self, ticket: int) -> int:
        """How many jobs are before this one (0: it is next, or running)."""
        with self._changed:
            return next((i for i, (t, _) in enumerate(self._tickets) if t == ticket), 0)

    def take(self, ticket: int, timeout: float) -> bool:
        """Wait up to `timeout` seconds for this ticket's turn: first in line with the device free. True when it came,
        and the caller now holds `lock`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if self._tickets and self._tickets[0][0] == ticket and self.lock.acquire(blocking=False):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.1))  # the lock's release is not announced: look again soon

    def leave(self, ticket: int) -> None:
        with self._changed:
            self._tickets = [(t, c) for t, c in self._tickets if t != ticket]
            self._changed.notify_all()


def client_of(request) -> str:
    """The client a page's request comes from, for the per-client limit: its address (Gradio's gr.Request)."""
    client = getattr(request, "client", None)
    return str(getattr(client, "host", None) or "unknown")


def page_error(gr, text: str):
    """gr.Error(text): a message on the page for bad input, without a traceback in the server's log."""
    return gr.Error(text, print_exception=False)


def error_message(e: BaseException, labels: dict[str, str] = LABELS) -> str:
    """What the page says about a failure: the library's own message for bad input (ValueError, OSError: they name
    the problem and the fix; a request's error names its widget by the tab's `labels`), a short line (and the
    traceback in the server's log) for anything else."""
    if isinstance(e, RequestError):
        return e.named(labels)
    if isinstance(e, (ValueError, OSError)):
        return str(e)
    traceback.print_exception(type(e), e, e.__traceback__)
    return f"internal error ({type(e).__name__}: {e}); the server's log has the traceback"


# --- images on the page and in the editor ------------------------------------------------------------------------
def display(x: Tensor, nrow: int | None = None) -> Image.Image:
    """A batch (B, C, H, W) in [-1, 1] as a grid for the page, or videos (B, C, F, H, W) as their contact sheet (a row
    per video), scaled up by a whole factor (nearest neighbour)."""
    x = x.detach().float().cpu()
    img = video_sheet(x, scale=1) if x.ndim == 5 else grid(x, nrow)
    k = max(1, DISPLAY_SIDE // img.width)
    return img.resize((img.width * k, img.height * k), Image.NEAREST) if k > 1 else img


def _flatten(img: Image.Image) -> Image.Image:
    """Any image as RGB, transparency composited onto black (as data.load_image reads it: the dark background of
    digit data)."""
    img = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img).convert("RGB")


def editor_value(img: Image.Image) -> tuple[dict, tuple[int, int]]:
    """An image for the editor, scaled up by a whole factor (nearest neighbour) to at least EDITOR_SIDE so the brush
    can mark single pixels of a small image, and its own size (W, H), which `editor_files` brings it back to."""
    img = _flatten(img)
    k = max(1, math.ceil(EDITOR_SIDE / max(img.size)))
    big = img.resize((img.width * k, img.height * k), Image.NEAREST) if k > 1 else img
    return {"background": big, "layers": [], "composite": big}, img.size


def read_upload(path: str, side: int | None = None, limit: int = Limits.upload_pixels) -> Image.Image:
    """An uploaded image file, read as data.load_image reads it (data.open_image: upright by its EXIF orientation), its
    pixels counted on the file's header before it is decoded: at most `limit` (a JPEG over it is decoded at 1/2, 1/4 or
    1/8 scale when that fits and is no smaller than `side`), then reduced to the working size near the model's
    (`working_size`: the shorter side `side`). Raises ValueError naming the file and the problem: not an image,
    damaged, or over the limit (with its flag and the fix)."""
    name = Path(path).name
    try:
        img = open_image(path, "the uploaded image", side, limit=limit)
    except ImageTooLarge as e:
        w, h = e.size
        if w * h <= limit:  # the library's own limit, lower than the page's: its message names its fix
            raise ValueError(str(e).replace(str(Path(path).expanduser()), name).replace("the uploaded image ", "")) from None
        jpeg = ", even decoded at 1/8 scale" if "1/8" in str(e) else ""
        fix = f" (the model works at {side}x{side} pixels)" if side else ""
        raise ValueError(f"{name} is {w}x{h} = {w * h:,} pixels, more than the {limit:,} this page reads (diffuse serve "
                         f"--max-upload-pixels){jpeg}; upload a smaller copy{fix}") from None
    except ValueError as e:  # the message names the real reason: not an image, or damaged
        text = str(e).replace(str(Path(path).expanduser()), name).replace("the uploaded image ", "")
        raise ValueError(text.replace("; give a PNG or JPEG file", "; upload a PNG or JPEG file")) from None
    return working_size(img, side)


def check_video_upload(path: str, limit: int = Limits.upload_pixels) -> tuple[int, int, int]:
    """(frames, width, height) of an uploaded video (.gif, .mp4, ...), read from its headers before any frame is
    converted to pixels, with frames x width x height at most `limit` (the page's pixel limit, --max-upload-pixels,
    counts every frame). A GIF's frames are counted twice: as stored (its header's n_frames), then as read_video makes
    them on the GIF's clock (data.video.gif_frame_count: a frame shown k ticks counts k times, so a 2-frame GIF of 60 s
    is many frames). ValueError naming the file and the fix otherwise (not a video, damaged, over the limit)."""
    name = Path(path).name

    def check(frames: int, w: int, h: int, clock: str = "") -> None:
        if frames * w * h > limit:
            raise ValueError(f"{name} is {frames} frames{clock} of {w}x{h} = {frames * w * h:,} pixels, more than the "
                             f"{limit:,} this page reads (diffuse serve --max-upload-pixels); upload a shorter or smaller "
                             "copy")

    gif = Path(path).suffix.lower() == ".gif"
    try:
        if gif:
            with Image.open(path) as img:
                if img.format != "GIF":
                    raise ValueError(f"{name} is a {img.format} image, not a GIF")
                frames, (w, h) = getattr(img, "n_frames", 1), img.size
        else:
            (w, h), frames = _ffmpeg_meta(path)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{name} cannot be read as a video ({e}); upload a GIF or an MP4") from None
    check(frames, w, h)  # the frames stored, from the header
    if gif:  # the frames on its clock, from the frames' headers
        try:
            stored, frames = frames, gif_frame_count(path)
        except ValueError as e:
            raise ValueError(f"{name} cannot be read as a video ({e}); upload a GIF or an MP4") from None
        check(frames, w, h, f" on its clock ({stored} stored, each counted for as long as it is shown)")
    return frames, w, h


def _ffmpeg_meta(path: str) -> tuple[tuple[int, int], int]:
    """((width, height), frames) of a video file from ffmpeg's header (imageio's ffmpeg plugin), frames = fps x duration
    rounded up (an estimate that errs high, as a limit should)."""
    iio = imageio_v3(f"reading {Path(path).suffix} videos", "; or upload a GIF")
    meta = iio.immeta(path, plugin="FFMPEG")
    w, h = meta["size"]
    return (int(w), int(h)), max(1, math.ceil(float(meta["fps"]) * float(meta["duration"])))


def video_files(x: Tensor, folder: Path, stem: str, before: list[Tensor] = (),
                observed: Tensor | None = None) -> tuple[Path, Path, Path]:
    """Videos x (N, C, F, H, W) in [-1, 1] written as FOLDER/STEM.gif and its contact sheet FOLDER/STEM.png (rows:
    `before`, then the videos; given frames framed in red), what `diffuse sample|edit ... --out STEM.gif` writes, and
    FOLDER/STEM_shown.gif, the GIF scaled up by a whole factor to about DISPLAY_SIDE for the page: (gif, shown, sheet)."""
    gif, shown, sheet = folder / f"{stem}.gif", folder / f"{stem}_shown.gif", folder / f"{stem}.png"
    save_video(x, gif)
    save_video(x, shown, scale=max(1, DISPLAY_SIDE // grid(x[:, :, 0]).width))
    save_image(video_sheet(torch.cat([b.to(x) for b in before] + [x]), observed), sheet)
    return gif, shown, sheet


def video_request(run: str, task: str, path: str | None, given: str, method: str | None, folder: Path, *,
                  limit: int = Limits.upload_pixels, **fields) -> EditRequest:
    """The Video tab's request: edit `task` (predict, interpolate) of the uploaded video at `path`, checked on its header
    (`check_video_upload`: frames x pixels within `limit`) and copied into the job's `folder` as input.gif (or .mp4,
    ...), the name its command line reads; `given` the indices as typed ("0,1" or empty: the task's default); `fields`
    the request's other fields (n, seed, steps, ema, ...). ValueError naming the problem (no file, a bad --given)."""
    if not path:
        raise ValueError("no video: upload a GIF or an MP4 first")
    check_video_upload(path, limit)
    video = folder / f"input{Path(path).suffix.lower()}"
    write_atomically(video, Path(path).read_bytes())
    indices = parse_given(given.replace(" ", "")) if given and given.strip() else None
    return EditRequest(run, task=task, video=str(video), given=indices, method=method or None, **fields)


def working_size(img: Image.Image, side: int | None) -> Image.Image:
    """An image scaled down so its shorter side is `side` (bicubic, antialiased, as data.fit_square scales it to the
    model's size: its centre crop is then what the model reads), or as it is when that side is already no longer;
    info["reduced_from"] the file's own size (data.open_image's "original_size")."""
    if side is None or min(img.size) <= side:
        return img
    w, h = img.size
    scale = side / min(w, h)
    if img.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "F"):
        img = img.convert("I") if img.mode.startswith("I;16") else _flatten(img) if "A" in img.mode or img.mode == "P" \
            else img.convert("RGB")
    small = img.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.BICUBIC,
                       reducing_gap=3.0)
    small.info["reduced_from"] = img.info.get("original_size", (w, h))  # a JPEG's before its reduced decode
    return small


def reduced_note(img: Image.Image, name: str) -> str:
    """A line saying that an upload was reduced to its working size, or "" when it was not."""
    if "reduced_from" not in img.info:
        return ""
    w, h = img.info["reduced_from"]
    return f"{name}: {w}x{h} reduced on upload to {img.width}x{img.height} (the model's size is near the shorter side)"


def editor_files(value: dict | None, size: tuple[int, int] | None, folder: Path, strokes: bool) -> tuple[str, str | None]:
    """Write an image editor's value as the files `diffuse edit` reads, in `folder`: input.png and, when anything is
    drawn, mask.png (white where a stroke touches a pixel = generate), both of the image's own `size` (W, H): the
    editor's background scaled back down by area averaging, exact for an image `editor_value` scaled up. With
    `strokes` (SDEdit) the input is the composite, the image with the strokes over it; with no background it is the
    strokes drawn on the empty canvas, on black. A grayscale result is saved as grayscale. Returns (input path, mask
    path or None); ValueError when the editor holds nothing."""
    background, composite = (value or {}).get("background"), (value or {}).get("composite")
    if background is None and composite is None:
        raise ValueError("no image to edit: upload an image file, or use a sample from the Sample tab")
    base = background if background is not None else composite
    size = tuple(size) if size and background is not None else base.size
    drawn = np.zeros((base.height, base.width), bool)
    for layer in (value or {}).get("layers") or []:
        if layer is not None and layer.size == base.size:
            drawn |= np.asarray(layer.convert("RGBA"))[..., 3] > 0
    image = _flatten(composite if strokes or background is None else background).resize(size, Image.BOX)
    rgb = np.asarray(image)
    if (rgb == rgb[..., :1]).all():
        image = image.convert("L")
    save_image(image, folder / "input.png")
    if not drawn.any():
        return str(folder / "input.png"), None
    touched = np.asarray(Image.fromarray(drawn.astype(np.uint8) * 255).resize(size, Image.BOX)) > 0
    save_image(Image.fromarray(touched.astype(np.uint8) * 255), folder / "mask.png")
    return str(folder / "input.png"), str(folder / "mask.png")


def posthoc_parent(folder: Path, steps: list[int]) -> tuple[Path, dict] | None:
    """The training run a `diffuse ema` folder was rebuilt from and its record ({"sigma_rel", "run", ...}), or None for
    any other folder: read from the state of its last checkpoint (of `steps`), without its tensors."""
    try:
        state = read_state(folder, steps[-1])
    except (OSError, ValueError, IndexError):
        return None
    record = state.get("posthoc_ema")
    return (Path(record["run"]), record) if isinstance(record, dict) and record.get("run") else None


def run_summary(run: str, cfg) -> dict:
    """What a run folder shows on the Runs tab, read afresh: its config text (a diffusers model folder's as diffuse
    reads it), loss plot, up to GRIDS sample grids over training [(image, caption)], eval.json records, a few lines
    about its checkpoints and last logged loss, and why the loss or grids are missing ("loss_why", "grids_why": "" when
    they are there). A `diffuse ema` folder shows its parent run's log, loss and grids (it has none of its own)."""
    folder = Path(run)
    read = lambda p: Image.open(p).copy() if p.is_file() else None  # noqa: E731 (the page gets pixels, not paths)
    diffusers_folder = pretrained.is_model_folder(folder)
    config = ("# a diffusers model folder, read as this config (pretrained.read_config)\n" + tomli_w.dumps(to_dict(cfg))
              if diffusers_folder else (folder / "config.toml").read_text())
    ckpts = folder / "checkpoints"
    steps = sorted(int(p.name[5:]) for p in ckpts.glob("step_*") if p.name[5:].isdigit()) if ckpts.is_dir() else []
    parent = None if diffusers_folder else posthoc_parent(folder, steps)
    trained = parent[0] if parent is not None else folder  # the folder whose training log, loss and grids are shown
    grids = sorted((trained / "samples").glob("step_*.png")) if (trained / "samples").is_dir() else []
    if len(grids) > GRIDS:  # evenly spaced over training, the last one included
        grids = [grids[round(i * (len(grids) - 1) / (GRIDS - 1))] for i in range(GRIDS)]
    try:
        evals = read_json_records(folder / "eval.json")
    except ValueError as e:  # the message names the file and the fix
        evals = [{"eval.json": str(e)}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a line that does not parse is left out; the page shows the last good one
        log = read_log(trained / "log.jsonl")  # a torn last line (a kill mid-append) is left out
    last = next((r for r in reversed(log) if "loss" in r), {})
    about = [f"**{run}**", "a diffusers model folder: one set of weights" if diffusers_folder else
             f"checkpoints at steps {', '.join(map(str, steps)) or 'none'}"]
    if parent is not None:
        about.append(f"the post-hoc EMA of {parent[0]} with sigma_rel = {parent[1].get('sigma_rel')} (`diffuse ema`): the "
                     "loss and sample grids are its parent's, over the training it was rebuilt from")
    if "loss" in last:
        about.append(f"last logged: step {last.get('step')}, loss {last['loss']:.4g}")
    if (folder / "best").is_dir():
        about.append(f"the best weights by FID during training: {folder / 'best'} (serve it as a run of its own)")
    loss = read(trained / "loss.png")
    loss_why = "" if loss is not None else (
        "none: a diffusers model folder holds no training log" if diffusers_folder else
        f"none yet: {trained / 'loss.png'} is drawn at each checkpoint from the losses logged every train.log_every steps")
    grids_why = "" if grids else (
        "none: a diffusers model folder holds no training samples" if diffusers_folder else
        f"none: {trained / 'samples'} holds no step_*.png (train.sample_every = {cfg.train.sample_every}: 0 draws none)")
    return {"config": config, "loss": loss, "evals": evals, "about": "  \n".join(about), "loss_why": loss_why,
            "grids_why": grids_why,
            "grids": [(read(p), f"step {int(p.stem[5:])}" if p.stem[5:].isdigit() else p.stem) for p in grids]}


def evals_markdown(records: list[dict]) -> str:
    """eval.json's records as a Markdown table, one row each, columns in first-seen order."""
    if not records:
        return "no eval.json in this run yet (`diffuse eval RUN --metric fid` writes one)"
    keys = list(dict.fromkeys(k for r in records for k in r))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(rows + ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in records])


# --- the Autoencode tab ----------------------------------------------------------------------------------------------
def attribute_runs(models: Models, run: str) -> list[str]:
    """The served classifiers of codes (model.kind = "diffae_classifier") trained on the served diffusion autoencoder
    `run`'s codes: the attributes its Autoencode tab moves along (one trained on another of its checkpoints is offered
    too, and refused by `resolve` naming the fix)."""
    path = models.run(run).path.resolve()
    return [a for a in models.attributes if Path(models.run(a).cfg.semantic.run).resolve() == path]


def attribute_classes(models: Models, attribute: str) -> list[int]:
    """The classes of a served label classifier of codes, one direction each; [] for an attribute's one direction."""
    r = models.run(attribute)
    return list(range(r.num_classes)) if r.cfg.semantic.target == "label" else []


def autoencode_request(models: Models, run: str, mode: str, image: str | None, to: str | None, attribute: str | None,
                       cls, amount, n, encode_steps, steps, seed, ema, device: str | None = None) -> EditRequest:
    """The EditRequest of the Autoencode tab's widgets for the served diffusion autoencoder `run` (what `diffuse edit
    MODE RUN ...` asks): the image file (and interpolate's second), manipulate's attribute (a served classifier run;
    RUN:CLASS for a label classifier's class) and amount, the number of images, encode and render steps (DDIM: the coded
    edits render deterministically), seed and EMA; a mode's own fields only for that mode, so a hidden widget asks
    nothing. ValueError naming the fix for manipulate when no classifier of the run's codes is served. `device`: the
    server's --device, said in the command line only when the server was given one."""
    own = {}
    if mode == "manipulate":
        if not attribute and not attribute_runs(models, run):
            raise ValueError(f"no attribute to move along: serve a classifier of {run}'s codes beside it (`diffuse train "
                             f"configs/diffae_thickness.toml --set semantic.run={run} --out CLS`, then `diffuse serve "
                             f"{run} CLS`)")
        if attribute and cls not in (None, "") and attribute_classes(models, attribute):
            attribute = f"{attribute}:{_whole(cls)}"
        own = dict(attribute=attribute or None, amount=amount)
    elif mode == "interpolate":
        own = dict(to=to or None)
    return page_request(EditRequest, models.opened.get(run), run, None, steps, None, None, None, seed, n, ema, None, None,
                        device=device, task=mode, image=image or "", encode_steps=encode_steps, **own)


def job_upload(path: str | None, folder: Path, stem: str, side: int | None = None,
               limit: int = Limits.upload_pixels) -> tuple[str | None, str]:
    """An uploaded image file, checked as uploads are (`read_upload`: a message naming the file), put in a job's folder
    as the file the command line reads, downloaded beside the outputs: copied byte for byte as STEM + its suffix, or,
    when it is larger than the working size (`working_size`: shorter side `side`), reduced to it as STEM.png (so the
    job never decodes the full file again). Returns (its path, `reduced_note` or ""); (None, "") for no file."""
    if not path:
        return None, ""
    img = read_upload(path, side, limit)
    if "reduced_from" in img.info:
        save_image(img, folder / f"{stem}.png")
        return str(folder / f"{stem}.png"), reduced_note(img, Path(path).name)
    target = folder / (stem + Path(path).suffix.lower())
    write_atomically(target, Path(path).read_bytes())
    return str(target), ""


def autoencode_status(req: EditRequest, calls: int) -> str:
    """What an Autoencode job made, in a line: the reconstruction and its variations, the amounts along the attribute,
    or the frames between the two images."""
    if req.task == "manipulate":
        what = f"{req.n} images along {req.attribute} at amounts {', '.join(f'{a:.3g}' for a in amounts(req.amount, req.n))}"
    elif req.task == "interpolate":
        what = f"{req.n} frames from {Path(req.image).name} to {Path(req.to).name}"
    else:
        what = "the reconstruction" + (f" and {req.n - 1} variations of its code (random x_T)" if req.n > 1 else "")
    return f"{what}; {calls} denoiser calls"


# --- the unCLIP tab ---------------------------------------------------------------------------------------------------
def unclip_modes(models: Models, run: str) -> list[str]:
    """The unCLIP tab's modes for a served choice: a pipeline folder draws from a prompt and edits; a decoder only
    edits (it has no prior to make an embedding of a prompt)."""
    return list(UNCLIP_MODES) if run in models.pipelines else [m for m in UNCLIP_MODES if m != "prompt"]


def unclip_request(models: Models, run: str, mode: str, prompt, image: str | None, to: str | None, from_caption,
                   to_caption, theta, n, guidance, prior_guidance, best_of, steps, seed, ema,
                   device: str | None = None) -> SampleRequest:
    """The request of the unCLIP tab's widgets for a served pipeline folder or decoder `run` (what `diffuse sample PIPE
    --prompt ...` or `diffuse edit variations|interpolate|textdiff RUN ...` asks): prompt mode a SampleRequest with the
    prior's guidance and best-of (empty boxes: the folder's defaults); an edit an EditRequest of the image file (and
    interpolate's second image, textdiff's captions and theta); the decoder's guidance on z_i for all but textdiff (its
    x_T is inverted, unguided); the prompt box also for an edit when the decoder reads captions. A mode's own fields
    only for that mode, so a hidden widget asks nothing. ValueError for a choice this server does not offer."""
    decoder = models.unclip_run(run)
    count = lambda v: _whole(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v  # noqa: E731
    common = dict(run=run, n=count(n), steps=None if steps is None else count(steps), seed=count(seed), ema=bool(ema),
                  device=device)
    if isinstance(n, (int, float)) and n > MAX_IMAGES:
        raise RequestError("n", f"--n is at most {MAX_IMAGES} on this page (one batch on the device; the command line "
                                f"draws any number), got {n}")
    wants = lambda v: None if v is None or v == "" else v  # noqa: E731  (an empty box: the default)
    if mode == "prompt":
        return SampleRequest(**common, prompt=prompt or None, guidance=wants(guidance),
                             prior_guidance=wants(prior_guidance), best_of=wants(best_of) and count(best_of))
    own = {"interpolate": dict(to=to or None), "textdiff": dict(from_prompt=from_caption or "", to=to_caption or "",
                                                                theta=wants(theta))}.get(mode, {})
    return EditRequest(**common, task=mode, image=image or "", guidance=None if mode == "textdiff" else wants(guidance),
                       prompt=(prompt or None) if decoder.capabilities.text else None, **own)


def unclip_status(req: SampleRequest, calls: int) -> str:
    """What an unCLIP job made, in a line."""
    if not isinstance(req, EditRequest):
        return f"{req.n} images of {req.prompt!r} (prior, then decoder); {calls} denoiser calls"
    what = {"variations": f"{req.n} variations of {Path(req.image).name}",
            "interpolate": f"{req.n} frames from {Path(req.image).name} to {Path(req.to or '').name}",
            "textdiff": f"{req.n} steps from {req.from_prompt!r} towards {req.to!r}"}[req.task]
    return f"{what}; {calls} denoiser calls"


# --- the Segment tab ------------------------------------------------------------------------------------------------
def segmenter_about(models: Models, run: str) -> str:
    """A few lines about a served segmentation run: its classes, the images it reads, its features and step."""
    model = models.segmenter(run)
    s = model.cfg.segment
    c, side, _ = model.image_shape
    source = f" of {s.source} (step {s.source_step})" if s.source else ""
    head = "a U-Net trained on the images" if s.head == "unet" else f"{s.members} pixel MLPs on {s.features} features{source}"
    return (f"**{run}** (step {model.step}): {model.num_classes} classes ({', '.join(model.class_names)}) of "
            f"{c}-channel {side}x{side} images; {head}")


def segment_upload(models: Models, run: str, path: str | None, folder: Path, device: str | None = None,
                   limit: int = Limits.upload_pixels) -> dict:
    """The Segment tab's answer for an uploaded image file and a served segmentation run, what `diffuse segment RUN
    --image NAME.png --out FOLDER` writes: the file checked as uploads are (`job_upload`: at most `limit` pixels, reduced
    to the working size near the run's, a message naming the file), fitted to the run's images by data.load_image,
    segmented, and NAME_mask.png and NAME_mask_overlay.png written in `folder` (app/segment.py). Returns {"figure": the
    overlay's path, "table": one row of SHARE_HEADERS per class found, "files": [mask, overlay] (and the reduced upload
    first, which the command reads), "status": the classes' shares and the mean uncertainty, "command": the command
    line that writes the same files, "notes": how the image was fitted}. ValueError naming the problem for no file, a
    file that is not an image or too large, or a run that is not a served segmentation run. `device`: the server's
    --device, said in the command line only when the server was given one."""
    if not path:
        raise ValueError("no image: upload an image file (PNG, JPEG, ...) to segment")
    model = models.segmenter(run)
    c, side, _ = model.image_shape
    image, reduced = job_upload(path, folder, Path(path).stem, side, limit)  # said before the model runs
    name = Path(image).name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, _ = load_image(image, c, side)  # (1, C, S, S), fitted as `diffuse segment` fits it
    labels, uncertainty = model.segment(x)
    result = Segmented(x[0], labels[0], uncertainty[0], model.class_names)
    (mask, overlay), = output_paths([name], folder)
    result.write(mask, overlay)
    argv = ["diffuse", "segment", run, "--image", name, "--out", mask.name] + (["--device", device] if device else [])
    return {"figure": str(overlay), "files": [image] * bool(reduced) + [str(mask), str(overlay)],
            "status": f"{name}: {result.summary()}",
            "table": [[k, f"{share:.1%}", f"{u:.4g}"] for k, share, u in result.shares()],
            "command": shlex.join(argv) + ("   # with the downloaded " + name if reduced else ""),
            "notes": [reduced] * bool(reduced) + [str(w.message).replace(str(image), name) for w in caught]}


# --- the page ----------------------------------------------------------------------------------------------------
class WebUI:
    """The server's state: the runs and their models, the device, its queue of jobs (one at a time on the device, at
    most `limits.queue` running or waiting, `limits.per_client` of one client), the working sides uploads are reduced
    to, a folder for outputs (removed at exit: `cleanup`)."""

    def __init__(self, runs: list[str], device: str | None = None, limits: Limits = Limits()):
        self.limits = limits
        self.device_flag = device is not None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.models = Models(runs, self.device)
        for run in self.models.runs + self.models.autoencoders:  # every run's EMA weights now: a run without a
            self.models.get(run)                                   # checkpoint fails before serving
        for run in self.models.unclips:  # and each unCLIP decoder's (a pipeline's prior loads with each prompt job)
            self.models.get(self.models.unclip_decoder(run))
        with warnings.catch_warnings():  # (its notes are kept, and said with every job, as a served run's)
            warnings.simplefilter("ignore")
            for decoder in self.models.decoders.values():  # and the autoencoder each latent DDIM's codes decode by
                self.models.load(decoder, True, self.device)
        for run in self.models.segmenters:  # and every segmentation run's head and features
            self.models.segmenter(run)
        self.device_lock = threading.Lock()
        self.queue = DeviceQueue(self.device_lock, limits.queue, limits.per_client)
        side = lambda names: max((self.models.run(r).cfg.data.image_size for r in names), default=None)  # noqa: E731
        self.edit_side, self.autoencode_side = side(self.models.editors), side(self.models.autoencoders)
        self.unclip_side = side([self.models.unclip_decoder(r) for r in self.models.unclips])
        self.folder = Path(tempfile.mkdtemp(prefix="diffuse-webui-"))
        atexit.register(self.cleanup)
        self._count = itertools.count(1)

    def cleanup(self) -> None:
        """Remove the folder of the jobs' files (at exit, Ctrl+C or SIGTERM)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def job_folder(self, kind: str) -> Path:
        folder = self.folder / f"{kind}_{next(self._count):04d}"
        folder.mkdir()
        return folder

    def turn(self, gr, request, status, first: dict | None = None) -> Iterator[dict]:
        """Queue a job of `request`'s client (DeviceQueue.enter: a full queue, or the client's share of it, is a message
        on the page) and yield `first`, then every second the jobs ahead in the `status` box, until its turn: `yield
        from` it returns the ticket, with the device lock held. Closing the generator while it waits leaves the queue."""
        try:
            ticket = self.queue.enter(client_of(request))
        except ValueError as e:
            raise page_error(gr, str(e))
        try:
            if first:
                yield first
            while not self.queue.take(ticket, timeout=1.0):
                ahead = self.queue.ahead(ticket)
                yield {status: f"waiting for the device: {ahead} job{'s' * (ahead != 1)} before this one"
                               if ahead else "waiting for the device: the last job is stopping"}
        except BaseException:
            self.queue.leave(ticket)
            raise
        return ticket

    def follow(self, gr, request, work: Callable, progress, outputs: Callable, folder: Path, status,
               first: dict | None = None, labels: dict[str, str] = LABELS) -> Iterator[dict]:
        """Wait for the device (`turn`: `first`, then the place in the queue in `status`), run `work` as a Job and yield
        the page's updates, `outputs(kind, payload)` -> {component: value}, for each preview, the end ("done",
        "cancelled") and, at least every second, nothing ("tick"), which keeps the job cancellable: closing the
        generator (the Cancel button, a closed page) cancels it, or takes it out of the queue. Steps move the progress
        bar; notes (warnings) show as gr.Warning; a failed job raises gr.Error(`error_message`, widgets named by the
        tab's `labels`). Paths in `folder` are shown by their names."""
        strip = lambda text: text.replace(f"{folder}{os.sep}", "")  # noqa: E731
        ticket = yield from self.turn(gr, request, status, first)
        job = Job(work, self.device_lock)
        try:
            job.start()  # the worker releases the device lock when it ends
        except BaseException:
            self.device_lock.release()
            self.queue.leave(ticket)
            raise
        told: set[str] = set()
        last = time.monotonic()
        try:
            while True:
                try:
                    kind, payload = job.events.get(timeout=1.0)
                except queue.Empty:
                    kind, payload = "tick", None
                if kind == "note":
                    if payload not in told:
                        told.add(payload)
                        gr.Warning(strip(payload))
                    continue
                if kind in ("step", "preview"):
                    progress((payload.index + 1, payload.total or None), desc="sampling", unit="steps")
                if kind in ("step", "tick") and time.monotonic() - last < 1.0:
                    continue
                if kind == "error" and not isinstance(payload, Cancelled):
                    raise page_error(gr, strip(error_message(payload, labels)))
                last = time.monotonic()
                yield outputs("cancelled" if kind == "error" else kind, payload)
                if kind in ("done", "error"):
                    return
        finally:
            job.cancel()
            self.queue.leave(ticket)


def build_app(runs: list[str], device: str | None = None, limits: Limits = Limits()):
    """The Gradio Blocks of `diffuse serve` for these run folders, queued (one job at a time on the device, the rest
    wait in the server's DeviceQueue, bounded by `limits`, as uploads are), not launched: `serve` (or `launch`) launches it. The Sample tab is there when a run to
    sample from is served (a denoiser, or a diffusion autoencoder's latent DDIM), the Edit tab when a denoiser is, the
    Autoencode tab when a diffusion autoencoder is, the Segment tab when a segmentation run is. Every run's EMA weights
    (a segmentation run's head and features) are loaded first. Raises ValueError when Gradio is not installed (naming
    `pip install -e ".[ui]"`) or a run is of a kind the page does not serve, FileNotFoundError for a folder that is not
    a run or holds no checkpoint."""
    gr = _gradio()
    ui = WebUI(runs, device, limits)
    first = ui.models.runs[0] if ui.models.runs else None  # the Sample tab's run (none: no such tab)
    e_first = ui.models.editors[0] if ui.models.editors else None  # the Edit tab's
    a_first = ui.models.autoencoders[0] if ui.models.autoencoders else None  # the Autoencode tab's

    def run_choices(run: str) -> dict:
        """The sampling controls' defaults for a run: its [sample] section (a latent DDIM's: its autoencoder's, which
        the controls set), and what it can do (runs.Capabilities)."""
        r = ui.models.run(run)
        s, caps = (ui.models.decoders[run] if run in ui.models.decoders else r).cfg.sample, r.capabilities
        return dict(sampler=s.sampler, steps=s.steps, spacing=s.spacing, guidance=s.guidance, conditional=caps.classes > 0,
                    labels=[ALL_CLASSES] + [str(k) for k in range(caps.classes)], guidance_ok=bool(caps.guidance_keys),
                    text=caps.text, guidance_info=HINTS["guidance"] if caps.guidance_keys else
                    "none: this run was trained without condition dropout (train.condition_dropout)"
                    if caps.classes or caps.text else "none: this run takes no class label or prompt")

    def prompt_controls(run: str, prefix: str) -> list:
        """The prompt and negative-prompt boxes, shown for a text-conditional run."""
        c = run_choices(run)
        prompt = gr.Textbox(label="prompt", placeholder="a red circle above a blue square", visible=c["text"],
                            elem_id=f"{prefix}-prompt")
        negative = gr.Textbox(label="negative prompt (optional: guided away from, in place of the empty caption)",
                              visible=c["text"], elem_id=f"{prefix}-negative")
        return [prompt, negative]

    def sampling_controls(run: str, n: int, prefix: str) -> list:
        """Sampler, steps, spacing, guidance, label, seed, n and EMA fields, set to the run's defaults, in rows."""
        c = run_choices(run)
        with gr.Row():
            sampler = gr.Dropdown([(f"{k}: {v.about}", k) for k, v in SAMPLERS.items()], value=c["sampler"],
                                  label="sampler", info=HINTS["sampler"], elem_id=f"{prefix}-sampler")
            spacing = gr.Dropdown(list(SPACINGS), value=c["spacing"], label="spacing", info=HINTS["spacing"],
                                  elem_id=f"{prefix}-spacing")
        with gr.Row():
            steps = gr.Number(c["steps"], label="steps (0: all)", precision=0, minimum=0, elem_id=f"{prefix}-steps")
            guidance = gr.Number(c["guidance"], label="guidance weight", minimum=0, interactive=c["guidance_ok"],
                                 info=c["guidance_info"], elem_id=f"{prefix}-guidance")
        with gr.Row():
            label = gr.Dropdown(c["labels"], value=ALL_CLASSES, label="class label", interactive=c["conditional"],
                                elem_id=f"{prefix}-label")
            seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id=f"{prefix}-seed")
        n = gr.Slider(1, MAX_IMAGES, value=n, step=1, label="number of images", elem_id=f"{prefix}-n")
        ema = gr.Checkbox(True, label="EMA weights (off: the raw weights, --no-ema)", elem_id=f"{prefix}-ema")
        return [sampler, steps, spacing, guidance, label, seed, n, ema]

    def on_run(run: str) -> tuple:
        c = run_choices(run)
        return (gr.Dropdown(value=c["sampler"]), gr.Number(value=c["steps"]), gr.Dropdown(value=c["spacing"]),
                gr.Number(value=c["guidance"], interactive=c["guidance_ok"], info=c["guidance_info"]),
                gr.Dropdown(choices=c["labels"], value=ALL_CLASSES, interactive=c["conditional"]),
                gr.Textbox(visible=c["text"]), gr.Textbox(visible=c["text"]))

    def request(cls, run, *widgets, **extra) -> SampleRequest:
        """The request of the widgets (`page_request`); a bad one a message on the page."""
        try:
            return page_request(cls, ui.models.opened.get(run), run, *widgets,
                                device=ui.device if ui.device_flag else None, **extra)
        except ValueError as e:
            raise page_error(gr, error_message(e))

    def decoded(req, x0: Tensor) -> Tensor:
        """A preview of the predicted x_0 as an image: a latent-diffusion run's latents decoded (the model is loaded by
        the time its job reports a step)."""
        return ui.models.get(req.run, req.ema).loaded.space.decode(x0)

    def status(text: str, step: Step | None = None) -> str:
        return text if step is None else f"step {step.index + 1}{f' of {step.total}' if step.total else ''}: {text}"

    # ---- Sample: generate with previews; the grid, the trajectory GIF and the command line
    def takes_request(fn: Callable) -> Callable:
        """`fn` with its `http` parameter typed as gr.Request, which Gradio then passes (the page's client). (This
        module's annotations are strings, which Gradio cannot read for a function defined in here.)"""
        fn.__annotations__ = {"http": gr.Request}
        return fn

    @takes_request
    def sample(run, sampler, steps, spacing, guidance, label, seed, n, ema, prompt, negative, http=None,
               progress=gr.Progress()):
        req = request(SampleRequest, run, sampler, steps, spacing, guidance, label, seed, n, ema, prompt, negative)
        folder = ui.job_folder("sample")

        def work(report):
            plan = resolve(req, ui.models.run(req.run))  # every check before the weights load
            frames: list[Tensor] = []

            def callback(step: Step):
                report(step)
                if plan.model_frames:  # videos: no trajectory GIF (the videos are one)
                    return
                if step.index == 0:
                    frames.append(step.x.cpu())  # x_T
                if step.total == 0 or step.index % max(1, step.total // PREVIEWS) == 0 or step.index == step.total - 1:
                    frames.append(step.x_next.cpu())  # the trajectory x_t, ending at the samples

            result = execute(plan, callback, load=ui.models.load)
            x = result.x.cpu()
            if plan.model_frames:  # a video run: the GIF and its contact sheet, as `diffuse sample ... --out samples.gif`
                gif, shown, sheet = video_files(x, folder, "samples")
                return dict(x=x, plan=plan, calls=result.calls, video=(gif, shown, sheet))
            save_grid(x, folder / "samples.png")  # what `diffuse sample ... --out samples.png` writes
            save_gif([decoded(req, f) for f in frames], folder / "trajectory.gif")  # latents decoded
            return dict(x=x, plan=plan, calls=result.calls)

        def outputs(kind, r):
            if kind == "preview":
                return {s_image: display(decoded(req, r.x0)), s_status: status("the predicted x_0", r)}
            if kind != "done":
                return {s_status: CANCELLED if kind == "cancelled" else gr.update()}  # a tick: no change
            if "video" in r:
                gif, shown, sheet = r["video"]
                return {s_image: display(r["x"]), s_gif: gr.Image(str(shown), label="the videos"),
                        s_command: r["plan"].command("samples.gif"), s_files: [str(gif), str(sheet)], last: None,
                        s_status: f"{len(r['x'])} videos of {r['x'].shape[2]} frames (the contact sheet above: a row per "
                                  f"video), {r['calls']} denoiser calls"}
            return {s_image: display(r["x"]),
                    s_gif: gr.Image(str(folder / "trajectory.gif"), label="trajectory x_t"),
                    s_command: r["plan"].command("samples.png"),
                    s_files: [str(folder / "samples.png"), str(folder / "trajectory.gif")], last: r["x"],
                    s_status: f"{len(r['x'])} samples, {r['calls']} denoiser calls"}

        yield from ui.follow(gr, http, work, progress, outputs, folder, s_status, {s_status: "loading", s_command: ""})

    # ---- Edit: an uploaded image or a sample in the editor; the chosen edit; the figure and the command line
    def into_editor(img: Image.Image, name: str) -> tuple:
        value, (w, h) = editor_value(img)
        k = value["background"].width // w
        return value, (w, h), f"{name}: {w}x{h}{f', shown {k} times larger to paint on' if k > 1 else ''}"

    def upload(path):
        try:
            img = read_upload(path, ui.edit_side, ui.limits.upload_pixels)
        except (ValueError, OSError) as e:
            raise page_error(gr, str(e))
        value, size, text = into_editor(img, Path(path).name)
        return value, size, text + (f"  \n{reduced_note(img, Path(path).name)}" if "reduced_from" in img.info else "")

    def use_sample(samples, k):
        if samples is None:
            raise page_error(gr, "no samples yet: draw some on the Sample tab first, or upload an image file")
        if not (isinstance(k, (int, float)) and k == int(k) and 1 <= k <= len(samples)):
            raise page_error(gr, f"the sample number must be a whole number between 1 and {len(samples)}, got {k!r}")
        k = int(k)
        return into_editor(grid(samples[k - 1:k], pad=0), f"sample #{k}")

    def factors(run: str) -> list[int]:
        """ILVR factors that divide the image size (for a latent-diffusion run: multiples of its f, tasks.editing.latent_factor)."""
        r = ui.models.run(run)
        side = r.cfg.data.image_size

        def fits(k: int) -> bool:
            try:
                return side % k == 0 and (not r.capabilities.latent or bool(latent_factor(k, diffusion_shape(r.cfg), side)))
            except ValueError:
                return False
        return [k for k in range(2, side + 1) if fits(k)] or [1]

    def edit_choices(run: str) -> list[str]:
        """The Edit tab's edits of a run: all but invert, whose output is a file of noise, not an image to show."""
        return [e for e in ui.models.run(run).capabilities.edits if e not in CODED]

    def on_edit_run(run: str) -> tuple:
        offered = edit_choices(run)
        return (gr.Radio(choices=offered, value=offered[0]), gr.Dropdown(choices=factors(run), value=factors(run)[0]),
                gr.ImageEditor(brush=brush(run, offered[0])), *on_run(run))

    def brush(run: str, task: str):
        """The editor's brush: red to mark a region (it shows on any image), but white for SDEdit on a 1-channel run,
        whose strokes are read as gray levels (white strokes draw white, as a digit's pen)."""
        white = task == "sdedit" and ui.models.run(run).cfg.data.channels == 1
        colors = ["#e03030", "#ffffff", "#000000", "#808080", "#30a030", "#3050e0"]
        return gr.Brush(colors=colors, default_color="#ffffff" if white else "#e03030", default_size=24,
                        color_mode="defaults")

    def on_task(run: str, task: str) -> tuple:
        return (f"**{task}**: {EDITS.get(task, '')}", gr.ImageEditor(brush=brush(run, task)), gr.Slider(visible=task == "sdedit"),
                gr.Dropdown(visible=task == "ilvr"), gr.Slider(visible=task == "ilvr"), gr.Slider(visible=task == "inpaint"),
                gr.Slider(visible=task == "inpaint"), gr.File(visible=task == "inpaint"))

    @takes_request
    def edit(run, task, value, size, mask_file, strength, factor, t_stop, jumps, length, sampler, steps, spacing,
             guidance, label, seed, n, ema, prompt, negative, http=None, progress=gr.Progress()):
        folder = ui.job_folder("edit")
        try:
            image, drawn = editor_files(value, size, folder, strokes=task == "sdedit")
        except ValueError as e:
            raise page_error(gr, str(e))
        mask = None
        if task == "inpaint":
            if mask_file:  # a mask file replaces what is drawn; its pixels counted on its header, as every upload's
                try:
                    read_upload(mask_file, None, ui.limits.upload_pixels)
                except ValueError as e:
                    raise page_error(gr, f"the mask file: {e}")
                mask = str(folder / "mask.png")
                write_atomically(mask, Path(mask_file).read_bytes())
            elif drawn is None:
                raise page_error(gr, "nothing is drawn: paint the region to generate on the image (or upload a mask file "
                               "of the image's size)")
            mask = mask or drawn
        req = request(EditRequest, run, sampler, steps, spacing, guidance, label, seed, n, ema, prompt, negative, task=task,
                      image=image, **edit_fields(task, strength, factor, t_stop, jumps, length, mask))

        def work(report):
            plan = resolve(req, ui.models.run(req.run))  # the image, the mask and every choice checked before loading
            result = execute(plan, report, load=ui.models.load)
            save_grid(result.x.cpu(), folder / "edited.png")
            save_before_after(result, folder / "edited_before_after.png")
            return dict(x=result.x.cpu(), plan=plan, calls=result.calls)

        def outputs(kind, r):
            if kind == "preview":
                return {e_image: display(decoded(req, r.x0)), e_status: status("the predicted x_0", r)}
            if kind != "done":
                return {e_status: CANCELLED if kind == "cancelled" else gr.update()}
            argv = [Path(a).name if a in (req.image, req.mask) else a for a in r["plan"].argv()] + ["--out", "edited.png"]
            files = [str(p) for p in (folder / "input.png", folder / "mask.png", folder / "edited.png",
                                      folder / "edited_before_after.png") if p.is_file()]
            return {e_image: display(r["x"]), e_figure: str(folder / "edited_before_after.png"), e_files: files,
                    e_command: shlex.join(["diffuse", *argv]) + "   # with the downloaded input.png"
                    + (" and mask.png" if req.mask else ""),
                    e_status: f"{len(r['x'])} {task} outputs, {r['calls']} denoiser calls"}

        yield from ui.follow(gr, http, work, progress, outputs, folder, e_status, {e_status: "loading", e_command: ""})

    # ---- Video: an uploaded GIF or MP4, its given frames kept, the rest generated; the GIF, its sheet, the command line
    def video_about(run: str) -> str:
        caps = ui.models.run(run).capabilities
        return (f"{run}: videos of {caps.frames} frames; " + ("trained with given frames (model.video_observed): method "
                "masked by default" if caps.observed else "trained without given frames: method reconstruction (Ho et "
                "al. 2022) by default, or replacement") + ". Given frames: indices such as 0,1 (empty: predict the "
                "first half, interpolate the first and the last frame); they are framed in red in the sheet.")

    @takes_request
    def video_edit(run, task, path, given, method, n, seed, steps, ema, http=None, progress=gr.Progress()):
        folder = ui.job_folder("video")
        try:
            req = video_request(run, task, path, given, method, folder, limit=ui.limits.upload_pixels, n=int(n),
                                seed=int(seed), steps=None if steps is None else int(steps), ema=bool(ema),
                                device=ui.device if ui.device_flag else None)
        except ValueError as e:
            raise page_error(gr, error_message(e))

        def work(report):
            plan = resolve(req, ui.models.run(req.run))  # the video, the given frames and the method checked first
            result = execute(plan, report, load=ui.models.load)
            files = video_files(result.x.cpu(), folder, "edited", result.before, plan.observed)
            return dict(x=result.x.cpu(), plan=plan, calls=result.calls, files=files)

        def outputs(kind, r):
            if kind == "preview":
                return {v_sheet: display(r.x0), v_status: status("the predicted x_0", r)}
            if kind != "done":
                return {v_status: CANCELLED if kind == "cancelled" else gr.update()}
            gif, shown, sheet = r["files"]
            argv = [Path(a).name if a == req.video else a for a in r["plan"].argv()] + ["--out", "edited.gif"]
            given_frames = ",".join(map(str, r["plan"].observed.nonzero()[:, 0].tolist()))
            return {v_gif: str(shown), v_sheet: str(sheet), v_files: [str(gif), str(sheet), req.video],
                    v_command: shlex.join(["diffuse", *argv]) + f"   # with the downloaded {Path(req.video).name}",
                    v_status: f"{len(r['x'])} {task} outputs ({r['plan'].method}; frames {given_frames} given), "
                              f"{r['calls']} denoiser calls"}

        yield from ui.follow(gr, http, work, progress, outputs, folder, v_status, {v_status: "loading", v_command: ""})

    # ---- Autoencode: an uploaded image through a diffusion autoencoder; the strip, the figure and the command line
    def autoencode_about(run: str, mode: str) -> str:
        text = f"**{mode}**: {SEMANTIC_ABOUT.get(mode, '')}"
        if mode == "manipulate" and not attribute_runs(ui.models, run):
            text += (f"  \nno classifier of {run}'s codes is served: train one (`diffuse train configs/diffae_thickness.toml "
                     f"--set semantic.run={run} --out CLS`) and serve it beside the run")
        return text

    def ae_widgets(run: str, mode: str, attribute: str | None, n) -> tuple:
        """The Autoencode tab's widgets for a run and mode: what the mode is, the second upload (interpolate), the
        attribute, its class (a label classifier) and the amount (manipulate), the number of images (at least 2
        frames for interpolate)."""
        offered = attribute_runs(ui.models, run)
        attribute = attribute if attribute in offered else (offered[0] if offered else None)
        classes = [str(k) for k in attribute_classes(ui.models, attribute)] if attribute else []
        manipulate, interpolate = mode == "manipulate", mode == "interpolate"
        n = n if isinstance(n, (int, float)) else 4
        return (autoencode_about(run, mode), gr.File(visible=interpolate),
                gr.Dropdown(choices=[(f"{a} ({ui.models.run(a).cfg.semantic.target})", a) for a in offered],
                            value=attribute, visible=manipulate),
                gr.Dropdown(choices=classes, value=classes[0] if classes else None, visible=manipulate and bool(classes)),
                gr.Slider(visible=manipulate),
                gr.Slider(minimum=2 if interpolate else 1, value=max(n, 2) if interpolate else n,
                          label=AE_COUNT[mode] if mode in AE_COUNT else "number of images"))

    def on_ae_run(run: str, mode: str, n) -> tuple:
        return (*ae_widgets(run, mode, None, n), gr.Number(value=ui.models.run(run).cfg.sample.steps))

    def show_inputs(run: str, mode: str, image_file, to_file) -> tuple:
        """The uploaded images as the run reads them (data.load_image: fitted to its size and channels), side by side,
        and a line naming them and how they were fitted; a file that is not an image, a message."""
        r = ui.models.run(run)
        c, side = r.cfg.data.channels, r.cfg.data.image_size
        shown, names, notes = [], [], []
        folder = ui.job_folder("upload")  # the uploads as a job will read them: reduced to the working size when larger
        try:
            for path, stem in ((image_file, "input"), (to_file if mode == "interpolate" else None, "to")):
                if not path:
                    continue
                try:
                    kept, reduced = job_upload(path, folder, stem, ui.autoencode_side, ui.limits.upload_pixels)
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        shown.append(load_image(kept, c, side)[0])
                except (ValueError, OSError) as e:
                    raise page_error(gr, str(e).replace(str(path), Path(path).name))
                names.append(Path(path).name)
                notes += [reduced] * bool(reduced) + [str(w.message).replace(kept, Path(path).name) for w in caught]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if not shown:
            return None, ""
        return (display(torch.cat(shown), len(shown)),
                f"{' and '.join(names)}, as {run} reads {'them' if len(names) > 1 else 'it'} ({c}x{side}x{side})"
                + "".join(f"  \n{note}" for note in notes))

    @takes_request
    def autoencode(run, mode, image_file, to_file, attribute, cls, amount, n, encode_steps, steps, seed, ema,
                   http=None, progress=gr.Progress()):
        folder = ui.job_folder("autoencode")
        try:
            side, limit = ui.autoencode_side, ui.limits.upload_pixels
            image, _ = job_upload(image_file, folder, "input", side, limit)
            to = job_upload(to_file, folder, "to", side, limit)[0] if mode == "interpolate" else None
            req = autoencode_request(ui.models, run, mode, image, to, attribute, cls, amount, n, encode_steps, steps,
                                     seed, ema, device=ui.device if ui.device_flag else None)
        except ValueError as e:
            raise page_error(gr, error_message(e, AUTOENCODE_LABELS))
        out = f"{mode}.png"

        def work(report):
            plan = resolve(req, ui.models.run(req.run))  # the images, the attribute and every choice checked first
            result = execute(plan, report, load=ui.models.load)
            x = result.x.cpu()
            save_grid(x, folder / out)  # what `diffuse edit MODE ... --out MODE.png` writes
            save_before_after(result, folder / f"{mode}_before_after.png")
            return dict(x=x, plan=plan, calls=result.calls)

        def outputs(kind, r):
            if kind == "preview":
                return {a_strip: display(decoded(req, r.x0)), a_status: status("the predicted x_0", r)}
            if kind != "done":
                return {a_status: CANCELLED if kind == "cancelled" else gr.update()}
            inputs = [p for p in (req.image, req.to) if p]
            argv = [Path(a).name if a in inputs else a for a in r["plan"].argv()] + ["--out", out]
            files = [*inputs, str(folder / out), str(folder / f"{mode}_before_after.png")]
            return {a_strip: display(r["x"], len(r["x"])), a_figure: str(folder / f"{mode}_before_after.png"),
                    a_files: files, a_status: autoencode_status(r["plan"].request, r["calls"]),
                    a_command: shlex.join(["diffuse", *argv]) + "   # with the downloaded "
                    + " and ".join(Path(p).name for p in inputs)}

        yield from ui.follow(gr, http, work, progress, outputs, folder, a_status, {a_status: "loading", a_command: ""},
                             AUTOENCODE_LABELS)

    # ---- unCLIP: a pipeline folder's prompt -> images; a decoder's variations, interpolation, text diffs
    def unclip_on_run(run: str, mode: str) -> tuple:
        """`unclip_widgets`, then the choice's defaults: the prior's guidance and best-of k, the decoder's guidance
        and steps (its [sample] section)."""
        return (*unclip_widgets(run, mode, defaults=True), gr.Number(value=ui.models.unclip_run(run).cfg.sample.steps))

    def unclip_widgets(run: str, mode: str, defaults: bool = False) -> tuple:
        """The unCLIP tab's widgets for a choice and mode: the modes offered, what the mode does, and each widget shown
        only where the mode reads it (the prompt also for an edit of a decoder that reads captions); with `defaults`,
        the guidance boxes set to the choice's (`Models.prior_defaults`, the decoder's sample.guidance)."""
        modes = unclip_modes(ui.models, run)
        mode = mode if mode in modes else modes[0]
        text = ui.models.unclip_run(run).capabilities.text
        edit = mode != "prompt"
        w, k = ui.models.prior_defaults(run)
        guidance = ui.models.unclip_run(run).cfg.sample.guidance
        value = lambda v: dict(value=v) if defaults else {}  # noqa: E731
        return (gr.Radio(choices=modes, value=mode), f"**{mode}**: {UNCLIP_MODES[mode]}",
                gr.Textbox(visible=mode == "prompt" or text), gr.File(visible=edit), gr.File(visible=mode == "interpolate"),
                gr.Textbox(visible=mode == "textdiff"), gr.Textbox(visible=mode == "textdiff"),
                gr.Slider(visible=mode == "textdiff"), gr.Number(visible=mode == "prompt", **value(w)),
                gr.Number(visible=mode == "prompt", **value(k)),
                gr.Number(interactive=mode != "textdiff", **value(guidance)))  # textdiff inverts x_T: unguided

    @takes_request
    def unclip_job(run, mode, prompt, image_file, to_file, from_caption, to_caption, theta, n, guidance, prior_guidance,
                   best_of, steps, seed, ema, http=None, progress=gr.Progress()):
        folder = ui.job_folder("unclip")
        try:
            side, limit = ui.unclip_side, ui.limits.upload_pixels
            image = job_upload(image_file, folder, "input", side, limit)[0] if mode != "prompt" else None
            to = job_upload(to_file, folder, "to", side, limit)[0] if mode == "interpolate" else None
            req = unclip_request(ui.models, run, mode, prompt, image, to, from_caption, to_caption, theta, n, guidance,
                                 prior_guidance, best_of, steps, seed, ema, device=ui.device if ui.device_flag else None)
        except ValueError as e:
            raise page_error(gr, error_message(e, UNCLIP_LABELS))
        out = f"{mode}.png"

        def work(report):
            opened = None if run in ui.models.pipelines else ui.models.run(run)  # a folder: resolve reads unclip.toml
            plan = resolve(req, opened)  # the folder, the images, the captions and every choice checked first
            result = execute(plan, report, load=ui.models.load)
            x = result.x.cpu()
            save_grid(x, folder / out)  # what the command's --out OUT.png writes
            if result.before:
                save_before_after(result, folder / f"{mode}_before_after.png")
            return dict(x=x, plan=plan, calls=result.calls)

        def outputs(kind, r):
            if kind == "preview":
                return {u_image: display(r.x0), u_status: status("the predicted x_0", r)}
            if kind != "done":
                return {u_status: CANCELLED if kind == "cancelled" else gr.update()}
            edit = isinstance(req, EditRequest)
            inputs = [p for p in ((req.image, req.to if mode == "interpolate" else None) if edit else ()) if p]
            argv = [Path(a).name if a in inputs else a for a in r["plan"].argv()] + ["--out", out]
            figure = folder / f"{mode}_before_after.png"
            files = [*inputs, str(folder / out)] + [str(figure)] * figure.is_file()
            return {u_image: display(r["x"], len(r["x"]) if mode != "prompt" else None),
                    u_figure: str(figure) if figure.is_file() else None, u_files: files,
                    u_status: unclip_status(r["plan"].request, r["calls"]),
                    u_command: shlex.join(["diffuse", *argv]) + ("   # with the downloaded " + " and ".join(
                        Path(p).name for p in inputs) if inputs else "")}

        yield from ui.follow(gr, http, work, progress, outputs, folder, u_status,
                             {u_status: "loading", u_command: ""}, UNCLIP_LABELS)

    # ---- Segment: an uploaded image segmented; the overlay figure, the classes' shares, the files, the command line
    @takes_request
    def segment(run, path, http=None):
        folder = ui.job_folder("segment")
        ticket = yield from ui.turn(gr, http, g_status)  # one job on the device at a time, in the queue's order
        try:
            r = segment_upload(ui.models, run, path, folder, device=ui.device if ui.device_flag else None,
                               limit=ui.limits.upload_pixels)
        except Exception as e:  # bad input: the library's message; anything else: a short line and the log's traceback
            raise page_error(gr, error_message(e).replace(f"{folder}{os.sep}", ""))
        finally:
            ui.device_lock.release()
            ui.queue.leave(ticket)
        for note in r["notes"]:
            gr.Warning(note)
        yield {g_figure: r["figure"], g_table: r["table"], g_files: r["files"], g_status: r["status"],
               g_command: r["command"]}

    # ---- Runs
    def runs_view(run) -> dict:
        """The Runs tab for a run, read from its folder now (evals, grids, checkpoints added since are there); an
        empty box's label says why it is empty."""
        info = run_summary(run, ui.models.run(run).cfg)
        return dict(info, evals=evals_markdown(info["evals"]),
                    loss_label="training loss" + (f" ({info['loss_why']})" if info["loss_why"] else ""),
                    grids_label="sample grids during training" + (f" ({info['grids_why']})" if info["grids_why"] else ""))

    def show_run(run) -> tuple:
        v = runs_view(run)
        return (v["about"], v["config"], gr.Image(v["loss"], label=v["loss_label"]),
                gr.Gallery(v["grids"], label=v["grids_label"]), v["evals"])

    upload_label = (f"image file (PNG, JPEG, ...; at most {limits.upload_mb:g} MB and "
                    f"{limits.upload_pixels / 1e6:.3g} million pixels)")
    with gr.Blocks(title="diffuse", analytics_enabled=False) as app:
        gr.Markdown("## diffuse: sample, edit, segment with and inspect trained runs")
        last = gr.State(None)  # this page's last samples (n, C, H, W), for the Edit tab
        with gr.Tabs():
            if first is not None:  # Sample and Edit: the diffusion runs
                with gr.Tab("Sample", id="sample", elem_id="tab-sample"):
                    with gr.Row():
                        with gr.Column(scale=1):
                            s_run = gr.Dropdown(ui.models.runs, value=first, label="run", elem_id="s-run")
                            s_prompts = prompt_controls(first, "s")
                            s_controls = sampling_controls(first, 16, "s") + s_prompts
                            with gr.Row():
                                s_go = gr.Button("Sample", variant="primary", elem_id="s-go")
                                s_cancel = gr.Button("Cancel", variant="stop", elem_id="s-cancel")
                        with gr.Column(scale=2):
                            s_image = gr.Image(label="samples (the predicted x_0 while sampling)", type="pil", format="png",
                                               interactive=False, elem_id="s-image", height=380)
                            s_status = gr.Markdown(elem_id="s-status", min_height=64)  # the progress bar shows here
                            s_command = gr.Textbox(label="the command line that draws these samples", interactive=False,
                                                   elem_id="s-command")
                            with gr.Row():
                                s_gif = gr.Image(label="trajectory x_t", type="filepath", interactive=False, elem_id="s-gif",
                                                 height=260)
                                s_files = gr.File(label="download", file_count="multiple", interactive=False,
                                                  elem_id="s-files")
            if e_first is not None:  # Edit: the denoisers
                with gr.Tab("Edit", id="edit", elem_id="tab-edit"):
                    offered = edit_choices(e_first)
                    with gr.Row():
                        with gr.Column(scale=1):
                            e_run = gr.Dropdown(ui.models.editors, value=e_first, label="run", elem_id="e-run")
                            e_task = gr.Radio(offered, value=offered[0], label="edit", elem_id="e-task")
                            e_about = gr.Markdown(f"**{offered[0]}**: {EDITS[offered[0]]}")
                            e_upload = gr.File(label=upload_label, type="filepath", elem_id="e-upload")
                            with gr.Row():
                                e_k = gr.Number(1, label="sample #", precision=0, minimum=1, min_width=80, scale=1)
                                e_use = gr.Button("use a sample from the Sample tab", scale=2, elem_id="e-use")
                            e_strength = gr.Slider(0, 1, value=0.75, step=0.05, visible=offered[0] == "sdedit",
                                                   label="SDEdit strength (0: the image itself, 1: a new sample)",
                                                   info=STRENGTH_HELP[0].upper() + STRENGTH_HELP[1:], elem_id="e-strength")
                            with gr.Row():  # ILVR's factor and t_stop; RePaint's resamplings and jump length
                                e_factor = gr.Dropdown(factors(e_first), value=factors(e_first)[0], visible=offered[0] == "ilvr",
                                                       label="ILVR factor (divides the image size)")
                                e_t_stop = gr.Slider(0, 1, value=0, step=0.05, visible=offered[0] == "ilvr",
                                                     label="ILVR t_stop (condition while t >= it)", elem_id="e-t-stop")
                                e_jumps = gr.Slider(1, 10, value=1, step=1, visible=offered[0] == "inpaint",
                                                    label="RePaint resamplings (1: plain replacement)", elem_id="e-jumps")
                                e_length = gr.Slider(1, 50, value=10, step=1, visible=offered[0] == "inpaint",
                                                     label="RePaint jump length (grid steps)", elem_id="e-length")
                            e_mask_file = gr.File(label="or a mask file of the image's size (white = generate)",
                                                  type="filepath", visible=offered[0] == "inpaint", elem_id="e-mask-file")
                            e_prompts = prompt_controls(e_first, "e")
                            with gr.Accordion("sampling", open=False):
                                e_controls = sampling_controls(e_first, 8, "e") + e_prompts
                        with gr.Column(scale=2):
                            blank, blank_size = editor_value(Image.new("L", (ui.models.run(e_first).cfg.data.image_size,) * 2))
                            e_editor = gr.ImageEditor(  # png: the pixels come back as they were (webp would change them)
                                blank, type="pil", sources=(), layers=False, transforms=(), format="png",
                                label="the image: paint the region to inpaint, or strokes for SDEdit", elem_id="e-editor",
                                brush=brush(e_first, offered[0]))
                            e_size = gr.State(blank_size)  # the editor image's own size (W, H), before it was scaled up
                            with gr.Row():  # under the image painted on: in view whatever the controls' length
                                e_go = gr.Button("Edit", variant="primary", elem_id="e-go")
                                e_cancel = gr.Button("Cancel", variant="stop", elem_id="e-cancel")
                            e_status = gr.Markdown(elem_id="e-status", min_height=64)
                            with gr.Row():
                                e_image = gr.Image(label="outputs (the predicted x_0 while sampling)", type="pil",
                                                   format="png", interactive=False, elem_id="e-image", scale=1, height=300)
                                with gr.Column(scale=1):
                                    e_command = gr.Textbox(label="the command line that makes these outputs",
                                                           interactive=False, elem_id="e-command", lines=3)
                                    e_files = gr.File(label="download", file_count="multiple", interactive=False)
                            e_figure = gr.Image(label="the input beside the outputs", type="filepath", interactive=False,
                                                elem_id="e-figure")
            if ui.models.videos:  # Video: predict and interpolate with the video runs
                v_first = ui.models.videos[0]
                with gr.Tab("Video", id="video", elem_id="tab-video"):
                    with gr.Row():
                        with gr.Column(scale=1):
                            v_run = gr.Dropdown(ui.models.videos, value=v_first, label="video run", elem_id="v-run")
                            v_about = gr.Markdown(video_about(v_first), elem_id="v-about")
                            v_upload = gr.File(label=f"video file (GIF or MP4; at most {limits.upload_mb:g} MB and "
                                                     f"{limits.upload_pixels / 1e6:.3g} million pixels over all frames)",
                                               type="filepath", file_types=[".gif", ".mp4"], elem_id="v-upload")
                            v_task = gr.Radio(["predict", "interpolate"], value="predict", label="edit", elem_id="v-task")
                            v_given = gr.Textbox(label="given frames (e.g. 0,1; empty: the edit's default)",
                                                 elem_id="v-given")
                            v_method = gr.Dropdown([("the run's default", ""), *[(m, m) for m in VIDEO_METHODS]],
                                                   value="", label="method", elem_id="v-method")
                            with gr.Row():
                                v_n = gr.Slider(1, 8, value=2, step=1, label="outputs", elem_id="v-n")
                                v_seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="v-seed")
                            v_steps = gr.Number(ui.models.run(v_first).cfg.sample.steps, label="steps (0: all)",
                                                precision=0, minimum=0, elem_id="v-steps")
                            v_ema = gr.Checkbox(True, label="EMA weights", elem_id="v-ema")
                            with gr.Row():
                                v_go = gr.Button("Edit the video", variant="primary", elem_id="v-go")
                                v_cancel = gr.Button("Cancel", variant="stop", elem_id="v-cancel")
                        with gr.Column(scale=2):
                            v_gif = gr.Image(label="the outputs (the given frames kept)", type="filepath",
                                             interactive=False, elem_id="v-gif", height=300)
                            v_sheet = gr.Image(label="contact sheet: the input (given frames only), then each output; "
                                                     "given frames framed in red", type="filepath", interactive=False,
                                               elem_id="v-sheet")
                            v_status = gr.Markdown(elem_id="v-status", min_height=48)
                            v_command = gr.Textbox(label="the command line that writes these files", interactive=False,
                                                   elem_id="v-command")
                            v_files = gr.File(label="download", file_count="multiple", interactive=False,
                                              elem_id="v-files")
            if a_first is not None:  # Autoencode: the diffusion autoencoders
                with gr.Tab("Autoencode", id="autoencode", elem_id="tab-autoencode"):
                    with gr.Row():
                        with gr.Column(scale=1):
                            a_run = gr.Dropdown(ui.models.autoencoders, value=a_first, label="diffusion autoencoder run",
                                                elem_id="a-run")
                            a_mode = gr.Radio(list(SEMANTIC_EDITS), value="reconstruct", label="mode", elem_id="a-mode")
                            a_about = gr.Markdown(autoencode_about(a_first, "reconstruct"), elem_id="a-about")
                            a_image = gr.File(label=upload_label, type="filepath", elem_id="a-image")
                            a_to = gr.File(label="second image file: the other end of the interpolation", type="filepath",
                                           visible=False, elem_id="a-to")
                            with gr.Row():  # (their choices for the run: `ae_widgets`)
                                a_attribute = gr.Dropdown([], value=None, label="attribute (a classifier of the run's codes)",
                                                          visible=False, elem_id="a-attribute")
                                a_class = gr.Dropdown([], value=None, label="class to move towards", visible=False,
                                                      elem_id="a-class")
                            a_amount = gr.Slider(-1, 1, value=0.3, step=0.05, visible=False, elem_id="a-amount",
                                                 label="amount: the step along the attribute in units of sqrt(d) of the "
                                                       "normalised code (the paper: 0.3; negative: the other way)")
                            a_n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label=AE_COUNT["reconstruct"], elem_id="a-n")
                            with gr.Row():
                                a_encode = gr.Number(EditRequest.encode_steps, label="encode steps (DDIM inversion to x_T)",
                                                     precision=0, minimum=1, elem_id="a-encode-steps")
                                a_steps = gr.Number(ui.models.run(a_first).cfg.sample.steps, precision=0, minimum=0,
                                                    label="render steps (DDIM from x_T; 0: all)", elem_id="a-steps")
                            with gr.Row():
                                a_seed = gr.Number(0, label="seed (the variations' x_T)", precision=0, minimum=0,
                                                   elem_id="a-seed")
                                a_ema = gr.Checkbox(True, label="EMA weights (off: --no-ema)", elem_id="a-ema")
                            with gr.Row():
                                a_go = gr.Button("Run", variant="primary", elem_id="a-go")
                                a_cancel = gr.Button("Cancel", variant="stop", elem_id="a-cancel")
                        with gr.Column(scale=2):
                            a_inputs = gr.Image(label="the input images, as the run reads them", type="pil", format="png",
                                                interactive=False, elem_id="a-inputs", height=160)
                            a_status = gr.Markdown(elem_id="a-status", min_height=64)
                            a_strip = gr.Image(label="outputs in a strip (the predicted x_0 while inverting and rendering)",
                                               type="pil", format="png", interactive=False, elem_id="a-strip", height=200)
                            a_command = gr.Textbox(label="the command line that makes these outputs", interactive=False,
                                                   elem_id="a-command", lines=2)
                            with gr.Row():
                                a_figure = gr.Image(label="the inputs beside the outputs", type="filepath",
                                                    interactive=False, elem_id="a-figure", scale=2)
                                a_files = gr.File(label="download", file_count="multiple", interactive=False,
                                                  elem_id="a-files", scale=1)
            if ui.models.unclips:  # unCLIP: pipeline folders (prior and decoder) and decoders
                u_first = ui.models.unclips[0]
                u_modes = unclip_modes(ui.models, u_first)
                u_dec = ui.models.unclip_run(u_first)
                with gr.Tab("unCLIP", id="unclip", elem_id="tab-unclip"):
                    with gr.Row():
                        with gr.Column(scale=1):
                            u_run = gr.Dropdown(ui.models.unclips, value=u_first, label="pipeline folder or decoder run",
                                                elem_id="u-run")
                            u_mode = gr.Radio(u_modes, value=u_modes[0], label="mode", elem_id="u-mode")
                            u_about = gr.Markdown(f"**{u_modes[0]}**: {UNCLIP_MODES[u_modes[0]]}", elem_id="u-about")
                            u_prompt = gr.Textbox(label="prompt (the prior's caption; a decoder that reads captions: its "
                                                        "caption)", placeholder="a red circle",
                                                  visible=u_modes[0] == "prompt" or u_dec.capabilities.text,
                                                  elem_id="u-prompt")
                            u_upload = gr.File(label=upload_label, type="filepath", visible=u_modes[0] != "prompt",
                                               elem_id="u-image")
                            u_to = gr.File(label="second image file: the other end of the interpolation", type="filepath",
                                           visible=False, elem_id="u-to")
                            with gr.Row():
                                u_from_caption = gr.Textbox(label="caption from (what the image shows)", visible=False,
                                                            elem_id="u-from")
                                u_to_caption = gr.Textbox(label="caption to (what it should show)", visible=False,
                                                          elem_id="u-to-caption")
                            u_theta = gr.Slider(0, 1, value=unclip.THETA_PAPER, step=0.05, visible=False,
                                                label="theta: the share of the angle towards the text diff (the paper: "
                                                      "up to 0.5)", elem_id="u-theta")
                            with gr.Row():
                                u_w, u_k = ui.models.prior_defaults(u_first)  # the folder's (or the prior's) defaults
                                u_prior_guidance = gr.Number(u_w, label="prior guidance w", minimum=0,
                                                             visible=u_modes[0] == "prompt", elem_id="u-prior-guidance")
                                u_best_of = gr.Number(u_k, label="best of k prior draws (the paper: 2)", precision=0,
                                                      minimum=1, visible=u_modes[0] == "prompt", elem_id="u-best-of")
                            u_n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="number of images", elem_id="u-n")
                            with gr.Row():
                                u_guidance = gr.Number(u_dec.cfg.sample.guidance, minimum=0, elem_id="u-guidance",
                                                       label="decoder guidance w on z_i", info=HINTS["guidance"])
                                u_steps = gr.Number(u_dec.cfg.sample.steps, label="decoder steps (0: all)", precision=0,
                                                    minimum=0, elem_id="u-steps")
                            with gr.Row():
                                u_seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="u-seed")
                                u_ema = gr.Checkbox(True, label="EMA weights (off: --no-ema)", elem_id="u-ema")
                            with gr.Row():
                                u_go = gr.Button("Run", variant="primary", elem_id="u-go")
                                u_cancel = gr.Button("Cancel", variant="stop", elem_id="u-cancel")
                        with gr.Column(scale=2):
                            u_image = gr.Image(label="outputs (the predicted x_0 while sampling)", type="pil", format="png",
                                               interactive=False, elem_id="u-output", height=300)
                            u_status = gr.Markdown(elem_id="u-status", min_height=64)
                            u_command = gr.Textbox(label="the command line that makes these outputs", interactive=False,
                                                   elem_id="u-command", lines=2)
                            with gr.Row():
                                u_figure = gr.Image(label="the inputs beside the outputs", type="filepath",
                                                    interactive=False, elem_id="u-figure", scale=2)
                                u_files = gr.File(label="download", file_count="multiple", interactive=False,
                                                  elem_id="u-files", scale=1)
            if ui.models.segmenters:  # Segment: the segmentation runs
                with gr.Tab("Segment", id="segment", elem_id="tab-segment"):
                    with gr.Row():
                        with gr.Column(scale=1):
                            g_run = gr.Dropdown(ui.models.segmenters, value=ui.models.segmenters[0],
                                                label="segmentation run", elem_id="g-run")
                            g_about = gr.Markdown(segmenter_about(ui.models, ui.models.segmenters[0]), elem_id="g-about")
                            g_upload = gr.File(label=upload_label, type="filepath", elem_id="g-upload")
                            g_go = gr.Button("Segment", variant="primary", elem_id="g-go")
                        with gr.Column(scale=2):
                            g_figure = gr.Image(label="the image, its labels over it, the uncertainty (nats)",
                                                type="filepath", interactive=False, elem_id="g-figure")
                            g_status = gr.Markdown(elem_id="g-status", min_height=32)
                            g_table = gr.Dataframe(headers=SHARE_HEADERS, label="the classes found", interactive=False,
                                                   elem_id="g-table")
                            g_command = gr.Textbox(label="the command line that writes these files", interactive=False,
                                                   elem_id="g-command")
                            g_files = gr.File(label="download", file_count="multiple", interactive=False,
                                              elem_id="g-files")
            with gr.Tab("Runs", id="runs", elem_id="tab-runs") as r_tab:  # read afresh each time it is shown
                r_run = gr.Dropdown(ui.models.all, value=ui.models.all[0], label="run", elem_id="r-run")
                v = runs_view(ui.models.all[0])  # as the page opens; read again each time the tab is shown
                r_about = gr.Markdown(v["about"], elem_id="r-about")
                with gr.Row():
                    r_loss = gr.Image(v["loss"], label=v["loss_label"], type="pil", format="png", interactive=False,
                                      height=360, elem_id="r-loss")
                    r_grids = gr.Gallery(v["grids"], label=v["grids_label"], columns=4, height=360, interactive=False,
                                         object_fit="contain", format="png", elem_id="r-grids")
                r_evals = gr.Markdown(v["evals"], elem_id="r-evals")
                r_config = gr.Code(v["config"], label="config.toml", interactive=False, max_lines=30, elem_id="r-config")

        jobs = dict(concurrency_limit=None)  # every job enters its handler at once and waits its turn in ui.queue
        if first is not None:
            s_run.change(on_run, s_run, [*s_controls[:5], *s_prompts], queue=False)
            s_job = s_go.click(sample, [s_run, *s_controls], [s_image, s_status, s_command, s_gif, s_files, last],
                               show_progress_on=[s_status], **jobs)
            s_cancel.click(lambda: CANCELLED, None, s_status, cancels=[s_job], queue=False)
        if e_first is not None:
            e_run.change(on_edit_run, e_run, [e_task, e_factor, e_editor, *e_controls[:5], *e_prompts], queue=False)
            e_task.change(on_task, [e_run, e_task], [e_about, e_editor, e_strength, e_factor, e_t_stop, e_jumps, e_length,
                                                     e_mask_file], queue=False)
            uploaded = e_upload.upload(upload, e_upload, [e_editor, e_size, e_status])
            for after in (uploaded.success, uploaded.failure):  # the box empty again for the next file
                after(lambda: None, None, e_upload, queue=False)
            e_use.click(use_sample, [last, e_k], [e_editor, e_size, e_status])
            e_job = e_go.click(edit, [e_run, e_task, e_editor, e_size, e_mask_file, e_strength, e_factor, e_t_stop, e_jumps,
                                      e_length, *e_controls], [e_image, e_figure, e_status, e_command, e_files],
                               show_progress_on=[e_status], **jobs)
            e_cancel.click(lambda: CANCELLED, None, e_status, cancels=[e_job], queue=False)
        if ui.models.videos:
            v_run.change(video_about, v_run, v_about, queue=False)
            v_job = v_go.click(video_edit, [v_run, v_task, v_upload, v_given, v_method, v_n, v_seed, v_steps, v_ema],
                               [v_gif, v_sheet, v_status, v_command, v_files], show_progress_on=[v_status], **jobs)
            v_cancel.click(lambda: CANCELLED, None, v_status, cancels=[v_job], queue=False)
        if a_first is not None:
            a_shown = [a_about, a_to, a_attribute, a_class, a_amount, a_n]
            a_run.change(on_ae_run, [a_run, a_mode, a_n], [*a_shown, a_steps], queue=False)
            a_mode.change(ae_widgets, [a_run, a_mode, a_attribute, a_n], a_shown, queue=False)
            a_attribute.input(ae_widgets, [a_run, a_mode, a_attribute, a_n], a_shown, queue=False)
            for upload_box in (a_image, a_to):
                upload_box.upload(show_inputs, [a_run, a_mode, a_image, a_to], [a_inputs, a_status])
            a_job = a_go.click(autoencode, [a_run, a_mode, a_image, a_to, a_attribute, a_class, a_amount, a_n, a_encode,
                                            a_steps, a_seed, a_ema], [a_strip, a_figure, a_status, a_command, a_files],
                               show_progress_on=[a_status], **jobs)
            a_cancel.click(lambda: CANCELLED, None, a_status, cancels=[a_job], queue=False)
        if ui.models.unclips:
            u_shown = [u_mode, u_about, u_prompt, u_upload, u_to, u_from_caption, u_to_caption, u_theta, u_prior_guidance,
                       u_best_of, u_guidance]
            u_run.change(unclip_on_run, [u_run, u_mode], [*u_shown, u_steps], queue=False)
            u_mode.change(unclip_widgets, [u_run, u_mode], u_shown, queue=False)
            u_job = u_go.click(unclip_job, [u_run, u_mode, u_prompt, u_upload, u_to, u_from_caption, u_to_caption, u_theta,
                                            u_n, u_guidance, u_prior_guidance, u_best_of, u_steps, u_seed, u_ema],
                               [u_image, u_figure, u_status, u_command, u_files], show_progress_on=[u_status], **jobs)
            u_cancel.click(lambda: CANCELLED, None, u_status, cancels=[u_job], queue=False)
        if ui.models.segmenters:
            g_outputs = [g_figure, g_table, g_files, g_status, g_command]
            g_upload.upload(segment, [g_run, g_upload], g_outputs, **jobs)
            g_go.click(segment, [g_run, g_upload], g_outputs, **jobs)
            g_run.change(lambda run: segmenter_about(ui.models, run), g_run, g_about, queue=False)
        r_shown = [r_about, r_config, r_loss, r_grids, r_evals]
        r_run.change(show_run, r_run, r_shown, queue=False)
        r_tab.select(show_run, r_run, r_shown, queue=False)
    app.queue(max_size=4 * limits.queue)  # Gradio's own queue (uploads); the jobs wait in ui.queue
    app.webui = ui  # the server's state, for tests and tools
    return app


# --- serving: the address, the login, the end ----------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether `host` is an address of this machine only (127.0.0.0/8, ::1, localhost); 0.0.0.0 and :: listen on
    every interface, and any other name or address is reachable from elsewhere."""
    if host.strip().lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(text: str, source: str) -> tuple[str, str]:
    """USER:PASSWORD (the password may hold colons) -> (user, password). ValueError naming `source` (the flag, file or
    variable it came from) when either part is empty."""
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{source} must be USER:PASSWORD with neither part empty (e.g. ada:correct-horse), got "
                         f"{'an empty value' if not text.strip() else 'no password' if user else 'no user'}")
    return user, password


def read_auth(auth: str | None = None, auth_file: str | None = None) -> tuple[str, str] | None:
    """The page's login: --auth USER:PASSWORD, else the first line of --auth-file, else $DIFFUSE_AUTH; None when none
    is given. ValueError naming the source for a malformed one or an unreadable file."""
    if auth is not None:
        return parse_auth(auth, "--auth")
    if auth_file is not None:
        try:
            lines = Path(auth_file).expanduser().read_text().splitlines()
        except OSError as e:
            raise ValueError(f"--auth-file {auth_file} cannot be read ({e.strerror or e}); give a file whose first line "
                             "is USER:PASSWORD") from None
        return parse_auth(lines[0] if lines else "", f"the first line of --auth-file {auth_file}")
    if os.environ.get(AUTH_ENV):
        return parse_auth(os.environ[AUTH_ENV], f"${AUTH_ENV}")
    return None


def check_exposure(host: str, auth: tuple[str, str] | None) -> None:
    """Refuse to serve beyond this machine without a login: ValueError naming --host and the flags that give one."""
    if auth is None and not is_loopback(host):
        raise ValueError(f"--host {host} makes the page reachable from other machines, so it needs a login: pass "
                         f"--auth-file FILE (its first line USER:PASSWORD), or set {AUTH_ENV}=USER:PASSWORD in the "
                         "environment, or --auth USER:PASSWORD (kept in the shell's history); or serve on --host "
                         "127.0.0.1 and reach it through an SSH tunnel (ssh -L 7860:127.0.0.1:7860 HOST)")


def page_url(host: str, port: int) -> tuple[str, str]:
    """The URL a browser opens for a server on host:port, and where it listens in words: a wildcard address (0.0.0.0,
    ::) is no address to open, so the URL names this machine (its host name) and the words say every interface and
    the local URL."""
    wildcard = host.strip("[]") in ("0.0.0.0", "::", "")
    if wildcard:
        return (f"http://{socket.gethostname()}:{port}",
                f"listening on every interface (on this machine: http://127.0.0.1:{port})")
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host  # an IPv6 address in a URL
    return f"http://{shown}:{port}", ("this machine only" if is_loopback(host) else f"listening on {host}")


def launch(app, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None) -> str:
    """Start serving a `build_app` page on host:port in a background thread and return its URL (`page_url`): never a
    share link, no browser opened, messages of failed events shown on the page, uploads over the app's
    limits.upload_mb refused as they arrive, and with `auth` (user, password) a login form before anything else.
    `app.close()` stops it. Raises ValueError for a host beyond this machine without `auth` (`check_exposure`) and
    when the port cannot be had."""
    check_exposure(host, auth)
    limits = app.webui.limits
    try:
        app.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True, quiet=True,
                   prevent_thread_lock=True, allowed_paths=[str(app.webui.folder)], auth=auth, css=CSS,
                   auth_message="diffuse serve: log in with the user and password the server was started with",
                   max_file_size=int(limits.upload_mb * 2**20))  # Gradio's MB
    except OSError:  # Gradio's "Cannot find empty port": one line, as every CLI error
        raise ValueError(f"cannot listen on {host}:{port} (in use, or not an address of this machine); pick another "
                         "--port (or --host)") from None
    return page_url(host, port)[0]


def serve(runs: list[str], host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
          auth: tuple[str, str] | None = None, limits: Limits = Limits()) -> None:
    """`diffuse serve`: the page for these runs on host:port until Ctrl+C or SIGTERM (what systemd and docker send to
    stop it; blocking), either of which closes the server and removes the folder of the jobs' files. Listens on
    127.0.0.1 (this machine only) unless host says otherwise, which needs `auth` (`check_exposure`, before any run
    loads). Raises ValueError without Gradio 6 (naming `pip install -e ".[ui]"`), for a run that is neither a denoiser
    nor a segmentation run, a host beyond this machine without a login, or a port in use; FileNotFoundError for a
    folder that is not a run."""
    check_exposure(host, auth)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())  # (Python runs it in the main thread, here)
    # Gradio's own copies of uploads and outputs in a private folder of this server (0700), removed with the jobs'
    # files; every image Gradio decodes (the editor's layers come as images, not files) under the page's pixel limit
    # (Pillow refuses above twice MAX_IMAGE_PIXELS); the client of a request is the socket's peer, never a
    # X-Forwarded-For header anyone behind a local proxy or tunnel could set (uvicorn trusts 127.0.0.1's by default)
    cache = Path(tempfile.mkdtemp(prefix="diffuse-gradio-"))
    saved = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "FORWARDED_ALLOW_IPS")}
    os.environ["GRADIO_TEMP_DIR"] = str(cache)
    os.environ.setdefault("FORWARDED_ALLOW_IPS", "")
    pixels, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max(limits.upload_pixels // 2, 1)
    try:
        app = build_app(runs, device=device, limits=limits)
        try:
            url = launch(app, host, port, auth)
            print(f"serving {', '.join(app.webui.models.all)} on {url} ({page_url(host, port)[1]}; {app.webui.device}"
                  f"{'; login required' if auth else ''}); Ctrl+C stops", flush=True)
            try:
                while not stop.wait(0.5):  # Ctrl+C raises KeyboardInterrupt here
                    pass
            except KeyboardInterrupt:
                pass
            print("diffuse serve: stopping; the jobs' files are removed", flush=True)
        finally:
            app.close()
            app.webui.cleanup()
    finally:
        signal.signal(signal.SIGTERM, previous)
        Image.MAX_IMAGE_PIXELS = pixels
        shutil.rmtree(cache, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
