"""Small defects of issue 38, each as a kind: guidance of a condition against itself, TQDM_DISABLE for every progress
bar, an overflow blamed on its cause (the guidance weight, not the run's weights), an error on a line of its own, and
latent SDEdit at strength 0."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse import Denoiser, Schedule
from diffuse.app.cli import main
from diffuse.guidance import ClassifierFreeGuidance, ClassifierGuidance, same_condition
from diffuse.samplers import CountCalls, NonFiniteSample

from conftest import GaussianMixture
from test_cli import TINY, _sets
from test_solvers import MIXTURE


@pytest.fixture
def mix():
    return GaussianMixture(Schedule.linear(), **MIXTURE)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("edges") / "run"
    assert main(["train", "configs/mnist_cond_vp.toml", *_sets(TINY), "--out", str(out)]) == 0
    return out


# --- guidance of a condition against itself ----------------------------------------------------------------------------
def test_guidance_of_a_condition_against_itself_is_one_call_of_the_conditional_model(mix):
    """cond = uncond (an empty prompt, a negative prompt equal to the prompt): (1 + w) x0(c) - w x0(c) = x0(c) at any w,
    so the wrapper says so and calls the network once, giving the conditional prediction exactly."""
    den = CountCalls(Denoiser(mix.eps, mix.schedule))
    x, label = torch.randn(8, 2, 1, 1, dtype=torch.float64), torch.full((8,), 1)
    with pytest.warns(UserWarning, match=r"w = 3\) of a condition against itself .* one network call per step"):
        cfg = ClassifierFreeGuidance(den, 3.0, {"label": label}, {"label": label.clone()})
    before = den.calls
    out = cfg(x, 0.4)
    assert den.calls == before + 1
    torch.testing.assert_close(out.x0, den(x, 0.4, label=label).x0, rtol=0, atol=0)
    assert same_condition({"a": torch.ones(2)}, {"a": torch.ones(2)}) and not same_condition({"a": torch.ones(2)},
                                                                                               {"a": torch.zeros(2)})
    assert not same_condition({"a": torch.ones(2)}, {"a": torch.ones(3)}) and not same_condition({"a": 1}, {"b": 1})


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    from test_text_conditioning import TEXT

    out = tmp_path_factory.mktemp("edges") / "text"
    assert main(["train", "configs/mnist.toml", *_sets(TEXT), "--out", str(out)]) == 0
    return out


def test_an_empty_prompt_with_guidance_pays_one_call_per_step(text_run, tmp_path, capsys):
    for prompt, negative in (("", None), ("a red circle", "a red circle")):
        args = ["sample", str(text_run), "--prompt", prompt, "--guidance", "2", "--n", "2", "--steps", "3", "--out",
                str(tmp_path / "x.npy")] + (["--negative-prompt", negative] if negative else [])
        with pytest.warns(UserWarning, match="of a condition against itself"):  # printed as "diffuse sample: warning: ..."
            assert main(args) == 0
        out = capsys.readouterr().out
        assert "(3 denoiser calls)" in out, out  # it was 6: two per step for an unguided result
    assert main(["sample", str(text_run), "--prompt", "a red circle", "--guidance", "2", "--n", "2", "--steps", "3", "--out",
                 str(tmp_path / "x.npy")]) == 0
    assert "(6 denoiser calls)" in capsys.readouterr().out  # a real guidance: two calls per step


# --- TQDM_DISABLE ------------------------------------------------------------------------------------------------------------
def test_tqdm_disable_silences_every_progress_bar(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert main(["train", "configs/mnist.toml", *_sets(TINY), "--out", str(tmp_path / "t")]) == 0
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0
    err = capsys.readouterr().err
    assert "step/s" not in err and "%|" not in err and "training" not in err, err


# --- an overflow is blamed on its cause ----------------------------------------------------------------------------------------
def test_an_overflowing_guidance_weight_is_named_not_the_weights(mix):
    den = Denoiser(mix.eps, mix.schedule)
    x, label = torch.randn(8, 2, 1, 1), torch.full((8,), 1)
    cfg = ClassifierFreeGuidance(den, 1e300, {"label": label}, {"label": torch.full((8,), mix.K)})
    with pytest.raises(NonFiniteSample, match=r"classifier-free guidance with weight w = 1e\+300 overflowed at t = 0\.4: "
                                              r"the conditional and unconditional predictions are finite"):
        cfg(x, 0.4)
    classifier = lambda x_t, t: mix.logits(x_t, t).float() * 1e30  # noqa: E731 (a gradient of 1e30)
    with pytest.raises(NonFiniteSample, match=r"classifier guidance with scale s = 1e\+30 overflowed"):
        ClassifierGuidance(den, classifier, label, 1e30)(x, 0.4)


def test_cli_guidance_overflow_names_the_flag_on_a_line_of_its_own(run, tmp_path, capsys):
    """--guidance 1e300 was blamed on the run's weights ("check the run's weights (--no-ema, an earlier checkpoint)"),
    printed after the progress bar on its line."""
    assert main(["sample", str(run), "--guidance", "1e300", "--n", "2", "--steps", "3", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    line = next(line for line in re.split(r"[\r\n]", err) if "error" in line)
    assert line.startswith("diffuse sample: error: classifier-free guidance with weight w = 1e+300 overflowed"), err
    assert "--guidance" in line and "run's weights" not in line
    assert not (tmp_path / "x.png").exists()


# --- latent SDEdit at strength 0 -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory):
    from test_latent import AE, LDM

    root = tmp_path_factory.mktemp("edges")
    assert main(["train", "configs/ae_mnist.toml", *_sets(AE), "--out", str(root / "ae")]) == 0
    assert main(["train", "configs/ldm_mnist.toml", *_sets(LDM), "--set", f"latent.autoencoder={root / 'ae'}",
                 "--out", str(root / "ldm")]) == 0
    return root / "ldm"


def test_latent_sdedit_at_strength_0_returns_the_input(ldm_run, tmp_path):
    """Strength 0 returns the image, on a latent run too (it returned the autoencoder's reconstruction D(E(x)), 0.81
    off in places), from the command line and the page."""
    from diffuse.app.requests import EditRequest, execute, resolve

    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(tmp_path / "in.png")
    assert main(["edit", "sdedit", str(ldm_run), "--image", str(tmp_path / "in.png"), "--strength", "0", "--n", "2",
                 "--out", str(tmp_path / "s0.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "s0.npy")[:, 0], np.broadcast_to(pixels / 255, (2, 8, 8)), atol=1e-6)
    req = EditRequest(run=str(ldm_run), task="sdedit", image=str(tmp_path / "in.png"), strength=0.0, n=2, steps=3)
    x = execute(resolve(req)).x  # the page's path (app.requests) as the command's
    np.testing.assert_allclose(((x[:, 0] + 1) / 2).numpy(), np.broadcast_to(pixels / 255, (2, 8, 8)), atol=1e-6)


def test_latent_edit_at_strength_0_returns_the_input(ldm_run):
    from diffuse.runs import load_run
    from diffuse.stages import space
    from diffuse.tasks.editing import latent_edit

    cfg, den, _ = load_run(ldm_run)
    image = torch.rand(2, 1, 8, 8) * 2 - 1
    out = latent_edit("sdedit", den, space(cfg), image, strength=0.0, steps=3, labels=torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out, image, rtol=0, atol=0)


def test_a_run_whose_config_was_edited_after_training_is_a_clear_error(run, tmp_path, capsys):
    """The run-folder twin of a diffusers config.json that does not match its weights: RUN/config.toml's model.channels
    edited after training was a RuntimeError traceback (rc 1)."""
    import shutil

    edited = tmp_path / "run"
    shutil.copytree(run, edited)
    text = (edited / "config.toml").read_text()
    (edited / "config.toml").write_text(text.replace("\nchannels = 8\n", "\nchannels = 16\n", 1))
    assert main(["sample", str(edited), "--n", "2", "--steps", "2", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"{edited / 'config.toml'} does not match the weights" in err and "tensors differ in shape" in err, err
