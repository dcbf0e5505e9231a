"""Labelled images for segmentation from diffusion features: pixels with exact class labels, and a loader for a
folder of images with PNG masks.

Baranchuk et al. 2022 ("Label-Efficient Semantic Segmentation with Diffusion Models", ICLR 2022) train a small pixel
classifier on a diffusion model's intermediate features from a handful of labelled images. This module gives those
images and their per-pixel labels as a `SegmentationSet`, from one of four sources (`labelled_set`):

    mnist, digits  the digit sets (data.images.load_dataset), each stroke pixel (ink > 0.5, i.e. x > 0 in [-1, 1])
                   labelled 1 + its digit: 11 classes (DIGIT_CLASSES), so the classifier must recognise the digit,
                   not threshold the ink
    shapes         the captioned scenes (captions.py), each pixel more than half covered by an object labelled with
                   its shape (SHAPE_CLASSES) or its colour and shape (COLOUR_SHAPE_CLASSES), read off the renderer's
                   exact coverage
    folder         the user's PATH/images/NAME.(png|jpg|jpeg|bmp|webp) with PATH/masks/NAME.png, a palette or
                   grayscale PNG whose values are class indices (load_folder)

The generated sources' labels are exact by construction. IGNORE (255) marks pixels that count for nothing: training
and scoring skip them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .captions import COLOURS, DIGIT_WORDS, SHAPES, Scene, SceneObject, coverage, random_scene, render
from .images import DataConfig, Geometry, fit_square, load_dataset, load_image, open_image

IGNORE = 255  # the label of pixels that count for nothing (training and scoring skip them)
DIGIT_CLASSES = ["background", *DIGIT_WORDS]  # mnist, digits: 0 = background, 1 + d = the strokes of digit d
SHAPE_CLASSES = ["background", *SHAPES]  # shapes: 0 = background, 1 + SHAPES.index(shape)
COLOUR_SHAPE_CLASSES = ["background", *(f"{c} {s}" for c in COLOURS for s in SHAPES)]  # shapes with colour=True
SOURCES = ("mnist", "digits", "shapes", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # the files load_folder reads from PATH/images
CLASSES_FILE = "classes.txt"  # PATH/classes.txt: one class name per line (optional)
_MAX_LISTED = 10  # file names listed in an error before "... and N more"


# --- the labelled set ---------------------------------------------------------------------------------------------

@dataclass
class SegmentationSet:
    """Images with one class label per pixel.

        images       (N, C, S, S) float32 in [-1, 1]
        masks        (N, S, S) int64, each value a class index in [0, num_classes) or IGNORE
        class_names  one name per class, at most 255 of them, unique (the generated sources' class 0: "background")

    Construction raises ValueError for a wrong type, dtype or shape, images and masks that disagree in N or side, or a
    mask value outside the classes (naming the value, how many pixels hold it and the fix).
    """

    images: Tensor
    masks: Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        _check_class_names(self.class_names)
        self.class_names = list(self.class_names)
        _check_images(self.images)
        _check_masks(self.masks, self.images, len(self.class_names))

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        """The number of classes (IGNORE is none of them)."""
        return len(self.class_names)

    def subset(self, idx: Tensor) -> SegmentationSet:
        """The examples at idx, in that order, as a new set with the same class names. idx: a 1-D integer tensor of
        indices in [0, N), or a bool tensor (N,). Raises ValueError for another idx."""
        _check_index(idx, len(self))
        return SegmentationSet(self.images[idx], self.masks[idx], list(self.class_names))


def _check_class_names(names) -> None:
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"class_names must be a list of non-empty strings, one per class, got {names!r}")
    if not 1 <= len(names) <= IGNORE:
        raise ValueError(f"a segmentation set has 1..{IGNORE} classes (label {IGNORE} is IGNORE), got {len(names)} "
                         "class names")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"class names must be unique; {', '.join(map(repr, repeated))} appear more than once")


def _check_images(images) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be a tensor (N, C, S, S) of square images, got "
                         f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    if images.dtype != torch.float32:
        raise ValueError(f"images must be float32, got {images.dtype}; convert with images.float()")
    if images.numel() and not torch.isfinite(images).all():
        raise ValueError("images hold NaN or inf values")
    if images.numel() and (images.min() < -1 - 1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(f"images must lie in [-1, 1], got values in [{images.min().item():.3g}, "
                         f"{images.max().item():.3g}]; rescale them (x / 127.5 - 1 for 0..255, x * 2 - 1 for [0, 1])")


def _check_masks(masks, images: Tensor, num_classes: int) -> None:
    """Masks (N, S, S) int64 matching images (N, C, S, S), every value in [0, num_classes) or IGNORE."""
    if not isinstance(masks, Tensor) or masks.ndim != 3:
        raise ValueError(f"masks must be a tensor (N, S, S) of class indices, got "
                         f"{tuple(getattr(masks, 'shape', ())) or type(masks).__name__}")
    if masks.dtype != torch.int64:
        raise ValueError(f"masks must be int64 class indices, got {masks.dtype}; convert with masks.long()")
    if masks.shape[0] != images.shape[0] or masks.shape[1:] != images.shape[2:]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}: give one mask "
                         "(S, S) per image (C, S, S), of the image's side")
    bad = (masks < 0) | ((masks >= num_classes) & (masks != IGNORE))
    if bad.any():
        values, counts = torch.unique(masks[bad], return_counts=True)
        found = ", ".join(f"label {v} ({c} pixels)" for v, c in zip(values[:5].tolist(), counts[:5].tolist()))
        raise ValueError(f"masks hold {found}{' ...' if len(values) > 5 else ''} outside the {num_classes} classes: "
                         f"labels are 0..{num_classes - 1} or {IGNORE} (IGNORE); name more classes, or set those "
                         f"pixels to {IGNORE}")


def _check_index(idx, n: int) -> None:
    if not isinstance(idx, Tensor) or idx.ndim != 1 or idx.dtype.is_floating_point or idx.is_complex():
        raise ValueError(f"subset takes a 1-D tensor of integer indices (or a bool tensor (N,)), got "
                         f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
    if idx.dtype == torch.bool:
        if len(idx) != n:
            raise ValueError(f"a bool index must have one entry per example ({n}), got {len(idx)}")
    elif len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"indices must lie in [0, {n}) for a set of {n} examples, got {idx.min().item()}.."
                         f"{idx.max().item()}")


# --- the digit sets -----------------------------------------------------------------------------------------------

def digit_masks(images: Tensor, labels: Tensor) -> Tensor:
    """Per-pixel labels of digit images: 0 (background) where the ink is at most 0.5 on a [0, 1] scale, 1 + the
    image's digit where it is more (x > 0 in [-1, 1]): 11 classes, DIGIT_CLASSES.

    images: (N, 1, S, S) float in [-1, 1] (the datasets' convention); labels: (N,) integer digits 0..9.
    Returns (N, S, S) int64. Raises ValueError for another shape, dtype or value range.
    """
    _check_digits(images, labels)
    ink = images[:, 0] > 0  # (N, S, S): more than half inked
    return torch.where(ink, 1 + labels.to(torch.int64).view(-1, 1, 1), 0)


def _check_digits(images, labels) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"digit_masks takes grayscale images (N, 1, S, S), got "
                         f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}; pass images[:, :1] of "
                         "an RGB copy")
    if not images.dtype.is_floating_point or not torch.isfinite(images).all():
        raise ValueError(f"digit_masks takes finite float images in [-1, 1], got {images.dtype}; use x / 127.5 - 1 "
                         "for uint8 pixels")
    if images.numel() and (images.min() < -1 - 1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(f"digit_masks takes images in [-1, 1], got values in [{images.min().item():.3g}, "
                         f"{images.max().item():.3g}]; use x / 127.5 - 1 for 0..255, x * 2 - 1 for [0, 1]")
    if (not isinstance(labels, Tensor) or labels.shape != images.shape[:1] or labels.dtype == torch.bool
            or labels.dtype.is_floating_point or labels.is_complex()):
        raise ValueError(f"digit_masks takes one integer label per image, shape ({images.shape[0]},), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"digit labels are 0..9, got values in {labels.min().item()}..{labels.max().item()}")


# --- the shapes ---------------------------------------------------------------------------------------------------

def shapes_scenes(n: int, size: int = 32, seed: int = 0) -> tuple[Tensor, list[Scene]]:
    """The first n scenes that captions.shapes_data(n, size, seed) draws, as (images uint8 (n, 3, size, size),
    scenes): the same images bit for bit, with the scenes that say what each shows. Raises ValueError for n < 1 or
    size < 16."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the number of scenes must be an integer >= 1, got {n!r}")
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]  # the draws of shapes_data, in its order
    return torch.from_numpy(np.stack([render(s, size) for s in scenes])), scenes


