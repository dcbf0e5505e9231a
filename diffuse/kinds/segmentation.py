"""The segmentation kind (model.kind = "segmenter"): a pixel classifier on a trained run's features, trained by the one
Trainer on a handful of labelled images (Baranchuk et al. 2022, ICLR; the math in segmentation.py).

A run names where its features come from in [segment]: a diffusion run's decoder activations (the method), or a
baseline of the paper's table: the same U-Net with random weights, the pixels and their coordinates, an autoencoder's
latents, the digit classifier's conv maps; or, with segment.head = "unet", no features at all and a U-Net trained end
to end on the labelled images. The diffusion (or autoencoder) run is a stage: pinned to its checkpoint step and the
sha256 of that checkpoint's manifest, and the training images' features are cached in RUN/features.safetensors under
that key. Which images are labelled is a pure function of train.seed; the held-out test images are the same for every
seed, so seeds can be compared.

One step: a batch of labelled pixels (their feature rows), row j training member j mod M (so each member learns from its
own pixels, as the reference trains each on its own shuffle, one after the other; train.batch_size = 640 gives each the
reference's 64), the members' mean cross-entropies summed (they share no parameter: each gets its own gradient, and
the group is not clipped, which would couple them). No draws, no EMA. Where train.fid_every scores the held-out images
(mIoU), RUN/best keeps the weights of the best score: a choice made on the test images, so the shipped configs score
once, at the end.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checkpoint as ckpt, pretrained
from ..config import RunConfig, load_config
from ..data.segmentation import IGNORE, SegmentationSet, labelled_set
from ..denoiser import Denoiser
from ..nets.unet import UNet, decoder_layout
from ..schedule import Schedule
from ..nets.ensemble import PixelEnsemble
from ..segmentation import (check_classes, class_ious, mean_iou, per_pixel, pixel_coordinates, score, unet_features,
                            upsample, vote, vp_linear_times)
from ..stages import Stage, cached, diffusion_shape, load_autoencoder, space as run_space
from ..visualize import colour_labels, save_grid
from .base import DIFFUSION_TRAINING, Context, Group, Objective, ignored
from .diffusion import build_denoiser, build_model

TEST_SPLIT_SEED = 20221  # the permutation that holds out segment.test_images: the same for every train.seed
STAGE_SOURCES = ("diffusion", "random", "autoencoder")  # features read from a run named in segment.source
PREDICT_BYTES = 2**30   # features and logits held at once when a trained run segments or is scored


# --- which images ---------------------------------------------------------------------------------------------------
def split(n: int, train_images: int, test_images: int, seed: int, grow: str = "") -> tuple[Tensor, Tensor]:
    """(train, test) indices into a pool of n labelled images: the test images are the first `test_images` of a fixed
    permutation (the same for every seed), the training images `train_images` drawn with `seed` from the rest (0: all
    of the rest). ValueError naming the settings (and `grow`, how the pool grows, e.g. "raise data.crops") when the
    pool is too small."""
    if test_images + max(train_images, 1) > n:
        raise ValueError(f"segment.train_images = {train_images} and segment.test_images = {test_images} need "
                         f"{test_images + max(train_images, 1)} labelled images, and the data hold {n}; lower them"
                         + (f" (or {grow})" if grow else ""))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))
    test, rest = perm[:test_images], perm[test_images:]
    pick = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))
    return rest[pick[:train_images]] if train_images else rest, test


def pool_size(cfg: RunConfig) -> int:
    """How many labelled images a config's pool holds at most (labelled_set's n): data.crops scenes for the shapes, all
    of a bundled or folder source (0)."""
    return cfg.data.crops if cfg.data.source == "shapes" else 0


def load_labelled(cfg: RunConfig) -> SegmentationSet:
    """The labelled pool of a segmentation config (data.segmentation.labelled_set)."""
    d = cfg.data
    return labelled_set(d.source, pool_size(cfg), d.image_size, d.channels, path=d.path,
                        colour=cfg.segment.classes == "shape_colour")


# --- the features ---------------------------------------------------------------------------------------------------
def resolve_source(cfg: RunConfig, saved: RunConfig | None = None) -> RunConfig:
    """A copy of a segmentation config with its source run pinned: segment.source as an absolute path and
    segment.source_step the saved run's, else the source's newest checkpoint. FileNotFoundError naming the fix when the
    source holds no run or no checkpoint."""
    cfg = copy.deepcopy(cfg)
    s = cfg.segment
    if s.features not in STAGE_SOURCES or s.head != "ensemble":
        return cfg
    path = source_path(cfg)
    s.source = str(path)
    if saved is not None and not s.source_step:
        s.source_step = saved.segment.source_step
    if not s.source_step:
        step = ckpt.latest_step(path)
        if step is None:
            raise FileNotFoundError(f"segment.source = {path} holds no checkpoint yet; train it first (it saves one at "
                                    "train.checkpoint_every and at the end)")
        s.source_step = step
    return cfg


def source_path(cfg: RunConfig) -> Path:
    """segment.source as an absolute path, checked: FileNotFoundError naming the setting when it holds no run."""
    s = cfg.segment
    if not s.source:
        want = "an autoencoder run" if s.features == "autoencoder" else "a trained diffusion run"
        raise ValueError(f"segment.features = '{s.features}' reads {want}: set segment.source to its folder, e.g. "
                         "segment.source = 'runs/mnist' (`diffuse train configs/mnist.toml --out runs/mnist`)")
    path = Path(s.source).expanduser().resolve()
    if pretrained.is_model_folder(path):
        raise ValueError(f"segment.source = {s.source!r} is a diffusers model folder, whose U-Net does not expose its decoder "
                         "blocks by index; train a run here (`diffuse train CONFIG --out RUN`) and name it")
    if not (path / "config.toml").is_file():
        raise FileNotFoundError(f"segment.source = {s.source!r}: {path} holds no run (no config.toml); train it first, "
                                "e.g. `diffuse train configs/mnist.toml --out runs/mnist`, and name its folder")
    return path


def source_network(cfg: RunConfig, device, step: int | None = None) -> tuple[RunConfig, Denoiser]:
    """The source diffusion run's config and denoiser (EMA weights at `step`, default segment.source_step; segment.features
    = "random": the same U-Net with PyTorch's default initialisation of every layer, the zero-initialised output
    layers drawn too, seeded by segment.noise_seed), in eval mode without gradients."""
    s = cfg.segment
    path = source_path(cfg)
    src = load_config(path / "config.toml")
    check_source(cfg, src, path)
    step = step or s.source_step or ckpt.latest_step(path)
    c = None if s.features == "random" else ckpt.load_checkpoint(path, step)  # the random baseline reads no weights
    with torch.random.fork_rng(devices=[]):  # the random baseline's weights: a function of segment.noise_seed alone
        torch.manual_seed(s.noise_seed)
        net = build_model(src, int(ckpt.read_state(path, step)["num_classes"]))
        if c is None:
            for m in net.modules():
                if m is not net and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    if c is not None:
        ckpt.load_weights(net, c.tensors["ema"], config=path / "config.toml",
                          weights=Path(ckpt.CHECKPOINTS) / f"step_{c.step:08d}" / "ema.safetensors")
    return src, build_denoiser(src, net.to(device).eval().requires_grad_(False))


def check_source(cfg: RunConfig, src: RunConfig, path: Path) -> None:
    """ValueError naming the fix when the source run cannot give this config's features: another kind of run, other
    images, a network conditioned on an image, scalars or a context (which a plain image does not give), decoder blocks
    it does not have."""
    s = cfg.segment
    want = "autoencoder" if s.features == "autoencoder" else "denoiser"
    if src.model.kind != want:
        what = "an autoencoder run (model.kind = 'autoencoder')" if want == "autoencoder" else "a diffusion run (model.kind = 'denoiser')"
        raise ValueError(f"segment.source = {path} holds a {src.model.kind} run, and segment.features = '{s.features}' reads "
                         f"{what}; name such a run, or choose segment.features to match")
    if (src.data.channels, src.data.image_size) != (cfg.data.channels, cfg.data.image_size):
        raise ValueError(f"segment.source = {path} was trained on {src.data.channels}-channel {src.data.image_size}px images and "
                         f"this config's data are {cfg.data.channels}-channel {cfg.data.image_size}px; set data.channels = "
                         f"{src.data.channels} and data.image_size = {src.data.image_size}")
    if want == "denoiser":
        m = src.model
        taken = [k for k, on in (("a condition image (model.cond_channels)", m.cond_channels),
                                 ("scalars (model.scalar_inputs)", m.scalar_inputs),
                                 ("a cross-attention context (model.context_dim without a text encoder)",
                                  m.context_dim and not m.text_encoder)) if on]
        if taken:
            raise ValueError(f"segment.source = {path} is conditioned on {taken[0]}, which an image alone does not give; "
                             "read the features of an unconditional, class- or text-conditional run")
        untrained = [k for k, on in (("label", m.class_conditional), ("text", m.text_encoder))
                     if on and not src.train.condition_dropout.get(k)]
        if untrained:
            raise ValueError(f"segment.source = {path} is conditioned on {untrained[0]!r} and was trained without its dropout "
                             "(train.condition_dropout), so its null condition, which the features are read with (an "
                             "image has no label or caption), is untrained; read an unconditional run or one trained with "
                             f"train.condition_dropout = {{{untrained[0]} = 0.1}}")
        layout = source_layout(src)
        bad = [b for b in s.blocks if not 0 <= b < len(layout)]
        if bad or len(set(s.blocks)) != len(s.blocks):
            raise ValueError(f"segment.blocks = {s.blocks}: the source U-Net has decoder blocks 0..{len(layout) - 1} "
                             f"(width, side: {layout}), each listed once; choose from them ([] = all)")


def source_layout(src: RunConfig) -> list[tuple[int, int]]:
    """(width, side) of each decoder block of a diffusion config's U-Net (nets.unet.decoder_layout), from its config."""
    return decoder_layout(src.model, diffusion_shape(src)[1])


