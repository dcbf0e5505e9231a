"""Guidance wrappers against the exact answers of a Gaussian mixture, and thresholding in closed form."""

import pytest
import torch

from diffuse import Denoiser, Schedule
from diffuse.guidance import (ClassifierFreeGuidance, ClassifierGuidance, ClipX0, Conditioned, DynamicThreshold,
                              SplitCalls, dynamic_threshold, guided_eps)
from diffuse.samplers import SAMPLERS

from conftest import GaussianMixture
from test_solvers import ACCURATE, MIXTURE


@pytest.fixture
def mix():
    return GaussianMixture(Schedule.linear(), **MIXTURE)


def points(n=64, seed=0):
    return torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5


def test_guided_eps_formula():
    c, u = torch.tensor([1.0]), torch.tensor([3.0])
    assert guided_eps(c, u, 0.0) == c  # w = 0: the conditional model
    assert guided_eps(c, u, 2.0) == 3 * c - 2 * u  # (1 + w) eps_c - w eps_u (Ho & Salimans 2022, eq. 6)


@pytest.mark.parametrize("t", [0.05, 0.4, 0.9])
def test_cfg_matches_its_definition_and_w0_is_the_conditional(mix, t):
    den = Denoiser(mix.eps, mix.schedule)
    x, y = points(), torch.full((64,), 1)
    cond = den(x, t, label=y)
    uncond = den(x, t, label=torch.full((64,), mix.K))
    at0 = ClassifierFreeGuidance(den, 0.0, {"label": y}, {"label": torch.full((64,), mix.K)})(x, t)
    torch.testing.assert_close(at0.eps, cond.eps)
    w = ClassifierFreeGuidance(den, 3.0, {"label": y}, {"label": torch.full((64,), mix.K)})(x, t)
    torch.testing.assert_close(w.eps, 4 * cond.eps - 3 * uncond.eps)
    torch.testing.assert_close(w.x0, 4 * cond.x0 - 3 * uncond.x0)  # x_0 follows eps (affine in it at fixed x_t)


def test_guidance_interval_guides_inside_and_is_the_conditional_model_outside(mix):
    """Kynkaanniemi et al. 2024: eps~ of eq. 6 where lo < sigma_t/alpha_t <= hi, the conditional model (in one network
    call) elsewhere, per example when a batch mixes noise levels."""
    calls = []

    def eps(x, index, label=None):
        calls.append(len(x))
        return mix.eps(x, index, label)

    den = Denoiser(eps, mix.schedule)
    x, y, null = points(), torch.full((64,), 1), torch.full((64,), mix.K)
    t = torch.tensor([0.05] * 32 + [0.6] * 32, dtype=torch.float64)
    level = mix.schedule.ve_sigma(t)
    lo, hi = float(level[0]) * 2, float(level[-1]) * 2  # the second half inside, the first half below
    full = ClassifierFreeGuidance(den, 2.0, {"label": y}, {"label": null})(x, t)
    cond = den(x, t, label=y)
    got = ClassifierFreeGuidance(den, 2.0, {"label": y}, {"label": null}, interval=(lo, hi))(x, t)
    torch.testing.assert_close(got.eps[32:], full.eps[32:])
    torch.testing.assert_close(got.eps[:32], cond.eps[:32])
    torch.testing.assert_close(got.x0[:32], cond.x0[:32])
    calls.clear()
    outside = ClassifierFreeGuidance(den, 2.0, {"label": y}, {"label": null}, interval=(lo, hi))(x, 0.05)
    assert calls == [64]  # one conditional call, no unconditional half
    torch.testing.assert_close(outside.eps, den(x, 0.05, label=y).eps)
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        ClassifierFreeGuidance(den, 2.0, {"label": y}, {"label": null}, interval=(3.0, 1.0))


