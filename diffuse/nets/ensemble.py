"""The pixel classifier of segmentation from diffusion features (Baranchuk et al. 2022, from datasetGAN, Zhang et al.
2021): an ensemble of small MLPs over per-pixel feature vectors, evaluated as one module, and the BatchNorm of the
global batch it trains with under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d (Ioffe & Szegedy 2015, Algorithm 1), y = gamma (x - mu) / sqrt(var + eps) + beta with mu and the
    biased var per feature over the batch, whose statistics are those of the global batch when several processes train:
    the per-feature sum, sum of squares and count are all-reduced (differentiably: the gradient of each process's loss
    through the shared mean and variance reaches every process), so two processes compute what one computes on the
    whole batch. nn.SyncBatchNorm does this on GPUs only. The Trainer sets `shard` = (rank, world size)."""

    shard: tuple[int, int] = (0, 1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.shard[1] == 1:
            return super().forward(x)
        stats = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), x.shape[0])])
        stats = dist_nn.all_reduce(stats)  # SUM over processes, with the gradient reduced the same way
        n = stats[-1]
        mean = stats[:x.shape[1]] / n
        var = stats[x.shape[1]:-1] / n - mean * mean  # biased, as BatchNorm normalises
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var.detach() * n / (n - 1)).to(self.running_var.dtype), self.momentum)
        return (x - mean) * torch.rsqrt(var.clamp_min(0) + self.eps) * self.weight + self.bias


class PixelEnsemble(nn.Module):
    """M pixel classifiers evaluated together: (P, dim) features -> logits (M, P, C). Each member is the datasetGAN MLP
    Baranchuk et al. use, dim -> 128 -> 32 -> C with Linear, ReLU, BatchNorm1d after each hidden layer, Linear weights
    initialised N(0, 0.02) and biases 0 (the reference's init_weights). The members share no parameter: the first layer
    is one (dim, M h_1) matrix, the others one (h_in, h_out) matrix per member, and BatchNorm's statistics are per member
    and unit, so the result equals M separate networks.

    f (P, dim): every member reads every row (prediction); f (M, P, dim): member m reads its own rows f[m] (training,
    where each member draws its own pixels as the reference trains each on its own shuffle). ValueError for a width < 1
    or fewer than 2 classes."""

    def __init__(self, dim: int, num_classes: int, members: int = 10, hidden: tuple[int, ...] = (128, 32)):
        super().__init__()
        if dim < 1 or members < 1 or not hidden or min(hidden) < 1:
            raise ValueError(f"the pixel ensemble needs a feature width, members and hidden widths >= 1, got dim {dim}, "
                             f"segment.members = {members}, segment.hidden = {list(hidden)}")
        if num_classes < 2:
            raise ValueError(f"a segmentation needs at least 2 classes (background and one more), got {num_classes}")
        self.members, self.num_classes = members, num_classes
        widths = [dim, *hidden, num_classes]
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(members, i, o) * 0.02) for i, o in zip(widths, widths[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(members, o)) for o in widths[1:])
        self.norms = nn.ModuleList(GlobalBatchNorm(members * h) for h in hidden)  # weight 1, bias 0 (the reference's
        #                                                                        init_weights leaves BatchNorm1d as built)

    def forward(self, f: Tensor) -> Tensor:
        M = self.members
        if f.ndim == 2:  # shared rows: one matrix product for every member's first layer
            h = (f @ self.weights[0].permute(1, 0, 2).reshape(f.shape[1], -1)).view(f.shape[0], M, -1)
        else:  # each member its own rows
            h = torch.einsum("mpd,mdh->pmh", f, self.weights[0])
        h = h + self.biases[0]
        P = h.shape[0]
        for k, bn in enumerate(self.norms):
            h = bn(F.relu(h).reshape(P, -1)).view(P, M, -1)
            h = torch.einsum("pmi,mio->pmo", h, self.weights[k + 1]) + self.biases[k + 1]
        return h.transpose(0, 1)  # (M, P, C)
