"""Bad values and silent settings, replayed from bugs reported against other diffusion toolkits: every numeric
option is checked when parsed, no command writes non-finite samples, 0 means the same everywhere, settings that
would do nothing are refused, training stops at the first non-finite gradient, and a mostly-initial EMA is named."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse import Denoiser, Schedule
from diffuse.app.cli import main
from diffuse.samplers import NonFiniteSample
from diffuse.generate import generate
from diffuse.runs import ema_init_share

from test_cli import TINY, _sets


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "run"
    assert main(["train", "configs/mnist.toml", *_sets(TINY), "--set", "schedule.T=50", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_cond") / "run"
    assert main(["train", "configs/mnist_cond.toml", *_sets(TINY), "--set", "sample.steps=3", "--out", str(out)]) == 0
    return out


def _parse_error(argv, capsys) -> str:
    """argparse's own errors exit with status 2; the message is on stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# --- 4. option values: checked when parsed ---------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--eta", "nan"), ("--eta", "inf"), ("--eta", "-1"), ("--eta", "abc"),
                                        ("--guidance", "inf"), ("--guidance", "nan"), ("--n", "0"), ("--n", "2.5"),
                                        ("--steps", "-1"), ("--seed", "-3"), ("--label", "-1"),
                                        ("--guidance-interval", "5,1"), ("--guidance-interval", "nan,1"),
                                        ("--guidance-interval", "1"), ("--guidance-interval", "a,b"),
                                        ("--batch-size", "0")])
def test_sample_refuses_bad_numbers_when_parsed(run, tmp_path, capsys, flag, value):
    err = _parse_error(["sample", str(run), flag, value, "--out", str(tmp_path / "x.png")], capsys)
    assert f"diffuse sample: error: argument {flag}" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("sampler,opt,rule", [("heun", "s_noise=abc", "s_noise must be a finite number >= 0"),
                                              ("ode-rk45", "rtol=abc", "rtol must be a finite number > 0"),
                                              ("ode-rk45", "rtol=nan", "rtol must be a finite number > 0"),
                                              ("sde-pc", "snr=nan", "snr must be a finite number > 0"),
                                              ("sde-pc", "corrector_steps=1.5", "corrector_steps must be an integer"),
                                              ("ddpm", "variance=wide", "variance must be one of beta_tilde, beta"),
                                              ("dpmpp-3m", "reference_3m=maybe", "reference_3m must be true or false")])
