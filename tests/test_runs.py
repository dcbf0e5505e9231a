"""Runs as objects (runs.open_run): what a run can do, said once from its config and checkpoint, for trained runs,
autoencoder runs, trained-task runs and diffusers folders."""

from __future__ import annotations

import pytest

from diffuse.config import RunConfig, apply_overrides
from diffuse.runs import capabilities, open_run
from diffuse.train import train

TINY = ["data.source=digits", "data.image_size=8", "data.channels=1", "model.channels=8", "model.channel_mult=[1, 2]",
        "model.num_res_blocks=1", "model.norm_groups=4", "model.attention_resolutions=[]", "train.batch_size=8",
        "train.steps=1", "train.sample_every=0", "train.mixed_precision=no", "schedule.T=20", "sample.steps=2"]


def cfg(*overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(), [*TINY, *overrides])


def test_a_trained_conditional_run_says_what_it_can_do(tmp_path):
    run = train(cfg("model.class_conditional=true", "train.condition_dropout={label = 0.2}"), tmp_path / "r", progress=False)
    r = open_run(run)
    assert (r.kind, r.step, r.num_classes, r.diffusers) == ("denoiser", 1, 10, False)
    c = r.capabilities
    assert (c.samples, c.classes, c.text, c.guidance_keys, c.trained_task, c.latent, c.bounded) == (
        True, 10, False, ("label",), "none", False, True)
    assert c.edits == ("inpaint", "sdedit", "ilvr", "invert") and "nll" in c.metrics
    den = r.denoiser()
    assert den.net.condition_spec.num_classes == 10 and r.space().shape == (1, 8, 8)


def test_capabilities_follow_the_config():
    plain = capabilities(cfg(), 10)
    assert (plain.classes, plain.guidance_keys) == (0, ())  # not class-conditional: the data's classes do not count
    no_dropout = capabilities(cfg("model.class_conditional=true"), 10)
    assert (no_dropout.classes, no_dropout.guidance_keys) == (10, ())  # no null label trained: no guidance
    sr = capabilities(cfg("task.kind=superres", "model.cond_channels=1"), 10)
    assert (sr.samples, sr.edits, sr.trained_task) == (False, ("superres",), "superres")
    jpeg = capabilities(cfg("task.kind=jpeg", "model.cond_channels=1"), 10)
    assert jpeg.edits == ("restore",)
    ae = capabilities(apply_overrides(RunConfig(), ["model.kind=autoencoder"]), 10)
    assert (ae.samples, ae.edits, ae.metrics) == (False, (), ("recon",))
    clf = capabilities(cfg("model.kind=classifier"), 10)
    assert (clf.samples, clf.classes, clf.metrics) == (False, 10, ())
    diffae = capabilities(cfg("model.kind=diffae", "model.semantic_dim=4"), 10)  # samples through its latent DDIM
    assert (diffae.samples, diffae.edits) == (False, ("invert", "reconstruct", "manipulate", "interpolate"))
    prior = capabilities(apply_overrides(RunConfig(), ["model.kind=diffae_prior"]), 0)
    assert (prior.samples, prior.edits, prior.classes, prior.metrics) == (True, (), 0, ("fid", "kid", "is", "pr"))


def test_a_folder_that_is_no_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a run folder"):
        open_run(tmp_path)


def test_a_run_folder_without_a_checkpoint_names_the_resume_command(tmp_path, capsys):
    """A training stopped before its first save leaves config.toml and no checkpoint: open_run (and every command built
    on it) says so and how to resume, instead of failing on the missing step."""
    from diffuse.app.cli import main
    from diffuse.config import save_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg(), run / "config.toml")
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint yet .*diffuse train .*config.toml --out"):
        open_run(run)
    assert main(["sample", str(run), "--n", "1", "--out", str(tmp_path / "x.png")]) != 0
    assert "holds no checkpoint yet" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
