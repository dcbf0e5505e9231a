"""DDIM (Song, Meng & Ermon 2021): the non-Markovian sampler with stochasticity eta.

From x_t to x_s (s < t) with the predicted (x0_hat, eps_hat), eq. 12:
    x_s = sqrt(alphabar_s) x0_hat + sqrt(1 - alphabar_s - sigma^2) eps_hat + sigma z,
    sigma = eta * sqrt(beta-tilde_{t->s})                                   (eq. 16)
eta = 0 is the deterministic DDIM (an ODE solver); eta = 1 is DDPM ancestral sampling with
beta-tilde variance. Works on any sub-sequence of times (sec. 4.2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..schedule import posterior
from .base import OPTIONS, Callback, GridStep, Project, gaussian_like, walk


def sample(
    denoiser,
    x_T: Tensor,
    grid: Tensor,
    *,
    eta: float = 0.0,  # 0: deterministic DDIM; 1: DDPM-like ancestral noise (Song et al. 2021, eq. 16)
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    project: Project | None = None,
) -> Tensor:
    """Integrate from x_T over a grid of times ending at 0 (`base.walk`); returns x_0."""
    eta = OPTIONS["eta"].check("eta", eta)

    def update(step: GridStep, x: Tensor, history: list):
        pred = denoiser(x, step.t)
        noise_std = eta * posterior(step.alpha_t, step.sigma_t, step.alpha_s, step.sigma_s)[2] ** 0.5  # eq. 16
        x_next = step.alpha_s * pred.x0 + max(step.sigma_s**2 - noise_std**2, 0.0) ** 0.5 * pred.eps  # eq. 12
        if noise_std > 0:
            x_next = x_next + noise_std * gaussian_like(x, generator)
        return x_next, pred

    return walk(denoiser.schedule, x_T, grid, update, generator=generator, callback=callback, project=project)
