"""What unCLIP's decoder does with images (Ramesh et al. 2022, "Hierarchical text-conditional image generation with CLIP
latents", sec. 3; lecture 002, "DALL-E 2": image variations, interpolation, text diffs). An image x is the bipartite
latent (z_i, x_T): z_i = f(x), its CLIP image embedding, holds what CLIP sees; x_T, the decoder's DDIM latent, holds the
rest. Each manipulation changes one of the two and decodes:

    variations     z_i fixed, x_T new (each output its own draw), or x_T inverted and decoded by DDIM with eta > 0
                   (sec. 3.1: "With eta = 0 the decoder ... will reconstruct the given image x")
    interpolation  z_theta = slerp(z_i1, z_i2, theta), theta from 0 to 1, x_T fixed (one draw for the whole path) or
                   slerp(x_T1, x_T2, theta) of the two images' DDIM inversions, so both ends reconstruct their images
                   (sec. 3.2)
    text diffs     z_d = normalise(z_t1 - z_t0), the difference of the text embeddings of a new and an old caption;
                   z_theta = slerp(z_i, z_d, theta), decoded from x_T inverted from the image, held fixed (sec. 3.3: theta
                   from 0, the image, to about 0.5)

The decoder is a denoiser whose network takes `image_embed` (kinds/unclip.py); the CLIP anything with
`image_embedding(x, model_time)` and `text_embedding(tokens)` returning unit vectors (nets/clip.py). Decoding and
inversion run through `generate` and `generate.invert` (samplers.ddim.invert), so every process and check applies, and
the condition's checks refuse a NaN embedding.

A pipeline folder (FOLDER/unclip.toml: `read_pipeline`, `check_pipeline`) chains a prior and a decoder trained on one
CLIP checkpoint, so that `diffuse sample FOLDER --prompt ...` draws z_i by the prior and images by the decoder and
`diffuse edit variations|interpolate|textdiff FOLDER` edits with its decoder. Its reader lives here rather than beside
the cascade's (tasks/image_to_image.py, whose cascades chain image-conditioned models): it is unCLIP's, and its check
is about the CLIP the manipulations above embed with.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..generate import generate, invert
from .semantic import slerp

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

THETA_PAPER = 0.5  # sec. 3.3: text diffs are shown for theta from 0 to about 0.5


def check_theta(theta: float) -> float:
    """theta as a float in [0, 1] (0: the first end of a slerp, 1: the second); ValueError naming the range otherwise,
    NaN included."""
    try:
        value = float(theta)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 <= value <= 1:  # False for NaN
        raise ValueError(f"theta is the angle's share of a slerp and must lie in [0, 1] (0: the image's own embedding; "
                         f"the paper's text diffs go up to about {THETA_PAPER}), got {theta!r}")
    return value


def _finite(z: Tensor, what: str) -> Tensor:
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"{what} holds NaN or infinite values: embed the image or caption again, or check the CLIP "
                         "run's weights")
    return z


@torch.no_grad()
def image_embeddings(clip, x0: Tensor) -> Tensor:
    """z_i = f(x_0): the CLIP's unit image embeddings (B, D) float32 of clean images x0 (B, C, H, W) in [-1, 1], read at
    their clean time (a noise-aware CLIP of nets/clip.py at its clean_time, kinds.clip.clean_model_time: where its
    training read clean images), without gradient. ValueError when the
    images are not the CLIP's size (its `image_size`, when it states one) or the embeddings are not finite."""
    size = getattr(clip, "image_size", None)
    if size is not None and tuple(x0.shape[-2:]) != (size, size):
        raise ValueError(f"the CLIP reads images of side {size}, got {tuple(x0.shape[-2:])}: resize the images, or use a "
                         "CLIP trained on images of this size")
    return _finite(clip.image_embedding(x0.float()).float(), "the image embedding")


@torch.no_grad()
def text_direction(clip, old: str, new: str, device="cpu") -> Tensor:
    """The text diff z_d = (z_t1 - z_t0) / |z_t1 - z_t0| (Ramesh et al. 2022, sec. 3.3), z_t0 and z_t1 the CLIP's unit
    text embeddings of the captions `old` and `new`: (D,) float32 unit vector. ValueError for an empty (or blank) caption
    and for two captions the CLIP embeds alike (no direction)."""
    for name, text in (("the old caption (--from)", old), ("the new caption (--to)", new)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name} is empty: a text diff moves from one caption's embedding towards another's, so "
                             'give both, e.g. --from "a red circle" --to "a blue circle"')
    z = clip.text_embedding(clip.tokenize([old, new]).to(device)).float()
    diff = _finite(z[1] - z[0], "the text embeddings")
    norm = float(diff.norm())
    if norm < 1e-6:
        raise ValueError(f"the captions {old!r} and {new!r} have the same CLIP text embedding (|z_t1 - z_t0| = {norm:.2g}), "
                         "so there is no direction to move along: change what differs between them")
    return diff / norm


