"""Stages: frozen upstream runs that turn raw data into what a run trains on, and the space a diffusion run works in.

Today's stage is latent diffusion's autoencoder (Rombach et al. 2022, sec. 3; lectures 000 and 002, "Latent Diffusion
Model"). A latent-diffusion run names an autoencoder run in latent.autoencoder, pinned by its checkpoint step
(latent.autoencoder_step) and, for the cache of encoded training images, by the sha256 of that checkpoint's manifest.
Its diffusion model works on

    z = s E(x),   s = latent.scale_factor = 1 / std(E(x))  (app. D.1: unit-variance latents, the scale the noise
                                                            schedules assume; estimated once from the training data)

of shape (c, H/f, W/f), and its samples are x = D(z / s). `space(cfg)` is the run's `LatentSpace` (the identity
`PixelSpace` for pixel runs), so every command writes one path:

    x = space.decode(generate(denoiser, n, space.shape, ...))

and every sampler, guidance and noise process works unchanged on z. Editing moves its inputs into the latent space:
a guide image by `encode`, a mask by `mask` (a latent position is kept where every pixel it covers is kept).
Pixel-range defaults do not carry over: latents are not in [-1, 1], so a latent run never clips x_0 (the trainer saves
sample.clip = false).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor

from . import checkpoint as ckpt
from .nets.autoencoder import Autoencoder, latent_scale_factor
from .config import RunConfig, load_config


ENCODE_BATCH = 256      # images per encoder call when the training set is encoded


def load_autoencoder(run_dir: str | Path, device: str | torch.device = "cpu", step: int | None = None
                     ) -> tuple[RunConfig, Autoencoder]:
    """(config, autoencoder in eval mode without gradients) of an autoencoder run, at checkpoint `step` (None: the
    newest). FileNotFoundError when the folder holds no run or no such checkpoint, ValueError when it is another kind of
    run (each naming the fix)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir} is not an autoencoder run (no config.toml); train one with "
                                f"`diffuse train configs/ae_mnist.toml --out {run_dir}`")
    cfg = load_config(run_dir / "config.toml")
    if cfg.model.kind != "autoencoder":
        raise ValueError(f"{run_dir} holds a {cfg.model.kind} run, not an autoencoder (model.kind = 'autoencoder'); name an "
                         "autoencoder run, e.g. one trained with `diffuse train configs/ae_mnist.toml`")
    model = Autoencoder(cfg.autoencoder, cfg.data.channels)
    if step is not None and step not in ckpt.checkpoint_folders(run_dir):
        kept = sorted(ckpt.checkpoint_folders(run_dir))
        raise FileNotFoundError(f"the autoencoder run {run_dir} no longer holds checkpoint {step} (it holds {kept or 'none'}; "
                                "train.keep_checkpoints pruned it when the autoencoder trained on, or the run was replaced); "
                                "a latent model only decodes with the autoencoder it was trained on: restore that "
                                "checkpoint, or train the latent model again (latent.autoencoder_step = 0 takes the newest)")
    c = ckpt.load_checkpoint(run_dir, step)
    ckpt.load_weights(model, c.tensors["model"], config=run_dir / "config.toml",
                      weights=Path(ckpt.CHECKPOINTS) / f"step_{c.step:08d}" / "model.safetensors")
    return cfg, model.to(device).eval().requires_grad_(False)


class PixelSpace:
    """A run's space when it diffuses its data as they are: the identity, for examples of any `shape` without the
    batch ((C, H, W) images, (C, F, H, W) videos, (D,) vectors)."""

    latent = False

    def __init__(self, shape: tuple[int, ...]):
        self.shape = self.image_shape = tuple(int(n) for n in shape)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z

    def mask(self, mask: Tensor) -> Tensor:
        return mask


