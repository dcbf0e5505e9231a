"""Conditional generation from the command line: a class-conditional run with label dropout, a noisy
classifier run, and `diffuse sample` with --label, --guidance, --classifier, --threshold, --opt."""

import json

import numpy as np
import pytest
import torch

from diffuse.app.cli import main
from diffuse.config import SamplerName
from diffuse.samplers import SAMPLERS
from diffuse.runs import load_classifier, load_run
from diffuse.train import Trainer

from test_cli import TINY, _sets


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond") / "run"
    # the VP twin of the demo: every sampler, the VP-SDE ones included, runs on it
    assert main(["train", "configs/mnist_cond_vp.toml", *_sets(TINY), "--set", "train.condition_dropout={label=0.5}",
                 "--set", "sample.steps=4", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def clf_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "run"
    assert main(["train", "configs/mnist_classifier.toml", *_sets(TINY), "--set", "train.steps=30", "--set", "train.lr=3e-3", "--out", str(out)]) == 0
    return out


def test_config_sampler_names_are_the_registered_samplers():
    import typing
    assert set(typing.get_args(SamplerName)) == set(SAMPLERS)


def test_every_sampler_runs_from_the_cli(cond_run, tmp_path):
    for name in SAMPLERS:
        path = tmp_path / f"{name}.npy"
        extra = ["--opt", "rtol=1e-2", "--opt", "atol=1e-2"] if name == "ode-rk45" else ["--steps", "3"]
        assert main(["sample", str(cond_run), "--n", "3", "--sampler", name, *extra, "--out", str(path)]) == 0, name
        x = np.load(path)
        assert x.shape == (3, 1, 8, 8) and np.isfinite(x).all()


def test_label_guidance_and_threshold(cond_run, tmp_path, capsys):
    def sample(*extra):
        path = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npy"
        assert main(["sample", str(cond_run), "--n", "4", "--steps", "4", "--seed", "2", *extra, "--out", str(path)]) == 0
        return np.load(path)

    a = sample("--label", "3", "--guidance", "0")
    b = sample("--label", "3", "--guidance", "2")
    c = sample("--label", "5", "--guidance", "0")
    assert not np.allclose(a, b) and not np.allclose(a, c)
    assert "denoiser calls" in capsys.readouterr().out
    # guidance 2 costs one batched call per step, as many calls as without guidance
    d = sample("--label", "3", "--guidance", "2", "--threshold", "dynamic:0.9")
    assert not np.allclose(b, d)
    np.testing.assert_array_equal(sample("--label", "3", "--guidance", "2"), b)
    # a guidance interval over every noise level is plain guidance, one over none is w = 0 (Kynkaanniemi et al. 2024)
    plain = sample("--label", "3", "--guidance", "2", "--guidance-interval", "all")  # the run's own interval set aside
    np.testing.assert_allclose(sample("--label", "3", "--guidance", "2", "--guidance-interval", "0,inf"), plain, atol=1e-6)
    np.testing.assert_allclose(sample("--label", "3", "--guidance", "2", "--guidance-interval", "1e6,1e7"), a, atol=1e-6)


def test_guidance_inputs_are_checked(cond_run, tmp_path, capsys):
    out = ["--out", str(tmp_path / "x.png")]
    assert main(["sample", str(cond_run), "--label", "10", *out]) == 2
    assert "0..9" in capsys.readouterr().err
    assert main(["sample", str(cond_run), "--threshold", "dynamic:2", *out]) == 2
    assert "dynamic:0.995" in capsys.readouterr().err
    assert main(["sample", str(cond_run), "--sampler", "dpmpp-2m", "--opt", "eta=1", *out]) == 2
    assert "takes no options" in capsys.readouterr().err
    assert main(["sample", str(cond_run), "--sampler", "heun", "--opt", "s_churn=2", "--steps", "3",
                 "--out", str(tmp_path / "h.npy")]) == 0
    assert main(["sample", str(cond_run), "--sampler", "dpmpp-2m", "--eta", "1", *out]) == 2
    assert "takes no eta" in capsys.readouterr().err
    assert main(["sample", str(cond_run), "--classifier", str(cond_run), *out]) == 2
    assert "not a classifier" in capsys.readouterr().err


def test_classifier_run_trains_and_guides(clf_run, cond_run, tmp_path, capsys):
    cfg, clf = load_classifier(clf_run)
    assert cfg.model.kind == "classifier" and clf.num_classes == 10
    losses = [json.loads(line)["loss"] for line in (clf_run / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]  # cross-entropy on x_t goes down
    logits = clf(torch.randn(5, 1, 8, 8), torch.full((5,), 10.0))
    assert logits.shape == (5, 10)
    # an unconditional model guided by the classifier
    uncond = tmp_path / "uncond"
    assert main(["train", "configs/mnist.toml", *_sets(TINY), "--out", str(uncond)]) == 0
    outs = []
    for scale in ("0", "5"):
        path = tmp_path / f"g{scale}.npy"
        assert main(["sample", str(uncond), "--classifier", str(clf_run), "--label", "4", "--guidance", scale,
                     "--n", "3", "--steps", "4", "--out", str(path)]) == 0
        outs.append(np.load(path))
    assert not np.allclose(*outs)
    with pytest.raises(ValueError, match="not a denoiser"):
        load_run(clf_run)
    assert main(["sample", str(uncond), "--guidance", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "class-conditional" in capsys.readouterr().err


def test_label_dropout_replaces_labels_with_the_null_label(cond_run):
    cfg, den, num_classes = load_run(cond_run)
    assert den.net.condition_spec.num_classes == num_classes == 10  # so the null label is 10
    trainer = Trainer(cfg, cond_run, progress=False)
    y = torch.arange(16) % 10
    drop = lambda: trainer.objective.draw(16, trainer.generator)["drop.label"]  # noqa: E731
    dropped = [trainer.objective.condition({"label": y}, {"label": drop()})["label"] for _ in range(20)]
    share = float(torch.stack([(d == 10).double().mean() for d in dropped]).mean())
    assert share == pytest.approx(0.5, abs=0.1)
    assert all(torch.equal(d[d != 10], y[d != 10]) for d in dropped)
