"""CLIP guidance (noise-aware, GLIDE; plain on x_0 through the denoiser, k-diffusion) against the exact answers of a
Gaussian mixture: "CLIPs" whose embeddings have closed-form gradients, and one whose score is exactly log p(c | x_t)
- log p(c), the optimum of CLIP's loss (lecture 002), with which CLIP guidance is classifier guidance."""

import math

import pytest
import torch

from diffuse import Denoiser, Schedule
from diffuse.denoiser import scales
from diffuse.guidance import (ClassifierGuidance, ClipX0Guidance, NoisyClipGuidance, RandomShift, X0LossGuidance,
                              check_prompts, clip_score_grad, spherical_dist_loss)
from diffuse.samplers import SAMPLERS
from diffuse.tasks.video import ReconstructionGuidance, condition_frames

from conftest import GaussianMixture
from test_processes import exact_denoiser
from test_solvers import ACCURATE, MIXTURE
from test_zero_terminal_snr import zsnr

TIMES = [0.05, 0.4, 0.9]


@pytest.fixture
def mix():
    return GaussianMixture(Schedule.linear(), **MIXTURE)


def points(n=64, seed=0, shape=(2, 1, 1)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5


class LinearClip:
    """f(x) = W x / |W x|: a unit embedding with a closed-form gradient; ignores the time (a plain CLIP)."""

    def __init__(self, W, image_size=None):
        self.W, self.embed_dim = W, W.shape[0]
        if image_size is not None:
            self.image_size = image_size

    def image_embedding(self, x, model_time):
        u = x.flatten(1) @ self.W.T.to(x)
        return u / u.norm(dim=1, keepdim=True)

    def score_grad(self, x, g):
        """grad_x f(x) . g = W^T (g - (f . g) f) / |W x|, (B, D_x)."""
        u = x.flatten(1) @ self.W.T
        f = u / u.norm(dim=1, keepdim=True)
        return ((g - (f * g).sum(1, keepdim=True) * f) / u.norm(dim=1, keepdim=True)) @ self.W


class ExactClip:
    """f(x_t, t)_k = log p(k | x_t) - log p(k) of the mixture: with g = e_c, f . g is the lecture's optimum of CLIP's
    loss, log p(c | x_t) - log p(c). Not unit (a CLIP's f . g / tau is)."""

    def __init__(self, mix):
        self.mix = mix

    def image_embedding(self, x, model_time):
        return torch.log_softmax(self.mix.logits(x, model_time), dim=1) - self.mix.pi.log()


def W():
    return torch.tensor([[1.0, 0.5], [-0.3, 1.0], [0.2, 0.0]], dtype=torch.float64)


def unit(v):
    v = torch.as_tensor(v, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("t", TIMES)
def test_noisy_clip_gradient_is_the_closed_form_and_enters_eps_as_classifier_guidance(mix, t):
    """(a) grad_x f(x_t) . g by autograd equals W^T (g - (f.g) f) / |W x|, and eps~ = eps - s sigma_t grad exactly."""
    den, clip, x = Denoiser(mix.eps, mix.schedule), LinearClip(W()), points(seed=1)
    g = unit(torch.randn(64, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    closed = clip.score_grad(x.flatten(1), g).view_as(x)
    torch.testing.assert_close(clip_score_grad(clip, x, torch.zeros(64), g), closed, rtol=1e-12, atol=1e-12)
    s = 2.5
    guided, plain = NoisyClipGuidance(den, clip, g, s)(x, t), den(x, t)
    alpha, sigma = scales(mix.schedule, t, x)
    torch.testing.assert_close(guided.eps, plain.eps - s * sigma * closed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(guided.x0, (x - sigma * guided.eps) / alpha, rtol=1e-12, atol=1e-12)  # consistent
    torch.testing.assert_close(NoisyClipGuidance(den, clip, g, 0)(x, t).eps, plain.eps)


@pytest.mark.parametrize("kind,prediction", [("linear", "eps"), ("vp_cosine", "v"), ("edm", "edm"), ("flow", "flow")])
@pytest.mark.parametrize("t", TIMES)
def test_noisy_clip_with_the_optimal_clip_is_classifier_guidance_and_the_conditional(kind, prediction, t):
    """(b) f . g = log p(c | x_t) - log p(c): CLIP guidance at s = 1 is classifier guidance with the exact classifier at
    s = 1, which is the exact conditional model p(x_t | c), on every process."""
    den, mix = exact_denoiser(kind, prediction)
    x, y = points(seed=3), torch.arange(64) % 3
    g = torch.nn.functional.one_hot(y, 3).double()
    clip_guided = NoisyClipGuidance(den, ExactClip(mix), g, 1.0)(x, t)
    classifier_guided = ClassifierGuidance(den, mix.logits, y, 1.0)(x, t)
    torch.testing.assert_close(clip_guided.eps, classifier_guided.eps, rtol=1e-10, atol=1e-10)
    alpha, sigma = scales(den.schedule, t, x)
    index = den.schedule.model_time(torch.full((64,), t, dtype=torch.float64)).float()
    conditional = mix.eps(x, index, label=y)
    torch.testing.assert_close(clip_guided.eps, conditional, rtol=1e-6, atol=1e-6)


def test_noisy_clip_guided_sampling_draws_the_component(mix):
    """(b) DDIM guided by the optimal CLIP at s = 1 draws the same samples as classifier guidance, and they are the
    component c: its share, mean and spread within Monte Carlo error (2000 samples: mean +- 0.02, std +- 5%)."""
    den, n = Denoiser(mix.eps, mix.schedule), 2000
    x_T = torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, steps, spacing = ACCURATE["ddim"]
    grid = mix.schedule.grid(steps, spacing)
    x0 = SAMPLERS["ddim"](NoisyClipGuidance(den, ExactClip(mix), torch.tensor([0.0, 1.0, 0.0]), 1.0), x_T, grid)
    same = SAMPLERS["ddim"](ClassifierGuidance(den, mix.logits, torch.full((n,), 1), 1.0), x_T, grid)
    torch.testing.assert_close(x0, same, rtol=1e-8, atol=1e-8)
    assert float((mix.component(x0.flatten(1)) == 1).double().mean()) > 0.99
    torch.testing.assert_close(x0.flatten(1).mean(0), mix.mu[1], atol=0.03, rtol=0)
    torch.testing.assert_close(x0.flatten(1).std(0), mix.s[1].expand(2), rtol=0.05, atol=0)


def posterior_mean_and_covariance(mix, x, t):
    """E[x_0 | x_t] (B, D) and Cov[x_0 | x_t] (B, D, D) of the mixture: per component x_0 | x_t, k ~ N(m_k, c_k I),
    m_k = mu_k + alpha s_k^2 / v_k (x_t - alpha mu_k), c_k = s_k^2 sigma^2 / v_k, weighted by r_k = p(k | x_t)."""
    xf = x.flatten(1)
    tt = torch.full((xf.shape[0],), t, dtype=torch.float64)
    a, s = mix.schedule.alpha(tt)[:, None], mix.schedule.sigma(tt)[:, None]
    r = torch.softmax(mix.logits(x, mix.schedule.model_time(tt)), 1)       # (B, K)
    v = a**2 * mix.s**2 + s**2                                              # (B, K)
    m_k = mix.mu[None] + (a * mix.s**2 / v)[:, :, None] * (xf[:, None] - a[:, :, None] * mix.mu[None])
    c_k = mix.s**2 * s**2 / v
    m = (r[:, :, None] * m_k).sum(1)
    eye = torch.eye(mix.D, dtype=torch.float64)
    second = (r[:, :, None, None] * (c_k[:, :, None, None] * eye + m_k[:, :, :, None] * m_k[:, :, None, :])).sum(1)
    return m, second - m[:, :, None] * m[:, None, :]


def sdl_grad(x0, g):
    """grad_{x_0} spherical_dist_loss(x_0 / |x_0|, g) in closed form: with f = x_0 / |x_0|, d = |f - g|,
    dL/dd = 2 arcsin(d / 2) / sqrt(1 - d^2 / 4), grad = (I - f f^T) / |x_0| (f - g) dL/dd / d."""
    f = x0 / x0.norm(dim=1, keepdim=True)
    d = (f - g).norm(dim=1, keepdim=True)
    dLdd = 2 * torch.arcsin(d / 2) / torch.sqrt(1 - d**2 / 4)
    h = (f - g) * dLdd / d
    return (h - (f * h).sum(1, keepdim=True) * f) / x0.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("t", TIMES)
def test_clip_on_x0_is_the_analytic_gradient_through_the_denoiser(mix, t):
    """(c) cutouts = 1, no augmentation: grad_{x_t} L(E[x_0 | x_t]) = (d x_0 / d x_t)^T grad_{x_0} L with Tweedie's
    d E[x_0 | x_t] / d x_t = (alpha_t / sigma_t^2) Cov[x_0 | x_t], and eps~ = eps + s sigma_t grad."""
    den, clip, x = Denoiser(mix.eps, mix.schedule), LinearClip(torch.eye(2, dtype=torch.float64)), points(seed=5)
    g = unit([0.6, 0.8])
    m, cov = posterior_mean_and_covariance(mix, x, t)
    alpha, sigma = (float(v.flatten()[0]) for v in scales(mix.schedule, t, x[:1]))
    torch.testing.assert_close(den(x, t).x0.flatten(1), m, rtol=1e-10, atol=1e-10)  # the closed form is the denoiser's
    grad = (alpha / sigma**2) * (cov @ sdl_grad(m, g)[:, :, None])[:, :, 0]
    s = 3.0
    guided = ClipX0Guidance(den, clip, g, s, cutouts=1, augment=None)(x, t)
    torch.testing.assert_close(guided.eps.flatten(1), den(x, t).eps.flatten(1) + s * sigma * grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(guided.x0.flatten(1), m - s * sigma**2 / alpha * grad, rtol=1e-9, atol=1e-9)


def test_spherical_dist_loss_closed_values():
    e = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(spherical_dist_loss(e[0], 3 * e[0]), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(spherical_dist_loss(e[0], -e[0]), torch.tensor(math.pi**2 / 2, dtype=torch.float64))
    # the angle theta between them: 2 arcsin(|u - v| / 2) = theta, so the loss is theta^2 / 2
    torch.testing.assert_close(spherical_dist_loss(e[0], e[1]), torch.tensor((math.pi / 2) ** 2 / 2, dtype=torch.float64))


def test_clip_on_x0_raises_the_score_monotonically_in_the_scale(mix):
    """(c) DDIM samples guided by the CLIP on x_0 towards g: their mean cosine to g grows with the scale s."""
    den, clip, g = Denoiser(mix.eps, mix.schedule), LinearClip(torch.eye(2, dtype=torch.float64)), unit([0.0, 1.0])
    x_T = torch.randn(300, 2, 1, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    grid = mix.schedule.grid(50, "leading")
    means = []
    for s in (0.0, 0.5, 2.0, 8.0):
        x0 = SAMPLERS["ddim"](ClipX0Guidance(den, clip, g, s, augment=None), x_T, grid)
        means.append(float((clip.image_embedding(x0, None) * g).sum(1).mean()))
    assert all(a < b for a, b in zip(means, means[1:])), means
    assert means[-1] - means[0] > 0.3, means


def test_cutouts_average_the_loss_over_independent_augmentations():
    """k cutouts with no shift are the plain loss; with shifts, the loss is the mean over k draws of the generator,
    seeded, so a run repeats."""
    mix = GaussianMixture(Schedule.linear(), weights=[0.5, 0.5], means=[[0.5] * 16, [-0.5] * 16], stds=[0.3, 0.3])
    den = Denoiser(mix.eps, mix.schedule)
    clip = LinearClip(torch.randn(4, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64), image_size=4)
    g, x = unit([1.0, 0.0, 0.0, 0.0]), points(8, seed=8, shape=(1, 4, 4))
    plain = ClipX0Guidance(den, clip, g, 2.0, cutouts=1, augment=None)(x, 0.3)
    torch.testing.assert_close(ClipX0Guidance(den, clip, g, 2.0, cutouts=3, augment=RandomShift(0.0))(x, 0.3).eps, plain.eps)
    shifted = ClipX0Guidance(den, clip, g, 2.0, cutouts=3, augment=RandomShift(0.25), seed=9)
    x0 = den(x, 0.3).x0
    gen = torch.Generator().manual_seed(9)
    by_hand = sum(spherical_dist_loss(clip.image_embedding(RandomShift(0.25)(x0, gen), None), g) for _ in range(3)) / 3
    torch.testing.assert_close(shifted.clip_loss(x0, torch.full((8,), 0.3, dtype=torch.float64)), by_hand)
    assert not torch.allclose(shifted(x, 0.3).eps, plain.eps)
    torch.testing.assert_close(ClipX0Guidance(den, clip, g, 2.0, cutouts=3, augment=RandomShift(0.25), seed=9)(x, 0.3).eps,
                               ClipX0Guidance(den, clip, g, 2.0, cutouts=3, augment=RandomShift(0.25), seed=9)(x, 0.3).eps)


def test_reconstruction_guidance_is_x0_loss_guidance_with_the_gaussian_likelihood(mix):
    """The same wrapper serves video: X0LossGuidance with L = alpha_t^2 / (2 sigma_t^2) ||x^a - x^_0^a||^2 at s = w_r,
    then the observed frames' x_0 replaced, is tasks.video.ReconstructionGuidance (Ho et al. 2022, eq. 7)."""
    den = Denoiser(mix.eps, mix.schedule)
    x = points(16, seed=10, shape=(1, 2, 1, 1))  # (B, C, F, H, W): two frames of one pixel, the 2-D mixture
    x_obs = points(16, seed=11, shape=(1, 2, 1, 1))
    observed = torch.tensor([[True, False]]).expand(16, 2)
    a = observed[:, None, :, None, None].double()

    def loss(x0, tt):
        alpha, sigma = scales(mix.schedule, tt, x0)
        return (alpha**2 / (2 * sigma**2) * (x_obs - x0) ** 2 * a).flatten(1).sum(1)

    for t in TIMES:
        pred = X0LossGuidance(den, loss, 2.0)(x, t)
        alpha, sigma = scales(mix.schedule, t, x)
        x0 = condition_frames(pred.x0, x_obs, observed)
        expected = ReconstructionGuidance(den, x_obs, observed, 2.0)(x, t)
        torch.testing.assert_close(x0, expected.x0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close((x - alpha * x0) / sigma, expected.eps, rtol=1e-10, atol=1e-10)


def test_no_guidance_where_alpha_is_zero():
    """(d) at alpha_T = 0 (zero terminal SNR) x_T is independent of the prompt: both wrappers return the model's
    prediction unchanged there, and guide elsewhere."""
    z = zsnr(T=20)
    den, clip, g = Denoiser(lambda x, i: 0.5 * x, z, "v"), LinearClip(W()), unit([1.0, 0.0, 0.0])
    x, one, half = points(4, seed=12), torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    for wrapper in (NoisyClipGuidance(den, clip, g, 3.0), ClipX0Guidance(den, clip, g, 3.0, augment=None)):
        torch.testing.assert_close(wrapper(x, one).x0, den(x, one).x0, rtol=0, atol=0)
        torch.testing.assert_close(wrapper(x, one).eps, den(x, one).eps, rtol=0, atol=0)
        assert not torch.allclose(wrapper(x, half).x0, den(x, half).x0)


def test_bad_input_is_refused_by_name(mix):
    """(e) NaN, inf, negative or non-number scales; text embeddings of the wrong width, norm, rows or values; a CLIP
    trained at another image size; empty prompts; cutouts < 1."""
    den, clip, g, x = Denoiser(mix.eps, mix.schedule), LinearClip(W()), unit([1.0, 0.0, 0.0]), points(4)
    for Wrapper in (NoisyClipGuidance, ClipX0Guidance):
        for bad in (math.nan, math.inf, -1.0, "3", True, None):
            with pytest.raises(ValueError, match=r"scale must be a finite number >= 0.*--clip-scale"):
                Wrapper(den, clip, g, bad)
        with pytest.raises(ValueError, match="text embedding is 2 wide and this CLIP's embeddings are 3 wide"):
            Wrapper(den, clip, unit([1.0, 1.0]), 1.0)
        with pytest.raises(ValueError, match=r"unit norm.*g / g.norm"):
            Wrapper(den, clip, torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64), 1.0)
        with pytest.raises(ValueError, match="NaN or inf"):
            Wrapper(den, clip, torch.tensor([math.nan, 0.0, 0.0]), 1.0)
        with pytest.raises(ValueError, match=r"3 rows for a batch of 4"):
            Wrapper(den, clip, unit(torch.eye(3, dtype=torch.float64)), 1.0)(x, 0.5)
        no_width = LinearClip(W())
        del no_width.embed_dim  # a CLIP that does not say its width: found at the first call
        with pytest.raises(ValueError, match="image embeddings are 3 wide and the text embedding 2"):
            Wrapper(den, no_width, unit([1.0, 1.0]), 1.0)(x, 0.5)
        with pytest.raises(ValueError, match=r"CLIP was trained on 32x32 images and this run's are 1x1"):
            Wrapper(den, LinearClip(W(), image_size=32), g, 1.0)(x, 0.5)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="cutouts .* integer >= 1"):
            ClipX0Guidance(den, clip, g, 1.0, cutouts=bad)
    for prompts in ("", "   ", [], ["a red square", ""]):
        with pytest.raises(ValueError, match=r"prompt.*--prompt"):
            check_prompts(prompts)
    assert check_prompts("a red square") == ["a red square"]


@pytest.mark.parametrize("kind,prediction,sampler", [("linear", "eps", "euler-ancestral"), ("linear", "eps", "dpmpp-2m"),
                                                     ("edm", "edm", "heun"), ("flow", "flow", "euler")])
def test_generate_runs_noisy_clip_guidance_with_any_sampler_and_process(kind, prediction, sampler):
    """The wrapper composes with `generate` (its SplitCalls inside, clipping outside) on stochastic and deterministic
    samplers and on the VP, EDM and flow processes: guided by the optimal CLIP at s = 1 they draw component 1."""
    from diffuse.generate import generate
    den, mix = exact_denoiser(kind, prediction)
    den.bounded = False  # the mixture is not held to [-1, 1]
    opts, steps, spacing = ACCURATE[sampler]
    x0 = generate(NoisyClipGuidance(den, ExactClip(mix), torch.tensor([0.0, 1.0, 0.0]), 1.0), 300, (2, 1, 1),
                  sampler=sampler, steps=steps, spacing=spacing, seed=13, **opts)
    assert float((mix.component(x0.flatten(1)) == 1).double().mean()) > 0.97
    torch.testing.assert_close(x0.flatten(1).double().mean(0), mix.mu[1], atol=0.06, rtol=0)


class ModuleClip(torch.nn.Module):
    """A CLIP that is an nn.Module with dropout, recording the model times it is given."""

    def __init__(self):
        super().__init__()
        self.proj, self.drop, self.times = torch.nn.Linear(2, 3), torch.nn.Dropout(0.5), []
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(14))

    def image_embedding(self, x, model_time):
        self.times.append(model_time)
        u = self.drop(self.proj(x.flatten(1)))
        return u / u.norm(dim=1, keepdim=True)


def test_the_clip_runs_in_eval_mode_and_float32_under_autocast_and_sees_clean_times_on_x0(mix):
    """GLIDE's pitfalls: dropout off (the gradient repeats), float32 even inside bf16 autocast; the CLIP on x_0 gets the
    model time of t_min (the least noise the process knows; t = 0 is -inf on EDM), the noise-aware one x_t's own."""
    den, clip, x = Denoiser(mix.eps, mix.schedule), ModuleClip(), points(8, seed=15).float()
    g = unit([1.0, 0.0, 0.0]).float()
    guided = NoisyClipGuidance(den, clip, g, 2.0)
    assert not clip.training
    first = guided(x, 0.5).eps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = guided(x, 0.5).eps
    assert again.dtype == torch.float32
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(clip.times[-1], torch.full((8,), 499.0))  # t = 0.5 on the 1000-step schedule: step 499
    on_x0 = ClipX0Guidance(den, clip, g, 2.0, augment=None)
    first = on_x0(x, 0.5).eps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(on_x0(x, 0.5).eps, first, rtol=0, atol=0)
    edm, _ = exact_denoiser("edm", "edm")
    ClipX0Guidance(edm, clip, g, 2.0, augment=None)(x, 0.5)
    assert bool(torch.isfinite(clip.times[-1]).all())
    torch.testing.assert_close(clip.times[-1], edm.schedule.model_time(torch.full((8,), edm.schedule.t_min)).float())


def test_an_overflowing_scale_names_the_flag(mix):
    from diffuse.samplers.base import NonFiniteSample
    den, clip, x, g = Denoiser(mix.eps, mix.schedule), LinearClip(W().float()), points(8, seed=16).float(), unit([1.0, 0, 0])
    for wrapper in (NoisyClipGuidance(den, clip, g, 1e300), ClipX0Guidance(den, clip, g, 1e300, augment=None)):
        with pytest.raises(NonFiniteSample, match=r"CLIP guidance.* scale s = 1e\+300 overflowed .*--clip-scale"):
            wrapper(x, 0.5)
