"""Sample-quality metrics in the feature space of a fixed network: FID (Heusel et al. 2017), KID
(Binkowski et al. 2018), Inception Score (Salimans et al. 2016) and precision/recall (Kynkaanniemi
et al. 2019).

A metric compares two sets of images through a feature network held fixed, so the numbers
of two models are comparable only when they share that network. For digits the feature
network is the digit classifier (nets/digits.py; train.digit_classifier trains it once and caches it): Inception-v3
features, the standard for natural images, are made for 299x299 photographs, not 28x28 digits. For natural images
the standard FID Inception-v3 loads from a local weights file (diffuse.nets.inception); any nn.Module works too
(train.feature_network names them for the CLI and the trainer).

    FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})     (Heusel et al. 2017; Dowson & Landau 1982)

with (mu, S) the mean and covariance of the features of the real and generated images.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import check_images

__all__ = [
    "frechet_distance",
    "feature_statistics",
    "extract_features",
    "fid",
    "kid",
    "kid_from_features",
    "mmd2_unbiased",
    "inception_score",
    "precision_recall",
    "precision_recall_from_features",
]


# --- Frechet distance -------------------------------------------------------------------------
def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.atleast_1d(np.asarray(mu, dtype=np.float64)), np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{name}: the mean must have shape (D,) and the covariance (D, D), got {mu.shape} and {sigma.shape}; "
                         "compute both with feature_statistics(features) from features of shape (N, D)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: the mean or covariance holds NaN or inf; check the features they were computed from")
    return mu, sigma


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> np.ndarray:
    """(S1 S2)^{1/2}, handled as the reference FID code does (Heusel et al. 2017; Seitzer's pytorch-fid).

    The square root is scipy.linalg.sqrtm (Schur method): a well-kept library, not hand-written numerics.
    A singular product can give a non-finite root: then eps * I is added to both covariances. Round-off
    gives the root of a PSD product tiny imaginary parts: they are dropped, and large ones are an error.
    """
    with warnings.catch_warnings():  # "matrix is singular": judged by the checks below instead
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(root).all():
            offset = eps * np.eye(len(sigma1))
            root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(root).all():
        raise ValueError(f"(S1 S2)^(1/2) is not finite even with {eps} * I added to the covariances; "
                         "pass a larger eps or check the covariances for huge values")
    if np.iscomplexobj(root):
        imag = np.abs(np.diagonal(root).imag).max()
        if imag > 1e-3 * max(1.0, np.abs(np.diagonal(root).real).max()):
            raise ValueError(f"(S1 S2)^(1/2) has imaginary parts up to {imag:.3g} on its diagonal: a covariance is not "
                             "positive semi-definite; compute both with feature_statistics (np.cov) from real features")
        root = root.real
    return root


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) between N(mu1, S1) and N(mu2, S2) (Heusel et al. 2017)."""
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "first Gaussian")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "second Gaussian")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two Gaussians live in different dimensions ({mu1.size} and {mu2.size}); "
                         "compute both sets of features with the same feature network")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (added to the covariances when their product is singular), got {eps}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(_sqrtm_product(sigma1, sigma2, eps)))


def feature_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu, S): the mean (D,) and unbiased covariance (D, D) of features (N, D), in float64 numpy."""
    if not isinstance(features, Tensor) or features.ndim != 2:
        raise ValueError(f"features must be a tensor of shape (N, D), got {getattr(features, 'shape', type(features).__name__)}; "
                         "flatten each image's features to one row")
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {features.shape[0]}; pass more images")
    f = features.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(f).all():
        raise ValueError("features hold NaN or inf; check the images and the feature network")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def check_image_sets(real: Tensor, fake: Tensor) -> None:
    """Both sets are images in [-1, 1] (data.check_images) of one size and channel count. A feature network resamples
    other sizes to its own, and resampling alone moves a distribution: 5,000 digits rendered at 32x32 and taken back to
    28x28 lie ~110 from the same digits at 28x28 in the digit feature space, where two disjoint real sets lie 6-9
    apart. Raises ValueError naming both shapes and the fix."""
    check_images(real, "real")
    check_images(fake, "fake")
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real images are {tuple(real.shape[1:])} (C, H, W) and generated ones {tuple(fake.shape[1:])}: "
                         "a metric of two sets at different sizes mostly measures the resampling; load the real images "
                         "at the generated size (with the run's data config, as `diffuse eval` does)")


# --- features of image sets -------------------------------------------------------------------
def _batch_size(net: nn.Module, batch_size: int | None) -> int:
    """The given batch size, else the network's own positive int `batch_size` (Inception at 299x299: 50), else 500."""
    if batch_size is not None:
        return batch_size
    own = getattr(net, "batch_size", None)
    return own if isinstance(own, int) and own > 0 else 500


