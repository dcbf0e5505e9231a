"""`diffuse export RUN --format diffusers --out DIR` (export.py): diffusers' own classes load the folder, and its
pipelines sample it as `diffuse sample` samples the run, to 1e-5 in float32 with the same noise, for VP eps (DDPMPipeline),
VP v (DDIMPipeline) and flow runs (FlowMatchEulerDiscreteScheduler on diffuse's grid); `diffuse sample DIR` reads the
export back; a class-conditional run exports with num_class_embeds; networks diffusers cannot express are refused by
name."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffuse.app.cli import main  # noqa: E402
from diffuse.config import RunConfig, apply_overrides, save_config  # noqa: E402
from diffuse.export import check_exportable, scheduler_config, unet_config, unet_weights  # noqa: E402
from diffuse.nets.unet import UNet  # noqa: E402
from diffuse.pretrained import read_config  # noqa: E402
from diffuse.runs import load_run, open_run  # noqa: E402
from diffuse.schedule import schedule_from_config  # noqa: E402
from diffuse.train import train  # noqa: E402

BASE = ["data.source=digits", "data.image_size=8", "data.channels=1",
        "model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.norm_groups=4",
        "model.attention_resolutions=[4]", "model.dropout=0.0",
        "train.batch_size=8", "train.steps=3", "train.lr=2e-3", "train.warmup_steps=1", "train.ema_decay=0.8",
        "train.log_every=1000", "train.sample_every=0", "train.checkpoint_every=1000", "train.mixed_precision=no"]
VP = ["schedule.T=100", "schedule.beta_end=0.1"]  # alphabar_T = 0.006: x_T is nearly pure noise
RUNS = {"eps": VP + ["sample.sampler=ddpm", "sample.steps=0"],
        "v": VP + ["model.prediction=v", "sample.steps=10"],
        "flow": ["schedule.kind=flow", "model.prediction=flow", "sample.clip=false", "sample.steps=10"],
        "class": VP + ["model.class_conditional=true", "train.condition_dropout={label=0.2}", "sample.steps=10"]}


def cfg_of(*overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(), BASE + list(overrides))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (run folder, its export), trained and exported once per module on first use."""
    made = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            root = tmp_path_factory.mktemp(kind)
            train(cfg_of(*RUNS[kind]), root / "run")
            assert main(["export", str(root / "run"), "--format", "diffusers", "--out", str(root / "out")]) == 0
            made[kind] = root / "run", root / "out"
        return made[kind]

    return get


def sample(path, tmp_path, *args) -> np.ndarray:
    """`diffuse sample PATH` in float32 as (N, H, W, C), diffusers' output_type="np"."""
    out = tmp_path / "x.npy"
    assert main(["sample", str(path), "--n", "2", "--seed", "3", "--mixed-precision", "no", "--out", str(out), *args]) == 0
    return np.load(out).transpose(0, 2, 3, 1)


def test_vp_eps_run_through_ddpm_pipeline(exported, tmp_path):
    """An eps run sampled by ddpm over every step (its [sample]) and DDPMPipeline.from_pretrained(DIR) over every step:
    the same images; `diffuse sample DIR` reads the export back as the same model and sampler."""
    run, out = exported("eps")
    index = json.loads((out / "model_index.json").read_text())
    assert (index["_class_name"], index["scheduler"][1]) == ("DDPMPipeline", "DDPMScheduler")
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=100, output_type="np").images
    ours = sample(run, tmp_path)
    assert np.abs(ours - ref).max() < 1e-5
    assert ours.std() > 0.05  # samples, not a constant
    assert np.abs(sample(out, tmp_path) - ours).max() < 1e-5


def test_vp_v_run_through_ddim_pipeline(exported, tmp_path):
    """A v-prediction run sampled by DDIM (trailing, 10 steps; eta 0 and 1) and DDIMPipeline.from_pretrained(DIR)."""
    run, out = exported("v")
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["_class_name"], sched["prediction_type"], sched["timestep_spacing"]) == ("DDIMScheduler", "v_prediction", "trailing")
    pipe = diffusers.DDIMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    for eta in (0.0, 1.0):
        ref = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=10, eta=eta,
                   use_clipped_model_output=True, output_type="np").images
        ours = sample(run, tmp_path, "--eta", str(eta))
        assert np.abs(ours - ref).max() < 1e-5, eta
    assert np.abs(sample(out, tmp_path, "--steps", "10") - sample(run, tmp_path)).max() < 1e-5


