"""Zero-terminal-SNR schedules (Lin et al. 2024, Algorithm 1): the rescaled schedule's closed form, diffusers as an
oracle, sampling from alpha_T = 0 with an exact denoiser, and the combinations that cannot work refused by name."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffuse import Denoiser
from diffuse.config import RunConfig, apply_overrides
from diffuse.denoiser import training_target
from diffuse.guidance import ClassifierFreeGuidance, ClassifierGuidance
from diffuse.generate import generate
from diffuse.samplers import SAMPLERS, ddim
from diffuse.schedule import Schedule, ScheduleConfig, rescale_zero_terminal_snr
from diffuse.train import Trainer

from test_samplers import toy_eps
from test_train import BASE


def zsnr(kind: str = "linear", T: int = 1000) -> Schedule:
    return Schedule.from_config(ScheduleConfig(kind=kind, T=T, zero_terminal_snr=True))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_rescaling_gives_alphabar_T_zero_and_keeps_the_rest(kind):
    plain, z = Schedule.from_config(ScheduleConfig(kind=kind)), zsnr(kind)
    assert float(z.alphabar[-1]) == 0.0 and float(z.betas[-1]) == 1.0
    assert z.alphabar[1].item() == pytest.approx(plain.alphabar[1].item(), rel=1e-12)  # step 1 keeps its value
    snr = z.alphabar[1:] / (1 - z.alphabar[1:])
    assert bool((snr[1:] < snr[:-1]).all())  # the order of the SNRs is kept (strictly decreasing)
    # Algorithm 1 in closed form: sqrt(alphabar) is an affine map of the old one
    old = plain.alphabar[1:].sqrt()
    expected = (old - old[-1]) * old[0] / (old[0] - old[-1])
    torch.testing.assert_close(z.alphabar[1:].sqrt(), expected, atol=1e-12, rtol=1e-10)
    # diffusers' rescale_betas_zero_snr (float32) agrees
    ref = DDIMScheduler(beta_schedule="linear" if kind == "linear" else "squaredcos_cap_v2", rescale_betas_zero_snr=True)
    torch.testing.assert_close(z.alphabar[1:], ref.alphas_cumprod.double(), atol=1e-6, rtol=0)
    assert z.top_step == z.T and z.t_top == 1.0  # grids start at pure noise
    assert z.grid(10)[0].item() == 1.0


def test_continuous_time_is_monotone_and_invertible_up_to_alpha_zero():
    z = zsnr(T=50)
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    ab = z.alphabar_at(t)
    assert bool((ab[1:] < ab[:-1]).all()) and ab[-1].item() == 0.0
    assert bool(torch.isfinite(ab).all())
    torch.testing.assert_close(z.t_from_log_alphabar(ab.log()), t, atol=1e-12, rtol=0)
    # the last cell is linear in alphabar, so its VP-SDE rate -d log alphabar / dt is T / (T - n)
    n = torch.tensor([49.25, 49.5], dtype=torch.float64)
    torch.testing.assert_close(z.sde_beta(n / 50), 50 / (50 - n))
    with pytest.raises(ValueError, match="rescaling needs T >= 2"):
        rescale_zero_terminal_snr(torch.tensor([0.5]))


def gaussian_v(schedule, mu: float, std: float):
    """The exact v(x_t) for x_0 ~ N(mu, std^2 I): E[x_0 | x_t] = mu + alpha std^2 (x_t - alpha mu) / (alpha^2 std^2 +
    sigma^2), finite at alpha = 0 (where it is mu)."""

    def net(x, index):
        t = schedule.t_from_model_time(index)
        a = schedule.alpha(t).to(x.dtype).view(-1, 1, 1, 1)
        s = schedule.sigma(t).to(x.dtype).view(-1, 1, 1, 1)
        x0 = mu + a * std**2 * (x - a * mu) / (a**2 * std**2 + s**2)
        return training_target(x0, (x - a * x0) / s, a, s, "v")

    return net


@pytest.mark.parametrize("sampler", [name for name, info in SAMPLERS.items() if info.zero_snr])
def test_every_sampler_that_can_starts_at_alpha_zero_and_reaches_the_data(sampler):
    z, mu, std = zsnr(), 0.7, 0.4
    den = Denoiser(gaussian_v(z, mu, std), z, "v")
    steps = None if sampler == "ddpm" else 200  # enough steps that the grid's own error (std -0.06 at 20 steps of DDIM,
    # the same with and without the rescaling) is below the tolerance
    x = generate(den, 4000, (1, 2, 2), sampler=sampler, steps=steps, seed=0, clip=False)
    assert bool(torch.isfinite(x).all())
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(std, abs=0.02)


def test_ddim_matches_diffusers_from_zero_terminal_snr():
    """Same v-network, same start: diffusers' DDIM with rescale_betas_zero_snr, trailing spacing and v-prediction."""
    z = zsnr()
    ref = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
                        clip_sample=False, set_alpha_to_one=True)
    torch.testing.assert_close(ref.betas.double(), z.betas[1:], atol=2e-6, rtol=0)  # diffusers computes in float32
    ref.betas = z.betas[1:].clone()
    ref.alphas = 1 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, 0)
    ref.set_timesteps(25)
    assert torch.equal(z.grid(25), z.grid_from_indices(ref.timesteps))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = x
    for t in ref.timesteps:
        expected = ref.step(toy_eps(expected, t.reshape(1).expand(3)), t, expected).prev_sample
    ours = ddim.sample(Denoiser(toy_eps, z, "v"), x, z.grid(25))
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


