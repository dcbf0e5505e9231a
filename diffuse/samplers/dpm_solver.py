"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: fast solver for guided sampling"): the
probability-flow ODE solved exactly in its linear part, in the log-SNR lambda = log(alpha / sigma).

With the data prediction x0_theta, the ODE from t to s < t has the exact form (eq. 9)
    x_s = (sigma_s / sigma_t) x_t + sigma_s * integral_{lambda_t}^{lambda_s} e^lambda x0_theta(x_lambda) dlambda,
and the solvers expand x0_theta in lambda around the known points, h = lambda_s - lambda_t:
    order 1 (= DDIM, eq. 10):  x_s = (sigma_s/sigma_t) x_t - alpha_s (e^-h - 1) D0
    2M (Algorithm 2):          ... - 1/2 alpha_s (e^-h - 1) D1,          D1 = (D0 - x0_prev) / r,  r = h_prev / h
    3M (the third-order multistep update of the DPM-Solver code and diffusers):
        ... + alpha_s ((e^-h - 1)/h + 1) D1 - alpha_s ((e^-h - 1 + h)/h^2 - 1/2) D2
        with D1 ~= h x0' and D2 ~= h^2 x0'' from divided differences of the last three x0s.
    2S (Algorithm 1, r = 1/2): one extra call at the lambda midpoint per step.