def test_flow_run_through_the_flow_scheduler(exported, tmp_path):
    """A rectified-flow run: FlowMatchEulerDiscreteScheduler (from DIR/scheduler) on diffuse's grid, from the same x_T,
    steps x + (s - t) v as diffuse's DDIM does; DDPMPipeline (the folder's model_index) loads it."""
    run, out = exported("flow")
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    unet, scheduler = pipe.unet, pipe.scheduler
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    schedule = schedule_from_config(open_run(run).cfg.schedule)
    grid = schedule.grid(10)
    scheduler.set_timesteps(sigmas=grid[:-1].float().numpy())
    x = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(3)) * schedule.prior_std
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    ref = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    ours = sample(run, tmp_path)
    assert np.abs(ours - ref).max() < 1e-5
    back = read_config(out)
    assert (back.schedule.kind, back.model.prediction, back.sample.sampler, back.sample.clip) == ("flow", "flow", "ddim", False)
    assert np.abs(sample(out, tmp_path, "--steps", "10") - ours).max() < 1e-5


def test_class_conditional_export(exported, tmp_path):
    """Class labels as num_class_embeds = classes + 1 (the last row the null label): UNet2DModel with class_labels gives
    the run's network output; `diffuse sample DIR --label`, and classifier-free guidance (its dropout recorded), match
    the run."""
    run, out = exported("class")
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet")
    assert unet.config.num_class_embeds == 11
    _, den, classes = load_run(run)
    x, t, labels = torch.randn(3, 1, 8, 8), torch.tensor([3.0, 40.0, 99.0]), torch.tensor([0, 7, 10])
    with torch.no_grad():
        assert (unet(x, t, class_labels=labels).sample - den.net(x, t, label=labels)).abs().max() < 1e-5
    assert (classes, open_run(out).capabilities.classes, open_run(out).capabilities.guidance_keys) == (10, 10, ("label",))
    for args in (["--steps", "10", "--label", "3"], ["--steps", "10", "--label", "5", "--guidance", "2"]):
        assert np.abs(sample(out, tmp_path, *args) - sample(run, tmp_path, *args)).max() < 1e-5, args


def test_a_class_conditional_folder_without_its_null_label_is_refused(exported, tmp_path, capsys):
    run, out = exported("class")
    (out / "diffuse.json").unlink()
    try:
        assert main(["sample", str(out), "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
        assert "num_class_embeds = 11 on a network not written by `diffuse export`" in capsys.readouterr().err
    finally:
        assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "again")]) == 0
        (out / "diffuse.json").write_text((tmp_path / "again" / "diffuse.json").read_text())


@pytest.mark.parametrize("overrides", [["model.num_heads=2", "model.attention_resolutions=[]"],
                                       ["model.learned_variance=true", "train.loss=hybrid", *VP],
                                       ["model.channel_mult=[1, 2, 2]", "model.attention_resolutions=[8, 2]"]])
def test_network_maps_onto_unet2dmodel(overrides):
    """The weight map on fresh random networks of other shapes: several heads of one width (attention_head_dim), a
    learned variance (2C outputs), three levels with attention at the first and last: the same outputs."""
    cfg = cfg_of(*overrides)
    torch.manual_seed(0)
    ours = UNet(cfg.model, in_channels=1, image_size=8, out_channels=2 if cfg.model.learned_variance else 1).eval()
    for p in ours.parameters():  # zero-initialised output layers would hide a wrong map
        torch.nn.init.normal_(p, std=0.2)
    theirs = diffusers.UNet2DModel(**unet_config(cfg, 0)).eval()
    theirs.load_state_dict(unet_weights(ours.state_dict()), strict=True)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([7.0, 900.0])
    with torch.no_grad():
        assert (theirs(x, t).sample - ours(x, t)).abs().max() < 1e-5


