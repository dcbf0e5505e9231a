"""The Trainer: exact resume, refusing changed configs, NaN handling, logs and samples, generate, load_run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffuse import checkpoint as ckpt
from diffuse.config import RunConfig, apply_overrides
from diffuse.data import load_dataset
from diffuse.generate import generate
from diffuse.kinds.diffusion import build_denoiser
from diffuse.runs import load_run
from diffuse.ema import EMA
from diffuse.precision import cpu_has_native_bf16
from diffuse.train import NonFiniteLoss, ResumeError, Trainer, check_train
from conftest import nan_loss_from

BASE = [
    "data.source=digits", "data.image_size=8", "data.channels=1",
    "schedule.T=100",
    "model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.norm_groups=4",
    "model.attention_resolutions=[4]", "model.dropout=0.2",
    "train.batch_size=8", "train.steps=6", "train.lr=2e-3", "train.warmup_steps=5", "train.hflip=true",
    "train.ema_decay=0.8", "train.log_every=1000", "train.sample_every=0", "train.checkpoint_every=1000",
    "sample.steps=4", "sample.n=4",
]


def tiny_cfg(*overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(), BASE + list(overrides))


@pytest.fixture(scope="module")
def digits():
    return load_dataset(tiny_cfg().data)


def snapshot(trainer: Trainer) -> dict:
    """Everything that defines where a run stands, as plain tensors (cloned)."""
    opt = trainer.optimizer.state_dict()
    return {
        "step": trainer.step,
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "ema": {k: v.clone() for k, v in trainer.ema.model.state_dict().items()},
        "opt_state": {i: {k: v.clone() for k, v in s.items()} for i, s in opt["state"].items()},
        "opt_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
        "lr_schedule": trainer.lr_schedule.state_dict(),
        "generator": trainer.generator.get_state().clone(),
        "torch_rng": torch.get_rng_state(),
        "phema": {k: v.clone() for k, v in trainer.phema.state_dict().items()} if trainer.phema else {},
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for group in ("model", "ema", "phema"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group} {k} differs"
    assert a["opt_state"].keys() == b["opt_state"].keys()
    for i in a["opt_state"]:
        for k in a["opt_state"][i]:
            assert torch.equal(a["opt_state"][i][k], b["opt_state"][i][k]), f"optimizer state {i}.{k} differs"
    assert a["opt_groups"] == b["opt_groups"]
    assert a["lr_schedule"] == b["lr_schedule"]
    assert torch.equal(a["generator"], b["generator"])
    assert torch.equal(a["torch_rng"], b["torch_rng"])


def models_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


class Killed(Exception):
    """Stands in for a kill right after a checkpoint was committed."""


def run_interrupted(cfg: RunConfig, run_dir, kill_at: int) -> None:
    """fit() until the checkpoint of step `kill_at` is committed, then die."""
    trainer = Trainer(cfg, run_dir, progress=False)
    save = trainer.save

    def save_then_die():
        save()
        if trainer.step == kill_at:
            raise Killed

    trainer.save = save_then_die
    with pytest.raises(Killed):
        trainer.fit()
    assert ckpt.latest_step(run_dir) == kill_at


def check_exact_resume(cfg: RunConfig, root, kill_at: int = 3) -> None:
    """A run killed after its checkpoint at `kill_at` and resumed ends bit-identical to one run straight through."""
    straight = Trainer(cfg, root / "straight", progress=False)
    straight.fit()
    run_interrupted(cfg, root / "resumed", kill_at=kill_at)
    resumed = Trainer(cfg, root / "resumed", progress=False)
    resumed.fit()
    assert_same_state(snapshot(resumed), snapshot(straight))


# --- exact resume -----------------------------------------------------------------------------------------
RESUME_CFG = ("train.checkpoint_every=3",)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 steps without interruption."""
    trainer = Trainer(tiny_cfg(*RESUME_CFG), tmp_path_factory.mktemp("straight"), progress=False)
    trainer.fit()
    assert trainer.step == 6
    return snapshot(trainer)


