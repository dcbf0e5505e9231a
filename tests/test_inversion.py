"""DDIM inversion (samplers.ddim.invert, generate.invert) against the exact denoiser of Gaussian data: inversion then
sampling returns x0 with a first-order error on every process, and to float64 precision with fixed-point refinement."""

import math

import pytest
import torch

from conftest import GaussianMixture, gaussian_eps
from diffuse.denoiser import Denoiser
from diffuse.generate import generate, invert
from diffuse.samplers import NonFiniteSample, ddim
from diffuse.schedule import Schedule, ScheduleConfig

PROCESSES = ["linear", "cosine", "vp_cosine", "edm", "flow"]


def gaussian(kind: str):
    schedule = Schedule.from_config(ScheduleConfig(kind=kind))
    den = Denoiser(gaussian_eps(schedule, 0.3, 0.5), schedule, prediction="eps", bounded=False)
    x0 = 0.3 + 0.5 * torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return schedule, den, x0


def round_trip(den, schedule, x0, steps: int, refine: int = 0) -> float:
    grid = schedule.grid(steps, schedule.default_spacing).double()
    return float((ddim.sample(den, ddim.invert(den, x0, grid, refine=refine), grid) - x0).abs().max())


@pytest.mark.parametrize("kind", PROCESSES)
def test_inversion_then_sampling_is_first_order(kind):
    """The round trip's error halves as the steps double (measured order 0.85-0.99 from 50 to 400 steps)."""
    schedule, den, x0 = gaussian(kind)
    errors = [round_trip(den, schedule, x0, n) for n in (50, 100, 200, 400)]
    order = math.log2(errors[0] / errors[-1]) / 3
    assert 0.8 < order < 1.2, (errors, order)
    assert errors[-1] < 0.03


@pytest.mark.parametrize("kind", PROCESSES)
def test_refinement_converges_to_the_exact_inverse(kind):
    """Fixed-point iterations make each move the exact inverse of the sampling step: the error falls with every
    iteration, to float64 precision on the linear VP and EDM processes."""
    schedule, den, x0 = gaussian(kind)
    errors = [round_trip(den, schedule, x0, 50, k) for k in (0, 1, 3, 10)]
    assert all(b < a / 3 for a, b in zip(errors, errors[1:])), errors
    if kind in ("linear", "edm"):
        assert errors[-1] < 1e-8, errors


def test_inversion_of_a_sample_returns_its_noise():
    """x_T -> DDIM sample -> inversion gives x_T back, to first order in the steps."""
    schedule, den, _ = gaussian("linear")
    x_T = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = []
    for n in (100, 400):
        grid = schedule.grid(n).double()
        errors.append(float((ddim.invert(den, ddim.sample(den, x_T, grid), grid, refine=5) - x_T).abs().max()))
    assert errors[1] < errors[0] / 3 and errors[1] < 1e-3, errors


def test_generate_inverts_under_a_condition():
    """generate.invert binds the condition as generate does: with a mixture's label, rendering the inverted x_T with
    the same label returns x0; with another label it does not."""
    schedule = Schedule.linear()
    mix = GaussianMixture(schedule, [0.5, 0.5], [[-1.0] * 4, [1.0] * 4], [0.3, 0.3])
    den = Denoiser(mix.eps, schedule, prediction="eps", bounded=False)
    x0 = (1.0 + 0.3 * torch.randn(8, 4, 1, 1, generator=torch.Generator().manual_seed(2)))
    labels = torch.ones(8, dtype=torch.long)
    x_T = invert(den, x0, steps=200, cond={"label": labels}, refine=3)
    kw = dict(sampler="ddim", steps=200, eta=0.0, clip=False, start=(x_T, 1.0))
    same = generate(den, 8, (4, 1, 1), cond={"label": labels}, **kw)
    other = generate(den, 8, (4, 1, 1), cond={"label": torch.zeros(8, dtype=torch.long)}, **kw)
    assert float((same - x0).abs().max()) < 1e-3
    assert float((other - x0).abs().mean()) > 0.5


def test_inversion_errors():
    schedule, den, x0 = gaussian("linear")
    grid = schedule.grid(10).double()
    with pytest.raises(ValueError, match="refine must be an integer >= 0"):
        ddim.invert(den, x0, grid, refine=-1)
    with pytest.raises(ValueError, match="must end at t = 0"):
        ddim.invert(den, x0, grid[:-1])
    with pytest.raises(NonFiniteSample, match="inversion became non-finite at move 1"):
        ddim.invert(den, x0 * float("nan"), grid)
