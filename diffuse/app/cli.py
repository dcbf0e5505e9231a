"""The `diffuse` command: train, sample, edit, segment, eval, demo.

    diffuse train CONFIG [--set key=value ...] --out RUN      (again on RUN: resume)
    diffuse sample RUN --n N --sampler NAME --steps K --seed S --out FILE.png|FILE.npy
                  [--label L] [--guidance W] [--classifier RUN] [--threshold static|none|dynamic:P] [--opt KEY=VALUE]
                  [--clip CLIPRUN --prompt TEXT --clip-scale S [--clip-cutouts N]]     (CLIP guidance)
    diffuse edit sdedit RUN --image IMG --strength S --out OUT.png     (also inpaint --mask, ilvr --reference --factor)
    diffuse sample VIDEO_RUN [--frames N --scheme autoregressive|hierarchy-2] --out V.gif|V.mp4   (and V.png: the sheet)
    diffuse edit predict|interpolate VIDEO_RUN --video IN.gif --given 0,1 [--method masked|reconstruction|replacement]
    diffuse edit predict|interpolate VIDEO_RUN --video IN.gif --frames 32 [--scheme hierarchy-2]  (longer than the model)
    diffuse edit sdedit VIDEO_RUN --video IN.gif --strength S --out OUT.gif
    diffuse edit variations|interpolate|textdiff DECODER --image A [--to B] [--from CAPTION --to CAPTION --theta T]
                                                              (unCLIP's decoder, model.image_embed_dim; --invert)
    diffuse sample PIPE --prompt TEXT [--prior-guidance W] [--best-of K] [--guidance W]   (an unCLIP pipeline folder:
                                                              PIPE/unclip.toml names a prior and a decoder; edits take PIPE too)
    diffuse segment SEG_RUN --image IMG --out MASK.png        (also --image A --image B ... --out FOLDER)
    diffuse eval RUN --metric fid|kid|is|pr|nll|vlb [--n N] [--features NET] [--sampler NAME --steps K]
    diffuse eval SEG_RUN [--metric miou] [--real FOLDER]      (FOLDER/images with FOLDER/masks)
    diffuse eval CLIP_RUN [--metric retrieval]                 (held-out recall@1/5, per noise level; zero-shot digits)
    diffuse eval PRIOR_RUN [--metric prior] [--n N]            (unCLIP prior: cosines to the true image, caption, unrelated image)
    diffuse serve RUN [RUN ...] [--port P] [--host 127.0.0.1] [--auth-file F]   (the web UI; pip install -e ".[ui]")
    diffuse export RUN --format diffusers --out DIR           (a UNet2DModel pipeline folder diffusers samples)
    (sample, edit, eval and serve also take a Hugging Face model id as RUN, with --revision)
    diffuse demo [--out DIR] [--toy]
    diffuse config list | show NAME|FILE [--set key=value ...]
    diffuse --version
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import math
import sys
import warnings

from ..version import __version__
from ..config import ConfigError
from ..generate import CHUNK
from ..samplers import SAMPLERS
from ..schedule import SPACINGS
from ..tasks.editing import STRENGTH_HELP
from ..tasks.semantic import AMOUNT_LIMIT
from ..train import NonFiniteLoss, ResumeError
from ..runs import VIDEO_EDITS
from .requests import LONG_SCHEMES, RECONSTRUCTION_WEIGHT, VIDEO_METHODS, parse_given


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


SET_HELP = ("override a config value, as TOML: train.lr=1e-4, model.channel_mult=[1,2], train.posthoc_ema=[] (an empty "
            "list: post-hoc EMA off, with the settings only it reads) (repeatable)")
MIXED_PRECISION_HELP = ("the network under autocast while sampling (the sampler steps in float32): auto (bf16 on GPUs and "
                        "CPUs with native bf16: AMX, AVX512-BF16), no (float32), bf16, fp16 (CUDA); default: the run's "
                        "sample.mixed_precision")


RUN_HELP = "run folder written by `diffuse train`, a diffusers folder, or a Hugging Face model id (owner/name)"
REVISION_HELP = ("a branch, tag or commit of a Hugging Face model id given as RUN (default: main); the id is read from "
                 "huggingface_hub's cache, downloaded there where the network allows (HF_HUB_OFFLINE=1: the cache only)")


def given_arg(text: str) -> tuple[int, ...]:
    """--given I,J,...: the given frames' indices (requests.parse_given), an argparse error naming the form otherwise."""
    try:
        return parse_given(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sampling_flags(s: argparse.ArgumentParser, out_help: str | None = None) -> None:
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
    s.add_argument("--compile", choices=["auto", "yes", "no"], help="torch.compile the network for sampling (a CUDA graph on a "
                   "GPU; the first chunk pays the compile); auto: on CUDA (default: the run's sample.compile)")
    s.add_argument("--seed", type=SEED, default=0)
    s.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--device", type=device_arg, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--out", required=True, help=out_help or "FILE.png (grid) or FILE.npy (array (N, C, H, W) in [0, 1])")
    s.add_argument("--revision", help=REVISION_HELP)


