"""Likelihood: the variational bound and the probability-flow ODE's exact log-likelihood, in bits/dim.

- The variational bound of Ho et al. (2020, eq. 5; lecture 001 "Variational Upper Bound"):
  L = L_T + sum_{t>1} L_{t-1} + L_0 with Gaussian KLs and the discretized decoder (`vlb_term`,
  `vlb_bits_per_dim`); the hybrid and vlb training losses (losses.py) use the same terms.
- The probability-flow ODE's log-likelihood by the instantaneous change of variables (Song et al. 2021, sec. 4.3;
  `ode_log_likelihood`, `ode_bits_per_dim`), integrated with the ODE of samplers/sde.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import RK45
from torch import Tensor

from .denoiser import predict, scales
from .samplers.sde import pf_ode_drift_in_l, require_vp, time_at
from .schedule import Schedule, append_dims, posterior


# --- the variational bound (Ho et al. 2020, eq. 5; lecture 001 "Variational Upper Bound") --------------
#   L = L_T + sum_{t>1} L_{t-1} + L_0,  L_T = KL(q(x_T|x_0) || N(0, I)),
#   L_{t-1} = KL(q(x_{t-1}|x_t, x_0) || p_theta(x_{t-1}|x_t)),  L_0 = -log p_theta(x_0|x_1),
# each summed over the D values of an image; in bits per dimension after dividing by D log 2.
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per value, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, bins: int = 256) -> Tensor:
    """log p(x) per value for data on the `bins`-level grid of [-1, 1]: the N(mean, e^(2 log_scale)) mass of x's
    bin [x - 1/(bins-1), x + 1/(bins-1)], the edge bins running to -inf / +inf (Ho et al. 2020, eq. 13)."""
    half = 1.0 / (bins - 1)
    upper = (x - mean + half) * torch.exp(-log_scale)
    lower = (x - mean - half) * torch.exp(-log_scale)
    log_below_upper = torch.special.log_ndtr(upper)   # the lowest bin: P(X <= x + half)
    log_above_lower = torch.special.log_ndtr(-lower)  # the highest bin: P(X >= x - half)
    inside = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp_min(1e-12).log()
    return torch.where(x < -1 + half, log_below_upper, torch.where(x > 1 - half, log_above_lower, inside))


def prior_kl(schedule: Schedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example, in nats: no parameters, near 0 for a good schedule."""
    alpha, sigma = (float(v) for v in (schedule.alpha(1.0), schedule.sigma(1.0)))
    kl = normal_kl(alpha * x0, torch.full_like(x0, 2 * math.log(sigma)), torch.zeros_like(x0), torch.zeros_like(x0))
    return kl.flatten(1).sum(1)


def model_log_variance(schedule: Schedule, n: Tensor, variance_mix: Tensor | None, like: Tensor, fixed: str = "beta_tilde") -> Tensor:
    """log Sigma_theta(x_t, t) at the discrete steps n (B,): learned (eq. 15 of Nichol & Dhariwal 2021) or fixed
    (beta-tilde or beta). beta-tilde_1 = 0, so step 1 uses beta-tilde_2, as Ho et al.'s and Nichol & Dhariwal's code do."""
    n = n.long().cpu()
    beta_tilde = (1 - schedule.alphabar[n - 1]) / (1 - schedule.alphabar[n]) * schedule.betas[n]
    beta_tilde_2 = (1 - schedule.alphabar[1]) / (1 - schedule.alphabar[2]) * schedule.betas[2]
    log_tilde = torch.where(n == 1, beta_tilde_2, beta_tilde).log()
    log_beta = torch.where(n == 1, beta_tilde_2, schedule.betas[n]).log() if variance_mix is None else schedule.betas[n].log()
    log_tilde, log_beta = (append_dims(v, like).to(like) for v in (log_tilde, log_beta))
    if variance_mix is not None:
        return variance_mix * log_beta + (1 - variance_mix) * log_tilde
    if fixed not in ("beta_tilde", "beta"):
        raise ValueError(f"the fixed variance must be 'beta_tilde' or 'beta', got {fixed!r}")
    return (log_tilde if fixed == "beta_tilde" else log_beta).expand_as(like)


