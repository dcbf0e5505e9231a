"""A segmentation run's answer as files and figures, made one way for `diffuse segment` and the web page's Segment tab:

    the mask      the label map as a palette PNG (mode "P") at the model's size: each pixel's value is its class
                  index, coloured by visualize.label_palette (class 0 black), so PIL and
                  data.segmentation.read_mask read back exactly the labels
    the overlay   a figure of three panels: the image; the image with its labels' colours blended over it (OVERLAY_ALPHA)
                  and a legend of the classes found; the uncertainty (the ensemble's Jensen-Shannon divergence, in nats)
                  with a colorbar
    the shares    each class found, its share of the pixels and the mean uncertainty on them

and which runs can segment (`check_segmenter`: any other kind is refused, naming what to do with it instead).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image
from torch import Tensor

from ..checkpoint import write_atomically
from ..runs import Run
from ..visualize import label_palette, save_image

OVERLAY_ALPHA = 0.5  # the labels' colours over the image: half each
PANEL_INCHES = 3.0   # the side of each of the overlay's three panels
DPI = 100            # the overlay's pixels per inch: panels of about 300 pixels
SEGMENT_CONFIG = "configs/segment_digits.toml"  # the example config that trains a segmenter on a diffusion run
OTHER_KINDS = {  # model.kind -> what to do with such a run instead of segmenting with it
    "denoiser": "draw or edit images with it (`diffuse sample`, `diffuse edit`), or train a segmenter on its features: "
                f"{SEGMENT_CONFIG} with segment.source = '{{run}}' (`diffuse train {SEGMENT_CONFIG} --set "
                "segment.source={run} --out runs/segment`)",
    "autoencoder": "measure it with `diffuse eval {run}`, or train a segmenter on its latents: "
                   f"{SEGMENT_CONFIG} with segment.features = 'autoencoder' and segment.source = '{{run}}'",
    "classifier": "a noisy classifier guides sampling (`diffuse sample DIFFUSION_RUN --classifier {run}`); train a "
                  f"segmenter with {SEGMENT_CONFIG}",
}


def check_segmenter(run: Run) -> None:
    """ValueError when `run` (runs.open_run) is not a segmentation run (model.kind = "segmenter"), naming what its kind
    is for and how to train a segmenter."""
    if run.kind == "segmenter":
        return
    fix = OTHER_KINDS.get(run.kind, f"train a segmenter with {SEGMENT_CONFIG}").format(run=run.path)
    what = "a diffusion run" if run.kind == "denoiser" else f"a {run.kind} run"
    raise ValueError(f"{run.path} holds {what} (model.kind = {run.kind!r}), not a segmentation run (model.kind = "
                     f"'segmenter'); {fix}")


@dataclass
class Segmented:
    """One image's segmentation by a run: `image` (C, S, S) in [-1, 1], `labels` (S, S) int64 class indices,
    `uncertainty` (S, S) float32 in nats, and the run's `class_names` (index -> name). ValueError when they disagree
    in size or a label is not a class."""

    image: Tensor
    labels: Tensor
    uncertainty: Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        side = tuple(self.image.shape[1:])
        if self.image.ndim != 3 or tuple(self.labels.shape) != side or tuple(self.uncertainty.shape) != side:
            raise ValueError(f"a segmentation needs an image (C, S, S) with labels and uncertainty (S, S), got "
                             f"{tuple(self.image.shape)}, {tuple(self.labels.shape)}, {tuple(self.uncertainty.shape)}")
        if self.labels.numel() and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.class_names):
            raise ValueError(f"labels must be class indices 0..{len(self.class_names) - 1} of {self.class_names}, got "
                             f"{int(self.labels.min())}..{int(self.labels.max())}")

    def shares(self) -> list[tuple[str, float, float]]:
        """(class name, share of the pixels in [0, 1], mean uncertainty on them in nats) of each class found, the
        largest share first (ties: the lower class first)."""
        counts = torch.bincount(self.labels.reshape(-1), minlength=len(self.class_names))  # (K,)
        summed = torch.zeros(len(self.class_names), dtype=torch.float64).index_add_(
            0, self.labels.reshape(-1), self.uncertainty.reshape(-1).double())
        found = sorted(torch.nonzero(counts).reshape(-1).tolist(), key=lambda k: (-int(counts[k]), k))
        return [(self.class_names[k], int(counts[k]) / self.labels.numel(), float(summed[k] / counts[k])) for k in found]

    def summary(self) -> str:
        """One line: the classes found with their share of the pixels, then the mean uncertainty, e.g.
        "background 81.0%, three 14.2%, eight 4.8%; mean uncertainty 0.0123 nats"."""
        shares = ", ".join(f"{name} {share:.1%}" for name, share, _ in self.shares())
        return f"{shares}; mean uncertainty {float(self.uncertainty.double().mean()):.4g} nats"

    def mask(self) -> Image.Image:
        """The labels as a palette image (mode "P", S x S): the values are the class indices, the palette
        label_palette's colours, so a PNG of it reads back exactly the labels."""
        img = Image.fromarray(self.labels.numpy().astype(np.uint8))  # mode "L": the indices
        colours = (label_palette(len(self.class_names)) * 255).round().to(torch.uint8)  # (K, 3)
        img.putpalette(colours.reshape(-1).tolist())  # now mode "P", the same values
        return img

    def write(self, mask: Path, overlay: Path) -> None:
        """Write the mask PNG and the overlay figure PNG, each atomically (checkpoint.write_atomically)."""
        save_image(self.mask(), mask)
        write_atomically(overlay, self.overlay_png())

    def overlay_png(self) -> bytes:
        """The overlay figure (three panels: image, labels over it with a legend, uncertainty with a colorbar) as PNG
        bytes."""
        buffer = io.BytesIO()
        overlay_figure(self).savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
        return buffer.getvalue()


