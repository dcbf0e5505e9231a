"""Fast paths: the same computation, arranged for a GPU.

Each path is chosen by a setting ("auto", "yes", "no"; "auto" = on a CUDA device only, where it was chosen by
measurement, bench/gpu.py) and computes what the plain path computes, to rounding (tests/test_speed.py checks each on
the CPU against the plain path):

- `compile_network`: torch.compile of a network, in place (`nn.Module.compile`, so its state_dict keys do not change);
  for sampling in "reduce-overhead" mode on CUDA, which replays the network as a CUDA graph.
- `to_channels_last`: convolution weights in NHWC order; cuDNN then runs the whole network NHWC (its output follows
  its weights' layout), which tensor cores prefer.
- `adamw`: torch.optim.AdamW with its fused kernel (one launch for every parameter) where the device has it.
- `hold_on_device`: a small in-memory dataset copied to the device once, so a training batch is an index on the
  device, not a host-to-device copy; `to_device` copies a batch read on the host through pinned memory, without a
  synchronisation.

The trainer's and the sampler's non-finite checks are batched elsewhere (train.Trainer, generate.FiniteWatch): a check
that reads a tensor on the host waits for the GPU, so they read once per log interval instead of once per step.
"""

from __future__ import annotations

import inspect
import warnings
import weakref

import torch
from torch import Tensor, nn

from . import schedule

MODES = ("auto", "yes", "no")
HOLD_BYTES = 2 * 2**30
"""The largest dataset `hold_on_device` copies to a GPU (and never more than a tenth of its memory): 2 GiB."""


def wanted(mode: str, device: str | torch.device, key: str) -> bool:
    """Whether a fast path set to `mode` runs on `device`: "yes", "no", or "auto" (on CUDA only). Raises ValueError
    naming `key` (the setting) for any other value."""
    if mode not in MODES:
        raise ValueError(f"{key} must be one of {', '.join(MODES)}; got {mode!r}")
    return mode == "yes" or (mode == "auto" and torch.device(device).type == "cuda")


def compile_network(net: nn.Module, device: str | torch.device, *, sampling: bool = False,
                    backend: str = "inductor") -> nn.Module:
    """Compile `net` in place with torch.compile (its forward; parameters, buffers and state_dict keys unchanged) and
    return it; a second call changes nothing. For sampling on CUDA, mode "reduce-overhead": the network is captured as
    a CUDA graph and replayed at every step (a sampler calls it with the same shapes each time), its outputs copied out
    of the graph's pool (`fresh_outputs`). Compiled graphs are cached on disk by
    TorchInductor (TORCHINDUCTOR_CACHE_DIR), so a second process compiles faster. Needs a C++ compiler on a CPU.
    `backend` is torch.compile's ("aot_eager" traces without generating kernels: the tests' cheap check of the wiring)."""
    if net in _COMPILED:  # compiled already (a page's cached model): keep its graphs
        return net
    _COMPILED.add(net)
    if sampling and torch.device(device).type == "cuda" and backend == "inductor":
        net.forward = fresh_outputs(torch.compile(net.forward, mode="reduce-overhead", dynamic=False))
    else:
        net.compile(backend=backend, dynamic=False)
    return net


_COMPILED: weakref.WeakSet = weakref.WeakSet()


def is_compiled(net: nn.Module) -> bool:
    """Whether compile_network compiled `net`."""
    return net in _COMPILED


def fresh_outputs(network):
    """`network` with its outputs copied out of the CUDA graph's memory pool, where the next replay would overwrite
    them: a sampler keeps predictions across calls (classifier-free guidance's first half while the second runs,
    DPM-Solver's previous x_0, self-conditioning's last estimate), and an output of a replayed graph is valid only
    until the graph runs again. One copy of the output per call."""

    def forward(*args, **kwargs):
        out = network(*args, **kwargs)
        return out.clone() if isinstance(out, Tensor) else type(out)(o.clone() for o in out)

    return forward


def to_channels_last(net: nn.Module) -> nn.Module:
    """Every 4-d parameter and buffer of `net` (convolution weights) in channels_last (NHWC) order, in place."""
    return net.to(memory_format=torch.channels_last)