def text_diff(z_i: Tensor, z_d: Tensor, theta: float | Tensor) -> Tensor:
    """z_theta = slerp(z_i, z_d, theta) (Ramesh et al. 2022, sec. 3.3): the image embedding z_i (D,) rotated towards the
    text diff z_d (D,) by a share theta (a float, or (K,) values) of the angle between them -> (D,) (or (K, D)). Both unit,
    so every z_theta is unit. ValueError for a theta outside [0, 1] or non-finite embeddings."""
    single = not isinstance(theta, Tensor)
    thetas = torch.tensor([check_theta(theta)] if single else [check_theta(v) for v in theta.flatten().tolist()],
                          dtype=torch.float64)
    out = slerp(_finite(z_i, "the image embedding"), _finite(z_d, "the text diff"), thetas)
    return out[0] if single else out


def interpolation(z_1: Tensor, z_2: Tensor, frames: int) -> Tensor:
    """The embeddings z_theta = slerp(z_1, z_2, theta) at theta = 0, 1/(frames - 1), ..., 1 (Ramesh et al. 2022, sec.
    3.2): (D,), (D,) -> (frames, D). ValueError for frames < 2 or non-finite embeddings."""
    if frames < 2:
        raise ValueError(f"an interpolation needs at least 2 frames (its two ends), got {frames}")
    return slerp(_finite(z_1, "the first image embedding"), _finite(z_2, "the second image embedding"),
                 torch.linspace(0, 1, frames, dtype=torch.float64))


def _shape(denoiser) -> tuple[int, ...]:
    net = denoiser.net
    return (net.in_channels, net.image_size, net.image_size)


def _cond(z: Tensor, extra: dict | None) -> dict:
    """The decoder's condition: image_embed (B, D) and any other key (a caption's tokens), each (B, ...)."""
    return {"image_embed": z, **(extra or {})}


@torch.no_grad()
def variations(denoiser, z_i: Tensor, n: int, *, seed: int = 0, cond: dict | None = None, device="cpu",
               **kw) -> Tensor:
    """n variations of the image whose embedding is z_i (D,): z_i fixed, x_T ~ N(0, I) new for each output (drawn from
    `seed`), decoded by `generate` with its keyword arguments `kw` (sampler, steps, guidance on z_i, ...). `cond`: the
    decoder's other keys, batched (n, ...). Returns (n, C, H, W)."""
    z = _finite(z_i, "the image embedding").to(device).float().expand(n, -1)
    return generate(denoiser, n, _shape(denoiser), cond=_cond(z, cond), seed=seed, device=device, **kw)


@torch.no_grad()
def invert_image(denoiser, x0: Tensor, z: Tensor, *, steps: int | None = 50, cond: dict | None = None, device="cpu",
                 **kw) -> Tensor:
    """x_T of images x0 (B, C, H, W) by DDIM inversion under their embeddings z (B, D) (`generate.invert`: the
    deterministic DDIM update run upwards, O(1/steps) from exact; `kw`: spacing, refine, mixed_precision)."""
    return invert(denoiser, x0, steps=steps, cond=_cond(z.to(device).float(), cond), device=device, **kw)


@torch.no_grad()
def decode(denoiser, z: Tensor, x_T: Tensor, *, steps: int | None = 50, cond: dict | None = None, device="cpu",
           eta: float = 0.0, seed: int = 0, clip: bool = False, **kw) -> Tensor:
    """Images (B, C, H, W) from the bipartite latents (z (B, D), x_T (B, C, H, W)) by DDIM from x_T: eta = 0
    deterministic (the inverse of `invert_image` on the same grid and condition), eta > 0 the paper's stochastic
    variations (noise from `seed`). Not clipped by default: inversion does not clip. `kw`: generate's spacing,
    guidance, mixed_precision, callback."""
    return generate(denoiser, z.shape[0], _shape(denoiser), sampler="ddim", eta=eta, steps=steps,
                    cond=_cond(_finite(z, "the embedding").to(device).float(), cond), start=(x_T.to(device), 1.0),
                    seed=seed, device=device, clip=clip, **kw)


def fixed_noise(denoiser, n: int, seed: int, device="cpu") -> Tensor:
    """One x_T ~ N(0, I) drawn from `seed` (the draw `generate` makes first), repeated for n outputs (n, C, H, W): the
    fixed decoder latent of an interpolation without inversion."""
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn((1, *_shape(denoiser)), generator=g, device=device) * denoiser.schedule.prior_std
    return x.expand(n, *x.shape[1:]).contiguous()


# --- the pipeline folder: a prior and a decoder on one CLIP -----------------------------------------------------------
PIPELINE_FILE = "unclip.toml"
BEST_OF_PAPER = 2  # sec. 2.2: two prior draws per caption, the one nearer the caption's text embedding kept


@dataclass(frozen=True)
class Pipeline:
    """An unCLIP pipeline folder (Ramesh et al. 2022, fig. 2: text -> prior -> z_i -> decoder -> image) as read from
    FOLDER/unclip.toml: the prior's and the decoder's run folders (absolute), and the defaults its sampling takes where a
    request leaves them out (None: the prior run's sample.guidance; best_of None: BEST_OF_PAPER)."""

    folder: Path
    prior: Path
    decoder: Path
    prior_guidance: float | None = None
    best_of: int | None = None


