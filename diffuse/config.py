"""Run configuration: one dataclass per component, TOML on disk, `--set key=value` overrides.

Each section of the TOML file is the config dataclass of the module that owns it ([data] ->
data.DataConfig, [schedule] -> schedule.ScheduleConfig, [model] -> nets.unet.UNetConfig,
[train] -> TrainConfig, [sample] -> SampleConfig, [task] -> TaskConfig, the image-to-image task of
tasks/image_to_image.py, [autoencoder] -> autoencoder.AutoencoderConfig, the first stage that model.kind = "autoencoder"
trains, [latent] -> LatentConfig, the autoencoder run a latent-diffusion model works in). Values are checked against the field
types: an unknown section or key, a value of the wrong type, or a choice outside a Literal fails
with a ConfigError that names the key and lists what is valid. The full config is saved in
every run folder, so a run reloads without flags.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from .nets.autoencoder import AutoencoderConfig
from .checkpoint import latest_step, write_atomically
from .data import DataConfig
from .nets.unet import UNetConfig
from .samplers import SAMPLERS
from .segmentation import SegmentConfig
from .tasks.image_to_image import TaskConfig
from .trackers import TrackerName
from .schedule import DISCRETE_KINDS, ScheduleConfig, Spacing

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a bad value."""


SamplerName = Literal["ddpm", "ddim", "dpmpp-2m", "dpmpp-3m", "dpmpp-2s", "euler", "heun", "dpm2", "euler-ancestral",
                      "sde-em", "sde-pc", "ode-rk45"]  # the keys of samplers.SAMPLERS (a test keeps them equal)


@dataclass
class SampleConfig:
    sampler: SamplerName = "ddim"                            # see samplers.SAMPLERS / `diffuse sample --help`
    steps: int = 50                                          # grid steps; 0 = every step (ddpm, linear schedule: Algorithm 2 exactly)
    spacing: Spacing = "trailing"                            # how the grid is picked (schedule.Schedule.grid); trailing starts at the top for any step count
    eta: float = 0.0                                         # DDIM / Euler-ancestral stochasticity (DDIM: 0 deterministic, 1 = DDPM-like)
    variance: Literal["beta_tilde", "beta"] = "beta_tilde"   # DDPM sigma_t^2
    clip: bool = True                                        # clip predicted x_0 to the data range [-1, 1] (Ho et al. 2020 code)
    dynamic_threshold: float = 0.0                           # percentile p of dynamic thresholding (Imagen: 0.995); 0 = off (then `clip`)
    guidance: float = 0.0                                    # classifier-free guidance weight w for class-conditional models
    guidance_interval: list[float] = field(default_factory=list)  # [lo, hi]: guide only where sigma/alpha is in (lo, hi]
    #                                                          (Kynkaanniemi et al. 2024); [] = at every noise level
    n: int = 64                                              # images in periodic sample grids
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # the network under autocast while sampling (the sampler
    #                                                          steps in float32); auto: bf16 on GPUs and CPUs with native bf16
    compile: Literal["auto", "yes", "no"] = "auto"  # torch.compile the network for sampling (a CUDA graph on GPUs); auto: on CUDA


