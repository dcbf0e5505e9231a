"""Denoiser -> Denoiser wrappers that change what a denoiser predicts; every sampler gets them for free."""

from __future__ import annotations

from torch import Tensor

from .denoiser import Prediction, scales, x0_to_eps


class ClipX0:
    """Static clipping of the predicted x_0 to the data range (Ho et al. 2020 code; Saharia et al. 2022, sec. 2.3).

    eps is re-derived from the clipped x_0, eps = (x_t - alpha_t x_0) / sigma_t, so the
    prediction stays consistent with x_t (as improved-diffusion does).
    """

    def __init__(self, denoiser, lo: float = -1.0, hi: float = 1.0):
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.lo, self.hi = lo, hi

    def __call__(self, x_t: Tensor, t, **cond) -> Prediction:
        x0 = self.denoiser(x_t, t, **cond).x0.clamp(self.lo, self.hi)
        alpha, sigma = scales(self.schedule, t, x_t)
        return Prediction(x0=x0, eps=x0_to_eps(x_t, x0, alpha, sigma))
