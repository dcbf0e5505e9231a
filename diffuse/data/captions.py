"""Captioned images made on the fly, and a detector that scores whether samples follow their prompts.

Text-to-image needs (image, caption) pairs; issue 15 trains a text-conditional latent diffusion model in the manner
of Rombach et al. 2022 (sec. 4.3.1: LDM conditioned on captions through cross-attention). Instead of a downloaded
captioned set, this module *generates* one from a small scene grammar, so every caption is exactly true of its
image, and the same rules read backwards give a detector: a sample is scored against its prompt by finding the
coloured shapes the generator would have drawn (in the spirit of GenEval, Ghosh et al. 2023, with the object
detector replaced by the generator's own rules).

The grammar (every caption the generator writes parses back to what it drew):

    prompt   := object [where]               "a large red circle on the left"
              | object RELATION object        "a small red circle above a large blue square"
              | NUMBER plural                 "three small blue squares" (NUMBER: two, three)
              | "a handwritten" DIGIT         "a handwritten seven" (the digit sets: mnist, digits)
    object   := ["a" | "an" | "one" | "the"] [SIZE] [COLOUR] SHAPE    SIZE and COLOUR in either order
    plural   := [SIZE] [COLOUR] SHAPE + "s"
    where    := ("on" | "at" | "in") "the" POSITION               "on the left", "at the top", "in the centre"
    RELATION := "above" | "below" | "left of" | "right of"        ("to the left of", "under", ... are synonyms)

    COLOUR: red, green, blue, yellow, white     SHAPE: circle, square, triangle     SIZE: small, large
    POSITION: left, right, top, bottom, centre  DIGIT: zero .. nine

Scenes are drawn on black: filled shapes of a palette colour at full brightness, drawn by PIL at 4x the image size
and box-filtered down, so a pixel's value is its covered fraction times the colour (exact antialiasing). The
detector inverts that: a pixel's brightest channel is its coverage, its colour divided by that is the palette
colour; connected components of at least half-covered pixels of one colour are objects; each object's shape is
the one whose drawing (by the generator's own renderer, at the size its area implies) best matches it.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from torch import Tensor

from .base import shape_of

# --- the grammar's words ------------------------------------------------------------------------------------------

# Saturated colours at full brightness (max channel 255), pairwise at least 1 apart as unit-brightness RGB vectors,
# so the detector tells them apart from any pixel at least half covered.
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
# an object's extent (circle diameter, square side, triangle base = height) as a fraction of the image side
EXTENTS = {"small": 0.24, "large": 0.40}
SIZES = tuple(EXTENTS)
# where a lone object's centre is put (x, y as fractions of the side, y down), up to JITTER off in each axis
ANCHORS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "centre": (0.5, 0.5)}
POSITIONS = tuple(ANCHORS)
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "centre": "in the centre"}
RELATIONS = ("above", "below", "left of", "right of")
NUMBERS = {"one": 1, "two": 2, "three": 3}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# words a user may write for a grammar word (and digits as numerals, for "a handwritten 7")
SYNONYMS = {"center": "centre", "middle": "centre", "big": "large", "over": "above", "under": "below",
            "beneath": "below", **{str(d): w for d, w in enumerate(DIGIT_WORDS)}}
_ARTICLES = ("a", "an", "one")
_FILLERS = ("on", "at", "in", "to", "the")  # words around a position or relation that carry no meaning here
_PLURALS = {s + "s": s for s in SHAPES}
VOCABULARY = tuple(sorted({*_ARTICLES, *NUMBERS, *SIZES, *COLOURS, *SHAPES, *_PLURALS, *POSITIONS, "above", "below",
                           "left", "right", "of", *_FILLERS, "handwritten", *DIGIT_WORDS}
                          | {w for w in SYNONYMS if not w.isdigit()}))

# --- how scenes are laid out (fractions of the image side) --------------------------------------------------------

_KINDS = {"single": 0.4, "relation": 0.3, "count": 0.3}  # how often random_scene draws each kind of scene
JITTER = 0.04  # a lone object's centre: up to this far from its anchor in x and y
_RELATION_ALONG = (0.25, 0.75)  # a relation's two centres along its axis (+-_RELATION_JITTER): they never overlap
_RELATION_JITTER = 0.02
_RELATION_ACROSS = 0.12  # ... and up to this far from the middle across it, so the relation's axis dominates
_COUNT_JITTER = 0.015  # counted objects (small) sit in distinct cells of a 3 x 3 grid, this far off the cell centre


@dataclass(frozen=True)
class SceneObject:
    """One filled shape: colour in COLOURS, shape in SHAPES, size in SIZES, centre (x, y) of its bounding box as
    fractions of the image side (y down)."""

    colour: str
    shape: str
    size: str
    centre: tuple[float, float]


@dataclass(frozen=True)
class Scene:
    """What one image shows: its objects and how the caption places them: `position` (one object, in POSITIONS),
    `relation` (two objects, in RELATIONS: objects[0] is `relation` objects[1]), or neither (objects that are all
    alike: "a small red circle", "three small blue squares")."""

    objects: tuple[SceneObject, ...]
    position: str | None = None
    relation: str | None = None


@dataclass(frozen=True)
class Phrase:
    """One noun phrase of a prompt: `count` objects of `shape`, with the colour and size it names (None: any)."""

    shape: str
    colour: str | None = None
    size: str | None = None
    count: int = 1


@dataclass(frozen=True)
class Target:
    """What a prompt asks for: its phrases (one, or two for a relation: objects[0] is `relation` objects[1]), a
    position for a lone object, or (the digit sets) a digit class 0..9 and no objects."""

    objects: tuple[Phrase, ...] = ()
    position: str | None = None
    relation: str | None = None
    digit: int | None = None


@dataclass(frozen=True)
class Detected:
    """An object the detector found: colour, shape and size as in the grammar, centre (x, y) of its bounding box and
    extent (as SceneObject's, but measured, continuous) as fractions of the image side, area as a fraction of the
    image."""

    colour: str
    shape: str
    size: str
    centre: tuple[float, float]
    extent: float
    area: float


# --- drawing ------------------------------------------------------------------------------------------------------

def random_scene(rng: np.random.Generator) -> Scene:
    """A random scene: one object at a position (40%), two of different colours in a relation (30%), or two or three
    alike small objects (30%). Deterministic in rng's state."""
    kind = list(_KINDS)[rng.choice(len(_KINDS), p=list(_KINDS.values()))]
    return {"single": _single_scene, "relation": _relation_scene, "count": _count_scene}[kind](rng)


def _single_scene(rng: np.random.Generator) -> Scene:
    """One object of any colour, shape and size near the anchor of a random position."""
    position = _pick(rng, POSITIONS)
    centre = np.array(ANCHORS[position]) + rng.uniform(-JITTER, JITTER, 2)
    obj = SceneObject(_pick(rng, COLOURS), _pick(rng, SHAPES), _pick(rng, SIZES), _point(centre))
    return Scene((obj,), position=position)


def _relation_scene(rng: np.random.Generator) -> Scene:
    """Two objects of different colours (any shapes and sizes), the first `relation` the second: 0.46..0.54 of the
    side apart along the relation's axis and at most 0.24 across it."""
    relation = _pick(rng, RELATIONS)
    axis = 1 if relation in ("above", "below") else 0  # the relation is read along y or along x
    along = _RELATION_ALONG if relation in ("above", "left of") else _RELATION_ALONG[::-1]
    colours = rng.choice(len(COLOURS), 2, replace=False)
    objects = []
    for k in range(2):
        centre = np.empty(2)
        centre[axis] = along[k] + rng.uniform(-_RELATION_JITTER, _RELATION_JITTER)
        centre[1 - axis] = 0.5 + rng.uniform(-_RELATION_ACROSS, _RELATION_ACROSS)
        objects.append(SceneObject(COLOURS[colours[k]], _pick(rng, SHAPES), _pick(rng, SIZES), _point(centre)))
    return Scene(tuple(objects), relation=relation)


def _count_scene(rng: np.random.Generator) -> Scene:
    """Two or three small objects of one colour and shape, in distinct cells of a 3 x 3 grid."""
    colour, shape = _pick(rng, COLOURS), _pick(rng, SHAPES)
    objects = []
    for cell in rng.choice(9, int(rng.integers(2, 4)), replace=False):
        centre = (np.array([cell % 3, cell // 3]) + 0.5) / 3 + rng.uniform(-_COUNT_JITTER, _COUNT_JITTER, 2)
        objects.append(SceneObject(colour, shape, "small", _point(centre)))
    return Scene(tuple(objects))


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene as uint8 RGB (3, size, size): filled shapes on black, drawn at 4x and box-filtered down (a pixel is
    its covered fraction times the colour). Raises ValueError for a size below 16 or an object outside the grammar."""
    _check_size(size)
    _check_scene(scene)
    big = Image.new("RGB", (4 * size, 4 * size))
    draw = ImageDraw.Draw(big)
    for obj in scene.objects:
        _draw(draw, obj.shape, obj.centre, EXTENTS[obj.size], 4 * size, PALETTE[obj.colour])
    small = big.resize((size, size), Image.Resampling.BOX)
    return np.ascontiguousarray(np.asarray(small).transpose(2, 0, 1))


def _draw(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], extent: float, side: int, fill) -> None:
    """Draw one filled shape whose bounding box is extent x extent (fractions) around centre on a side x side canvas;
    a triangle stands on its base with its apex up."""
    cx, cy, half = centre[0] * side, centre[1] * side, extent * side / 2
    box = [round(cx - half), round(cy - half), round(cx + half) - 1, round(cy + half) - 1]  # PIL's boxes are inclusive
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx - half, cy + half), (cx + half, cy + half), (cx, cy - half)], fill=fill)


def _coverage(shape: str, centre: tuple[float, float], extent: float, size: int) -> np.ndarray:
    """The fraction of each pixel (size, size) float64 in [0, 1] that one shape covers, drawn exactly as render does."""
    big = Image.new("L", (4 * size, 4 * size))
    _draw(ImageDraw.Draw(big), shape, centre, extent, 4 * size, 255)
    return np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float64) / 255.0


def coverage(obj: SceneObject, size: int = 32) -> np.ndarray:
    """The fraction (size, size) float64 in [0, 1] of each pixel that the object covers, drawn exactly as `render`
    draws it (where no other object touches a pixel, render's brightest channel there is exactly 255 x this). Raises
    ValueError for something other than a SceneObject, an object outside the grammar or a size below 16."""
    if not isinstance(obj, SceneObject):
        raise ValueError(f"coverage takes one SceneObject (an object of a Scene), got {type(obj).__name__}")
    _check_size(size)
    _check_scene(Scene((obj,)))
    return _coverage(obj.shape, obj.centre, EXTENTS[obj.size], size)


def shapes_data(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """n random scenes as (images uint8 (n, 3, size, size), captions): deterministic in seed. Raises ValueError for
    n < 1 or size < 16."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the number of scenes must be an integer >= 1, got {n!r}")
    _check_size(size)
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return np.stack([render(s, size) for s in scenes]), [caption(s) for s in scenes]


# --- captions and prompts -----------------------------------------------------------------------------------------

def caption(scene: Scene) -> str:
    """The scene in words, e.g. "a large red circle on the left", "a small green triangle left of a large yellow
    circle", "three small blue squares". Raises ValueError for a scene the grammar cannot say (see Scene)."""
    _check_scene(scene)
    objs = scene.objects
    if scene.relation is not None:
        return f"{_phrase(objs[0])} {scene.relation} {_phrase(objs[1])}"
    if scene.position is not None:
        return f"{_phrase(objs[0])} {WHERE[scene.position]}"
    if len(objs) == 1:
        return _phrase(objs[0])
    number = next(w for w, k in NUMBERS.items() if k == len(objs))
    return f"{number} {objs[0].size} {objs[0].colour} {objs[0].shape}s"


def _phrase(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape}"


def target_of(scene: Scene) -> Target:
    """What the scene's caption asks for (so parse_prompt(caption(scene)) == target_of(scene))."""
    _check_scene(scene)
    phrases = tuple(Phrase(o.shape, o.colour, o.size) for o in scene.objects)
    if scene.relation is None and scene.position is None:
        phrases = (Phrase(phrases[0].shape, phrases[0].colour, phrases[0].size, len(phrases)),)
    return Target(phrases, position=scene.position, relation=scene.relation)


def digit_caption(label: int) -> str:
    """A digit class 0..9 as a prompt: 7 -> "a handwritten seven". Raises ValueError for another label."""
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label <= 9:
        raise ValueError(f"a digit label must be an integer 0..9, got {label!r}")
    return f"a handwritten {DIGIT_WORDS[label]}"


def parse_prompt(text: str) -> Target:
    """What a prompt asks for (the grammar of the module docstring; case, punctuation and SYNONYMS are forgiven).

    Raises ValueError naming the first unknown word and listing VOCABULARY, or saying where a prompt of known words
    leaves the grammar ("a red", "two red circle", "a red circle above").
    """
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
    words = [SYNONYMS.get(w, w) for w in re.findall(r"[a-z0-9]+", text.lower())]
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise ValueError(f"unknown word {unknown[0]!r} in the prompt {text!r}; prompts use only these words: "
                         f"{', '.join(VOCABULARY)} (e.g. \"a large red circle on the left\", \"a red circle above a "
                         "blue square\", \"two green triangles\", \"a handwritten seven\")")
    if not words:
        raise ValueError(f"the prompt {text!r} has no words; describe a scene, e.g. \"a large red circle on the left\"")
    if "handwritten" in words:
        return _parse_digit(words, text)
    first, i = _parse_phrase(words, 0, text)
    while i < len(words) and words[i] in _FILLERS:
        i += 1
    if i == len(words):
        if i > 0 and words[i - 1] in _FILLERS:
            raise ValueError(f"the prompt {text!r} ends in {words[-1]!r}; name a position ({', '.join(POSITIONS)})")
        return Target((first,))
    word = words[i]
    relation = (word if word in ("above", "below") else
                f"{word} of" if word in ("left", "right") and words[i + 1:i + 2] == ["of"] else None)
    if relation is not None:
        i += 1 if word in ("above", "below") else 2
        if i == len(words):
            raise ValueError(f"the prompt {text!r} ends in {relation!r}; name the second object, e.g. \"... "
                             f"{relation} a blue square\"")
        second, i = _parse_phrase(words, i, text)
        if first.count != 1 or second.count != 1:
            raise ValueError(f"in {text!r} a relation ({relation!r}) takes one object on each side, not a number of "
                             "them")
        _check_end(words, i, text)
        return Target((first, second), relation=relation)
    if word in POSITIONS:
        if first.count != 1:
            raise ValueError(f"in {text!r} a position ({word!r}) places one object; a number of objects takes none")
        _check_end(words, i + 1, text)
        return Target((first,), position=word)
    raise ValueError(f"in {text!r}, {word!r} cannot follow the object; write a position ({', '.join(WHERE.values())}) "
                     f"or a relation ({', '.join(RELATIONS)}) and a second object")


def _parse_phrase(words: list[str], i: int, text: str) -> tuple[Phrase, int]:
    """One object or plural at words[i:] -> (its Phrase, the index after it)."""
    count = 1
    if words[i] in DIGIT_WORDS and words[i] not in NUMBERS:
        raise ValueError(f"in {text!r} the number {words[i]!r} is outside the grammar: a scene holds "
                         f"{', '.join(NUMBERS)} objects of a kind")
    if words[i] in _ARTICLES or words[i] == "the":
        i += 1
    elif words[i] in NUMBERS:
        count = NUMBERS[words[i]]
        i += 1
    attrs: dict[str, str] = {}
    while i < len(words) and (words[i] in SIZES or words[i] in COLOURS):
        kind = "size" if words[i] in SIZES else "colour"
        if kind in attrs:
            raise ValueError(f"in {text!r} one object has two {kind}s ({attrs[kind]!r}, {words[i]!r}); keep one")
        attrs[kind] = words[i]
        i += 1
    if i == len(words) or (words[i] not in SHAPES and words[i] not in _PLURALS):
        found = "the end" if i == len(words) else repr(words[i])
        raise ValueError(f"in {text!r} a shape ({', '.join(SHAPES)}) is missing where {found} stands; e.g. "
                         "\"a red circle\", \"two small blue squares\"")
    plural = words[i] in _PLURALS
    if plural != (count > 1):
        want = words[i] + "s" if count > 1 else _PLURALS[words[i]]
        raise ValueError(f"in {text!r} {words[i]!r} does not agree with its number; write {want!r}")
    return Phrase(_PLURALS.get(words[i], words[i]), attrs.get("colour"), attrs.get("size"), count), i + 1


def _parse_digit(words: list[str], text: str) -> Target:
    rest = words[1:] if words[0] in ("a", "an") else words
    if len(rest) != 2 or rest[0] != "handwritten" or rest[1] not in DIGIT_WORDS:
        raise ValueError(f"a digit prompt reads \"a handwritten DIGIT\" (DIGIT: {', '.join(DIGIT_WORDS)}), "
                         f"got {text!r}")
    return Target(digit=DIGIT_WORDS.index(rest[1]))


def _check_end(words: list[str], i: int, text: str) -> None:
    if i < len(words):
        raise ValueError(f"in {text!r} the words after the scene ({' '.join(words[i:])!r}) mean nothing here; "
                         "remove them")


# --- the detector -------------------------------------------------------------------------------------------------

# the share of a pixel an object must cover for the pixel to belong to it (below: edge pixels, added afterwards)
_CORE = 0.5
# a drawn shape's area over its extent squared (the area of its bounding box)
_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
# components smaller than this share of the smallest drawn object (a small triangle) are noise
_NOISE = 0.3
_SIZE_SPLIT = math.sqrt(EXTENTS["small"] * EXTENTS["large"])  # extents below it are "small"


def detect(image: np.ndarray | torch.Tensor) -> list[Detected]:
    """The objects in one image, sorted top to bottom, then left to right.

    image: uint8 RGB (3, S, S) in 0..255, or float (3, S, S) in [-1, 1] (numpy or torch; values beyond [-1, 1], a
    sampler's overshoot, are clipped). Each pixel's brightest channel is its coverage and its colour divided by that
    the nearest palette colour; 4-connected pixels of one colour covered at least half are one object (with the
    partly covered pixels around it), those under 30% of a small triangle's area are dropped as noise; the shape is
    the one whose drawing at the extent its area implies best matches the object (least L1 difference), the size
    the nearer of EXTENTS (split at their geometric mean). Raises ValueError for another shape, dtype or NaN.
    """
    rgb = _unit_rgb(image)  # (3, S, S) in [0, 1]
    S = rgb.shape[-1]
    coverage = rgb.max(0)  # (S, S): the covered fraction of each pixel
    unit = rgb / np.maximum(coverage, 1e-6)  # (3, S, S): the colour at full brightness
    palette = np.array(list(PALETTE.values()), dtype=np.float64) / 255.0  # (K, 3)
    nearest = ((unit[None] - palette[:, :, None, None]) ** 2).sum(1).argmin(0)  # (S, S) palette index
    min_area = _NOISE * _FILL["triangle"] * EXTENTS["small"] ** 2 * S * S
    found = []
    for k, colour in enumerate(COLOURS):
        mine = nearest == k
        labels, n = ndimage.label(mine & (coverage >= _CORE))
        for j in range(1, n + 1):
            core = labels == j
            # the core and its partly covered rim (pixels of this colour around it that are no other object's core)
            region = ndimage.binary_dilation(core, structure=np.ones((3, 3), bool)) & mine & ((labels == 0) | core)
            weight = np.where(region, coverage, 0.0)  # (S, S)
            area = weight.sum()
            if area < min_area:
                continue
            found.append(_describe(colour, weight, area, S))
    return sorted(found, key=lambda d: (d.centre[1], d.centre[0]))


def _describe(colour: str, weight: np.ndarray, area: float, S: int) -> Detected:
    """Fit each shape to one object's coverage weight (S, S) of total `area` pixels: its extent from the area, its
    bounding-box centre from the centroid (a triangle's centroid lies extent / 6 below its box's centre)."""
    ys, xs = np.mgrid[0:S, 0:S] + 0.5  # pixel centres
    cx, cy = (weight * xs).sum() / area / S, (weight * ys).sum() / area / S
    best = None
    for shape in SHAPES:
        extent = math.sqrt(area / _FILL[shape]) / S
        centre = (cx, cy - extent / 6 if shape == "triangle" else cy)
        error = np.abs(_coverage(shape, centre, extent, S) - weight).sum()
        if best is None or error < best[0]:
            best = (error, shape, centre, extent)
    _, shape, centre, extent = best
    size = "small" if extent < _SIZE_SPLIT else "large"
    return Detected(colour, shape, size, (float(centre[0]), float(centre[1])), float(extent), float(area / S**2))


def position_of(centre: tuple[float, float]) -> str:
    """The position word (POSITIONS) whose anchor is nearest a centre (x, y) in fractions of the side."""
    return min(POSITIONS, key=lambda p: (centre[0] - ANCHORS[p][0]) ** 2 + (centre[1] - ANCHORS[p][1]) ** 2)


def holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether centre a is `relation` (RELATIONS) centre b: b - a points along the relation's direction more than
    across it ("above": b lies lower, by more than it lies aside)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"above": dy > abs(dx), "below": -dy > abs(dx), "left of": dx > abs(dy), "right of": -dx > abs(dy)}[relation]


_CRITERIA = ("colour", "shape", "size", "count", "position", "all")


def prompt_scores(images: torch.Tensor | np.ndarray, prompts: list[str]) -> dict:
    """Score images (N, 3, S, S) in [-1, 1] (or uint8) against their prompts (N strings of the shape grammar).

    Criteria per image, each judged on its own:
        colour    the set of detected colours is the set the prompt names (contains it, if a phrase names none)
        shape     the same for shapes;  size: the same for sizes
        count     as many objects are detected as the prompt asks for
        position  an object of the asked colour and shape sits at the asked position (position_of), or two such
                  objects hold the asked relation (holds)
        all       exactly the asked objects, each of its phrase's colour, shape and size, placed as asked

    Returns {"per_image": {criterion: (N,) bool}, "asked": {criterion: (N,) bool}, "fraction": {criterion: float}}:
    a criterion a prompt does not ask about (no colour named, no position) counts as met in per_image, and fraction
    is the mean over the prompts that ask it (nan if none do). Raises ValueError for a prompt outside the grammar, a
    digit prompt (score those with the digit classifier, diffuse.nets.digits), or images and prompts that disagree.
    """
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings, one per image")
    if getattr(images, "ndim", None) != 4 or len(images) != len(prompts):
        raise ValueError(f"images must be (N, 3, S, S) with N = len(prompts) = {len(prompts)}, got "
                         f"{tuple(getattr(images, 'shape', ()))}")
    targets = [parse_prompt(p) for p in prompts]
    for p, t in zip(prompts, targets):
        if t.digit is not None:
            raise ValueError(f"{p!r} asks for a digit; score digit samples with the digit classifier "
                             "(diffuse.nets.digits), not the shape detector")
    scores = [_score(detect(x), t) for x, t in zip(images, targets)]
    per_image = {c: np.array([s[c] is not False for s in scores]) for c in _CRITERIA}
    asked = {c: np.array([s[c] is not None for s in scores]) for c in _CRITERIA}
    fraction = {c: float(per_image[c][asked[c]].mean()) if asked[c].any() else math.nan for c in _CRITERIA}
    return {"per_image": per_image, "asked": asked, "fraction": fraction}


def _score(found: list[Detected], target: Target) -> dict[str, bool | None]:
    """One image's criteria (prompt_scores): True, False, or None where the prompt does not ask."""
    phrases = target.objects
    slots = [p for p in phrases for _ in range(p.count)]  # one asked phrase per object
    place = target.position or target.relation
    return {
        "colour": _same_set({d.colour for d in found}, [p.colour for p in phrases]),
        "shape": _same_set({d.shape for d in found}, [p.shape for p in phrases]),
        "size": _same_set({d.size for d in found}, [p.size for p in phrases]),
        "count": len(found) == len(slots),
        "position": None if place is None else any(
            _placed(objs, target) for objs in itertools.permutations(found, len(phrases))
            if all(_is(d, p, size=False) for d, p in zip(objs, phrases))),
        "all": len(found) == len(slots) and any(
            _placed(objs, target) for objs in itertools.permutations(found)
            if all(_is(d, p) for d, p in zip(objs, slots))),
    }


def _same_set(found: set[str], asked: list[str | None]) -> bool | None:
    named = {a for a in asked if a is not None}
    if not named:
        return None
    return named <= found if None in asked else named == found


def _is(d: Detected, p: Phrase, size: bool = True) -> bool:
    return (d.shape == p.shape and p.colour in (None, d.colour)
            and (not size or p.size in (None, d.size)))


def _placed(objs: tuple[Detected, ...], target: Target) -> bool:
    """Whether objects matched to the target's phrases (in order) stand where it asks."""
    if target.position is not None:
        return position_of(objs[0].centre) == target.position
    if target.relation is not None:
        return holds(target.relation, objs[0].centre, objs[1].centre)
    return True


# --- checks -------------------------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[rng.integers(len(words))]


def _point(centre: np.ndarray) -> tuple[float, float]:
    return float(centre[0]), float(centre[1])


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError("scenes are drawn at 16 x 16 pixels or more (a small shape then spans ~4 pixels), got "
                         f"size {size!r}")


def _check_scene(scene: Scene) -> None:
    """Raise ValueError naming the field of a scene the grammar cannot draw or say."""
    if not isinstance(scene, Scene) or not scene.objects:
        raise ValueError(f"expected a Scene with at least one object, got {scene!r}")
    for obj in scene.objects:
        for value, allowed in ((obj.colour, COLOURS), (obj.shape, SHAPES), (obj.size, SIZES)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not in the grammar; choose one of {', '.join(allowed)}")
        if len(obj.centre) != 2 or not all(0.0 <= c <= 1.0 for c in obj.centre):
            raise ValueError(f"an object's centre is (x, y) in fractions of the side, in [0, 1]; got {obj.centre!r}")
    n = len(scene.objects)
    if scene.relation is not None:
        if scene.relation not in RELATIONS or n != 2 or scene.position is not None:
            raise ValueError(f"a relation is one of {', '.join(RELATIONS)} between exactly 2 objects and no position; "
                             f"got {scene.relation!r} with {n} object(s), position {scene.position!r}")
    elif scene.position is not None:
        if scene.position not in POSITIONS or n != 1:
            raise ValueError(f"a position is one of {', '.join(POSITIONS)} for exactly 1 object; got "
                             f"{scene.position!r} with {n} objects")
    else:
        first = scene.objects[0]
        if n > max(NUMBERS.values()) or any((o.colour, o.shape, o.size) != (first.colour, first.shape, first.size)
                                            for o in scene.objects):
            raise ValueError(f"a scene with neither position nor relation holds 1..{max(NUMBERS.values())} alike "
                             f"objects (same colour, shape and size); got {n}")


def _unit_rgb(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """One image as float64 (3, S, S) in [0, 1]: uint8 / 255, or a float image in [-1, 1] as (x + 1) / 2 (clipped)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.numpy() if image.dtype == torch.uint8 else image.double().numpy()
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[0] != 3 or image.shape[1] != image.shape[2]:
        raise ValueError(f"detect takes one RGB image (3, S, S), got {getattr(image, 'shape', type(image).__name__)}; "
                         "pass images[i] of a batch, channels first")
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"detect takes uint8 pixels (0..255) or floats in [-1, 1], got dtype {image.dtype}")
    if not np.isfinite(image).all():
        raise ValueError("the image holds NaN or inf values")
    return np.clip((image.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0)


class Captioned:
    """A captioned dataset (its `captions`, one per image) with each caption's tokens (text.py) under the condition key
    "text": the interface of data.ImageDataset. Tokenized once, by the model's own text encoder."""

    def __init__(self, base, encoder):
        self.base, self.tokens = base, encoder.tokenize(list(base.captions))
        self.num_classes, self.condition_keys, self.captions = base.num_classes, (*base.condition_keys, "text"), base.captions
        self.shape = shape_of(base)

    def __len__(self) -> int:
        return len(self.base)

    def batch(self, idx: Tensor) -> tuple[Tensor, dict]:
        x, cond = self.base.batch(idx)
        return x, {**cond, "text": self.tokens[idx]}
