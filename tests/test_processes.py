"""The noise processes behind one interface (NoiseSchedule): discrete VP, continuous VP, EDM and rectified flow;
the prediction types written for general (alpha, sigma); every (alpha, sigma) sampler on every process."""

import math

import numpy as np

import pytest
import torch

from diffuse import Denoiser, Schedule
from diffuse.denoiser import PREDICTION_TYPES, edm_scalings, predict, scales, training_target
from diffuse.samplers import SAMPLERS
from diffuse.schedule import EDM, Flow, VPCosine, cosine_alphabar

from conftest import GaussianMixture, gaussian_eps
from test_solvers import MIXTURE, exact_flow_end, mixture_covariance

PROCESSES = {"linear": Schedule.linear, "vp_cosine": VPCosine, "edm": EDM, "flow": Flow}


def test_closed_forms():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    edm, flow, vp = EDM(), Flow(), VPCosine()
    torch.testing.assert_close(edm.sigma(t), 80 * t) and torch.testing.assert_close(edm.alpha(t), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(flow.alpha(t), 1 - t) and torch.testing.assert_close(flow.sigma(t), t)
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(vp.alphabar_at(t), cosine_alphabar(t))
    # continuous VP cosine agrees with the discrete cosine schedule at its steps (before the discrete clipping at T)
    disc = Schedule.cosine()
    n = torch.arange(1, 990)
    torch.testing.assert_close(vp.alphabar_at(n.double() / 1000), disc.alphabar[n], rtol=1e-10, atol=0)
    # EDM's model time is 1000 c_noise = 250 ln sigma; its training sigmas are log-normal(-1.2, 1.2)
    assert float(edm.model_time(torch.tensor(0.5))) == pytest.approx(250 * math.log(40))
    ln_sigma = (EDM(sigma_min=1e-9, sigma_max=1e9).sample_t(100_000, torch.Generator().manual_seed(0)) * 1e9).log()
    assert float(ln_sigma.mean()) == pytest.approx(-1.2, abs=0.02) and float(ln_sigma.std()) == pytest.approx(1.2, abs=0.02)
    logit = Flow(t_min=1e-12).sample_t(100_000, torch.Generator().manual_seed(0)).logit()
    assert float(logit.mean()) == pytest.approx(0, abs=0.02) and float(logit.std()) == pytest.approx(1, abs=0.02)
    u = VPCosine().sample_t(100_000, torch.Generator().manual_seed(0))
    assert float(u.min()) >= 1e-3 and float(u.mean()) == pytest.approx(0.5005, abs=0.005)


@pytest.mark.parametrize("kind", sorted(PROCESSES))
def test_inverses_and_grids(kind):
    s = PROCESSES[kind]()
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(s.t_from_log_snr(s.log_snr(t)), t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s.t_from_ve_sigma(s.ve_sigma(t)), t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s.t_from_model_time(s.model_time(t)), t, rtol=1e-9, atol=1e-12)
    for spacing in ("trailing", "linspace", "quadratic", "karras", "log_snr"):
        for steps in (1, 7, 20):
            ts = s.grid(steps, spacing)
            assert len(ts) == steps + 1 and ts[-1] == 0 and bool((ts[1:] < ts[:-1]).all())
            assert float(ts[0]) == pytest.approx(s.t_top) and float(s.log_snr(ts[0])) >= -10.2 - 1e-9


@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
@pytest.mark.parametrize("kind", sorted(PROCESSES))
def test_every_prediction_type_round_trips_on_every_process(kind, prediction):
    """predict(training_target(x0, eps)) gives back (x0, eps): the conversions hold for general (alpha, sigma)."""
    s = PROCESSES[kind]()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    alpha, sigma = scales(s, t, x0)
    x_t = alpha * x0 + sigma * eps
    pred = predict(training_target(x0, eps, alpha, sigma, prediction), x_t, alpha, sigma, prediction)
    torch.testing.assert_close(pred.x0, x0) and torch.testing.assert_close(pred.eps, eps)


def test_edm_preconditioning_is_table_1():
    """c_skip + c_out^2 / sigma_d^2 ... the identities of Karras et al. (2022), appendix B.6: the effective target has
    unit variance, c_skip(0) = 1, c_out(0) = 0."""
    sig = torch.tensor([0.0, 0.5, 2.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = edm_scalings(sig, 0.5)
    torch.testing.assert_close(c_skip, 0.25 / (sig**2 + 0.25)) and torch.testing.assert_close(c_in, 1 / (sig**2 + 0.25).sqrt())
    assert float(c_skip[0]) == 1 and float(c_out[0]) == 0
    # F_target = (x0 - c_skip (x0 + sigma n)) / c_out has unit variance for x0 ~ N(0, sigma_d^2), n ~ N(0, 1)
    var_f = ((1 - c_skip[1:]) ** 2 * 0.25 + c_skip[1:] ** 2 * sig[1:] ** 2) / c_out[1:] ** 2
    torch.testing.assert_close(var_f, torch.ones(3, dtype=torch.float64))


def exact_denoiser(kind: str, prediction: str) -> Denoiser:
    """The exact denoiser of the 2-D mixture on a process, through a network of the given prediction type (the
    network undoes EDM's input scaling c_in / alpha to find x_t)."""
    s = PROCESSES[kind]()
    mix = GaussianMixture(s, **MIXTURE)
    den = Denoiser(None, s, prediction=prediction)

    def net(inp, model_time):
        t = s.t_from_model_time(model_time)
        alpha, sigma = scales(s, t, inp)
        x_t = inp * alpha / edm_scalings(sigma / alpha, den.sigma_data)[2] if prediction == "edm" else inp
        eps = mix.eps(x_t, model_time)
        x0 = (x_t - sigma * eps) / alpha
        return training_target(x0, eps, alpha, sigma, prediction, den.sigma_data)

    den.net = net
    return den, mix


def covariance_error(kind, prediction, name, steps, spacing="trailing", n=4000):
    den, mix = exact_denoiser(kind, prediction)
    s = den.schedule
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(n, 2, 1, 1, generator=g, dtype=torch.float64) * s.prior_std
    x0 = SAMPLERS[name](den, x_T, s.grid(steps, spacing), generator=g).flatten(1)
    return float((torch.cov(x0.T) - mixture_covariance(mix)).norm())


DETERMINISTIC = ("ddim", "dpmpp-2m", "dpmpp-3m", "dpmpp-2s", "euler", "heun", "dpm2")


@pytest.mark.parametrize("kind,prediction,spacing", [("vp_cosine", "v", "trailing"), ("edm", "edm", "karras"),
                                                     ("flow", "flow", "trailing")])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_every_deterministic_sampler_converges_on_every_process(kind, prediction, spacing, name):
    """With the exact denoiser of a 2-D mixture, the covariance error shrinks as steps grow and is near the
    Monte-Carlo floor (~0.02 for 4,000 samples) at 50 steps (0.06 for the first-order ddim and euler)."""
    errors = [covariance_error(kind, prediction, name, steps, spacing) for steps in (5, 50)]
    assert errors[1] < errors[0] and errors[1] < (0.06 if name in ("ddim", "euler") else 0.035), errors


ORDERS = [("ddim", {}, 1), ("euler", {}, 1), ("heun", {}, 2), ("dpm2", {}, 2), ("dpmpp-2m", {}, 2), ("dpmpp-2s", {}, 2),
          ("dpmpp-3m", {"reference_3m": False}, 3), ("dpmpp-3m", {}, 2)]


@pytest.mark.parametrize("name,kw,order", ORDERS)
@pytest.mark.parametrize("kind", ["vp_cosine", "edm", "flow"])
def test_every_ode_solver_has_its_order_on_every_process(kind, name, kw, order):
    """Gaussian data N(0.5, 0.3^2), whose probability-flow ODE is known in closed form on any (alpha, sigma) process
    (test_solvers.exact_flow_end): the error against it at 32, 64 and 128 log-SNR-uniform steps falls with the
    solver's order as the log-log slope (1 for DDIM and Euler, 2 for Heun, DPM2, 2M, 2S; the text-book 3M gains an
    order more on equal lambda steps, where its error terms cancel)."""
    s = PROCESSES[kind]()
    mu, std = 0.5, 0.3
    den = Denoiser(gaussian_eps(s, mu, std), s)
    x_T = torch.linspace(-3, 3, 101, dtype=torch.float64).view(-1, 1, 1, 1) * s.prior_std
    errors = []
    for n in (32, 64, 128):
        grid = s.grid(n, "log_snr")  # the step into 0 returns the x_0 prediction at the last positive time
        reference = den(exact_flow_end(x_T, s, float(grid[0]), float(grid[-2]), mu, std), float(grid[-2])).x0
        errors.append(float((SAMPLERS[name](den, x_T, grid, **kw) - reference).abs().max()))
    slopes = -np.diff(np.log(errors)) / np.log(2)
    if order == 3:
        assert slopes.min() > 2.7, errors
    else:
        assert slopes[-1] == pytest.approx(order, abs=0.15), errors


@pytest.mark.parametrize("kind,prediction", [("vp_cosine", "eps"), ("edm", "edm"), ("flow", "flow")])
def test_ancestral_samplers_run_on_every_process(kind, prediction):
    for name in ("ddpm", "euler-ancestral"):
        den, mix = exact_denoiser(kind, prediction)
        s = den.schedule
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn(4000, 2, 1, 1, generator=g, dtype=torch.float64) * s.prior_std
        x0 = SAMPLERS[name](den, x_T, s.grid(200, "karras" if kind == "edm" else "trailing"), generator=g).flatten(1)
        assert float((torch.cov(x0.T) - mixture_covariance(mix)).norm()) < 0.06, (kind, name)


def test_euler_on_the_flow_ode_is_ddim():
    """On rectified flow, Euler in t on dx/dt = u = eps - x_0 (Liu et al. 2022), Euler in sigma / alpha and DDIM are one
    update: x_s = x_t + (s - t) u = (1 - s) x0 + s eps. Equal to float64 precision."""
    den, _ = exact_denoiser("flow", "flow")
    grid = den.schedule.grid(12)
    x_T = torch.randn(500, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x_T
    for t, s in zip(grid[:-1].tolist(), grid[1:].tolist()):
        x = x + (s - t) * den.raw(x, t)
    ddim = SAMPLERS["ddim"](den, x_T, grid)
    torch.testing.assert_close(ddim, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(SAMPLERS["euler"](den, x_T, grid), x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["sde-em", "sde-pc", "ode-rk45"])
@pytest.mark.parametrize("kind", ["edm", "flow"])
def test_vp_only_samplers_say_so(kind, name):
    den, _ = exact_denoiser(kind, "eps")
    with pytest.raises(ValueError, match=f"integrates the variance-preserving SDE, and this model's process is {kind}"):
        SAMPLERS[name](den, torch.zeros(2, 2, 1, 1, dtype=torch.float64), den.schedule.grid(2, "linspace"))


def test_vp_sde_samplers_run_on_continuous_vp():
    den, mix = exact_denoiser("vp_cosine", "eps")
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4000, 2, 1, 1, generator=g, dtype=torch.float64)
    x0 = SAMPLERS["sde-em"](den, x_T, den.schedule.grid(500), generator=g).flatten(1)
    assert float((torch.cov(x0.T) - mixture_covariance(mix)).norm()) < 0.06


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="prediction must be one of eps, x0, v, flow, edm, got 'score'"):
        Denoiser(None, Flow(), prediction="score")
    with pytest.raises(ValueError, match='spacing "leading" numbers discrete steps'):
        Flow().grid(10, "leading")
    with pytest.raises(ValueError, match="has no 'every step'"):
        EDM().grid(None)


@pytest.mark.parametrize("config", ["configs/mnist_flow.toml", "configs/mnist_edm.toml"])
def test_flow_and_edm_recipes_train_sample_and_resume_from_the_cli(tmp_path, config):
    """The two recipes beside the VP demo: training lowers the loss from its start, samples are finite digits-shaped
    arrays, and the run resumes exactly like a VP run."""
    import json

    import numpy as np

    from diffuse.app.cli import main
    from test_cli import TINY, _sets

    out = tmp_path / "run"
    sets = _sets(TINY + ["train.steps=30", "train.log_every=5", "train.checkpoint_every=15", "train.lr=3e-3"])
    assert main(["train", config, *sets, "--out", str(out)]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert main(["sample", str(out), "--n", "4", "--out", str(tmp_path / "s.npy")]) == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (4, 1, 8, 8) and np.isfinite(x).all() and x.std() > 0.01
    assert main(["sample", str(out), "--n", "4", "--sampler", "sde-em", "--out", str(tmp_path / "e.npy")]) == 2
