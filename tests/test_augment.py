"""Non-leaking augmentation (Karras et al. 2022, appendix F.2): each transform is what its label says, the zero label is
the identity bit for bit, each is applied with its probability, and the network sees the labels in training and zeros
at sampling."""

from __future__ import annotations

import math

import pytest
import torch

from diffuse.augment import LABELS, apply, draw
from diffuse.config import RunConfig, apply_overrides
from diffuse.train import Trainer

from test_train import BASE


def labels(**given) -> torch.Tensor:
    out = torch.zeros(1, len(LABELS), dtype=torch.float64)
    for k, v in given.items():
        out[0, LABELS.index(k)] = v
    return out


def test_each_transform_is_what_its_label_says():
    x = torch.randn(1, 2, 8, 8)
    assert torch.equal(apply(x, labels()), x)  # the identity, bit for bit
    assert torch.equal(apply(x, labels(xflip=1)), x.flip(-1))
    assert torch.equal(apply(x, labels(yflip=1)), x.flip(-2))
    for k in (1, 2, 3):
        turn = labels(rot_sin=round(math.sin(k * math.pi / 2)), rot_cos_minus_1=round(math.cos(k * math.pi / 2)) - 1)
        assert torch.equal(apply(x, turn), torch.rot90(x, k, dims=(-2, -1)))
    # an integer shift moves the content by whole pixels (bilinear at pixel centres), reflected at the border
    moved = apply(x, labels(translate_x=2 / 8, translate_y=-1 / 8))
    torch.testing.assert_close(moved[..., 0:7, 2:], x[..., 1:8, :6], atol=1e-5, rtol=0)
    torch.testing.assert_close(moved[..., 0:7, 1], x[..., 1:8, 0], atol=1e-5, rtol=0)  # reflection: column -1 is column 0
    # scaling by 2 about the centre: the centre 4x4 block, each pixel now 2x2 (away from its edges, bilinear is exact)
    big = apply(torch.arange(64.0).view(1, 1, 8, 8), labels(log2_scale=1.0))
    assert big[0, 0, 3:5, 3:5].mean().item() == pytest.approx(torch.arange(64.0).view(8, 8)[3:5, 3:5].mean().item(), abs=1e-4)


def test_transforms_are_drawn_with_their_probability_and_zero_means_untouched():
    g = torch.Generator().manual_seed(0)
    lab = draw(20000, 32, 0.3, g)
    applied = torch.stack([lab[:, 0] != 0, lab[:, 1] != 0, (lab[:, 2:4] != 0).any(1), (lab[:, 4:6] != 0).any(1),
                           lab[:, 6] != 0], 1).double().mean(0)
    # a drawn translation of (0, 0) is the identity: P(shift = 0 | on) = 1 / 81 for reach 4
    expected = torch.tensor([0.3, 0.3, 0.3, 0.3 * (1 - 1 / 81), 0.3], dtype=torch.float64)
    torch.testing.assert_close(applied, expected, atol=0.015, rtol=0)
    assert lab[:, 4:6].abs().max().item() == pytest.approx(4 / 32)
    assert lab[lab[:, 6] != 0, 6].std().item() == pytest.approx(0.2, abs=0.01)
    x = torch.randn(len(lab), 1, 32, 32)
    out = apply(x, lab)
    same = (lab == 0).all(1)
    assert torch.equal(out[same], x[same]) and not torch.equal(out[~same][:50], x[~same][:50])
    assert torch.equal(draw(7, 32, 0.0, torch.Generator()), torch.zeros(7, len(LABELS), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"probability must be in \[0, 1\]"):
        draw(3, 8, 1.5, g)


def cfg(*overrides):
    return apply_overrides(RunConfig(), BASE + ["train.augment_p=0.5", "model.dropout=0", *overrides])


def test_the_network_sees_the_labels_in_training_and_zeros_at_sampling(tmp_path, monkeypatch):
    trainer = Trainer(cfg(), tmp_path / "run", progress=False)
    forward, seen = trainer.model.forward, []

    def spy(x, t, **cond):
        seen.append(cond.get("augment"))
        return forward(x, t, **cond)

    monkeypatch.setattr(trainer.model, "forward", spy)
    trainer.train_step()
    lab = seen[0]
    assert lab.shape == (8, len(LABELS)) and bool((lab != 0).any()) and bool((lab == 0).all(1).any())
    # the labels change the output; absent (sampling) equals zeros, "not augmented"
    x, t = torch.randn(8, 1, 8, 8), torch.full((8,), 10.0)
    with torch.no_grad():
        for p in trainer.model.parameters():  # away from the zero-initialised residual branches
            p.normal_(std=0.2)
        plain = trainer.model(x, t)
        assert torch.equal(plain, trainer.model(x, t, augment=torch.zeros(8, len(LABELS))))
        assert not torch.allclose(plain, trainer.model(x, t, augment=lab))
    with pytest.raises(ValueError, match=r"train.augment_p must be a probability"):
        Trainer(cfg("train.augment_p=2"), tmp_path / "bad", progress=False)


def test_exact_resume_with_augmentation(tmp_path):
    from test_train import check_exact_resume
    check_exact_resume(cfg("train.checkpoint_every=3"), tmp_path)