class LatentSpace:
    """The latent space of an autoencoder run, scaled: encode x (B, C, H, W) in [-1, 1] -> z = s E(x) (B, c, H/f, W/f),
    decode z -> D(z / s) clamped to [-1, 1] (Rombach et al. 2022, sec. 3 and app. D.1). Both run without gradients, in
    chunks of ENCODE_BATCH images, on the autoencoder's device, and return tensors on the input's device."""

    latent = True

    def __init__(self, autoencoder: Autoencoder, scale_factor: float, channels: int, image_size: int):
        if not (math.isfinite(scale_factor) and scale_factor > 0):
            raise ValueError(f"latent.scale_factor must be a finite number > 0 (0 in a config: estimate it), got {scale_factor}")
        self.autoencoder, self.scale_factor = autoencoder, float(scale_factor)
        self.shape = autoencoder.latent_shape(image_size, channels)
        self.image_shape = (channels, image_size, image_size)
        self.device = next(autoencoder.parameters()).device

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z = s E(x): the KL posterior's mode (or a sample from `generator`), VQ's encoding before quantisation."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"this latent space encodes images of shape {self.image_shape}, got {tuple(x.shape[1:])}")
        parts = [self.autoencoder.encode(part.to(self.device), generator) for part in x.split(ENCODE_BATCH)]
        return (self.scale_factor * torch.cat(parts)).to(x.device)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """x = D(z / s) in [-1, 1], (B, C, H, W)."""
        if tuple(z.shape[1:]) != tuple(self.shape):
            raise ValueError(f"this latent space decodes latents of shape {tuple(self.shape)}, got {tuple(z.shape[1:])}")
        parts = [self.autoencoder.decode(part.to(self.device) / self.scale_factor) for part in z.split(ENCODE_BATCH)]
        return torch.cat(parts).clamp(-1, 1).to(z.device)

    def decode_with_grad(self, z: Tensor) -> Tensor:
        """`decode` with gradients, in one call on z's device (the autoencoder's): x = D(z / s) clamped to [-1, 1],
        (B, C, H, W); CLIP guidance on a latent run's predicted x_0 differentiates through it (a clamped pixel has no
        gradient: moving it changes nothing that is shown)."""
        if tuple(z.shape[1:]) != tuple(self.shape):
            raise ValueError(f"this latent space decodes latents of shape {tuple(self.shape)}, got {tuple(z.shape[1:])}")
        return self.autoencoder.decode(z / self.scale_factor).clamp(-1, 1)

    def mask(self, mask: Tensor) -> Tensor:
        """A pixel mask (B|1, 1|C, H, W) of 1 = keep, 0 = generate -> the latent mask (B|1, 1, H/f, W/f): a latent position
        is kept only where every pixel of its f x f cell (and every channel) is kept."""
        f = self.image_shape[-1] // self.shape[-1]
        m = torch.as_tensor(mask).float()
        m = m[None, None] if m.ndim == 2 else m
        return -F.max_pool2d(-m.amin(dim=1, keepdim=True), f)


def resolve_autoencoder(cfg: RunConfig, base: Path | None = None) -> Path:
    """The autoencoder run of a latent-diffusion config, as an absolute path (relative paths: from `base`, default the
    working directory). FileNotFoundError naming latent.autoencoder when it does not exist."""
    path = Path(cfg.latent.autoencoder).expanduser()
    path = path if path.is_absolute() else (base or Path.cwd()) / path
    if not (path / "config.toml").is_file():
        raise FileNotFoundError(f"latent.autoencoder = {cfg.latent.autoencoder!r}: {path} holds no run; train the autoencoder "
                                "first (`diffuse train configs/ae_mnist.toml --out runs/ae`) and name its folder")
    return path.resolve()


def resolve_latent_config(cfg: RunConfig, saved: RunConfig | None = None) -> RunConfig:
    """A copy of a latent-diffusion config with what training fixes resolved, so that a resume compares like with like:
    latent.autoencoder as an absolute path, sample.clip off (latents have no [-1, 1] range), and, when 0, the saved
    run's latent.scale_factor and latent.autoencoder_step (resuming), else the autoencoder's newest checkpoint step
    (FileNotFoundError naming the fix when it has none). The scale itself is estimated by prepare_latent_training."""
    cfg = copy.deepcopy(cfg)
    cfg.latent.autoencoder, cfg.sample.clip = str(resolve_autoencoder(cfg)), False
    if saved is not None:
        cfg.latent.scale_factor = cfg.latent.scale_factor or saved.latent.scale_factor
        cfg.latent.autoencoder_step = cfg.latent.autoencoder_step or saved.latent.autoencoder_step
    if not cfg.latent.autoencoder_step:
        step = ckpt.latest_step(cfg.latent.autoencoder)
        if step is None:
            raise FileNotFoundError(f"the autoencoder run {cfg.latent.autoencoder} holds no checkpoint yet; let its training "
                                    "save one (it does at train.checkpoint_every and at the end) before training on it")
        cfg.latent.autoencoder_step = step
    return cfg