DISTRIBUTION = "diffuse-lectures"  # the name pip knows the package by (pyproject.toml); the import name is diffuse


def version() -> str:
    """The installed distribution's version (importlib.metadata), or the package's __version__ when it runs from a
    source tree that pip has not installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return __version__


class Parser(argparse.ArgumentParser):
    """argparse with a hint for a misspelt command: `diffuse trian` -> "unknown command 'trian'; did you mean 'train'?"
    (at every level: `diffuse edit inpiant` names inpaint)."""

    commands = None  # the subparsers action of this parser, if it has commands

    def add_subparsers(self, **kwargs):
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        word = next((a for a in args if not a.startswith("-")), None)  # no option before a command takes a value
        if self.commands is not None and word is not None and word not in self.commands.choices:
            close = difflib.get_close_matches(word, list(self.commands.choices), n=1, cutoff=0.6)
            if close:
                self.error(f"unknown command {word!r}; did you mean {close[0]!r}? (commands: "
                           f"{', '.join(self.commands.choices)})")
        return super().parse_known_args(args, namespace)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="diffuse", description="Denoising diffusion models: train, sample, demo.")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()} (the {DISTRIBUTION} package)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a TOML config into a run folder (resumes an existing one)")
    t.add_argument("config", help="a packaged config by name (e.g. mnist_cond; `diffuse config list`), a TOML file, or "
                                  "RUN/config.toml")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    t.add_argument("--out", required=True, help="run folder (created, or resumed if it holds a run)")
    t.add_argument("--inexact-resume", action="store_true", help="resume from the weights even if training state is missing or the config changed")
    t.add_argument("--dry-run", action="store_true",
                   help="print the parameter count, FLOPs per image and peak memory of one training step, then stop "
                        "(nothing is written to --out)")

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run", help=RUN_HELP)
    s.add_argument("--n", type=number(int, low=1), default=64, help="number of samples (default 64)")
    s.add_argument("--batch-size", type=number(int, low=1), default=CHUNK,
                   help=f"draw in chunks of this many (default {CHUNK}, fast on CPUs); chunk k > 0 has its own seed from (--seed, k)")
    s.add_argument("--frames", type=number(int, low=1), help="a video run: frames per video (default: the run's "
                   "data.frames); more than the model's need --scheme and a masked-conditioning model")
    s.add_argument("--scheme", choices=list(LONG_SCHEMES), help="a video run, --frames beyond the model's: draw the video in "
                   "stages (Harvey et al. 2022): autoregressive (each stage continues the last frames) or hierarchy-2 "
                   "(sparse frames over the whole video first, then the frames between)")
    s.add_argument("--clip", dest="clip_run", metavar="CLIPRUN",
                   help="CLIP guidance towards --prompt with a CLIP run (model.kind = 'clip', configs/clip_shapes.toml) "
                        "of the run's image size, on an unconditional or class-conditional run: a noise-aware CLIP "
                        "guides x_t (GLIDE), a plain one the predicted x_0 (k-diffusion; decoded on a latent run)")
    s.add_argument("--clip-scale", type=number(low=0), metavar="S",
                   help="the CLIP guidance scale (needed with --clip; 0: none): s times the gradient of the cosine "
                        "f(x_t, t) . g(c) (noise-aware), or of the spherical distance on x_0 (plain)")
    s.add_argument("--clip-cutouts", type=number(int, low=1), metavar="N",
                   help="a plain CLIP: the randomly shifted copies of x_0 it reads per step, losses averaged (default 1)")
    s.add_argument("--prior-guidance", type=number(low=0), metavar="W",
                   help="an unCLIP pipeline folder (unclip.toml): the prior's classifier-free guidance weight w (default: "
                        "the folder's prior_guidance, else the prior run's sample.guidance); --guidance is the decoder's "
                        "on the image embedding")
    s.add_argument("--best-of", type=number(int, low=1), metavar="K",
                   help="an unCLIP pipeline folder: prior draws per image, the one nearest the caption's CLIP text "
                        "embedding kept (default: the folder's best_of, else 2 as in the paper)")
    _sampling_flags(s, "FILE.png (grid) or FILE.npy (array (N, C, H, W) in [0, 1]); a video run: FILE.gif or FILE.mp4 "
                       "(the videos tiled, with the contact sheet FILE.png beside it) or FILE.npy ((N, C, F, H, W))")

    ed = sub.add_parser("edit", help="edit an image with a trained run, without training: sdedit, inpaint (RePaint), ilvr")
    tasks_sub = ed.add_subparsers(dest="task", required=True)
    about = {"sdedit": "SDEdit (Meng et al. 2022): noise a guide image (a sketch, strokes) to --strength, then denoise",
             "inpaint": "fill the white region of --mask, keep the rest (RePaint, Lugmayr et al. 2022; or a Palette "
                        "inpainting run's own network)",
             "ilvr": "samples that share the --factor x --factor block means of --reference (ILVR, Choi et al. 2021)",
             "superres": "a super-resolution run (SR3, task.kind = 'superres'): --image is the low-resolution input",
             "colorize": "a colorization run (Palette, task.kind = 'colorize'): --image is made grayscale and coloured",
             "uncrop": "an uncropping run (Palette, task.kind = 'uncrop'): the border of --image is generated",
             "restore": "a JPEG-restoration run (Palette, task.kind = 'jpeg'): --image is the compressed input",
             "invert": "DDIM inversion of --image to its noise x_T (any model of images: the deterministic sampler run "
                       "upwards), written to --out X.safetensors; --reconstruct renders it back beside it",
             "reconstruct": "a diffusion autoencoder (model.kind = 'diffae'): --image's semantic code z_sem and x_T "
                            "rendered back, then --n - 1 variations of z_sem from random x_T (Preechakul et al. 2022)",
             "manipulate": "a diffusion autoencoder: move --image's code along an --attribute classifier's direction by "
                           "--amount, rendered with the same x_T (--n images from 0 to the amount)",
             "interpolate": "a diffusion autoencoder: --n images from --image to --to, z_sem by lerp and x_T by slerp; "
                            "a video run: --video's --given frames kept, the frames between them generated; unCLIP's "
                            "decoder: the CLIP embeddings by slerp, one x_T (--invert: both inverted, by slerp)",
             "predict": "a video run: --video's first frames (--given 0,1,...,k-1) kept, the rest generated (Harvey et "
                        "al. 2022)",
             "variations": "unCLIP's decoder (Ramesh et al. 2022, sec. 3.1): --image's CLIP embedding z_i kept, --n "
                           "images from new x_T (--invert: its own x_T by DDIM inversion, decoded with --eta > 0)",
             "textdiff": "unCLIP's decoder (sec. 3.3): --image's z_i rotated by slerp towards the text diff "
                         "normalise(z_t(--to) - z_t(--from)) by --theta, decoded from its inverted x_T (--n images "
                         "from theta 0, the reconstruction, to --theta)"}
    coded = ("invert", "reconstruct", "manipulate", "interpolate")
    for task, text in about.items():
        tp = tasks_sub.add_parser(task, help=text, description=text)
        tp.add_argument("run", help=RUN_HELP)
        if task == "ilvr":
            tp.add_argument("--reference", required=True, help="reference image (resized to the model's size with a note)")
            tp.add_argument("--factor", type=number(int, low=1), required=True, help="downsampling factor N of the low-pass filter; must divide the image size")
            tp.add_argument("--t-stop", type=number(low=0, high=1), default=0.0, help="condition only while t >= this (0: every step)")
        elif task != "predict":
            tp.add_argument("--image", required=task not in ("interpolate", "sdedit"),
                            help="input image (resized to the model's size with a note)")
        if task in VIDEO_EDITS:
            tp.add_argument("--video", help="a video run: the input video, .gif or .mp4 (frames resized to the model's "
                                            "size)" + ("" if task == "predict" else "; instead of --image and --to"))
            tp.add_argument("--frames", type=number(int, low=1), help="the video's first frames edited (default: the "
                                                                      "run's data.frames; more than the model's: in "
                                                                      "stages, by a masked-conditioning model)")
            tp.add_argument("--given", type=given_arg, metavar="I,J,...",
                            help="the given frames' indices, kept exactly (default: " +
                                 ("the first half" if task == "predict" else "the first and the last") + ")")
            tp.add_argument("--method", choices=list(VIDEO_METHODS),
                            help="masked: a masked-conditioning model (model.video_observed; the default for one); "
                                 "reconstruction: reconstruction guidance of any video run (Ho et al. 2022; the default "
                                 "otherwise); replacement: the given frames' noisy versions put back after every step")
            tp.add_argument("--guidance-weight", type=number(low=0),
                            help=f"--method reconstruction: the weight w_r (default {RECONSTRUCTION_WEIGHT:g}; Ho et al. "
                                 "take w_r > 1)")
        if task == "sdedit":
            tp.add_argument("--strength", type=number(low=0, high=1), required=True, help="in [0, 1]: " + STRENGTH_HELP)
            tp.add_argument("--video", help="a video run: the input video, .gif or .mp4, every frame noised to --strength "
                                            "and the whole video denoised (instead of --image)")
            tp.add_argument("--frames", type=number(int, low=1), help="a video run: the video's first frames edited "
                                                                      "(default and at most: the run's data.frames)")
        if task == "predict":
            tp.add_argument("--scheme", choices=list(LONG_SCHEMES), help="--frames beyond the model's: the stages after "
                            "the given frames (Harvey et al. 2022): autoregressive (the default) or hierarchy-2")
        if task == "inpaint":
            tp.add_argument("--mask", required=True, help="mask image of the same size as --image: white = generate, black = keep")
            tp.add_argument("--repaint-jumps", type=number(int, low=1, high=100), default=1,
                            help="RePaint's resamplings r per jump point (1: plain replacement; the paper: 10; costs ~r times the steps)")
            tp.add_argument("--repaint-length", type=number(int, low=1), default=10, help="RePaint's jump length in grid steps (the paper: 10)")
        if task == "interpolate":
            tp.add_argument("--to", help="the image to interpolate towards (resized like --image)")
        if task in ("variations", "interpolate"):
            tp.add_argument("--invert", action="store_true",
                            help="unCLIP's decoder: x_T by DDIM inversion of the input under its embedding (--encode-steps) "
                                 "instead of drawn from --seed")
        if task == "textdiff":
            tp.add_argument("--from", dest="from_prompt", required=True, metavar="CAPTION",
                            help="the caption of what the image shows now, e.g. \"a red circle\"")
            tp.add_argument("--to", required=True, metavar="CAPTION",
                            help="the caption of what it should show, e.g. \"a blue circle\"")
            tp.add_argument("--theta", type=number(low=0, high=1),
                            help="the share of the angle from the image's embedding towards the text diff, in [0, 1] "
                                 "(default 0.5; the paper shows 0 to 0.5)")
        if task == "manipulate":
            tp.add_argument("--attribute", required=True, metavar="RUN[:CLASS]",
                            help="a classifier run on this run's codes (model.kind = 'diffae_classifier', e.g. "
                                 "configs/diffae_thickness.toml); a label classifier takes the class to move towards, RUN:7")
            tp.add_argument("--amount", type=number(low=-AMOUNT_LIMIT, high=AMOUNT_LIMIT), required=True,
                            help="the step s along the direction, in units of sqrt(d) of the z-normalised code (the "
                                 "paper: 0.3; negative: the other way)")
        if task in (*coded, "variations", "textdiff"):
            tp.add_argument("--encode-steps", type=number(int, low=1), default=250,
                            help="DDIM steps of the inversion to x_T (default 250, the paper's); the rendering takes --steps")
            tp.add_argument("--refine", type=number(int, low=0, high=100), default=0,
                            help="fixed-point iterations per inversion step towards the exact inverse (Pan et al. 2023): "
                                 "a closer reconstruction for that many more network calls per step (default 0)")
        if task == "invert":
            tp.add_argument("--reconstruct", action="store_true",
                            help="also render x_T back with deterministic DDIM: OUT.png and OUT_before_after.png")
        if task != "invert":
            tp.add_argument("--n", type=number(int, low=1), default=8, help="outputs of the one input (default 8)")
        if task not in coded and task not in ("predict", "variations", "textdiff"):
            tp.add_argument("--mean", action="store_true",
                            help="write the mean of the --n outputs, an estimate of E[x | input]: higher PSNR, less detail "
                                 "(JPEG restoration: 4 samples beat the input's PSNR where one does not, bench/RESULTS.md)")
        _sampling_flags(tp, "X.safetensors: x_T (1, C, H, W), the grid it was inverted on and the run's step"
                        if task == "invert" else None)
        if task == "invert":
            tp.set_defaults(n=1)

    segment_about = ("label every pixel of images with a segmentation run (model.kind = 'segmenter', Baranchuk et al. "
                     "2022): a palette PNG of class indices, an overlay figure and each class's share of the pixels")
    g = sub.add_parser("segment", help=segment_about, description=segment_about)
    g.add_argument("run", help="segmentation run folder, trained with e.g. `diffuse train configs/segment_digits.toml`")
    g.add_argument("--image", action="append", required=True, metavar="IMG",
                   help="image file to segment (repeatable), fitted to the run's size and channels with a note")
    g.add_argument("--out", required=True, metavar="MASK.png|FOLDER",
                   help="one --image: MASK.png, the labels as a palette PNG at the model's size (each pixel's value is "
                        "its class index; class 0 black), and MASK_overlay.png beside it (the image, the labels blended over "
                        "it with a legend, the uncertainty in nats). Any number of --image: a FOLDER (a name without "
                        "a suffix, created if missing) that gets NAME_mask.png and NAME_mask_overlay.png for each "
                        "image NAME.png")
    g.add_argument("--device", type=device_arg, help="cpu or cuda (default: cuda if available)")

    e = sub.add_parser("eval", help="evaluate a run: sample quality (fid, kid, is, pr) or likelihood (nll, vlb), in bits/dim; "
                                    "an autoencoder's reconstructions (recon); a segmentation run's mIoU (miou); a CLIP's retrieval")
    e.add_argument("run", help=RUN_HELP)
    e.add_argument("--metric", choices=["fid", "kid", "is", "pr", "nll", "vlb", "recon", "miou", "retrieval", "prior"],
                   help="fid / kid / is / pr of --n samples against --n real images (in the --features space); "
                        "nll: probability-flow ODE bits/dim of --n real images; vlb: the variational bound in bits/dim; "
                        "recon (the only one, and the default, for an autoencoder run): PSNR, rFID and codebook usage of "
                        "the held-out images' reconstructions; miou (the only one, and the default, for a segmentation "
                        "run): mean and per-class IoU and pixel accuracy on its held-out images or --real FOLDER; retrieval (the "
                        "only one, and the default, for a CLIP run): held-out recall@1/5 text->image and image->text "
                        "per noise level, zero-shot digit accuracy; prior (the only one, and the default, for an unCLIP "
                        "prior run): cosines of its best-of-2 embeddings for --n of its CLIP's held-out captions to the true "
                        "image's, to the caption's and to an unrelated caption's image embedding")
    e.add_argument("--features", metavar="NET",
                   help="feature network of fid/kid/is/pr: digits (default; the cached digit classifier), "
                        "inception:PATH (the standard FID Inception-v3 from a local weights file, "
                        "pt_inception-2015-12-05-6726825d.pth; PATH defaults to $DIFFUSE_INCEPTION_WEIGHTS), "
                        "or MODULE:ATTR / FILE.py:ATTR (your nn.Module, or a function returning one)")
    e.add_argument("--n", type=number(int, low=2), default=1000, help="images (default 1000)")
    e.add_argument("--real", metavar="FOLDER",
                   help="the real images to compare with or to measure (default: the run's data set; a diffusers model "
                        "folder needs it), fitted to the run's image size and channels; for miou, labelled images: "
                        "FOLDER/images/NAME.png with FOLDER/masks/NAME.png (class indices, 255 = ignore) and optionally "
                        "FOLDER/classes.txt (default: the run's held-out images)")
    e.add_argument("--batch-size", type=number(int, low=1), default=CHUNK,
                   help=f"draw the samples in chunks of this many (default {CHUNK}); chunk k > 0 has its own seed from (--seed, k)")
    e.add_argument("--sampler", choices=list(SAMPLERS), metavar="NAME", help="sampler for fid/kid/is/pr (default: the run's)")
    e.add_argument("--steps", type=number(int, low=0), help="sampler steps (default: the run's; 0 = every one of the T steps)")
    e.add_argument("--spacing", choices=list(SPACINGS))
    e.add_argument("--guidance", type=number(low=0), help="classifier-free guidance weight (default: the run's)")
    e.add_argument("--guidance-interval", type=guidance_interval, metavar="LO,HI",
                   help="guide only at noise levels sigma/alpha in (LO, HI]; all: every level (default: the run's)")
    e.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], help="fid/kid/is/pr: " + MIXED_PRECISION_HELP)
    e.add_argument("--compile", choices=["auto", "yes", "no"], help="fid/kid/is/pr: torch.compile the network for sampling "
                   "(a CUDA graph on a GPU); auto: on CUDA (default: the run's sample.compile)")
    e.add_argument("--rtol", type=number(low=0, above=True, high=1), help="nll: the ODE solver's tolerance (default 1e-5)")
    e.add_argument("--vlb-samples", type=number(int, low=1), help="vlb: estimate from this many random steps (default: all T terms)")
    e.add_argument("--seed", type=SEED, default=0)
    e.add_argument("--no-ema", action="store_true")
    e.add_argument("--device", type=device_arg, help="cpu or cuda (default: cuda if available)")
    e.add_argument("--revision", help=REVISION_HELP)

    m = sub.add_parser("ema", help="rebuild an EMA of any length from a run's post-hoc EMA snapshots (EDM2) into a run folder")
    m.add_argument("run", help="run folder trained with train.posthoc_ema (it holds RUN/ema_snapshots)")
    m.add_argument("--sigma-rel", type=number(low=0, above=True, high=0.3), required=True,
                   help="the EMA length as a fraction of training, e.g. 0.05 (EDM2's best are 0.05-0.15)")
    m.add_argument("--step", type=number(int, low=1), help="rebuild the EMA at this snapshot's step (default: the last)")
    m.add_argument("--out", required=True, help="output run folder, e.g. RUN/ema_005; `diffuse sample` and `eval` read it")

    x = sub.add_parser("export", help="write a run as a diffusers folder (UNet2DModel and scheduler: DDPMPipeline / "
                                      "DDIMPipeline.from_pretrained(DIR) sample it)")
    x.add_argument("run", help="run folder written by `diffuse train`")
    x.add_argument("--format", choices=["diffusers"], required=True, help="the folder's format: diffusers (a pipeline "
                                                                          "folder: unet/, scheduler/, model_index.json)")
    x.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist, or be empty)")
    x.add_argument("--step", type=number(int, low=0), help="the checkpoint to export (default: the newest)")
    x.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")

    w = sub.add_parser("serve", help="a local web page to sample, edit, segment with and inspect runs (Gradio; the [ui] extra)")
    w.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or diffusers model folders) to offer: diffusion runs "
                                                          "(Sample, Edit) and segmentation runs (Segment)")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                                                         "any other, 0.0.0.0 included, needs a login)")
    w.add_argument("--port", type=number(int, low=1, high=65535), default=7860, help="port (default 7860)")
    w.add_argument("--device", type=device_arg, help="cpu or cuda (default: cuda if available)")
    w.add_argument("--revision", help=REVISION_HELP + "; the same revision for every id given")
    w.add_argument("--auth", metavar="USER:PASSWORD", help="the page's login (kept in the shell history: prefer "
                                                           "--auth-file or $DIFFUSE_AUTH)")
    w.add_argument("--auth-file", metavar="FILE", help="a file whose first line is USER:PASSWORD (default: "
                                                       "$DIFFUSE_AUTH when set)")
    w.add_argument("--max-upload-mb", type=number(above=True, low=0),
                   help="largest upload file in MB (default 20)")
    w.add_argument("--max-upload-pixels", type=number(int, low=1),
                   help="most pixels of an uploaded image, checked before it is decoded (default 16777216 = 4096x4096)")
    w.add_argument("--queue-size", type=number(int, low=1),
                   help="most jobs running or waiting on the device (default 16)")
    w.add_argument("--jobs-per-client", type=number(int, low=1),
                   help="most of those from one client address (default 2: one running, one waiting)")

    d = sub.add_parser("demo", help="train on the bundled MNIST digits (~10 min on a 2-core CPU) and write figures; "
                                    "--toy: two-pixel images in under a minute")
    d.add_argument("--out", help="output folder (default ./demo, with --toy ./demo_toy)")
    d.add_argument("--time-limit", type=number(low=0),
                   help="seconds of training (default: the demo config's 480; 0 = no limit, as train.time_limit = 0)")
    d.add_argument("--toy", action="store_true",
                   help="the two-pixel picture of the lectures: train on 2-D points (two-pixel images) from a mixture of "
                        "Gaussians and draw the forward process, reverse trajectories and the learned score against "
                        "the exact one (PNGs and a GIF)")

    c = sub.add_parser("config", help="the packaged configs: list their names, or show one resolved")
    config_sub = c.add_subparsers(dest="action", required=True)
    config_sub.add_parser("list", help="the names of the configs that ship in the package, each with its first line")
    cs = config_sub.add_parser("show", help="print the whole resolved config (every key, defaults filled in, --set "
                                            "applied), as `diffuse train` would save it in RUN/config.toml")
    cs.add_argument("config", help="a packaged config by name (e.g. mnist_cond), a TOML file, or RUN/config.toml")
    cs.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
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
    from .commands import COMMANDS  # only now: --help and a mistyped flag answer without loading the commands
    formatwarning = warnings.formatwarning  # warnings print as "diffuse CMD: warning: ...", like the errors
    warnings.formatwarning = lambda message, *_, **__: f"diffuse {args.command}: warning: {message}\n"
    try:
        COMMANDS[args.command](args)
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