def shape_masks(scenes: list[Scene], size: int, colour: bool = False) -> tuple[Tensor, list[str]]:
    """Per-pixel labels of rendered scenes, from the renderer's exact coverage (captions.coverage): a pixel more than
    half covered by an object gets that object's class, any other pixel 0 (background); where two objects each cover
    more than half of a pixel (they never do in the generated scenes), the larger coverage wins.

    Classes: SHAPE_CLASSES ["background", "circle", "square", "triangle"], or with colour=True COLOUR_SHAPE_CLASSES,
    one per (colour, shape) in the order of captions.COLOURS x captions.SHAPES ("background", "red circle", "red
    square", ...). Returns (masks (N, size, size) int64, class names). Raises ValueError for an empty list, something
    other than a Scene, an object outside the grammar or a size below 16.
    """
    if not isinstance(scenes, (list, tuple)) or not scenes or not all(isinstance(s, Scene) for s in scenes):
        raise ValueError("shape_masks takes a non-empty list of captions.Scene (e.g. the scenes of shapes_scenes), got "
                         f"{type(scenes).__name__} of {len(scenes) if isinstance(scenes, (list, tuple)) else '?'}")
    if not isinstance(colour, bool):
        raise ValueError(f"colour must be True (classes by colour and shape) or False (by shape), got {colour!r}")
    masks = np.stack([_scene_mask(s, size, colour) for s in scenes])
    return torch.from_numpy(masks), list(COLOUR_SHAPE_CLASSES if colour else SHAPE_CLASSES)