def check_latent_config(cfg: RunConfig, ae_cfg: RunConfig) -> None:
    """ValueError naming the mismatch when a latent-diffusion config does not fit its autoencoder run: other images
    (data.channels, data.image_size), a trained image-to-image task, flips or augmentation of latents, clipping."""
    d, e = cfg.data, ae_cfg.data
    if (d.channels, d.image_size) != (e.channels, e.image_size):
        raise ValueError(f"the autoencoder run {cfg.latent.autoencoder} encodes {e.channels}-channel {e.image_size}x{e.image_size} "
                         f"images but this config's data are {d.channels}-channel {d.image_size}x{d.image_size}; set "
                         f"data.channels = {e.channels} and data.image_size = {e.image_size}, or train an autoencoder for them")
    refused = [(cfg.task.kind != "none", f"task.kind = '{cfg.task.kind}' makes its condition image in pixel space",
                "train the task in pixel space (remove latent.autoencoder)"),
               (cfg.train.hflip, "train.hflip would flip latents, which is not the latent of the flipped image",
                "set train.hflip = false"),
               (cfg.train.augment_p > 0, "train.augment_p augments pixels, not latents", "set train.augment_p = 0"),
               (cfg.sample.dynamic_threshold > 0, "sample.dynamic_threshold thresholds pixel values; latents have no range",
                "set sample.dynamic_threshold = 0")]
    for bad, why, fix in refused:
        if bad:
            raise ValueError(f"latent diffusion ({cfg.latent.autoencoder}): {why}; {fix}")


def check_same_space(cfg: RunConfig, other: RunConfig, name: str) -> None:
    """A run used beside a diffusion run (a noisy classifier guiding it) sees the same variable: both pixels of one
    shape, or both latents of one autoencoder checkpoint at one scale factor (a classifier trained on pixels cannot
    read latents, nor one trained on other latents these). ValueError naming `name` and the fix otherwise."""
    mine, theirs = diffusion_shape(cfg), diffusion_shape(other)
    where = lambda c: (f"latents of {c.latent.autoencoder} (step {c.latent.autoencoder_step}, scale {c.latent.scale_factor:.6g})"  # noqa: E731
                       if c.latent.autoencoder else "pixels")
    same = (mine == theirs and bool(cfg.latent.autoencoder) == bool(other.latent.autoencoder)
            and (not cfg.latent.autoencoder or (
                resolve_autoencoder(cfg) == resolve_autoencoder(other)
                and cfg.latent.autoencoder_step == other.latent.autoencoder_step
                and math.isclose(cfg.latent.scale_factor, other.latent.scale_factor, rel_tol=1e-6))))
    if not same:
        fix = (f"train it with --set latent.autoencoder={cfg.latent.autoencoder} --set latent.autoencoder_step="
               f"{cfg.latent.autoencoder_step} --set latent.scale_factor={cfg.latent.scale_factor!r}"
               if cfg.latent.autoencoder else "train it on the images (without latent.autoencoder)")
        raise ValueError(f"{name} was trained on {where(other)} of shape {theirs}, but this run diffuses {where(cfg)} of "
                         f"shape {mine}; {fix}")


def latent_shape(cfg: RunConfig) -> tuple[int, int, int]:
    """The shape (c, H/f, W/f) a latent-diffusion config diffuses, read from its autoencoder run's config (no weights)."""
    ae = load_config(resolve_autoencoder(cfg) / "config.toml")
    f = ae.autoencoder.factor
    return ae.autoencoder.latent_channels, cfg.data.image_size // f, cfg.data.image_size // f


def diffusion_shape(cfg: RunConfig) -> tuple[int, int, int]:
    """(C, H, W) of the variable a run diffuses: its images, or their latents for a latent-diffusion run."""
    return latent_shape(cfg) if cfg.latent.autoencoder else (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)


