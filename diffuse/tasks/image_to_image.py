"""Trained image-conditioned models: the U-Net sees a condition image y concatenated to x_t (lecture 002, SR3,
Palette, cascades). A task turns a clean training image x_0 into its condition: what the network will be given
at sampling time in place of the answer.

    superres   y = up(down(x_0)): the low-resolution image (N x N block means) upsampled bicubically to the model's
               size (SR3, Saharia et al. 2021, sec. 2.4); with noise-conditioning augmentation (Ho et al. 2021,
               "Cascaded diffusion models", sec. 4.2) the low-resolution image is first noised by the forward
               process to a level s ~ U[0, noise_aug_max], and s is given to the network as a scalar; at sampling
               s is a parameter (aug_level), so a cascade's second stage forgives its first stage's artefacts
    colorize   y = the luma 0.299 R + 0.587 G + 0.114 B of a colour image (Palette, Saharia et al. 2022)
    inpaint    y = [x_0 * m, m] with m = 1 on the pixels to keep: free-form strokes, boxes or both (Palette, sec. 4;
               free-form masks as in Yu et al. 2019)
    uncrop     the same with m keeping a centred box of side `keep` and generating the border (Palette's uncropping)
    jpeg       y = the image after JPEG compression at a quality drawn from [q_lo, q_hi] (Pillow; Palette's JPEG
               restoration)

Random choices (masks, JPEG quality, augmentation level and noise) come from one seed per example that the trainer
draws for the global batch from its generator, so a step's pairs are the same after a resume and under DDP.
"""

from __future__ import annotations

import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


TaskKind = Literal["none", "superres", "colorize", "inpaint", "uncrop", "jpeg"]


@dataclass
class TaskConfig:
    """[task]: what the network is conditioned on (tasks/image_to_image.py); "none" is ordinary generation."""

    kind: TaskKind = "none"
    factor: int = 2                     # superres: the low-resolution side is image_size / factor
    noise_aug_max: float = 0.0          # superres: largest augmentation level s (in the schedule's t) in training; 0 = off
    aug_level: float = 0.0              # superres with augmentation: the level s the low-resolution input gets at sampling
    mask: Literal["free_form", "box", "mixed"] = "mixed"   # inpaint: the masks drawn in training
    keep: float = 0.5                   # uncrop: the side of the kept centre box, as a fraction of the image side
    jpeg_quality: list[int] = field(default_factory=lambda: [5, 30])  # jpeg: qualities drawn uniformly from [lo, hi] (Palette: 5..30)


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


EDITS = ("inpaint", "sdedit", "ilvr")  # `diffuse edit` tasks of a model of images (tasks/editing.py), needing no training
TRAINED_TASKS = {"superres": "superres", "colorize": "colorize", "uncrop": "uncrop", "restore": "jpeg"}  # edit -> task.kind
EXAMPLE_CONFIGS = {"superres": "configs/sr_digits.toml", "colorize": "configs/colorize_photos.toml",
                   "uncrop": "configs/uncrop_photos.toml", "jpeg": "configs/jpeg_photos.toml", "inpaint": "configs/inpaint_photos.toml"}


def edit_name(kind: str) -> str:
    """The `diffuse edit` task of a trained task kind (task.kind "jpeg" is the edit "restore")."""
    return {v: k for k, v in TRAINED_TASKS.items()}.get(kind, kind)


def run_edits(kind: str) -> tuple[str, ...]:
    """The edits a run of task.kind `kind` offers: inpaint, sdedit and ilvr on a model of images ("none"), else the one
    task it was trained for (superres, colorize, uncrop, restore, or inpaint on an inpainting run)."""
    return EDITS if kind == "none" else (edit_name(kind),)


def cond_channels(task: TaskConfig, channels: int) -> int:
    """The channels of the condition image of a task on images of `channels` channels (0 for "none")."""
    return {"none": 0, "superres": channels, "colorize": 1, "inpaint": channels + 1, "uncrop": channels + 1,
            "jpeg": channels}[task.kind]


