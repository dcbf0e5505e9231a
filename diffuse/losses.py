"""Training objectives: per-example losses; the trainer reduces them.

L_simple (Ho et al. 2020, eq. 14; lecture 000 "Training Objective"):
    E_{t, x_0, eps} || eps - eps_theta(sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps, t) ||^2
with t ~ Uniform{1..T} (Algorithm 1). For x0-, v-, flow- and EDM networks the same regression is made on
their own target; a weighting w(t) can re-balance noise levels (min-SNR-gamma, P2, EDM's lambda).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from .likelihood import bits_per_dim, vlb_term
from .denoiser import x0_error_scale
from .schedule import Schedule, to_device


WEIGHTINGS = ("none", "min_snr", "p2", "edm")


def x0_weight(weighting: str, snr: Tensor, *, min_snr_gamma: float = 5.0, p2_k: float = 1.0,
              p2_gamma: float = 1.0, sigma_data: float = 0.5) -> Tensor:
    """lambda(t), the weight a weighting puts on the x_0 error ||x_theta - x_0||^2:
        min_snr  min(SNR, gamma)                                (Hang et al. 2023, eq. 9; gamma = 5)
        p2       SNR / (k + SNR)^gamma', i.e. 1 / (k + SNR)^gamma' on the eps-loss (Choi et al. 2022, eq. 8; k = 1)
        edm      (sigma^2 + sigma_d^2) / (sigma sigma_d)^2, sigma = sigma_t / alpha_t (Karras et al. 2022, table 1),
                 computed as 1 / sigma_d^2 + SNR, finite at SNR = 0 (zero terminal SNR)"""
    if weighting == "min_snr":
        return snr.clamp(max=min_snr_gamma)
    if weighting == "p2":
        return snr / (p2_k + snr) ** p2_gamma
    if weighting == "edm":
        return 1 / sigma_data**2 + snr
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


def loss_weight(weighting: str, alpha: Tensor, sigma: Tensor, prediction: str, **kw) -> Tensor:
    """The weight w(t) on a network's squared target error that makes its loss lambda(t) ||x_0 error||^2 (`x0_weight`):
    lambda(t) / c(t) with c(t) the target's own scale (`denoiser.x0_error_scale`), for every prediction type and
    process. "none" is 1: each target's plain loss (for eps: the x_0 weight SNR, Ho et al.'s L_simple)."""
    if weighting == "none":
        return torch.ones_like(alpha)
    lam = x0_weight(weighting, (alpha / sigma) ** 2, **kw)
    return lam / x0_error_scale(alpha, sigma, prediction, kw.get("sigma_data", 0.5))


def l_simple(denoiser, x0: Tensor, t: Tensor, eps: Tensor, *, weighting: str = "none", min_snr_gamma: float = 5.0,
             p2_k: float = 1.0, p2_gamma: float = 1.0, raw: Tensor | None = None, norm: str = "l2", **cond) -> Tensor:
    """Per-example mean squared (norm "l2", Ho et al. 2020, eq. 14) or absolute (norm "l1", Palette's option,
    Saharia et al. 2022, sec. 5.1) error of the network's output against its target at x_t (B,). `raw`: the network's
    output at x_t = q_sample(x0, t, eps) when the caller has run it already (the hybrid loss), else it is run here.
    `weighting` (none, min_snr, p2, edm) re-weights the noise levels (`loss_weight`), written for every target."""
    if norm not in ("l2", "l1"):
        raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")
    if raw is None:
        raw = denoiser.raw(denoiser.schedule.q_sample(x0, t, eps), t, **cond)
    diff = raw.float() - denoiser.target(x0, eps, t).float()
    err = diff.abs() if norm == "l1" else diff**2
    loss = err.flatten(1).mean(1)
    if weighting != "none":
        tt = torch.as_tensor(t, dtype=torch.float64).expand(x0.shape[0])
        w = loss_weight(weighting, denoiser.schedule.alpha(tt), denoiser.schedule.sigma(tt), denoiser.prediction,
                        min_snr_gamma=min_snr_gamma, p2_k=p2_k, p2_gamma=p2_gamma, sigma_data=denoiser.sigma_data)
        loss = loss * w.to(loss)
    return loss


def classifier_loss(classifier, schedule: Schedule, x0: Tensor, y: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Per-example cross-entropy -log p_phi(y | x_t, t) on x_t ~ q(x_t | x_0): how the noisy classifier of
    classifier guidance is trained (Dhariwal & Nichol 2021, sec. 4.1)."""
    x_t = schedule.q_sample(x0, t, eps)
    logits = classifier(x_t, to_device(schedule.model_time(t).float(), x0.device))
    return F.cross_entropy(logits.float(), y, reduction="none")


def hybrid_loss(denoiser, x0: Tensor, t: Tensor, eps: Tensor, *, lam: float = 0.001, weighting: str = "none",
                min_snr_gamma: float = 5.0, p2_k: float = 1.0, p2_gamma: float = 1.0, **cond) -> Tensor:
    """L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, sec. 3.1, lambda = 0.001), per example: the
    variance learns from L_vlb = T * L_{t-1} (in bits/dim) with the mean's gradient stopped, the mean from L_simple."""
    n = torch.round(t * denoiser.schedule.T).long()
    output = denoiser.output(denoiser.schedule.q_sample(x0, t, eps), t, **cond)  # one forward pass serves both terms
    simple = l_simple(denoiser, x0, t, eps, weighting=weighting, min_snr_gamma=min_snr_gamma, p2_k=p2_k,
                      p2_gamma=p2_gamma, raw=output[0], **cond)
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