def space(cfg: RunConfig, device: str | torch.device = "cpu") -> PixelSpace | LatentSpace:
    """The space of a run's config: PixelSpace, or the LatentSpace of latent.autoencoder at latent.scale_factor
    (ValueError when the config has not been trained yet, so its scale factor is still 0 = unestimated)."""
    d = cfg.data
    if not cfg.latent.autoencoder:
        return PixelSpace((d.channels, d.image_size, d.image_size))
    if not cfg.latent.scale_factor:
        raise ValueError("latent.scale_factor = 0 (estimate it) is resolved when the run trains; load the trained run's own "
                         "config (RUN/config.toml), which holds the estimate")
    ae_cfg, ae = load_autoencoder(resolve_autoencoder(cfg), device, cfg.latent.autoencoder_step or None)
    check_latent_config(cfg, ae_cfg)
    return LatentSpace(ae, cfg.latent.scale_factor, d.channels, d.image_size)


class LatentDataset:
    """A dataset whose images are replaced by latents (N, c, h, w), with the base dataset's conditions (labels,
    captions): the interface of data.ImageDataset (len, batch, num_classes, condition_keys)."""

    def __init__(self, latents: Tensor, base):
        if len(latents) != len(base):
            raise ValueError(f"{len(latents)} latents for {len(base)} images")
        self.latents, self.base = latents, base
        self.num_classes = base.num_classes
        self.condition_keys = base.condition_keys
        self.captions = getattr(base, "captions", None)

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def pure_batches(self) -> bool:
        """batch(idx) slices the cached latents and the base's conditions: pure when the base's batches are."""
        return bool(getattr(self.base, "pure_batches", False))

    def batch(self, idx: Tensor) -> tuple[Tensor, dict]:
        _, cond = self.base.batch(idx)
        return self.latents[idx], cond


def in_batches(dataset):
    """The images (or latents) of every item of a dataset with the data.ImageDataset interface, in order, ENCODE_BATCH
    at a time."""
    return (dataset.batch(idx)[0] for idx in torch.arange(len(dataset)).split(ENCODE_BATCH))


@dataclass(frozen=True)
class Stage:
    """A frozen upstream run that a run's training data pass through (latent diffusion's autoencoder today; a CLIP, a
    semantic encoder or U-Net features next), pinned to one checkpoint: its `step`, and the sha256 of that checkpoint's
    manifest (`weights_sha256`, which covers every weight file's hash), so what is cached from it is used only while those
    weights are the ones it was made with. `role` names it in cache keys ("autoencoder")."""

    role: str
    run: Path
    step: int

    def weights_sha256(self) -> str:
        """sha256 of the pinned checkpoint's manifest. FileNotFoundError when the run no longer holds that step."""
        folder = ckpt.checkpoint_folders(self.run).get(self.step)
        if folder is None:
            raise FileNotFoundError(f"the {self.role} run {self.run} no longer holds checkpoint {self.step}")
        return hashlib.sha256((folder / ckpt.MANIFEST).read_bytes()).hexdigest()

    def key(self, **more) -> dict:
        """The cache key of what is computed from this stage: the run, the step, the weights' hash, and `more` (the data
        config and size, ...)."""
        return {self.role: str(self.run), "step": self.step, "weights": self.weights_sha256(), **more}


def pin_step(run: Path, step: int, saved_step: int, role: str) -> int:
    """The checkpoint step a run's upstream stage is pinned to: `step` as configured, else (0) the step the resumed run
    saved (`saved_step`, 0 if none), else the upstream run's newest checkpoint. FileNotFoundError naming the `role` run
    when it holds no checkpoint yet."""
    step = step or saved_step
    if not step:
        step = ckpt.latest_step(run)
        if step is None:
            raise FileNotFoundError(f"the {role} run {run} holds no checkpoint yet; let it save one first")
    return step