@dataclass
class TrainConfig:
    steps: int = 800_000            # optimizer steps (DDPM CIFAR-10: 800k)
    batch_size: int = 128           # global batch over all processes (DDPM: 128)
    lr: float = 2e-4                # Adam learning rate (DDPM CIFAR-10: 2e-4)
    warmup_steps: int = 5000        # linear LR warm-up (DDPM: 5000)
    grad_clip: float = 1.0          # max global gradient norm, 0 disables (DDPM: 1)
    ema_decay: float = 0.9999       # EMA of weights used for sampling (DDPM: 0.9999)
    ema_warmup: bool = True         # decay min(ema_decay, (1+n)/(10+n)) at step n, so short runs are not averaged with the init
    posthoc_ema: list[float] = field(default_factory=list)  # sigma_rel of power-function EMA tracks saved as snapshots,
    #                                 from which `diffuse ema` rebuilds any EMA length after training (EDM2, Karras et al.
    #                                 2024, sec. 3: [0.05, 0.10]); [] = off
    ema_snapshot_every: int = 500   # steps between post-hoc EMA snapshots (RUN/ema_snapshots; one is also written at the end)
    weight_decay: float = 0.0       # AdamW decoupled weight decay (DDPM: none)
    loss: Literal["simple", "hybrid", "vlb"] = "simple"  # L_simple (Ho et al.); + lambda L_vlb (Nichol & Dhariwal, learned variance); L_vlb alone
    vlb_lambda: float = 0.001       # lambda of the hybrid loss (Nichol & Dhariwal 2021: 0.001)
    loss_norm: Literal["l2", "l1"] = "l2"  # L_simple's norm: squared error (Ho et al.) or absolute (Palette's option)
    loss_weighting: Literal["none", "min_snr", "p2", "edm"] = "none"  # the weight on the x_0 error over t: none (each
    #                                 target's plain loss; eps: Ho et al.'s L_simple), min-SNR-gamma (Hang et al. 2023), P2 (Choi
    #                                 et al. 2022) or EDM's lambda(sigma) (Karras et al. 2022), written for every prediction type
    min_snr_gamma: float = 5.0      # gamma of min-SNR weighting
    p2_k: float = 1.0               # P2 weighting 1 / (k + SNR)^gamma on the eps-loss: k (Choi et al. 2022: 1)
    p2_gamma: float = 1.0           # and gamma (Choi et al. 2022: 0.5 or 1)
    hflip: bool = False             # random horizontal flips (DDPM CIFAR-10: yes; digits: no)
    augment_p: float = 0.0          # non-leaking augmentation (Karras et al. 2022, app. F.2; augment.py): each of x/y-flip,
    #                                 quarter turn, translation, scaling with this probability, its parameters given to the
    #                                 network and zero at sampling (EDM CIFAR-10: 0.12); 0 = off
    offset_noise: float = 0.0       # training noise eps + offset * (one N(0, 1) per image and channel): lets the model
    #                                 change an image's mean brightness (Guttenberg 2023; typical 0.05-0.1); 0 = off
    grad_accumulation: int = 1      # micro-batches per step: the same step as the whole batch in less memory (equal to
    #                                 float rounding without dropout; with dropout each micro-batch draws its own masks)
    lr_schedule: Literal["constant", "cosine", "inverse_sqrt", "linear"] = "constant"  # after warm-up: constant (DDPM), cosine to 0 at
    #                                 train.steps, or lr / sqrt(max(step / warmup_steps, 1)) (EDM2's decay, Karras et al. 2024)
    condition_dropout: dict[str, float] = field(default_factory=dict)  # per condition key, the probability of its null value,
    #                                 e.g. {label = 0.1}: one net learns p(x | c) and p(x) for classifier-free guidance (0.1-0.2)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on GPUs and CPUs with native bf16 (AMX, AVX512-BF16), else fp32
    compile: Literal["auto", "yes", "no"] = "auto"         # torch.compile the trained networks (speed.py); auto: on CUDA
    channels_last: Literal["auto", "yes", "no"] = "auto"   # convolution weights in NHWC order (speed.py); auto: on CUDA
    data_on_device: Literal["auto", "yes", "no"] = "auto"  # a small in-memory dataset copied to the device once; auto: on CUDA
    seed: int = 0                   # seeds data order, t and noise draws, and the initial weights
    time_limit: float = 0.0         # stop after this many seconds of training (0: no limit), checkpointing first
    log_every: int = 50             # steps between log lines / loss-curve updates
    log_to: list[TrackerName] = field(default_factory=lambda: ["jsonl"])  # where they go (trackers.py): jsonl
    #                                 (RUN/log.jsonl), csv (RUN/log.csv), tensorboard (RUN/tensorboard; pip install
    #                                 tensorboard), wandb (RUN/wandb, offline unless WANDB_MODE is set; pip install wandb)
    sample_every: int = 10_000      # steps between sample grids (0: never)
    fid_every: int = 0              # steps between FIDs of the EMA model on a fixed noise batch, logged, drawn on the loss
    #                                 plot, and the best kept as the run folder RUN/best (0: never)
    fid_samples: int = 500          # samples (and real training images) of that FID: more than the feature dimension
    fid_steps: int = 0              # sampler steps of that FID (0: sample.steps; fewer make it cheaper, and it is only compared
    #                                 with itself)
    fid_features: str = "digits"    # its feature network: digits (1-channel data), inception:PATH or MODULE:ATTR (metrics.py)
    checkpoint_every: int = 5000    # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2       # committed checkpoints kept in the run folder
    num_workers: int = 0            # unused (data is decoded in the training process); kept so saved configs load, refused if set