class Features:
    """The pixel features of a segmentation config: `features(x)` for images x (B, C, S, S) in [-1, 1] -> (B, dim, S, S)
    float32 on the CPU, computed feature_batch images at a time, without gradients. `dim` is their width. Loads the
    source run (pinned at segment.source_step) once; `feature_network(spec, device)` resolves the digit classifier."""

    def __init__(self, cfg: RunConfig, device, feature_network=None):
        s = cfg.segment
        self.cfg, self.device, self.side = cfg, torch.device(device), cfg.data.image_size
        if s.features in ("diffusion", "random"):
            src, self.denoiser = source_network(cfg, device)
            self.space = run_space(src, device)
            self.times = vp_linear_times(s.times, self.denoiser.schedule)
            layout = self.denoiser.net.decoder_layout()
            self.blocks = list(s.blocks) or list(range(len(layout)))
            g = torch.Generator().manual_seed(s.noise_seed)  # share_noise: one eps for every image
            self.noise = torch.randn((1, *self.space.shape), generator=g).to(self.device)
            spec = self.denoiser.net.condition_spec  # the unconditional model: null label, empty caption
            self.cond = {k: spec.null_value(k, torch.zeros((1, *((spec.text,) if k == "text" else ())), dtype=torch.int64))
                         for k in spec.keys}
            self.dim = len(self.times) * sum(layout[b][0] for b in self.blocks)
        elif s.features == "autoencoder":
            path = source_path(cfg)
            ae_cfg = load_config(path / "config.toml")
            check_source(cfg, ae_cfg, path)
            _, self.autoencoder = load_autoencoder(path, device, s.source_step or None)
            self.dim = self.autoencoder.cfg.latent_channels
        elif s.features == "digit_classifier":
            if feature_network is None:
                raise ValueError("segment.features = 'digit_classifier' needs the digit classifier (train.feature_network)")
            self.classifier = feature_network("digits", device)
            self.dim = sum(m.shape[1] for m in self.classifier.maps(torch.zeros(1, 1, self.side, self.side, device=device)))
        else:  # pixels and their coordinates
            self.dim = cfg.data.channels + 2

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        return torch.cat([self._batch(part.to(self.device)).cpu() for part in x.split(self.cfg.segment.feature_batch)])

    def _batch(self, x: Tensor) -> Tensor:
        f = self.cfg.segment.features
        if f in ("diffusion", "random"):
            cond = {k: v.expand(x.shape[0], *v.shape[1:]).to(self.device) for k, v in self.cond.items()}
            return unet_features(self.denoiser, self.space.encode(x), self.times, self.blocks, self.noise, self.side, cond)
        if f == "autoencoder":
            return upsample([self.autoencoder.encode(x)], self.side)
        if f == "digit_classifier":
            return upsample(self.classifier.maps(x), self.side)
        return pixel_coordinates(x)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable of /proc/meminfo: free memory plus what the page cache
    would give back), or None where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def check_memory(images: int, side: int, dim: int, available: int | None = None) -> None:
    """MemoryError naming the figures and the fixes when the training pixels' features (images x side^2 x dim float32,
    held three times while they become rows) would not fit in the memory this machine has free (`available` bytes, default
    read from the OS): the reference's users ran out of RAM (ddpm-segmentation issue #11: 210 GB for 50 images at 256
    px) before a line of training."""
    need = 3 * images * side * side * dim * 4
    available = available if available is not None else available_memory()
    if available is not None and need > available:
        raise MemoryError(f"the features of {images} labelled {side}x{side} images at {dim} values per pixel need "
                          f"{need / 2**30:.1f} GiB and {available / 2**30:.1f} GiB are free; label fewer images "
                          "(segment.train_images), read fewer blocks or times (segment.blocks, segment.times), or work at "
                          "a smaller data.image_size")


