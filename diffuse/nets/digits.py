"""The digit classifier: a fixed feature space for MNIST-like images (FID, KID, IS and precision/recall of digit models).

A small CNN trained once, deterministically, on the 5,000 bundled MNIST digits and cached as safetensors; metrics.py
measures samples in its feature space (Inception-v3 features, the standard for natural images, are made for 299x299
photographs, not 28x28 digits).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import write_atomically
from ..data import DataConfig, check_images, load_dataset


class DigitClassifier(nn.Module):
    """A LeNet-like CNN (LeCun et al. 1998) for 1-channel digits in [-1, 1]: two conv + max-pool stages, 128 features, 10 logits.

    `features` is the penultimate layer before its ReLU (no dead units, so the feature
    covariance keeps full rank); any input size is resized to 28x28 (bilinear) first.
    """

    size = 28  # input side the network is trained at (MNIST)

    def __init__(self, width: int = 16, feature_dim: int = 128, dropout: float = 0.3):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),              # (B, w, 14, 14)
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # (B, 2w, 7, 7)
        )
        self.fc = nn.Linear(2 * width * 7 * 7, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:  # (B, 1, H, W) -> (B, D)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"DigitClassifier expects grayscale images (B, 1, H, W), got {tuple(x.shape)}; "
                             "convert RGB with x.mean(1, keepdim=True)")
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self.fc(self.conv(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, H, W) -> logits (B, 10)
        return self.head(self.dropout(F.relu(self.features(x))))


# The training recipe; with the architecture it names the cached weights. Random shifts of 1-2
# pixels did not raise held-out accuracy (97%+ without) and would make the features blind to
# misplaced digits, which a sample-quality metric should see: no augmentation.
_RECIPE = {"epochs": 6, "batch_size": 64, "lr": 2e-3, "seed": 0}
_VERSION = 1  # bump when DigitClassifier's forward changes in a way its layers' repr does not show


def train_digit_classifier(x: Tensor, y: Tensor, *, epochs: int = _RECIPE["epochs"], batch_size: int = _RECIPE["batch_size"],
                           lr: float = _RECIPE["lr"], seed: int = _RECIPE["seed"]) -> DigitClassifier:
    """Train a DigitClassifier on digits x (N, 1, H, W) in [-1, 1] with labels y (N,) in 0..9; deterministic given seed.

    Cross-entropy, Adam (Kingma & Ba 2015) with the learning rate decayed linearly to 0, one
    random permutation per epoch. Returns the network frozen (eval, no gradients).
    """
    check_images(x, "x")
    if x.shape[1] != 1:
        raise ValueError(f"digits must have 1 channel, got {x.shape[1]}; convert RGB with x.mean(1, keepdim=True)")
    y = torch.as_tensor(y, dtype=torch.int64)
    if y.shape != (x.shape[0],) or y.min() < 0 or y.max() > 9:
        raise ValueError(f"y must hold one label in 0..9 per image, got shape {tuple(y.shape)} for {x.shape[0]} images")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    g = torch.Generator().manual_seed(seed)
    # initial weights and dropout: seeded, without touching the caller's RNG; gradients on even inside no_grad
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        net = DigitClassifier()
        steps = epochs * math.ceil(x.shape[0] / batch_size)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
        net.train()
        for _ in range(epochs):
            for idx in torch.randperm(x.shape[0], generator=g).split(batch_size):
                loss = F.cross_entropy(net(x[idx].float()), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Fraction of images x whose argmax logit equals the label y."""
    pred = torch.cat([net(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])
    return (pred == torch.as_tensor(y)).float().mean().item()


def _cache_file(cache_dir: str | os.PathLike | None) -> Path:
    """CACHE/digit_classifier-v{_VERSION}-{hash}.safetensors; the hash covers the layers and the recipe."""
    root = Path(cache_dir or os.environ.get("DIFFUSE_CACHE") or "~/.cache/diffuse").expanduser()
    key = hashlib.sha256(f"{DigitClassifier()!r}{sorted(_RECIPE.items())}".encode()).hexdigest()[:10]
    return root / f"digit_classifier-v{_VERSION}-{key}.safetensors"


def digit_classifier(cache_dir: str | os.PathLike | None = None) -> DigitClassifier:
    """The fixed digit classifier: trained once on the 5,000 bundled MNIST digits, then loaded from the cache.

    cache_dir defaults to $DIFFUSE_CACHE or ~/.cache/diffuse. The network is frozen: it defines
    the feature space in which FIDs of digit models are compared.
    """
    path = _cache_file(cache_dir)
    if path.is_file():
        net = DigitClassifier()
        try:
            net.load_state_dict(safetensors.torch.load_file(path))
            return net.eval().requires_grad_(False)
        except Exception as e:  # a damaged or foreign file: retrain and overwrite it
            warnings.warn(f"ignoring the unreadable digit-classifier cache {path} ({type(e).__name__}: {e}); retraining",
                          UserWarning, stacklevel=2)
    data = load_dataset(DataConfig(source="mnist"))
    net = train_digit_classifier(data.images.float() / 127.5 - 1, data.labels, **_RECIPE)
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    write_atomically(path, safetensors.torch.save(tensors, metadata={"recipe": repr(_RECIPE), "version": str(_VERSION)}))
    return net