def _scene_mask(scene: Scene, size: int, colour: bool) -> np.ndarray:
    """One scene's labels (size, size) int64."""
    covered = np.stack([coverage(o, size) for o in scene.objects])  # (K, S, S): each object's covered fraction
    classes = np.array([_shape_class(o, colour) for o in scene.objects])  # (K,)
    return np.where(covered.max(0) > 0.5, classes[covered.argmax(0)], 0).astype(np.int64)


def _shape_class(obj: SceneObject, colour: bool) -> int:
    """An object's class index in COLOUR_SHAPE_CLASSES (colour) or SHAPE_CLASSES."""
    shape = SHAPES.index(obj.shape)
    return 1 + (COLOURS.index(obj.colour) * len(SHAPES) + shape if colour else shape)


# --- the pool of a run --------------------------------------------------------------------------------------------

def labelled_set(source: str, n: int, image_size: int, channels: int, path: str = "", colour: bool = False,
                 seed: int = 0) -> SegmentationSet:
    """The labelled pool of a segmentation run.

        "mnist"   the bundled 5,000 MNIST digits, "digits" sklearn's 8x8 digits: loaded and resized exactly as
                  data.images.load_dataset does, the first n in `interleaved` order (one of each digit in turn, so a
                  small pool holds every digit; n <= 0: all), labelled by digit_masks from the resized pixels
                  (grayscale replicated to RGB for channels = 3)
        "shapes"  the first n scenes of shapes_scenes(n, image_size, seed) (channels = 3, n >= 1, image_size >= 16),
                  labelled by shape_masks(scenes, image_size, colour)
        "folder"  load_folder(path, channels, image_size), the first n in name order (n <= 0: all)

    `colour` is for "shapes" and `path` for "folder" only; `seed` is read by "shapes" only. Raises ValueError naming
    the setting and the fix for another source ("photos" has no labels: use a folder with masks), channels other than
    1 or 3, a setting the source does not read, and the sources' own checks.
    """
    _check_request(source, n, image_size, channels, path, colour)
    if source == "folder":
        return _first(load_folder(path, channels, image_size), n)
    if source == "shapes":
        images, scenes = shapes_scenes(n, image_size, seed)
        masks, names = shape_masks(scenes, image_size, colour)
        return SegmentationSet(images.float() / 127.5 - 1.0, masks, names)
    data = load_dataset(DataConfig(source=source, image_size=image_size, channels=channels))
    order = interleaved(data.labels)
    order = order if n <= 0 else order[:n]
    x = data.images[order].float() / 127.5 - 1.0  # (n, C, S, S), as ImageDataset.batch gives them
    return SegmentationSet(x, digit_masks(x[:, :1], data.labels[order]), list(DIGIT_CLASSES))


