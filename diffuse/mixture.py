"""A mixture of Gaussians and its exact score under the forward process: the two-pixel picture of the lectures.

Lecture 004 draws the space of all two-pixel images: each axis the value of one pixel, each point an image, the good
images in a few small clusters and noise everywhere else. Data from a mixture p_0(x) = sum_k w_k N(x; mu_k, Sigma_k) stay
a mixture under x_t = alpha_t x_0 + sigma_t eps:

    p_t(x) = sum_k w_k N(x; alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I)

so the score grad_x log p_t(x) = sum_k r_k(x) C_k^{-1} (alpha_t mu_k - x), with r_k(x) the posterior weight of
component k and C_k = alpha_t^2 Sigma_k + sigma_t^2 I, is exact for every t, and the ideal network output is
eps*(x_t, t) = -sigma_t grad log p_t(x_t) (Vincent 2011; Song et al. 2021, eq. 7). The toy demo (app/toy.py) trains a
network on such data and draws its score beside this one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GaussianMixture:
    """sum_k weights[k] N(means[k], covs[k]) in D dimensions: weights (K,) summing to 1, means (K, D), covs (K, D, D)
    symmetric positive definite; float64. ValueError for shapes that disagree, weights that are negative or do not sum
    to 1, or a covariance that is not positive definite."""

    weights: Tensor
    means: Tensor
    covs: Tensor

    def __post_init__(self):
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covs.shape != (k, d, d):
            raise ValueError(f"a mixture of {k} components in {d} dimensions needs weights ({k},) and covs ({k}, {d}, {d}), "
                             f"got {tuple(self.weights.shape)} and {tuple(self.covs.shape)}")
        if (self.weights < 0).any() or abs(float(self.weights.sum()) - 1) > 1e-9:
            raise ValueError(f"mixture weights must be >= 0 and sum to 1, got {self.weights.tolist()}")
        if torch.linalg.cholesky_ex(self.covs)[1].any():
            raise ValueError("every covariance of a mixture must be symmetric positive definite")

    @classmethod
    def isotropic(cls, means, stds, weights=None) -> GaussianMixture:
        """Components N(means[k], stds[k]^2 I): means (K, D) and stds (K,) as lists or tensors; equal weights by
        default."""
        means = torch.as_tensor(means, dtype=torch.float64)
        k, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(k)
        weights = torch.full((k,), 1 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        return cls(weights, means, stds[:, None, None] ** 2 * torch.eye(d, dtype=torch.float64))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def noised(self, alpha: float, sigma: float) -> GaussianMixture:
        """The law of x_t = alpha x_0 + sigma eps: means alpha mu_k, covariances alpha^2 Sigma_k + sigma^2 I."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, alpha * self.means, alpha**2 * self.covs + sigma**2 * eye)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) for points x (N, D) -> (N,), float64."""
        return torch.logsumexp(self.weights.log() + self._component_log_probs(x), dim=1)

    def _component_log_probs(self, x: Tensor) -> Tensor:
        """log N(x; mu_k, Sigma_k) for every point and component: (N, K)."""
        chol = torch.linalg.cholesky(self.covs)                                    # (K, D, D)
        diff = (x.double()[:, None, :] - self.means[None]).unsqueeze(-1)            # (N, K, D, 1)
        z = torch.linalg.solve_triangular(chol[None], diff, upper=False).squeeze(-1)  # L^-1 (x - mu), (N, K, D)
        log_det = 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)        # (K,)
        return -0.5 * (z**2).sum(-1) - 0.5 * log_det - 0.5 * self.dim * math.log(2 * math.pi)

    def score(self, x: Tensor) -> Tensor:
        """grad_x log p(x) = sum_k r_k(x) Sigma_k^{-1} (mu_k - x), r_k the posterior weight of component k: (N, D) ->
        (N, D), float64."""
        r = torch.softmax(self.weights.log() + self._component_log_probs(x), dim=1)  # (N, K)
        diff = self.means[None] - x.double()[:, None, :]                          # (N, K, D)
        pull = torch.linalg.solve(self.covs[None], diff.unsqueeze(-1)).squeeze(-1)  # Sigma_k^{-1} (mu_k - x)
        return (r.unsqueeze(-1) * pull).sum(1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n points (n, D), float64: a component by its weight, then mu_k + L_k z."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, 1, generator=generator, dtype=torch.float64)
        return self.means[k] + (torch.linalg.cholesky(self.covs)[k] @ z).squeeze(-1)


def noised_score(mixture: GaussianMixture, schedule, x: Tensor, t: float) -> Tensor:
    """The exact score grad log p_t(x) of the data `mixture` under the forward process of `schedule` at time t:
    (N, D) -> (N, D), float64."""
    alpha, sigma = float(schedule.alpha(torch.tensor(t))), float(schedule.sigma(torch.tensor(t)))
    return mixture.noised(alpha, sigma).score(x)


def exact_eps(mixture: GaussianMixture, schedule):
    """The ideal network of the data `mixture`: (x_t (N, D), model_time (scalar or (N,))) -> eps* = -sigma_t grad log
    p_t(x_t), in x_t's dtype; a plain function the Denoiser takes as its net (one time for the whole batch)."""

    def eps(x: Tensor, model_time: Tensor) -> Tensor:
        times = torch.as_tensor(model_time).reshape(-1)
        if not torch.all(times == times[0]):
            raise ValueError("exact_eps takes one time for the whole batch")
        t = float(schedule.t_from_model_time(times[0]))
        sigma = float(schedule.sigma(torch.tensor(t)))
        return (-sigma * noised_score(mixture, schedule, x, t)).to(x.dtype)

    return eps
