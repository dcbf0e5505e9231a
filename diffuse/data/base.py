"""The dataset protocol: what the Trainer, the stages and the metrics draw examples from.

A dataset yields batches (x, cond): x of shape (B, *shape), with `shape` (C, H, W) for images, (C, F, H, W) for
videos or (D,) for vectors (embeddings, per-pixel features), and cond a condition dict (condition.py) whose keys are
`condition_keys`. `data.images.ImageDataset`, `stages.LatentDataset` and `EncodingDataset`, `captions.Captioned` and
`Subset` keep it; so may a user's own dataset passed to `Trainer(..., dataset=...)` (without `shape`, the shape is read
off its first example: `shape_of`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Dataset(Protocol):
    num_classes: int                   # class labels of its "label" key (0: unlabelled)
    condition_keys: tuple[str, ...]    # the keys of every batch's condition dict

    def __len__(self) -> int: ...

    def batch(self, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The examples at indices idx (B,): x (B, *shape) and their condition dict, each value (B, ...)."""


def shape_of(dataset) -> tuple[int, ...]:
    """The shape of one example of `dataset` without the batch: its `shape`, else read off its first example."""
    shape = getattr(dataset, "shape", None)
    return tuple(shape) if shape is not None else tuple(dataset.batch(torch.arange(1))[0].shape[1:])


class Subset:
    """The items `idx` of a dataset with data.ImageDataset's interface, renumbered 0..len(idx) - 1."""

    def __init__(self, base, idx: Tensor):
        self.base, self.idx = base, idx
        self.num_classes, self.condition_keys, self.shape = base.num_classes, base.condition_keys, shape_of(base)

    def __len__(self) -> int:
        return len(self.idx)

    def batch(self, idx: Tensor) -> tuple[Tensor, dict]:
        return self.base.batch(self.idx[idx])
