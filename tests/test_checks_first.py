"""Every check of a request or a config runs before any expensive work or any write (issue 38): a sampler the process
cannot run, a grid the schedule cannot make, a likelihood the process has not, a network that does not fit the
latents; each refused before a model loads, a progress bar starts, data are encoded or a file is written."""

from __future__ import annotations

import pytest

from diffuse import checkpoint as ckpt
from diffuse.app.cli import main
from diffuse.config import ConfigError, apply_overrides, load_config
from diffuse.kinds import check_config

from test_cli import TINY, _sets
from test_latent import AE, LDM


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("checks") / "flow"
    assert main(["train", "configs/mnist_cond.toml", *_sets(TINY), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def vp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("checks") / "vp"
    assert main(["train", "configs/mnist_cond_vp.toml", *_sets(TINY), "--out", str(out)]) == 0
    return out


@pytest.fixture
def no_loading(monkeypatch):
    """Loading any checkpoint fails the test: the command must have stopped before."""
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda *a, **k: pytest.fail("a checkpoint was loaded before the check"))


def _refused(capsys, args: list[str], *words: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffuse {args[0]}: error: ") and "%|" not in err, err  # its own line: no progress bar began
    for word in words:
        assert word in err, err
    return err


def test_a_sampler_the_process_cannot_run_is_refused_before_the_model_loads(flow_run, vp_run, tmp_path, capsys, no_loading):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "in.png")
    out = str(tmp_path / "x.png")
    for sampler in ("sde-em", "sde-pc", "ode-rk45"):
        _refused(capsys, ["sample", str(flow_run), "--n", "2", "--sampler", sampler, "--out", out],
                 f"{sampler} integrates the variance-preserving SDE", "process is flow")
    _refused(capsys, ["edit", "sdedit", str(flow_run), "--image", str(tmp_path / "in.png"), "--strength", "0.5",
                      "--sampler", "sde-pc", "--out", out], "sde-pc integrates the variance-preserving SDE")
    _refused(capsys, ["eval", str(flow_run), "--metric", "fid", "--n", "4", "--sampler", "sde-em"], "sde-em integrates")
    _refused(capsys, ["sample", str(vp_run), "--n", "2", "--steps", "5000", "--out", out], "T = 1000, got 5000")
    assert not (tmp_path / "x.png").exists()


def test_a_likelihood_the_process_has_not_is_refused_before_the_data_and_model_load(flow_run, capsys, no_loading,
                                                                                      monkeypatch):
    import diffuse.data

    monkeypatch.setattr(diffuse.data, "load_dataset", lambda *a, **k: pytest.fail("the data loaded before the check"))
    _refused(capsys, ["eval", str(flow_run), "--metric", "vlb", "--n", "4"],
             "--metric vlb) sums the T discrete steps", "flow process is continuous", "--metric fid")  # was a TypeError
    _refused(capsys, ["eval", str(flow_run), "--metric", "nll", "--n", "4"],
             "--metric nll) integrates the variance-preserving SDE", "--metric fid")


def test_the_likelihoods_refuse_a_process_they_do_not_cover():
    import torch

    from diffuse.denoiser import Denoiser
    from diffuse.likelihood import ode_bits_per_dim, vlb_bits_per_dim
    from diffuse.schedule import Flow, VPCosine

    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="flow process is continuous"):
        vlb_bits_per_dim(Denoiser(lambda x, t: x, Flow(), prediction="flow"), x)
    with pytest.raises(ValueError, match=r"vp_cosine process is continuous; use --metric nll"):
        vlb_bits_per_dim(Denoiser(lambda x, t: x, VPCosine(), prediction="eps"), x)
    with pytest.raises(ValueError, match="process is flow"):
        ode_bits_per_dim(Denoiser(lambda x, t: x, Flow(), prediction="flow"), x)


def test_the_page_checks_the_sampler_before_it_draws(flow_run):
    from diffuse.app.requests import SampleRequest, resolve

    with pytest.raises(ValueError, match="sde-em integrates the variance-preserving SDE"):  # the page resolves as the CLI
        resolve(SampleRequest(run=str(flow_run), sampler="sde-em"))


# --- training configs ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("checks") / "ae"
    assert main(["train", "configs/ae_mnist.toml", *_sets(AE), "--out", str(out)]) == 0
    return out


def test_a_latent_run_whose_network_does_not_fit_is_refused_before_encoding_or_writing(ae_run, tmp_path, capsys):
    """model.norm_groups = 3 does not divide the width 8: refused before the data are encoded into RUN/latents.safetensors
    (a 230 kB file in a new run folder) and before anything else is written."""
    run = tmp_path / "ldm"
    err = _refused(capsys, ["train", "configs/ldm_mnist.toml", *_sets(LDM), "--set", f"latent.autoencoder={ae_run}",
                            "--set", "model.norm_groups=3", "--out", str(run)], "model.norm_groups = 3")
    assert not run.exists(), sorted(p.name for p in run.iterdir())
    cfg = apply_overrides(load_config("configs/ldm_mnist.toml"), LDM + [f"latent.autoencoder={ae_run}", "model.norm_groups=3"])
    with pytest.raises(ValueError, match="model.norm_groups = 3 must divide"):
        check_config(cfg)
    assert "must divide" in err
    cfg = apply_overrides(cfg, ["latent.autoencoder=" + str(tmp_path / "none"), "model.norm_groups=4"])
    with pytest.raises(FileNotFoundError, match="latent.autoencoder = .*holds no run"):
        check_config(cfg)
    with pytest.raises(ConfigError, match="data.path"):  # check_unused is part of it
        check_config(apply_overrides(load_config("configs/mnist.toml"), ["data.path=x"]))


def test_the_trainer_checks_the_config_before_encoding_latents(ae_run, tmp_path):
    from diffuse.train import Trainer

    cfg = apply_overrides(load_config("configs/ldm_mnist.toml"), LDM + [f"latent.autoencoder={ae_run}", "model.norm_groups=3"])
    with pytest.raises(ValueError, match="model.norm_groups = 3"):
        Trainer(cfg, tmp_path / "ldm", progress=False)
    assert not (tmp_path / "ldm").exists()
