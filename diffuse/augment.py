"""Non-leaking augmentation for small datasets (Karras et al. 2022, "Elucidating the design space", appendix F.2;
the augmentation pipeline of Karras et al. 2020, "Training GANs with limited data").

Each training image is transformed with probability p per transform (x-flip, y-flip, a quarter turn, an integer
translation, an isotropic scaling), and the network is told what was done: the transform's parameters, `LABELS`
numbers that are all 0 exactly for the identity, go in as the condition key "augment" (embedded and added to the time
embedding). The model then learns p(x | augmentation), and at sampling the label is zero (the key's null), which is
the distribution of the un-augmented data: the augmentations do not "leak" into the samples, however often they are
applied. Drawn from a generator for the whole batch, so a run resumes exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LABELS = ("xflip", "yflip", "rot_sin", "rot_cos_minus_1", "translate_x", "translate_y", "log2_scale")
"""The augmentation label of an image, in this order: flips (0 or 1); the quarter turn k as sin(k pi / 2) and
cos(k pi / 2) - 1; the translation in pixels over the image side; log2 of the scale. All 0: the identity."""

MAX_TRANSLATE = 0.125  # integer shifts of at most this fraction of the side (EDM: translate_std 0.125, here uniform)
SCALE_STD = 0.2        # log2 scale ~ N(0, 0.2^2) (Karras et al. 2020, scale_std = 0.2)


def draw(n: int, size: int, p: float, generator: torch.Generator) -> Tensor:
    """Labels (n, len(LABELS)) float64 for n images of side `size`: each transform applied with probability p (one
    Bernoulli(p) per image and transform, in LABELS order), its parameter drawn as documented there. p in [0, 1]."""
    if not 0 <= p <= 1:
        raise ValueError(f"the augmentation probability must be in [0, 1], got {p}")
    on = torch.rand(n, 5, generator=generator, dtype=torch.float64) < p          # xflip, yflip, rotate, translate, scale
    quarter = torch.randint(1, 4, (n,), generator=generator).double()            # 1..3 quarter turns when rotating
    reach = max(1, int(MAX_TRANSLATE * size))
    shift = torch.randint(-reach, reach + 1, (n, 2), generator=generator).double()
    log2_scale = SCALE_STD * torch.randn(n, generator=generator, dtype=torch.float64)
    angle = quarter * on[:, 2] * math.pi / 2
    return torch.stack([on[:, 0].double(), on[:, 1].double(), torch.sin(angle).round(), torch.cos(angle).round() - 1,
                        shift[:, 0] * on[:, 3] / size, shift[:, 1] * on[:, 3] / size, log2_scale * on[:, 4]], dim=1)


def apply(x: Tensor, labels: Tensor) -> Tensor:
    """The images x (B, C, H, W), H = W, transformed as `labels` (B, len(LABELS)) say: flips and quarter turns exactly
    (permutations of pixels), then translation and scaling in one bilinear resampling with reflected borders. An image
    whose label is all 0 is returned unchanged, bit for bit."""
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"augmentation needs square images (B, C, H, H), got {tuple(x.shape)}")
    lab = labels.to(device=x.device, dtype=torch.float64)
    B = x.shape[0]
    out = torch.where(_rows(lab[:, 0] > 0), x.flip(-1), x)
    out = torch.where(_rows(lab[:, 1] > 0), out.flip(-2), out)
    k = torch.round(torch.atan2(lab[:, 2], lab[:, 3] + 1) / (math.pi / 2)).long() % 4  # quarter turns counter-clockwise
    for turns in (1, 2, 3):
        out = torch.where(_rows(k == turns), torch.rot90(out, turns, dims=(-2, -1)), out)
    moved = (lab[:, 4:7] != 0).any(1)
    if bool(moved.any()):
        scale = torch.exp2(lab[:, 6])
        theta = torch.zeros(B, 2, 3, dtype=torch.float64, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale                   # output pixel u reads input (u - shift) / scale
        theta[:, 0, 2] = -2 * lab[:, 4] / scale                       # a shift of s pixels is 2 s / size in [-1, 1]
        theta[:, 1, 2] = -2 * lab[:, 5] / scale
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        warped = F.grid_sample(out, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        out = torch.where(_rows(moved), warped, out)
    return out


def _rows(mask: Tensor) -> Tensor:
    return mask.view(-1, 1, 1, 1)