def is_pipeline(folder) -> bool:
    """Whether `folder` is an unCLIP pipeline folder (holds unclip.toml)."""
    return (Path(folder) / PIPELINE_FILE).is_file()


def read_pipeline(folder) -> Pipeline:
    """An unCLIP pipeline folder's runs and defaults from FOLDER/unclip.toml:

        prior = "prior"          # an unCLIP prior run (model.kind = "unclip_prior"), relative to FOLDER or absolute
        decoder = "decoder"      # unCLIP's decoder (a denoiser with model.image_embed_dim > 0), likewise
        prior_guidance = 1.0     # optional: the prior's classifier-free guidance weight w >= 0 (else the prior's own)
        best_of = 2              # optional: prior draws per image, the one nearest the caption kept (>= 1; the paper: 2)

    Only the file is read (no run's config): FileNotFoundError for a missing unclip.toml or a run folder without a
    config.toml, ValueError for invalid TOML, an unknown or missing key, or a default out of range, each naming the key
    and the fix. Whether the runs are of the right kind and share their CLIP is `check_pipeline`'s."""
    folder = Path(folder)
    path = folder / PIPELINE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: an unCLIP pipeline folder holds unclip.toml naming its two runs, "
                                'e.g. prior = "prior" and decoder = "decoder" (run folders relative to the folder)')
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    keys = ("prior", "decoder", "prior_guidance", "best_of")
    unknown = sorted(set(spec) - set(keys))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; it takes {', '.join(keys)}")
    runs = {}
    for key, what in (("prior", "an unCLIP prior run (configs/unclip_prior_shapes.toml)"),
                      ("decoder", "unCLIP's decoder run (configs/unclip_decoder_shapes.toml)")):
        value = spec.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'{path}: {key} must name {what} as a folder, e.g. {key} = "{key}", got {value!r}')
        run = (folder / Path(value).expanduser()).resolve()  # an absolute value stays as it is
        if not (run / "config.toml").is_file():
            raise FileNotFoundError(f"{path}: {key} = {value!r} is {run}, which holds no run (no config.toml); train it "
                                    f"there or point {key} at {what}")
        runs[key] = run
    guidance = spec.get("prior_guidance")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance) or guidance < 0):
        raise ValueError(f"{path}: prior_guidance is the prior's classifier-free weight w and must be a finite number >= 0 "
                         f"(e.g. 1.0; Karlo's prior scale 4 is w = 3), got {guidance!r}")
    best_of = spec.get("best_of")
    if best_of is not None and (isinstance(best_of, bool) or not isinstance(best_of, int) or best_of < 1):
        raise ValueError(f"{path}: best_of is the number of prior draws per image to choose from and must be a whole "
                         f"number >= 1 (the paper: {BEST_OF_PAPER}), got {best_of!r}")
    return Pipeline(folder, runs["prior"], runs["decoder"], None if guidance is None else float(guidance), best_of)


def check_pipeline(pipe: Pipeline, prior_cfg, decoder_cfg) -> None:
    """The two runs' configs (`RunConfig`s of pipe.prior and pipe.decoder) checked as one pipeline, before any weights
    load: the prior is model.kind = "unclip_prior", the decoder a denoiser with model.image_embed_dim > 0, and both were
    trained on the same CLIP run at the same checkpoint (unclip.clip, unclip.clip_step): the decoder reads only the
    embeddings of the CLIP it was trained on, so a prior of another CLIP (or step) would hand it vectors from another
    space. ValueError naming both runs and their CLIPs otherwise."""
    where = pipe.folder / PIPELINE_FILE
    if prior_cfg.model.kind != "unclip_prior":
        raise ValueError(f"{where}: prior = {pipe.prior} is a {prior_cfg.model.kind} run, not an unCLIP prior (model.kind "
                         '= "unclip_prior"); train one with configs/unclip_prior_shapes.toml')
    if decoder_cfg.model.kind != "denoiser" or not decoder_cfg.model.image_embed_dim:
        what = decoder_cfg.model.kind if decoder_cfg.model.kind != "denoiser" else "denoiser without model.image_embed_dim"
        raise ValueError(f"{where}: decoder = {pipe.decoder} is a {what} run, not unCLIP's decoder (a denoiser with "
                         "model.image_embed_dim > 0); train one with configs/unclip_decoder_shapes.toml")
    clips = []
    for cfg in (prior_cfg, decoder_cfg):
        clips.append((Path(cfg.unclip.clip).expanduser().resolve() if cfg.unclip.clip else None, cfg.unclip.clip_step))
    if clips[0] != clips[1]:
        (p_run, p_step), (d_run, d_step) = clips
        raise ValueError(f"{where}: the prior {pipe.prior} draws embeddings of the CLIP {p_run} at step {p_step} and the "
                         f"decoder {pipe.decoder} reads those of the CLIP {d_run} at step {d_step} (each run's unclip.clip, "
                         "unclip.clip_step): the two must share one CLIP checkpoint; train one of them again on the "
                         "other's (--set unclip.clip=... unclip.clip_step=...)")
