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
from .base import OPTIONS, Callback, GridStep, NonFiniteSample, Project, Step, gaussian_like, grid_steps, walk


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


def inversion_step(x_s: Tensor, eps: Tensor, step: GridStep) -> Tensor:
    """x_t from x_s (s < t) along DDIM's deterministic update read backwards (Song et al. 2021, eq. 13 with eta = 0;
    Dhariwal & Nichol 2021, app. F): x_t = (alpha_t / alpha_s) x_s + (sigma_t - alpha_t sigma_s / alpha_s) eps, which is
    x_s = alpha_s x0 + sigma_s eps solved for x0 and noised again to t with the same eps. With eps = eps_hat(x_t, t) it
    is the exact inverse of the sampling step t -> s; any other eps makes it an explicit step of the same ODE."""
    ratio = step.alpha_t / step.alpha_s
    return ratio * x_s + (step.sigma_t - ratio * step.sigma_s) * eps


def invert(
    denoiser,
    x0: Tensor,
    grid: Tensor,
    *,
    refine: int = 0,  # fixed-point iterations per step towards the exact inverse of the sampling step (0: plain inversion)
    callback: Callback | None = None,
) -> Tensor:
    """DDIM inversion: the deterministic update (eta = 0) run upwards over a sampling grid, from x0 at t = 0 to x_T at the
    grid's first time; returns x_T, from which `sample` with eta = 0 on the same grid renders x0 back.

    The walk is the sampling walk read backwards: the same GridSteps (`base.grid_steps`), last to first. Each move s -> t
    is `inversion_step` with eps_hat evaluated at the point it leaves, (x_s, s) (Preechakul et al. 2022's
    `ddim_reverse_sample`, diffusers' DDIMInverseScheduler); the first move leaves the clean x0 at s = 0, where the noise
    is not identifiable, so it evaluates the denoiser at (x0, t) instead (the reference treats x0 as lying at the grid's
    lowest noise level). Both are explicit, first-order steps of the probability-flow ODE, so inversion followed by
    sampling returns x0 with an error of O(1/steps) (tests/test_inversion.py measures the order). The same update is
    Euler's method in EDM's (x / alpha, sigma / alpha) (Karras et al. 2022, eq. 4) and in a flow's t, and DPM-Solver++(1):
    one function inverts all the first-order ODE samplers on every process (VP, EDM, flow).

    `refine` = k > 0 re-evaluates eps_hat at the current estimate of x_t, k times per move (a fixed-point iteration of
    x_t = inversion_step(x_s, eps_hat(x_t, t)); Pan et al. 2023, "Effective real image editing with accelerated
    iterative diffusion inversion"): each converged move is the exact inverse of the sampling step, so the round trip
    error falls towards float precision at k more denoiser calls per step. It converges where the step is small against
    the denoiser's Lipschitz constant (many steps); a diverging iteration is left as the NonFiniteSample of the walk.

    x0 (B, ...); grid decreasing from at most 1 to 0 (a sampling grid, no jumps back up). Raises ValueError for a bad
    grid or refine < 0; NonFiniteSample naming the step when x becomes NaN or infinite. `callback` gets one Step per move
    (t the lower time, s the higher, x0 the prediction the move used).
    """
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be an integer >= 0 (fixed-point iterations per step), got {refine!r}")
    steps = list(grid_steps(denoiser.schedule, grid))
    x = x0
    for k, step in enumerate(reversed(steps)):
        pred = denoiser(x, step.s if step.s > 0 else step.t)  # the clean x0 is read at the first noise level
        x_next = inversion_step(x, pred.eps, step)
        for _ in range(refine):
            pred = denoiser(x_next, step.t)
            x_next = inversion_step(x, pred.eps, step)
        if not bool(torch.isfinite(x_next).all()):
            raise NonFiniteSample(f"DDIM inversion became non-finite at move {k + 1} of {len(steps)} (t = {step.s:.4g} -> "
                                  f"{step.t:.4g}); " + ("lower refine or use more steps" if refine else
                                                         "check the run's weights and the input image"))
        if callback is not None:
            callback(Step(k, len(steps), step.s, step.t, x, pred.x0, x_next))
        x = x_next
    return x
