"""Pretrained diffusers checkpoints read as runs: a UNet2DModel folder sampled, edited and evaluated by diffuse.

A folder written by diffusers (`UNet2DModel.save_pretrained` and a scheduler's `save_pretrained` side by side, as
the DDPM CIFAR-10, CelebA-HQ and LSUN checkpoints of Ho et al. 2020 are published, or a pipeline's `save_pretrained`
with `unet/` and `scheduler/` subfolders) is read as a `RunConfig` (`read_config`) and a network (`load_unet`):

- the network's `config.json` gives the image shape (in_channels, sample_size) and, through out_channels, whether it
  predicts a variance;
- `scheduler_config.json` gives the process: num_train_timesteps, beta_schedule (linear, scaled_linear,
  squaredcos_cap_v2 = Nichol & Dhariwal's cosine, sigmoid) with beta_start / beta_end, rescale_betas_zero_snr
  (Lin et al. 2024), prediction_type (epsilon, sample, v_prediction), variance_type (fixed_small(_log) = beta-tilde,
  fixed_large(_log) = beta, learned_range = Nichol & Dhariwal's interpolation, eq. 15), clip_sample, and the
  sampling defaults: the scheduler class picks the sampler (DDPMScheduler: ddpm over every step, as DDPMPipeline;
  DDIMScheduler: ddim, 50 steps) and timestep_spacing the grid; sampling runs in float32, as diffusers' pipelines do
  (sample.mixed_precision = "no"; `--mixed-precision auto` or bf16 asks for autocast).

The network then runs through diffuse's `Denoiser` like any trained run, so every sampler, guidance wrapper and
editing task works on it. With the same grid and noise, `diffuse sample` reproduces diffusers' DDPMPipeline and
DDIMPipeline (use_clipped_model_output=True) to 1e-5 in float32, the default for these folders (tests/test_pretrained.py). Two of diffusers' conventions differ on
purpose: diffuse's grids always end at t = 0 (alphabar = 1, diffusers' set_alpha_to_one = true), and DDIM steps to the
grid's next time where diffusers' DDIMScheduler steps T // steps down even when the grid's next time is elsewhere
(trailing and linspace grids whose step count does not divide T).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from torch import Tensor, nn

from .condition import ConditionSpec
from .checkpoint import mismatch_parts
from .config import RunConfig, SampleConfig
from .data import DataConfig
from .nets.unet import UNetConfig
from .schedule import ScheduleConfig

MODEL_CLASSES = ("UNet2DModel",)
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}  # diffusers' prediction_type -> model.prediction
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}
VARIANCES = {"fixed_small": "beta_tilde", "fixed_small_log": "beta_tilde", "fixed_large": "beta", "fixed_large_log": "beta",
             "learned_range": "beta_tilde"}  # variance_type -> sample.variance (learned_range: the network's own)
SPACINGS = ("leading", "trailing", "linspace")
SAMPLER_DEFAULTS = {"DDPMScheduler": ("ddpm", 0), "DDIMScheduler": ("ddim", 50), "DPMSolverMultistepScheduler": ("dpmpp-2m", 20),
                    "EulerDiscreteScheduler": ("euler", 50), "EulerAncestralDiscreteScheduler": ("euler-ancestral", 50),
                    "HeunDiscreteScheduler": ("heun", 25), "KDPM2DiscreteScheduler": ("dpm2", 25)}  # (sampler, steps; 0 = all)
INSTALL = 'pip install -e ".[diffusers]"'


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download the model folder again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object of settings, got {type(value).__name__}")
    return value


def model_files(path: str | Path) -> tuple[Path, Path] | None:
    """(the network's config.json, the scheduler's scheduler_config.json) of a diffusers folder: side by side, or in a
    pipeline's unet/ and scheduler/ subfolders; None when `path` holds no diffusers network config.
    Raises FileNotFoundError when the network is there but its scheduler config is not."""
    path = Path(path)
    for unet, scheduler in ((path / "config.json", path / "scheduler_config.json"),
                            (path / "unet" / "config.json", path / "scheduler" / "scheduler_config.json")):
        if unet.is_file():
            if not scheduler.is_file():
                raise FileNotFoundError(f"{path} holds a diffusers network ({unet}) but not its {scheduler.name}, which says "
                                        f"the noise schedule; download it with the model (it sits beside config.json or in scheduler/)")
            return unet, scheduler
    return None


def is_model_folder(path: str | Path) -> bool:
    """Whether `path` is a diffusers model folder (and not a diffuse run, which has config.toml)."""
    path = Path(path)
    return not (path / "config.toml").is_file() and any((path / sub / "config.json").is_file() for sub in ("", "unet"))


def _choice(conf: dict, key: str, table, default, file: Path):
    value = conf.get(key, default)
    if value not in table:
        raise ValueError(f"{file}: {key} = {value!r} is not supported; diffuse reads {', '.join(map(repr, table))}")
    return value


def read_config(path: str | Path) -> RunConfig:
    """The RunConfig of a diffusers model folder (see the module docstring for what each field becomes).

    Raises FileNotFoundError (no diffusers network or scheduler config), ValueError naming the file and the field for a
    setting diffuse cannot run as diffusers would: another network class, class or other conditioning, non-square or
    non-1/3-channel images, beta_schedule laplace or trained_betas, variance_type learned, thresholding, clip_sample_range
    other than 1."""
    files = model_files(path)
    if files is None:
        raise FileNotFoundError(f"{path} is neither a run folder (config.toml) nor a diffusers model folder (config.json "
                                "with scheduler_config.json)")
    unet_file, sched_file = files
    net, sched = _json(unet_file), _json(sched_file)
    if net.get("_class_name") not in MODEL_CLASSES:
        raise ValueError(f"{unet_file}: _class_name = {net.get('_class_name')!r}; diffuse runs {', '.join(MODEL_CLASSES)} "
                         "(unconditional image models such as google/ddpm-cifar10-32)")
    for key in ("num_class_embeds", "class_embed_type"):
        if net.get(key) is not None:
            raise ValueError(f"{unet_file}: {key} = {net[key]!r}: class-conditional diffusers networks are not supported; "
                             "use an unconditional UNet2DModel")
    channels, size = int(net.get("in_channels", 3)), net.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{unet_file}: sample_size = {size}: diffuse draws square images; use a square model")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{unet_file}: sample_size = {size!r} must be a positive integer")
    if channels not in (1, 3):
        raise ValueError(f"{unet_file}: in_channels = {channels}: diffuse draws 1- or 3-channel images")
    variance = _choice(sched, "variance_type", list(VARIANCES), "fixed_small", sched_file)
    learned = variance == "learned_range"
    out = int(net.get("out_channels", channels))
    if out != channels * (2 if learned else 1):
        raise ValueError(f"{unet_file}: out_channels = {out} with in_channels = {channels} and variance_type = {variance!r} "
                         f"in {sched_file.name}; expected {channels * (2 if learned else 1)}")
    if sched.get("trained_betas") is not None:
        raise ValueError(f"{sched_file}: trained_betas is set; diffuse reads the betas of a named beta_schedule "
                         f"({', '.join(BETA_SCHEDULES)})")
    beta_schedule = _choice(sched, "beta_schedule", BETA_SCHEDULES, "linear", sched_file)
    prediction = _choice(sched, "prediction_type", PREDICTIONS, "epsilon", sched_file)
    if sched.get("thresholding"):
        raise ValueError(f"{sched_file}: thresholding = true (diffusers' dynamic thresholding) is not read; set it to false "
                         "and pass --threshold dynamic:P to `diffuse sample` instead")
    if float(sched.get("clip_sample_range", 1.0)) != 1.0:
        raise ValueError(f"{sched_file}: clip_sample_range = {sched['clip_sample_range']}; diffuse clips x_0 to [-1, 1] only")
    spacing = _choice(sched, "timestep_spacing", SPACINGS, "leading", sched_file)
    if spacing == "leading" and int(sched.get("steps_offset", 0)):
        warnings.warn(f"{sched_file}: steps_offset = {sched['steps_offset']} shifts diffusers' leading grid up by that many "
                      "steps; diffuse samples it on the trailing grid instead, which starts at the top", UserWarning, stacklevel=2)
        spacing = "trailing"
    kind = sched.get("_class_name", "")
    if kind not in SAMPLER_DEFAULTS:
        warnings.warn(f"{sched_file}: {kind or 'the scheduler'} has no counterpart here; its schedule is read and sampling "
                      "defaults to ddim with 50 steps (choose with --sampler and --steps)", UserWarning, stacklevel=2)
    sampler, steps = SAMPLER_DEFAULTS.get(kind, ("ddim", 50))
    if kind == "DPMSolverMultistepScheduler" and int(sched.get("solver_order", 2)) == 3:
        sampler = "dpmpp-3m"
    schedule = ScheduleConfig(kind=BETA_SCHEDULES[beta_schedule], T=int(sched.get("num_train_timesteps", 1000)),
                              beta_start=float(sched.get("beta_start", 1e-4)), beta_end=float(sched.get("beta_end", 0.02)),
                              zero_terminal_snr=bool(sched.get("rescale_betas_zero_snr", False)))
    return RunConfig(data=DataConfig(source="folder", image_size=size, channels=channels), schedule=schedule,
                     model=UNetConfig(prediction=PREDICTIONS[prediction], learned_variance=learned),
                     sample=SampleConfig(sampler=sampler, steps=steps, spacing=spacing, variance=VARIANCES[variance],
                                         clip=bool(sched.get("clip_sample", True)), mixed_precision="no"))


class DiffusersUNet(nn.Module):
    """A diffusers UNet2DModel as a diffuse network: (x_t (B, C, H, W), model_time (B,): the 0-based step index, as
    diffusers feeds it) -> the network's output tensor (B, C or 2C, H, W). It takes no condition."""

    condition_spec = ConditionSpec()

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: Tensor, model_time: Tensor, **cond) -> Tensor:
        self.condition_spec.check(cond, x_t)
        return self.unet(x_t, model_time).sample