def test_generate_with_a_guidance_interval(mix):
    """An interval that holds every level of the grid is plain guidance; one that holds none is w = 0."""
    from diffuse.generate import generate

    den = Denoiser(mix.eps, mix.schedule)
    kw = dict(sampler="ddim", steps=10, cond={"label": torch.full((16,), 1)}, seed=3, clip=False, uncond={"label": torch.full((16,), mix.K)})
    plain = generate(den, 16, (2, 1, 1), guidance=2.0, **kw)
    torch.testing.assert_close(generate(den, 16, (2, 1, 1), guidance=2.0, guidance_interval=(0.0, 1e9), **kw), plain)
    none = generate(den, 16, (2, 1, 1), guidance=2.0, guidance_interval=(1e8, 1e9), **kw)
    torch.testing.assert_close(none, generate(den, 16, (2, 1, 1), guidance=0.0, **kw))
    assert not torch.allclose(none, plain)


def test_split_calls_give_the_same_prediction_in_calls_of_at_most_max_batch():
    """A call of 10 images at max_batch 4 runs as calls of 4, 4 and 2, each with its rows of t and of every condition,
    and returns the unsplit prediction, learned variance included (a class-conditional U-Net with attention)."""
    from diffuse.nets.unet import UNet
    from test_unet import perturb, small_cfg

    net = perturb(UNet(small_cfg(class_conditional=True), in_channels=1, image_size=8, out_channels=2, num_classes=10)).eval()
    sizes = []

    def recorded(x, index, **cond):
        sizes.append(len(x))
        return net(x, index, **cond)

    den = Denoiser(recorded, Schedule.linear(), learned_variance=True)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(10, 1, 8, 8, generator=g), torch.rand(10, generator=g, dtype=torch.float64), torch.arange(10)
    with torch.no_grad():
        whole, split = den(x, t, label=y), SplitCalls(den, 4)(x, t, label=y)
        assert sizes == [10, 4, 4, 2]
        for a, b in [(whole.x0, split.x0), (whole.eps, split.eps), (whole.variance_mix, split.variance_mix)]:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # float32 kernels round a little by batch size
        sizes.clear()
        torch.testing.assert_close(SplitCalls(den, 3)(x, 0.4, label=y).eps, den(x, 0.4, label=y).eps, rtol=1e-4, atol=1e-5)
        assert sizes == [3, 3, 3, 1, 10]  # a number t goes whole to every call
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        SplitCalls(den, 0)


def test_generate_never_doubles_the_networks_batch_for_guidance(mix):
    """Classifier-free guidance asks for 2n images per step; generate runs them as two calls of n, with the same
    samples as guidance in one call of 2n (the mixture's network treats each point on its own)."""
    from diffuse.generate import generate

    sizes = []

    def eps(x, index, label=None):
        sizes.append(len(x))
        return mix.eps(x, index, label)

    den = Denoiser(eps, mix.schedule)
    y, null = torch.full((16,), 1), torch.full((16,), mix.K)
    got = generate(den, 16, (2, 1, 1), sampler="ddim", steps=10, cond={"label": y}, uncond={"label": null}, guidance=2.0,
                   seed=3, clip=False)
    assert sizes == [16] * 20
    x_T = torch.randn((16, 2, 1, 1), generator=torch.Generator().manual_seed(3))
    one_call = ClassifierFreeGuidance(den, 2.0, {"label": y}, {"label": null})
    sizes.clear()
    want = SAMPLERS["ddim"](one_call, x_T, mix.schedule.grid(10, "trailing"), generator=torch.Generator().manual_seed(3))
    assert sizes == [32] * 10
    torch.testing.assert_close(got, want.to(got.dtype))


