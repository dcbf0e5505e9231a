"""Runs: a trained run folder or a diffusers model folder, opened for sampling, editing and measuring.

`load_run` and `load_classifier` read a run folder (its config, the committed checkpoint's EMA or raw weights) and
warn when the EMA is still mostly the initial weights (`generate` then samples them; kinds.diffusion.sample_config_kwargs
turns a run's [sample] section into its arguments); `write_run` writes
a post-hoc EMA as a run folder (`diffuse ema`).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import pretrained, stages
from .stages import load_autoencoder
from .config import RunConfig, load_config, save_config
from .ema import list_snapshots, MAX_ERROR, reconstruct
from .data import load_dataset
from .kinds.autoencoder import held_out, reconstruction_scores
from .kinds.diffusion import build_denoiser, build_model
from .train import feature_network
from .tasks.image_to_image import run_edits


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # a Hugging Face model id: owner/name
HUB_FILES = ["*.json", "*.toml", "*.safetensors", "*.bin"]  # what a run or a diffusers folder reads from a hub snapshot


def locate(run: str, revision: str | None = None) -> str:
    """The local folder of RUN: RUN itself when it exists here; otherwise, for a Hugging Face model id "owner/name",
    its snapshot at `revision` (a branch, tag or commit; default main) in huggingface_hub's cache (HF_HOME /
    HF_HUB_CACHE), downloaded into it first where the network allows (`huggingface_hub.snapshot_download`; with
    HF_HUB_OFFLINE=1 the cache alone). A path that is neither is returned as given, for `run_config` to name.

    Raises ValueError for --revision with a local folder or a revision the model lacks, FileNotFoundError for an id
    neither cached nor downloadable (naming HF_HUB_OFFLINE and the download), ImportError without huggingface_hub."""
    if Path(run).expanduser().exists() or not HUB_ID.match(run):
        if revision is not None:
            raise ValueError(f"--revision {revision} picks a version of a Hugging Face model id, and {run} is "
                             f"{'a local path' if Path(run).expanduser().exists() else 'no model id (owner/name)'}; leave --revision out")
        return run
    try:  # deferred: only a model id needs the hub client (installed with diffusers)
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        raise ImportError(f"{run} is no folder here; reading it as a Hugging Face model id needs huggingface_hub: "
                          f"{pretrained.INSTALL}") from None
    at = f" at revision {revision!r}" if revision else ""
    try:
        return huggingface_hub.snapshot_download(run, revision=revision, allow_patterns=HUB_FILES)
    except RevisionNotFoundError:
        raise ValueError(f"--revision {revision}: the Hugging Face model {run} has no such branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{run} is no folder here, nor a model on the Hugging Face Hub (a private or gated one "
                                "needs `hf auth login`); check the path or the id") from None
    except LocalEntryNotFoundError as e:
        if isinstance(e, getattr(huggingface_hub.errors, "IncompleteSnapshotError", ())):  # some files never came
            raise FileNotFoundError(f"{run}{at}: {e}") from None
        offline = huggingface_hub.constants.is_offline_mode()
        why = ("HF_HUB_OFFLINE=1 reads the cache alone: download it with the network on (unset HF_HUB_OFFLINE) or "
               f"`hf download {run}`" if offline else
               "the Hub could not be reached to download it: check the network, or download it elsewhere into the cache")
        raise FileNotFoundError(f"{run} is no folder here, and the Hugging Face model {run}{at} is not in the cache "
                                f"{huggingface_hub.constants.HF_HUB_CACHE}; {why}") from None


def run_config(run_dir: str | Path) -> RunConfig:
    """The config saved in a run folder, or read from a diffusers model folder (pretrained.read_config);
    FileNotFoundError naming the fix when it is neither."""
    run_dir = Path(run_dir)
    if pretrained.is_model_folder(run_dir):
        return pretrained.read_config(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.toml); train one with `diffuse train CONFIG --out "
                                f"{run_dir}`, or (for sample and edit) make it a pipeline folder: cascade.toml naming a "
                                "cascade's stages, or unclip.toml naming an unCLIP prior and decoder")
    return load_config(run_dir / "config.toml")


def check_guidance(cfg: RunConfig, guidance: float, classifier: bool) -> None:
    """Refuse classifier-free guidance (w > 0 without a classifier) on a model that cannot do it: one conditioned on
    neither a class nor a caption, or trained without dropout of that condition (its null value is then untrained)."""
    if not guidance or classifier:
        return
    keys = [k for k, on in (("label", cfg.model.class_conditional), ("text", cfg.model.text_encoder),
                            ("image_embed", cfg.model.image_embed_dim > 0)) if on]
    if not keys:
        raise ValueError("guidance without --classifier is classifier-free guidance, which needs a class-conditional "
                         "model (model.class_conditional = true) or a text-conditional one (model.text_encoder); pass "
                         "--classifier RUN for classifier guidance")
    untrained = [k for k in keys if not cfg.train.condition_dropout.get(k)]
    if untrained:
        what = " and ".join({"label": "null label", "text": "empty caption", "image_embed": "null image embedding"}[k]
                            for k in untrained)
        raise ValueError(f"this model was trained without dropout of {untrained} (train.condition_dropout): its {what} is "
                         "untrained, so classifier-free guidance is meaningless; retrain with train.condition_dropout = "
                         "{" + ", ".join(f"{k} = 0.1" for k in keys) + "}")


def check_kind(run_dir: str | Path, cfg: RunConfig, kind: str) -> None:
    """ValueError naming the fix when the run in `run_dir` (of config `cfg`) is not a `kind` ("denoiser" or
    "classifier"); a diffusers model folder is a denoiser, and so are the kinds of DENOISERS."""
    run_dir = Path(run_dir)
    if pretrained.is_model_folder(run_dir):
        if kind != "denoiser":
            raise ValueError(f"{run_dir} is a diffusers denoiser, not a noisy classifier; pass a classifier run")
        return
    if kind == "denoiser" and cfg.model.kind in DENOISERS:
        return
    if cfg.model.kind != kind:
        fix = {"classifier": "pass it with --classifier",
               "autoencoder": "an autoencoder is the first stage of latent diffusion: measure it with `diffuse eval RUN`, "
                              "or train a latent-diffusion run on it (latent.autoencoder)"}
        raise ValueError(f"{run_dir} holds a {cfg.model.kind} (model.kind = {cfg.model.kind!r}), not a {kind}; "
                         + fix.get(cfg.model.kind, "pass a classifier run"))


DENOISERS = ("denoiser", "diffae", "diffae_prior")  # kinds whose network a Denoiser wraps (a diffusion autoencoder's
#                                                  decoder takes z_sem; its latent DDIM diffuses codes)
SEMANTIC_EDITS = ("reconstruct", "manipulate", "interpolate")  # a diffusion autoencoder's edits (tasks/semantic.py)
VIDEO_EDITS = ("predict", "interpolate")  # a video run's edits: frames given, the rest generated (tasks/video.py)
UNCLIP_EDITS = ("variations", "interpolate", "textdiff")  # unCLIP's decoder's edits (tasks/unclip.py)


def _load_net(run_dir: str | Path, kind: str, ema: bool, device, step: int | None):
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    check_kind(run_dir, cfg, kind)
    if pretrained.is_model_folder(run_dir):  # one set of weights, no checkpoints
        if step is not None:
            raise ValueError(f"{run_dir} is a diffusers model folder with one set of weights; it has no step {step}")
        return cfg, pretrained.load_unet(run_dir).to(device).eval().requires_grad_(False), pretrained.num_classes(run_dir)
    c = ckpt.load_checkpoint(run_dir, step)
    if ema and "posthoc_ema" not in c.state:  # a folder of `diffuse ema` holds a power-function EMA, not the decay's
        warn_ema_init_share(run_dir, c.step, cfg.train.ema_decay, cfg.train.ema_warmup)
    num_classes = int(c.state["num_classes"])
    net = build_model(cfg, num_classes)
    group = "ema" if ema else "model"
    ckpt.load_weights(net, c.tensors[group], config=run_dir / "config.toml",
                      weights=Path(ckpt.CHECKPOINTS) / f"step_{c.step:08d}" / f"{group}.safetensors")
    return cfg, net.to(device).eval().requires_grad_(False), num_classes


def load_run(run_dir: str | Path, *, ema: bool = True, device: str | torch.device = "cpu", step: int | None = None):
    """(config, denoiser, num_classes) of a run folder, with its EMA (or raw) weights, ready to sample."""
    cfg, net, num_classes = _load_net(run_dir, "denoiser", ema, device, step)
    return cfg, build_denoiser(cfg, net), num_classes


def load_classifier(run_dir: str | Path, *, ema: bool = True, device: str | torch.device = "cpu", step: int | None = None):
    """(config, classifier) of a noisy-classifier run (model.kind = "classifier"): logits of (x_t, model_time)."""
    cfg, net, _ = _load_net(run_dir, "classifier", ema, device, step)
    return cfg, net


EMA_INIT_SHARE_WARNING = 0.05  # sample and eval warn when the EMA holds more of the initial weights than this


def ema_init_share(decay: float, warmup: bool, steps: int) -> float:
    """prod_{n < steps} d_n: the weight the EMA still gives the random initial parameters after `steps` updates, with
    d_n = `EMA.decay_at(n)`. Without warm-up it is decay^steps: 0.9999^10000 = 0.37 (DDPM's decay after 10k steps)."""
    n = torch.arange(steps, dtype=torch.float64)
    d = torch.clamp((1 + n) / (10 + n), max=decay) if warmup else torch.full_like(n, decay)
    return float(d.log().sum().exp())


def warn_ema_init_share(run_dir, step: int, decay: float, warmup: bool) -> None:
    """Warn when the EMA weights of a run at `step` are still mostly the random initialisation (UserWarning)."""
    share = ema_init_share(decay, warmup, step)
    if share <= EMA_INIT_SHARE_WARNING:
        return
    # the first step where the share is <= 1%: decay^n without warm-up; with it, within a few dozen steps
    n = math.ceil(math.log(0.01) / math.log(decay)) if not warmup else next(
        k for k in range(step, step + 10_000) if ema_init_share(decay, True, k) <= 0.01)
    warnings.warn(f"the EMA weights of {run_dir} (step {step}, train.ema_decay = {decay:g} {'with' if warmup else 'without'} "
                  f"warm-up) still hold {share:.0%} of the random initial weights, so samples from them are mostly noise; "
                  f"use the raw weights (--no-ema), or train longer: the share falls below 1% at step {n:,}",
                  UserWarning, stacklevel=3)


def prompt_condition(denoiser, n: int, prompt: str, negative: str | None = None,
                     device: str | torch.device = "cpu") -> dict:
    """generate's `cond` (and `uncond`) for a text-conditional run (model.text_encoder, Rombach et al. 2022, sec. 3.3):
    the prompt's tokens (n, M) for every sample under the key "text"; a negative prompt's tokens as the null condition
    of classifier-free guidance, in place of the empty caption (Ho & Salimans 2022). ValueError when the denoiser's
    network has no text encoder."""
    encoder = getattr(getattr(denoiser, "net", None), "text_encoder", None)
    if encoder is None:
        raise ValueError("a prompt needs a text-conditional run (model.text_encoder); this run takes no captions")
    out = {"cond": {"text": encoder.tokenize([prompt] * n).to(device)}}
    if negative is not None:
        out["uncond"] = {"text": encoder.tokenize([negative] * n).to(device)}
    return out


def write_run(run_dir, sigma_rel: float, out, step: int | None = None, max_error: float = MAX_ERROR,
              on_snapshot=None) -> Path:
    """`diffuse ema RUN --sigma-rel S --out OUT`: the EMA of width sigma_rel rebuilt from RUN/ema_snapshots at `step`
    (default: the last snapshot) written as a run folder OUT (RUN's config.toml and one checkpoint whose raw and EMA
    weights are both the rebuilt ones), which `diffuse sample OUT` and `diffuse eval OUT` read like any run.
    Raises FileNotFoundError when RUN is not a run or holds no snapshots (naming train.posthoc_ema), ValueError as
    `reconstruct`, and when OUT holds a training run (it is never overwritten). `on_snapshot` as `reconstruct`'s."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = run_config(run_dir)
    snaps = run_dir / "ema_snapshots"
    if not snaps.is_dir():
        raise FileNotFoundError(f"{run_dir} has no post-hoc EMA snapshots ({snaps}); train with train.posthoc_ema = "
                                "[0.05, 0.10] to save them")
    last = ckpt.latest_step(out) if out.is_dir() else None
    if out.resolve() == run_dir.resolve() or (last is not None and "posthoc_ema" not in ckpt.read_state(out, last)):
        raise ValueError(f"{out} holds a training run; choose another --out (e.g. {run_dir / 'ema_005'})")
    weights = reconstruct(snaps, sigma_rel, step, max_error, on_snapshot)
    used_step = step if step is not None else list_snapshots(snaps)[-1].step
    num_classes = int(ckpt.read_state(run_dir, ckpt.latest_step(run_dir))["num_classes"])
    ckpt.load_weights(build_model(cfg, num_classes), weights, config=run_dir / "config.toml",  # they fit the network
                      weights=snaps)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.toml")
    state = {"step": used_step, "num_classes": num_classes,
             "posthoc_ema": {"sigma_rel": float(sigma_rel), "run": str(run_dir), "max_error": max_error}}
    ckpt.save_checkpoint(out, used_step, {"model": weights, "ema": weights}, state, keep=1)
    return out


# --- a run as an object: what it is and what it can do, said once ----------------------------------------------------
@dataclass(frozen=True)
class Capabilities:
    """What a run can do, read from its config and checkpoint without loading weights; the CLI, the web page and
    `diffuse eval` ask this instead of re-deriving it from config fields."""

    samples: bool                    # `diffuse sample` draws from it (a denoiser not trained for an image-to-image task)
    classes: int                     # the class labels it takes (0: not class-conditional)
    text: bool                       # it takes a prompt (model.text_encoder)
    guidance_keys: tuple[str, ...]   # conditions trained with dropout: classifier-free guidance can use them
    edits: tuple[str, ...]           # the `diffuse edit` tasks it runs
    trained_task: str                # task.kind: "none", or the image-to-image task it was trained for
    latent: bool                     # it diffuses the latents of an autoencoder stage (samples are decoded)
    bounded: bool                    # its x_0 lies in [-1, 1], so clipping and thresholding apply
    likelihood: bool                 # bits/dim of real images (`--metric nll`, `vlb`) apply
    metrics: tuple[str, ...]         # `diffuse eval --metric` values it accepts
    frames: int = 0                  # a video run's frames per video (model.video; 0: a model of images)
    observed: bool = False           # a video run trained with given frames (model.video_observed: masked conditioning)

    @property
    def video(self) -> bool:
        """A video run (model.video): it samples videos and edits them by predict and interpolate (VIDEO_EDITS) and sdedit."""
        return self.frames > 0


@dataclass(frozen=True)
class Run:
    """A trained run folder or a diffusers model folder: where it is, its config, its kind (model.kind), the newest
    checkpoint's step (None for a diffusers folder) and number of classes, and its `capabilities`. Weights load only
    when asked (`denoiser`, `classifier`, `space`)."""

    path: Path
    cfg: RunConfig
    kind: str
    step: int | None
    num_classes: int
    diffusers: bool
    capabilities: Capabilities

    def denoiser(self, *, ema: bool = True, device: str | torch.device = "cpu", step: int | None = None):
        """The run's Denoiser with its EMA (or raw) weights on `device`; ValueError for a run that is no denoiser."""
        return load_run(self.path, ema=ema, device=device, step=step)[1]

    def classifier(self, *, ema: bool = True, device: str | torch.device = "cpu"):
        """The noisy classifier of a classifier run: logits of (x_t, model_time)."""
        return load_classifier(self.path, ema=ema, device=device)[1]

    def space(self, device: str | torch.device = "cpu"):
        """The space the run diffuses (stages.space): PixelSpace, or the LatentSpace of its autoencoder stage."""
        return stages.space(self.cfg, device)


def capabilities(cfg: RunConfig, num_classes: int) -> Capabilities:
    """What a run of config `cfg` with `num_classes` classes in its data can do (see Capabilities)."""
    if cfg.model.kind == "diffae":  # samples through its latent DDIM; edits an image through its code and x_T
        return Capabilities(False, 0, False, (), ("invert", *SEMANTIC_EDITS), "none", False, True, False, ())
    if cfg.model.kind == "diffae_prior":  # draws codes, which its diffusion autoencoder decodes
        return Capabilities(True, 0, False, (), (), "none", False, True, False, ("fid", "kid", "is", "pr"))
    if cfg.model.kind != "denoiser":
        metrics = {"autoencoder": ("recon",), "segmenter": ("miou",), "clip": ("retrieval",), "unclip_prior": ("prior",)}.get(cfg.model.kind, ())
        return Capabilities(False, num_classes if cfg.model.kind == "classifier" else 0, False, (), (), "none", False,
                            True, False, metrics)
    m, task = cfg.model, cfg.task.kind
    classes = num_classes if m.class_conditional else 0
    conditioned = [k for k, on in (("label", classes > 0), ("text", bool(m.text_encoder))) if on]
    latent = bool(cfg.latent.autoencoder)
    if m.image_embed_dim:  # unCLIP's decoder: draws from a CLIP image embedding, which its edits make from input images
        conditioned.append("image_embed")
        return Capabilities(
            samples=False, classes=classes, text=bool(m.text_encoder),
            guidance_keys=tuple(k for k in conditioned if cfg.train.condition_dropout.get(k)), edits=UNCLIP_EDITS,
            trained_task=task, latent=False, bounded=True, likelihood=False, metrics=())
    if m.video:  # videos: no image edits, no image metrics (the video metrics are bench/'s); predict, interpolate, and
        return Capabilities(  # SDEdit of a whole video (tasks.video.sdedit_video)
            samples=True, classes=classes, text=bool(m.text_encoder),
            guidance_keys=tuple(k for k in conditioned if cfg.train.condition_dropout.get(k)), edits=(*VIDEO_EDITS, "sdedit"),
            trained_task=task, latent=False, bounded=True, likelihood=False, metrics=(), frames=cfg.data.frames,
            observed=bool(m.video_observed))
    return Capabilities(
        samples=task == "none", classes=classes, text=bool(m.text_encoder),
        guidance_keys=tuple(k for k in conditioned if cfg.train.condition_dropout.get(k)),
        edits=run_edits(task) + (("invert",) if task == "none" else ()), trained_task=task, latent=latent, bounded=not latent, likelihood=not latent,
        metrics=("fid", "kid", "is", "pr") + (() if latent else ("nll", "vlb")))


def open_run(path: str | Path) -> Run:
    """The run in folder `path` (a training run, a `diffuse ema` folder or a diffusers model folder), read once:
    config, kind, newest step, classes and capabilities. FileNotFoundError naming the fix when it is neither."""
    path = Path(path)
    cfg = run_config(path)
    diffusers = pretrained.is_model_folder(path)
    step = None if diffusers else ckpt.latest_step(path)
    num_classes = pretrained.num_classes(path) if diffusers else int(ckpt.read_state(path, step).get("num_classes", 0))
    return Run(path, cfg, cfg.model.kind, step, num_classes, diffusers, capabilities(cfg, num_classes))


@torch.no_grad()
def evaluate_autoencoder(run_dir: str | Path, features: str | None = None, device: str | torch.device = "cpu") -> dict:
    """`diffuse eval` of an autoencoder run, on its held-out images (`held_out`): PSNR of D(E(x)) (dB, mean over images),
    rFID (FID of the reconstructions, rounded to 8 bits, against the originals, in the feature space `features`:
    default "digits" for 1-channel data, else none unless given; train.feature_network), the latents' std and
    latent_scale_factor, and for VQ the codebook usage (fraction of codes used) and perplexity over all held-out
    positions. Returns the record (JSON-ready)."""
    cfg, ae = load_autoencoder(run_dir, device)
    data = load_dataset(cfg.data)
    _, test = held_out(len(data))
    x, _ = data.batch(test)
    features = features or ("digits" if cfg.data.channels == 1 else None)
    net = feature_network(features, device) if features is not None else None
    return {"metric": "reconstruction", "kind": cfg.autoencoder.kind, "factor": cfg.autoencoder.factor,
            **reconstruction_scores(ae, x, net), **({"features": features} if features else {})}
