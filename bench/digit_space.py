"""The digit feature space's own floor and scale: FID of real digits against real digits, and of degraded real digits
(blurred, shifted), in the space of the digit classifier this checkout trains. Run it in two checkouts to compare
two feature spaces (v1: the classifier's own loop, before 2026-12-06; v2: the one Trainer):

    python bench/digit_space.py                                   # this checkout's space
    PYTHONPATH=OTHER_CHECKOUT python bench/digit_space.py         # another's (its own cache folder name)

Prints one JSON line: the space's version, the real-digit rows of bench/cpu_budget.py (1,000 digits, 100 per class,
against all 5,000 and against the other 4,000), and FIDs of the 1,000 blurred (Gaussian, sigma 1 pixel) and shifted
(2 pixels) against the 5,000.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from diffuse.data import DataConfig, load_dataset
from diffuse.metrics import fid

try:  # v2: trained by the one Trainer
    from diffuse.train import DIGIT_SPACE_VERSION, digit_classifier
except ImportError:  # v1: its own loop
    from diffuse.metrics import digit_classifier
    DIGIT_SPACE_VERSION = 1


def blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-r**2 / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7))
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1))


def shift(x: torch.Tensor, k: int = 2) -> torch.Tensor:
    return F.pad(x, (k, 0, k, 0), value=-1)[..., :x.shape[-2], :x.shape[-1]]


def main() -> None:
    start = time.perf_counter()
    net = digit_classifier()
    trained = time.perf_counter() - start
    data = load_dataset(DataConfig(source="mnist"))
    real, labels = data.images.float() / 127.5 - 1, data.labels
    g = torch.Generator().manual_seed(0)
    picked = torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=g)[:100]]
                        for c in range(10)])
    rest = torch.ones(len(real), dtype=torch.bool)
    rest[picked] = False
    x = real[picked]
    with torch.no_grad():
        accuracy = float((net(x).argmax(1) == labels[picked]).double().mean())
    print(json.dumps({"space": f"v{DIGIT_SPACE_VERSION}", "classifier_s": round(trained, 1),
                      "fid_real_1000_vs_all": round(fid(real, x, net), 2),
                      "fid_real_1000_vs_other_4000": round(fid(real[rest], x, net), 2),
                      "fid_blurred_1000": round(fid(real, blur(x), net), 2),
                      "fid_shifted_1000": round(fid(real, shift(x), net), 2), "accuracy_1000": round(accuracy, 4)}))


if __name__ == "__main__":
    main()
