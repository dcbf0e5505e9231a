"""The `diffuse` command end to end on a tiny model."""

import numpy as np
import pytest
from PIL import Image

from diffuse.app.cli import main

TINY = ["data.source=digits", "data.image_size=8", "model.channels=8", "model.channel_mult=[1,2]",
        "model.attention_resolutions=[4]", "model.norm_groups=4", "model.dropout=0.0", "train.batch_size=16",
        "train.steps=4", "train.warmup_steps=2", "train.log_every=2", "train.checkpoint_every=2", "sample.steps=5",
        "train.sample_every=0"]


def _sets(items):
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "configs/mnist.toml", *_sets(TINY), "--out", str(out)]) == 0
    return out


def test_train_writes_a_run_folder(run):
    assert (run / "config.toml").is_file() and (run / "log.jsonl").is_file() and (run / "loss.png").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_sample_png_and_npy(run, tmp_path):
    assert main(["sample", str(run), "--n", "6", "--sampler", "ddpm", "--steps", "10", "--seed", "1",
                 "--out", str(tmp_path / "a.npy")]) == 0
    a = np.load(tmp_path / "a.npy")
    assert a.shape == (6, 1, 8, 8) and a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    assert main(["sample", str(run), "--n", "6", "--sampler", "ddpm", "--steps", "10", "--seed", "1",
                 "--out", str(tmp_path / "b.npy")]) == 0
    np.testing.assert_array_equal(a, np.load(tmp_path / "b.npy"))  # same seed, same samples
    assert main(["sample", str(run), "--n", "4", "--sampler", "ddim", "--steps", "5", "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size == (2 + 2 * 10, 2 + 2 * 10)  # a 2x2 grid of 8x8 images, 2 px padding


def test_retraining_resumes(run):
    assert main(["train", str(run / "config.toml"), "--set", "train.steps=6", "--out", str(run)]) == 0
    assert (run / "checkpoints" / "step_00000006").is_dir()
    lines = (run / "log.jsonl").read_text().splitlines()
    assert [eval(line.replace("null", "None"))["step"] for line in lines] == [2, 4, 6]


def test_bad_inputs_give_clear_errors(run, tmp_path, capsys):
    assert main(["train", "configs/mnist.toml", "--set", "train.lrate=1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.lrate'" in err and "lr" in err
    assert main(["train", "configs/mnist.toml", "--set", "schedule.kind=quadratic", "--out", str(tmp_path / "x")]) == 2
    assert "'linear', 'cosine'" in capsys.readouterr().err
    assert main(["train", "nope.toml", "--out", str(tmp_path / "x")]) == 2
    assert "nope.toml" in capsys.readouterr().err
    assert main(["sample", str(tmp_path), "--out", str(tmp_path / "s.png")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["sample", str(run), "--out", str(tmp_path / "s.jpg")]) == 2
    assert ".png" in capsys.readouterr().err
    assert main(["train", str(run / "config.toml"), "--set", "train.lr=0.5", "--out", str(run)]) == 2
    assert "train.lr" in capsys.readouterr().err
