"""Conditioning as data: a condition is a dict of named tensors, each kind with its null value.

A network states what it takes in a `ConditionSpec`; datasets yield (x, cond), the trainer drops
each key with its own probability (`drop`), classifier-free guidance runs cond beside uncond
(`null`), and all of them pass the dict on without knowing which keys exist.

Each key is one row of `CONDITION_KINDS`, a `ConditionKind`: its shape for a batch x, its dtype, its
null value, what it is. x is (B, C, H, W) for images and (B, C, F, H, W) for video; a shape that
follows x follows it at any rank. Adding a kind is one row there and one `ConditionSpec` field
that switches it on; `check`, `null` and `drop` read the rows. The keys (this table is written
from the rows):

"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class ConditionKind:
    """One condition key: what `ConditionSpec.check` expects of it, and its null value.

    `shape(spec, x, cond)` is the shape the value must have for a batch x (a str entry names a free axis, e.g. the
    context's M tokens); `message` is the error raised otherwise, a format string over name, want (that shape),
    shape and dtype (the value's), and axes (x's axes after the channels: "H, W" for images, "F, H, W" for video).
    """

    name: str
    spec_field: str  # the ConditionSpec field that switches the key on (nonzero or True) and sizes it
    shape: Callable[[ConditionSpec, Tensor, dict], tuple]
    doc: str  # one entry of the module docstring's table: the shape, what the value means, its null
    dtypes: tuple[torch.dtype, ...] = ()  # the dtypes accepted; () takes any (float keys are not checked)
    null: Callable[[ConditionSpec, Tensor], Tensor] = lambda spec, value: torch.zeros_like(value)  # the null value
    optional: bool = False  # may be left out of a condition (so not in ConditionSpec.keys)
    companion_of: str | None = None  # nulled and dropped with that key, its shape read from it (listed after it)
    values: Callable[[ConditionSpec, Tensor], None] | None = None  # raises on bad values (reads the tensor: a sync)
    message: str = "{name} must have shape {want}, got {dtype} {shape}"
    # check() looks at the keys by this number, ties in table order; the first eight keep the order of the if-chain
    # they replaced, which decides the error a condition with several bad keys gets
    check_order: int = 100


def _null_label(spec: ConditionSpec, label: Tensor) -> Tensor:
    """The extra index num_classes, "no class"."""
    return torch.full_like(label, spec.num_classes)


def _null_text(spec: ConditionSpec, tokens: Tensor) -> Tensor:
    """The empty caption "", padded."""
    null = torch.zeros_like(tokens)
    null[:, :len(spec.null_text)] = torch.tensor(spec.null_text, dtype=tokens.dtype, device=tokens.device)
    return null


def _check_label_values(spec: ConditionSpec, label: Tensor) -> None:
    if label.numel() and not (0 <= int(label.min()) and int(label.max()) <= spec.num_classes):
        raise ValueError(f"labels must lie in 0..{spec.num_classes - 1} (or {spec.num_classes}, the null label), "
                         f"got {int(label.min())}..{int(label.max())}")


def _check_mask_values(spec: ConditionSpec, mask: Tensor) -> None:
    if not bool(mask.any(1).all()):
        raise ValueError("every context_mask row needs at least one True (attended) token")


def _check_frame_index_values(spec: ConditionSpec, index: Tensor) -> None:
    if index.is_floating_point() and not bool(torch.isfinite(index).all()):
        raise ValueError("frame_index must be finite (the frames' positions in time, e.g. 0, 2, 4, 6)")


def _check_finite_values(spec: ConditionSpec, value: Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise ValueError("image_embed must be finite (a CLIP image embedding, a unit vector); it holds NaN or infinite "
                         "values: embed the image again, or check the CLIP run's weights")


def _frames_of(x: Tensor) -> int | str:
    """F, the frame axis of a video x (B, C, F, H, W); "F" (a free axis, for messages) for x of another rank."""
    return x.shape[2] if x.ndim == 5 else "F"


def _unchanged(spec: ConditionSpec, value: Tensor) -> Tensor:
    """The null of a key that says how the input is laid out, not what to generate: itself (guidance keeps it)."""
    return value


CONDITION_KINDS: dict[str, ConditionKind] = {kind.name: kind for kind in (
    ConditionKind(
        "label", "num_classes", lambda spec, x, cond: (x.shape[0],),
        dtypes=(torch.int64, torch.int32), null=_null_label, values=_check_label_values, check_order=0,
        message="label must be an integer tensor of shape {want}, one class per image, got {dtype} {shape}",
        doc="(B,) int64 class indices in [0, num_classes); null: the extra index num_classes, \"no class\", whose "
            "embedding label dropout trains (Ho & Salimans 2022, Algorithm 1)"),
    ConditionKind(
        "image", "image_channels", lambda spec, x, cond: (x.shape[0], spec.image_channels, *x.shape[2:]),
        check_order=1,
        message="the condition image must have shape {want} (B, C_c, {axes} like x_t), got {shape}",
        doc="(B, C_c, H, W) float (video: (B, C_c, F, H, W), x_t's axes after the channels), concatenated to x_t as "
            "extra input channels: the upsampled low-resolution image of SR3 (Saharia et al. 2021, sec. 2) or "
            "Palette's source image (Saharia et al. 2022); null: zeros"),
    ConditionKind(
        "scalars", "scalars", lambda spec, x, cond: (x.shape[0], spec.scalars), check_order=4,
        message="scalars must have shape {want}, got {shape}",
        doc="(B, k) float, each in about [0, 1], embedded like the time: e.g. the noise level of noise-conditioning "
            "augmentation (Ho et al. 2021, \"Cascaded diffusion\", sec. 4.2); null: zeros"),
    ConditionKind(
        "context", "context_dim", lambda spec, x, cond: (x.shape[0], "M", spec.context_dim), check_order=6,
        message="the context must have shape {want} (batch, tokens, width model.context_dim), got {shape}",
        doc="(B, M, d) float token states tau_theta(y) for cross-attention, Q from the image features and K, V from "
            "the context (Rombach et al. 2022, sec. 3.3); null: zeros"),
    ConditionKind(
        "context_mask", "context_dim", lambda spec, x, cond: tuple(cond["context"].shape[:2]),
        dtypes=(torch.bool,), null=lambda spec, mask: torch.ones_like(mask), optional=True, companion_of="context",
        values=_check_mask_values, check_order=6,
        message="context_mask must be a bool tensor of shape {want}, got {dtype} {shape}",
        doc="(B, M) bool, True for real tokens (padding is not attended); optional, belongs to the context: dropped "
            "with it, and its null attends every (zero) token"),
    ConditionKind(
        "text", "text", lambda spec, x, cond: (x.shape[0], spec.text),
        dtypes=(torch.int64,), null=_null_text, check_order=5,
        message="text must be an int64 tensor of token ids of shape {want} (batch, model.max_tokens), got {dtype} "
                "{shape}; tokenize captions with the model's text encoder",
        doc="(B, M) int64 token ids of a caption (text.py; 0 = padding), which the network's own text encoder "
            "tau_theta turns into its cross-attention context (Rombach et al. 2022, sec. 3.3); null: the empty "
            "caption's tokens, so classifier-free guidance over text guides against \"\" (Ho & Salimans 2022)"),
    ConditionKind(
        "self_cond", "self_condition", lambda spec, x, cond: tuple(x.shape), optional=True, check_order=2,
        message="self_cond, the previous x_0 estimate, must have the shape of x_t {want}, got {shape}",
        doc="(B, C, H, W) float (the shape of x_t, at any rank), the model's own previous estimate of x_0, "
            "concatenated to x_t (self-conditioning, Chen et al. 2023, \"Analog Bits\", sec. 3); optional: its null, "
            "zeros, is \"no estimate yet\", what the first step of sampling and half the training steps see"),
    ConditionKind(
        "augment", "augment", lambda spec, x, cond: (x.shape[0], spec.augment), optional=True, check_order=3,
        message="augment, the augmentation labels, must have shape {want}, got {shape}",
        doc="(B, k) float, the parameters of the augmentation applied to a training image (augment.LABELS; "
            "non-leaking augmentation, Karras et al. 2022, appendix F.2); optional: its null, zeros, is \"not "
            "augmented\", what sampling passes"),
    ConditionKind(
        "z_sem", "semantic", lambda spec, x, cond: (x.shape[0], spec.semantic), check_order=7,
        message="z_sem, the semantic code, must have shape {want} (batch, model.semantic_dim), got {shape}",
        doc="(B, d) float, the semantic code of a diffusion autoencoder, Enc(x_0) of its semantic encoder, which scales "
            "every residual block of the decoder (Preechakul et al. 2022, sec. 3.1); null: zeros"),
    ConditionKind(
        "frame_index", "video", lambda spec, x, cond: (x.shape[0], _frames_of(x)), null=_unchanged, optional=True,
        values=_check_frame_index_values, check_order=8,
        message="frame_index must have shape {want} (batch, frames: one position in time per frame of x), got "
                "{dtype} {shape}",
        doc="(B, F) int or float, each frame's position in time in any units and spacing (only differences count: "
            "the relative-position bias of temporal attention, Harvey et al. 2022, FDM); optional, default "
            "arange(F); no null: guidance keeps it (it says where the frames are, not what they show)"),
    ConditionKind(
        "independent", "video", lambda spec, x, cond: (x.shape[0], _frames_of(x)), dtypes=(torch.bool,),
        null=_unchanged, optional=True, check_order=9,
        message="independent must be a bool tensor of shape {want} (batch, frames; True: the frame is an image of its "
                "own), got {dtype} {shape}",
        doc="(B, F) bool, True for a frame that is an independent image: temporal attention lets it attend only "
            "itself (Ho et al. 2022, sec. 3, joint image-video training; all True is image mode); optional, default "
            "all False; no null: guidance keeps it"),
    ConditionKind(
        "observed", "observed", lambda spec, x, cond: (x.shape[0], _frames_of(x)), dtypes=(torch.bool,),
        null=_unchanged, check_order=10,
        message="observed must be a bool tensor of shape {want} (batch, frames; True: the frame is given clean in "
                "x), got {dtype} {shape}; from 0/1 values pass observed > 0.5",
        doc="(B, F) bool, True for the frames given clean in x_t's place, an extra input channel (Harvey et al. 2022, "
            "FDM's mask channel; Hoppe et al. 2022, RaMViD); no null: guidance keeps it (all False: nothing given)"),
    ConditionKind(
        "image_embed", "image_embed", lambda spec, x, cond: (x.shape[0], spec.image_embed), check_order=11,
        values=_check_finite_values,
        message="image_embed, the CLIP image embedding, must have shape {want} (batch, model.image_embed_dim), got "
                "{shape}",
        doc="(B, D) float, the unit CLIP image embedding z_i of unCLIP's decoder, projected and added to the time "
            "embedding and projected into extra cross-attention tokens (Ramesh et al. 2022, sec. 2.1); null: zeros "
            "(no unit embedding is zero), trained by condition dropout (the paper: 10%) for guidance on z_i"),
    ConditionKind(
        "text_embed", "text_embed", lambda spec, x, cond: (x.shape[0], spec.text_embed), check_order=12,
        values=_check_finite_values,
        message="text_embed, the caption's CLIP text embedding, must have shape {want} (batch, the CLIP's width D), got "
                "{shape}",
        doc="(B, D) float, a caption's CLIP text embedding g(c) scaled to norm sqrt(D), the unCLIP prior's condition "
            "beside the caption's token states in `context` (Ramesh et al. 2022, sec. 2.2); null: zeros, \"no "
            "caption\" (the prior drops it together with the context, kinds/unclip.py)"),
)}

CONDITION_KEYS = tuple(CONDITION_KINDS)

__doc__ = (__doc__ or "") + "".join(  # the table of keys, one entry per row
    textwrap.fill(kind.doc, 118, initial_indent=f"    {name:<13} ", subsequent_indent=" " * 18, break_on_hyphens=False)
    + "\n" for name, kind in CONDITION_KINDS.items())


def companions(key: str) -> list[str]:
    """The keys nulled and dropped with `key` (its companion_of rows: "context_mask" for "context")."""
    return [name for name, kind in CONDITION_KINDS.items() if kind.companion_of == key]


def _show_shape(shape: tuple) -> str:
    """A shape as Python writes a tuple, with a free axis by its name: (4, M, 6)."""
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _trailing_axes(x: Tensor) -> str:
    """The names of x's axes after the channels, for messages: "H, W" for images, "F, H, W" for video."""
    return {4: "H, W", 5: "F, H, W"}.get(x.ndim, "...")


def _fits(value: Tensor, want: tuple, dtypes: tuple) -> bool:
    """Whether value has shape `want` (a str entry matches any size) and, if dtypes are given, one of them."""
    return (value.ndim == len(want) and all(isinstance(w, str) or n == w for n, w in zip(value.shape, want))
            and (not dtypes or value.dtype in dtypes))


@dataclass(frozen=True)
class ConditionSpec:
    """The conditioning a network takes: class labels (num_classes > 0), image channels to concatenate to x_t,
    scalars per example, a cross-attention context of width context_dim, captions of `text` tokens (null_text: the
    empty caption's tokens), a semantic code z_sem of width `semantic`, and two optional keys: (self_condition) a previous x_0 estimate and (augment, its width)
    the augmentation labels of training; for a video net (`video`) the optional frame_index and independent, and
    (`observed`) which frames are given clean; a CLIP image embedding of width `image_embed` (unCLIP's decoder). All
    zero: unconditional.

    Each field but null_text switches on the rows of CONDITION_KINDS that name it; a new kind adds its field at the
    end (networks build a spec positionally)."""

    num_classes: int = 0
    image_channels: int = 0
    scalars: int = 0
    context_dim: int = 0
    self_condition: bool = False
    augment: int = 0
    text: int = 0
    null_text: tuple[int, ...] = ()
    semantic: int = 0  # the width of z_sem (a diffusion autoencoder's decoder)
    video: bool = False  # x is (B, C, F, H, W): frame_index and independent (both optional)
    observed: bool = False  # a video net's observed-frames channel: observed (required)
    image_embed: int = 0  # the width D of a CLIP image embedding (unCLIP's decoder)
    text_embed: int = 0  # the width D of a CLIP text embedding (the unCLIP prior, nets/unclip.py)

    @property
    def kinds(self) -> dict[str, ConditionKind]:
        """The kinds this spec switches on, required and optional, in CONDITION_KINDS order."""
        return {name: kind for name, kind in CONDITION_KINDS.items() if getattr(self, kind.spec_field, 0)}

    @property
    def keys(self) -> tuple[str, ...]:
        """The required keys, in CONDITION_KEYS order (context_mask, self_cond and augment, optional, are not listed)."""
        return tuple(name for name, kind in self.kinds.items() if not kind.optional)

    @property
    def takes(self) -> tuple[str, ...]:
        """Every key the network accepts: the required keys, then the optional ones it switches on."""
        return self.keys + tuple(name for name, kind in self.kinds.items() if kind.optional)

    def check(self, cond: dict, x: Tensor, values: bool = False) -> None:
        """Raise ValueError naming the key for an unknown or missing key, or a value of the wrong shape or dtype for a
        batch x (B, C, ...); with `values`, also the kinds' value checks, e.g. labels out of range and context masks
        that attend nothing (these read the tensors, a device sync: `generate` checks them once, the network's
        forward only the shapes)."""
        takes = self.takes
        unknown = [k for k in cond if k not in takes]
        if unknown:
            raise ValueError(f"this model does not take the condition key(s) {unknown}; it takes "
                             f"{list(takes) or 'none (it is unconditional)'}"
                             + ("" if set(unknown) <= set(CONDITION_KINDS)
                                else f"; known kinds are {list(CONDITION_KINDS)}"))
        missing = [k for k in self.keys if cond.get(k) is None]
        if missing:
            raise ValueError(f"this model is conditioned on {list(self.keys)}: pass {missing} too (a null value, "
                             "ConditionSpec.null, for the unconditional model)")
        for kind in sorted(self.kinds.values(), key=lambda kind: kind.check_order):
            value = cond.get(kind.name)
            if value is None:  # an optional key left out
                continue
            want = kind.shape(self, x, cond)
            if not _fits(value, want, kind.dtypes):
                raise ValueError(kind.message.format(name=kind.name, want=_show_shape(want), shape=tuple(value.shape),
                                                     dtype=value.dtype, axes=_trailing_axes(x)))
            if values and kind.values is not None:
                kind.values(self, value)

    def null_value(self, key: str, value: Tensor) -> Tensor:
        """The null (unconditional) value of `key` for a batch shaped like `value` (its row's `null`)."""
        if key not in CONDITION_KINDS:
            raise ValueError(f"unknown condition key {key!r}; known kinds are {list(CONDITION_KINDS)}")
        return CONDITION_KINDS[key].null(self, value)

    def null(self, cond: dict, keys=None) -> dict:
        """cond with `keys` (default: all) replaced by their null values; dropping a key drops its companions
        ("context" drops "context_mask")."""
        keys = set(cond if keys is None else keys)
        keys |= {c for k in keys for c in companions(k)}
        return {k: self.null_value(k, v) if k in keys else v for k, v in cond.items()}

    def drop(self, cond: dict, dropped: dict[str, Tensor]) -> dict:
        """Condition dropout: for each key, the examples where dropped[key] (B,) is True get the null value, the
        others keep theirs (Ho & Salimans 2022, Algorithm 1, line 3, with one probability per key); its companions
        in cond go with it."""
        out = dict(cond)
        for key, mask in dropped.items():
            for k in [key, *(c for c in companions(key) if c in cond)]:
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
