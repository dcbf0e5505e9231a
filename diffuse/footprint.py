"""The footprint of one training step, before training: parameters, FLOPs per image, peak memory.

`step_footprint` runs a caller's `step_fn` (forward + backward + optimizer step of one training step)
and reports what `diffuse train --dry-run` prints. FLOPs come from torch's own counter
(`torch.utils.flop_counter.FlopCounterMode`): matmuls, convolutions, attention and their backwards,
a multiply-add counted as 2 FLOPs; elementwise ops, norms and the optimizer's update are not counted.

Peak memory on CUDA is the caching allocator's own statistic (max_memory_allocated). On CPU torch keeps
no allocator statistics, so `_StorageTracker` (a TorchDispatchMode) watches every aten op: each output
whose storage is new is added to a live total with its size, and a `weakref.finalize` on that storage
subtracts it when the storage is freed. torch keeps one Python object per storage for as long as the
C++ storage lives (views, autograd's saved tensors, optimizer state all hold it), so the finalizer
fires exactly at the free, and the running maximum is exact for everything tensors hold. (The profiler's
memory events, torch.profiler.profile(profile_memory=True), were the alternative; on CPU builds of torch 2.13
they hold the frees but not the allocations, so their running sum is useless there.)
"""

from __future__ import annotations

import weakref
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Parameters", "parameter_count", "count_flops", "peak_memory", "Footprint", "step_footprint"]


class Parameters(NamedTuple):
    total: int
    trainable: int


def parameter_count(model: nn.Module) -> Parameters:
    """(total, trainable) number of parameter elements of `model`; a parameter shared by several modules
    (tied weights) counts once. Buffers (e.g. batch-norm running statistics, EMA copies) are not counted."""
    params = list(model.parameters())
    return Parameters(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of running `fn()` once, forward and backward if fn runs both, as torch's FlopCounterMode counts them:
    a multiply-add is 2 FLOPs (x @ W with x (m, k), W (k, n) is 2 m k n); matmul, convolution, attention and
    their backward are counted, elementwise ops, reductions, norms and optimizer updates are not (they are
    memory-bound and small beside the matmuls). Exceptions raised by fn propagate."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


class _StorageTracker(TorchDispatchMode):
    """Live and peak bytes of the storages on `device_type` that aten ops create while the mode is on."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type, self.live, self.peak, self.sizes = device_type, 0, 0, {}

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {id(s) for s in _storages(tree_leaves((args, kwargs)))}  # views, in-place and out= results
        for storage in _storages(tree_leaves(out)):
            key = id(storage)  # one Python object per live storage, however many tensors view it
            if storage.device.type != self.device_type or (key in seen and key not in self.sizes):
                continue  # another device, or a view of (or in-place op on) a storage made before the mode
            if key not in self.sizes:
                weakref.finalize(storage, self._free, key)
            self.live += storage.nbytes() - self.sizes.get(key, 0)  # a tracked storage may have been resized
            self.sizes[key] = storage.nbytes()
            self.peak = max(self.peak, self.live)
        return out


def _storages(leaves):
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            yield t.untyped_storage()


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak bytes held by tensors on `device` while `fn()` runs, above what was allocated before it: what fn needs
    free. On CUDA: max_memory_allocated minus memory_allocated before fn, from the caching allocator (its 512-byte
    rounding included, memory it caches but no tensor holds excluded). On any other device: every storage an aten
    op creates during fn (op outputs, autograd's saved tensors, gradients, optimizer state), counted at its nbytes
    from creation until freed. Not seen there: scratch memory a kernel frees before returning, tensors made from
    Python data or numpy (torch.tensor, torch.from_numpy), and storages allocated before fn and freed in it (not
    subtracted). Run it on a first step: a later one finds gradients and optimizer state already allocated.
    Exceptions of fn propagate."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = _StorageTracker(device.type)
    with tracker:
        fn()
    return tracker.peak


class Footprint(NamedTuple):
    parameters: int  # total parameter elements
    flops_per_image: float  # FLOPs of the step (FlopCounterMode, multiply-add = 2) / batch_size
    peak_bytes: int  # peak_memory of the step
    batch_size: int
    parameter_bytes: int

    def describe(self) -> str:
        """One paragraph for a person: parameters, FLOPs per image and peak memory of the step."""
        return (f"{_si(self.parameters)} parameters ({_bytes(self.parameter_bytes)}); "
                f"{_si(self.flops_per_image, 'FLOP')} per training image (forward + backward, a multiply-add = 2 "
                f"FLOPs); peak memory of one training step of batch {self.batch_size}: {_bytes(self.peak_bytes)} on top "
                "of what was allocated before it (activations, gradients and the optimizer state the step creates; the "
                "weights themselves are not included)")

    __str__ = describe


def _si(n: float, unit: str = "") -> str:
    """'2.41 M', '1.86 GFLOP', '256 FLOP': a number with a decimal prefix to its unit."""
    for prefix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {prefix}{unit}".rstrip()
    return f"{n:g} {unit}".rstrip()


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def step_footprint(step_fn: Callable[[], object], model: nn.Module, batch_size: int,
                   device: torch.device | str) -> Footprint:
    """The footprint of `step_fn()`, a single training step of `batch_size` images: forward, backward and optimizer
    step. It runs step_fn twice, each a real step that updates the weights: first for `peak_memory` (so call it
    before training, while gradients and lazily made optimizer state do not exist yet and count in the peak),
    then for `count_flops`; FLOPs include what activation checkpointing recomputes. Not one run for both because
    FlopCounterMode's module hooks keep some checkpointed activations alive longer, which would inflate the peak.
    Raises ValueError for batch_size < 1; exceptions of step_fn propagate."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    peak = peak_memory(step_fn, device)
    flops = count_flops(step_fn)
    return Footprint(parameter_count(model).total, flops / batch_size, peak, batch_size,
                     sum(p.numel() * p.element_size() for p in model.parameters()))