def load_unet(path: str | Path) -> DiffusersUNet:
    """The network of a diffusers model folder, read from its local files only (nothing is downloaded).

    Raises ValueError naming the install command when diffusers is missing, FileNotFoundError/ValueError as
    `read_config` and when the weights file is missing."""
    unet_file, _ = model_files(path) or (None, None)
    if unet_file is None:
        raise FileNotFoundError(f"{path} is not a diffusers model folder (no config.json)")
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ValueError(f"{path} is a diffusers model folder; reading it needs diffusers: {INSTALL}") from None
    folder = unet_file.parent
    weights = [folder / f"diffusion_pytorch_model.{ext}" for ext in ("safetensors", "bin")]
    weights = next((w for w in weights if w.is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} has config.json but no weights (diffusion_pytorch_model.safetensors or .bin); "
                                "download them with the model")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            unet, info = UNet2DModel.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False,
                                                     output_loading_info=True)
    except (RuntimeError, ValueError, KeyError) as e:  # diffusers' "Error(s) in loading state_dict" and the like
        raise ValueError(_mismatch(unet_file, weights, str(e))) from None
    missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    if missing or unexpected:  # diffusers would leave the missing ones at their random initial values
        raise ValueError(_mismatch(unet_file, weights, "; ".join(mismatch_parts(unet_file.name, (), missing, unexpected))))
    return DiffusersUNet(unet)


_SIZE_RE = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
                      r"the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def _mismatch(config: Path, weights: Path, detail: str) -> str:
    """The message for a config.json that does not describe the network its weights were saved from (`detail`: the
    differences in words, or diffusers' error, whose size mismatches are read out)."""
    sizes = _SIZE_RE.findall(detail)
    if sizes:
        detail = "; ".join(mismatch_parts(config.name, sizes))
    elif "tensors" not in detail:
        detail = " ".join(detail.split())[:400]
    return (f"{config} does not match the weights {weights.name} beside it: {detail}; the file describes another network "
            "than the one the weights were saved from: restore the model's own config.json (download the folder again)")
