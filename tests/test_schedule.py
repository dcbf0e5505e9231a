import math

import pytest
import torch

from diffuse.schedule import Schedule, ScheduleConfig, cosine_alphabar, posterior


def test_linear_schedule_facts():
    s = Schedule.linear()
    assert s.T == 1000
    assert float(s.betas[1]) == pytest.approx(1e-4) and float(s.betas[1000]) == pytest.approx(0.02)
    assert float(s.alphabar[1000]) == pytest.approx(4.0358e-5, rel=1e-4)
    assert float(s.alphabar[500]) == pytest.approx(0.07859, rel=1e-4)


def test_cosine_schedule_facts():
    s = Schedule.cosine()
    assert float(s.alphabar[500]) == pytest.approx(0.4938, rel=1e-4)
    assert float(s.betas.max()) == pytest.approx(0.999)  # clipped at t = T
    # before clipping bites, alphabar follows the closed form f(t)/f(0)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(s.alphabar_at(t), cosine_alphabar(t), rtol=1e-10)


def test_continuous_time_matches_tables_and_log_snr():
    s = Schedule.linear()
    n = torch.tensor([0, 1, 17, 500, 1000])
    t = n.double() / s.T
    assert torch.allclose(s.alphabar_at(t), s.alphabar[n], rtol=1e-12)
    # between grid points log(alphabar) is linear: the midpoint is the geometric mean of its neighbours
    mid = (n[1:-1].double() + 0.5) / s.T
    assert torch.allclose(s.alphabar_at(mid), (s.alphabar[n[1:-1]] * s.alphabar[n[1:-1] + 1]).sqrt(), rtol=1e-12)
    tt = t[1:]
    ab = s.alphabar[n[1:]]
    assert torch.allclose(s.snr(tt), ab / (1 - ab)) and torch.allclose(s.log_snr(tt), (ab / (1 - ab)).log())
    # log-SNR decreases strictly with t
    grid = torch.linspace(0.001, 1, 999, dtype=torch.float64)
    assert bool((s.log_snr(grid).diff() < 0).all())


def test_posterior_matches_ho_eq7_for_adjacent_steps():
    s = Schedule.linear()
    for n in (2, 10, 500, 1000):
        t, u = torch.tensor(n / s.T, dtype=torch.float64), torch.tensor((n - 1) / s.T, dtype=torch.float64)
        c_x0, c_xt, var = posterior(s.alpha(t), s.sigma(t), s.alpha(u), s.sigma(u))
        ab, ab_prev, beta = s.alphabar[n], s.alphabar[n - 1], s.betas[n]
        assert float(c_x0) == pytest.approx(float(ab_prev.sqrt() * beta / (1 - ab)), rel=1e-9)
        assert float(c_xt) == pytest.approx(float((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)), rel=1e-9)
        assert float(var) == pytest.approx(float((1 - ab_prev) / (1 - ab) * beta), rel=1e-9)


def test_posterior_is_the_bayes_posterior_by_monte_carlo():
    """Fix x_0, draw x_s ~ q(x_s | x_0) then x_t ~ q(x_t | x_s): x_s given x_t is the posterior (eq. 6-7)."""
    g = torch.Generator().manual_seed(0)
    s = Schedule.linear()
    n_s, n_t = 300, 400
    x0 = 0.7
    N = 400_000
    xs = s.alpha(n_s / 1000) * x0 + s.sigma(n_s / 1000) * torch.randn(N, generator=g, dtype=torch.float64)
    a_ts = s.alpha(n_t / 1000) / s.alpha(n_s / 1000)
    xt = a_ts * xs + (1 - a_ts**2).sqrt() * torch.randn(N, generator=g, dtype=torch.float64)
    c_x0, c_xt, var = posterior(s.alpha(n_t / 1000), s.sigma(n_t / 1000), s.alpha(n_s / 1000), s.sigma(n_s / 1000))
    # linear regression of x_s on x_t: slope c_xt, intercept c_x0 x0, residual variance var
    cov = torch.cov(torch.stack([xt, xs]))
    slope = cov[0, 1] / cov[0, 0]
    resid = xs - (c_x0 * x0 + c_xt * xt)
    assert float(slope) == pytest.approx(float(c_xt), abs=5e-3)
    assert float(resid.mean()) == pytest.approx(0.0, abs=5e-3)
    assert float(resid.var()) == pytest.approx(float(var), rel=1e-2)


def test_closed_form_forward_matches_markov_chain_by_monte_carlo():
    """q(x_t | x_0) in one step (eq. 4) has the mean and variance of t steps of q(x_n | x_{n-1}) (eq. 2)."""
    g = torch.Generator().manual_seed(1)
    s = Schedule.linear(T=200, beta_start=1e-3, beta_end=0.04)
    x0 = torch.full((100_000,), 0.8, dtype=torch.float64)
    x = x0.clone()
    for n in range(1, 121):
        x = s.q_step(x, n, torch.randn(x.shape, generator=g, dtype=torch.float64))
    direct = s.q_sample(x0, torch.tensor(120 / 200), torch.randn(x.shape, generator=g, dtype=torch.float64))
    mean, var = float(s.alphabar[120].sqrt() * 0.8), float(1 - s.alphabar[120])
    for samples in (x, direct):
        assert float(samples.mean()) == pytest.approx(mean, abs=4 * math.sqrt(var / 1e5))
        assert float(samples.var()) == pytest.approx(var, rel=0.02)


