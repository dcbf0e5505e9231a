"""Diffusers checkpoints through diffuse (pretrained.py): a UNet2DModel folder saved by diffusers, sampled by `diffuse
sample`, must give diffusers' own pipeline's images to 1e-5 with the same scheduler, steps and noise; every beta
schedule and prediction type is read as diffusers means it; unsupported settings are refused by name."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from diffuse.app.cli import main  # noqa: E402
from diffuse.pretrained import read_config  # noqa: E402
from diffuse.schedule import Schedule  # noqa: E402

SIZE, T = 8, 100


def tiny_unet(channels: int = 3, out_channels: int | None = None):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=SIZE, in_channels=channels, out_channels=out_channels or channels,
                                 block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def save_model(folder, scheduler, unet=None, pipeline_layout=False):
    """A model folder as diffusers publishes it: side by side (google/ddpm-*) or in unet/ and scheduler/."""
    unet = unet or tiny_unet()
    unet.save_pretrained(folder / "unet" if pipeline_layout else folder)
    scheduler.save_pretrained(folder / "scheduler" if pipeline_layout else folder)
    return unet, scheduler


def ours(folder, tmp_path, *args):
    out = tmp_path / "ours.npy"
    # float32 (the default "auto" is bf16 on CPUs with native bf16): the diffusers pipeline runs in float32
    assert main(["sample", str(folder), "--n", "2", "--seed", "3", "--mixed-precision", "no", "--out", str(out), *args]) == 0
    return np.load(out).transpose(0, 2, 3, 1)  # (N, H, W, C) as diffusers' output_type="np"


def test_ddpm_matches_the_ddpm_pipeline(tmp_path):
    """DDPMPipeline over every step (the scheduler class's default, read from scheduler_config.json) and over a
    leading grid of 20 steps."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_end=0.1)
    unet, _ = save_model(tmp_path / "m", sched)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    for steps in (T, 20):
        ref = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=steps, output_type="np").images
        got = ours(tmp_path / "m", tmp_path, *([] if steps == T else ["--steps", str(steps)]))
        assert np.abs(got - ref).max() < 1e-5, steps


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_the_ddim_pipeline(tmp_path, prediction, spacing):
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, beta_end=0.1, prediction_type=prediction, timestep_spacing=spacing)
    unet, _ = save_model(tmp_path / "m", sched, pipeline_layout=spacing == "trailing")
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    for eta in (0.0, 1.0):
        ref = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=10, eta=eta,
                   use_clipped_model_output=True, output_type="np").images
        got = ours(tmp_path / "m", tmp_path, "--steps", "10", "--eta", str(eta))
        assert np.abs(got - ref).max() < 1e-5, eta


