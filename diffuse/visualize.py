"""Figures of images and processes: grids, strips, GIFs, videos and their contact sheets, loss curves (files a person
looks at), each written atomically (checkpoint.write_atomically)."""

from __future__ import annotations

import io
import math
from pathlib import Path
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .checkpoint import write_atomically
from .data.video import imageio_v3


def to_uint8(x: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1] float32, the range of `diffuse sample --out X.npy`."""
    return ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)


def grid(x: Tensor, nrow: int | None = None, pad: int | None = None) -> Image.Image:
    """Tile a batch (B, C, H, W) in [-1, 1] into one image, nrow images per row (default: square), with `pad` white
    pixels around and between them (default 2). One image is that image at its own size, unframed (pad default 0):
    grids are for several."""
    imgs = to_uint8(x)
    b, h, w, c = imgs.shape
    pad = (0 if b == 1 else 2) if pad is None else pad
    nrow = math.ceil(math.sqrt(b)) if nrow is None else nrow
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1 (or None for a square grid), got {nrow}")
    rows = math.ceil(b / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, col = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def font(size: int = 12):
    """Pillow's own font at `size` pixels (FreeType, Pillow >= 10.1), else its small bitmap font: no font file needed."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one size
        return ImageFont.load_default()


def caption(img: Image.Image, *, title: str | None = None, below: list[tuple[float, str]] = (),
            left: list[tuple[float, str]] = (), size: int = 12) -> Image.Image:
    """`img` on a white canvas with text around it: `title` centred above, `below` [(x, text)] centred at pixel column x
    under it (a text may hold several lines), `left` [(y, text)] right-aligned at pixel row y in a margin on its left. Grayscale images stay grayscale."""
    from PIL import ImageDraw

    f = font(size)
    line = size + 6
    width = lambda text: ImageDraw.Draw(Image.new("L", (1, 1))).textlength(text, font=f)
    margin = int(max((width(t) for _, t in left), default=-8)) + 8
    top = line if title else 0
    bottom = line * max((t.count("\n") + 1 for _, t in below), default=0)
    canvas = Image.new(img.mode, (img.width + margin, img.height + top + bottom), "white")
    canvas.paste(img, (margin, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((margin + img.width / 2, line / 2), title, fill="black", font=f, anchor="mm")
    for x, text in below:
        draw.multiline_text((margin + x, top + img.height + 3), text, fill="black", font=f, anchor="ma", align="center")
    for y, text in left:
        draw.text((margin - 4, top + y), text, fill="black", font=f, anchor="rm")
    return canvas


def cell_centres(count: int, size: int, pad: int, scale: int = 1) -> list[float]:
    """The pixel centres of `count` cells of `size` pixels along one side of a `grid` with padding `pad`, after scaling
    by `scale`: where a column's or a row's label goes."""
    return [(pad + k * (size + pad) + size / 2) * scale for k in range(count)]


def labelled_grid(x: Tensor, nrow: int, *, columns: list[str] = (), rows: list[str] = (), title: str | None = None,
                  scale: int = 1, size: int = 12) -> Image.Image:
    """`grid(x, nrow)` scaled `scale` times with a label under each column (`columns`, one per column, or none), one
    left of each row (`rows`, one per row, or none) and a `title`. ValueError when a list does not match the grid."""
    img = grid(x, nrow)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    b, _, h, w = x.shape
    n_rows, pad = math.ceil(b / nrow), (0 if b == 1 else 2)
    if columns and len(columns) != nrow or rows and len(rows) != n_rows:
        raise ValueError(f"a grid of {n_rows} rows of {nrow} takes {nrow} column and {n_rows} row labels, got "
                         f"{len(columns)} and {len(rows)}")
    return caption(img, title=title, size=size, below=list(zip(cell_centres(nrow, w, pad, scale), columns)),
                   left=list(zip(cell_centres(n_rows, h, pad, scale), rows)))


def image_bytes(img: Image.Image, path: str | Path, **params) -> bytes:
    """A PIL image encoded in the format of `path`'s suffix (.png, .gif, .jpg, ...), as bytes to write atomically."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: {Path(path).suffix or 'no suffix'} is not an image format Pillow writes; use .png")
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def save_image(img: Image.Image, path: str | Path, **params) -> Path:
    """Write a PIL image to `path` atomically (checkpoint.write_atomically: a failed write leaves the old file)."""
    write_atomically(path, image_bytes(img, path, **params))
    return Path(path)


def save_grid(x: Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """`grid(x, nrow)` scaled up `scale` times (nearest neighbour), written atomically to `path` (.png)."""
    img = grid(x, nrow)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return save_image(img, path)


def save_samples(x: Tensor, path: str | Path) -> Path:
    """What `diffuse sample` and `edit` write: FILE.npy, the array (N, C, H, W) in [0, 1], or FILE.png, the grid (one
    image: that image); atomically, so a failed write (a full disk) leaves an earlier file as it was."""
    path = Path(path)
    if path.suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, to_unit(x).numpy())
        write_atomically(path, buffer.getvalue())
        return path
    return save_grid(x, path)


def save_gif(frames: list[Tensor], path: str | Path, nrow: int | None = None, scale: int = 2,
             frame_ms: int = 60, hold_last_ms: int = 1500, captions: list[str] | None = None) -> Path:
    """An animated GIF of grids, one per frame (e.g. x_t along a sampling trajectory), written atomically; each frame
    shown frame_ms, the last hold_last_ms; `captions` (one per frame, e.g. "step 3 of 10, t = 0.70") above each.
    ValueError when the captions do not match the frames."""
    if captions is not None and len(captions) != len(frames):
        raise ValueError(f"{len(captions)} captions for {len(frames)} frames")
    imgs = [grid(f, nrow) for f in frames]
    imgs = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in imgs]
    if captions is not None:
        imgs = [caption(im, title=text) for im, text in zip(imgs, captions)]
    imgs = [im.convert("P") for im in imgs]
    durations = [frame_ms] * (len(imgs) - 1) + [hold_last_ms]
    return save_image(imgs[0], path, save_all=True, append_images=imgs[1:], duration=durations, loop=0)


def video_frames(x: Tensor) -> Tensor:
    """Videos (C, F, H, W) or (B, C, F, H, W) in [-1, 1] as frames (F, B, C, H, W); ValueError naming the layout when
    x is neither (frames-first (F, C, H, W) video: pass x.transpose(0, 1))."""
    if not isinstance(x, Tensor) or x.ndim not in (4, 5):
        raise ValueError(f"a video must be a tensor (C, F, H, W) or a batch (B, C, F, H, W), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    x = x[None] if x.ndim == 4 else x
    if x.shape[1] not in (1, 3):
        raise ValueError(f"a video (B, C, F, H, W) has 1 or 3 channels on axis 1, got shape {tuple(x.shape)}; for "
                         "frames first (F, C, H, W) pass x.transpose(0, 1)")
    return x.permute(2, 0, 1, 3, 4)


GIF_CLOCK = "diffuse frame_ms="
"""The comment of a GIF save_video writes: the duration of one frame, by which a reader counts merged frames."""


def save_video(x: Tensor, path: str | Path, fps: float = 8, scale: int = 1) -> Path:
    """Write a video (C, F, H, W) in [-1, 1], or a batch (B, C, F, H, W) tiled as a grid in every frame (`grid`), to
    `path` atomically: .gif (Pillow, lossless for grayscale, looping; each frame shown round(100 / fps) centiseconds,
    the unit of GIF) or .mp4 (H.264 through imageio's ffmpeg, the [video] extra; the frame needs an even width and
    height). `scale` enlarges the pixels (nearest neighbour). ValueError for another suffix, an odd MP4 size or fps <= 0;
    ImportError naming the extra for MP4 without imageio-ffmpeg."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"{path}: a video is written as .gif or .mp4, not {suffix or 'a file without a suffix'}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    frames = [grid(f) for f in video_frames(x)]
    if scale > 1:
        frames = [f.resize((f.width * scale, f.height * scale), Image.NEAREST) for f in frames]
    if suffix == ".gif":
        centiseconds = max(2, round(100 / fps))  # browsers show frames under 2 cs at 10 cs
        # Pillow stores a run of identical frames as one longer frame; the comment keeps the clock (data.video.read_video)
        return save_image(frames[0], path, save_all=True, append_images=frames[1:], duration=10 * centiseconds, loop=0,
                          comment=f"{GIF_CLOCK}{10 * centiseconds}".encode())
    write_atomically(path, mp4_bytes(np.stack([np.asarray(f.convert("RGB")) for f in frames]), fps, str(path)))
    return path


def mp4_bytes(frames: np.ndarray, fps: float, name: str = "video.mp4") -> bytes:
    """Frames uint8 (F, H, W, 3) encoded as an H.264 MP4 (yuv420p, high quality) by imageio's ffmpeg, as bytes."""
    iio = imageio_v3(f"writing {name}", ", or write a .gif")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"{name}: an MP4 (H.264, yuv420p) needs an even width and height, got {w}x{h}; write a .gif, or "
                         "pass scale=2")
    with tempfile.TemporaryDirectory() as folder:  # ffmpeg writes a file; its bytes are then written atomically
        out = Path(folder) / "video.mp4"
        iio.imwrite(out, frames, fps=fps, codec="libx264", quality=9, macro_block_size=2)
        return out.read_bytes()


def contact_sheet(x: Tensor, scale: int = 2) -> Image.Image:
    """Videos (C, F, H, W) or (B, C, F, H, W) in [-1, 1] as one image: a row per video, a column per frame, pixels
    enlarged `scale` times, and each column's frame index (0-based) written under it."""
    frames = video_frames(x)  # (F, B, C, H, W)
    n_frames, b = frames.shape[:2]
    pad = 2
    tiles = grid(frames.transpose(0, 1).reshape(-1, *frames.shape[2:]), nrow=n_frames, pad=pad)
    tiles = tiles.resize((tiles.width * scale, tiles.height * scale), Image.NEAREST)
    font = ImageFont.load_default()
    label_h = 14
    sheet = Image.new(tiles.mode, (tiles.width, tiles.height + label_h), 255)
    sheet.paste(tiles, (0, 0))
    draw = ImageDraw.Draw(sheet)
    w = frames.shape[-1]
    for j in range(n_frames):
        left, top, right, bottom = draw.textbbox((0, 0), str(j), font=font)
        centre = scale * (pad + j * (w + pad) + w / 2)
        draw.text((centre - (right + left) / 2, tiles.height + (label_h - bottom - top) / 2), str(j), fill=0, font=font)
    return sheet


def save_contact_sheet(x: Tensor, path: str | Path, scale: int = 2) -> Path:
    """`contact_sheet(x, scale)` written atomically to `path` (.png): the still beside every written video."""
    return save_image(contact_sheet(x, scale), path)


def plot_loss(steps: list[int], losses: list[float], path: str | Path, fid: list | None = None) -> None:
    """Loss curve (log scale) with a running mean, as a PNG written atomically; with `fid` [(step, FID), ...], the FID
    during training on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 5:
        k = max(len(losses) // 20, 2)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(loc="upper left")
    if fid:
        ax2 = ax.twinx()
        ax2.plot(*zip(*fid), "o-", color="tab:red", lw=1.2, ms=3, label="FID (EMA)")
        ax2.set_ylabel("FID during training", color="tab:red")
        ax2.legend(loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_atomically(path, buffer.getvalue())


def colour_labels(labels: Tensor, num_classes: int, channels: int = 3) -> Tensor:
    """Labels (B, H, W) as images (B, channels, H, W) in [-1, 1]: class 0 black, the others evenly spaced hues (gray
    levels for 1 channel)."""
    palette = label_palette(num_classes)  # (C, 3) in [0, 1]
    rgb = palette[labels.clamp(0, num_classes - 1)].permute(0, 3, 1, 2)
    rgb = rgb.mean(1, keepdim=True) if channels == 1 else rgb
    return rgb * 2 - 1


def label_palette(num_classes: int) -> Tensor:
    """(C, 3) float32 colours in [0, 1] for classes 0..C-1: black for 0 (background), then hues around the colour
    wheel at full saturation."""
    hues = np.arange(max(num_classes - 1, 1)) / max(num_classes - 1, 1)
    k = (np.array([5.0, 3.0, 1.0])[None] + hues[:, None] * 6) % 6
    rgb = 1 - np.clip(np.minimum(k, 4 - k), 0, 1)
    return torch.cat([torch.zeros(1, 3), torch.from_numpy(rgb).float()])[:num_classes]
