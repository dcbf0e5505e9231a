"""Pretrained diffusers checkpoints read as runs: a UNet2DModel folder sampled, edited and evaluated by diffuse.

A folder written by diffusers (`UNet2DModel.save_pretrained` and a scheduler's `save_pretrained` side by side, as
the DDPM CIFAR-10, CelebA-HQ and LSUN checkpoints of Ho et al. 2020 are published, or a pipeline's `save_pretrained`
with `unet/` and `scheduler/` subfolders) is read as a `RunConfig` (`read_config`) and a network (`load_unet`):

- the network's `config.json` gives the image shape (in_channels, sample_size) and, through out_channels, whether it
  predicts a variance; num_class_embeds is read for folders written by `diffuse export` (export.py, the inverse of
  this module), whose diffuse.json names the null label;
- `scheduler_config.json` gives the process: num_train_timesteps, beta_schedule (linear, scaled_linear,
  squaredcos_cap_v2 = Nichol & Dhariwal's cosine, sigmoid) with beta_start / beta_end, rescale_betas_zero_snr
  (Lin et al. 2024), prediction_type (epsilon, sample, v_prediction), variance_type (fixed_small(_log) = beta-tilde,
  fixed_large(_log) = beta, learned_range = Nichol & Dhariwal's interpolation, eq. 15), clip_sample, and the
  sampling defaults: the scheduler class picks the sampler (DDPMScheduler: ddpm over every step, as DDPMPipeline;
  DDIMScheduler: ddim, 50 steps) and timestep_spacing the grid; FlowMatchEulerDiscreteScheduler is rectified flow
  (schedule.Flow, a velocity network fed 1000 t, sampled by DDIM: the scheduler's Euler step on the straight path); sampling runs in float32, as diffusers' pipelines do
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
from .config import RunConfig, SampleConfig, TrainConfig
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
    setting diffuse cannot run as diffusers would: another network class, class labels without an export's null label
    (`num_classes`) or other conditioning, non-square or non-1/3-channel images, beta_schedule laplace or trained_betas
    other than constant ones, variance_type learned, thresholding, clip_sample_range other than 1, a flow scheduler
    other than FLOW_FIXED's."""
    files = model_files(path)
    if files is None:
        raise FileNotFoundError(f"{path} is neither a run folder (config.toml) nor a diffusers model folder (config.json "
                                "with scheduler_config.json)")
    unet_file, sched_file = files
    net, sched = _json(unet_file), _json(sched_file)
    if net.get("_class_name") not in MODEL_CLASSES:
        raise ValueError(f"{unet_file}: _class_name = {net.get('_class_name')!r}; diffuse runs {', '.join(MODEL_CLASSES)} "
                         "(unconditional image models such as google/ddpm-cifar10-32)")
    if net.get("class_embed_type") is not None:
        raise ValueError(f"{unet_file}: class_embed_type = {net['class_embed_type']!r}: diffuse reads class labels through "
                         "the embedding table of num_class_embeds only; use a UNet2DModel without class_embed_type")
    classes = num_classes(path, net, unet_file)
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
    kind = sched.get("_class_name", "")
    if kind == FLOW_SCHEDULER:
        return _flow_config(path, net, sched, unet_file, sched_file, size, channels, classes)
    betas = sched.get("trained_betas")
    if betas is not None and (not betas or len(set(betas)) != 1 or not 0 < float(betas[0]) < 1):
        raise ValueError(f"{sched_file}: trained_betas holds betas of no schedule diffuse names; diffuse reads a named "
                         f"beta_schedule ({', '.join(BETA_SCHEDULES)}) or constant trained_betas (schedule.kind = "
                         "'constant')")
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
    if kind not in SAMPLER_DEFAULTS:
        warnings.warn(f"{sched_file}: {kind or 'the scheduler'} has no counterpart here; its schedule is read and sampling "
                      "defaults to ddim with 50 steps (choose with --sampler and --steps)", UserWarning, stacklevel=2)
    sampler, steps = SAMPLER_DEFAULTS.get(kind, ("ddim", 50))
    if kind == "DPMSolverMultistepScheduler" and int(sched.get("solver_order", 2)) == 3:
        sampler = "dpmpp-3m"
    T = int(sched.get("num_train_timesteps", 1000))
    if betas is not None and len(betas) != T:
        raise ValueError(f"{sched_file}: trained_betas holds {len(betas)} betas for num_train_timesteps = {T}")
    schedule = ScheduleConfig(kind=BETA_SCHEDULES[beta_schedule], T=T,
                              beta_start=float(sched.get("beta_start", 1e-4)), beta_end=float(sched.get("beta_end", 0.02)),
                              zero_terminal_snr=bool(sched.get("rescale_betas_zero_snr", False)))
    if betas is not None:  # constant betas (the diffusion autoencoder's latent DDIM schedule)
        schedule = ScheduleConfig(kind="constant", T=T, beta_end=float(betas[0]), zero_terminal_snr=schedule.zero_terminal_snr)
    return RunConfig(data=DataConfig(source="folder", image_size=size, channels=channels), schedule=schedule,
                     model=UNetConfig(prediction=PREDICTIONS[prediction], learned_variance=learned, class_conditional=bool(classes)),
                     train=TrainConfig(condition_dropout=_label_dropout(path)),
                     sample=SampleConfig(sampler=sampler, steps=steps, spacing=spacing, variance=VARIANCES[variance],
                                         clip=bool(sched.get("clip_sample", True)), mixed_precision="no"))


FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
FLOW_FIXED = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "invert_sigmas": False,
              "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
              "stochastic_sampling": False}  # the flow scheduler's settings diffuse's flow process has (Flow: time 1000 t)


def _flow_config(path: str | Path, net: dict, sched: dict, unet_file: Path, sched_file: Path, size: int, channels: int,
                 classes: int) -> RunConfig:
    """The RunConfig of a rectified-flow folder (FlowMatchEulerDiscreteScheduler): x_t = (1 - t) x_0 + t eps, the
    network fed 1000 t and predicting the velocity eps - x_0 (schedule.Flow); sampled by DDIM, which on this straight
    path is the scheduler's Euler step x_s = x_t + (s - t) v, without clipping, as the scheduler does not clip."""
    for key, value in FLOW_FIXED.items():
        got = sched.get(key, value)
        if got != value and not (isinstance(value, float) and isinstance(got, (int, float)) and float(got) == value):
            raise ValueError(f"{sched_file}: {key} = {got!r}; diffuse reads the flow scheduler with {key} = "
                             f"{json.dumps(value)} (its flow process feeds the network 1000 t on an unshifted grid)")
    if int(net.get("out_channels", channels)) != channels:
        raise ValueError(f"{unet_file}: out_channels = {net['out_channels']} with in_channels = {channels}: a flow "
                         f"network outputs the velocity, {channels} channels")
    return RunConfig(data=DataConfig(source="folder", image_size=size, channels=channels),
                     schedule=ScheduleConfig(kind="flow"),
                     model=UNetConfig(prediction="flow", class_conditional=bool(classes)),
                     train=TrainConfig(condition_dropout=_label_dropout(path)),
                     sample=SampleConfig(sampler="ddim", steps=50, spacing="trailing", clip=False, mixed_precision="no"))


EXPORT_FILE = "diffuse.json"  # what `diffuse export` writes beside a pipeline's folders: the run, its null label


def _export_record(path: str | Path) -> dict:
    """The diffuse.json of a folder written by `diffuse export` ({} for other folders)."""
    file = Path(path) / EXPORT_FILE
    return _json(file) if file.is_file() else {}


def _label_dropout(path: str | Path) -> dict:
    """train.condition_dropout of the exported run ({} for other folders): whether its null label was trained."""
    return {k: float(v) for k, v in _export_record(path).get("condition_dropout", {}).items()}


def num_classes(path: str | Path, net: dict | None = None, unet_file: Path | None = None) -> int:
    """The class labels a diffusers folder's network takes: 0 without num_class_embeds; K for a folder written by
    `diffuse export`, whose K + 1 embeddings end with diffuse's null label (its diffuse.json says so). ValueError for
    another class-conditional folder: which row is "no class" is not known."""
    if net is None:
        unet_file, _ = model_files(path) or (None, None)
        net = _json(unet_file) if unet_file is not None else {}
    embeds = net.get("num_class_embeds")
    if embeds is None:
        return 0
    record = _export_record(path)
    if record.get("null_label") != int(embeds) - 1:
        raise ValueError(f"{unet_file}: num_class_embeds = {embeds} on a network not written by `diffuse export` (no "
                         f"{EXPORT_FILE} naming its null label = {int(embeds) - 1}): diffuse reads class-conditional "
                         "diffusers networks whose last class row is the null label of classifier-free guidance only")
    return int(embeds) - 1


class DiffusersUNet(nn.Module):
    """A diffusers UNet2DModel as a diffuse network: (x_t (B, C, H, W), model_time (B,): the 0-based step index, or 1000 t
    of a flow network, as diffusers feeds it) -> the network's output tensor (B, C or 2C, H, W). It takes a class
    `label` (B,) when it has `num_classes` (its num_class_embeds - 1, the last row the null label), no other condition."""

    def __init__(self, unet: nn.Module, num_classes: int = 0):
        super().__init__()
        self.unet = unet
        self.condition_spec = ConditionSpec(num_classes)

    def forward(self, x_t: Tensor, model_time: Tensor, **cond) -> Tensor:
        self.condition_spec.check(cond, x_t)
        return self.unet(x_t, model_time, class_labels=cond.get("label")).sample


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
    return DiffusersUNet(unet, num_classes(path))


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