@dataclass
class LatentConfig:
    """[latent]: latent diffusion (Rombach et al. 2022): the diffusion model works on z = scale_factor * E(x) of a trained
    autoencoder run and samples are decoded by D (stages.py)."""

    autoencoder: str = ""       # the autoencoder run (`diffuse train configs/ae_mnist.toml`); "" = diffusion on pixels
    scale_factor: float = 0.0   # z = scale_factor * E(x); 0 = 1 / std of the training latents, estimated when training starts
    #                             and saved in the run's config (Rombach et al. 2022, app. D.1: unit-variance latents)
    cache: bool = True          # encode the training images once (RUN/latents.safetensors) instead of at every step
    autoencoder_step: int = 0   # the autoencoder checkpoint this model is trained on and decodes with; 0 = its newest when
    #                             training starts, then saved in the run's config (more autoencoder training does not change it)


@dataclass
class SemanticConfig:
    """[semantic]: a run on the semantic codes z_sem of a trained diffusion autoencoder (model.kind = "diffae"; Preechakul
    et al. 2022): its latent DDIM (model.kind = "diffae_prior") or a linear classifier whose weights are edit directions
    (model.kind = "diffae_classifier"). The codes of its training images come from its EMA encoder, frozen and cached."""

    run: str = ""               # the diffusion autoencoder run (`diffuse train configs/diffae_digits.toml --out runs/diffae`)
    run_step: int = 0           # its checkpoint; 0 = its newest when training starts, then saved in this run's config (pinned)
    normalize: bool = True      # z-normalise the codes by their mean and std over the training images (the paper: "crucial")
    target: str = "label"       # diffae_classifier: "label" (the class) or an attribute of data.attributes (thickness,
    #                             slant, size), split at its median over the training images into two classes
    hidden: int = 512           # diffae_prior: MLPSkipNet's width (the paper: 2048 at z_sem of 512)
    layers: int = 10            # diffae_prior: its linear layers (the paper: 10; 20 for horses and bedrooms)


@dataclass
class ClipConfig:
    """[clip]: a CLIP trained here (model.kind = "clip", nets/clip.py): the image tower is the U-Net encoder of [model]
    (channels, channel_mult, ...), the text tower model.text_encoder ("chars" of width model.context_dim, or frozen
    "minilm" with a trained projection) over model.max_tokens tokens."""

    dim: int = 64               # D, the width of both towers' unit embeddings (CLIP ViT-B/32: 512)
    noise_aware: bool = False   # GLIDE's noised CLIP: the image tower reads x_t of [schedule] at its model time
    clean_share: float = 0.25   # noise_aware: share of examples at t = 0 (clean images); the rest t ~ U(0, 1]
    text_width: int = 64        # model.text_encoder = "chars": its width (minilm's is its own 384)