def test_guidance_at_alpha_zero_is_finite_and_exact():
    z = zsnr(T=20)
    net = lambda x, index, label=None: 0.1 * x + (0.0 if label is None else label.view(-1, 1, 1, 1).to(x))  # noqa: E731
    den = Denoiser(net, z, "v")
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    cond, uncond = {"label": torch.tensor([1, 1])}, {"label": torch.tensor([0, 0])}
    g = ClassifierFreeGuidance(den, 2.0, cond, uncond)(x, one)
    c, u = den(x, one, **cond), den(x, one, **uncond)
    torch.testing.assert_close(g.x0, 3 * c.x0 - 2 * u.x0)  # eq. 6 on x_0 = the x_0 of eps~, no division by alpha_T
    torch.testing.assert_close(g.eps, 3 * c.eps - 2 * u.eps)
    assert bool(torch.isfinite(g.x0).all())
    classifier = lambda x, t: torch.stack([x.flatten(1).sum(1), -x.flatten(1).sum(1)], 1)  # noqa: E731
    guided = ClassifierGuidance(den, classifier, torch.tensor([0, 0]), 3.0)
    torch.testing.assert_close(guided(x, one).x0, den(x, one).x0)  # x_T is independent of y: no guidance at alpha = 0
    half = torch.tensor(0.5, dtype=torch.float64)
    assert not torch.allclose(guided(x, half).x0, den(x, half).x0)  # and the usual guidance elsewhere


def test_what_cannot_start_at_alpha_zero_is_refused_by_name():
    z = zsnr(T=20)
    for prediction in ("eps", "edm"):
        with pytest.raises(ValueError, match=f'prediction = "{prediction}".*alpha_T = 0.*"v"'):
            Denoiser(lambda x, i: x, z, prediction)
    den = Denoiser(lambda x, i: x, z, "v")
    for name in ("euler", "heun", "dpm2", "euler-ancestral", "sde-em", "sde-pc", "ode-rk45"):
        with pytest.raises(ValueError, match="zero-terminal-SNR.*use ddim"):
            generate(den, 2, (1, 2, 2), sampler=name, steps=5)
    for spacing in ("karras", "log_snr"):
        with pytest.raises(ValueError, match=f'spacing "{spacing}".*trailing'):
            z.grid(5, spacing)


def cfg(*overrides):
    return apply_overrides(RunConfig(), BASE + ["schedule.zero_terminal_snr=true", *overrides])


@pytest.mark.parametrize("overrides,match", [
    ([], 'model.prediction = "eps".*set model.prediction = "v"'),
    (["model.prediction=v", "sample.sampler=heun"], "sample.sampler = 'heun'.*zero-terminal-SNR"),
    (["model.prediction=v", "sample.sampler=ddim", "sample.spacing=karras"], 'spacing "karras"'),
    (["model.prediction=v", "schedule.kind=edm"], "zero_terminal_snr.*not a discrete beta schedule"),
    (["model.prediction=v", "train.loss_weighting=min_snr"], "min_snr.*0 at the last step.*'none'"),
    (["model.prediction=v", "train.loss_weighting=p2"], "p2.*never be trained"),
])
def test_incompatible_training_options_are_named(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        Trainer(cfg(*overrides), tmp_path / "run", progress=False)


def test_a_v_model_trains_on_it_and_sees_pure_noise(tmp_path):
    trainer = Trainer(cfg("model.prediction=v", "train.steps=2", "sample.sampler=dpmpp-2m"), tmp_path / "run", progress=False)
    assert trainer.denoiser.schedule.alpha(torch.tensor(1.0)).item() == 0.0
    assert trainer.denoiser.schedule.sample_t(20000, torch.Generator().manual_seed(0)).max().item() == 1.0  # t = T is drawn
    trainer.fit()
    assert math.isfinite(trainer.history[-1][1])
    assert trainer.objective.preview(trainer).is_file()  # generate stops with NonFiniteSample at a NaN: the grid is finite