def test_exact_resume_is_bit_identical(tmp_path, straight):
    cfg = tiny_cfg(*RESUME_CFG)
    run_interrupted(cfg, tmp_path, kill_at=3)
    trainer = Trainer(cfg, tmp_path, progress=False)
    assert trainer.step == 3
    trainer.fit()
    assert_same_state(snapshot(trainer), straight)
    # the checkpoint written at the end holds the same weights
    c = ckpt.load_checkpoint(tmp_path)
    assert c.step == 6
    assert all(torch.equal(c.tensors["model"][k], v) for k, v in straight["model"].items())
    assert all(torch.equal(c.tensors["ema"][k], v) for k, v in straight["ema"].items())


def _skip_lr_schedule(monkeypatch):
    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "load_state_dict", lambda self, state: None)


@pytest.mark.parametrize("broken", [
    lambda mp: mp.setattr(ckpt, "set_generator_state", lambda g, s: None),  # t, eps and flips start over
    lambda mp: mp.setattr(ckpt, "restore_rng", lambda tensors, state: None),  # dropout masks start over
    _skip_lr_schedule,  # the warm-up starts over
], ids=["generator", "global_rng", "lr_schedule"])
def test_a_broken_resume_is_caught(tmp_path, straight, monkeypatch, broken):
    """The comparison above is sharp enough to see each piece of state that a resume forgets."""
    cfg = tiny_cfg(*RESUME_CFG)
    run_interrupted(cfg, tmp_path, kill_at=3)
    broken(monkeypatch)
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.fit()
    assert trainer.step == 6
    assert not models_equal(snapshot(trainer), straight)


def test_resume_with_more_steps_continues_the_same_run(tmp_path, straight):
    """Changing train.steps is allowed: 3 steps, then the same run extended to 6, equals 6 straight."""
    Trainer(tiny_cfg(*RESUME_CFG, "train.steps=3"), tmp_path, progress=False).fit()
    trainer = Trainer(tiny_cfg(*RESUME_CFG, "train.log_every=2"), tmp_path, progress=False)  # log_every is free too
    assert trainer.step == 3
    trainer.fit()
    assert_same_state(snapshot(trainer), straight)


def test_changed_config_refuses_to_resume(tmp_path):
    cfg = tiny_cfg("train.steps=2")
    Trainer(cfg, tmp_path, progress=False).fit()
    before = (tmp_path / "config.toml").read_text()
    for override, key in [("train.lr=1e-3", "train.lr"), ("model.dropout=0.1", "model.dropout"),
                          ("train.hflip=false", "train.hflip"), ("schedule.T=50", "schedule.T")]:
        with pytest.raises(ResumeError, match=key.replace(".", r"\.")):
            Trainer(tiny_cfg("train.steps=2", override), tmp_path, progress=False)
    assert (tmp_path / "config.toml").read_text() == before  # a refused resume leaves the saved config alone
    # an explicit inexact resume takes the weights, the step, and the new config's hyper-parameters
    c = ckpt.load_checkpoint(tmp_path)
    trainer = Trainer(tiny_cfg("train.steps=3", "train.lr=1e-3", "train.weight_decay=0.5"), tmp_path, progress=False,
                      inexact_resume=True)
    assert trainer.step == 2 and trainer.cfg.train.lr == 1e-3
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in c.tensors["model"].items())
    group, exempt = trainer.optimizer.param_groups  # the new weight decay spares ndim < 2 (speed.decay_groups)
    assert group["lr"] == pytest.approx(1e-3 * 3 / 5) and group["weight_decay"] == 0.5  # step 2 of a 5-step warm-up
    assert exempt["lr"] == group["lr"] and exempt["weight_decay"] == 0.0 and exempt["no_decay"]
    assert trainer.lr_schedule.get_last_lr() == [group["lr"]] * 2
    assert all(trainer.optimizer.state[p] for p in trainer.model.parameters())  # the moments were kept
    trainer.fit()
    assert trainer.step == 3 and trainer.lr_schedule.get_last_lr()[0] == pytest.approx(1e-3 * 4 / 5)