def interleaved(labels: Tensor) -> Tensor:
    """The indices (N,) int64 of labels (N,) taken class by class in turn: the first example of each class (classes
    ascending), then the second of each, and so on, each class in its dataset order; a class that runs out drops out.
    So any first n hold the classes as evenly as they can (the bundled MNIST is sorted by digit: its first 500 are
    all zeros). Raises ValueError for labels that are not a 1-D integer tensor."""
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype.is_floating_point or labels.is_complex():
        raise ValueError(f"interleaved takes class labels (N,) as an integer tensor, got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    labels = labels.numpy()
    rank = np.empty(len(labels), dtype=np.int64)  # (N,): how many of its class come before each example
    for c in np.unique(labels):
        mine = np.flatnonzero(labels == c)
        rank[mine] = np.arange(len(mine))
    return torch.from_numpy(np.lexsort((labels, rank)))  # by rank, then by class


def _first(data: SegmentationSet, n: int) -> SegmentationSet:
    return data if n <= 0 or n >= len(data) else data.subset(torch.arange(n))


def _check_request(source: str, n: int, image_size: int, channels: int, path: str, colour: bool) -> None:
    """labelled_set's arguments, checked before anything loads."""
    if source == "photos":
        raise ValueError('source "photos" has no per-pixel labels; segment your own photos with source "folder": '
                         "PATH/images/NAME.png and PATH/masks/NAME.png (class indices), see load_folder")
    if source not in SOURCES:
        raise ValueError(f"the labelled source must be one of {', '.join(SOURCES)}, got {source!r}")
    for name, value in (("n", n), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if image_size < 4:
        raise ValueError(f"image_size must be at least 4 pixels, got {image_size}")
    if colour and source != "shapes":
        raise ValueError(f'colour=True names classes by colour and shape, which only source "shapes" has; got source '
                         f"{source!r}: leave colour False")
    if path and source != "folder":
        raise ValueError(f'path {path!r} is read by source "folder" only; got source {source!r}: leave path empty or '
                         'set source "folder"')
    if source == "folder" and not path:
        raise ValueError('source "folder" needs path: the folder holding images/ and masks/')
    if source == "shapes":
        if channels != 3:
            raise ValueError(f'source "shapes" draws coloured shapes: set channels = 3 (got {channels})')
        if n < 1:
            raise ValueError(f'source "shapes" generates its scenes: give n >= 1, how many (got {n})')
        if image_size < 16:
            raise ValueError(f'source "shapes" needs image_size >= 16 (a small shape then spans ~4 pixels), got '
                             f"{image_size}")


# --- a folder of images with masks --------------------------------------------------------------------------------

def load_folder(path: str | Path, channels: int, image_size: int) -> SegmentationSet:
    """A folder of images with PNG masks, in name order:

        PATH/images/NAME.(png|jpg|jpeg|bmp|webp)   read by data.images.load_image (scaled, shorter side, and
                                                   centre-cropped to image_size; converted to `channels`)
        PATH/masks/NAME.png                        the same stem: a palette PNG (mode "P": the palette indices are
                                                   the labels) or a single-channel integer PNG ("L", "I", "I;16",
                                                   "1": the values are the labels); 255 is IGNORE. Of its image's
                                                   original size, fitted as the image is, with nearest resampling
        PATH/classes.txt                           optional: one class name per line; without it the classes are
                                                   "class 0" .. "class K-1", K = the largest label + 1

    The resizes and colour conversions of the images are reported in one UserWarning. Raises FileNotFoundError for a
    missing folder, images/ or masks/; ValueError naming the files and the fix for an image without a mask or a mask
    without an image (up to 10 names each), no images, an unsupported file, an RGB mask, a mask of another size than
    its image, a label beyond classes.txt (or above 254 without it) or a malformed classes.txt.
    """
    root = Path(path).expanduser()
    pairs = _pair_files(root)
    names_file = root / CLASSES_FILE
    declared = _read_class_names(names_file) if names_file.is_file() else None
    images, masks, notes, largest = [], [], [], -1
    for image_path, mask_path in pairs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x, geometry = load_image(image_path, channels, image_size)  # (1, C, S, S)
        notes += [str(w.message) for w in caught]
        labels = read_mask(mask_path, geometry)
        _check_labels(labels, mask_path, declared, names_file)
        largest = max(largest, int(labels[labels != IGNORE].max(initial=-1)))
        images.append(x)
        masks.append(fit_labels(labels, image_size))
    if notes:
        warnings.warn(f"{root}: fitting its {len(pairs)} images to {channels} x {image_size} x {image_size} gave "
                      f"{len(notes)} note(s), e.g. {notes[0]}", UserWarning, stacklevel=2)
    class_names = declared if declared is not None else _default_names(largest, root)
    return SegmentationSet(torch.cat(images), torch.from_numpy(np.stack(masks)), class_names)


def _pair_files(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths of every stem in root/images and root/masks, sorted by stem; raises if any is unpaired."""
    if not root.exists():
        raise FileNotFoundError(f"the labelled folder {root} does not exist; give a folder holding images/ and masks/")
    if not root.is_dir():
        raise ValueError(f"{root} is a file; give the folder holding images/ and masks/")
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root} has no {sub}/ folder; a labelled folder holds images/NAME.png (or .jpg, "
                                    ".jpeg, .bmp, .webp) and masks/NAME.png with the same names")
    images = _files_by_stem(root / "images", IMAGE_SUFFIXES, "images (PNG, JPEG, BMP or WebP)")
    masks = _files_by_stem(root / "masks", (".png",), "masks (PNG: a lossy format would change the labels)")
    if not images:
        raise ValueError(f"{root / 'images'} holds no images; add images/NAME.png with masks/NAME.png")
    unmasked, orphans = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
    if unmasked:
        raise ValueError(f"{len(unmasked)} image(s) in {root / 'images'} have no mask: "
                         f"{_listed([images[s].name for s in unmasked])}; add masks/NAME.png for each, or move the "
                         "image out")
    if orphans:
        raise ValueError(f"{len(orphans)} mask(s) in {root / 'masks'} have no image: "
                         f"{_listed([masks[s].name for s in orphans])}; add images/NAME.png (or .jpg, ...) for each, "
                         "or move the mask out")
    return [(images[s], masks[s]) for s in sorted(images)]


def _files_by_stem(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """The non-hidden files of one folder by stem; raises for another kind of file or two files of one stem."""
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    other = [p.name for p in files if p.is_dir() or p.suffix.lower() not in suffixes]
    if other:
        raise ValueError(f"{folder} holds files other than {what}: {_listed(other)}; convert them or move them out")
    found: dict[str, Path] = {}
    for p in files:
        if p.stem in found:
            raise ValueError(f"{folder} holds {found[p.stem].name} and {p.name}: one file per name; remove one")
        found[p.stem] = p
    return found


def _listed(names: list[str]) -> str:
    more = len(names) - _MAX_LISTED
    return ", ".join(names[:_MAX_LISTED]) + (f" ... and {more} more" if more > 0 else "")


def _read_class_names(path: Path) -> list[str]:
    """classes.txt: one non-empty, unique name per line (trailing blank lines are ignored), at most 255 names."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line]
    if not lines or blank:
        raise ValueError(f"{path} must hold one class name per line (line k + 1 names class k); "
                         + ("it is empty" if not lines else f"line {blank[0]} is blank: name that class"))
    try:
        _check_class_names(lines)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return lines


def read_mask(path: str | Path, geometry: Geometry) -> np.ndarray:
    """The labels of one mask PNG at its own size, (H, W) int64, for the image `geometry` describes (load_image's).

    A palette PNG gives its palette indices, a single-channel PNG ("L", "I", "I;16", "1") its values. Raises
    ValueError for an RGB or other multi-channel mask (save it as a palette or grayscale PNG whose values are class
    indices), negative labels, or a size other than the image's original size (naming both files and sizes).
    """
    img = open_image(path, "mask")
    size = img.info.get("original_size", img.size)
    if size != geometry.size:
        raise ValueError(f"the mask {path} is {size[0]}x{size[1]} but its image {geometry.path} is "
                         f"{geometry.size[0]}x{geometry.size[1]}; a mask labels its image's pixels, at its size")
    if img.mode not in ("P", "L", "1") and not img.mode.startswith("I"):
        raise ValueError(f"the mask {path} is a {img.mode} image; save it as a palette or grayscale PNG whose values "
                         f"are class indices (0, 1, 2, ...; {IGNORE} = ignore), not colours")
    labels = np.asarray(img).astype(np.int64)  # (H, W): palette indices or values
    if labels.size and labels.min() < 0:
        raise ValueError(f"the mask {path} holds the negative label {labels.min()}; labels are class indices >= 0")
    return labels


def fit_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Labels (H, W) integer fitted as data.images.load_image fits an image of that size: scaled so the shorter side
    is `size`, then centre-cropped to size x size, but with nearest-neighbour resampling, so every label stays one of
    the originals. Returns (size, size) int64. Raises ValueError for another shape or a label outside int32."""
    if not isinstance(labels, np.ndarray) or labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"fit_labels takes an integer array (H, W), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {getattr(labels, 'shape', '')}")
    if labels.size and (labels.min() < -2**31 or labels.max() >= 2**31):
        raise ValueError("fit_labels takes labels within int32")
    img = Image.fromarray(labels.astype(np.int32))  # mode "I": resampled without a change of value
    return np.asarray(fit_square(img, size, nearest=True)).astype(np.int64)


def _check_labels(labels: np.ndarray, path: Path, declared: list[str] | None, names_file: Path) -> None:
    """A mask's labels (H, W) are class indices of classes.txt (when given) or at most 254, or IGNORE."""
    limit = len(declared) if declared is not None else IGNORE
    outside = np.unique(labels[(labels >= limit) & (labels != IGNORE)])
    if outside.size == 0:
        return
    if declared is not None:
        raise ValueError(f"the mask {path} holds label {outside[0]}, but {names_file} names {limit} classes "
                         f"(labels 0..{limit - 1}, {IGNORE} = ignore); add the class names to {names_file} or fix the "
                         "mask")
    raise ValueError(f"the mask {path} holds label {outside[0]}; labels are class indices 0..{IGNORE - 1} "
                     f"({IGNORE} = ignore)")


def _default_names(largest: int, root: Path) -> list[str]:
    """"class 0" .. "class K-1", K = the largest label (not IGNORE) in any mask + 1 (-1: none)."""
    if largest < 0:
        raise ValueError(f"every mask in {root / 'masks'} is all {IGNORE} (ignore); label some pixels with class "
                         "indices 0, 1, ...")
    return [f"class {k}" for k in range(largest + 1)]