@pytest.mark.parametrize("spacing,expected", [
    ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
    ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
])
def test_timestep_grids(spacing, expected):
    s = Schedule.linear()
    ts = s.grid(10, spacing)
    assert ts[-1] == 0 and len(ts) == 11
    idx = torch.round(s.model_time(ts[:-1])).long().tolist()
    assert idx == expected


def test_full_grid_and_model_time_ends():
    s = Schedule.linear()
    ts = s.grid()
    assert len(ts) == 1001 and float(ts[0]) == 1.0 and float(ts[-2]) == pytest.approx(1e-3)
    assert float(s.model_time(ts[0])) == pytest.approx(999) and float(s.model_time(ts[-2])) == pytest.approx(0)


def test_bad_config_values():
    with pytest.raises(ValueError, match="kind"):
        Schedule.from_config(ScheduleConfig(kind="quadratic"))
    with pytest.raises(ValueError, match="beta_start"):
        Schedule.from_config(ScheduleConfig(beta_start=0.1, beta_end=0.01))
    with pytest.raises(ValueError, match="steps"):
        Schedule.linear().grid(0)
    with pytest.raises(ValueError, match="spacing"):
        Schedule.linear().grid(10, "bogus")


STEP_COUNTS = (1, 2, 3, 7, 13, 20, 33, 50, 333, 999, 1000)  # many do not divide T = 1000


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "quadratic", "karras", "log_snr"])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_every_grid_starts_at_the_top_for_every_step_count(kind, spacing):
    """A K-step grid starts at the schedule's top step N (pure noise) and has K + 1 strictly decreasing times
    ending at 0; before, linspace and quadratic with K = 1 were [1/T, 0] and returned the input noise."""
    s = Schedule.linear() if kind == "linear" else Schedule.cosine()
    for steps in STEP_COUNTS:
        if steps > s.top_step:
            with pytest.raises(ValueError, match=f"between 1 and N = {s.top_step}"):
                s.grid(steps, spacing)
            continue
        ts = s.grid(steps, spacing)
        assert len(ts) == steps + 1 and ts[-1] == 0 and bool((ts[1:] < ts[:-1]).all()), (steps, ts)
        assert float(ts[0]) == pytest.approx(s.top_step / s.T, abs=1e-12), (steps, float(ts[0]))
        assert s.start_shortfall(ts) == pytest.approx(0, abs=1e-12)


def test_leading_keeps_its_published_meaning_and_measures_its_shortfall():
    """"leading" is DDIM's and diffusers' grid 1 + k T//K: it never reaches step T, and with few steps it starts
    where x_t still holds data (alpha = 1 at K = 1). generate() warns about it (test_bad_values.py)."""
    s = Schedule.linear()
    assert s.grid(1, "leading").tolist() == [0.001, 0.0]
    assert s.start_shortfall(s.grid(1, "leading")) > 0.99
    assert s.start_shortfall(s.grid(3, "leading")) == pytest.approx(float(s.alpha(torch.tensor(0.667)) - s.alpha(torch.tensor(1.0))))
    assert s.start_shortfall(s.grid(50, "leading")) < 0.01


def test_one_step_from_pure_noise_gives_the_data_mean():
    """With the exact denoiser of N(0.5, 0.5^2) data, one DDIM step from the top returns E[x_0 | x_T] ~= 0.5 on
    every spacing that starts at the top (before: 0.01 on linspace and quadratic, the input noise)."""
    from diffuse import Denoiser
    from diffuse.samplers import ddim

    from conftest import gaussian_eps

    s = Schedule.linear()
    den = Denoiser(gaussian_eps(s, 0.5, 0.5), s)
    x_T = torch.randn(20_000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for spacing in ("trailing", "linspace", "quadratic", "karras", "log_snr"):
        x0 = ddim.sample(den, x_T, s.grid(1, spacing))
        assert float(x0.mean()) == pytest.approx(0.5, abs=0.01), spacing


def test_cosine_grids_stop_at_log_snr_min():
    """The cosine schedule's last 4 of 1000 steps lie below log-SNR -10.2 (alpha_T = 5e-5): grids start at step 996;
    the linear schedule (log-SNR -10.1 at T) keeps all 1000. Without a floor every step is kept."""
    from diffuse.schedule import LOG_SNR_MIN, cosine_betas

    lin, cos = Schedule.linear(), Schedule.cosine()
    assert lin.top_step == 1000 and cos.top_step == 996
    assert float(cos.log_snr(torch.tensor(996 / 1000))) >= LOG_SNR_MIN > float(cos.log_snr(torch.tensor(997 / 1000)))
    assert Schedule(cosine_betas(), log_snr_min=-math.inf).top_step == 1000
    assert len(cos.grid()) == 997 and float(cos.grid()[0]) == pytest.approx(0.996)