Multistep solvers start at order 1 and climb as history accrues; the step into t = 0 (lambda = inf)
is always first order (it returns the last x_0 prediction), and with fewer than 15 steps the
last steps use lower orders too ("lower_order_final", Lu et al. 2022 sec. 5, diffusers' default),
which keeps few-step sampling stable. On uneven grids the order also drops where a step is more than
1 + sqrt(2) times the gap to an earlier prediction (`stable_order`): the "leading" and "linspace" grids end
with the jump from step 1 + T/K to step 1, over which a multistep update would extrapolate x0(lambda) from a
gap four times shorter (covariance error 0.14 against 0.014 on trailing for a 2-D mixture, 20 steps of 2M).

A correction to the reference 3M: the term above integrates e^lambda (lambda - lambda_t)^2 / 2 x0''
exactly only if D2 = h^2 x0''. The reference estimate, D2 = (D1_0 - D1_1) / (r0 + r1), equals
h^2 x0'' / 2 (Taylor-expand the three x0s), which leaves an O(h^3) local error: the reference 3M
converges at second order (tests/test_solvers.py measures it); D2 = 2 (D1_0 - D1_1) / (r0 + r1) is third
order (`reference_3m=False`). Yet the reference update is the default: at the step counts people use it is as good
or better (bench/RESULTS.md, 2026-11-30: digit FID 58.9 vs 59.0 at 10 steps and 60.6 vs 60.2 at 20, a tie; on a
2-D mixture with the exact denoiser better on all six spacings at 20 steps, e.g. 0.026 vs 0.036 on trailing): the
doubled D2 extrapolates further where x0(lambda) is far from its Taylor polynomial. It also gives diffusers'
trajectories.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import OPTIONS, Callback, GridStep, Project, walk


def lam(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), half the log-SNR (Lu et al. 2022, sec. 3.1); +inf at clean data, -inf at pure noise
    (the first step of a zero-terminal-SNR schedule, where h = inf makes the first-order update x_s = sigma_s x_T +
    alpha_s x0: DDIM's step from alpha_T = 0)."""
    if sigma <= 0:
        return math.inf
    return math.log(alpha / sigma) if alpha > 0 else -math.inf


def first_order_update(x: Tensor, x0: Tensor, sigma_t: float, alpha_s: float, sigma_s: float, h: float) -> Tensor:
    """x_s = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) x0: DPM-Solver++ order 1, which is DDIM (Lu et al. 2022, eq. 10)."""
    return (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * x0


MIN_STEP_RATIO = math.sqrt(2) - 1
"""The smallest h_prev / h a multistep update uses. A multistep update extrapolates x0(lambda) from the gaps its
history spans; over a step more than 1 + sqrt(2) times longer the extrapolation error dominates (measured on a 2-D
mixture: bench/RESULTS.md). The threshold is empirical: it is the step-growth bound of variable-step BDF2 (Grigorieff
1983; Hairer, Norsett & Wanner, Solving ODEs I, sec. III.5), borrowed as a round number. DPM-Solver++ is of Adams
type and stays zero-stable at any ratio; the limit is about accuracy, not stability."""


def stable_order(order: int, lams: list[float], h: float) -> int:
    """The largest order <= `order` whose history gaps lams[j] - lams[j+1] (newest first) are all finite and at least
    MIN_STEP_RATIO times the step h (the gap from lambda = -inf, a zero-terminal-SNR start, tells nothing of x0')."""
    k = 1
    while k < order and MIN_STEP_RATIO * h <= (lams[k - 1] - lams[k]) < math.inf:
        k += 1
    return k


def multistep_update(x: Tensor, x0s: list[Tensor], hs: list[float], sigma_t: float, alpha_s: float, sigma_s: float,
                     h: float, reference_3m: bool = True) -> Tensor:
    """The order len(x0s) multistep update from x_t to x_s, given x0 predictions newest first and the
    lambda gaps between them (hs[0] = lambda_t - lambda_prev, hs[1] = lambda_prev - lambda_prev2)."""
    order = len(x0s)
    if order == 1:
        return first_order_update(x, x0s[0], sigma_t, alpha_s, sigma_s, h)
    em = math.expm1(-h)  # e^-h - 1
    r0 = hs[0] / h
    d0, d1_0 = x0s[0], (x0s[0] - x0s[1]) / r0
    if order == 2:  # Algorithm 2 (DPM-Solver++(2M))
        return (sigma_s / sigma_t) * x - alpha_s * em * d0 - 0.5 * alpha_s * em * d1_0
    r1 = hs[1] / h
    d1_1 = (x0s[1] - x0s[2]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (1 if reference_3m else 2) * (d1_0 - d1_1) / (r0 + r1)  # h^2 x0'' (the reference: half of it; see above)
    return ((sigma_s / sigma_t) * x - alpha_s * em * d0 + alpha_s * (em / h + 1) * d1
            - alpha_s * ((em + h) / h**2 - 0.5) * d2)


def sample(
    denoiser,
    x_T: Tensor,
    grid: Tensor,
    *,
    order: int = 2,                  # 1 (DDIM), 2 (DPM-Solver++(2M)) or 3 (3M)
    lower_order_final: bool = True,  # lower orders on the last steps of grids shorter than 15 steps
    reference_3m: bool = True,       # order 3: the DPM-Solver code's / diffusers' update (second order in the limit); False: third order
    generator: torch.Generator | None = None,  # unused: the solver is deterministic (but for jumps back up)
    callback: Callback | None = None,
    project: Project | None = None,
) -> Tensor:
    """DPM-Solver++ multistep from x_T over a grid ending at 0 (`base.walk`): one denoiser call per step. The
    multistep history restarts at first order after a jump back up."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ multistep order must be 1, 2 or 3, got {order}")
    reference_3m = OPTIONS["reference_3m"].check("reference_3m", reference_3m)

    def update(step: GridStep, x: Tensor, history: list):
        pred = denoiser(x, step.t)
        lam_t, lam_s = lam(step.alpha_t, step.sigma_t), lam(step.alpha_s, step.sigma_s)
        history[:] = [(lam_t, pred.x0), *history][:order]  # newest first; emptied by the walk after a jump back up
        lams, x0s = [lam for lam, _ in history], [x0 for _, x0 in history]
        k = len(history)
        if lower_order_final and step.total < 15:
            k = min(k, step.total - step.index)
        h = lam_s - lam_t
        k = 1 if step.sigma_s == 0 else stable_order(k, lams, h)
        hs = [lams[j] - lams[j + 1] for j in range(k - 1)]
        return multistep_update(x, x0s[:k], hs, step.sigma_t, step.alpha_s, step.sigma_s, h, reference_3m), pred

    return walk(denoiser.schedule, x_T, grid, update, generator=generator, callback=callback, project=project)


def sample_2s(
    denoiser,
    x_T: Tensor,
    grid: Tensor,
    *,
    generator: torch.Generator | None = None,  # unused: the solver is deterministic
    callback: Callback | None = None,
    project: Project | None = None,
) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1 with r = 1/2): two denoiser calls per step, one at
    the lambda midpoint s_mid; the step into t = 0 and the step from alpha_T = 0 (lambda = -inf) are first order
    (one call)."""
    schedule = denoiser.schedule

    def update(step: GridStep, x: Tensor, history: list):
        pred = denoiser(x, step.t)
        lam_t, lam_s = lam(step.alpha_t, step.sigma_t), lam(step.alpha_s, step.sigma_s)
        h = lam_s - lam_t
        if step.sigma_s == 0 or step.alpha_t == 0:  # into t = 0, or from alpha_T = 0 (no lambda midpoint): order 1
            return first_order_update(x, pred.x0, step.sigma_t, step.alpha_s, step.sigma_s, h), pred
        t_mid = float(schedule.t_from_lam(lam_t + h / 2))
        alpha_m, sigma_m = float(schedule.alpha(t_mid)), float(schedule.sigma(t_mid))
        u = first_order_update(x, pred.x0, step.sigma_t, alpha_m, sigma_m, h / 2)
        return first_order_update(x, denoiser(u, t_mid).x0, step.sigma_t, step.alpha_s, step.sigma_s, h), pred

    return walk(schedule, x_T, grid, update, generator=generator, callback=callback, project=project)
