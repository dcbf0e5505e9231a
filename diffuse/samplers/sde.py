"""The SDE view (Song et al. 2021, "Score-based generative modeling through SDEs"; lecture 001).

The DDPM forward process is the discretisation of the VP-SDE
    dx = f(t) x dt + g(t) dw,   f(t) = -1/2 beta(t),  g(t)^2 = beta(t)       (eq. 11; Schedule.sde_beta)
whose time reversal (Anderson 1982; eq. 6) and probability-flow ODE (eq. 13) are
    dx = [f(t) x - g(t)^2 score] dt + g(t) dw_bar,      dx/dt = f(t) x - 1/2 g(t)^2 score,
with score = grad log p_t(x) = -eps_hat / sigma_t from the denoiser. Samplers here integrate them
from t = 1 down to the grid's last positive time and then take the x_0 prediction there (the
"denoise at the end" of Song et al.'s code): the score is singular at t = 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import RK45
from torch import Tensor

from .base import (OPTIONS, Callback, GridStep, NonFiniteSample, Project, Step, gaussian_like, grid_steps,
                   require_positive_alpha, walk)


def require_vp(schedule, name: str) -> None:
    """The VP-SDE samplers and the likelihood integrate dx = -1/2 beta x dt + sqrt(beta) dw, which exists only for
    variance-preserving processes (with beta(t) finite: not at the first step of a zero-terminal-SNR schedule): a
    clear error on the others."""
    require_positive_alpha(schedule, name)
    if not getattr(schedule, "variance_preserving", False):
        raise ValueError(f"{name} integrates the variance-preserving SDE, and this model's process is "
                         f"{getattr(schedule, 'kind', type(schedule).__name__)}; use ddim, dpmpp-2m, euler or heun, "
                         "which run on every process")


def vp_sde(schedule, t: float) -> tuple[float, float]:
    """(f(t), g(t)^2) = (-beta(t) / 2, beta(t)) of the VP-SDE (Song et al. 2021, eq. 11)."""
    beta = float(schedule.sde_beta(t))
    return -0.5 * beta, beta


def reverse_drift(x: Tensor, eps: Tensor, f: float, g2: float, sigma: float, ode: bool) -> Tensor:
    """f x - c g^2 score with score = -eps / sigma; c = 1 for the reverse SDE (eq. 6), 1/2 for the probability-flow ODE (eq. 13)."""
    return f * x + (0.5 if ode else 1.0) * g2 * eps / sigma


def euler_maruyama_step(schedule, x: Tensor, pred, t: float, s: float, sigma_t: float,
                        generator: torch.Generator | None) -> Tensor:
    """x_s = x_t - [f(t) x_t - g(t)^2 score] dt + g(t) sqrt(dt) z, dt = t - s (Song et al. 2021, "EulerMaruyamaPredictor").
    Into s = 0, where the score is singular, the denoiser's x_0 instead."""
    if s == 0:
        return pred.x0
    f, g2 = vp_sde(schedule, t)
    dt = t - s
    return x - reverse_drift(x, pred.eps, f, g2, sigma_t, ode=False) * dt + math.sqrt(g2 * dt) * gaussian_like(x, generator)


def euler_maruyama(denoiser, x_T: Tensor, grid: Tensor, *, generator: torch.Generator | None = None,
                   callback: Callback | None = None, project: Project | None = None) -> Tensor:
    """Euler-Maruyama on the reverse SDE (`euler_maruyama_step`): one call per step."""
    return predictor_corrector(denoiser, x_T, grid, corrector_steps=0, generator=generator, callback=callback,
                               project=project)


def langevin_step_size(score: Tensor, z: Tensor, snr: float, alpha: float) -> float:
    """epsilon = 2 alpha (r ||z|| / ||score||)^2 (Song et al. 2021, Algorithm 5, the VP corrector), with the
    norms averaged over the batch as in the paper's code: per example they are noisy in few dimensions."""
    norm = lambda v: float(v.flatten(1).norm(dim=1).mean())  # noqa: E731
    return 2 * alpha * (snr * norm(z) / max(norm(score), 1e-12)) ** 2