class PixelRows:
    """Labelled pixels as a dataset of feature rows: x (B, dim), {"label": (B,)}: the Trainer's data for the ensemble."""

    condition_keys = ("label",)

    def __init__(self, rows: Tensor, labels: Tensor, num_classes: int):
        self.rows, self.labels, self.num_classes = rows, labels, num_classes
        self.shape = (rows.shape[1],)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: Tensor) -> tuple[Tensor, dict]:
        return self.rows[idx], {"label": self.labels[idx]}


class LabelledImages:
    """Labelled images as a dataset: x (B, C, S, S), {"mask": (B, S, S)}: the Trainer's data for segment.head = "unet"."""

    condition_keys = ("mask",)

    def __init__(self, data: SegmentationSet):
        self.data, self.num_classes, self.shape = data, data.num_classes, tuple(data.images.shape[1:])

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, idx: Tensor) -> tuple[Tensor, dict]:
        return self.data.images[idx], {"mask": self.data.masks[idx]}


def build_head(cfg: RunConfig, dim: int, num_classes: int) -> nn.Module:
    """The trained part of a segmentation run: the PixelEnsemble on `dim` features, or (segment.head = "unet") a U-Net of
    [model] from the images to num_classes logits per pixel."""
    s, d = cfg.segment, cfg.data
    if s.head == "unet":
        return UNet(cfg.model, in_channels=d.channels, image_size=d.image_size, out_channels=num_classes)
    return PixelEnsemble(dim, num_classes, s.members, tuple(s.hidden))