def vlb_term(denoiser, x0: Tensor, n: Tensor, eps: Tensor, *, fixed_variance: str = "beta_tilde",
             detach_mean: bool = False, output: tuple[Tensor, Tensor | None] | None = None, **cond) -> Tensor:
    """L_{n-1} per example in nats at discrete steps n (B,) in 1..T: the Gaussian KL for n > 1, the discretized
    decoder's -log p(x_0 | x_1) for n = 1. `detach_mean` stops the gradient through the mean (the hybrid loss);
    `output` is `denoiser.output` at x_n = q_sample(x0, n / T, eps) when the caller has it already."""
    schedule = denoiser.schedule
    T = schedule.T
    if bool(((n < 1) | (n > T)).any()):
        raise ValueError(f"vlb steps must be in 1..{T}")
    t, s = n.double() / T, (n.double() - 1) / T
    x_t = schedule.q_sample(x0, t, eps)
    raw, variance_mix = denoiser.output(x_t, t, **cond) if output is None else output
    if detach_mean:
        raw = raw.detach()
    alpha, sigma = scales(schedule, t, x0)
    pred = predict(raw, x_t, alpha, sigma, denoiser.prediction)
    c = [append_dims(v, x0).to(x0) for v in posterior(schedule.alpha(t), schedule.sigma(t), schedule.alpha(s), schedule.sigma(s))]
    true_mean, model_mean = c[0] * x0 + c[1] * x_t, c[0] * pred.x0 + c[1] * x_t
    model_logvar = model_log_variance(schedule, n, variance_mix, x0, fixed_variance)
    true_logvar = c[2].clamp_min(1e-30).log().expand_as(x0)
    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).sum(1)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).flatten(1).sum(1)
    return torch.where(n.to(x0.device) == 1, decoder_nll, kl)


def bits_per_dim(nats: Tensor, x0: Tensor) -> Tensor:
    """Per-example nats over an image -> bits per dimension."""
    return nats / (x0[0].numel() * math.log(2))


@torch.no_grad()
def check_likelihood(schedule, metric: str) -> None:
    """ValueError naming the process and the fix when `metric` cannot be measured on `schedule`: "vlb" (the variational
    bound) sums the T discrete steps of a DDPM schedule; "nll" (the probability-flow likelihood) integrates the VP-SDE,
    which only the variance-preserving processes have (and not from alpha_T = 0)."""
    kind = getattr(schedule, "kind", type(schedule).__name__)
    other = "measure its samples with --metric fid, kid, is or pr"
    if metric == "vlb" and getattr(schedule, "T", None) is None:
        raise ValueError(f"the variational bound (--metric vlb) sums the T discrete steps of a DDPM schedule (linear, "
                         f"cosine, ...), and this model's {kind} process is continuous; "
                         + ("use --metric nll, or " if getattr(schedule, "variance_preserving", False) else "") + other)
    if metric == "nll":
        if not getattr(schedule, "variance_preserving", False):
            raise ValueError(f"the probability-flow likelihood (--metric nll) integrates the variance-preserving SDE, and "
                             f"this model's process is {kind}; {other}")
        require_vp(schedule, "the probability-flow likelihood (--metric nll)")


def vlb_bits_per_dim(denoiser, x0: Tensor, *, samples: int | None = None, fixed_variance: str = "beta_tilde",
                     generator: torch.Generator | None = None, **cond) -> dict[str, Tensor]:
    """The bound L = L_T + sum_{n=1}^T L_{n-1} in bits/dim per example: every term (samples = None, T network
    calls), or the unbiased estimate L_T + T * mean of `samples` terms at n ~ Uniform{1..T}.
    Returns {"total": (B,), "prior": (B,), "terms": (B, k) (bits/dim), "steps": (B, k)}."""
    schedule = denoiser.schedule
    check_likelihood(schedule, "vlb")
    B, T = x0.shape[0], schedule.T
    if samples is None:  # every term, step by step
        steps = torch.arange(T, 0, -1)[None].expand(B, T)
    else:  # independent steps for every example
        steps = torch.randint(1, T + 1, (B, samples), generator=generator)
    terms = []
    for k in range(steps.shape[1]):
        eps = torch.randn(x0.shape, generator=generator).to(x0)
        terms.append(vlb_term(denoiser, x0, steps[:, k], eps, fixed_variance=fixed_variance, **cond))
    terms = torch.stack(terms, 1)
    prior = prior_kl(schedule, x0)
    total = prior + (terms.sum(1) if samples is None else T * terms.mean(1))
    return {"total": bits_per_dim(total, x0), "prior": bits_per_dim(prior, x0), "terms": bits_per_dim(terms, x0), "steps": steps}


