"""Samplers: pure functions sample(denoiser, x_T, timesteps, *, generator, callback) -> x_0.

They call the denoiser and read alpha_t, sigma_t from its schedule, nothing else: no network,
no prediction type, no hidden state between calls.
"""

from . import ddim, ddpm
from .base import Callback, Step

SAMPLERS = {
    "ddpm": ddpm.sample,  # ancestral, Ho et al. 2020 Algorithm 2
    "ddim": ddim.sample,  # Song et al. 2021, any eta
}

__all__ = ["SAMPLERS", "Callback", "Step", "ddim", "ddpm"]