def test_learned_range_variance_matches_the_ddpm_pipeline(tmp_path):
    """variance_type = learned_range: the network's second half of channels interpolates the log variance between
    beta-tilde and beta (Nichol & Dhariwal 2021, eq. 15)."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_end=0.1, variance_type="learned_range")
    unet, _ = save_model(tmp_path / "m", sched, unet=tiny_unet(3, 6))
    assert read_config(tmp_path / "m").model.learned_variance
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=T, output_type="np").images
    assert np.abs(ours(tmp_path / "m", tmp_path) - ref).max() < 1e-5


def write_config(folder, net: dict | None = None, **scheduler):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "in_channels": 3, "out_channels": 3,
                                                    "sample_size": SIZE, **(net or {})}))
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", **scheduler}))
    return folder


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_every_beta_schedule_is_read_as_diffusers_reads_it(tmp_path, beta_schedule, zero_snr):
    kw = dict(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012,
              rescale_betas_zero_snr=zero_snr)
    schedule = Schedule.from_config(read_config(write_config(tmp_path, **kw)).schedule)
    ref = diffusers.DDPMScheduler(**kw).alphas_cumprod.double()  # diffusers computes in float32
    assert torch.allclose(schedule.alphabar[1:], ref, rtol=1e-5, atol=1e-6)
    assert schedule.zero_terminal_snr == zero_snr


@pytest.mark.parametrize("prediction, variance, ours_", [("epsilon", "fixed_small", ("eps", "beta_tilde")),
                                                         ("sample", "fixed_large", ("x0", "beta")),
                                                         ("v_prediction", "fixed_small_log", ("v", "beta_tilde"))])
def test_prediction_and_variance_fields(tmp_path, prediction, variance, ours_):
    cfg = read_config(write_config(tmp_path, prediction_type=prediction, variance_type=variance,
                                   timestep_spacing="trailing", clip_sample=False))
    assert (cfg.model.prediction, cfg.sample.variance) == ours_
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.spacing, cfg.sample.clip) == ("ddpm", 0, "trailing", False)
    assert (cfg.data.channels, cfg.data.image_size) == (3, SIZE)


@pytest.mark.parametrize("net, scheduler, field", [
    ({"_class_name": "UNet2DConditionModel"}, {}, "_class_name"),
    ({"num_class_embeds": 10}, {}, "num_class_embeds"),
    ({"sample_size": [8, 16]}, {}, "sample_size"),
    ({"in_channels": 4, "out_channels": 4}, {}, "in_channels"),
    ({"out_channels": 6}, {}, "out_channels"),
    ({}, {"beta_schedule": "laplace"}, "beta_schedule"),
    ({}, {"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({}, {"prediction_type": "flow"}, "prediction_type"),
    ({}, {"variance_type": "learned"}, "variance_type"),
    ({}, {"thresholding": True}, "thresholding"),
    ({}, {"clip_sample_range": 2.0}, "clip_sample_range"),
    ({}, {"timestep_spacing": "karras"}, "timestep_spacing"),
    ({}, {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, "shift = 3.0"),
    ({}, {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 100}, "num_train_timesteps = 100"),
    ({"num_class_embeds": 11}, {"_class_name": "FlowMatchEulerDiscreteScheduler"}, "num_class_embeds = 11"),
])
def test_unsupported_settings_are_refused_by_name(tmp_path, capsys, net, scheduler, field):
    folder = write_config(tmp_path / "m", net, **scheduler)
    with pytest.raises(ValueError, match=field):
        read_config(folder)
    assert main(["sample", str(folder), "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_missing_files_and_package(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": SIZE}))
    assert main(["sample", str(folder), "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "scheduler_config.json" in capsys.readouterr().err
    write_config(folder)  # configs but no weights
    assert main(["sample", str(folder), "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "diffusion_pytorch_model.safetensors" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # not installed
    assert main(["sample", str(folder), "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert 'pip install -e ".[diffusers]"' in capsys.readouterr().err


def test_editing_tasks_run_on_a_diffusers_model(tmp_path):
    """Inpainting through the walk with the diffusers network: the kept half of the image comes back exactly (the
    projection's last step is q(x_0 | x_0)), the generated half differs from it."""
    save_model(tmp_path / "m", diffusers.DDIMScheduler(num_train_timesteps=T, beta_end=0.1))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255  # white = generate
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.npy"
    assert main(["edit", "inpaint", str(tmp_path / "m"), "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--n", "2", "--steps", "10", "--out", str(out)]) == 0
    got = np.load(out).transpose(0, 2, 3, 1)  # (N, H, W, C) in [0, 1]
    kept = image[:, : SIZE // 2] / 255.0
    assert np.abs(got[:, :, : SIZE // 2] - kept).max() < 1e-5
    assert np.abs(got[:, :, SIZE // 2:] - image[:, SIZE // 2:] / 255.0).mean() > 0.05


def test_eval_of_a_diffusers_model_on_a_folder_of_real_images(tmp_path, capsys):
    """`diffuse eval PATH --real FOLDER`: the FID recorded is the FID, in the named feature space, of the folder's
    images and of the samples `diffuse sample` draws with the same seed and chunks (rounded to 8 bits); without
    --real it is a clear error."""
    from diffuse import metrics
    from diffuse.data import DataConfig, load_dataset

    save_model(tmp_path / "m", diffusers.DDIMScheduler(num_train_timesteps=T, beta_end=0.1))
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(real_dir / f"{i}.png")
    (tmp_path / "pool.py").write_text("import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten())\n")
    spec = f"{tmp_path / 'pool.py'}:make"
    run = ["eval", str(tmp_path / "m"), "--metric", "fid", "--n", "6", "--steps", "4", "--features", spec, "--batch-size", "4"]
    assert main(run) == 2
    assert "--real FOLDER" in capsys.readouterr().err
    assert main(run + ["--real", str(real_dir)]) == 0
    record = json.loads((tmp_path / "m" / "eval.json").read_text())[-1]
    assert (record["n_real"], record["n_fake"]) == (6, 6)
    out = tmp_path / "fake.npy"
    assert main(["sample", str(tmp_path / "m"), "--n", "6", "--steps", "4", "--batch-size", "4", "--out", str(out)]) == 0
    fake = torch.from_numpy(np.round(np.load(out) * 255) / 127.5 - 1).float()
    real = torch.stack([x for x, _ in load_dataset(DataConfig(source="folder", path=str(real_dir), image_size=SIZE, channels=3))])
    net = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten())
    assert record["fid"] == pytest.approx(metrics.fid(real, fake, net), rel=1e-4)
    # the record says how the samples were drawn: the grid's spacing (the scheduler's leading) and the precision
    assert (record["sampler"], record["steps"], record["spacing"]) == ("ddim", 4, "leading")
    assert (record["mixed_precision"], record["dtype"]) == ("no", "float32")


@pytest.mark.parametrize("change, detail", [
    ({"block_out_channels": [16, 64]}, r"tensors differ in shape \(e\.g\. [\w.]+: \[\d+\] in the weights, \[\d+\] in the network"),
    ({"in_channels": 1, "out_channels": 1}, r"conv_in\.weight: \[16, 3, 3, 3\] in the weights, \[16, 1, 3, 3\]"),
    ({"down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D"]}, r"10 tensors the network of config\.json has are not in the weights"),
    ({"down_block_types": ["DownBlock2D", "DownBlock2D"]}, r"10 tensors of the weights have no place in it"),
])
def test_a_config_json_that_does_not_match_its_weights_is_named(tmp_path, capsys, change, detail):
    """A config.json edited away from its weights is a clear error naming the file and what differs (it was a
    RuntimeError traceback for different shapes, and silently random attention weights for missing ones)."""
    import re

    save_model(tmp_path / "m", diffusers.DDIMScheduler(num_train_timesteps=T, beta_end=0.1))
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**conf, **change}))
    assert main(["sample", str(tmp_path / "m"), "--n", "1", "--steps", "2", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffuse sample: error: {tmp_path / 'm' / 'config.json'} does not match the weights "
                          "diffusion_pytorch_model.safetensors beside it: ") and re.search(detail, err), err
    assert "Traceback" not in err and not (tmp_path / "x.png").exists()


def test_a_diffusers_folder_samples_in_float32_by_default(tmp_path, monkeypatch):
    """diffusers' pipelines run in float32, and so does a diffusers folder without --mixed-precision (a run's "auto" is
    bf16 on GPUs and bf16-capable CPUs, 0.117 off the pipeline): the 1e-5 match needs no flag."""
    import diffuse.app.requests

    sched = diffusers.DDIMScheduler(num_train_timesteps=T, beta_end=0.1)
    unet, _ = save_model(tmp_path / "m", sched)
    assert read_config(tmp_path / "m").sample.mixed_precision == "no"
    used = []
    chunks = diffuse.app.requests.generate_in_chunks  # what `diffuse sample` draws with
    monkeypatch.setattr(diffuse.app.requests, "generate_in_chunks", lambda *a, **k: used.append(k["mixed_precision"]) or chunks(*a, **k))
    out = tmp_path / "ours.npy"
    assert main(["sample", str(tmp_path / "m"), "--n", "2", "--seed", "3", "--steps", "10", "--out", str(out)]) == 0
    assert used == ["no"]  # whatever this machine's autocast would be
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=10, eta=0.0,
               use_clipped_model_output=True, output_type="np").images
    assert np.abs(np.load(out).transpose(0, 2, 3, 1) - ref).max() < 1e-5


def test_chunks_split_the_draw_and_keep_the_first_chunk(tmp_path):
    """generate_in_chunks: chunk 0 is generate's draw with the seed; chunk k its own seed; labels split alike."""
    from diffuse.condition import ConditionSpec
    from diffuse.generate import chunk_seed, generate, generate_in_chunks
    from diffuse.denoiser import Denoiser

    schedule = Schedule.linear(T)

    def net(x, index, label=None):  # a network that reads its label: eps = 0.1 label
        return torch.zeros_like(x) + 0.1 * label.view(-1, 1, 1, 1)

    net.condition_spec = ConditionSpec(num_classes=5)
    den = Denoiser(net, schedule)
    labels = torch.tensor([0, 1, 2, 3, 4])
    kw = dict(sampler="ddim", steps=5, eta=1.0)
    whole = generate_in_chunks(den, 5, (1, 2, 2), chunk=3, seed=7, labels=labels, **kw)
    assert torch.equal(whole[:3], generate(den, 3, (1, 2, 2), seed=7, labels=labels[:3], **kw))
    assert torch.equal(whole[3:], generate(den, 2, (1, 2, 2), seed=chunk_seed(7, 1), labels=labels[3:], **kw))
    assert chunk_seed(7, 1) not in (7, 8) and chunk_seed(7, 1) != chunk_seed(8, 1)
    assert torch.equal(generate_in_chunks(den, 5, (1, 2, 2), seed=7, labels=labels, **kw), generate(den, 5, (1, 2, 2), seed=7, labels=labels, **kw))