def test_a_run_saved_with_one_decay_group_resumes_with_both_groups_on_the_lr_schedule(tmp_path, monkeypatch):
    """A run saved before speed.decay_groups (weight decay on every parameter, one group) resumes exactly into the two
    groups: the moments kept, and the warm-up (lr = lr0 * step / warmup) drives both groups' learning rates."""
    from diffuse import speed

    cfg = tiny_cfg("train.steps=2", "train.weight_decay=0.1")
    with monkeypatch.context() as m:
        m.setattr(speed, "decay_groups", lambda params, wd: params)  # the one-group optimizer of older runs
        Trainer(cfg, tmp_path, progress=False).fit()
    with pytest.warns(UserWarning, match="regrouped"):
        trainer = Trainer(tiny_cfg("train.steps=3", "train.weight_decay=0.1"), tmp_path, progress=False)
    assert trainer.step == 2 and [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.1, 0.0]
    assert all(trainer.optimizer.state[p] for p in trainer.model.parameters())
    trainer.fit()
    lr0, warmup = trainer.cfg.train.lr, trainer.cfg.train.warmup_steps
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([lr0 * 4 / warmup] * 2)


def test_missing_training_state_refuses_exact_resume(tmp_path, monkeypatch):
    cfg = tiny_cfg("train.steps=2")
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.fit()
    c = ckpt.load_checkpoint(tmp_path)
    state = {k: v for k, v in c.tensors["state"].items() if k != "generator"}
    ckpt.save_checkpoint(tmp_path, 2, {"model": c.tensors["model"], "ema": c.tensors["ema"], "state": state}, c.state)
    with pytest.raises(ResumeError, match="lacks training state.*generator"):
        Trainer(cfg, tmp_path, progress=False)
    with pytest.warns(UserWarning, match="inexact resume from step 2"):
        trainer = Trainer(cfg, tmp_path, progress=False, inexact_resume=True)
    assert trainer.step == 2
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in c.tensors["model"].items())


# --- a NaN loss -------------------------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg("train.checkpoint_every=2", "train.log_every=1")
    trainer = Trainer(cfg, tmp_path, progress=False)
    saved = {}
    save = trainer.save

    def recording_save():
        save()
        saved[trainer.step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    trainer.save = recording_save
    before = {}
    step_fn = trainer.train_step

    def recording_step():
        before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return step_fn()

    trainer.train_step = recording_step
    nan_loss_from(monkeypatch, bad_step=3)
    with pytest.raises(NonFiniteLoss) as e:
        trainer.fit()
    msg = str(e.value)
    assert "at step 4" in msg and "nan" in msg  # steps 1-3 are logged; the 4th (1-based, as in log.jsonl) fails
    assert "last good checkpoint (step 2)" in msg and str(tmp_path) in msg
    assert list(saved) == [2]  # nothing was saved after the NaN
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    assert trainer.step == 3
    # the NaN step changed nothing: the weights are those from before it
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert "its weights and EMA are finite (largest |w| = " in msg
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in lines)
    # the kept checkpoint loads, unchanged, and a new trainer resumes from it
    c = ckpt.load_checkpoint(tmp_path)
    assert c.step == 2
    assert all(torch.equal(c.tensors["model"][k], v) for k, v in saved[2].items())
    monkeypatch.undo()
    resumed = Trainer(cfg, tmp_path, progress=False)
    assert resumed.step == 2
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in saved[2].items())


