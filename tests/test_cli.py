"""The `diffuse` command end to end on a tiny model."""

from pathlib import Path

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


# --- first contact: the version, a misspelt command, the packaged configs ----------------------------------------------
def test_version_is_the_installed_distributions_or_the_packages(capsys):
    import importlib.metadata
    import tomllib
    from pathlib import Path

    import diffuse
    from diffuse.app.cli import DISTRIBUTION, version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"diffuse {version()} (the {DISTRIBUTION} package)\n"
    try:
        assert version() == importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        assert version() == diffuse.__version__  # a source tree pip has not installed
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert project["project"]["name"] == DISTRIBUTION and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "diffuse.version.__version__"}


@pytest.mark.parametrize("argv,hint", [
    (["trian", "configs/mnist.toml"], "diffuse: error: unknown command 'trian'; did you mean 'train'? (commands: train, "),
    (["smaple", "RUN"], "did you mean 'sample'?"),
    (["edit", "inpiant", "RUN"], "diffuse edit: error: unknown command 'inpiant'; did you mean 'inpaint'?"),
    (["config", "shwo", "mnist"], "diffuse config: error: unknown command 'shwo'; did you mean 'show'?"),
])
def test_a_misspelt_command_names_the_closest(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and hint in capsys.readouterr().err


def test_a_word_far_from_every_command_gets_argparses_own_error(capsys):
    with pytest.raises(SystemExit):
        main(["xyzzy"])
    err = capsys.readouterr().err
    assert "invalid choice: 'xyzzy'" in err and "did you mean" not in err


def test_config_show_prints_the_whole_resolved_config(capsys, tmp_path):
    """The printed TOML is every key, --set applied: it loads back to the config `diffuse train NAME --set ...` uses."""
    import tomllib

    from diffuse.config import RunConfig, apply_overrides, load_config, to_dict

    assert main(["config", "show", "mnist_cond", "--set", "train.posthoc_ema=[]", "--set", "train.lr=3e-4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ") and "mnist_cond.toml --set train.posthoc_ema=[] --set train.lr=3e-4, resolved" in out
    shown = tomllib.loads(out)
    expected = apply_overrides(load_config("mnist_cond"), ["train.posthoc_ema=[]", "train.lr=3e-4"])
    assert shown["train"] == to_dict(expected)["train"] and shown["train"]["posthoc_ema"] == []
    assert set(shown["model"]) == set(to_dict(RunConfig())["model"])  # every key, defaults filled in
    (tmp_path / "c.toml").write_text(out)
    assert to_dict(load_config(tmp_path / "c.toml"))["model"] == to_dict(expected)["model"]
    assert "autoencoder" not in shown  # the sections its kind ignores, as RUN/config.toml leaves them out


def test_config_show_refuses_what_train_refuses_and_list_names_them(capsys):
    assert main(["config", "show", "mnist_cnod"]) == 2
    assert "did you mean `mnist_cond`?" in capsys.readouterr().err
    assert main(["config", "show", "mnist", "--set", "train.ema_snapshot_every=7"]) == 2
    assert "train.ema_snapshot_every = 7 is ignored" in capsys.readouterr().err
    assert main(["config", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("mnist_cond ") and "The `diffuse demo` model" in line for line in lines)
    assert len(lines) == len(list((Path(__file__).parents[1] / "diffuse" / "configs").glob("*.toml")))


def test_train_takes_a_packaged_config_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository
    assert main(["train", "mnist", *_sets(TINY), "--set", "train.steps=2", "--out", "r"]) == 0
    assert (tmp_path / "r" / "checkpoints" / "step_00000002").is_dir()