@dataclass
class UnclipConfig:
    """[unclip]: unCLIP (Ramesh et al. 2022; kinds/unclip.py). The prior (model.kind = "unclip_prior", sec. 2.2): a
    diffusion model over the CLIP image embeddings of a frozen CLIP run's training images, conditioned on their captions'
    text embeddings and token states, by a small causal transformer (nets/unclip.py) predicting the clean embedding. The
    decoder (sec. 2.1): a denoiser (model.image_embed_dim > 0) conditioned on the image embedding z_i of each clean
    training image by the same kind of frozen CLIP run; it reads only clip and clip_step."""

    clip: str = ""              # the CLIP run (`diffuse train configs/clip_shapes.toml --out runs/clip_shapes`)
    clip_step: int = 0          # its checkpoint; 0 = its newest when training starts, then saved in this run's config (pinned)
    scale: Literal["sqrt_d", "znorm"] = "sqrt_d"  # the diffused variable: sqrt(D) z / |z| (DALLE2-pytorch's image_embed_scale)
    #                             or (z - mean) / std over the training embeddings (Karlo's clip_mean, clip_std)
    width: int = 128            # the transformer's width (DALLE2-pytorch's example: 768)
    layers: int = 4             # its layers (the example: 12)
    heads: int = 4              # its attention heads (the example: 12)
    text_dropout: float = 0.1   # the share of examples trained without their caption (both its embedding and its tokens:
    #                             the paper's 10%), the unconditional model of classifier-free guidance


VideoPattern = Literal["prediction", "backward", "interpolation", "scattered"]


