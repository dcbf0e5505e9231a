"""What every sampler shares: the grid check, the per-step report, noise from a generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor


@dataclass
class Step:
    """One step of a sampler, as reported to its callback: from x_t at time t to x_s at time s."""

    index: int      # 0-based step number
    total: int      # number of steps in the grid
    t: float        # current time
    s: float        # next time (0 at the last step)
    x: Tensor       # x_t
    x0: Tensor      # the denoiser's prediction of x_0 at (x_t, t)
    x_next: Tensor  # x_s


Callback = Callable[[Step], None]


class GridStep(NamedTuple):
    """One move of a sampler from time t to time s < t, with the schedule's scales at both."""

    index: int
    t: float
    s: float
    alpha_t: float
    sigma_t: float
    alpha_s: float
    sigma_s: float


def grid_steps(schedule, timesteps: Tensor) -> Iterator[GridStep]:
    """Walk consecutive pairs (t, s) of a decreasing grid that ends at t = 0; scales in float64 as floats."""
    ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    if len(ts) < 2:
        raise ValueError("a sampling grid needs at least two times: the start and the final t = 0")
    if ts[-1] != 0:
        raise ValueError(f"a sampling grid must end at t = 0 (clean data), got {float(ts[-1])}")
    if not bool((ts[1:] < ts[:-1]).all()) or ts[0] > 1:
        raise ValueError("sampling times must decrease strictly from at most 1 down to 0")
    alpha, sigma = schedule.alpha(ts).tolist(), schedule.sigma(ts).tolist()
    for i in range(len(ts) - 1):
        yield GridStep(i, float(ts[i]), float(ts[i + 1]), alpha[i], sigma[i], alpha[i + 1], sigma[i + 1])


def gaussian_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn only from the passed generator."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class CountCalls:
    """A denoiser that counts its calls: a sampler's number of function evaluations (NFE)."""

    def __init__(self, denoiser):
        self.denoiser, self.schedule, self.calls = denoiser, denoiser.schedule, 0

    def __call__(self, x_t: Tensor, t, **cond):
        self.calls += 1
        return self.denoiser(x_t, t, **cond)

    def __getattr__(self, name: str):  # the wrapped denoiser's other attributes (net, prediction, ...)
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)
