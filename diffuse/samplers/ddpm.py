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
from .base import OPTIONS, Callback, Step, gaussian_like, grid_steps


def sample(
    denoiser,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    variance: Literal["beta_tilde", "beta"] = "beta_tilde",  # sigma_t^2: posterior beta-tilde_t (lower bound) or beta_t (upper); Ho et al. sec. 3.2
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Run Algorithm 2 from x_T over a decreasing grid of times ending at 0; returns x_0.

    No noise is added on the last step (z = 0 when t = 1 in Algorithm 2).
    """
    variance = OPTIONS["variance"].check("variance", variance)
    x = x_T
    n = len(timesteps) - 1
    for i, t, s, alpha_t, sigma_t, alpha_s, sigma_s in grid_steps(denoiser.schedule, timesteps):
        pred = denoiser(x, t)
        c_x0, c_xt, beta_tilde = posterior(alpha_t, sigma_t, alpha_s, sigma_s)
        mean = c_x0 * pred.x0 + c_xt * x  # mu~_t(x_t, x0_hat), eq. 7
        if s > 0 and pred.v_interp is not None:
            log_var = interpolated_log_variance(pred.v_interp, alpha_t, sigma_t, alpha_s, sigma_s)
            x_next = mean + (0.5 * log_var).exp() * gaussian_like(x, generator)
        elif s > 0:
            var = beta_tilde if variance == "beta_tilde" else transition_variance(alpha_t, sigma_t, alpha_s, sigma_s)
            x_next = mean + var**0.5 * gaussian_like(x, generator)
        else:
            x_next = mean
        if callback is not None:
            callback(Step(i, n, t, s, x, pred.x0, x_next))
        x = x_next
    return x
