"""Ancestral sampling of DDPM (Ho et al. 2020, Algorithm 2).

Each step draws x_s ~ p(x_s | x_t) = N(mu~(x_t, x0_hat), sigma^2 I): the posterior
q(x_s | x_t, x_0) of eq. 6-7 with x_0 replaced by the denoiser's prediction, which for an
eps-network is mu_theta = (x_t - beta_t / sqrt(1 - alphabar_t) eps_theta) / sqrt(alpha_t)
(eq. 11; lecture 000 "Reverse Process"). On a sub-grid the same formulas hold with the
strided beta_{t|s} = 1 - alphabar_t / alphabar_s (Nichol & Dhariwal 2021, sec. 4). A denoiser
with a learned variance sets sigma^2 itself (Nichol & Dhariwal 2021, eq. 15), overriding `variance`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..schedule import interpolated_log_variance, posterior, transition_variance
from .base import OPTIONS, Callback, GridStep, Project, gaussian_like, walk


def sample(
    denoiser,
    x_T: Tensor,
    grid: Tensor,
    *,
    variance: Literal["beta_tilde", "beta"] = "beta_tilde",  # sigma_t^2: posterior beta-tilde_t (lower bound) or beta_t (upper); Ho et al. sec. 3.2
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    project: Project | None = None,
) -> Tensor:
    """Run Algorithm 2 from x_T over a grid of times ending at 0 (`base.walk`); returns x_0.

    No noise is added on the last step (z = 0 when t = 1 in Algorithm 2).
    """
    variance = OPTIONS["variance"].check("variance", variance)

    def update(step: GridStep, x: Tensor, history: list):
        pred = denoiser(x, step.t)
        a_t, s_t, a_s, s_s = step.alpha_t, step.sigma_t, step.alpha_s, step.sigma_s
        c_x0, c_xt, beta_tilde = posterior(a_t, s_t, a_s, s_s)
        mean = c_x0 * pred.x0 + c_xt * x  # mu~_t(x_t, x0_hat), eq. 7
        if step.s > 0 and pred.variance_mix is not None:
            log_var = interpolated_log_variance(pred.variance_mix, a_t, s_t, a_s, s_s)
            return mean + (0.5 * log_var).exp() * gaussian_like(x, generator), pred
        if step.s > 0:
            var = beta_tilde if variance == "beta_tilde" else transition_variance(a_t, s_t, a_s, s_s)
            return mean + var**0.5 * gaussian_like(x, generator), pred
        return mean, pred

    return walk(denoiser.schedule, x_T, grid, update, generator=generator, callback=callback, project=project)