def divergence(fn, x: Tensor, *, exact: bool, probes: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(fn(x), div_x fn(x) per example): the exact trace of the Jacobian (one backward pass per dimension: small
    D only), or the Skilling-Hutchinson estimate mean_z z^T (d fn / dx) z over the given probe vectors z
    (Hutchinson 1989; Grathwohl et al. 2019)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        if exact:
            flat = out.flatten(1)
            div = sum(torch.autograd.grad(flat[:, j].sum(), x, retain_graph=True)[0].flatten(1)[:, j] for j in range(flat.shape[1]))
        else:
            div = sum((torch.autograd.grad((out * z).sum(), x, retain_graph=True)[0] * z).flatten(1).sum(1) for z in probes)
            div = div / len(probes)
    return out.detach(), div.detach()


def ode_log_likelihood(denoiser, x0: Tensor, *, rtol: float = 1e-5, atol: float = 1e-5, exact_trace: bool | None = None,
                       probes: int = 1, generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """log p_eps(x0) per example (nats) under the probability-flow ODE, by the instantaneous change of variables
    (Chen et al. 2018; Song et al. 2021, sec. 4.3 and appendix D.2):
        log p_0(x_0) = log p_1(x_1) + int_0^1 div f(x_t, t) dt,   f the ODE's drift,
    solved jointly with x by RK45 in l = -log alphabar (see `probability_flow`) from the first step t = 1/T up
    to t = 1, where p_1 = N(0, I). The trace is exact when `exact_trace` (default: for D <= 32), else the
    Skilling-Hutchinson estimate with `probes` Rademacher vectors drawn from `generator` once and held fixed
    along the path (so the ODE stays deterministic). Returns (log-likelihoods (B,), function evaluations).
    """
    schedule = denoiser.schedule
    B, D = x0.shape[0], x0[0].numel()
    exact = D <= 32 if exact_trace is None else exact_trace
    shape, dtype, device = x0.shape, x0.dtype, x0.device
    check_likelihood(schedule, "nll")
    t_start = schedule.t_min  # the first step, 1 / T
    l_start, l_end = (float(-schedule.alphabar_at(torch.tensor(t, dtype=torch.float64)).log()) for t in (t_start, 1.0))
    z = [torch.randint(0, 2, shape, generator=generator).to(device=device, dtype=dtype) * 2 - 1 for _ in range(probes)]
    nfe = 0

    def drift(x: Tensor, l: float) -> Tensor:
        return pf_ode_drift_in_l(x, denoiser(x, time_at(schedule, l)), l)

    def rhs(l: float, y: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        x = torch.from_numpy(y[:-B]).reshape(shape).to(device=device, dtype=dtype)
        out, div = divergence(lambda v: drift(v, l), x, exact=exact, probes=z)
        return np.concatenate([out.to("cpu", torch.float64).numpy().ravel(), div.to("cpu", torch.float64).numpy()])

    y0 = np.concatenate([x0.detach().to("cpu", torch.float64).numpy().ravel(), np.zeros(B)])
    solver = RK45(rhs, l_start, y0, l_end, rtol=rtol, atol=atol)
    while solver.status == "running":
        msg = solver.step()
        if solver.status == "failed":
            raise RuntimeError(f"the probability-flow ODE solver failed: {msg}")
    x1 = torch.from_numpy(solver.y[:-B]).reshape(B, -1)
    integral = torch.from_numpy(solver.y[-B:])
    log_p1 = -0.5 * (x1**2).sum(1) - 0.5 * D * math.log(2 * math.pi)
    return (log_p1 + integral).to(dtype), nfe


def ode_bits_per_dim(denoiser, x0: Tensor, *, dequantize: bool = True, bins: int = 256,
                     generator: torch.Generator | None = None, **kw) -> tuple[Tensor, int]:
    """Negative log-likelihood of 8-bit data in bits/dim via the probability-flow ODE. With uniform dequantization
    (Theis et al. 2016) x = x0 + u, u ~ U(-1/(bins-1), 1/(bins-1)) on the [-1, 1] grid of spacing 2/(bins-1),
    -log P(x0) <= E_u[-log p(x)] - D log(2/(bins-1)): an upper bound on the discrete data's bits/dim.
    Returns (bits/dim (B,), function evaluations)."""
    D = x0[0].numel()
    x = x0
    if dequantize:
        x = x0 + (torch.rand(x0.shape, generator=generator).to(x0) * 2 - 1) / (bins - 1)
    log_p, nfe = ode_log_likelihood(denoiser, x, generator=generator, **kw)
    nll = -log_p - (D * math.log(2 / (bins - 1)) if dequantize else 0.0)
    return nll / (D * math.log(2)), nfe
