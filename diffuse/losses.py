"""Training objectives: per-example losses; the trainer reduces them.

L_simple (Ho et al. 2020, eq. 14; lecture 000 "Training Objective"):
    E_{t, x_0, eps} || eps - eps_theta(sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps, t) ||^2
with t ~ Uniform{1..T} (Algorithm 1). For x0- and v-networks the same regression is made on
their own target; a weighting w(t) can re-balance noise levels (min-SNR-gamma).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .denoiser import predict, scales
from .schedule import NoiseSchedule, Schedule, append_dims, posterior


def sample_timesteps(schedule: NoiseSchedule, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n training times from the process's own distribution (`NoiseSchedule.sample_t`): for DDPM t = k / T with
    k ~ Uniform{1, ..., T} (Algorithm 1, line 3); EDM's log-normal sigma; flow's uniform or logit-normal t."""
    return schedule.sample_t(n, generator)


def min_snr_weight(snr: Tensor, gamma: float, prediction: str) -> Tensor:
    """min-SNR-gamma weighting (Hang et al. 2023, eq. 9), written for each prediction type.

    The intended weight on the x_0-error is min(SNR, gamma); an eps-loss already carries a factor
    SNR and a v-loss a factor SNR + 1, so those are divided out.
    """
    if prediction not in ("eps", "x0", "v"):
        raise ValueError(f"min-SNR weighting is written for eps, x0 and v networks, not {prediction!r}; use "
                         "train.loss_weighting = 'none' (an 'edm' network's loss already carries EDM's weighting)")
    clipped = snr.clamp(max=gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[prediction]


def l_simple(denoiser, x0: Tensor, t: Tensor, eps: Tensor, *, weighting: str = "none",
             min_snr_gamma: float = 5.0, raw: Tensor | None = None, **cond) -> Tensor:
    """Per-example mean squared error of the network's output against its target at x_t (B,). `raw`: the network's
    output at x_t = q_sample(x0, t, eps) when the caller has run it already (the hybrid loss), else it is run here."""
    if raw is None:
        raw = denoiser.raw(denoiser.schedule.q_sample(x0, t, eps), t, **cond)
    err = (raw.float() - denoiser.target(x0, eps, t).float()) ** 2
    loss = err.flatten(1).mean(1)
    if weighting == "min_snr":
        loss = loss * min_snr_weight(denoiser.schedule.snr(t), min_snr_gamma, denoiser.prediction).to(loss)
    elif weighting != "none":
        raise ValueError(f"weighting must be 'none' or 'min_snr', got {weighting!r}")
    return loss


def classifier_loss(classifier, schedule: Schedule, x0: Tensor, y: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Per-example cross-entropy -log p_phi(y | x_t, t) on x_t ~ q(x_t | x_0): how the noisy classifier of
    classifier guidance is trained (Dhariwal & Nichol 2021, sec. 4.1)."""
    x_t = schedule.q_sample(x0, t, eps)
    logits = classifier(x_t, schedule.model_time(t).to(device=x0.device, dtype=torch.float32))
    return F.cross_entropy(logits.float(), y, reduction="none")


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


def model_log_variance(schedule: Schedule, n: Tensor, v_interp: Tensor | None, like: Tensor, fixed: str = "beta_tilde") -> Tensor:
    """log Sigma_theta(x_t, t) at the discrete steps n (B,): learned (eq. 15 of Nichol & Dhariwal 2021) or fixed
    (beta-tilde or beta). beta-tilde_1 = 0, so step 1 uses beta-tilde_2, as Ho et al.'s and Nichol & Dhariwal's code do."""
    n = n.long().cpu()
    beta_tilde = (1 - schedule.alphabar[n - 1]) / (1 - schedule.alphabar[n]) * schedule.betas[n]
    beta_tilde_2 = (1 - schedule.alphabar[1]) / (1 - schedule.alphabar[2]) * schedule.betas[2]
    log_tilde = torch.where(n == 1, beta_tilde_2, beta_tilde).log()
    log_beta = torch.where(n == 1, beta_tilde_2, schedule.betas[n]).log() if v_interp is None else schedule.betas[n].log()
    log_tilde, log_beta = (append_dims(v, like).to(like) for v in (log_tilde, log_beta))
    if v_interp is not None:
        return v_interp * log_beta + (1 - v_interp) * log_tilde
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
    raw, v_interp = denoiser.output(x_t, t, **cond) if output is None else output
    if detach_mean:
        raw = raw.detach()
    alpha, sigma = scales(schedule, t, x0)
    pred = predict(raw, x_t, alpha, sigma, denoiser.prediction)
    c = [append_dims(v, x0).to(x0) for v in posterior(schedule.alpha(t), schedule.sigma(t), schedule.alpha(s), schedule.sigma(s))]
    true_mean, model_mean = c[0] * x0 + c[1] * x_t, c[0] * pred.x0 + c[1] * x_t
    model_logvar = model_log_variance(schedule, n, v_interp, x0, fixed_variance)
    true_logvar = c[2].clamp_min(1e-30).log().expand_as(x0)
    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).sum(1)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).flatten(1).sum(1)
    return torch.where(n.to(x0.device) == 1, decoder_nll, kl)


def bits_per_dim(nats: Tensor, x0: Tensor) -> Tensor:
    """Per-example nats over an image -> bits per dimension."""
    return nats / (x0[0].numel() * math.log(2))


@torch.no_grad()
def vlb_bits_per_dim(denoiser, x0: Tensor, *, samples: int | None = None, fixed_variance: str = "beta_tilde",
                     generator: torch.Generator | None = None, **cond) -> dict[str, Tensor]:
    """The bound L = L_T + sum_{n=1}^T L_{n-1} in bits/dim per example: every term (samples = None, T network
    calls), or the unbiased estimate L_T + T * mean of `samples` terms at n ~ Uniform{1..T}.
    Returns {"total": (B,), "prior": (B,), "terms": (B, k) (bits/dim), "steps": (B, k)}."""
    schedule = denoiser.schedule
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


def hybrid_loss(denoiser, x0: Tensor, t: Tensor, eps: Tensor, *, lam: float = 0.001, weighting: str = "none",
                min_snr_gamma: float = 5.0, **cond) -> Tensor:
    """L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, sec. 3.1, lambda = 0.001), per example: the
    variance learns from L_vlb = T * L_{t-1} (in bits/dim) with the mean's gradient stopped, the mean from L_simple."""
    n = torch.round(t * denoiser.schedule.T).long()
    output = denoiser.output(denoiser.schedule.q_sample(x0, t, eps), t, **cond)  # one forward pass serves both terms
    simple = l_simple(denoiser, x0, t, eps, weighting=weighting, min_snr_gamma=min_snr_gamma, raw=output[0], **cond)
    vlb = bits_per_dim(vlb_term(denoiser, x0, n, eps, detach_mean=True, output=output, **cond), x0)
    return simple + lam * denoiser.schedule.T * vlb


class ImportanceSampler:
    """Importance sampling of t for training on L_vlb alone (Nichol & Dhariwal 2021, sec. 3.3, eq. 18):
    p_t ~ sqrt(E[L_t^2]) over the last `history` values of each term, mixed with `uniform` of the uniform
    distribution; uniform until every term has `history` values. Loss weights 1 / (T p_t) keep it unbiased."""

    def __init__(self, T: int, history: int = 10, uniform: float = 0.001):
        self.T, self.uniform = T, uniform
        self.history = torch.zeros(T, history, dtype=torch.float64)  # newest last
        self.count = torch.zeros(T, dtype=torch.long)

    def probs(self) -> Tensor:
        if bool((self.count < self.history.shape[1]).any()):
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        w = self.history.square().mean(1).sqrt()
        w = w / w.sum()
        return w * (1 - self.uniform) + self.uniform / self.T

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(steps (n,) in 1..T, loss weights 1 / (T p_t))."""
        p = self.probs()
        idx = torch.multinomial(p, n, replacement=True, generator=generator)
        return idx + 1, 1.0 / (self.T * p[idx])

    def update(self, steps: Tensor, losses: Tensor) -> None:
        for n, loss in zip(steps.tolist(), losses.detach().double().cpu().tolist()):
            row = self.history[n - 1]
            self.history[n - 1] = torch.cat([row[1:], row.new_tensor([loss])])
            self.count[n - 1] += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {"history": self.history.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.history, self.count = state["history"].clone().double(), state["count"].clone().long()
