"""Training recipes: learning-rate schedules, gradient accumulation (equal to the whole batch), bad settings, and exact
resume with the new options on."""

from __future__ import annotations

import math

import pytest
import torch

from diffuse.config import RunConfig, apply_overrides
from diffuse.train import Trainer, lr_factor

from test_train import BASE, check_exact_resume


def cfg(*overrides):
    return apply_overrides(RunConfig(), BASE + list(overrides))


def test_learning_rate_schedules_closed_forms():
    t = cfg("train.warmup_steps=10", "train.steps=110").train
    assert lr_factor(0, t) == pytest.approx(0.1) and lr_factor(9, t) == 1 and lr_factor(100, t) == 1  # constant
    t.lr_schedule = "cosine"
    assert lr_factor(10, t) == 1 and lr_factor(60, t) == pytest.approx(0.5) and lr_factor(110, t) == pytest.approx(0)
    assert lr_factor(35, t) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(4, t) == pytest.approx(0.5)  # still warming up
    t.lr_schedule = "inverse_sqrt"
    assert lr_factor(10, t) == 1 and lr_factor(40, t) == pytest.approx(0.5) and lr_factor(1000, t) == pytest.approx(0.1)


def one_step(config, run_dir):
    trainer = Trainer(config, run_dir, progress=False)
    trainer.train_step()
    return trainer


@pytest.mark.parametrize("extra", [
    ["model.class_conditional=true", "train.condition_dropout={label=0.3}", "train.loss_weighting=p2"],
    ["model.learned_variance=true", "train.loss=hybrid", "model.prediction=eps"],
    ["train.loss=vlb", "train.loss_weighting=none", "model.prediction=eps"],
    ["task.kind=superres", "model.cond_channels=1"],
])
def test_gradient_accumulation_equals_the_whole_batch(tmp_path, extra):
    """Micro-batches see the same examples and random draws as the whole batch, so the step is the same to float
    rounding (no dropout: each micro-batch would draw its own masks)."""
    whole = one_step(cfg("model.dropout=0", "train.warmup_steps=0", *extra), tmp_path / "whole")
    parts = one_step(cfg("model.dropout=0", "train.warmup_steps=0", "train.grad_accumulation=4", *extra), tmp_path / "parts")
    for (name, a), b in zip(whole.model.named_parameters(), parts.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in parts.model.parameters())


@pytest.mark.parametrize("override, match", [
    ("train.grad_accumulation=3", r"train.grad_accumulation = 3 must be >= 1 and divide each process's batch \(train.batch_size 8"),
    ("train.grad_accumulation=0", "train.grad_accumulation = 0 must be >= 1"),
])
def test_bad_accumulation_is_named(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        Trainer(cfg(override), tmp_path / "run", progress=False)


def test_inverse_sqrt_needs_a_warm_up(tmp_path):
    with pytest.raises(ValueError, match="set train.warmup_steps >= 1"):
        Trainer(cfg("train.lr_schedule=inverse_sqrt", "train.warmup_steps=0"), tmp_path / "run", progress=False)


def test_exact_resume_with_the_new_options_on(tmp_path):
    config = cfg("train.checkpoint_every=3", "train.lr_schedule=cosine", "train.grad_accumulation=2",
                 "train.loss_weighting=p2", "train.p2_gamma=0.5", "model.class_conditional=true",
                 "train.condition_dropout={label=0.2}")
    check_exact_resume(config, tmp_path)


def test_offset_noise_adds_a_constant_per_image_and_channel(tmp_path, monkeypatch):
    """eps = z + o c with c ~ N(0, 1) per image and channel: the per-image means of eps vary by o^2 + 1/(H W)."""
    seen = []

    def spy(denoiser, x0, t, eps, **kw):
        seen.append(eps)
        return torch.zeros(x0.shape[0], requires_grad=True)

    monkeypatch.setattr("diffuse.train.l_simple", spy)
    trainer = Trainer(cfg("train.offset_noise=0.5", "train.batch_size=256"), tmp_path / "run", progress=False)
    for _ in range(4):
        trainer.loss_and_backward()
        trainer.step += 1
    means = torch.cat(seen).mean((-1, -2)).flatten()
    assert float(means.var()) == pytest.approx(0.25 + 1 / 64, rel=0.15)
    with pytest.raises(ValueError, match=r"train.offset_noise must be in \[0, 1\]"):
        Trainer(cfg("train.offset_noise=2"), tmp_path / "bad", progress=False)
