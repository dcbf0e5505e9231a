"""Training recipes: learning-rate schedules, gradient accumulation (equal to the whole batch), bad settings, and exact
resume with the new options on."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffuse import checkpoint as ckpt
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
                 "train.loss_weighting=edm", "model.class_conditional=true",
                 "train.condition_dropout={label=0.2}", "train.offset_noise=0.1", "schedule.zero_terminal_snr=true",
                 "model.prediction=v", "model.self_condition=true", "train.posthoc_ema=[0.05, 0.1]",
                 "train.ema_snapshot_every=2", "train.augment_p=0.3", "train.fid_every=3", "train.fid_samples=20")
    with pytest.warns(UserWarning, match="strongly biased"):
        check_exact_resume(config, tmp_path)
    from safetensors.torch import load_file
    a, b = (sorted((tmp_path / run / "ema_snapshots").iterdir()) for run in ("straight", "resumed"))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 3
    for pa, pb in zip(a, b):
        ta, tb = load_file(pa), load_file(pb)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_offset_noise_adds_a_constant_per_image_and_channel(tmp_path, monkeypatch):
    """eps = z + o c with c ~ N(0, 1) per image and channel: the per-image means of eps vary by o^2 + 1/(H W)."""
    seen = []

    def spy(denoiser, x0, t, eps, **kw):
        seen.append(eps)
        return torch.zeros(x0.shape[0], requires_grad=True)

    monkeypatch.setattr("diffuse.kinds.diffusion.l_simple", spy)
    trainer = Trainer(cfg("train.offset_noise=0.5", "train.batch_size=256"), tmp_path / "run", progress=False)
    for _ in range(4):
        trainer.loss_and_backward()
        trainer.step += 1
    means = torch.cat(seen).mean((-1, -2)).flatten()
    assert float(means.var()) == pytest.approx(0.25 + 1 / 64, rel=0.15)
    with pytest.raises(ValueError, match=r"train.offset_noise must be in \[0, 1\]"):
        Trainer(cfg("train.offset_noise=2"), tmp_path / "bad", progress=False)


# --- post-hoc EMA in training and `diffuse ema` -------------------------------------------------------------------
def test_posthoc_ema_tracks_are_snapshotted_and_rebuilt_by_the_cli(tmp_path):
    """The snapshot of a tracked sigma_rel at the last step is that track's EMA; `diffuse ema` of the same sigma_rel
    rebuilds it (from both tracks' snapshots) to the profile error, writes a run folder that `sample` reads, and refuses
    a sigma_rel the snapshots cannot rebuild, naming the range."""
    from safetensors.torch import load_file

    from diffuse.app.cli import main
    from diffuse.ema import list_snapshots, reconstruct
    from diffuse.runs import load_run

    config = cfg("train.steps=40", "train.posthoc_ema=[0.05, 0.10]", "train.ema_snapshot_every=4", "model.dropout=0")
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer.fit()
    snaps = list_snapshots(tmp_path / "run" / "ema_snapshots")
    assert [s.step for s in snaps] == list(range(4, 41, 4)) and snaps[0].sigma_rels == (0.05, 0.10)
    last = load_file(snaps[-1].path)
    for name, p in trainer.phema.track(1).items():
        torch.testing.assert_close(last[f"1.{name}"], p.float(), rtol=0, atol=0)
    rebuilt = reconstruct(tmp_path / "run" / "ema_snapshots", 0.10)
    direct = trainer.phema.track(1)
    scale = max(float((direct[k] - trainer.model.state_dict()[k]).abs().max()) for k in direct)  # EMA vs raw weights
    worst = max(float((rebuilt[k] - direct[k]).abs().max()) for k in direct)
    assert worst < 0.1 * scale  # the rebuilt EMA is far closer to the tracked one than the raw weights are

    assert main(["ema", str(tmp_path / "run"), "--sigma-rel", "0.1", "--out", str(tmp_path / "run" / "ema_010")]) == 0
    _, den, _ = load_run(tmp_path / "run" / "ema_010")
    for k, v in den.net.state_dict().items():
        torch.testing.assert_close(v, rebuilt[k].to(v.dtype), rtol=0, atol=0)
    out = tmp_path / "s.npy"
    assert main(["sample", str(tmp_path / "run" / "ema_010"), "--n", "2", "--steps", "3", "--out", str(out)]) == 0
    assert out.is_file()
    with pytest.raises(ValueError, match=r"cannot reconstruct sigma_rel=0.29.*rebuild sigma_rel in \[0\.\d+, 0\.\d+\]"):
        reconstruct(tmp_path / "run" / "ema_snapshots", 0.29)
    assert main(["ema", str(tmp_path / "run"), "--sigma-rel", "0.1", "--out", str(tmp_path / "run")]) == 2  # never over a run


def test_resume_drops_snapshots_past_the_checkpoint_and_refuses_new_tracks(tmp_path):
    from diffuse.train import ResumeError

    config = cfg("train.steps=8", "train.posthoc_ema=[0.05, 0.1]", "train.ema_snapshot_every=2", "train.checkpoint_every=4",
                 "train.keep_checkpoints=5")
    Trainer(config, tmp_path / "run", progress=False).fit()
    import shutil
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000008")  # as if killed after the snapshot of step 8
    Trainer(config, tmp_path / "run", progress=False)  # resumes at step 4
    assert sorted(p.name for p in (tmp_path / "run" / "ema_snapshots").glob("*.safetensors")) == [
        "phema_00000002.safetensors", "phema_00000004.safetensors"]
    changed = cfg("train.steps=8", "train.posthoc_ema=[0.05, 0.2]", "train.ema_snapshot_every=2", "train.checkpoint_every=4",
                  "train.keep_checkpoints=5")
    with pytest.raises(ResumeError, match="no post-hoc EMA tracks for train.posthoc_ema = \\[0.05, 0.2\\]"):
        Trainer(changed, tmp_path / "run", progress=False, inexact_resume=True)


def test_bad_posthoc_ema_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"train.posthoc_ema lists the sigma_rel.*got \[0.5\]"):
        Trainer(cfg("train.posthoc_ema=[0.5]"), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="train.ema_snapshot_every must be >= 1"):
        Trainer(cfg("train.posthoc_ema=[0.05]", "train.ema_snapshot_every=0"), tmp_path / "b", progress=False)
    from diffuse.config import ConfigError
    with pytest.raises(ConfigError, match="train.ema_snapshot_every.*train.posthoc_ema is empty"):
        Trainer(cfg("train.ema_snapshot_every=7"), tmp_path / "c", progress=False)


# --- memory: activation checkpointing and --dry-run ---------------------------------------------------------------
def test_activation_checkpointing_gives_the_same_step_in_less_memory(tmp_path):
    """With dropout on (the RNG is replayed in the recomputation), one step with model.checkpointing equals the plain
    step bit for bit, its peak memory (footprint.peak_memory) is lower, and its FLOPs are higher (the recomputation)."""
    from diffuse.footprint import count_flops, peak_memory

    def trainer(name, *extra):
        t = Trainer(cfg("model.dropout=0.3", "train.batch_size=16", "data.image_size=16",
                              "model.attention_resolutions=[8]", *extra), tmp_path / name,
                    progress=False)
        t.model.train()
        return t

    plain, ckpt = trainer("plain"), trainer("ckpt", "model.checkpointing=true")
    torch.manual_seed(5)
    plain.loss_and_backward()
    torch.manual_seed(5)
    ckpt.loss_and_backward()
    for (name, p), q in zip(plain.model.named_parameters(), ckpt.model.parameters()):
        assert torch.equal(p.grad, q.grad), name
    memory = [peak_memory(t.loss_and_backward, "cpu") for t in (plain, ckpt)]
    assert memory[1] < 0.7 * memory[0]
    flops = [count_flops(t.loss_and_backward) for t in (plain, ckpt)]
    assert flops[0] < flops[1] < 1.5 * flops[0]  # forward once more: at most 1/3 more than forward + backward (~3x)


def test_dry_run_prints_the_footprint_and_writes_nothing(tmp_path, capsys):
    from diffuse.app.cli import main

    config = tmp_path / "c.toml"
    config.write_text("")
    args = ["train", str(config), "--out", str(tmp_path / "run"), "--dry-run"] + [f"--set={o}" for o in BASE]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "FLOP per training image" in out and "peak memory of one training step of batch 8" in out
    assert not (tmp_path / "run").exists()


# --- quality during training -----------------------------------------------------------------------------------------
def test_fid_during_training_is_logged_plotted_and_the_best_kept(tmp_path, monkeypatch):
    """Every train.fid_every steps the FID of the EMA model's fixed samples equals metrics.fid computed by hand on the
    same samples and images; it goes to log.jsonl, and RUN/best holds the weights of the lowest, loadable by sample."""
    from diffuse.metrics import fid
    from diffuse.train import feature_network
    from diffuse.runs import load_run
    from diffuse.visualize import to_uint8

    config = cfg("train.steps=6", "train.fid_every=2", "train.fid_samples=130", "train.fid_steps=2")
    trainer = Trainer(config, tmp_path / "run", progress=False)
    values = iter([5.0, 3.0, 4.0])
    real_measure = trainer.objective.evaluate
    monkeypatch.setattr(trainer.objective, "evaluate", lambda tr: (lambda v: ({"fid": v}, v))(next(values)))
    trainer.fit()
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if "fid" in line]
    assert logged == [{"step": 2, "fid": 5.0}, {"step": 4, "fid": 3.0}, {"step": 6, "fid": 4.0}]
    assert trainer.best_fid == 3.0 and ckpt.latest_step(tmp_path / "run" / "best") == 4
    _, den, _ = load_run(tmp_path / "run" / "best")
    assert bool(torch.isfinite(next(den.net.parameters())).all())
    # the measurement itself: fixed samples against the first training images, in the digit feature space
    samples, _ = trainer.objective.fixed_samples(trainer, 130, 2)
    samples = torch.from_numpy(to_uint8(samples)).permute(0, 3, 1, 2).float() / 127.5 - 1  # scored as 8-bit images
    real, _ = trainer.dataset.batch(torch.arange(130))
    expected = fid(real, samples, feature_network("digits"))
    assert real_measure(trainer) == ({"fid": pytest.approx(expected, rel=1e-9)}, pytest.approx(expected, rel=1e-9))
    resumed = Trainer(cfg("train.steps=6", "train.fid_every=2", "train.fid_samples=130", "train.fid_steps=2"),
                      tmp_path / "run", progress=False)
    assert resumed.best_fid == 3.0 and resumed.fid_history == [[2, 5.0], [4, 3.0], [6, 4.0]]
    # RUN/best may be newer than the checkpoint a run resumes from: its FID is the best so far
    state_path = next((tmp_path / "run" / "best" / "checkpoints").iterdir()) / "state.json"
    ckpt.save_checkpoint(tmp_path / "run" / "best", 4, {"model": trainer.model.state_dict(), "ema": trainer.ema.model.state_dict()},
                         {**json.loads(state_path.read_text()), "fid": 1.5}, keep=1)
    again = Trainer(cfg("train.steps=6", "train.fid_every=2", "train.fid_samples=130", "train.fid_steps=2"),
                    tmp_path / "run", progress=False)
    assert again.best_fid == 1.5


def test_fid_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="fid_features = 'digits' measures 1-channel digits"):
        Trainer(cfg("train.fid_every=5", "data.channels=3"), tmp_path / "a", progress=False)
    from diffuse.config import ConfigError
    with pytest.raises(ConfigError, match="train.fid_samples.*train.fid_every = 0"):
        Trainer(cfg("train.fid_samples=100"), tmp_path / "b", progress=False)