def check_task(task: TaskConfig, channels: int, image_size: int, model_cond_channels: int, model_scalars: int) -> None:
    """Raise ValueError naming the setting when a task does not fit the data or the model's inputs."""
    if task.kind == "none":
        return
    need = cond_channels(task, channels)
    if model_cond_channels != need:
        raise ValueError(f"task.kind = '{task.kind}' on {channels}-channel images conditions on {need} image channel(s): "
                         f"set model.cond_channels = {need} (it is {model_cond_channels})")
    scalars = int("scalars" in condition_keys(task))
    if model_scalars != scalars:
        raise ValueError(f"task.noise_aug_max = {task.noise_aug_max} gives the network {scalars} scalar input(s) (the "
                         f"augmentation level): set model.scalar_inputs = {scalars}")
    if task.kind == "superres" and (task.factor < 2 or image_size % task.factor):
        raise ValueError(f"task.factor = {task.factor} must be >= 2 and divide data.image_size = {image_size}")
    if not 0 <= task.noise_aug_max <= 1 or not 0 <= task.aug_level <= 1:
        raise ValueError(f"task.noise_aug_max and task.aug_level are times in [0, 1], got {task.noise_aug_max}, {task.aug_level}")
    if task.kind == "colorize" and channels != 3:
        raise ValueError("task.kind = 'colorize' needs colour data: set data.channels = 3")
    if task.kind == "uncrop" and not 0 < task.keep < 1:
        raise ValueError(f"task.keep must be in (0, 1), the kept centre's share of the side, got {task.keep}")
    lo, hi = (task.jpeg_quality + [0, 0])[:2]
    if task.kind == "jpeg" and (len(task.jpeg_quality) != 2 or not 1 <= lo <= hi <= 95):
        raise ValueError(f"task.jpeg_quality must be [lo, hi] with 1 <= lo <= hi <= 95, got {task.jpeg_quality}")


# --- the degradations ----------------------------------------------------------------------------------------
def downsample(x: Tensor, factor: int) -> Tensor:
    """(B, C, H, W) -> (B, C, H/N, W/N): the mean of each N x N block (area downsampling)."""
    return F.avg_pool2d(x, factor)


def upsample(y: Tensor, size: int) -> Tensor:
    """Bicubic upsampling to size x size, clipped to [-1, 1] (SR3 conditions on the bicubic upsample, sec. 2.4)."""
    return F.interpolate(y, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def to_gray(x: Tensor) -> Tensor:
    """(B, 3, H, W) colour in [-1, 1] -> (B, 1, H, W) luma 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601)."""
    return (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)


def jpeg(x: Tensor, quality: int) -> Tensor:
    """One image (C, H, W) in [-1, 1] through JPEG compression at `quality` (Pillow) and back."""
    pixels = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    img = Image.fromarray(pixels[0].numpy() if x.shape[0] == 1 else pixels.permute(1, 2, 0).numpy())
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(quality))
    out = np.array(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.uint8)
    out = torch.from_numpy(out)[None] if out.ndim == 2 else torch.from_numpy(out).permute(2, 0, 1)
    return (out.float() / 127.5 - 1).to(x)