@dataclass
class VideoConfig:
    """[video]: how a video denoiser (model.video, kinds/video.py) is trained beyond whole videos. Masked conditioning
    (FDM, Harvey et al. 2022; RaMViD, Hoppe et al. 2022; MCVD, Voleti et al. 2022): per video, no frame is given with
    probability p_unconditional, else k ~ Uniform{1..max_observed} frames are given clean (with model.video_observed's
    indicator) in a pattern drawn uniformly from `patterns`, and the loss is on the other frames only; one model then
    generates, predicts forward and backward, and interpolates. Joint image-video training (Ho et al. 2022, sec. 3):
    a share p_images of the examples are independent images (self-only temporal attention)."""

    max_observed: int = 0             # most frames given per video (RaMViD: 4; MCVD: 5 of 10); < data.frames; 0: every
    #                                   video is generated whole (no masked conditioning; model.video_observed off)
    p_unconditional: float = 0.25     # share of videos with no frame given (RaMViD's uncondition_rate 0.25)
    patterns: list[VideoPattern] = field(default_factory=lambda: ["prediction", "backward", "interpolation", "scattered"])
    #                                   which k frames are given: the first k (prediction, MCVD's past), the last k
    #                                   (backward prediction, MCVD's future), the ends (interpolation: ceil(k/2) first and
    #                                   floor(k/2) last, MCVD's past + future), or k uniformly at random (scattered, RaMViD)
    p_images: float = 0.0             # joint training: share of examples whose frames are independent images, frame f
    #                                   being frame j of video i, (i, j) uniform over the data, drawn per frame (0: off)
    max_span: int = 0                 # FDM's frame subsets: each example is F sorted distinct frames of a window of
    #                                   max_span >= data.frames consecutive ones (kinds.video.draw_frame_subsets), the
    #                                   network told their frame_index (positions less the first); 0 (or data.frames):
    #                                   F consecutive frames


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)  # model.kind = "autoencoder": its network
    latent: LatentConfig = field(default_factory=LatentConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)  # model.kind = "segmenter": features, labels, head
    semantic: SemanticConfig = field(default_factory=SemanticConfig)  # "diffae_prior", "diffae_classifier": the codes
    clip: ClipConfig = field(default_factory=ClipConfig)  # model.kind = "clip": embedding width, noise-aware variant
    video: VideoConfig = field(default_factory=VideoConfig)  # a video denoiser (model.video): masks, joint image training
    unclip: UnclipConfig = field(default_factory=UnclipConfig)  # unCLIP's prior and decoder: the CLIP run, the prior's net


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Return value converted to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not valid; choose one of {', '.join(map(repr, choices))}")
        return value
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table of name = {item.__name__}, e.g. {{label = 0.1}}, got {value!r}")
        return {str(k): _check_value(f"{key}.{k}", v, item) for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            what, example = (f"one of {', '.join(map(repr, typing.get_args(item)))}", f"[{typing.get_args(item)[0]!r}]") \
                if typing.get_origin(item) is Literal else (item.__name__, "[1, 2]")
            raise ConfigError(f"{key} must be a list of {what}, e.g. {example} ([] for none), got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {hint}")  # a programming error in a config dataclass


def _set(section_obj: Any, section: str, key: str, value: Any) -> None:
    hints = typing.get_type_hints(type(section_obj))
    if key not in hints:
        raise ConfigError(f"unknown key '{section}.{key}'; valid keys in [{section}]: {', '.join(sorted(hints))}")
    setattr(section_obj, key, _check_value(f"{section}.{key}", value, hints[key]))


def _sections(cfg: RunConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def from_dict(d: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig from {section: {key: value}}, starting from `base` (defaults if None)."""
    cfg = copy.deepcopy(base) if base is not None else RunConfig()
    sections = _sections(cfg)
    for section, values in d.items():
        if section not in sections:
            raise ConfigError(f"unknown section [{section}]; valid sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of key = value pairs")
        for key, value in values.items():
            if (section, key) == ("train", "label_dropout"):  # the name before conditions were dicts (saved runs use it)
                key, value = "condition_dropout", ({"label": value} if value else {})
            if (section, key) == ("schedule", "timesteps"):  # T's name before "timesteps" meant only sampling grids
                key = "T"
            _set(sections[section], section, key, value)
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


PACKAGED = Path(__file__).parent / "configs"  # the configs that ship in the package (the repo's configs/ links here)


def packaged_configs() -> list[str]:
    """The names of the configs that ship in the package (diffuse/configs/NAME.toml), sorted: `diffuse train NAME`."""
    return sorted(p.stem for p in PACKAGED.glob("*.toml"))


def config_summary(name: str, width: int = 100) -> str:
    """The first comment line of packaged config NAME (what it trains), cut to `width` characters; "" if it has none."""
    first = (PACKAGED / f"{name}.toml").read_text().splitlines()[:1]
    text = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return text if len(text) <= width else text[:width - 3].rstrip() + "..."


def config_path(name: str | Path) -> Path:
    """The file a config argument names: an existing file as it is, else a bare NAME (no folder; `.toml` optional) of a
    packaged config, diffuse/configs/NAME.toml, so `diffuse train mnist_cond` works outside the repository.
    Raises FileNotFoundError naming the packaged configs (and the closest name) for anything else."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name.removesuffix(".toml")
    if stem in packaged_configs():
        if path.parent == Path("."):
            return PACKAGED / f"{stem}.toml"
        raise FileNotFoundError(f"config file {path} not found; the packaged config of that name is `{stem}` (e.g. "
                                f"`diffuse train {stem} --out runs/{stem}`)")
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder, not a config: pass a TOML file (a run folder's is "
                                f"{path / RUN_CONFIG}) or the name of a packaged config (`diffuse config list`)")
    close = difflib.get_close_matches(stem, packaged_configs(), n=1)
    hint = f"did you mean `{close[0]}`? " if close else ""
    raise FileNotFoundError(f"config {name} not found: {hint}pass a TOML file or the name of a packaged config: "
                            f"{', '.join(packaged_configs())} (`diffuse config show NAME` prints one)")


def load_config(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """Read a TOML config file, or a packaged config by its NAME (config_path); keys it leaves out keep the defaults
    (or `base`).

    An empty file is the defaults, except a run folder's saved `config.toml`, which `save_config` never leaves empty:
    an empty one was cut off while being written by an older version (a full disk), and reading it as the defaults
    would make a resume compare the run with the wrong settings, so it is a ConfigError naming the file and the fix,
    as a file that is not valid TOML is."""
    path = config_path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a text file ({e}); {_config_fix(path)}") from None
    if not text.strip() and path.name == RUN_CONFIG:
        raise ConfigError(f"{path} is empty: a write of it was cut off (e.g. by a full disk), so the run's settings are "
                          f"not in it; {_config_fix(path)}")
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML ({e}); {_config_fix(path)}") from e
    return from_dict(d, base)


RUN_CONFIG = "config.toml"  # the name of the full config a run folder saves (save_config)


def _config_fix(path: Path) -> str:
    """What to do about a config file that cannot be read: a run folder's depends on whether it holds checkpoints."""
    if path.name != RUN_CONFIG:
        return "fix the file (the line and column are named above) or pass another config"
    if latest_step(path.parent) is None:
        return (f"{path.parent} holds no checkpoint, so nothing is lost: delete {path} and run `diffuse train CONFIG "
                f"--out {path.parent}` again")
    return (f"{path.parent} holds checkpoints but their settings are in this file: write the config the run was trained "
            f"with (the TOML file with your --set values applied) to {path}, then resume")


def save_config(cfg: RunConfig, path: str | Path, omit: tuple[str, ...] = ()) -> None:
    """Write the full config as TOML, atomically (checkpoint.write_atomically): a failed write (a full disk) leaves any
    earlier file as it was and raises checkpoint.WriteError naming the file. `omit`: sections the run's kind ignores
    whole (kinds.ignored_sections), left out so that a later change of their defaults never makes the saved config
    refuse to load (check_unused) or to resume."""
    write_atomically(path, tomli_w.dumps({k: v for k, v in to_dict(cfg).items() if k not in omit}))


# (section.key, why it is unused, the fix): settings that the current choice of another setting ignores
def _unused(cfg: RunConfig) -> list[tuple[str, str, str]]:
    d, sc, m, t, smp = cfg.data, cfg.schedule, cfg.model, cfg.train, cfg.sample

    out = []
    if d.source not in ("photos", "shapes", "moving_digits"):
        out.append(("data.crops", f'data.source = "{d.source}" takes whole {"files" if d.source == "video_folder" else "images"}',
                    'set data.source = "photos" or "shapes" (or "moving_digits": its number of videos), or remove it'))
    if d.path and d.source not in ("folder", "video_folder"):
        out.append(("data.path", f'data.source = "{d.source}" trains on the {"generated" if d.source in ("shapes", "moving_digits") else "bundled"} {d.source} images',
                    'set data.source = "folder" (or "video_folder") to train on the folder, or remove data.path'))
    if d.source != "video_folder":
        out.append(("data.frame_stride", f'data.source = "{d.source}" reads no video files', 'set data.source = "video_folder" or remove it'))
    if d.source != "moving_digits":
        out += [(f"data.{k}", f'data.source = "{d.source}" is not moving digits', 'set data.source = "moving_digits" or remove it')
                for k in ("digits_per_video", "digit_size", "velocity", "bounce")]
    if sc.kind not in ("linear", "scaled_linear", "sigmoid"):
        out += [(f"schedule.{k}", f'schedule.kind = "{sc.kind}" has no betas from beta_start to beta_end',
                 'set schedule.kind = "linear" (or "scaled_linear", "sigmoid") or remove it')
                for k in ("beta_start", "beta_end") if (sc.kind, k) != ("constant", "beta_end")]
    if sc.kind not in ("cosine", "vp_cosine"):
        out.append(("schedule.cosine_s", f'schedule.kind = "{sc.kind}" is not a cosine schedule', 'set schedule.kind = "cosine" or remove it'))
    if sc.kind != "cosine":
        out.append(("schedule.max_beta", f'schedule.kind = "{sc.kind}" has no discrete cosine betas', 'set schedule.kind = "cosine" or remove it'))
    if sc.kind not in DISCRETE_KINDS:
        out.append(("schedule.T", f'schedule.kind = "{sc.kind}" is a continuous-time process with no T steps', "remove it"))
        out.append(("schedule.zero_terminal_snr", f'schedule.kind = "{sc.kind}" is not a discrete beta schedule (Lin et al. 2024 '
                    "rescale betas)", 'use schedule.kind = "linear" or "cosine" (or another of ' + ", ".join(DISCRETE_KINDS) + "), or remove it"))
    if sc.kind != "edm":
        out += [(f"schedule.{k}", f'schedule.kind = "{sc.kind}" is not EDM', 'set schedule.kind = "edm" or remove it')
                for k in ("sigma_min", "sigma_max", "p_mean", "p_std")]
    if sc.kind != "flow":
        out += [(f"schedule.{k}", f'schedule.kind = "{sc.kind}" is not rectified flow', 'set schedule.kind = "flow" or remove it')
                for k in ("t_sampling", "logit_mean", "logit_std")]
    elif sc.t_sampling == "uniform":
        out += [(f"schedule.{k}", 'schedule.t_sampling = "uniform" draws t without a logit-normal', "remove it")
                for k in ("logit_mean", "logit_std")]
    if not t.fid_every:
        out += [(f"train.{k}", "train.fid_every = 0 measures no FID during training", "set train.fid_every or remove it")
                for k in ("fid_samples", "fid_steps", "fid_features")]
    if not t.posthoc_ema:
        out.append(("train.ema_snapshot_every", "train.posthoc_ema is empty (no power-function EMA tracks to snapshot)",
                    "set train.posthoc_ema = [0.05, 0.10] or remove it"))
    if m.prediction != "edm":
        out.append(("model.sigma_data", f'model.prediction = "{m.prediction}" has no EDM preconditioning', 'set model.prediction = "edm" or remove it'))
    k = cfg.task
    if k.kind != "superres":
        out += [(f"task.{f}", f'task.kind = "{k.kind}" is not super-resolution', 'set task.kind = "superres" or remove it')
                for f in ("factor", "noise_aug_max", "aug_level")]
    elif k.noise_aug_max == 0:
        out.append(("task.aug_level", "task.noise_aug_max = 0 trains without noise-conditioning augmentation",
                    "set task.noise_aug_max > 0 or remove it"))
    if k.kind != "inpaint":
        out.append(("task.mask", f'task.kind = "{k.kind}" draws no inpainting masks', 'set task.kind = "inpaint" or remove it'))
    if k.kind != "uncrop":
        out.append(("task.keep", f'task.kind = "{k.kind}" is not uncropping', 'set task.kind = "uncrop" or remove it'))
    if k.kind != "jpeg":
        out.append(("task.jpeg_quality", f'task.kind = "{k.kind}" is not JPEG restoration', 'set task.kind = "jpeg" or remove it'))
    if t.loss != "simple":
        out.append(("train.loss_norm", f'train.loss = "{t.loss}" is not L_simple', 'set train.loss = "simple" or remove it'))
    out.append(("train.num_workers", "the images are decoded once when the data loads (or per batch in the training "
                "process for folders too large for memory), so there are no loader workers", "remove it"))
    if smp.guidance_interval and not smp.guidance:
        out.append(("sample.guidance_interval", "sample.guidance = 0 guides nowhere", "set sample.guidance > 0 or remove it"))
    if smp.dynamic_threshold > 0:
        out.append(("sample.clip", "sample.dynamic_threshold > 0 replaces clipping", "remove it"))
    if not cfg.latent.autoencoder:
        out += [(f"latent.{k}", "latent.autoencoder is empty (the model works on pixels)",
                 "name the autoencoder run in latent.autoencoder or remove it") for k in ("scale_factor", "cache", "autoencoder_step")]
    takes = SAMPLERS[smp.sampler].options
    for key in ("eta", "variance"):
        if key not in takes:
            out.append((f"sample.{key}", f'sample.sampler = "{smp.sampler}" takes no {key}',
                        "remove it, or pick a sampler that takes it (" + ", ".join(k for k, v in SAMPLERS.items() if key in v.options) + ")"))
    return out


def check_unused(cfg: RunConfig, kind_rules: list[tuple[str, str, str]] = ()) -> None:
    """Refuse settings that do nothing under the current choice of another one (a data.path with a bundled
    source, cosine_s with linear betas, ...): a ConfigError naming each, why it is ignored, and the fix.
    `kind_rules` are the model kind's own (kinds: Objective.unused, e.g. the [autoencoder] section of a diffusion run).
    A setting counts as given when it differs from its default (what an unset key holds)."""
    defaults = RunConfig()
    given = []
    for key, why, fix in [*_unused(cfg), *kind_rules]:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value != getattr(getattr(defaults, section), name):
            given.append(f"{key} = {value!r} is ignored because {why}; {fix}")
    if given:
        raise ConfigError("; ".join(given))


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.lr=1e-4' -> ('train', 'lr', 1e-4). Values are TOML (a list: model.channel_mult=[1,2]; an empty one:
    train.posthoc_ema=[]; a table: train.condition_dropout={label=0.1}); a bare word is a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as cosine or ./my/images
    return section, name, value


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """`cfg` with `--set section.key=value` overrides applied (parse_override). An override that switches a feature off
    takes the settings that only that feature reads with it: those the file gave (used before, unused now, not
    themselves overridden) go back to their defaults instead of being refused by check_unused, so
    `--set train.posthoc_ema=[]` turns post-hoc EMA off in a config that sets train.ema_snapshot_every."""
    d: dict[str, dict[str, Any]] = {}
    for text in overrides:
        section, name, value = parse_override(text)
        d.setdefault(section, {})[name] = value
    out = from_dict(d, cfg)
    given = {f"{s}.{k}" for s, keys in d.items() for k in keys}
    unused_before = {key for key, _, _ in _unused(cfg)}
    defaults = RunConfig()
    for key, _, _ in _unused(out):
        if key not in given and key not in unused_before:
            section, name = key.split(".")
            setattr(getattr(out, section), name, copy.deepcopy(getattr(getattr(defaults, section), name)))
    return out


# settings that change neither the weights nor the random draws of a step: free to change on resume
FREE_ON_RESUME = {"train": {"steps", "time_limit", "log_every", "log_to", "sample_every", "checkpoint_every", "keep_checkpoints",
                            "num_workers", "ema_snapshot_every", "fid_every", "fid_samples", "fid_steps", "fid_features",
                            "compile", "channels_last", "data_on_device"}}


def trajectory_settings(cfg: RunConfig) -> dict:
    """The settings of a config that a training run's trajectory depends on: every section but [sample], without
    FREE_ON_RESUME."""
    d = to_dict(cfg)
    d.pop("sample")
    return {s: {k: v for k, v in vals.items() if k not in FREE_ON_RESUME.get(s, ())} for s, vals in d.items()}


def resume_changes(saved: RunConfig, cfg: RunConfig) -> str:
    """The settings that differ between a run folder's saved config and the config it is resumed with, in words
    ("train.lr: 0.001 -> 0.002; ...", at most five named), ignoring those free to change; "" when none do."""
    a, b = trajectory_settings(saved), trajectory_settings(cfg)
    out = [f"{s}.{k}: {a[s][k]!r} -> {b[s][k]!r}" for s in a for k in a[s] if a[s].get(k) != b.get(s, {}).get(k)]
    return "; ".join(out[:5]) + (f"; and {len(out) - 5} more" if len(out) > 5 else "")
