"""`diffuse demo --toy`: the exact score of a Gaussian mixture under the forward process, and a toy network that learns
it (a short training here; the demo trains 1,200 steps)."""

import pytest
import torch
from PIL import Image

from diffuse import Denoiser
from diffuse.app import toy
from diffuse.generate import generate
from diffuse.mixture import GaussianMixture, exact_eps, noised_score
from diffuse.schedule import VPCosine

MIX = GaussianMixture(torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64),
                      torch.tensor([[-1.0, 0.5], [0.8, 0.2], [0.1, -0.9]], dtype=torch.float64),
                      torch.tensor([[[0.05, 0.02], [0.02, 0.03]], [[0.02, 0.0], [0.0, 0.08]], [[0.04, -0.01], [-0.01, 0.02]]],
                                   dtype=torch.float64))


@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.0), (0.9, 0.4359), (0.3, 0.954), (0.0, 1.0)])
def test_the_noised_score_is_the_gradient_of_its_log_density(alpha, sigma):
    """p_t = sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I): its closed-form score against autograd of log p_t."""
    x = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    p = MIX.noised(alpha, sigma)
    (grad,) = torch.autograd.grad(p.log_prob(x).sum(), x)
    torch.testing.assert_close(p.score(x), grad, rtol=1e-9, atol=1e-9)


def test_fully_noised_data_are_the_standard_normal():
    x = torch.randn(20, 2, dtype=torch.float64)
    p = MIX.noised(0.0, 1.0)
    torch.testing.assert_close(p.log_prob(x), -0.5 * (x**2).sum(1) - torch.log(torch.tensor(2 * torch.pi)).double())
    torch.testing.assert_close(p.score(x), -x)


def test_the_mixtures_draws_have_its_moments():
    x = MIX.sample(200_000, torch.Generator().manual_seed(0))
    mean = (MIX.weights[:, None] * MIX.means).sum(0)
    torch.testing.assert_close(x.mean(0), mean, atol=4e-3, rtol=0)


def test_bad_mixtures_are_refused():
    with pytest.raises(ValueError, match="weights must be >= 0 and sum to 1"):
        GaussianMixture.isotropic([[0.0, 0.0], [1.0, 1.0]], [0.1, 0.1], weights=[0.7, 0.7])
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture.isotropic([[0.0, 0.0]], [0.0])
    with pytest.raises(ValueError, match=r"needs weights \(2,\) and covs \(2, 2, 2\)"):
        GaussianMixture(torch.ones(1, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64),
                        torch.eye(2, dtype=torch.float64)[None])


def test_the_exact_denoiser_samples_the_mixture():
    """DDIM on eps* = -sigma_t grad log p_t lands on the data: each sample near a mean, in the mixture's proportions."""
    s = VPCosine()
    den = Denoiser(exact_eps(MIX, s), s, "eps", bounded=False)
    x = generate(den, 3000, (2,), sampler="ddim", steps=60, seed=0, clip=False).double()
    nearest = torch.cdist(x, MIX.means).argmin(1)
    assert torch.cdist(x, MIX.means).min(1).values.median() < 0.25
    torch.testing.assert_close(torch.bincount(nearest, minlength=3) / 3000., MIX.weights.float(), atol=0.04, rtol=0)
    assert noised_score(MIX, s, x[:5], 0.5).shape == (5, 2)


def test_the_toy_network_learns_the_exact_score():
    """A short training (300 steps of 128 points; the demo's are 1,200 of 256) brings the learned eps within 10% of the
    exact at t = 0.5 (relative squared error), from ~1 untrained."""
    untrained = toy.eps_error(toy.toy_denoiser(), toy.TOY_DATA, 0.5)
    den, losses = toy.train_toy(300, batch=128)
    assert untrained > 0.8 and toy.eps_error(den, toy.TOY_DATA, 0.5) < 0.1
    assert sum(losses[-50:]) < sum(losses[:50])


def test_the_toy_demo_writes_its_figures(tmp_path):
    paths = toy.run_toy_demo(tmp_path, steps=20)
    assert set(paths) == {"forward process", "reverse trajectories", "score field", "reverse animation"}
    for path in paths.values():
        assert path.is_file() and path.parent == tmp_path
    gif = Image.open(paths["reverse animation"])
    assert gif.n_frames == toy.TOY_SAMPLER_STEPS + 1  # x_T and one frame per step
    assert Image.open(paths["forward process"]).size[0] > 4 * Image.open(paths["forward process"]).size[1]  # a strip