def fused_adamw_available(device: str | torch.device) -> bool:
    """Whether torch.optim.AdamW has a fused kernel for `device` here (CUDA; CPU from torch 2.4)."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(1, device=device))], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict] | list[nn.Parameter]:
    """AdamW's parameter groups for decoupled weight decay: only weights of ndim >= 2 (linear and conv kernels,
    embeddings) decay; biases, normalisation gains and scalars such as CLIP's logit_scale (ndim < 2) do not, the
    rule of nanoGPT, open_clip (which exempts logit_scale by name) and DALLE2-pytorch's prior trainer. The exempt
    group is marked "no_decay". With weight_decay 0, or nothing to exempt, the plain list: one group, as before."""
    exempt = [p for p in params if p.ndim < 2]
    if not weight_decay or not exempt:
        return params
    return [{"params": [p for p in params if p.ndim >= 2]}, {"params": exempt, "weight_decay": 0.0, "no_decay": True}]


def regroup_state(saved: dict, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """An AdamW state dict saved over `params` in one grouping (one group, or decay_groups' two) rewritten for
    `optimizer`'s grouping of the same `params`, moments kept, so runs saved before decay_groups (or with another
    train.weight_decay) resume with their optimizer state. Each group takes the saved first group's settings and its
    own weight decay. Unchanged where the group counts agree."""
    groups = saved["param_groups"]
    if len(groups) == len(optimizer.param_groups):
        return saved
    order = (list(range(len(params))) if len(groups) == 1 else  # saved ids: the order of the saved groups
             [i for i, p in enumerate(params) if p.ndim >= 2] + [i for i, p in enumerate(params) if p.ndim < 2])
    saved_id = {position: j for j, position in enumerate(order)}
    position = {id(p): i for i, p in enumerate(params)}
    warnings.warn(f"the optimizer state was saved in {len(groups)} parameter group(s) and is regrouped into "
                  f"{len(optimizer.param_groups)} for this config's weight decay, moments kept (decay spares biases, gains and scalars: "
                  "ndim < 2, speed.decay_groups)")
    new = [{**groups[0], "params": [saved_id[position[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"],
            **({"no_decay": True} if g.get("no_decay") else {})} for g in optimizer.param_groups]
    return {"state": saved["state"], "param_groups": new}


def adamw(params, *, fused: bool, **kw) -> torch.optim.AdamW:
    """torch.optim.AdamW over `params` (kw: lr, betas, weight_decay), with the fused kernel if `fused`: the same update
    (Loshchilov & Hutter 2019, Algorithm 2) in one launch, equal to the loop's to float32 rounding."""
    return torch.optim.AdamW(params, fused=True, **kw) if fused else torch.optim.AdamW(params, **kw)


class DeviceDataset:
    """A copy of an in-memory dataset's examples (x and its condition tensors) on a device: batch(idx) indexes there.
    Only for datasets whose batch(idx) is a pure function of idx (no draws, no decoding): data.ImageDataset with its
    pixels in memory and the cached latents of stages. The values are those of the host dataset, bit for bit."""

    def __init__(self, dataset, device: torch.device):
        x, cond = dataset.batch(torch.arange(len(dataset)))
        self.x = x.to(device)
        self.cond = {k: v.to(device) for k, v in cond.items()}
        self.device = device

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        idx = idx.to(self.device, non_blocking=True)
        return self.x[idx], {k: v[idx] for k, v in self.cond.items()}


def dataset_bytes(dataset) -> int | None:
    """The bytes of a dataset's examples held as float32 on a device, or None when its batches are not a pure slice of
    tensors in memory (images read from files at each batch, latents encoded at each batch)."""
    if not getattr(dataset, "pure_batches", False):
        return None
    x, cond = dataset.batch(torch.arange(1))
    per = x.element_size() * x.numel() + sum(v.element_size() * v.numel() for v in cond.values())
    return per * len(dataset)


def hold_on_device(dataset, device: torch.device, mode: str = "auto"):
    """`dataset` itself, or a DeviceDataset copy of it on `device` when `mode` (train.data_on_device) asks and it is
    small: at most HOLD_BYTES and a tenth of the device's memory ("auto": on CUDA only)."""
    if not wanted(mode, device, "train.data_on_device"):
        return dataset
    size = dataset_bytes(dataset)
    if size is None:
        return dataset
    limit = HOLD_BYTES
    if device.type == "cuda":
        limit = min(limit, torch.cuda.get_device_properties(device).total_memory // 10)
    return DeviceDataset(dataset, device) if size <= limit or mode == "yes" else dataset


to_device = schedule.to_device
"""A tensor on a device: from the host through pinned memory without waiting (non_blocking) when the device is CUDA."""