def head_logits(head: nn.Module, features: Tensor | None, x: Tensor | None = None) -> Tensor:
    """Per-member logits (M, B, S, S, C) of a head: the ensemble on features (B, dim, S, S), or the U-Net on images x
    (one member)."""
    if isinstance(head, UNet):
        return head(x, torch.zeros(x.shape[0], device=x.device)).permute(0, 2, 3, 1)[None]
    B, _, H, W = features.shape
    rows, _ = per_pixel(features)
    return head(rows).view(-1, B, H, W, head.num_classes)


class SegmentationObjective(Objective):
    groups = {"main": Group(("model",))}
    ema = None
    separable = False  # BatchNorm normalises by the batch's statistics: a micro-batch would take another step
    progress_desc = "segmentation"
    loss_name = "pixel cross-entropy"

    @classmethod
    def load_data(cls, cfg: RunConfig) -> SegmentationSet:
        return load_labelled(cfg)

    @classmethod
    def examples(cls, cfg: RunConfig, data: SegmentationSet) -> int:
        """What a batch draws from: the labelled images' pixels (the ensemble), or the images (the U-Net)."""
        n = max(len(data) - cfg.segment.test_images, 0) if not cfg.segment.train_images else cfg.segment.train_images
        return n if cfg.segment.head == "unet" else n * cfg.data.image_size ** 2

    @classmethod
    def unused(cls, cfg: RunConfig) -> list[tuple[str, str, str]]:
        s = cfg.segment
        why = 'model.kind = "segmenter" trains a pixel classifier on features'
        sections = ("schedule", "sample", "task", "autoencoder", "latent")
        out = ignored(cfg, why, sections, (*DIFFUSION_TRAINING, "hflip", "fid_features", "fid_samples", "fid_steps"))
        if s.head == "ensemble":
            out += ignored(cfg, 'segment.head = "ensemble" has no U-Net ([model] describes the "unet" head)', ("model",))
            out.append(("train.grad_clip", "the ensemble's members are not clipped (one norm over all of them would couple "
                        "them; the reference does not clip)", "remove it"))
        else:
            out += [(f"segment.{k}", 'segment.head = "unet" trains on the images, not on features', "remove it")
                    for k in ("source", "source_step", "features", "times", "blocks", "members", "hidden", "feature_batch")]
        if s.features not in ("diffusion", "random"):
            out += [(f"segment.{k}", f"segment.features = '{s.features}' has no noise or decoder blocks", "remove it")
                    for k in ("times", "blocks", "noise_seed")]
        if s.features in ("pixels", "digit_classifier"):
            out += [(f"segment.{k}", f"segment.features = '{s.features}' reads no run", "remove it")
                    for k in ("source", "source_step")]
        if cfg.data.source != "shapes":
            out.append(("segment.classes", "it chooses the classes of data.source = 'shapes'", "remove it"))
        return out

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        s, d = cfg.segment, cfg.data
        checks = [
            (d.source != "photos", "data.source = 'photos' has no labels to segment; use 'mnist' or 'digits' (11 classes: "
                                   "background and the digit on its strokes), 'shapes', or 'folder' with PATH/images and "
                                   "PATH/masks (PNG masks of class indices)"),
            (s.features != "digit_classifier" or d.channels == 1,
             f"segment.features = 'digit_classifier' reads 1-channel digits; data.channels is {d.channels}"),
            (s.members >= 1 and s.hidden and min(s.hidden) >= 1,
             f"segment.members and segment.hidden must be >= 1 (the paper: 10 members of [128, 32]), got {s.members}, {s.hidden}"),
            (s.train_images >= 0 and s.test_images >= 0,
             f"segment.train_images and segment.test_images must be >= 0, got {s.train_images}, {s.test_images}"),
            (s.feature_batch >= 1, f"segment.feature_batch must be >= 1 image, got {s.feature_batch}"),
            (not cfg.train.fid_every or s.test_images >= 1,
             "train.fid_every scores the held-out images (mIoU): set segment.test_images >= 1, or train.fid_every = 0"),
            (cfg.train.mixed_precision != "fp16", "train.mixed_precision = 'fp16': use 'bf16', 'auto' or 'no' (BatchNorm "
                                                  "statistics of raw features overflow half precision)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if s.features in ("diffusion", "random") and s.head == "ensemble":
            vp_linear_times(s.times, Schedule.linear(1000))  # the times' range
        if s.features in STAGE_SOURCES and s.head == "ensemble":
            path = source_path(cfg)
            check_source(cfg, load_config(path / "config.toml"), path)

    @classmethod
    def resolve(cls, cfg: RunConfig, saved: RunConfig | None) -> RunConfig:
        return resolve_source(cfg, saved)

    def __init__(self, cfg: RunConfig, data: SegmentationSet, ctx: Context):
        s = cfg.segment
        self.cfg, self.ctx = cfg, ctx
        self.train_idx, self.test_idx = split(len(data), s.train_images, s.test_images, cfg.train.seed,
                                              "raise data.crops" if cfg.data.source == "shapes" else
                                              "label more images" if cfg.data.source == "folder" else "")
        self.labelled, self.class_names = data, data.class_names
        train = data.subset(self.train_idx)
        if s.head == "unet":
            self.features, self.dim = None, 0
            self.dataset = LabelledImages(train)
            return
        if (cfg.train.batch_size // ctx.world) % s.members:
            raise ValueError(f"train.batch_size = {cfg.train.batch_size} must give each of the {ctx.world} process(es) a "
                             f"multiple of segment.members = {s.members} pixels (each member trains on its own share of "
                             f"the batch); e.g. train.batch_size = {64 * s.members * ctx.world} (64 pixels per member, as "
                             "the reference)")
        self.groups = {"main": Group(("model",), clip=False)}  # one norm over all members would couple them
        self.features = Features(cfg, ctx.device, ctx.feature_network)
        self.dim = self.features.dim
        check_memory(len(train), cfg.data.image_size, self.dim)
        self.source_weights = ""
        if s.features in STAGE_SOURCES:
            stage = Stage("source", Path(s.source), s.source_step)
            self.source_weights = stage.weights_sha256()
            key = stage.key(features=s.features, times=list(s.times), blocks=list(s.blocks), noise_seed=s.noise_seed,
                            data=vars(cfg.data), classes=s.classes, images=[int(i) for i in self.train_idx],
                            pixels=hashlib.sha256(train.images.numpy().tobytes()).hexdigest())
            feats = cached(ctx.run_dir / "features.safetensors", key, lambda: {"features": self.features(train.images)})["features"]
        else:
            feats = self.features(train.images)
        rows, labels = per_pixel(feats, train.masks, IGNORE)
        if len(rows) < cfg.train.batch_size:
            raise ValueError(f"the {len(train)} labelled training images have {len(rows)} labelled pixels, fewer than "
                             f"train.batch_size = {cfg.train.batch_size}; lower train.batch_size or label more images")
        self.dataset = PixelRows(rows, labels, data.num_classes)

    def build(self) -> dict[str, nn.Module]:
        return {"model": build_head(self.cfg, self.dim, self.labelled.num_classes)}

    def losses(self, x: Tensor, extras: dict, d: dict, step: int) -> dict:
        """The batch's loss: the mean over its pixels of every member's cross-entropy, summed over members (the
        ensemble), or the mean over its images of their mean pixel cross-entropy (U-Net; IGNORE pixels left out)."""
        net = self.nets["model"]
        if self.cfg.segment.head == "unet":
            logits = net(x, torch.zeros(x.shape[0], device=x.device))
            ce = F.cross_entropy(logits.float(), extras["mask"], ignore_index=IGNORE, reduction="none")
            counted = (extras["mask"] != IGNORE).sum((1, 2)).clamp_min(1)
            return {"main": (ce.sum((1, 2)) / counted).mean()}
        M = self.cfg.segment.members  # row j of the batch trains member j mod M: each its own pixels (the reference
        labels = extras["label"].view(-1, M).T  # trains each member on its own shuffle), the same rows under DDP
        logits = net(x.view(-1, M, x.shape[1]).transpose(0, 1))  # (M, b / M, C)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return {"main": ce * M}  # the members' mean losses, summed: each member's gradient is its own mean loss's

    def checkpoint_info(self) -> dict:
        return {"kind": "segmenter", "num_classes": self.labelled.num_classes, "class_names": list(self.class_names),
                "feature_dim": self.dim, "source_weights": getattr(self, "source_weights", "")}

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(labels (B, S, S), uncertainty (B, S, S)) of the model being trained, in eval mode."""
        head = self.modules["model"]
        was = head.training
        head.eval()
        try:
            return segment_images(head, self.features, x, self.ctx.device)
        finally:
            head.train(was)

    def preview(self, trainer) -> Path | None:
        """RUN/samples/step_N.png: 8 held-out images above their predicted segmentations."""
        if not len(self.test_idx):
            return None
        test = self.labelled.subset(self.test_idx[:8])
        labels, _ = self.predict(test.images)
        return save_grid(torch.cat([test.images, colour_labels(labels, self.labelled.num_classes, test.images.shape[1])]),
                         trainer.run_dir / "samples" / f"step_{trainer.step:08d}.png", nrow=len(labels))

    def evaluate(self, trainer) -> tuple[dict, float]:
        """mIoU (and per-class IoU) on the held-out images; the score 1 - mIoU keeps the best weights as RUN/best."""
        conf = score(lambda x: self.predict(x)[0], self.labelled.subset(self.test_idx), self.labelled.num_classes)
        miou = mean_iou(conf)
        return {"miou": miou, "iou": class_ious(conf, self.class_names), "test_images": len(self.test_idx)}, 1 - miou


# --- using a trained segmentation run ---------------------------------------------------------------------------------
@torch.no_grad()
def segment_images(head: nn.Module, features: Features | None, x: Tensor, device, chunk: int | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Labels (B, S, S) int64 (the members' majority vote) and uncertainty (B, S, S) float32 (their Jensen-Shannon
    divergence, 0 for the one-member U-Net) of images x (B, C, S, S) in [-1, 1], `chunk` images at a time (default: as
    many as keep their features and the members' logits within PREDICT_BYTES)."""
    if chunk is None:
        dim = features.dim if features is not None else 0
        members, classes = (head.members, head.num_classes) if isinstance(head, PixelEnsemble) else (1, head.conv_out.out_channels)
        per_image = x.shape[-1] * x.shape[-2] * 4 * (dim + 3 * members * classes)
        chunk = max(1, PREDICT_BYTES // per_image)
    labels, unc = [], []
    for part in x.split(chunk):
        f = features(part).to(device) if features is not None else None
        logits = head_logits(head, f, part.to(device))  # (M, b, S, S, C)
        M, b, H, W, C = logits.shape
        lab, u = vote(logits.reshape(M, -1, C))
        labels.append(lab.view(b, H, W).cpu())
        unc.append(u.view(b, H, W).cpu())
    return torch.cat(labels), torch.cat(unc)


def check_source_weights(cfg: RunConfig, trained_on: str, run_dir: Path) -> None:
    """ValueError (FileNotFoundError when the step is gone) naming the fix when the source run's pinned checkpoint is not
    the one a segmentation run's head was trained on (sha256 of its manifest): the head would read other features."""
    s = cfg.segment
    if s.head != "ensemble" or s.features not in STAGE_SOURCES or not trained_on:
        return
    try:
        now = Stage("source", Path(s.source), s.source_step).weights_sha256()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}: the segmentation run {run_dir} reads its features there; restore that checkpoint (keep it "
                                "with train.keep_checkpoints when the source trains on) or train the segmentation run again") from None
    if now != trained_on:
        raise ValueError(f"the segmentation run {run_dir} was trained on the features of {s.source} at step {s.source_step}, and "
                         "that checkpoint now holds other weights (the run was trained again into the same folder); train the "
                         "segmentation run again on it")


class SegmentationRun:
    """A trained segmentation run opened for use: `segment(x) -> (labels, uncertainty)` for images x (B, C, S, S) in
    [-1, 1], `class_names`, `cfg`. Loads the head's checkpoint (`step`, default the newest) and the features' source at
    the pinned step. ValueError when the folder holds another kind of run."""

    def __init__(self, run_dir: str | Path, device="cpu", feature_network=None, step: int | None = None):
        run_dir = Path(run_dir)
        cfg = load_config(run_dir / "config.toml")
        if cfg.model.kind != "segmenter":
            raise ValueError(f"{run_dir} holds a {cfg.model.kind} run, not a segmentation run (model.kind = 'segmenter'); "
                             "train one with `diffuse train configs/segment_digits.toml`")
        c = ckpt.load_checkpoint(run_dir, step)
        self.cfg, self.step, self.device = cfg, c.step, torch.device(device)
        self.class_names = list(c.state["class_names"])
        check_source_weights(cfg, c.state.get("source_weights", ""), run_dir)
        self.features = Features(cfg, device, feature_network) if cfg.segment.head == "ensemble" else None
        self.head = build_head(cfg, int(c.state["feature_dim"]), len(self.class_names))
        ckpt.load_weights(self.head, c.tensors["model"], config=run_dir / "config.toml",
                          weights=Path(ckpt.CHECKPOINTS) / f"step_{c.step:08d}" / "model.safetensors")
        self.head = self.head.to(device).eval().requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        d = self.cfg.data
        return d.channels, d.image_size, d.image_size

    def segment(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"this segmentation run reads images of shape {self.image_shape}, got {tuple(x.shape[1:])}")
        return segment_images(self.head, self.features, x, self.device)

    def held_out(self) -> SegmentationSet:
        """The run's own held-out labelled images (segment.test_images of its data)."""
        if not self.cfg.segment.test_images:
            raise ValueError("this segmentation run holds out no images (segment.test_images = 0); score it on labelled "
                             "images of your own: --real FOLDER (FOLDER/images and FOLDER/masks)")
        data = load_labelled(self.cfg)
        _, test = split(len(data), self.cfg.segment.train_images, self.cfg.segment.test_images, self.cfg.train.seed)
        return data.subset(test)

    def evaluate(self, data: SegmentationSet | None = None) -> dict:
        """mIoU, per-class IoU and pixel accuracy on `data` (default: the held-out images). ValueError when its classes
        differ from the run's."""
        data = self.held_out() if data is None else data
        check_classes(data, self.class_names)
        conf = score(lambda x: self.segment(x)[0], data, self.num_classes)
        return {"miou": mean_iou(conf), "iou": class_ious(conf, self.class_names),
                "pixel_accuracy": float(conf.diagonal().sum() / conf.sum().clamp_min(1)), "images": len(data),
                "step": self.step}