def _device(net: nn.Module) -> torch.device:
    """Where the network's parameters live; CPU for a network without any (e.g. nn.Identity)."""
    param = next(iter(net.parameters()), None) if isinstance(net, nn.Module) else None
    return param.device if param is not None else torch.device("cpu")


def _feature_fn(net: nn.Module):
    """net.features when it is a method (the digit classifier, Inception), else net itself. A `features`
    submodule (torchvision's VGG, DenseNet: a convolutional trunk) is not a feature vector, so forward is used."""
    fn = getattr(net, "features", None)
    return fn if callable(fn) and not isinstance(fn, nn.Module) else net


@torch.no_grad()
def extract_features(x: Tensor, feature_net: nn.Module, batch_size: int | None = None, on_batch=None) -> Tensor:
    """feature_net.features (or feature_net itself) of images x (N, C, H, W), in eval mode, batch by batch -> (N, D) float64.
    `on_batch(k)` is told after each batch of k images (a progress bar)."""
    batch_size = _batch_size(feature_net, batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fn, device = _feature_fn(feature_net), _device(feature_net)
    training = isinstance(feature_net, nn.Module) and feature_net.training
    if training:
        feature_net.eval()  # no dropout or batch statistics in a metric
    try:
        out = []
        for i in range(0, x.shape[0], batch_size):
            out.append(fn(x[i:i + batch_size].to(device, torch.float32)).flatten(1).to("cpu", torch.float64))
            if on_batch is not None:
                on_batch(len(out[-1]))
    finally:
        if training:
            feature_net.train()
    features = torch.cat(out)
    if features.shape[1] > 8192:
        warnings.warn(f"{features.shape[1]}-dimensional features: a covariance takes {features.shape[1] ** 2 * 8 / 2**30:.1f} GiB "
                      "and FID's matrix square root grows with its cube; pool the network's output to fewer "
                      "dimensions (Inception's pool3 has 2048)", UserWarning, stacklevel=2)
    return features


def fid(real: Tensor, fake: Tensor, feature_net: nn.Module, batch_size: int | None = None, on_batch=None) -> float:
    """Frechet Inception Distance (Heusel et al. 2017) of two image sets in [-1, 1], in feature_net's feature space
    (`on_batch` as extract_features')."""
    check_image_sets(real, fake)
    f_real, f_fake = (extract_features(x, feature_net, batch_size, on_batch) for x in (real, fake))
    d = f_real.shape[1]
    if min(len(f_real), len(f_fake)) <= d:
        warnings.warn(f"FID from {len(f_real)} real and {len(f_fake)} fake images in a {d}-dimensional feature space: "
                      f"with N <= D the covariances are singular and the value is strongly biased; use more than {d} "
                      "images per set (and the same N when comparing models)", UserWarning, stacklevel=2)
    return frechet_distance(*feature_statistics(f_real), *feature_statistics(f_fake))


# --- KID, IS, precision / recall ---------------------------------------------------------------
def polynomial_kernel(a: Tensor, b: Tensor) -> Tensor:
    """k(x, y) = (x . y / d + 1)^3, the kernel of KID (Binkowski et al. 2018, sec. 3)."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def mmd2_unbiased(f_real: Tensor, f_fake: Tensor) -> float:
    """The unbiased estimate of MMD^2 (Gretton et al. 2012, eq. 3): within-set means leave out the diagonal."""
    m, n = len(f_real), len(f_fake)
    k_rr, k_ff, k_rf = polynomial_kernel(f_real, f_real), polynomial_kernel(f_fake, f_fake), polynomial_kernel(f_real, f_fake)
    return float((k_rr.sum() - k_rr.diagonal().sum()) / (m * (m - 1)) + (k_ff.sum() - k_ff.diagonal().sum()) / (n * (n - 1))
                 - 2 * k_rf.mean())


KID_MIN_IMAGES = 4
"""KID's smallest set: subsets of half of it must hold at least 2 images for the unbiased MMD^2."""


def kid_subset_size(n_real: int, n_fake: int, subset_size: int = 1000) -> int:
    """The subset size KID uses: `subset_size` (1000, as Binkowski et al. and torch-fidelity), at most half of the
    smaller set. A subset as large as the set would be the whole set every time and its spread over subsets zero
    (clean-fid's min(n, 1000) does that below 1,000 images), and one nearly as large (1000 of 1001) almost so;
    half-size subsets differ. Raises ValueError below KID_MIN_IMAGES images in a set."""
    n = min(n_real, n_fake)
    if n < KID_MIN_IMAGES:
        raise ValueError(f"KID needs at least {KID_MIN_IMAGES} images in each set (random subsets of half the set, "
                         f"at least 2 each), got {n_real} real and {n_fake} generated; pass more")
    return min(subset_size, n // 2)


def kid_from_features(f_real: Tensor, f_fake: Tensor, subsets: int = 100, subset_size: int = 1000,
                      generator: torch.Generator | None = None) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 averaged over random subsets of
    both sets (as their code and torchmetrics do); returns (mean, standard deviation over the subsets).
    Subsets hold `kid_subset_size(...)` images: never the whole set, so the spread is real."""
    size = kid_subset_size(len(f_real), len(f_fake), subset_size)
    g = generator or torch.Generator().manual_seed(0)
    values = [mmd2_unbiased(f_real[torch.randperm(len(f_real), generator=g)[:size]],
                            f_fake[torch.randperm(len(f_fake), generator=g)[:size]]) for _ in range(subsets)]
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std()) if subsets > 1 else 0.0


def kid(real: Tensor, fake: Tensor, feature_net: nn.Module, subsets: int = 100, subset_size: int = 1000,
        batch_size: int | None = None, on_batch=None) -> tuple[float, float]:
    """KID (mean, std over subsets) of two image sets in [-1, 1], in feature_net's feature space; 0 in expectation
    for identical distributions (unbiased, unlike FID)."""
    check_image_sets(real, fake)
    return kid_from_features(extract_features(real, feature_net, batch_size, on_batch),
                             extract_features(fake, feature_net, batch_size, on_batch), subsets, subset_size)


def is_min_images(splits: int = 10) -> int:
    """The Inception Score's smallest set: 2 images per split (one image's IS is 1 whatever it shows)."""
    return 2 * splits


@torch.no_grad()
def inception_score(fake: Tensor, classifier: nn.Module, splits: int = 10, batch_size: int | None = None,
                    on_batch=None) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), over `splits` parts of the set: (mean, std).
    `classifier(x)` returns logits; for digits the digit classifier (at most 10, for ten equally likely,
    confidently classified classes). Raises ValueError below `is_min_images(splits)` images."""
    check_images(fake, "fake")
    if splits < 1 or len(fake) < is_min_images(splits):
        raise ValueError(f"the Inception Score with {splits} splits needs at least {is_min_images(splits)} images "
                         f"(2 per split; a split of one image scores 1 whatever it shows), got {len(fake)}; pass more "
                         "(the usual is 50,000)")
    batch_size = _batch_size(classifier, batch_size)
    classifier.eval()
    device = _device(classifier)
    logp = []
    for i in range(0, len(fake), batch_size):
        logp.append(F.log_softmax(classifier(fake[i:i + batch_size].to(device, torch.float32)).double(), dim=1).cpu())
        if on_batch is not None:
            on_batch(len(logp[-1]))
    logp = torch.cat(logp)
    scores = []
    for part in logp.chunk(splits):
        log_py = torch.logsumexp(part, dim=0) - math.log(len(part))  # log of the marginal p(y) over the part
        scores.append(float((part.exp() * (part - log_py)).sum(1).mean().exp()))
    s = torch.tensor(scores, dtype=torch.float64)
    return float(s.mean()), float(s.std()) if len(scores) > 1 else 0.0


def precision_recall_from_features(f_real: Tensor, f_fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 1-3): each set's manifold is the union of balls
    around its points with radius the distance to the k-th nearest neighbour; precision is the share of fake
    points inside the real manifold, recall the share of real points inside the fake one."""
    if min(len(f_real), len(f_fake)) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} images in each set")

    def radii(f: Tensor) -> Tensor:
        return torch.cdist(f, f).kthvalue(k + 1, dim=1).values  # the 0th neighbour is the point itself

    def covered(points: Tensor, centres: Tensor, r: Tensor) -> float:
        inside = torch.cat([(torch.cdist(chunk, centres) <= r[None]).any(1) for chunk in points.split(1000)])
        return float(inside.double().mean())

    return covered(f_fake, f_real, radii(f_real)), covered(f_real, f_fake, radii(f_fake))


def precision_recall(real: Tensor, fake: Tensor, feature_net: nn.Module, k: int = 3, batch_size: int | None = None,
                     on_batch=None) -> tuple[float, float]:
    """(precision, recall) of two image sets in [-1, 1] in feature_net's feature space (Kynkaanniemi et al. 2019)."""
    check_image_sets(real, fake)
    return precision_recall_from_features(extract_features(real, feature_net, batch_size, on_batch),
                                          extract_features(fake, feature_net, batch_size, on_batch), k)
