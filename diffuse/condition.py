"""Conditioning as data: a condition is a dict of named tensors, each kind with its null value.

A network states what it takes in a `ConditionSpec`; datasets yield (x, cond), the trainer drops
each key with its own probability (`drop`), classifier-free guidance runs cond beside uncond
(`null`), and all of them pass the dict on without knowing which keys exist. The keys:

    label         (B,) int64 class indices in [0, num_classes); null: the extra index num_classes,
                  "no class", whose embedding label dropout trains (Ho & Salimans 2022, Algorithm 1)
    image         (B, C_c, H, W) float, concatenated to x_t as extra input channels: the upsampled
                  low-resolution image of SR3 (Saharia et al. 2021, sec. 2) or Palette's source
                  image (Saharia et al. 2022); null: zeros
    scalars       (B, k) float, each in about [0, 1], embedded like the time: e.g. the noise level of
                  noise-conditioning augmentation (Ho et al. 2021, "Cascaded diffusion", sec. 4.2); null: zeros
    context       (B, M, d) float token states tau_theta(y) for cross-attention, Q from the image
                  features and K, V from the context (Rombach et al. 2022, sec. 3.3); null: zeros
    context_mask  (B, M) bool, True for real tokens (padding is not attended); optional, belongs to
                  the context: dropped with it, and its null attends every (zero) token
    text          (B, M) int64 token ids of a caption (text.py; 0 = padding), which the network's own text encoder
                  tau_theta turns into its cross-attention context (Rombach et al. 2022, sec. 3.3); null: the empty
                  caption's tokens, so classifier-free guidance over text guides against "" (Ho & Salimans 2022)
    self_cond     (B, C, H, W) float, the model's own previous estimate of x_0, concatenated to x_t
                  (self-conditioning, Chen et al. 2023, "Analog Bits", sec. 3); optional: its null, zeros,
                  is "no estimate yet", what the first step of sampling and half the training steps see
    augment       (B, k) float, the parameters of the augmentation applied to a training image (augment.LABELS;
                  non-leaking augmentation, Karras et al. 2022, appendix F.2); optional: its null, zeros, is "not
                  augmented", what sampling passes
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CONDITION_KEYS = ("label", "image", "scalars", "context", "context_mask", "text", "self_cond", "augment")


@dataclass(frozen=True)
class ConditionSpec:
    """The conditioning a network takes: class labels (num_classes > 0), image channels to concatenate to x_t,
    scalars per example, a cross-attention context of width context_dim, captions of `text` tokens (null_text: the
    empty caption's tokens), and two optional keys: (self_condition) a previous x_0 estimate and (augment, its width)
    the augmentation labels of training. All zero: unconditional."""

    num_classes: int = 0
    image_channels: int = 0
    scalars: int = 0
    context_dim: int = 0
    self_condition: bool = False
    augment: int = 0
    text: int = 0
    null_text: tuple[int, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """The required keys, in CONDITION_KEYS order (context_mask, self_cond and augment, optional, are not listed)."""
        given = {"label": self.num_classes, "image": self.image_channels, "scalars": self.scalars,
                 "context": self.context_dim, "text": self.text}
        return tuple(k for k, n in given.items() if n)

    def check(self, cond: dict, x: Tensor, values: bool = False) -> None:
        """Raise ValueError naming the key for an unknown or missing key, or a value of the wrong shape or dtype for a
        batch x (B, C, H, W); with `values`, also labels out of range and context masks that attend nothing (these read
        the tensors, a device sync: `generate` checks them once, the network's forward only the shapes)."""
        takes = (self.keys + (("context_mask",) if self.context_dim else ()) + (("self_cond",) if self.self_condition else ())
                 + (("augment",) if self.augment else ()))
        unknown = [k for k in cond if k not in takes]
        if unknown:
            raise ValueError(f"this model does not take the condition key(s) {unknown}; it takes "
                             f"{list(takes) or 'none (it is unconditional)'}"
                             + ("" if set(unknown) <= set(CONDITION_KEYS) else f"; known kinds are {list(CONDITION_KEYS)}"))
        missing = [k for k in self.keys if cond.get(k) is None]
        if missing:
            raise ValueError(f"this model is conditioned on {list(self.keys)}: pass {missing} too (a null value, "
                             "ConditionSpec.null, for the unconditional model)")
        B = x.shape[0]
        if self.num_classes:
            label = cond["label"]
            if label.shape != (B,) or label.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"label must be an integer tensor of shape ({B},), one class per image, got "
                                 f"{label.dtype} {tuple(label.shape)}")
            if values and label.numel() and not (0 <= int(label.min()) and int(label.max()) <= self.num_classes):
                raise ValueError(f"labels must lie in 0..{self.num_classes - 1} (or {self.num_classes}, the null label), "
                                 f"got {int(label.min())}..{int(label.max())}")
        if self.image_channels:
            want = (B, self.image_channels, *x.shape[2:])
            if tuple(cond["image"].shape) != want:
                raise ValueError(f"the condition image must have shape {want} (B, C_c, H, W like x_t), got "
                                 f"{tuple(cond['image'].shape)}")
        if cond.get("self_cond") is not None and tuple(cond["self_cond"].shape) != tuple(x.shape):
            raise ValueError(f"self_cond, the previous x_0 estimate, must have the shape of x_t {tuple(x.shape)}, got "
                             f"{tuple(cond['self_cond'].shape)}")
        if cond.get("augment") is not None and tuple(cond["augment"].shape) != (B, self.augment):
            raise ValueError(f"augment, the augmentation labels, must have shape ({B}, {self.augment}), got "
                             f"{tuple(cond['augment'].shape)}")
        if self.scalars and tuple(cond["scalars"].shape) != (B, self.scalars):
            raise ValueError(f"scalars must have shape ({B}, {self.scalars}), got {tuple(cond['scalars'].shape)}")
        if self.text:
            tokens = cond["text"]
            if tuple(tokens.shape) != (B, self.text) or tokens.dtype != torch.int64:
                raise ValueError(f"text must be an int64 tensor of token ids of shape ({B}, {self.text}) (batch, "
                                 f"model.max_tokens), got {tokens.dtype} {tuple(tokens.shape)}; tokenize captions with the "
                                 "model's text encoder")
        if self.context_dim:
            ctx = cond["context"]
            if ctx.ndim != 3 or ctx.shape[0] != B or ctx.shape[2] != self.context_dim:
                raise ValueError(f"the context must have shape ({B}, M, {self.context_dim}) (batch, tokens, width "
                                 f"model.context_dim), got {tuple(ctx.shape)}")
            mask = cond.get("context_mask")
            if mask is not None:
                if mask.dtype != torch.bool or tuple(mask.shape) != tuple(ctx.shape[:2]):
                    raise ValueError(f"context_mask must be a bool tensor of shape {tuple(ctx.shape[:2])}, got "
                                     f"{mask.dtype} {tuple(mask.shape)}")
                if values and not bool(mask.any(1).all()):
                    raise ValueError("every context_mask row needs at least one True (attended) token")

    def null_value(self, key: str, value: Tensor) -> Tensor:
        """The null (unconditional) value of `key` for a batch shaped like `value` (see the module docstring)."""
        if key == "label":
            return torch.full_like(value, self.num_classes)
        if key == "context_mask":
            return torch.ones_like(value)
        if key == "text":  # the empty caption "", padded
            null = torch.zeros_like(value)
            null[:, :len(self.null_text)] = torch.tensor(self.null_text, dtype=value.dtype, device=value.device)
            return null
        if key in CONDITION_KEYS:
            return torch.zeros_like(value)
        raise ValueError(f"unknown condition key {key!r}; known kinds are {list(CONDITION_KEYS)}")

    def null(self, cond: dict, keys=None) -> dict:
        """cond with `keys` (default: all) replaced by their null values; dropping "context" drops "context_mask"."""
        keys = set(cond if keys is None else keys)
        if "context" in keys:
            keys.add("context_mask")
        return {k: self.null_value(k, v) if k in keys else v for k, v in cond.items()}

    def drop(self, cond: dict, dropped: dict[str, Tensor]) -> dict:
        """Condition dropout: for each key, the examples where dropped[key] (B,) is True get the null value, the
        others keep theirs (Ho & Salimans 2022, Algorithm 1, line 3, with one probability per key)."""
        out = dict(cond)
        for key, mask in dropped.items():
            keys = [key, "context_mask"] if key == "context" and "context_mask" in cond else [key]
            for k in keys:
                v = cond[k]
                out[k] = torch.where(mask.view(-1, *([1] * (v.ndim - 1))).to(v.device), self.null_value(k, v), v)
        return out


def batch_condition(conds: list[dict]) -> dict:
    """Stack per-example condition dicts (as a dataset yields them) into one batched dict; all must share keys."""
    keys = set(conds[0]) if conds else set()
    if any(set(c) != keys for c in conds):
        raise ValueError("every example of a batch must carry the same condition keys")
    return {k: torch.stack([c[k] for c in conds]) for k in sorted(keys)}


def concat_conditions(a: dict, b: dict) -> dict:
    """Two batched conditions with the same keys, concatenated along the batch (one network call for both)."""
    if set(a) != set(b):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(a)} and {sorted(b)}")
    return {k: torch.cat([a[k], b[k]]) for k in a}
