"""Run configs: TOML round trips, `--set` overrides, and the errors that name the key and list what is valid."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from diffuse.config import (
    PACKAGED,
    ConfigError,
    RunConfig,
    apply_overrides,
    check_unused,
    config_path,
    config_summary,
    from_dict,
    load_config,
    packaged_configs,
    parse_override,
    save_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_round_trip(tmp_path):
    cfg = RunConfig()
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg


def test_modified_config_round_trips_with_types(tmp_path):
    cfg = apply_overrides(RunConfig(), [
        "data.source=folder", "data.path=/tmp/my images/x", "data.image_size=16", "data.channels=3",
        "schedule.kind=cosine", "schedule.T=400",
        "model.channel_mult=[1, 3]", "model.attention_resolutions=[]", "model.dropout=0.25",
        "model.class_conditional=true", "model.prediction=v",
        "train.lr=3.5e-5", "train.time_limit=12", "train.hflip=true", "train.loss_weighting=min_snr",
        "sample.sampler=ddpm", "sample.eta=0.5",
    ])
    path = tmp_path / "run" / "config.toml"
    path.parent.mkdir()
    save_config(cfg, path)
    back = load_config(path)
    assert back == cfg
    assert to_dict(back) == to_dict(cfg)
    assert isinstance(back.train.time_limit, float) and back.train.time_limit == 12.0
    assert back.model.channel_mult == [1, 3] and back.model.attention_resolutions == []
    assert back.data.path == "/tmp/my images/x"


def test_the_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig), path


def test_partial_file_keeps_defaults_and_base(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nlr = 1e-3\n\n[model]\nchannels = 64\n')
    cfg = load_config(path)
    assert cfg.train.lr == 1e-3 and cfg.model.channels == 64
    assert cfg.train.batch_size == RunConfig().train.batch_size and cfg.data == RunConfig().data
    base = apply_overrides(RunConfig(), ["train.steps=7", "train.lr=5e-5"])
    cfg = load_config(path, base=base)
    assert (cfg.train.steps, cfg.train.lr) == (7, 1e-3)  # the file wins over the base, the base over defaults
    assert base.train.lr == 5e-5  # the base is not modified


# --- overrides ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,section,key,value", [
    ("train.steps=10", "train", "steps", 10),
    ("train.lr=1e-4", "train", "lr", 1e-4),
    ("train.lr = 0.5", "train", "lr", 0.5),
    ("model.channel_mult=[1, 2, 4]", "model", "channel_mult", [1, 2, 4]),
    ("train.hflip=true", "train", "hflip", True),
    ("schedule.kind=cosine", "schedule", "kind", "cosine"),
    ('schedule.kind="cosine"', "schedule", "kind", "cosine"),
    ("data.path=./my/images", "data", "path", "./my/images"),
    ("data.path=a=b", "data", "path", "a=b"),
])
def test_parse_override(text, section, key, value):
    assert parse_override(text) == (section, key, value)


def test_apply_overrides_converts_and_does_not_mutate():
    base = RunConfig()
    cfg = apply_overrides(base, [
        "train.steps=10", "train.lr=1", "train.ema_decay=0.5", "model.channel_mult=[1,2]", "train.hflip=true",
        "model.class_conditional=false", "schedule.kind=cosine", "data.source=digits", "data.path=./my/images",
        "sample.n=4", "train.steps=12",  # the last of two overrides of a key wins
    ])
    assert cfg.train.steps == 12 and type(cfg.train.steps) is int
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float  # an int given for a float field becomes a float
    assert cfg.train.ema_decay == 0.5
    assert cfg.model.channel_mult == [1, 2]
    assert cfg.train.hflip is True and cfg.model.class_conditional is False
    assert (cfg.schedule.kind, cfg.data.source, cfg.data.path, cfg.sample.n) == ("cosine", "digits", "./my/images", 4)
    assert base == RunConfig()  # the input config is left alone
    assert cfg.model.attention_resolutions is not base.model.attention_resolutions
    assert apply_overrides(base, []) == base


# --- errors ----------------------------------------------------------------------------------------------
def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]; valid sections: data, schedule, model, train, sample"):
        apply_overrides(RunConfig(), ["trian.lr=1e-4"])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        apply_overrides(RunConfig(), ["train.learning_rate=1e-4"])
    msg = str(e.value)
    assert "train.learning_rate" in msg
    valid = [f.name for f in dataclasses.fields(RunConfig().train)]
    assert all(k in msg for k in valid), msg
    with pytest.raises(ConfigError, match="valid keys in \\[model\\]: .*channel_mult.*norm_groups"):
        from_dict({"model": {"chanels": 8}})


@pytest.mark.parametrize("text,pattern", [
    ("train.steps=1.5", r"train\.steps must be an integer, got 1\.5"),
    ("train.steps=true", r"train\.steps must be an integer"),
    ("train.steps=ten", r"train\.steps must be an integer, got 'ten'"),
    ("train.lr=fast", r"train\.lr must be a number, got 'fast'"),
    ("train.lr=true", r"train\.lr must be a number"),
    ("train.lr=", r"train\.lr must be a number"),
    ("train.hflip=1", r"train\.hflip must be true or false, got 1"),
    ("train.hflip=yes", r"train\.hflip must be true or false"),
    ("model.channel_mult=2", r"model\.channel_mult must be a list"),
    ("model.channel_mult=[1, 2.5]", r"model\.channel_mult\[1\] must be an integer"),
    ("data.path=42", r"data\.path must be a string, got 42"),
])
def test_wrong_type(text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(RunConfig(), [text])


@pytest.mark.parametrize("text,choices", [
    ("schedule.kind=quadratic", ["'linear'", "'cosine'"]),
    ("model.prediction=score", ["'eps'", "'x0'", "'v'"]),
    ("sample.sampler=plms", ["'ddpm'", "'ddim'", "'dpmpp-2m'"]),
    ("train.mixed_precision=fp8", ["'auto'", "'no'", "'bf16'", "'fp16'"]),
    ("data.source=cifar", ["'mnist'", "'digits'", "'folder'"]),
])
def test_literal_outside_its_choices(text, choices):
    with pytest.raises(ConfigError) as e:
        apply_overrides(RunConfig(), [text])
    msg = str(e.value)
    assert text.split("=")[0] in msg and "choose one of" in msg
    assert all(c in msg for c in choices), msg


@pytest.mark.parametrize("text", ["trainlr=1e-4", "train.lr", "lr=1e-4", "=1", ""])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_override(text)
    with pytest.raises(ConfigError):
        apply_overrides(RunConfig(), [text])


def test_config_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError)


# --- files ------------------------------------------------------------------------------------------------
def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    bad.write_text("train = 3\n")
    with pytest.raises(ConfigError, match=r"\[train\] must be a table"):
        load_config(bad)
    bad.write_text("[train]\nlr = 1e-4\nwarmup = 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.warmup'.*warmup_steps"):
        load_config(bad)
    bad.write_text('[schedule]\nkind = "quadratic"\n')
    with pytest.raises(ConfigError, match="schedule.kind = 'quadratic' is not valid; choose one of 'linear', 'cosine'"):
        load_config(bad)


# --- packaged configs by name ------------------------------------------------------------------------------------------
def test_the_repos_configs_folder_is_the_packaged_one():
    """configs/ at the root links to diffuse/configs, whose files pyproject ships as package data (a wheel holds them:
    `pip wheel . --no-deps`), so a README command `diffuse train configs/X.toml` and `diffuse train X` read one file."""
    import tomllib

    assert (ROOT / "configs").resolve() == PACKAGED.resolve()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["diffuse"]
    assert data == ["configs/*.toml"]
    assert packaged_configs() == sorted(p.stem for p in PACKAGED.glob("*.toml")) and "mnist_cond" in packaged_configs()


def test_a_bare_name_is_the_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository
    assert config_path("mnist_cond") == PACKAGED / "mnist_cond.toml" == config_path("mnist_cond.toml")
    assert load_config("mnist_cond") == load_config(PACKAGED / "mnist_cond.toml")
    (tmp_path / "mnist_cond").write_text("[train]\nlr = 0.5\n")  # a file of that name here wins
    assert load_config("mnist_cond").train.lr == 0.5


def test_an_unknown_name_lists_the_packaged_configs_and_the_closest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="config mnist_cnod not found: did you mean `mnist_cond`\\? pass a TOML "
                                                "file or the name of a packaged config: ae_mnist, ") as e:
        load_config("mnist_cnod")
    assert "mnist_flow" in str(e.value) and "`diffuse config show NAME`" in str(e.value)
    with pytest.raises(FileNotFoundError, match="config zzz not found: pass a TOML file"):
        load_config("zzz")
    with pytest.raises(FileNotFoundError, match="config file configs/mnist.toml not found; the packaged config of that "
                                                "name is `mnist`"):
        load_config("configs/mnist.toml")  # the README's path, run outside the repository
    (tmp_path / "runs" / "r").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="runs/r is a folder, not a config: pass a TOML file \\(a run folder's is "
                                                "runs/r/config.toml\\)"):
        load_config("runs/r")


def test_config_summary_is_the_first_comment_line():
    assert config_summary("mnist").startswith("An unconditional DDPM on the 5,000 bundled MNIST digits")
    assert all(len(config_summary(n)) <= 100 for n in packaged_configs())


# --- emptying a list from --set ----------------------------------------------------------------------------------------
def test_an_empty_list_override_switches_posthoc_ema_off():
    """`--set train.posthoc_ema=[]` on the demo config, which sets ema_snapshot_every = 100: the snapshot interval goes
    back to its default with the feature, so check_unused passes; given explicitly, it is still refused."""
    base = load_config("mnist_cond")
    assert base.train.posthoc_ema == [0.05, 0.10] and base.train.ema_snapshot_every == 100
    cfg = apply_overrides(base, ["train.posthoc_ema=[]"])
    assert cfg.train.posthoc_ema == [] and cfg.train.ema_snapshot_every == RunConfig().train.ema_snapshot_every
    check_unused(cfg)
    assert base.train.ema_snapshot_every == 100  # the base is not changed
    cfg = apply_overrides(base, ["train.posthoc_ema=[]", "train.ema_snapshot_every=50"])
    with pytest.raises(ConfigError, match="train.ema_snapshot_every = 50 is ignored because train.posthoc_ema is empty"):
        check_unused(cfg)
    assert apply_overrides(base, ["train.posthoc_ema=[0.07]"]).train.ema_snapshot_every == 100  # still used: kept
    assert apply_overrides(base, ["sample.guidance_interval=[]"]).sample.guidance_interval == []
    assert apply_overrides(base, ["train.condition_dropout={}"]).train.condition_dropout == {}


def test_a_setting_unused_in_the_file_itself_is_still_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nema_snapshot_every = 7\n")  # no posthoc_ema in the file: refused, not silently reset
    with pytest.raises(ConfigError, match="train.ema_snapshot_every = 7 is ignored"):
        check_unused(apply_overrides(load_config(path), ["train.lr=0.1"]))


def test_an_empty_value_names_the_empty_list():
    with pytest.raises(ConfigError, match=r"train.posthoc_ema must be a list of float, e.g. \[1, 2\] \(\[\] for none\), "
                                          "got ''"):
        apply_overrides(RunConfig(), ["train.posthoc_ema="])
