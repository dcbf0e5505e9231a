"""The digit classifier: a fixed feature space for MNIST-like images (FID, KID, IS and precision/recall of digit models).

A small CNN trained once, deterministically, on the 5,000 bundled MNIST digits by the one Trainer (model.kind =
"digit_classifier", kinds/digit_classifier.py) and cached as a run folder (train.digit_classifier); metrics.py measures
samples in its feature space (Inception-v3 features, the standard for natural images, are made for 299x299
photographs, not 28x28 digits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ShardedDropout


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
        self.dropout = ShardedDropout(dropout)  # masks drawn for the global batch: the same under DDP
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:  # (B, 1, H, W) -> (B, D)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"DigitClassifier expects grayscale images (B, 1, H, W), got {tuple(x.shape)}; "
                             "convert RGB with x.mean(1, keepdim=True)")
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self.fc(self.conv(x).flatten(1))

    def maps(self, x: Tensor) -> list[Tensor]:
        """The two conv stages' activations after their ReLU, before pooling: [(B, w, 28, 28), (B, 2w, 14, 14)] for x
        (B, 1, H, W) resized to 28x28 (the digit-classifier baseline of segmentation features)."""
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        first = self.conv[1](self.conv[0](x))
        return [first, self.conv[4](self.conv[3](self.conv[2](first)))]

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, H, W) -> logits (B, 10)
        return self.head(self.dropout(F.relu(self.features(x))))


@torch.no_grad()
def classifier_accuracy(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Fraction of images x whose argmax logit equals the label y."""
    pred = torch.cat([net(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])
    return (pred == torch.as_tensor(y)).float().mean().item()