@pytest.mark.parametrize("overrides", [[], ["schedule.kind=cosine"], ["schedule.kind=constant", "schedule.beta_end=0.008"],
                                       ["schedule.kind=cosine", "schedule.cosine_s=0.02"],
                                       ["schedule.zero_terminal_snr=true", "model.prediction=v"],
                                       ["schedule.kind=scaled_linear", "schedule.beta_start=0.00085", "schedule.beta_end=0.012"]])
def test_scheduler_config_has_the_run_schedule(overrides, tmp_path):
    """Every discrete schedule as diffusers computes it (named, or trained_betas where diffusers has no name: constant
    betas, a cosine of another offset): its alphas_cumprod are the run's alphabar; a named or constant one reads back."""
    cfg = cfg_of(*overrides, "schedule.T=1000")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kind, conf = scheduler_config(cfg)
    # the cosine schedule's last 4 steps lie below log-SNR -10.2, where diffuse's grids do not start
    assert [str(w.message).split(":")[0] for w in caught] == (
        ["diffuse's grids of this schedule start at step 996 (log-SNR above -10.2), diffusers' at step T = 1000"]
        if cfg.schedule.kind == "cosine" else [])
    theirs = getattr(diffusers, kind)(**conf).alphas_cumprod.double()
    assert torch.allclose(schedule_from_config(cfg.schedule).alphabar[1:], theirs, rtol=1e-5, atol=1e-6)
    if cfg.schedule.kind != "cosine" or cfg.schedule.cosine_s == 0.008:
        (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "in_channels": 1, "out_channels": 1,
                                                          "sample_size": 8}))
        (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": kind, **conf}))
        back = read_config(tmp_path).schedule
        assert (back.kind, back.T, back.zero_terminal_snr) == (cfg.schedule.kind, 1000, cfg.schedule.zero_terminal_snr)


@pytest.mark.parametrize("overrides, named", [
    (["model.self_condition=true"], "self-conditioning (model.self_condition)"),
    (["model.video=true"], "a video network (model.video"),
    (["model.patch_size=2"], "model.patch_size = 2"),
    (["model.channel_mult=[2, 2]"], "model.channel_mult[0] = 2"),
    (["model.num_heads=2", "model.attention_resolutions=[8]"], "model.num_heads = 2 over attention blocks of widths [8, 16]"),
    (["model.context_dim=8", "model.cross_attention_resolutions=[4]"], "cross-attention on a context or caption"),
    (["model.scalar_inputs=1"], "model.scalar_inputs = 1"),
    (["task.kind=superres", "model.cond_channels=1"], "a condition image concatenated to x_t"),
    (["model.semantic_dim=4"], "model.semantic_dim = 4"),
    (["schedule.kind=edm", "model.prediction=edm"], "model.prediction = 'edm'"),
    (["schedule.kind=vp_cosine"], "schedule.kind = 'vp_cosine', a process in continuous time"),
    (["schedule.kind=flow", "model.prediction=eps"], "takes the velocity (model.prediction = 'flow')"),
    (["model.kind=classifier"], "model.kind = 'classifier'"),
    (["latent.autoencoder=somewhere"], "latent.autoencoder = 'somewhere'"),
])
def test_networks_diffusers_cannot_express_are_refused(tmp_path, capsys, overrides, named):
    """Each refusal names the setting, before any weight loads or anything is written."""
    cfg = cfg_of(*overrides)
    with pytest.raises(ValueError, match="diffusers|UNet2DModel"):
        check_exportable(cfg)
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.toml")  # no checkpoint: the refusal comes first
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "out")]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_export_never_overwrites(exported, tmp_path, capsys):
    run, _ = exported("v")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "out")]) == 2
    assert "exists and is not an empty folder; an export never overwrites" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert main(["export", str(tmp_path / "none"), "--format", "diffusers", "--out", str(tmp_path / "o2")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert not list(tmp_path.glob(".o2*"))  # no temporary folder left behind
