"""Trained image-conditioned tasks (tasks/image_to_image.py): the degradations and conditions, their determinism,
the trainer's pairs (exact resume), the photo crops, the L1 loss, `diffuse edit` of trained runs and cascades."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.app.cli import main
from diffuse.config import RunConfig, apply_overrides
from diffuse.data import DataConfig, load_dataset
from diffuse.denoiser import Denoiser
from diffuse.losses import l_simple
from diffuse.schedule import Schedule
from diffuse.tasks.image_to_image import (TaskConfig, border_mask, box_mask, check_cascade, check_task, downsample,
                                          free_form_mask, input_condition, jpeg, masked_condition, read_cascade,
                                          to_gray, training_condition, upsample)
from diffuse.train import Trainer

from test_cli import _sets
from test_train import BASE, check_exact_resume

SCHEDULE = Schedule.linear()


def images(b=4, c=3, s=8, seed=0):
    return torch.rand(b, c, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- degradations ----------------------------------------------------------------------------------------------
def test_degradations_closed_forms():
    x = images()
    torch.testing.assert_close(downsample(x, 2)[:, :, 0, 0], x[:, :, :2, :2].mean((-1, -2)))
    flat = torch.full((1, 3, 4, 4), 0.3)
    torch.testing.assert_close(upsample(flat, 8), torch.full((1, 3, 8, 8), 0.3))  # bicubic keeps constants
    torch.testing.assert_close(to_gray(x), 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:])
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, None]
    y = masked_condition(x[:, :, :2, :2], m)
    assert y.shape == (4, 4, 2, 2) and torch.equal(y[:, 3:], m.expand(4, 1, 2, 2)) and not y[:, :3, 0, 1].any()


def test_jpeg_loses_more_at_lower_quality():
    x = torch.nn.functional.avg_pool2d(images(1, 3, 32, seed=3), 3, 1, 1)[0]  # a smooth image, as photos are
    errors = [float((jpeg(x, q) - x).abs().mean()) for q in (90, 50, 10)]
    assert 0 < errors[0] < errors[1] < errors[2], errors
    assert jpeg(x[:1], 50).shape == (1, 32, 32)  # grayscale too


def test_masks():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        box = box_mask(16, g)
        holes = int((box == 0).sum())
        assert 16 <= holes <= 81 and set(box.unique().tolist()) <= {0.0, 1.0}
        stroke = free_form_mask(16, g)
        assert 0 < int((stroke == 0).sum()) < 256
    b = border_mask(8, 0.5)
    assert b[2:6, 2:6].all() and int(b.sum()) == 16


# --- conditions ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["superres", "colorize", "inpaint", "uncrop", "jpeg"])
def test_training_conditions_are_functions_of_their_seeds(kind):
    task = TaskConfig(kind=kind, noise_aug_max=0.3 if kind == "superres" else 0.0)
    x = images()
    a = training_condition(task, x, torch.arange(4), SCHEDULE)
    b = training_condition(task, x, torch.arange(4), SCHEDULE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    channels = {"superres": 3, "colorize": 1, "inpaint": 4, "uncrop": 4, "jpeg": 3}[kind]
    assert a["image"].shape == (4, channels, 8, 8)
    c = training_condition(task, x, torch.arange(4) + 100, SCHEDULE)
    if kind not in ("colorize", "uncrop"):  # deterministic degradations: no seed involved
        assert not torch.equal(a["image"], c["image"])


def test_noise_conditioning_augmentation_is_the_forward_process():
    """z_s = alpha_s low + sigma_s eps at a level s ~ U[0, noise_aug_max] (Ho et al. 2021, sec. 4.2), s handed over."""
    task = TaskConfig(kind="superres", noise_aug_max=0.3)
    x = images(2, 1, 8)
    cond = training_condition(task, x, torch.tensor([7, 8]), SCHEDULE)
    for i, seed in enumerate((7, 8)):
        g = torch.Generator().manual_seed(seed)
        s = float(torch.rand((), generator=g, dtype=torch.float64)) * 0.3
        eps = torch.randn(1, 4, 4, generator=g)
        assert float(cond["scalars"][i, 0]) == pytest.approx(s, abs=1e-7)
        low = downsample(x[i:i + 1], 2)[0]
        noised = float(SCHEDULE.alpha(s)) * low + float(SCHEDULE.sigma(s)) * eps
        torch.testing.assert_close(cond["image"][i], upsample(noised[None], 8)[0], atol=1e-5, rtol=0)
    fixed = training_condition(task, x, torch.tensor([7, 8]), SCHEDULE, level=0.0)  # sampling at aug_level 0
    torch.testing.assert_close(fixed["image"], upsample(downsample(x, 2), 8))
    assert torch.equal(fixed["scalars"], torch.zeros(2, 1))


def test_input_conditions_and_their_errors():
    task = TaskConfig(kind="superres", factor=2)
    low = images(2, 1, 4)
    torch.testing.assert_close(input_condition(task, low, 8, SCHEDULE)["image"], upsample(low, 8))
    with pytest.raises(ValueError, match=r"takes 4x4 inputs \(its 8x8 / factor 2\), got 8x8"):
        input_condition(task, images(2, 1, 8), 8, SCHEDULE)
    colour = images(2, 3, 8)
    torch.testing.assert_close(input_condition(TaskConfig(kind="colorize"), colour, 8, SCHEDULE)["image"], to_gray(colour))
    unc = input_condition(TaskConfig(kind="uncrop", keep=0.5), colour, 8, SCHEDULE)["image"]
    torch.testing.assert_close(unc[:, 3], border_mask(8, 0.5).expand(2, 8, 8))
    with pytest.raises(ValueError, match="needs a mask"):
        input_condition(TaskConfig(kind="inpaint"), colour, 8, SCHEDULE)


@pytest.mark.parametrize("task, channels, cc, sc, match", [
    (TaskConfig(kind="superres"), 1, 0, 0, r"set model.cond_channels = 1"),
    (TaskConfig(kind="superres", noise_aug_max=0.2), 1, 1, 0, r"set model.scalar_inputs = 1"),
    (TaskConfig(kind="superres", factor=3), 1, 1, 0, r"task.factor = 3 must be >= 2 and divide data.image_size = 8"),
    (TaskConfig(kind="colorize"), 1, 1, 0, "needs colour data"),
    (TaskConfig(kind="inpaint"), 3, 3, 0, r"set model.cond_channels = 4"),
    (TaskConfig(kind="jpeg", jpeg_quality=[50, 10]), 3, 3, 0, r"jpeg_quality must be \[lo, hi\]"),
    (TaskConfig(kind="uncrop", keep=1.0), 3, 4, 0, r"task.keep must be in \(0, 1\)"),
])
def test_bad_task_settings_are_named(task, channels, cc, sc, match):
    with pytest.raises(ValueError, match=match):
        check_task(task, channels, 8, cc, sc)


def test_l1_loss_is_the_mean_absolute_error():
    den = Denoiser(lambda x, t: torch.zeros_like(x), SCHEDULE)  # predicts eps = 0: the error is eps itself
    x0, eps = images(3, 1, 4), images(3, 1, 4, seed=1)
    t = torch.full((3,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(l_simple(den, x0, t, eps, norm="l1"), eps.abs().flatten(1).mean(1))
    torch.testing.assert_close(l_simple(den, x0, t, eps), eps.pow(2).flatten(1).mean(1))


# --- data ------------------------------------------------------------------------------------------------------
def test_photo_crops_are_a_fixed_labelled_set():
    pytest.importorskip("skimage")
    a = load_dataset(DataConfig(source="photos", image_size=16, channels=3, crops=50))
    b = load_dataset(DataConfig(source="photos", image_size=16, channels=3, crops=50))
    assert a.images.shape == (50, 3, 16, 16) and torch.equal(a.images, b.images)
    assert a.num_classes == 7 and a.class_names[0] == "astronaut" and int(a.labels.max()) < 7
    assert a.images.float().std() > 20  # real pictures, not a flat fill
    gray = load_dataset(DataConfig(source="photos", image_size=16, channels=1, crops=50))
    assert gray.images.shape == (50, 1, 16, 16)


def test_photos_without_scikit_image_name_the_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_skimage(name, *args, **kwargs):
        if name.startswith("skimage"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_skimage)
    with pytest.raises(ImportError, match=re.escape('pip install -e ".[photos]"')):
        load_dataset(DataConfig(source="photos", image_size=16, channels=3, crops=5))


# --- training and sampling -------------------------------------------------------------------------------------
SR = BASE + ["task.kind=superres", "task.noise_aug_max=0.3", "task.aug_level=0.1", "model.cond_channels=1",
             "model.scalar_inputs=1", "train.checkpoint_every=3"]


def test_a_superres_run_resumes_exactly_with_its_pairs(tmp_path):
    """The pairs (augmentation level and noise) are drawn from the trainer's generator per global batch, so a run
    killed after step 3 and resumed ends bit-identical to one run straight through."""
    check_exact_resume(apply_overrides(RunConfig(), SR), tmp_path)


def test_the_pairs_are_made_from_the_flipped_image(tmp_path, monkeypatch):
    cfg = apply_overrides(RunConfig(), BASE + ["task.kind=superres", "model.cond_channels=1", "train.steps=1"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    seen = {}

    def spy(denoiser, x0, t, eps, **kw):
        seen.update(x0=x0, image=kw["image"])
        return torch.zeros(x0.shape[0], requires_grad=True)

    monkeypatch.setattr("diffuse.kinds.diffusion.l_simple", spy)
    trainer.loss_and_backward()
    torch.testing.assert_close(seen["image"], upsample(downsample(seen["x0"], 2), 8))


def test_a_task_model_needs_its_task(tmp_path):
    cfg = apply_overrides(RunConfig(), BASE + ["model.cond_channels=1"])
    with pytest.raises(ValueError, match=r"set \[task\] kind"):
        Trainer(cfg, tmp_path / "run", progress=False)


TINY_SR = ["data.source=digits", "data.image_size=8", "model.channels=8", "model.channel_mult=[1,2]",
           "model.attention_resolutions=[4]", "model.norm_groups=4", "train.batch_size=16", "train.steps=4",
           "train.warmup_steps=2", "train.time_limit=0", "train.checkpoint_every=2", "sample.steps=3"]


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sr") / "run"
    assert main(["train", "configs/cascade_sr.toml", *_sets(TINY_SR), "--out", str(out)]) == 0
    return out


def test_edit_superres_from_the_cli(sr_run, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 4), dtype=np.uint8)).save(tmp_path / "low.png")
    out = tmp_path / "big.npy"
    assert main(["edit", "superres", str(sr_run), "--image", str(tmp_path / "low.png"), "--n", "2", "--out", str(out)]) == 0
    assert np.load(out).shape == (2, 1, 8, 8) and (tmp_path / "big_before_after.png").is_file()
    assert main(["edit", "superres", str(sr_run), "--image", str(tmp_path / "low.png"), "--n", "2", "--mean",
                 "--out", str(tmp_path / "mean.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "mean.npy")[0], np.load(out).mean(0), atol=1e-6)  # same seed, averaged
    assert main(["edit", "colorize", str(sr_run), "--image", str(tmp_path / "low.png"), "--out", str(tmp_path / "c.png")]) == 2
    assert not (tmp_path / "c.png").exists()


def test_sample_on_a_task_run_names_the_edit_command(sr_run, tmp_path, capsys):
    assert main(["sample", str(sr_run), "--n", "2", "--out", str(tmp_path / "s.png")]) == 2
    assert f"use `diffuse edit superres {sr_run} --image IMAGE" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()


def test_a_cascade_samples_both_stages(sr_run, tmp_path, capsys):
    base = tmp_path / "casc" / "base"
    assert main(["train", "configs/cascade_base.toml", *_sets(TINY_SR + ["data.image_size=4", "model.attention_resolutions=[2]"]),
                 "--out", str(base)]) == 0
    (tmp_path / "casc" / "cascade.toml").write_text(f'stages = ["base", "{sr_run}"]\naug_level = 0.2\n')
    out = tmp_path / "x.npy"
    assert main(["sample", str(tmp_path / "casc"), "--n", "3", "--label", "5", "--out", str(out)]) == 0
    assert np.load(out).shape == (3, 1, 8, 8)
    stages, level = read_cascade(tmp_path / "casc")
    assert level == 0.2 and stages[0] == base
    (tmp_path / "casc" / "cascade.toml").write_text('stages = ["base"]\n')
    assert main(["sample", str(tmp_path / "casc"), "--out", str(tmp_path / "y.npy")]) == 2
    assert "two or more run folders" in capsys.readouterr().err
    from diffuse.runs import run_config
    big_base = dataclasses.replace(run_config(base), data=dataclasses.replace(run_config(base).data, image_size=8))
    with pytest.raises(ValueError, match="stage 1 makes 1-channel 8x8 ones"):
        check_cascade([big_base, run_config(sr_run)])


def test_eval_measures_a_task_model_given_its_inputs(sr_run):
    import json
    assert main(["eval", str(sr_run), "--metric", "kid", "--n", "8", "--steps", "2"]) == 0
    record = json.loads((sr_run / "eval.json").read_text())[-1]
    assert record["condition"].startswith("task superres") and record["n_fake"] == record["n_real"] == 8
    assert main(["eval", str(sr_run), "--metric", "vlb", "--n", "2", "--vlb-samples", "2"]) == 0
    assert np.isfinite(json.loads((sr_run / "eval.json").read_text())[-1]["bits_per_dim"])


def test_likelihood_of_a_class_conditional_run_is_its_unconditional_density(tmp_path):
    import json
    run = tmp_path / "cond"  # the likelihood needs a VP process: the VP twin of the demo
    assert main(["train", "configs/mnist_cond_vp.toml", *_sets(TINY_SR), "--out", str(run)]) == 0
    for metric, extra in (("nll", ["--rtol", "1e-2"]), ("vlb", ["--vlb-samples", "2"])):
        assert main(["eval", str(run), "--metric", metric, "--n", "2", *extra]) == 0
        record = json.loads((run / "eval.json").read_text())[-1]
        assert record["condition"].startswith("the null label") and np.isfinite(record["bits_per_dim"])
