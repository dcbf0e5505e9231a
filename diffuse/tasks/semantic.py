"""What a diffusion autoencoder does with an image (Preechakul et al. 2022; lecture 002, "Diffusion Autoencoders"):

    encode       z_sem = Enc(x_0), and x_T by running the deterministic DDIM upwards under z_sem (the stochastic
                 code: `generate.invert`; the paper encodes with T = 250)
    decode       x_0 = DDIM(x_T, z_sem), the deterministic sampler from x_T under z_sem (the paper renders with T = 20
                 or 100); a random x_T gives z_sem's stochastic variations (Fig. 3)
    manipulate   z' = z + s sqrt(d) w / |w| in z-normalised space, w a linear classifier's weights (sec. 4.2), rendered
                 with the same x_T, so only what z_sem holds changes
    interpolate  z_sem by lerp, x_T by slerp (sec. 4.1: x_T is near-Gaussian, so its norm is kept)

The denoiser's network is a nets.diffae.DiffusionAutoencoder (its `encode`); decoding and inversion run through
`generate`, so any process (VP, EDM, flow) and its checks apply.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..generate import generate, invert

AMOUNT_LIMIT = 10.0  # |amount| at most: a step of 10 sqrt(d) in normalised code space is far past any code the encoder makes


def lerp(a: Tensor, b: Tensor, alpha: Tensor) -> Tensor:
    """(1 - alpha) a + alpha b for each alpha (K,): a, b (...) -> (K, ...)."""
    alpha = alpha.to(a).view(-1, *[1] * a.ndim)
    return (1 - alpha) * a + alpha * b


def slerp(a: Tensor, b: Tensor, alpha: Tensor) -> Tensor:
    """Spherical linear interpolation (Shoemake 1985) for each alpha (K,): a, b (...) -> (K, ...),
        slerp = sin((1 - alpha) theta) / sin(theta) a + sin(alpha theta) / sin(theta) b,  cos(theta) = <a, b> / |a||b|,
    the interpolation of two Gaussian noises that keeps their norm (a lerp shrinks the midpoint to |a| / sqrt(2) for
    independent draws, off the shell where x_T lives). Nearly parallel a and b (theta < 1e-6) fall back to lerp."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = float((a64 @ b64) / (a64.norm() * b64.norm()).clamp_min(1e-300))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    if theta < 1e-6:
        return lerp(a, b, alpha)
    alpha = alpha.double().view(-1, *[1] * a.ndim)
    out = (torch.sin((1 - alpha) * theta) * a.double() + torch.sin(alpha * theta) * b.double()) / math.sin(theta)
    return out.to(a.dtype)


def edit_code(z: Tensor, direction: Tensor, amount: float, mean: Tensor, std: Tensor) -> Tensor:
    """z' = denorm(norm(z) + s sqrt(d) w / |w|), norm(z) = (z - mean) / std (Preechakul et al. 2022, sec. 4.2 and the
    reference's manipulate notebook): a step of s in units of the typical length sqrt(d) of a normalised code along
    the classifier's direction w (d,). z (B, d); amount s a finite number (the paper: 0.3). ValueError for a zero w or
    a non-finite s."""
    if not math.isfinite(amount):
        raise ValueError(f"the amount must be a finite number (e.g. 0.3, or -0.3 the other way), got {amount}")
    w = direction.to(z).flatten()
    if w.shape[0] != z.shape[1] or not float(w.norm()) > 0:
        raise ValueError(f"the direction must be a nonzero vector of the code's width {z.shape[1]}, got shape "
                         f"{tuple(direction.shape)} and norm {float(w.norm()):.3g}")
    step = amount * math.sqrt(z.shape[1]) * w / w.norm()
    return z + step * std.to(z)  # denorm(norm(z) + step) = z + step * std


def amounts(amount: float, n: int) -> list[float]:
    """The steps s of n manipulations along one direction: 0 .. amount evenly (the unedited code first, so a strip shows
    the path), or the amount alone for one image."""
    return [float(amount)] if n == 1 else torch.linspace(0, amount, n).tolist()


@torch.no_grad()
def encode(denoiser, x0: Tensor, *, steps: int | None = 250, refine: int = 0, device="cpu", **kw) -> tuple[Tensor, Tensor]:
    """(z_sem (B, d), x_T (B, C, H, W)) of images x0 (B, C, H, W) in [-1, 1]: the semantic encoder, then DDIM inversion
    under z_sem on the grid of `steps` (`generate.invert`; `kw`: its spacing, mixed_precision, callback)."""
    x0 = x0.to(device)
    z = denoiser.net.encode(x0)
    return z, invert(denoiser, x0, steps=steps, cond={"z_sem": z}, refine=refine, device=device, **kw)


@torch.no_grad()
def decode(denoiser, z: Tensor, x_T: Tensor | None = None, *, steps: int | None = 20, seed: int = 0, device="cpu",
           clip: bool = False, **kw) -> Tensor:
    """Images (B, C, H, W) from codes z (B, d) by deterministic DDIM (eta 0) from x_T (B, C, H, W), or from x_T ~ N(0, I)
    drawn from `seed` when None (z_sem's stochastic variations). Without clipping x_0 by default: the inversion
    (`encode`) does not clip, so the pair inverts each other. `kw`: generate's spacing, mixed_precision, callback."""
    shape = (denoiser.net.in_channels, denoiser.net.image_size, denoiser.net.image_size)
    start = None if x_T is None else (x_T.to(device), 1.0)
    return generate(denoiser, z.shape[0], shape, sampler="ddim", eta=0.0, steps=steps, cond={"z_sem": z.to(device)},
                    start=start, seed=seed, device=device, clip=clip, **kw)


def interpolation(z_a: Tensor, z_b: Tensor, x_a: Tensor, x_b: Tensor, frames: int) -> tuple[Tensor, Tensor]:
    """The codes of `frames` images from a to b: z_sem by lerp, x_T by slerp, alpha = 0, 1/(frames - 1), ..., 1
    (Preechakul et al. 2022, sec. 4.1). z_a, z_b (d,); x_a, x_b (C, H, W) -> (frames, d), (frames, C, H, W).
    ValueError for frames < 2."""
    if frames < 2:
        raise ValueError(f"an interpolation needs at least 2 frames (its two ends), got {frames}")
    alpha = torch.linspace(0, 1, frames, dtype=torch.float64)
    return lerp(z_a, z_b, alpha), slerp(x_a, x_b, alpha)
