"""Latent diffusion in runs (kinds/autoencoder.py, stages.py): the autoencoder run (training, exact resume, eval), the scaled latent space
(encode/decode, masks), latent-diffusion training on cached latents, and sampling and editing through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse import checkpoint as ckpt
from diffuse.nets.autoencoder import Autoencoder, AutoencoderConfig
from diffuse.app.cli import main
from diffuse.config import ConfigError, RunConfig, apply_overrides, load_config, save_config
from diffuse.data import load_dataset
from diffuse.kinds.autoencoder import held_out, reconstruction_scores
from diffuse.runs import evaluate_autoencoder
from diffuse.stages import diffusion_shape, LatentSpace, load_autoencoder, space
from diffuse.train import feature_network
from diffuse.generate import generate
from diffuse.runs import load_run
from diffuse.kinds.diffusion import sample_config_kwargs
from diffuse.train import ResumeError, Trainer, train

AE = ["data.source=digits", "data.image_size=8", "data.channels=1", "model.kind=autoencoder",
      "autoencoder.channels=[8, 16]", "autoencoder.latent_channels=2", "autoencoder.num_res_blocks=1",
      "autoencoder.norm_groups=4", "autoencoder.disc_start=3", "autoencoder.disc_channels=8", "autoencoder.disc_layers=1",
      "train.batch_size=16", "train.steps=6", "train.lr=1e-3", "train.warmup_steps=2", "train.log_every=2",
      "train.sample_every=0", "train.checkpoint_every=1000"]
LDM = ["data.source=digits", "data.image_size=8", "data.channels=1",
       "model.channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1", "model.norm_groups=4",
       "model.attention_resolutions=[]", "model.class_conditional=true", "model.dropout=0",
       "train.condition_dropout={label = 0.1}", "train.batch_size=16", "train.steps=4", "train.lr=1e-3",
       "train.warmup_steps=0", "train.log_every=1000", "train.sample_every=0", "train.checkpoint_every=1000",
       "schedule.kind=flow", "model.prediction=flow", "sample.sampler=dpmpp-2m", "sample.steps=3", "sample.n=4"]


def ae_cfg(*overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(), AE + list(overrides))


def ldm_cfg(ae_run, *overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(), LDM + [f"latent.autoencoder={ae_run}", *overrides])


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ae") / "run"
    train(ae_cfg(), run, progress=False)
    return run


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory, ae_run):
    run = tmp_path_factory.mktemp("ldm") / "run"
    train(ldm_cfg(ae_run), run, progress=False)
    return run


# --- the autoencoder run -------------------------------------------------------------------------------------
def test_held_out_split_is_every_tenth_image():
    train_idx, test_idx = held_out(1797)
    assert len(test_idx) == 179 and test_idx[:3].tolist() == [9, 19, 29] and len(train_idx) + len(test_idx) == 1797
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    assert held_out(5)[1].tolist() == [4]
    # data in class order (the bundled MNIST: 500 of each digit in turn) give every class to both parts
    labels = torch.arange(5000) // 500
    train_idx, test_idx = held_out(5000)
    assert torch.bincount(labels[test_idx]).tolist() == [50] * 10 and torch.bincount(labels[train_idx]).tolist() == [450] * 10
    with pytest.raises(ValueError, match="at least 2 images"):
        held_out(1)


def test_autoencoder_run_trains_logs_and_never_sees_the_held_out_images(ae_run):
    log = [json.loads(line) for line in (ae_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert all(r["psnr"] > 0 and "kl" in r for r in log)
    assert "disc_loss" in log[-1] and "disc_loss" not in log[0]  # the GAN switches on at disc_start = 3
    trainer = Trainer(ae_cfg(), ae_run.parent / "probe", progress=False)
    seen = torch.cat([trainer.dataset.idx[trainer.global_batch_indices(s)] for s in range(200)])  # indices of the images
    assert not set(seen.tolist()) & set(trainer.objective.test_idx.tolist())  # no held-out image is ever drawn


def test_autoencoder_resume_is_exact(tmp_path, ae_run):
    straight = load_autoencoder(ae_run)[1].state_dict()
    cut = tmp_path / "cut"
    train(ae_cfg("train.steps=3"), cut, progress=False)
    train(ae_cfg(), cut, progress=False)
    resumed = load_autoencoder(cut)[1].state_dict()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_evaluate_autoencoder_scores_reconstructions(ae_run):
    record = evaluate_autoencoder(ae_run)
    _, ae = load_autoencoder(ae_run)
    assert record["n_held_out"] == 179 and record["latent_shape"] == [2, 4, 4]
    assert 0 < record["psnr"] < 60 and record["rfid"] >= 0
    assert record["latent_scale_factor"] == pytest.approx(1 / record["latent_std"], rel=1e-3)


def test_vq_run_reports_codebook_usage(tmp_path):
    run = tmp_path / "vq"
    train(ae_cfg("autoencoder.kind=vq", "autoencoder.codebook_size=16"), run, progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(0 < r["usage"] <= 1 and 1 <= r["perplexity"] <= 16 for r in log)
    assert main(["eval", str(run)]) == 0
    record = json.loads((run / "eval.json").read_text())[-1]
    assert 0 < record["codebook_usage"] <= 1 and record["codebook_size"] == 16 and record["metric"] == "reconstruction"


def test_held_out_scores_are_logged_every_fid_every_steps(tmp_path):
    run = tmp_path / "vq"
    train(ae_cfg("autoencoder.kind=vq", "autoencoder.codebook_size=16", "train.fid_every=3", "train.fid_samples=50"), run,
          progress=False)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    held = [r for r in rows if "held_out" in r]
    assert [r["step"] for r in held] == [3, 6] and [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    _, ae = load_autoencoder(run)  # step 6: the logged scores are the held-out scores of these weights
    x, _ = load_dataset(load_config(run / "config.toml").data).batch(held_out(1797)[1][:50])
    want = reconstruction_scores(ae, x, feature_network("digits"))
    assert held[-1]["held_out"]["n_held_out"] == 50
    for key in ("psnr", "rfid", "codebook_usage", "perplexity", "latent_std"):
        assert held[-1]["held_out"][key] == pytest.approx(want[key], rel=1e-6), key
    with pytest.raises(ValueError, match="fid_features = 'digits' is the feature space of 1-channel digits"):
        train(ae_cfg("train.fid_every=3", "data.channels=3"), tmp_path / "rgb", progress=False)
    with pytest.raises(ConfigError, match="train.fid_steps"):
        train(ae_cfg("train.fid_every=3", "train.fid_steps=5"), tmp_path / "steps", progress=False)


# --- the latent space ----------------------------------------------------------------------------------------
def test_latent_space_scales_and_round_trips():
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(channels=[8, 16], latent_channels=2, num_res_blocks=1, norm_groups=4), 1).eval()
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    one, scaled = LatentSpace(ae, 1.0, 1, 8), LatentSpace(ae, 0.3, 1, 8)
    assert one.shape == (2, 4, 4)
    torch.testing.assert_close(scaled.encode(x), 0.3 * one.encode(x))  # z = s E(x)
    torch.testing.assert_close(scaled.decode(scaled.encode(x)), one.decode(one.encode(x)))  # D(z / s): s cancels
    with torch.no_grad():
        torch.testing.assert_close(one.decode(one.encode(x)), ae.decode(ae.encode(x)).clamp(-1, 1))
    with pytest.raises(ValueError, match="images of shape"):
        one.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="scale_factor"):
        LatentSpace(ae, float("nan"), 1, 8)


def test_latent_mask_keeps_only_wholly_kept_cells():
    ae = Autoencoder(AutoencoderConfig(channels=[8, 16, 16], latent_channels=2, num_res_blocks=1, norm_groups=4), 1)
    s = LatentSpace(ae, 1.0, 1, 8)  # f = 4: a 2 x 2 latent
    mask = torch.ones(8, 8)
    mask[5, 1] = 0  # one pixel to generate in the bottom-left cell
    want = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert torch.equal(s.mask(mask)[0, 0], want)
    assert s.mask(mask[None, None]).shape == (1, 1, 2, 2)


# --- latent diffusion -----------------------------------------------------------------------------------------
def test_latent_run_trains_on_unit_variance_cached_latents(ldm_run, ae_run):
    cfg = load_config(ldm_run / "config.toml")
    assert cfg.latent.autoencoder == str(ae_run.resolve()) and cfg.sample.clip is False
    from safetensors.torch import load_file

    z = load_file(ldm_run / "latents.safetensors")["latents"]  # the unscaled E(x) of all 1,797 digits
    assert z.shape == (1797, 2, 4, 4)
    assert float((cfg.latent.scale_factor * z).double().std(correction=0)) == pytest.approx(1.0, abs=1e-6)
    assert diffusion_shape(cfg) == (2, 4, 4)
    _, den, _ = load_run(ldm_run)
    assert den.net.in_channels == 2 and den.net.image_size == 4


def test_latent_run_resumes_with_its_relative_config(tmp_path, ae_run, monkeypatch):
    monkeypatch.chdir(ae_run.parent)
    run = tmp_path / "ldm"
    train(ldm_cfg("run", "train.steps=2"), run, progress=False)  # "run": ae_run relative to the working directory
    first = load_config(run / "config.toml").latent.scale_factor
    train(ldm_cfg("run", "train.steps=4"), run, progress=False)  # the same config: resumes, no ResumeError
    assert ckpt.latest_step(run) == 4 and load_config(run / "config.toml").latent.scale_factor == first


def test_latent_run_pins_its_autoencoder_checkpoint(tmp_path):
    # the latent model decodes with the autoencoder it was trained on, not one trained on since (whose latents differ)
    ae = tmp_path / "ae"
    train(ae_cfg(), ae, progress=False)
    run = tmp_path / "ldm"
    train(ldm_cfg(ae), run, progress=False)
    assert load_config(run / "config.toml").latent.autoencoder_step == 6
    train(ae_cfg("train.steps=10", "train.checkpoint_every=2", "train.keep_checkpoints=10"), ae, progress=False)
    assert ckpt.latest_step(ae) == 10
    pinned = space(load_config(run / "config.toml")).autoencoder.state_dict()
    for k, v in ckpt.load_checkpoint(ae, 6).tensors["model"].items():
        torch.testing.assert_close(pinned[k], v)  # step 6's weights, although step 10 is newer
    assert any(not torch.equal(pinned[k], v) for k, v in ckpt.load_checkpoint(ae).tensors["model"].items())
    train(ldm_cfg(ae, "train.steps=6"), run, progress=False)  # a plain resume keeps the pin
    assert ckpt.latest_step(run) == 6 and load_config(run / "config.toml").latent.autoencoder_step == 6
    with pytest.raises(ResumeError, match="autoencoder_step"):  # resuming on another autoencoder step is refused
        train(ldm_cfg(ae, "train.steps=8", "latent.autoencoder_step=10"), run, progress=False)
    train(ae_cfg("train.steps=12", "train.keep_checkpoints=1"), ae, progress=False)  # trains on; step 6 is pruned
    with pytest.raises(FileNotFoundError, match=r"no longer holds checkpoint 6 \(it holds \[12\].*train the latent model again"):
        space(load_config(run / "config.toml"))


def test_a_latent_denoiser_is_never_clipped_by_default(ldm_run):
    # the library's own default (generate's clip) follows the data: images are clipped to [-1, 1], latents are not
    cfg, den, _ = load_run(ldm_run)
    assert den.bounded is False
    s, kw = space(cfg), dict(sampler="ddim", steps=3, labels=torch.arange(2), seed=2)
    default = generate(den, 2, s.shape, **kw)
    torch.testing.assert_close(default, generate(den, 2, s.shape, clip=False, **kw), atol=0, rtol=0)
    for bad in (dict(clip=True), dict(dynamic_threshold=0.99)):
        with pytest.raises(ValueError, match="no such range; pass clip=False and dynamic_threshold=0"):
            generate(den, 2, s.shape, **bad, **kw)


def test_offset_noise_is_drawn_per_latent_channel(tmp_path):
    # a latent run's eps has the latent's channels: 3-channel shapes, 2-channel latents (an offset of the data's 3
    # channels would not even broadcast)
    rgb = ["data.source=shapes", "data.crops=32", "data.image_size=16", "data.channels=3"]
    train(ae_cfg(*rgb, "autoencoder.disc_weight=0", "train.steps=2"), tmp_path / "ae", progress=False)
    train(ldm_cfg(tmp_path / "ae", *rgb, "model.class_conditional=false", "train.condition_dropout={}",
                  "train.offset_noise=0.1", "train.steps=2"), tmp_path / "ldm", progress=False)
    assert ckpt.latest_step(tmp_path / "ldm") == 2


def test_uncached_latents_scale_to_unit_variance_of_posterior_samples(tmp_path, ae_run):
    # latent.cache = false trains on posterior samples mu + sigma eps, so the scale is 1 / their std (LDM app. D.1),
    # not 1 / std(mu)
    run = tmp_path / "ldm"
    train(ldm_cfg(ae_run, "latent.cache=false", "train.steps=1"), run, progress=False)
    s = load_config(run / "config.toml").latent.scale_factor
    _, ae = load_autoencoder(ae_run)
    x, _ = load_dataset(load_config(run / "config.toml").data).batch(torch.arange(1797))
    with torch.no_grad():
        q = ae.posterior(x)
    var = q.mean.double().var(correction=0) + q.std.double().pow(2).mean()  # var(mu + sigma eps) over the data
    assert s == pytest.approx(float(var.rsqrt()), rel=0.01)
    assert s < 1 / float(q.mean.double().std())  # smaller than the modes' scale: the posterior's own variance counts


def test_cli_samples_are_the_decoded_latents(ldm_run, tmp_path):
    out = tmp_path / "x.npy"
    assert main(["sample", str(ldm_run), "--n", "3", "--seed", "5", "--out", str(out)]) == 0
    import numpy as np

    x = torch.from_numpy(np.load(out))
    assert x.shape == (3, 1, 8, 8)
    cfg, den, _ = load_run(ldm_run)
    s = space(cfg)
    z = generate(den, 3, s.shape, **sample_config_kwargs(cfg.sample), labels=torch.arange(3), seed=5)
    torch.testing.assert_close(x, (s.decode(z) + 1) / 2, atol=1e-5, rtol=0)


def test_latent_inpainting_returns_the_kept_pixels_exactly(ldm_run, tmp_path):
    image = (torch.rand(8, 8) * 255).to(torch.uint8).numpy()
    Image.fromarray(image, "L").save(tmp_path / "in.png")
    mask = torch.zeros(8, 8, dtype=torch.uint8)
    mask[:, 4:] = 255  # generate the right half
    Image.fromarray(mask.numpy(), "L").save(tmp_path / "mask.png")
    out = tmp_path / "out.npy"
    assert main(["edit", "inpaint", str(ldm_run), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--n", "2", "--out", str(out)]) == 0
    import numpy as np

    x = np.load(out)
    assert np.abs(x[:, 0, :, :4] * 255 - image[:, :4]).max() < 0.51  # kept pixels, up to 8-bit rounding
    assert main(["edit", "sdedit", str(ldm_run), "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--n", "2",
                 "--out", str(tmp_path / "sd.png")]) == 0


def test_latent_ilvr_takes_factors_over_latent_cells(ldm_run, tmp_path, capsys):
    Image.fromarray((torch.rand(8, 8) * 255).to(torch.uint8).numpy(), "L").save(tmp_path / "ref.png")
    edit = ["edit", "ilvr", str(ldm_run), "--reference", str(tmp_path / "ref.png"), "--n", "2"]
    assert main(edit + ["--factor", "4", "--out", str(tmp_path / "a.png")]) == 0  # f = 2: a factor of 2 latent cells
    assert main(edit + ["--factor", "1", "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert "ILVR factor 1: " in err and "multiple of its downsampling f = 2" in err and "(e.g. 2, 4, 8)" in err
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("process", [["schedule.kind=linear", "model.prediction=eps"],
                                     ["schedule.kind=edm", "model.prediction=edm", "sample.spacing=karras"]])
def test_vp_and_edm_processes_run_on_latents(tmp_path, ae_run, process):
    # the process is the denoiser's business: VP (discrete, eps) and EDM (sigma, preconditioned) train and sample on
    # latents as flow does, the CLI's samples being the decoded latents of the library's generate, never clipped
    run = tmp_path / "ldm"
    train(ldm_cfg(ae_run, *process), run, progress=False)
    out = tmp_path / "x.npy"
    assert main(["sample", str(run), "--n", "2", "--seed", "3", "--out", str(out)]) == 0
    import numpy as np

    cfg, den, _ = load_run(run)
    assert cfg.sample.clip is False and cfg.schedule.kind == process[0].split("=")[1]
    s = space(cfg)
    z = generate(den, 2, s.shape, **sample_config_kwargs(cfg.sample), labels=torch.arange(2), seed=3)
    torch.testing.assert_close(torch.from_numpy(np.load(out)), (s.decode(z) + 1) / 2, atol=1e-5, rtol=0)


def test_classifier_guidance_on_latents_needs_a_classifier_of_the_same_latents(tmp_path, ae_run, ldm_run, capsys):
    cls = ["data.source=digits", "data.image_size=8", "model.kind=classifier", "model.channels=8", "model.channel_mult=[1]",
           "model.num_res_blocks=1", "model.norm_groups=4", "model.attention_resolutions=[]", "train.steps=2",
           "train.batch_size=8", "schedule.kind=flow", "train.sample_every=0", "train.log_every=1000"]
    train(apply_overrides(RunConfig(), cls), tmp_path / "pixels", progress=False)
    train(apply_overrides(RunConfig(), cls + [f"latent.autoencoder={ae_run}"]), tmp_path / "latents", progress=False)
    sample = ["sample", str(ldm_run), "--label", "3", "--n", "2", "--seed", "1"]
    assert main(sample + ["--guidance", "2", "--classifier", str(tmp_path / "pixels"), "--out", str(tmp_path / "a.npy")]) == 2
    err = capsys.readouterr().err
    assert "was trained on pixels of shape (1, 8, 8), but this run diffuses latents of" in err
    assert "train it with --set latent.autoencoder=" in err and not (tmp_path / "a.npy").exists()
    assert main(sample + ["--guidance", "2", "--classifier", str(tmp_path / "latents"), "--out", str(tmp_path / "b.npy")]) == 0
    assert main(sample + ["--guidance", "0", "--out", str(tmp_path / "c.npy")]) == 0
    import numpy as np

    assert not np.array_equal(np.load(tmp_path / "b.npy"), np.load(tmp_path / "c.npy"))  # the classifier's gradient moved them


def test_latent_eval_fid_decodes(ldm_run):
    assert main(["eval", str(ldm_run), "--metric", "fid", "--n", "20"]) == 0
    record = json.loads((ldm_run / "eval.json").read_text())[-1]
    assert record["fid"] >= 0 and record["n_fake"] == 20


# --- bad input ------------------------------------------------------------------------------------------------------
def test_latent_config_errors(tmp_path, ae_run, capsys):
    with pytest.raises(FileNotFoundError, match="latent.autoencoder"):
        train(ldm_cfg(tmp_path / "missing"), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="data.image_size = 8"):
        train(ldm_cfg(ae_run, "data.image_size=16"), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="train.hflip"):
        train(ldm_cfg(ae_run, "train.hflip=true"), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="task.kind"):
        train(ldm_cfg(ae_run, "task.kind=colorize", "model.cond_channels=1"), tmp_path / "d", progress=False)
    assert not any((tmp_path / k).exists() for k in "abcd")  # nothing written for a config that cannot run
    not_ae = tmp_path / "not_ae"
    not_ae.mkdir()
    save_config(ldm_cfg(ae_run), not_ae / "config.toml")
    with pytest.raises(ValueError, match="not an autoencoder"):
        load_autoencoder(not_ae)


def test_commands_refuse_what_latents_cannot_do(ldm_run, ae_run, tmp_path, capsys):
    assert main(["sample", str(ldm_run), "--threshold", "static", "--out", str(tmp_path / "x.png")]) == 2
    assert "no [-1, 1] range" in capsys.readouterr().err
    assert main(["eval", str(ldm_run), "--metric", "nll", "--n", "4"]) == 2
    assert "latents, not images" in capsys.readouterr().err
    assert main(["sample", str(ae_run), "--out", str(tmp_path / "y.png")]) == 2
    assert "diffuse eval" in capsys.readouterr().err
    assert main(["eval", str(ae_run), "--metric", "fid"]) == 2
    assert "autoencoder run" in capsys.readouterr().err
    assert main(["sample", str(ldm_run), "--prompt", "a seven", "--out", str(tmp_path / "z.png")]) == 2
    assert "text-conditional" in capsys.readouterr().err and not (tmp_path / "z.png").exists()


def test_unused_autoencoder_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"autoencoder\.kl_weight .* ignored"):
        train(apply_overrides(RunConfig(), LDM + ["autoencoder.kl_weight=0.1"]), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"model\.channels .* ignored"):
        train(ae_cfg("model.channels=64"), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match=r"latent\.scale_factor .* ignored"):
        train(apply_overrides(RunConfig(), LDM + ["latent.scale_factor=0.5"]), tmp_path / "c", progress=False)


# --- segmentation features from a latent run (issue 36: "pixels or latents, any process") ---------------------------
SEG = ["data.source=digits", "data.image_size=8", "data.channels=1", "model.kind=segmenter", "segment.members=2",
       "segment.hidden=[8, 4]", "segment.train_images=4", "segment.test_images=4", "train.batch_size=32", "train.steps=3",
       "train.lr=1e-3", "train.warmup_steps=0", "train.sample_every=0", "train.log_every=1000",
       "train.checkpoint_every=1000", "train.mixed_precision=no"]


def test_segmentation_features_of_a_latent_flow_run_read_its_latents_with_the_null_label(tmp_path, ldm_run, ae_run):
    """The class-conditional latent flow run's features: z = s E(x), noised at the flow times of equal log-SNR to DDPM's
    steps 50 and 150, its network called with the null label, each decoder block upsampled from the latents' 2x2 to the
    images' 8x8: equal to the pipeline written out by hand. A segmenter trains on them and scores its held-out digits;
    the autoencoder baseline reads ae_run's latents."""
    from diffuse.kinds.segmentation import Features, SegmentationRun, load_labelled
    from diffuse.segmentation import vp_linear_times
    from diffuse.stages import space
    cfg = apply_overrides(RunConfig(), SEG + [f"segment.source={ldm_run}", "segment.times=[0.05, 0.15]"])
    run = train(cfg, tmp_path / "seg", progress=False)
    seg = SegmentationRun(run)
    x = load_labelled(seg.cfg).images[:3]
    got = seg.features(x)
    src, den, _ = load_run(ldm_run)
    z = space(src).encode(x)
    times = vp_linear_times([0.05, 0.15], den.schedule)
    alphabar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[[49, 149]]  # DDPM's steps 50 and 150 (Ho et al. 2020)
    assert den.schedule.kind == "flow" and torch.allclose(den.schedule.log_snr(times),
                                                         torch.from_numpy(np.log(alphabar / (1 - alphabar))), atol=1e-6)
    noise = torch.randn((1, *z.shape[1:]), generator=torch.Generator().manual_seed(0))
    null = torch.full((3,), den.net.num_classes)  # the null label: the unconditional model
    want = []
    for t in times:
        x_in, mt = den.network_input(den.schedule.q_sample(z, t.expand(3), noise.expand_as(z)), t)
        maps = den.net.decoder_features(x_in, mt, list(range(len(den.net.decoder_layout()))), label=null)
        want += [torch.nn.functional.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False) for m in maps.values()]
    torch.testing.assert_close(got, torch.cat(want, 1), rtol=1e-5, atol=1e-6)
    assert 0 <= seg.evaluate()["miou"] <= 1
    ae = apply_overrides(RunConfig(), SEG + [f"segment.source={ae_run}", "segment.features=autoencoder"])
    f = Features(ae, "cpu")
    _, autoencoder = load_autoencoder(ae_run)
    torch.testing.assert_close(f(x), torch.nn.functional.interpolate(autoencoder.encode(x), size=(8, 8), mode="bilinear",
                                                                     align_corners=False))
