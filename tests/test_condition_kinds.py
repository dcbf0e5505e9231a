"""Condition kinds as rows of a registry (condition.py, CONDITION_KINDS): every row validated and nulled by the same
code, shapes that follow x at any rank, the order of checks kept, and a new kind added as one row plus one
ConditionSpec field with no edit to check, null or drop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import diffuse.condition as condition
from diffuse.condition import CONDITION_KEYS, CONDITION_KINDS, ConditionKind, ConditionSpec

FULL = ConditionSpec(num_classes=10, image_channels=2, scalars=1, context_dim=6, self_condition=True, augment=3, text=5,
                     null_text=(7, 8))


def test_the_table_of_keys():
    assert CONDITION_KEYS == ("label", "image", "scalars", "context", "context_mask", "text", "self_cond", "augment",
                              "z_sem", "frame_index", "independent", "observed", "image_embed", "text_embed")
    assert tuple(CONDITION_KINDS) == CONDITION_KEYS and all(CONDITION_KINDS[k].name == k for k in CONDITION_KEYS)
    assert FULL.keys == ("label", "image", "scalars", "context", "text")  # required, in table order
    assert FULL.takes == FULL.keys + ("context_mask", "self_cond", "augment")  # then the optional ones
    assert ConditionSpec().keys == ConditionSpec().takes == ()
    # networks build the spec positionally (nets/unet.py, sample.condition_spec)
    assert ConditionSpec(10, 2, 1, 6, True, 3, 5, (7, 8)) == FULL
    for name, kind in CONDITION_KINDS.items():  # the module docstring's table is written from the rows
        assert f"    {name:<13} {kind.doc[:40]}" in condition.__doc__


def value_for(kind: ConditionKind, spec: ConditionSpec, x: torch.Tensor, cond: dict) -> torch.Tensor:
    """A valid value of a kind from its own row: its shape (free axes of size 2), its first dtype, ones."""
    shape = [2 if isinstance(n, str) else n for n in kind.shape(spec, x, cond)]
    return torch.ones(shape, dtype=kind.dtypes[0] if kind.dtypes else torch.float32)


def switched_on(spec: ConditionSpec, kind: ConditionKind) -> ConditionSpec:
    on = True if isinstance(getattr(spec, kind.spec_field), bool) else 3
    return dataclasses.replace(spec, **{kind.spec_field: on})


def kind_contract(spec_type: type, kind: ConditionKind, x: torch.Tensor):
    """What every row gets from the shared code: taken when its field is on, a valid value passes, a wrong shape or
    dtype is refused by name, a left-out required key is asked for, and null and drop give its null value."""
    parent = CONDITION_KINDS[kind.companion_of] if kind.companion_of else None
    spec = switched_on(spec_type(), kind)
    assert kind.name in spec.takes and (kind.name in spec.keys) != kind.optional
    cond = {}
    if parent is not None:
        cond[parent.name] = value_for(parent, spec, x, cond)
    cond[kind.name] = value_for(kind, spec, x, cond)
    spec.check(cond, x, values=True)
    with pytest.raises(ValueError, match=r"^this model does not take the condition key\(s\) \['" + kind.name):
        spec_type().check({kind.name: cond[kind.name]}, x)
    with pytest.raises(ValueError, match=kind.name.split("_")[0]):  # one more axis
        spec.check({**cond, kind.name: cond[kind.name][..., None]}, x)
    if kind.dtypes:
        other = torch.float32 if torch.float32 not in kind.dtypes else torch.int64
        with pytest.raises(ValueError, match=str(other)):
            spec.check({**cond, kind.name: cond[kind.name].to(other)}, x)
    if not kind.optional:
        with pytest.raises(ValueError, match=rf"pass \['{kind.name}'\]"):
            spec.check({k: v for k, v in cond.items() if k != kind.name}, x)
    null = spec.null_value(kind.name, cond[kind.name])
    assert null.shape == cond[kind.name].shape and null.dtype == cond[kind.name].dtype
    torch.testing.assert_close(kind.null(spec, cond[kind.name]), null)
    key = parent.name if parent is not None else kind.name  # a companion is nulled with its key
    assert torch.equal(spec.null(cond, keys=[key])[kind.name], null)
    dropped = spec.drop(cond, {key: torch.tensor([True] + [False] * (x.shape[0] - 1))})[kind.name]
    assert torch.equal(dropped[0], null[0]) and torch.equal(dropped[1:], cond[kind.name][1:])
    return spec, cond


@pytest.mark.parametrize("name", CONDITION_KEYS)
@pytest.mark.parametrize("x", [torch.zeros(3, 2, 4, 4), torch.zeros(3, 2, 5, 4, 4)], ids=["image", "video"])
def test_every_kind_is_checked_and_nulled_by_its_row(name, x):
    kind_contract(ConditionSpec, CONDITION_KINDS[name], x)


def test_shapes_that_follow_x_follow_it_at_any_rank():
    spec = ConditionSpec(image_channels=2, self_condition=True)
    x = torch.zeros(3, 1, 5, 4, 4)  # (B, C, F, H, W)
    spec.check({"image": torch.zeros(3, 2, 5, 4, 4), "self_cond": torch.zeros(3, 1, 5, 4, 4)}, x)
    with pytest.raises(ValueError, match=r"^the condition image must have shape \(3, 2, 5, 4, 4\) \(B, C_c, F, H, W "
                                         r"like x_t\), got \(3, 2, 4, 4\)$"):
        spec.check({"image": torch.zeros(3, 2, 4, 4)}, x)
    with pytest.raises(ValueError, match=r"must have the shape of x_t \(3, 1, 5, 4, 4\), got \(3, 1, 4, 4\)"):
        spec.check({"image": torch.zeros(3, 2, 5, 4, 4), "self_cond": torch.zeros(3, 1, 4, 4)}, x)
    with pytest.raises(ValueError, match=r"\(B, C_c, H, W like x_t\), got \(3, 2, 5, 4, 4\)$"):  # the image message
        spec.check({"image": torch.zeros(3, 2, 5, 4, 4)}, torch.zeros(3, 1, 4, 4))


def test_keys_are_checked_in_the_order_of_the_if_chain_they_replaced():
    """A condition with every key wrong names label first; fixing each in turn names the next, as before the
    registry: label, its values, image, self_cond, augment, scalars, text, context, context_mask, its values."""
    x = torch.zeros(2, 1, 4, 4)
    good = {"label": torch.tensor([1, 2]), "image": torch.zeros(2, 2, 4, 4), "scalars": torch.zeros(2, 1),
            "context": torch.zeros(2, 3, 6), "context_mask": torch.ones(2, 3, dtype=torch.bool),
            "text": torch.zeros(2, 5, dtype=torch.long), "self_cond": torch.zeros(2, 1, 4, 4),
            "augment": torch.zeros(2, 3)}
    bad = [("label", torch.zeros(2), "label must be an integer tensor"),
           ("label", torch.tensor([1, 11]), "labels must lie in"),
           ("image", torch.zeros(2, 1, 4, 4), "the condition image"),
           ("self_cond", torch.zeros(2, 1, 3, 3), "self_cond, the previous"),
           ("augment", torch.zeros(2, 2), "augment, the augmentation labels"),
           ("scalars", torch.zeros(2, 2), "scalars must have shape"),
           ("text", torch.zeros(2, 4, dtype=torch.long), "text must be an int64 tensor"),
           ("context", torch.zeros(2, 3, 5), "the context must have shape"),
           ("context_mask", torch.ones(2, 3), "context_mask must be a bool tensor"),
           ("context_mask", torch.zeros(2, 3, dtype=torch.bool), "every context_mask row needs at least one True")]
    for i, (_, _, message) in enumerate(bad):
        cond = dict(good)
        for key, value, _ in reversed(bad[i:]):  # the earliest wrong value of a key wins
            cond[key] = value
        with pytest.raises(ValueError, match="^" + message):
            FULL.check(cond, x, values=True)
    FULL.check(good, x, values=True)


# --- a new kind: one row and one field --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VideoSpec(ConditionSpec):
    """ConditionSpec with the fields of the throwaway kinds below (a real kind adds its field to ConditionSpec)."""

    known_frames: bool = False  # frames: the known frames of a video, x_t's shape; frame_mask: which ones are known
    embedding_dim: int = 0  # embedding: (B, D) float, e.g. a CLIP image embedding


THROWAWAY = (
    ConditionKind("embedding", "embedding_dim", lambda spec, x, cond: (x.shape[0], spec.embedding_dim),
                  doc="(B, D) float, a CLIP embedding; null: zeros"),
    ConditionKind("frames", "known_frames", lambda spec, x, cond: tuple(x.shape),
                  null=lambda spec, value: torch.full_like(value, -1.0),
                  doc="(B, C, F, H, W) float, the known frames; null: -1 (a value zeros could not be mistaken for)"),
    ConditionKind("frame_mask", "known_frames", lambda spec, x, cond: (x.shape[0], x.shape[2]),
                  dtypes=(torch.bool,), optional=True, companion_of="frames",
                  doc="(B, F) bool, True for a known frame; optional, belongs to frames; null: no frame known"),
)


@pytest.fixture
def throwaway_kinds(monkeypatch):
    for kind in THROWAWAY:
        monkeypatch.setitem(CONDITION_KINDS, kind.name, kind)  # removed again after the test


@pytest.mark.parametrize("name", [kind.name for kind in THROWAWAY])
def test_a_registered_kind_gets_the_shared_contract(throwaway_kinds, name):
    kind_contract(VideoSpec, CONDITION_KINDS[name], torch.zeros(3, 2, 5, 4, 4))


def test_a_registered_kind_is_validated_and_nulled_like_the_others(throwaway_kinds):
    spec = VideoSpec(10, known_frames=True, embedding_dim=4)  # the old fields keep their positions
    assert spec.keys == ("label", "embedding", "frames") and spec.takes == spec.keys + ("frame_mask",)
    assert ConditionSpec(10).takes == ("label",)  # a spec without the new field does not take the new keys
    x = torch.zeros(2, 1, 3, 4, 4)  # (B, C, F, H, W)
    cond = {"label": torch.tensor([1, 2]), "embedding": torch.randn(2, 4), "frames": torch.randn(2, 1, 3, 4, 4),
            "frame_mask": torch.tensor([[True, False, False], [True, True, False]])}
    spec.check(cond, x, values=True)
    with pytest.raises(ValueError, match=r"^this model is conditioned on \['label', 'embedding', 'frames'\]: pass "
                                         r"\['frames'\] too"):
        spec.check({k: v for k, v in cond.items() if k != "frames"}, x)
    with pytest.raises(ValueError, match=r"^embedding must have shape \(2, 4\), got torch.float32 \(2, 5\)$"):
        spec.check({**cond, "embedding": torch.randn(2, 5)}, x)
    with pytest.raises(ValueError, match=r"^frame_mask must have shape \(2, 3\), got torch.int64 \(2, 3\)$"):
        spec.check({**cond, "frame_mask": torch.ones(2, 3, dtype=torch.long)}, x)
    with pytest.raises(ValueError, match=r"\['embedding'\]; it takes \['label'\]$"):  # known, so no list of kinds
        ConditionSpec(10).check({"label": cond["label"], "embedding": cond["embedding"]}, x)
    with pytest.raises(ValueError, match=r"known kinds are \[.*'z_sem', 'frame_index', 'independent', 'observed', "
                                         r"'image_embed', 'text_embed', 'embedding', 'frames', 'frame_mask'\]"):
        spec.check({**cond, "video": x}, x)

    null = spec.null(cond)
    assert null["label"].tolist() == [10, 10] and not null["embedding"].any() and not null["frame_mask"].any()
    assert (null["frames"] == -1).all()  # the row's own null
    only = spec.null(cond, keys=["frames"])  # the mask goes with its frames, the others stay
    assert (only["frames"] == -1).all() and not only["frame_mask"].any()
    assert torch.equal(only["embedding"], cond["embedding"]) and torch.equal(only["label"], cond["label"])
    dropped = spec.drop(cond, {"frames": torch.tensor([False, True]), "embedding": torch.tensor([True, False])})
    assert torch.equal(dropped["frames"][0], cond["frames"][0]) and (dropped["frames"][1] == -1).all()
    assert dropped["frame_mask"].tolist() == [[True, False, False], [False, False, False]]
    assert not dropped["embedding"][0].any() and torch.equal(dropped["embedding"][1], cond["embedding"][1])
    assert torch.equal(dropped["label"], cond["label"])