def image_rgb(image: Tensor) -> np.ndarray:
    """An image (C, S, S) in [-1, 1] as (S, S, 3) float in [0, 1] (grayscale repeated)."""
    x = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x


def blended(seg: Segmented) -> np.ndarray:
    """The image (S, S, 3) in [0, 1] with each pixel's class colour blended over it at OVERLAY_ALPHA."""
    colours = label_palette(len(seg.class_names))[seg.labels].numpy()  # (S, S, 3)
    return (1 - OVERLAY_ALPHA) * image_rgb(seg.image) + OVERLAY_ALPHA * colours


def overlay_figure(seg: Segmented) -> Figure:
    """The three panels side by side, each PANEL_INCHES wide: the image, the labels blended over it with a legend
    below of the classes found (name and share), and the uncertainty map (magma, from 0 to its largest value) with a
    colorbar in nats. A matplotlib Figure of its own (no pyplot state)."""
    fig = Figure(figsize=(3 * PANEL_INCHES, PANEL_INCHES), dpi=DPI)
    image_ax, labels_ax, unc_ax = fig.subplots(1, 3)
    image_ax.imshow(image_rgb(seg.image), interpolation="nearest")
    image_ax.set_title("image")
    labels_ax.imshow(blended(seg), interpolation="nearest")
    labels_ax.set_title("labels")
    palette = label_palette(len(seg.class_names)).numpy()
    handles = [Patch(facecolor=palette[seg.class_names.index(name)], edgecolor="0.5", label=f"{name} {share:.1%}")
               for name, share, _ in seg.shares()]
    labels_ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.03), ncol=min(3, len(handles)),
                     fontsize="small", frameon=False, handlelength=1.0, columnspacing=1.0)
    u = seg.uncertainty.detach().float().cpu().numpy()
    shown = unc_ax.imshow(u, cmap="magma", vmin=0.0, vmax=max(float(u.max()), 1e-6), interpolation="nearest")
    unc_ax.set_title(f"uncertainty (mean {float(u.mean()):.3g} nats)")
    fig.colorbar(shown, ax=unc_ax, fraction=0.046, pad=0.04, label="JS divergence (nats)")
    for ax in (image_ax, labels_ax, unc_ax):
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def output_paths(images: list[str], out: Path) -> list[tuple[Path, Path]]:
    """Where `diffuse segment` writes each image's (mask, overlay): for --out MASK.png (one image) MASK.png and
    MASK_overlay.png; for --out FOLDER (no suffix, or an existing folder; any number of images)
    FOLDER/NAME_mask.png and FOLDER/NAME_mask_overlay.png for each image NAME.*. ValueError naming the fix for
    another suffix, a .png with several images, a .png that is a folder, or two images of one name."""
    if out.suffix.lower() == ".png" and not out.is_dir():
        if len(images) > 1:
            raise ValueError(f"--out {out} is one mask file, and {len(images)} images were given; give a folder for "
                             f"several, e.g. --out {out.with_suffix('')}, which gets NAME_mask.png and "
                             "NAME_mask_overlay.png for each image NAME")
        return [(out, out.with_name(out.stem + "_overlay.png"))]
    if out.suffix.lower() == ".png":
        raise ValueError(f"--out {out} is a folder; name the mask file in it, e.g. {out / 'mask.png'}, or give a folder "
                         "name without .png")
    if out.suffix and not out.is_dir():
        raise ValueError(f"--out must end in .png (the mask of one image: a palette PNG whose values are class indices) "
                         f"or name a folder (NAME_mask.png for each image), got {out}")
    stems = [Path(p).stem for p in images]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise ValueError(f"two --image files are named {twice[0]} (their masks would both be {twice[0]}_mask.png); "
                         "rename one, or segment them one at a time")
    return [(out / f"{s}_mask.png", out / f"{s}_mask_overlay.png") for s in stems]