def cached(path: Path, key: dict, compute) -> dict[str, Tensor]:
    """Tensors computed from a stage, read from the safetensors file `path` when it was written under the same `key`
    (a JSON-able dict: Stage.key), else `compute()` (-> dict of tensors) written there atomically. A damaged file is
    rebuilt with a warning, never trusted. A cache that cannot be written (a read-only run folder, a full disk: the
    WriteError of checkpoint.write_atomically) costs only the cache: a warning naming it, and the tensors computed here
    are returned (computed again next time)."""
    text = json.dumps(key, sort_keys=True)
    if path.is_file():
        try:
            stored = load_file(path)
            if bytes(stored.pop("source").tolist()).decode() == text:
                return stored
        except Exception as e:  # a damaged cache is rebuilt, not trusted
            warnings.warn(f"the cache {path} could not be read ({type(e).__name__}: {e}); computing it again")
    tensors = {k: v.contiguous() for k, v in compute().items()}
    try:
        ckpt.write_atomically(path, save({**tensors, "source": torch.tensor(list(text.encode()), dtype=torch.uint8)}))
    except ckpt.WriteError as e:  # the result is in hand: only the cache is lost
        warnings.warn(f"{e.message}; the tensors are used uncached this time and will be computed again next time")
    return tensors


def encode_dataset(dataset, latent_space: LatentSpace, cache: Path, source: dict) -> Tensor:
    """The latents z = s E(x) of every image of `dataset` (N, c, h, w) on the CPU (the KL posterior's mode), `cached` in
    the safetensors file `cache` under `source` (Stage.key: the autoencoder run, its checkpoint, its weights' hash, the
    data config and size)."""
    def encode() -> dict[str, Tensor]:
        return {"latents": torch.cat([latent_space.encode(x).cpu() for x in in_batches(dataset)])}

    return cached(cache, source, encode)["latents"]


def prepare_latent_training(cfg: RunConfig, dataset, run_dir: Path, device, saved: RunConfig | None = None):
    """A latent-diffusion config made ready to train (resolve_latent_config: the autoencoder's path and checkpoint step
    pinned, sample.clip off), with latent.scale_factor estimated when 0 and not saved: 1 / std of the training latents
    (Rombach et al. 2022, app. D.1). Returns (config, LatentSpace, the training set of latents)."""
    cfg = resolve_latent_config(cfg, saved)
    step = cfg.latent.autoencoder_step
    ae_cfg, ae = load_autoencoder(cfg.latent.autoencoder, device, step)
    check_latent_config(cfg, ae_cfg)
    source = Stage("autoencoder", Path(cfg.latent.autoencoder), step).key(data=vars(cfg.data), n=len(dataset))
    unscaled = LatentSpace(ae, 1.0, cfg.data.channels, cfg.data.image_size)
    if not cfg.latent.cache:  # the scale estimated on what trains: seeded posterior samples (Rombach et al. 2022, app. D.1)
        sample = None if cfg.latent.scale_factor else torch.cat(
            [z.cpu() for z in in_batches(EncodingDataset(dataset, unscaled))])
    else:
        sample = encode_dataset(dataset, unscaled, run_dir / "latents.safetensors", source)
    if not cfg.latent.scale_factor:
        cfg.latent.scale_factor = latent_scale_factor(sample)
    latent_space = LatentSpace(ae, cfg.latent.scale_factor, cfg.data.channels, cfg.data.image_size)
    if cfg.latent.cache:
        return cfg, latent_space, LatentDataset(cfg.latent.scale_factor * sample, dataset)
    return cfg, latent_space, EncodingDataset(dataset, latent_space)


class EncodingDataset:
    """latent.cache = false: each batch is encoded when it is drawn, z = s * (a sample of the KL posterior q(z | x))
    as LDM trains (a VQ encoding is deterministic). The sample's noise is seeded by the batch's indices, so a resumed
    run draws what an uninterrupted one does. The interface of data.ImageDataset."""

    def __init__(self, base, latent_space: LatentSpace):
        self.base, self.space = base, latent_space
        self.num_classes, self.condition_keys = base.num_classes, base.condition_keys
        self.captions = getattr(base, "captions", None)

    def __len__(self) -> int:
        return len(self.base)

    def batch(self, idx: Tensor) -> tuple[Tensor, dict]:
        x, cond = self.base.batch(idx)
        seed = int(np.random.SeedSequence([int(i) for i in idx]).generate_state(1, np.uint64)[0] >> 1)
        return self.space.encode(x, torch.Generator(self.space.device).manual_seed(seed)), cond
