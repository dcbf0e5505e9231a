"""Samplers against diffusers (same eps function, same noise) and against analytic answers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffuse import Denoiser, Schedule
from diffuse.samplers import SAMPLERS, ddim, ddpm

from conftest import gaussian_eps

SHAPE = (4, 2, 5, 5)


def toy_eps(x, index):
    """A smooth, nonlinear eps(x_t, t) that depends on both arguments (no trained net needed)."""
    tt = index.to(x.dtype).view(-1, 1, 1, 1) / 1000
    return torch.tanh(0.8 * x + tt) * (0.5 + 0.5 * tt) + 0.1 * torch.sin(3 * x)


def reference_trajectory(scheduler, x, generator):
    xs = []
    for t in scheduler.timesteps:
        x = scheduler.step(toy_eps(x, t.reshape(1).expand(x.shape[0])), t, x, generator=generator).prev_sample
        xs.append(x)
    return xs


def our_trajectory(sampler, schedule, x, grid, generator, **kw):
    xs = []
    sampler(Denoiser(toy_eps, schedule), x, grid, generator=generator,
            callback=lambda step: xs.append(step.x_next), **kw)
    return xs


def float64_tables(scheduler, schedule):
    """diffusers keeps float32 tables; ours are float64. Compare the algorithms at equal precision
    (after checking that the two schedules agree to float32 precision)."""
    torch.testing.assert_close(scheduler.betas, schedule.betas[1:].float())
    scheduler.betas = schedule.betas[1:].clone()
    scheduler.alphas = 1 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, 0)
    return scheduler


def _diffusers_kw(kind):
    return dict(num_train_timesteps=1000, beta_schedule="linear" if kind == "linear" else "squaredcos_cap_v2",
                clip_sample=False)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
@pytest.mark.parametrize("steps", [None, 50])
def test_ddpm_matches_diffusers(kind, variance, steps):
    schedule = Schedule.linear() if kind == "linear" else Schedule.cosine()
    ref = float64_tables(DDPMScheduler(**_diffusers_kw(kind),
                                       variance_type="fixed_small" if variance == "beta_tilde" else "fixed_large"), schedule)
    ref.set_timesteps(steps or 1000)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = reference_trajectory(ref, x_T, torch.Generator().manual_seed(1))
    ours = our_trajectory(ddpm.sample, schedule, x_T, schedule.grid_from_indices(ref.timesteps),
                          torch.Generator().manual_seed(1), variance=variance)
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
# not "linspace": diffusers' DDIMScheduler always steps to t - T // steps, which is off the
# linspace grid (it lands between its points); we step to the next grid point.
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers(eta, spacing):
    schedule = Schedule.linear()
    ref = float64_tables(DDIMScheduler(**_diffusers_kw("linear"), set_alpha_to_one=True, timestep_spacing=spacing), schedule)
    ref.set_timesteps(50)
    grid = schedule.grid(50, spacing)
    assert torch.allclose(grid, schedule.grid_from_indices(ref.timesteps))  # same grid, built by us
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g_ref = torch.Generator().manual_seed(2)
    expected = []
    x = x_T
    for t in ref.timesteps:
        x = ref.step(toy_eps(x, t.reshape(1).expand(4)), t, x, eta=eta, generator=g_ref).prev_sample
        expected.append(x)
    ours = our_trajectory(ddim.sample, schedule, x_T, grid, torch.Generator().manual_seed(2), eta=eta)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,kw,steps", [("ddim", {"eta": 1.0}, None)])  # every sampler's defaults: test_solvers.py
def test_samplers_recover_gaussian_data(name, kw, steps):
    """With the exact denoiser of N(mu, std^2) data, samples have that mean and variance."""
    schedule = Schedule.linear()
    mu, std = 0.5, 0.3
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(20_000, 1, 1, 1, generator=g, dtype=torch.float64)
    x0 = SAMPLERS[name](Denoiser(gaussian_eps(schedule, mu, std), schedule), x_T, schedule.grid(steps),
                        generator=g, **kw)
    assert float(x0.mean()) == pytest.approx(mu, abs=0.01)
    assert float(x0.std()) == pytest.approx(std, rel=0.03)


@pytest.mark.parametrize("name,kw", [("ddpm", {}), ("ddim", {"eta": 0.0})])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_sub_grid_error_shrinks_with_steps(name, kw, spacing):
    """On sub-grids the sampled variance of Gaussian data converges to the truth as steps grow."""
    schedule = Schedule.linear()
    den = Denoiser(gaussian_eps(schedule, 0.5, 0.3), schedule)
    errors = []
    for steps in (20, 100, 500):
        g = torch.Generator().manual_seed(4)
        x_T = torch.randn(20_000, 1, 1, 1, generator=g, dtype=torch.float64)
        x0 = SAMPLERS[name](den, x_T, schedule.grid(steps, spacing), generator=g, **kw)
        errors.append(abs(float(x0.std()) - 0.3))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01


# samplers that draw noise, with the options that make them do so
STOCHASTIC = {"ddpm": {}, "ddim": {"eta": 1.0}, "euler-ancestral": {}, "heun": {"s_churn": 5.0}, "sde-em": {}, "sde-pc": {}}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_contract(name):
    """Shapes, determinism under a seed, one callback per step, and the last step lands on t = 0."""
    schedule = Schedule.linear()
    den = Denoiser(toy_eps, schedule)
    ts = schedule.grid(10)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    steps = []
    kw = STOCHASTIC.get(name, {})
    a = SAMPLERS[name](den, x_T, ts, generator=torch.Generator().manual_seed(5), callback=steps.append, **kw)
    b = SAMPLERS[name](den, x_T, ts, generator=torch.Generator().manual_seed(5), **kw)
    c = SAMPLERS[name](den, x_T, ts, generator=torch.Generator().manual_seed(6), **kw)
    assert a.shape == x_T.shape and torch.equal(a, b)
    assert torch.allclose(a, c) == (name not in STOCHASTIC)  # noise only from the generator, and only when stochastic
    if SAMPLERS[name].calls_per_step:  # a fixed grid: one report per step (the adaptive ODE solver picks its own)
        assert [s.index for s in steps] == list(range(10))
    assert steps[-1].s == 0.0 and torch.equal(steps[-1].x_next, a) and steps[0].x is x_T
    # the last step of an eps-model lands exactly on the predicted x_0 (with churn, on that of the churned x)
    if name != "heun":
        torch.testing.assert_close(steps[-1].x0, a)


def test_bad_grids_are_refused():
    schedule = Schedule.linear()
    den = Denoiser(toy_eps, schedule)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="end at t = 0"):
        ddim.sample(den, x, torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="no time twice in a row"):  # jumps back up are allowed (RePaint), stalls not
        ddim.sample(den, x, torch.tensor([0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ddim.sample(den, x, torch.tensor([1.2, 0.0]))
    with pytest.raises(ValueError, match="variance"):
        ddpm.sample(den, x, schedule.grid(5), variance="large")


# --- the one walk: start, projection, jumps back up ----------------------------------------------------------------
def test_walk_with_a_projection_equals_a_hand_written_loop():
    """DDIM with a projection that pins the first half of x to a known image noised to s (the inpainting step of
    RePaint, Lugmayr et al. 2022, eq. 8) equals the same loop written out."""
    schedule = Schedule.linear()
    den = Denoiser(toy_eps, schedule)
    grid = schedule.grid(10)
    known = torch.linspace(-1, 1, math.prod(SHAPE), dtype=torch.float64).reshape(SHAPE)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[..., :2] = True

    def project(x, s):
        noised = schedule.q_sample(known, torch.tensor(s, dtype=torch.float64), torch.randn(SHAPE, generator=g_proj, dtype=torch.float64))
        return torch.where(mask, noised, x)

    g_proj = torch.Generator().manual_seed(5)
    ours = ddim.sample(den, x_T, grid, project=project)
    g_proj = torch.Generator().manual_seed(5)
    x = x_T
    for t, s in zip(grid[:-1].tolist(), grid[1:].tolist()):
        pred = den(x, t)
        s64 = torch.tensor(s, dtype=torch.float64)
        x = float(schedule.alpha(s64)) * pred.x0 + float(schedule.sigma(s64)) * pred.eps  # eq. 12
        x = project(x, s)
    torch.testing.assert_close(ours, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[mask], known[mask])  # at s = 0 the pinned half is the known image itself


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m", "heun", "ddpm"])
def test_generate_from_a_start(sampler):
    """t_start = 0 returns the input; t_start at the top is the ordinary run with the same noise; a partial run
    from q(x_t0 | x_0) of Gaussian data with the exact denoiser ends with the distribution of a full run."""
    from diffuse.generate import generate

    schedule = Schedule.linear()
    den = Denoiser(gaussian_eps(schedule, 0.5, 0.3), schedule)
    n, shape = 4000, (1, 1, 1)
    x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(0))
    plain = generate(den, n, shape, sampler=sampler, steps=20, clip=False, seed=0)
    torch.testing.assert_close(generate(den, n, shape, sampler=sampler, steps=20, clip=False, seed=0, start=(x_T, 1.0)), plain)
    guide = torch.full((n, *shape), 0.9)
    assert torch.equal(generate(den, n, shape, sampler=sampler, steps=20, seed=0, start=(guide, 0.0)), guide)
    t0 = 0.6
    x_t0 = schedule.q_sample(0.5 + 0.3 * torch.randn((n, *shape), generator=torch.Generator().manual_seed(1)),
                             torch.tensor(t0), torch.randn((n, *shape), generator=torch.Generator().manual_seed(2)))
    calls = []
    x0 = generate(den, n, shape, sampler=sampler, steps=20, clip=False, seed=0, start=(x_t0, t0), callback=calls.append)
    assert calls[0].t == pytest.approx(t0) and len(calls) == 1 + int((schedule.grid(20) < t0).sum()) - 1
    # the same distribution as the full run (whose last step, from t = 1/20, shrinks the spread below 0.3)
    assert float(x0.mean()) == pytest.approx(float(plain.mean()), abs=0.02)
    assert float(x0.std()) == pytest.approx(float(plain.std()), rel=0.04)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp-2m"])
def test_a_jump_back_up_draws_from_the_forward_process(sampler):
    """A grid 1 -> 0.3 -> 0.7 -> ... -> 0 (RePaint's resampling): after the jump x_0.7 has the marginal of the data
    at t = 0.7, N(alpha mu, alpha^2 std^2 + sigma^2) (Monte Carlo, 20,000 samples), and the run ends with the
    distribution of the same grid without the jump; the multistep history restarts after the jump."""
    schedule = Schedule.linear()
    mu, std = 0.5, 0.3
    den = Denoiser(gaussian_eps(schedule, mu, std), schedule)
    top = schedule.grid(200)  # fine enough that the last step's shrinkage of the spread is < 1%
    grid = torch.cat([top[top >= 0.3], torch.tensor([0.7], dtype=torch.float64), top[top < 0.7]])
    x_T = torch.randn(20_000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = []
    x0 = SAMPLERS[sampler](den, x_T, grid, generator=torch.Generator().manual_seed(1), callback=steps.append)
    jump = next(st for st in steps if st.s > st.t)
    assert (jump.t, jump.s, jump.x0) == (pytest.approx(0.3), pytest.approx(0.7), None)
    a, s = float(schedule.alpha(torch.tensor(0.7))), float(schedule.sigma(torch.tensor(0.7)))
    assert float(jump.x_next.mean()) == pytest.approx(a * mu, abs=0.02)
    assert float(jump.x_next.var()) == pytest.approx(a**2 * std**2 + s**2, rel=0.03)
    plain = SAMPLERS[sampler](den, x_T, top, generator=torch.Generator().manual_seed(1))  # the same grid, no jump
    assert float(x0.mean()) == pytest.approx(float(plain.mean()), abs=0.01)
    assert float(x0.std()) == pytest.approx(float(plain.std()), rel=0.02)


def test_every_grid_sampler_takes_a_projection_and_the_adaptive_one_refuses_it():
    schedule = Schedule.linear()
    den = Denoiser(toy_eps, schedule)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, info in SAMPLERS.items():
        if info.calls_per_step == 0:
            with pytest.raises(ValueError, match="no step to project after"):
                info(den, x_T, schedule.grid(2, "linspace"), project=lambda x, s: x)
            continue
        seen = []
        out = info(den, x_T, schedule.grid(4), generator=torch.Generator().manual_seed(0),
                   project=lambda x, s: seen.append(s) or torch.zeros_like(x))
        assert seen == schedule.grid(4)[1:].tolist() and torch.equal(out, torch.zeros_like(x_T)), name