def test_cfg_at_w0_samples_the_class_and_larger_w_concentrates_on_it(mix):
    """Sampling with w = 0 gives component k's distribution; growing w puts ever more mass on k
    (p(x|k)^(1+w) / p(x)^w sharpens p(k | x)) and pulls samples away from the other components."""
    den = Denoiser(mix.eps, mix.schedule)
    x_T = torch.randn(3000, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.full((3000,), 2)  # the smallest component, pi = 0.2
    ts = mix.schedule.grid(20, "log_snr")
    shares, posteriors = [], []
    for w in (0.0, 1.0, 4.0):
        x0 = SAMPLERS["dpmpp-2m"](ClassifierFreeGuidance(den, w, {"label": y}, {"label": torch.full_like(y, mix.K)}), x_T, ts).flatten(1)
        shares.append(float((mix.component(x0) == 2).double().mean()))
        posteriors.append(float(torch.softmax(mix.logits(x0.view(-1, 2, 1, 1), torch.tensor(-1.0)), 1)[:, 2].mean()))
        if w == 0:
            torch.testing.assert_close(x0.mean(0), mix.mu[2], atol=0.02, rtol=0)
            assert float(x0.std(0).mean()) == pytest.approx(float(mix.s[2]), rel=0.05)
    assert shares[0] > 0.99
    assert posteriors[0] < posteriors[1] < posteriors[2]


@pytest.mark.parametrize("t", [0.05, 0.4, 0.9])
def test_classifier_guidance_with_the_exact_classifier_is_the_exact_conditional(mix, t):
    """eps - sigma_t grad log p(y | x_t) at scale 1 is the conditional model's eps, for every t:
    grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t) (Dhariwal & Nichol 2021, sec. 4)."""
    den = Denoiser(mix.eps, mix.schedule)
    x, y = points(seed=2), torch.arange(64) % 3
    guided = ClassifierGuidance(den, mix.logits, y, scale=1.0)(x, t)
    exact = den(x, t, label=y)
    torch.testing.assert_close(guided.eps, exact.eps, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(guided.x0, exact.x0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ClassifierGuidance(den, mix.logits, y, scale=0.0)(x, t).eps, den(x, t).eps)


def test_classifier_guided_sampling_draws_the_class(mix):
    den = Denoiser(mix.eps, mix.schedule)
    x_T = torch.randn(2000, 2, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.full((2000,), 1)
    kw, steps, spacing = ACCURATE["ddim"]
    x0 = SAMPLERS["ddim"](ClassifierGuidance(den, mix.logits, y, 1.0), x_T, mix.schedule.grid(steps, spacing))
    assert float((mix.component(x0.flatten(1)) == 1).double().mean()) > 0.99
    torch.testing.assert_close(x0.flatten(1).mean(0), mix.mu[1], atol=0.03, rtol=0)


def test_dynamic_threshold_closed_form():
    x0 = torch.tensor([[0.5, -0.2, 0.1, 0.3], [3.0, -2.0, 0.5, 1.0]]).view(2, 4, 1, 1)
    out = dynamic_threshold(x0, 1.0)  # p = 1: s = max |x_0| (at least 1)
    torch.testing.assert_close(out[0], x0[0])  # within [-1, 1]: untouched
    torch.testing.assert_close(out[1], x0[1] / 3.0)  # scaled into [-1, 1], not clipped
    s = float(torch.quantile(x0[1].abs().flatten(), 0.5))  # p = 0.5: s = median |x| = 1.5 (> 1)
    torch.testing.assert_close(dynamic_threshold(x0, 0.5)[1], x0[1].clamp(-s, s) / s)
    with pytest.raises(ValueError, match="percentile"):
        DynamicThreshold(Denoiser(lambda x, t: x, Schedule.linear()), 1.5)


def test_threshold_wrappers_keep_eps_consistent_and_compose(mix):
    den = Denoiser(mix.eps, mix.schedule)
    x, y = points(seed=4) * 3, torch.arange(64) % 3
    for wrapped in (ClipX0(den), DynamicThreshold(ClassifierFreeGuidance(den, 2.0, {"label": y}, {"label": torch.full_like(y, mix.K)}), 0.9)):
        p = wrapped(x, 0.3)
        a, s = float(mix.schedule.alpha(0.3)), float(mix.schedule.sigma(0.3))
        torch.testing.assert_close(x, a * p.x0 + s * p.eps)
        assert float(p.x0.abs().max()) <= 1 + 1e-12
    cond = Conditioned(den, label=y)
    torch.testing.assert_close(cond(x, 0.3).eps, den(x, 0.3, label=y).eps)
