"""Several processes (torchrun): the process group, this process's device and slice of a global batch, and the few
collectives the trainer needs. One process is the same code with world size 1, where every collective is the identity.

A step draws every random number for the global batch and each process keeps its rows (`local`), so a step computes
the same gradient whatever the number of processes: DDP averages the per-process means of equal slices.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def init() -> tuple[int, int]:
    """(rank, world size), initialising the process group (NCCL on GPUs, gloo on CPUs) when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device() -> torch.device:
    """This process's device: the GPU of its LOCAL_RANK (made current), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(d)
    return d


def world_size() -> int:
    """The process group's size (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def local(x: Tensor, rank: int, world: int) -> Tensor:
    """Process `rank`'s slice of a global-batch tensor (B, ...): rows rank * B/world up to (rank + 1) * B/world."""
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def gather(x: Tensor, world: int) -> Tensor:
    """The global batch of a per-example tensor (b, ...), from every process's slice in rank order (no gradient).
    `world` is the caller's number of processes: 1 (the identity) for work one process does alone inside a torchrun
    job, whatever the process group holds; every collective here takes it."""
    if world == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient of the global batch and keeps this process's rows (an
    all_reduce: gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, world: int) -> Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def gather_with_grad(x: Tensor, world: int) -> Tensor:
    """The global batch of a per-example tensor (b, ...) in rank order, differentiable: every process computes the same
    global-batch loss L, and this process's rows receive the sum over processes of dL/dx, world * dL/dx, which DDP's
    mean over processes turns back into dL/dtheta (open_clip's gather_with_grad). The identity for one process."""
    return x if world == 1 else _GatherWithGrad.apply(x, world)


def mean(x: Tensor, world: int) -> Tensor:
    """The mean over the `world` processes of a tensor of the same shape on each (a copy; the identity for one)."""
    if world == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world


def total(x: Tensor, world: int) -> Tensor:
    """The sum over the `world` processes of a tensor of the same shape on each, in place (the identity for one)."""
    if world > 1:
        dist.all_reduce(x)
    return x


def agree(flag: bool, device: torch.device, world: int) -> bool:
    """Rank 0's decision, shared by the `world` ranks (wall clocks differ between processes: time limits)."""
    if world == 1:
        return flag
    f = torch.tensor([float(flag)], device=device)
    dist.broadcast(f, 0)
    return bool(f.item())


def close() -> None:
    """End the process group, if one was started."""
    if dist.is_initialized():
        dist.destroy_process_group()