def predictor_corrector(
    denoiser,
    x_T: Tensor,
    grid: Tensor,
    *,
    snr: float = 0.16,           # the corrector's signal-to-noise ratio r (Song et al.: 0.16 for VP on CIFAR-10)
    corrector_steps: int = 1,    # Langevin steps at each time (Song et al.: 1)
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    project: Project | None = None,
) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 1 and 5): at each time, `corrector_steps`
    Langevin MCMC steps x <- x + epsilon score + sqrt(2 epsilon) z, then one Euler-Maruyama predictor step.

    The step size comes from batch-averaged norms (as Song et al.), so a sample depends a little on
    the others drawn with it. 1 + corrector_steps calls per step.
    """
    snr, corrector_steps = OPTIONS["snr"].check("snr", snr), OPTIONS["corrector_steps"].check("corrector_steps", corrector_steps)
    schedule = denoiser.schedule
    require_vp(schedule, "sde-em / sde-pc")

    def update(step: GridStep, x: Tensor, history: list):
        alpha_step = float(schedule.alphabar_at(step.t) / schedule.alphabar_at(step.s))  # 1 - beta_n for adjacent steps
        for _ in range(corrector_steps):
            score = -denoiser(x, step.t).eps / step.sigma_t
            z = gaussian_like(x, generator)
            size = langevin_step_size(score, z, snr, alpha_step)
            x = x + size * score + math.sqrt(2 * size) * z
        pred = denoiser(x, step.t)
        return euler_maruyama_step(schedule, x, pred, step.t, step.s, step.sigma_t, generator), pred

    return walk(schedule, x_T, grid, update, generator=generator, callback=callback, project=project)


def time_at(schedule, l: float) -> float:
    """The time t with -log alphabar(t) = l (the integrated noise rate of the VP-SDE)."""
    return float(schedule.t_from_log_alphabar(torch.tensor(-l, dtype=torch.float64)))


def pf_ode_drift_in_l(x: Tensor, pred, l: float) -> Tensor:
    """dx/dl = -1/2 (x + score) = -1/2 (x - eps_hat / sigma), sigma = sqrt(1 - e^-l): the probability-flow
    ODE (Song et al. 2021, eq. 13) with time changed to l = int_0^t beta(s) ds (dl = beta dt)."""
    return -0.5 * (x - pred.eps / math.sqrt(-math.expm1(-l)))


def probability_flow(
    denoiser,
    x_T: Tensor,
    grid: Tensor,
    *,
    rtol: float = 1e-5,  # RK45 tolerances (Song et al. 2021: 1e-5 for sampling)
    atol: float = 1e-5,
    generator: torch.Generator | None = None,  # unused: the ODE is deterministic
    callback: Callback | None = None,
    project: Project | None = None,  # not supported: the adaptive solver has no grid steps to project after
) -> Tensor:
    """The probability-flow ODE (eq. 13) by adaptive RK45 (Dormand-Prince, scipy), from the grid's first time
    to its last positive one, then the x_0 prediction there.

    It is solved in the integrated noise rate l(t) = int_0^t beta = -log alphabar(t) rather than in t:
        dx/dl = -1/2 (x + score) = -1/2 (x - eps_hat / sigma),   sigma = sqrt(1 - e^-l),
    the same ODE (dl = beta(t) dt), but smooth: beta(t) of a discrete schedule is a staircase, whose
    1,000 kinks make an adaptive solver crawl. Only the grid's ends matter (train.generate passes
    [1, 1/T, 0]); the solver picks its own steps and reports each accepted one through the callback
    (total = 0: not known in advance). Count the evaluations with base.CountCalls.
    """
    rtol, atol = OPTIONS["rtol"].check("rtol", rtol), OPTIONS["atol"].check("atol", atol)
    require_vp(denoiser.schedule, "ode-rk45")
    if project is not None:
        raise ValueError("ode-rk45 chooses its own steps, so there is no step to project after; use a sampler with a "
                         "grid (ddim, dpmpp-2m, ...) for inpainting, RePaint or ILVR")
    ts = torch.as_tensor(grid, dtype=torch.float64).flatten()
    list(grid_steps(denoiser.schedule, ts))  # validate the grid
    schedule = denoiser.schedule
    t_end = float(ts[-2])
    l_start, l_end = (float(-schedule.alphabar_at(t).log()) for t in (ts[0], ts[-2]))
    shape, dtype, device = x_T.shape, x_T.dtype, x_T.device
    last = {}  # the latest evaluation's x_0 prediction, for the callback

    def rhs(l: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype)
        t = time_at(schedule, l)
        pred = denoiser(x, t)
        if not bool(torch.isfinite(pred.eps).all()):  # scipy would only report a failed step size
            raise NonFiniteSample(f"ode-rk45: the denoiser returned non-finite values at t = {t:.4g}")
        last["x0"] = pred.x0
        return pf_ode_drift_in_l(x, pred, l).to("cpu", torch.float64).numpy().ravel()

    x, i = x_T, 0
    if l_end < l_start:
        solver = RK45(rhs, l_start, x_T.detach().to("cpu", torch.float64).numpy().ravel(), l_end, rtol=rtol, atol=atol)
        while solver.status == "running":
            x0_here = last.get("x0")  # the prediction at the step's start (Dormand-Prince's last stage is its first)
            msg = solver.step()
            if solver.status == "failed":
                raise RuntimeError(f"the probability-flow ODE solver failed: {msg}")
            x_next = torch.from_numpy(solver.y).reshape(shape).to(device=device, dtype=dtype)
            if callback is not None:
                callback(Step(i, 0, time_at(schedule, solver.t_old), time_at(schedule, solver.t), x,
                              x0_here if x0_here is not None else last["x0"], x_next))
            x, i = x_next, i + 1
    pred = denoiser(x, t_end)
    if callback is not None:
        callback(Step(i, 0, t_end, 0.0, x, pred.x0, pred.x0))
    return pred.x0