def test_nan_loss_before_any_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(tiny_cfg(), tmp_path, progress=False)
    nan_loss_from(monkeypatch, bad_step=0)
    with pytest.raises(NonFiniteLoss, match="at step 1; no checkpoint was written yet"):  # the first step, 1-based
        trainer.fit()
    assert ckpt.latest_step(tmp_path) is None


def test_diverging_lr_raises_non_finite_loss(tmp_path):
    trainer = Trainer(tiny_cfg("train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0", "train.steps=20",
                               "train.checkpoint_every=1"), tmp_path, progress=False)
    with pytest.raises(NonFiniteLoss) as e:
        trainer.fit()
    last = ckpt.latest_step(tmp_path)
    assert last == trainer.step and f"at step {last + 1}" in str(e.value)  # the step after the last one completed
    c = ckpt.load_checkpoint(tmp_path)  # the kept checkpoint is whole
    assert c.step == last


# --- the outputs of fit --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 4-step run logging every 2 steps and sampling every 2 steps."""
    run = tmp_path_factory.mktemp("finished")
    trainer = Trainer(tiny_cfg("train.steps=4", "train.log_every=2", "train.sample_every=2"), run, progress=False)
    assert trainer.fit() == run
    return trainer, run


def test_fit_writes_log_loss_curve_and_sample_grids(finished):
    trainer, run = finished
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    for r in lines:
        assert {"loss", "grad_norm", "lr", "images_per_s", "time"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["loss"] > 0 and r["grad_norm"] > 0
    # linear warm-up over 5 steps: the logged lr is the one the next step uses
    assert [r["lr"] for r in lines] == pytest.approx([2e-3 * 3 / 5, 2e-3 * 5 / 5])
    with Image.open(run / "loss.png") as im:
        assert im.format == "PNG" and im.width > 100
    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == ["step_00000002.png", "step_00000004.png"]
    with Image.open(run / "samples" / "step_00000004.png") as im:
        assert im.size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)  # 4 images of 8x8 in a 2x2 grid, 2 px padding
    assert (run / "config.toml").is_file()
    assert ckpt.latest_step(run) == 4


def test_sample_grid_only_when_sample_every_divides_the_step(tmp_path):
    Trainer(tiny_cfg("train.steps=4", "train.sample_every=3"), tmp_path, progress=False).fit()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_00000003.png"]


def test_generate_shape_range_and_seed(finished):
    trainer, _ = finished
    den = build_denoiser(trainer.cfg, trainer.ema.model)
    for sampler in ("ddim", "ddpm"):
        x = generate(den, 5, (1, 8, 8), sampler=sampler, steps=5, seed=3)
        assert x.shape == (5, 1, 8, 8)
        assert x.min() >= -1 and x.max() <= 1 and x.std() > 0
        assert torch.equal(x, generate(den, 5, (1, 8, 8), sampler=sampler, steps=5, seed=3))
        assert not torch.equal(x, generate(den, 5, (1, 8, 8), sampler=sampler, steps=5, seed=4))
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        generate(den, 1, (1, 8, 8), sampler="nope")


def test_load_run_returns_the_ema_weights(finished):
    trainer, run = finished
    cfg, den, num_classes = load_run(run)
    assert cfg == trainer.cfg and num_classes == 10
    net = den.net
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    ema, raw = trainer.ema.model.state_dict(), trainer.model.state_dict()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # so the test can tell them apart
    assert all(torch.equal(net.state_dict()[k], v) for k, v in ema.items())
    _, den_raw, _ = load_run(run, ema=False)
    assert all(torch.equal(den_raw.net.state_dict()[k], v) for k, v in raw.items())
    # sampling from the loaded run is what sampling from the trainer's EMA gives
    x = generate(den, 3, (1, 8, 8), steps=4, seed=0)
    torch.testing.assert_close(x, generate(build_denoiser(trainer.cfg, trainer.ema.model), 3, (1, 8, 8),
                                           steps=4, seed=0), rtol=0, atol=0)


def test_load_run_of_a_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run(tmp_path)


