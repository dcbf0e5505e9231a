"""Training objectives: per-example losses; the trainer reduces them.

L_simple (Ho et al. 2020, eq. 14; lecture 000 "Training Objective"):
    E_{t, x_0, eps} || eps - eps_theta(sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps, t) ||^2
with t ~ Uniform{1..T} (Algorithm 1). For x0- and v-networks the same regression is made on
their own target; a weighting w(t) can re-balance noise levels (min-SNR-gamma).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .schedule import Schedule


def sample_timesteps(schedule: Schedule, n: int, generator: torch.Generator | None = None) -> Tensor:
    """t = k / T with k ~ Uniform{1, ..., T} (Algorithm 1, line 3), as float64 times in (0, 1]."""
    k = torch.randint(1, schedule.T + 1, (n,), generator=generator)
    return k.to(torch.float64) / schedule.T


def min_snr_weight(snr: Tensor, gamma: float, prediction: str) -> Tensor:
    """min-SNR-gamma weighting (Hang et al. 2023, eq. 9), written for each prediction type.

    The intended weight on the x_0-error is min(SNR, gamma); an eps-loss already carries a factor
    SNR and a v-loss a factor SNR + 1, so those are divided out.
    """
    clipped = snr.clamp(max=gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[prediction]


def l_simple(denoiser, x0: Tensor, t: Tensor, eps: Tensor, *, weighting: str = "none",
             min_snr_gamma: float = 5.0, **cond) -> Tensor:
    """Per-example mean squared error of the network's output against its target at x_t (B,)."""
    x_t = denoiser.schedule.q_sample(x0, t, eps)
    err = (denoiser.raw(x_t, t, **cond).float() - denoiser.target(x0, eps, t).float()) ** 2
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