def box_mask(size: int, g: torch.Generator) -> Tensor:
    """(size, size) with 1 to keep and 0 in one random rectangle covering 10-50% of the side in each direction."""
    h, w = (int(v) for v in torch.randint(max(1, size // 4), max(2, size // 2 + 1), (2,), generator=g))
    top, left = (int(torch.randint(0, size - d + 1, (1,), generator=g)) for d in (h, w))
    m = torch.ones(size, size)
    m[top:top + h, left:left + w] = 0
    return m


def free_form_mask(size: int, g: torch.Generator) -> Tensor:
    """(size, size) with 1 to keep and 0 under 1-3 random brush strokes (random walks of thick lines, as the free-form
    masks of Yu et al. 2019 that Palette trains with)."""
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        x, y = (float(v) for v in torch.rand(2, generator=g) * size)
        width = max(1, int(size * (0.08 + 0.12 * float(torch.rand(1, generator=g)))))
        for _ in range(int(torch.randint(2, 6, (1,), generator=g))):
            angle = float(torch.rand(1, generator=g)) * 2 * math.pi
            length = size * (0.1 + 0.3 * float(torch.rand(1, generator=g)))
            nx, ny = min(max(x + length * math.cos(angle), 0), size - 1), min(max(y + length * math.sin(angle), 0), size - 1)
            draw.line([(x, y), (nx, ny)], fill=0, width=width)
            draw.ellipse([nx - width / 2, ny - width / 2, nx + width / 2, ny + width / 2], fill=0)
            x, y = nx, ny
    return torch.from_numpy(np.array(img) > 127).float()


def border_mask(size: int, keep: float) -> Tensor:
    """(size, size) keeping the centred box of side round(keep * size) (1) and generating the border (0)."""
    k = max(1, round(keep * size))
    m = torch.zeros(size, size)
    lo = (size - k) // 2
    m[lo:lo + k, lo:lo + k] = 1
    return m


def training_mask(task: TaskConfig, size: int, g: torch.Generator) -> Tensor:
    """The mask of one training example of an inpaint or uncrop task (1 keep, 0 generate)."""
    if task.kind == "uncrop":
        return border_mask(size, task.keep)
    kind = task.mask if task.mask != "mixed" else ("box" if float(torch.rand(1, generator=g)) < 0.5 else "free_form")
    m = box_mask(size, g) if kind == "box" else free_form_mask(size, g)
    if bool(m.all()):  # a stroke that missed the image: generate one pixel at least
        m[size // 2, size // 2] = 0
    return m


# --- conditions ---------------------------------------------------------------------------------------------
def masked_condition(x: Tensor, mask: Tensor) -> Tensor:
    """[x * m, m] (B, C + 1, H, W): the known pixels (zero where unknown) and the mask itself (Palette's input)."""
    m = mask.to(x).expand(x.shape[0], 1, *x.shape[-2:])
    return torch.cat([x * m, m], dim=1)


def superres_condition(low: Tensor, size: int, schedule=None, level: Tensor | float = 0.0,
                       noise: Tensor | None = None) -> dict:
    """The condition of a super-resolution model from low-resolution images (B, C, h, w): the bicubic upsample, after
    noise-conditioning augmentation z_s = alpha_s low + sigma_s eps at level s (Ho et al. 2021, sec. 4.2) when a
    schedule is given; `scalars` = s (B, 1) then goes with it."""
    if schedule is None:
        return {"image": upsample(low, size)}
    s = torch.as_tensor(level, dtype=torch.float64).expand(low.shape[0])
    noise = torch.zeros_like(low) if noise is None else noise
    noised = schedule.q_sample(low, s, noise)  # level 0: alpha = 1, sigma = 0, the image itself
    return {"image": upsample(noised, size), "scalars": s.to(low.dtype)[:, None]}


def condition_keys(task: TaskConfig) -> tuple[str, ...]:
    """The condition keys a task adds to each example."""
    if task.kind == "none":
        return ()
    return ("image", "scalars") if task.kind == "superres" and task.noise_aug_max > 0 else ("image",)


def training_condition(task: TaskConfig, x0: Tensor, seeds: Tensor, schedule, level: float | None = None) -> dict:
    """The condition of a batch of clean images x0 (B, C, H, W), with one seed per example (B,) for its random choices
    (mask, JPEG quality, augmentation level and noise). `level` fixes the augmentation level (sampling: aug_level)
    instead of drawing it from U[0, noise_aug_max]."""
    B, C, H, _ = x0.shape
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if task.kind == "superres":
        low = downsample(x0, task.factor)
        if task.noise_aug_max <= 0:
            return superres_condition(low, H)
        drawn = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens]) * task.noise_aug_max
        noise = torch.stack([torch.randn(low.shape[1:], generator=g) for g in gens]).to(low)
        return superres_condition(low, H, schedule, drawn if level is None else level, noise)
    if task.kind == "colorize":
        return {"image": to_gray(x0)}
    if task.kind in ("inpaint", "uncrop"):
        masks = torch.stack([training_mask(task, H, g) for g in gens])[:, None].to(x0)
        return {"image": masked_condition(x0, masks)}
    if task.kind == "jpeg":
        lo, hi = task.jpeg_quality
        qualities = [int(torch.randint(lo, hi + 1, (1,), generator=g)) for g in gens]
        return {"image": torch.stack([jpeg(x, q) for x, q in zip(x0, qualities)])}
    raise ValueError(f"task.kind = {task.kind!r} has no condition")


def input_condition(task: TaskConfig, inp: Tensor, size: int, schedule, *, mask: Tensor | None = None,
                    generator: torch.Generator | None = None) -> dict:
    """The condition a trained task model gets at sampling from a user's input (B, C', h, w) in [-1, 1]:

    superres  the low-resolution image, side size / factor; noised to task.aug_level with noise from `generator`
              when the model was trained with augmentation
    colorize  a grayscale image (a colour one is reduced to its luma)
    inpaint   the image and `mask` (1 keep, 0 generate); uncrop: the image, with the task's border mask
    jpeg      the compressed image
    Raises ValueError for an input of the wrong size or channels.
    """
    B = inp.shape[0]
    if task.kind == "superres":
        low_side = size // task.factor
        if tuple(inp.shape[-2:]) != (low_side, low_side):
            raise ValueError(f"this super-resolution model takes {low_side}x{low_side} inputs (its {size}x{size} / factor "
                             f"{task.factor}), got {inp.shape[-1]}x{inp.shape[-2]}")
        if task.noise_aug_max <= 0:
            return superres_condition(inp, size)
        noise = torch.randn(inp.shape, generator=generator, device=inp.device, dtype=inp.dtype)
        return superres_condition(inp, size, schedule, task.aug_level, noise)
    if tuple(inp.shape[-2:]) != (size, size):
        raise ValueError(f"this model takes {size}x{size} images, got {inp.shape[-1]}x{inp.shape[-2]}")
    if task.kind == "colorize":
        return {"image": to_gray(inp) if inp.shape[1] == 3 else inp}
    if task.kind in ("inpaint", "uncrop"):
        m = border_mask(size, task.keep)[None, None] if task.kind == "uncrop" else mask
        if m is None:
            raise ValueError("an inpainting model needs a mask (1 keep, 0 generate)")
        return {"image": masked_condition(inp, m.expand(B, 1, size, size))}
    if task.kind == "jpeg":
        return {"image": inp}
    raise ValueError(f"task.kind = {task.kind!r} takes no input image")


def viewable(image: Tensor, channels: int) -> Tensor:
    """A condition image (B, C', H, W) as pictures of `channels` channels: its first channels (the known pixels of
    [x * m, m]), a grayscale one repeated to colour."""
    return image[:, :1].expand(-1, channels, -1, -1) if image.shape[1] == 1 else image[:, :channels]


# --- cascades ----------------------------------------------------------------------------------------------------
CASCADE_FILE = "cascade.toml"


def read_cascade(folder) -> tuple[list, float | None]:
    """A cascade folder's stages and sampling augmentation level from FOLDER/cascade.toml:

        stages = ["base", "sr"]   # run folders, relative to FOLDER (or absolute): a base model, then super-resolution runs
        aug_level = 0.1           # optional: the level every super-resolution stage's input gets (else each run's own)

    Raises FileNotFoundError or ValueError naming what is wrong."""
    path = Path(folder) / CASCADE_FILE
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    unknown = sorted(set(spec) - {"stages", "aug_level"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; it takes stages = [\"base\", \"sr\"] and aug_level = 0.1")
    stages = spec.get("stages")
    if not isinstance(stages, list) or len(stages) < 2 or not all(isinstance(s, str) for s in stages):
        raise ValueError(f"{path}: stages must list two or more run folders, e.g. stages = [\"base\", \"sr\"]")
    level = spec.get("aug_level")
    if level is not None and (isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 <= level <= 1):
        raise ValueError(f"{path}: aug_level must be a number in [0, 1], got {level!r}")
    return [Path(folder) / s for s in stages], (None if level is None else float(level))


def check_cascade(configs: list) -> None:
    """Each stage after the first must be a super-resolution run whose input is the previous stage's output."""
    for k in range(1, len(configs)):
        prev, cfg = configs[k - 1], configs[k]
        if cfg.task.kind != "superres":
            raise ValueError(f"cascade stage {k + 1} must be a super-resolution run (task.kind = 'superres'), got "
                             f"'{cfg.task.kind}'")
        if prev.data.image_size * cfg.task.factor != cfg.data.image_size or prev.data.channels != cfg.data.channels:
            raise ValueError(f"cascade stage {k + 1} turns {cfg.data.channels}-channel {cfg.data.image_size // cfg.task.factor}"
                             f"x{cfg.data.image_size // cfg.task.factor} images into {cfg.data.image_size}x{cfg.data.image_size}, "
                             f"but stage {k} makes {prev.data.channels}-channel {prev.data.image_size}x{prev.data.image_size} ones")