@pytest.mark.parametrize("warmup,n,decay", [(False, 0, 0.75), (False, 100, 0.75), (True, 0, 0.1), (True, 2, 0.25), (True, 100, 0.75)])
def test_ema_update(warmup, n, decay):
    """theta_ema <- d theta_ema + (1 - d) theta, with d = min(decay, (1 + n) / (10 + n)) under warm-up."""
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.75, warmup=warmup)
    assert ema.decay_at(n) == pytest.approx(decay)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, n)
    for k, v in ema.model.state_dict().items():
        torch.testing.assert_close(v, decay * start[k] + (1 - decay) * (start[k] + 1.0))
    assert ema.model is not net and not any(p.requires_grad for p in ema.model.parameters())


def test_class_conditional_training_and_sample_grid(tmp_path):
    trainer = Trainer(tiny_cfg("model.class_conditional=true", "train.steps=3", "train.sample_every=3"), tmp_path,
                      progress=False)
    assert trainer.model.num_classes == 10
    trainer.fit()
    assert (tmp_path / "samples" / "step_00000003.png").is_file()
    # zero-initialised output layers: the labels get a gradient from the third step on
    assert trainer.model.label_emb.weight.grad.abs().sum() > 0
    assert ckpt.load_checkpoint(tmp_path).state["num_classes"] == 10


# --- bad inputs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,key", [
    ("train.batch_size=2000", "train.batch_size"),  # the digits are 1797 images
    ("train.lr=-1e-4", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.steps=0", "train.steps"),
    ("train.ema_decay=1", "train.ema_decay"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.grad_clip=-1", "train.grad_clip"),
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    pytest.param("train.mixed_precision=fp16", "train.mixed_precision",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on CUDA")),
    ("sample.steps=-1", "sample.steps"),  # 0 is every step, as `diffuse sample --steps 0`
    ("train.lr=nan", "train.lr"),
    ("train.lr=inf", "train.lr"),
    ("train.ema_decay=-inf", "train.ema_decay"),
])
def test_bad_training_config(tmp_path, override, key):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Trainer(tiny_cfg(override), run, progress=False)
    assert not run.exists()  # nothing is written for a config that cannot run


def test_batch_must_divide_among_processes(digits):
    cfg = tiny_cfg("train.batch_size=12")
    check_train(cfg, 1, digits)
    check_train(cfg, 4, digits)
    with pytest.raises(ValueError, match=r"train\.batch_size = 12 must be divisible by the number of processes \(5\)"):
        check_train(cfg, 5, digits)


# --- mixed precision ------------------------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, native):
    import diffuse.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.autocast_dtype("auto", "cpu") == (torch.bfloat16 if native else None)  # training and sampling alike
    assert precision.autocast_dtype("no", torch.device("cpu")) is None
    assert precision.autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_cpu_native_bf16_follows_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or not hasattr(torch.cpu, "_is_amx_tile_supported"):
        pytest.skip("needs /proc/cpuinfo and torch >= 2.3")
    flags = cpuinfo.read_text().split()
    assert cpu_has_native_bf16() == ("amx_tile" in flags or "avx512_bf16" in flags)


def test_bf16_training_step_agrees_with_fp32(digits, tmp_path):
    """The fast path (bf16 autocast) computes the plain path's loss and gradient to bf16 tolerance: one step from the
    same weights and draws, loss within 1% and gradient direction within cos 0.99."""
    out = {}
    for mode in ("no", "bf16"):
        trainer = Trainer(tiny_cfg(f"train.mixed_precision={mode}", "model.dropout=0"), tmp_path / mode,
                          dataset=digits, progress=False)
        loss = trainer.loss_and_backward()
        out[mode] = loss.item(), torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    (l32, g32), (l16, g16) = out["no"], out["bf16"]
    assert l16 == pytest.approx(l32, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    assert not torch.equal(g16, g32)  # autocast really ran in bf16