def test_sampler_options_are_checked_with_a_message(run, tmp_path, capsys, sampler, opt, rule):
    assert main(["sample", str(run), "--sampler", sampler, "--opt", opt, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffuse sample: error: --opt '{opt}': {rule}") and "e.g." in err
    assert not (tmp_path / "x.png").exists()


def test_good_options_parse_to_their_types(run, tmp_path):
    from diffuse.app.requests import parse_options

    assert parse_options(["s_tmax=inf", "s_churn=10"], "heun") == {"s_tmax": math.inf, "s_churn": 10.0}
    assert parse_options(["reference_3m=false"], "dpmpp-3m") == {"reference_3m": False}
    assert parse_options(["corrector_steps=2"], "sde-pc") == {"corrector_steps": 2}
    assert main(["sample", str(run), "--n", "2", "--sampler", "dpmpp-3m", "--opt", "reference_3m=false",
                 "--out", str(tmp_path / "r.npy")]) == 0


def test_eval_and_demo_refuse_bad_numbers(run, capsys):
    assert "argument --rtol" in _parse_error(["eval", str(run), "--metric", "nll", "--rtol", "nan"], capsys)
    assert "argument --n" in _parse_error(["eval", str(run), "--metric", "fid", "--n", "1"], capsys)
    assert "argument --time-limit" in _parse_error(["demo", "--time-limit", "inf"], capsys)


@pytest.mark.parametrize("argv,message", [
    (["sample", "RUN", "--eta", "1e200"], "argument --eta: must be <= 100"),
    (["sample", "RUN", "--device", "foo"], "argument --device: 'foo' is not a device"),
])
def test_huge_values_and_bad_devices_fail_when_parsed(run, capsys, argv, message):
    argv = [str(run) if a == "RUN" else a for a in argv]
    assert message in _parse_error([*argv, "--out", "x.png"], capsys)


@pytest.mark.parametrize("argv,message", [
    (["sample", "RUN", "--sampler", "ddim", "--opt", "eta=1e308"], "eta must be a finite number >= 0 and <= 100"),
    (["sample", "RUN", "--sampler", "sde-pc", "--opt", "snr=1e300"], "snr must be a finite number > 0 and <= 10"),
    (["sample", "RUN", "--sampler", "ode-rk45", "--steps", "10"], "--steps does nothing here: ode-rk45 chooses its own steps"),
    (["eval", "RUN", "--metric", "nll", "--sampler", "ddim"], "--sampler does nothing here: --metric nll measures real images"),
    (["eval", "RUN", "--metric", "fid", "--rtol", "1e-3"], "--rtol does nothing here: only --metric nll solves an ODE"),
    (["eval", "RUN", "--metric", "fid", "--vlb-samples", "3"], "--vlb-samples does nothing here"),
    (["eval", "RUN", "--metric", "fid", "--guidance", "2"], "classifier-free guidance, which needs a class-conditional model"),
])
def test_flags_that_would_do_nothing_or_overflow_are_refused(run, tmp_path, capsys, argv, message):
    argv = [str(run) if a == "RUN" else a for a in argv]
    out = ["--out", str(tmp_path / "x.png")] if argv[0] == "sample" else []
    assert main([*argv, *out]) == 2
    assert message in capsys.readouterr().err


def test_an_output_path_that_is_a_folder_is_refused(run, tmp_path, capsys):
    (tmp_path / "x.png").mkdir()
    assert main(["sample", str(run), "--n", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "is a folder; name a file in it" in capsys.readouterr().err


# --- 4. no command writes non-finite samples ---------------------------------------------------------------
def test_non_finite_samples_stop_with_the_step(cond_run, tmp_path, capsys):
    """A guidance weight that overflows (finite, so it parses) stops sampling at the first step, naming the weight as
    the cause (issue 38: it was blamed on the run's weights) and where, on a line of its own."""
    out = tmp_path / "x.npy"
    assert main(["sample", str(cond_run), "--n", "2", "--sampler", "ddim", "--steps", "3", "--guidance", "1e308",
                 "--guidance-interval", "all", "--no-clip", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "\ndiffuse sample: error: classifier-free guidance with weight w = 1e+308 overflowed at t = 0.9939: " in err, err  # the flow grid's top
    assert "lower the guidance weight (--guidance" in err and "run's weights" not in err
    assert not out.exists()


@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmpp-2m", "ode-rk45"])
def test_a_network_that_goes_nan_is_caught_where_it_happens(sampler):
    s = Schedule.linear(T=100)

    def net(x, index):  # NaN below step 50 (t < 0.5)
        return torch.where(index.view(-1, 1, 1, 1) < 49, torch.full_like(x, math.nan), 0.1 * x)

    with pytest.raises(NonFiniteSample, match=r"non-finite (at step \d+ of 10|values at t = 0\.\d+)"):
        generate(Denoiser(net, s), 4, (1, 2, 2), sampler=sampler, steps=10, clip=False)


def test_a_misspelt_argument_of_generate_is_refused_not_dropped():
    """generate passes unknown keywords on as sampler options; another sampler's option is dropped (config defaults go
    to any sampler), but a name that is no option (here guidance_interval misspelt) raises, naming the options."""
    den = Denoiser(lambda x, index: 0.1 * x, Schedule.linear(T=100))
    with pytest.raises(ValueError, match=r"unknown sampler option\(s\) 'interval'; the options are eta, variance"):
        generate(den, 2, (1, 2, 2), steps=3, guidance_interval=None, interval=(0.2, 3.0))
    a = generate(den, 2, (1, 2, 2), sampler="dpmpp-2m", steps=3, eta=1.0, s_churn=10.0)  # not dpmpp-2m's: dropped
    torch.testing.assert_close(a, generate(den, 2, (1, 2, 2), sampler="dpmpp-2m", steps=3))


# --- 1. grids that do not start at the top are named ---------------------------------------------------------
def test_a_leading_grid_below_the_top_warns(run, tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"the leading grid of 1 step\(s\) starts at step 1 of 50, not at the top \(50\)"):
        assert main(["sample", str(run), "--n", "2", "--steps", "1", "--spacing", "leading", "--out", str(tmp_path / "a.npy")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default, trailing, starts at the top: no warning
        assert main(["sample", str(run), "--n", "2", "--steps", "1", "--out", str(tmp_path / "b.npy")]) == 0


def test_the_command_prints_warnings_in_its_own_voice(run, tmp_path):
    """Outside pytest's warning capture: `diffuse sample: warning: ...` on stderr, exit 0."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "diffuse", "sample", str(run), "--n", "2", "--steps", "1", "--spacing",
                           "leading", "--out", str(tmp_path / "a.npy")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    assert "diffuse sample: warning: the leading grid of 1 step(s) starts at step 1 of 50" in done.stderr
    assert "UserWarning" not in done.stderr


# --- 2, 3, 5: eval at small n, counts that differ, --steps 0 ------------------------------------------------------
def _record(run) -> dict:
    return json.loads((run / "eval.json").read_text())[-1]


def test_kid_has_a_real_spread_at_small_n(run):
    assert main(["eval", str(run), "--metric", "kid", "--n", "50", "--steps", "2"]) == 0
    r = _record(run)
    assert r["kid_subset_size"] == 25 and r["kid_std"] > 1e-4 * max(abs(r["kid"]), 1e-3)


def test_kid_subsets_are_smaller_than_the_sets():
    from diffuse.metrics import kid_from_features, kid_subset_size

    assert kid_subset_size(5000, 5000) == 1000 and kid_subset_size(1000, 1200) == 500 and kid_subset_size(50, 80) == 25
    assert kid_subset_size(1500, 1500) == 750  # not 1000 of 1500: subsets that large barely differ
    f = torch.randn(50, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean, std = kid_from_features(f, f + 0.5)
    assert std > 0.01 * abs(mean)  # was 3.4e-16 with subsets of the whole set
    with pytest.raises(ValueError, match="at least 4 images"):
        kid_subset_size(3, 100)


def test_inception_score_and_other_metrics_refuse_too_few_images(run, capsys):
    from diffuse.metrics import inception_score

    assert main(["eval", str(run), "--metric", "is", "--n", "5"]) == 2
    assert "--metric is needs --n 20 or more, got 5" in capsys.readouterr().err
    assert main(["eval", str(run), "--metric", "kid", "--n", "3"]) == 2
    assert "--metric kid needs --n 4 or more" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs at least 20 images"):
        inception_score(torch.zeros(5, 1, 8, 8), torch.nn.Flatten())


def test_eval_steps_zero_means_every_step(run):
    """--steps 0 is every step, as in `diffuse sample`: the same samples, and FID, as --steps T (T = 50 here)."""
    fids = []
    for steps in ("0", "50", "5"):
        assert main(["eval", str(run), "--metric", "fid", "--n", "8", "--sampler", "ddpm", "--steps", steps]) == 0
        fids.append(_record(run))
    assert fids[0]["steps"] == fids[1]["steps"] == 50 and fids[0]["fid"] == fids[1]["fid"] != fids[2]["fid"]


def test_eval_records_and_warns_about_unequal_counts(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(folder / f"{i}.png")
    out = tmp_path / "run"
    assert main(["train", "configs/mnist.toml", *_sets(TINY), "--set", "data.source=folder",
                 "--set", f"data.path={folder}", "--out", str(out)]) == 0
    with pytest.warns(UserWarning, match="the run's dataset has 20 images, fewer than --n 40: the metric compares 20 real"):
        assert main(["eval", str(out), "--metric", "fid", "--n", "40", "--steps", "2"]) == 0
    r = _record(out)
    assert (r["n"], r["n_real"], r["n_fake"]) == (40, 20, 40)


# --- 6. settings that would do nothing ---------------------------------------------------------------------------
@pytest.mark.parametrize("sets,message", [
    (["data.source=mnist", "data.path=my_images"], 'data.path = \'my_images\' is ignored because data.source = "mnist" trains on the bundled '
                              'mnist images; set data.source = "folder"'),
    (["schedule.kind=cosine", "schedule.beta_end=0.01"], "schedule.beta_end = 0.01 is ignored because schedule.kind"),
    (["schedule.cosine_s=0.02"], 'schedule.cosine_s = 0.02 is ignored because schedule.kind = "linear"'),
    (["train.loss_weighting=none", "train.min_snr_gamma=3"], "train.min_snr_gamma = 3.0 is ignored"),
    (["train.vlb_lambda=0.01"], 'train.vlb_lambda = 0.01 is ignored because train.loss = "simple"'),
    (["model.learned_variance=true", "model.prediction=eps"], 'model.learned_variance = True is ignored because train.loss = "simple"'),
    (["sample.sampler=dpmpp-2m", "sample.eta=1.0"], 'sample.eta = 1.0 is ignored because sample.sampler = "dpmpp-2m" takes no eta'),
    (["model.prediction=eps", "train.loss=vlb"], 'train.loss_weighting = \'min_snr\' is ignored because train.loss = "vlb"'),
    (["train.num_workers=2"], "train.num_workers = 2 is ignored because the images are decoded once"),
    (["sample.dynamic_threshold=0.995", "sample.clip=false"], "sample.clip = False is ignored because sample.dynamic_threshold > 0"),
    (["schedule.kind=cosine", "sample.steps=1000"], "sample.steps = 1000 is more than the schedule's 996 sampling steps"),
    (["sample.sampler=ddim", "sample.eta=-1"], "sample.eta must be a finite number >= 0"),
])
def test_settings_that_would_do_nothing_are_refused(tmp_path, capsys, sets, message):
    assert main(["train", "configs/mnist.toml", *_sets(TINY + sets), "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything was written


# --- 7. non-finite gradients stop training; checkpoints hold finite weights ---------------------------------------
def test_an_exploding_learning_rate_stops_at_the_first_non_finite_gradient(tmp_path, capsys):
    from diffuse import checkpoint as ckpt

    out = tmp_path / "r"
    assert main(["train", "configs/mnist.toml", *_sets(TINY), "--set", "train.lr=1e12", "--set", "train.warmup_steps=0",
                 "--set", "train.steps=20", "--set", "train.checkpoint_every=1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    # step 1 moves every weight by ~lr = 1e12 (finite); step 2's gradient is infinite and is not applied
    assert "diffuse train: error: the gradient norm became inf at step 2" in err and "the step was not applied" in err
    assert "the last checkpoint (step 1)" in err and "has finite weights but is likely diverged too (largest |w| = 1e+12" in err
    assert "good" not in err  # a checkpoint of weights 1e12 is not called good
    assert ckpt.latest_step(out) == 1  # nothing after the non-finite step
    c = ckpt.load_checkpoint(out, 1)
    assert all(bool(torch.isfinite(v).all()) for part in ("model", "ema") for v in c.tensors[part].values())


def test_a_checkpoint_with_nan_weights_is_never_written(tmp_path):
    """Any NaN in the weights or their EMA (not only in the first tensor) stops the save."""
    from diffuse.config import apply_overrides, load_config
    from diffuse.train import NonFiniteLoss, Trainer

    trainer = Trainer(apply_overrides(load_config("configs/mnist.toml"), TINY), tmp_path / "r", progress=False)
    last = list(trainer.ema.model.parameters())[-1]
    with torch.no_grad():
        last[0] = math.nan
    with pytest.raises(NonFiniteLoss, match="the weights became non-finite by step 0, so no checkpoint was written"):
        trainer.save()
    assert not (tmp_path / "r" / "checkpoints").exists() or not any((tmp_path / "r" / "checkpoints").iterdir())


# --- 8. an EMA that is mostly the initial weights -----------------------------------------------------------------
def test_ema_share_of_the_initial_weights():
    assert ema_init_share(0.9999, False, 10_000) == pytest.approx(0.9999**10_000)  # 0.368: DDPM after 10k steps
    assert ema_init_share(0.999, True, 3) == pytest.approx(1 / 10 * 2 / 11 * 3 / 12)  # warm-up: prod (1 + n) / (10 + n)
    assert ema_init_share(0.9999, True, 10_000) < 1e-20


def test_sample_and_eval_warn_about_an_ema_of_the_initial_weights(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "configs/mnist.toml", *_sets(TINY), "--set", "train.ema_warmup=false",
                 "--set", "train.ema_decay=0.9999", "--out", str(out)]) == 0
    expected = r"the EMA weights of .* still hold 100% of the random initial weights.*--no-ema.*falls below 1% at step 46,050"
    with pytest.warns(UserWarning, match=expected):
        assert main(["sample", str(out), "--n", "2", "--out", str(tmp_path / "a.npy")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["sample", str(out), "--n", "2", "--no-ema", "--out", str(tmp_path / "b.npy")]) == 0
    with pytest.warns(UserWarning, match=expected):
        assert main(["eval", str(out), "--metric", "fid", "--n", "4", "--steps", "2"]) == 0
