"""A trained run written as a diffusers folder (`diffuse export RUN --format diffusers --out DIR`): the inverse of
pretrained.py, which reads such folders.

DIR is a pipeline folder as `DDPMPipeline.save_pretrained` writes it: `unet/` (a UNet2DModel: config.json and
diffusion_pytorch_model.safetensors), `scheduler/` (scheduler_config.json) and model_index.json, so that
`DDPMPipeline.from_pretrained(DIR)` / `DDIMPipeline.from_pretrained(DIR)` sample it and `diffuse sample DIR` reads it
back. Three maps, each a function:

- `unet_config`: diffuse's U-Net (nets/unet.py, the DDPM U-Net) block for block as diffusers' UNet2DModel: a level of
  `num_res_blocks` residual blocks is a DownBlock2D (AttnDownBlock2D where it has self-attention), its expanding twin
  an UpBlock2D / AttnUpBlock2D of one block more; the middle is UNetMidBlock2D (resnet, attention, resnet); the time
  embedding is diffusers' positional one with freq_shift = 1 and sin before cos (frequencies 10000^(-i/(d/2 - 1)),
  nets.blocks.timestep_embedding), GroupNorm eps 1e-6; class labels are `num_class_embeds` = classes + 1 (the last
  row is diffuse's null label of classifier-free guidance). A network diffusers' classes cannot express is refused by
  name (`check_exportable`).
- `unet_weights`: the state dict renamed (`emb` -> `time_emb_proj`, `skip` -> `conv_shortcut`, the 1x1-conv qkv of an
  attention block split into the linear to_q / to_k / to_v), loaded strictly, so a tensor left over is an error.
- `scheduler_config`: the process and the run's sampler as the scheduler that samples it: a discrete VP run as
  DDPMScheduler (sample.sampler = "ddpm") or DDIMScheduler (every other sampler: DDIM is diffusers' deterministic
  sampler that DDIMPipeline runs) with the beta schedule by name (or `trained_betas` where diffusers has no name for
  it), zero terminal SNR as rescale_betas_zero_snr, the prediction type, clipping and the grid's spacing
  (set_alpha_to_one = true and steps_offset = 0: diffuse's grids end at alphabar = 1 and start at step T); a flow run
  as FlowMatchEulerDiscreteScheduler (timesteps 1000 t, shift 1).

With the same grid and noise the pipelines reproduce `diffuse sample RUN` to 1e-5 in float32 (tests/test_export.py),
for DDPMPipeline and DDIMPipeline (use_clipped_model_output=True) on a VP run. diffusers' flow scheduler starts its
default grid at sigma = 1 where diffuse's flow grids start at t_top = 0.994 (schedule.LOG_SNR_MIN) with x_T scaled by
the prior's std there: pass diffuse's grid as `set_timesteps(sigmas=...)` to reproduce a flow run's samples.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import checkpoint as ckpt
from .config import RunConfig, load_config
from .kinds.diffusion import augment_dim
from .pretrained import BETA_SCHEDULES, EXPORT_FILE, FLOW_FIXED, FLOW_SCHEDULER, INSTALL, PREDICTIONS, SPACINGS
from .schedule import DISCRETE_KINDS, LOG_SNR_MIN, Schedule, cosine_betas, schedule_from_config

NAMED_BETAS = {ours: theirs for theirs, ours in BETA_SCHEDULES.items()}  # model's schedule.kind -> diffusers' beta_schedule
PREDICTION_TYPES = {ours: theirs for theirs, ours in PREDICTIONS.items()}  # model.prediction -> prediction_type
DDPM_VARIANCE = {"beta_tilde": "fixed_small", "beta": "fixed_large"}       # sample.variance -> variance_type


def check_exportable(cfg: RunConfig) -> None:
    """ValueError naming the setting when the run of `cfg` cannot be written as a diffusers UNet2DModel and scheduler:
    another kind of run, latent diffusion, a network feature UNet2DModel lacks (a condition image, self-conditioning,
    scalar inputs, cross-attention or text, a semantic code, patching, a stem narrower than the first level, a head
    count over attention blocks of several widths), EDM preconditioning, a continuous VP or VE process, or a
    prediction the process's scheduler cannot take."""
    m, s = cfg.model, cfg.schedule
    if m.kind != "denoiser":
        raise ValueError(f"model.kind = {m.kind!r}: diffusers' UNet2DModel pipelines sample denoisers (model.kind = "
                         "'denoiser'); this run is no such network")
    if cfg.latent.autoencoder:
        raise ValueError(f"latent.autoencoder = {cfg.latent.autoencoder!r}: a latent-diffusion run's samples are decoded "
                         "by its autoencoder, which a UNet2DModel pipeline (pixels only) has no place for; export a "
                         "pixel-space run")
    features = [(m.video, "a video network (model.video: temporal attention over frames): UNet2DModel is an image "
                          "network (diffusers' UNet3DConditionModel is another design)"),
                (cfg.task.kind != "none" or m.cond_channels > 0, f"a condition image concatenated to x_t (task.kind = "
                 f"{cfg.task.kind!r}, model.cond_channels = {m.cond_channels}): UNet2DModel takes x_t alone"),
                (m.self_condition, "self-conditioning (model.self_condition): UNet2DModel has no input for the previous "
                                   "x_0 estimate"),
                (m.scalar_inputs > 0, f"model.scalar_inputs = {m.scalar_inputs} (a cascade's noise level): UNet2DModel "
                                      "embeds the time and a class only"),
                (bool(m.context_dim or m.text_encoder), "cross-attention on a context or caption (model.context_dim, "
                 "model.text_encoder): UNet2DModel has none (diffusers' UNet2DConditionModel is another network)"),
                (m.semantic_dim > 0, f"model.semantic_dim = {m.semantic_dim} (a diffusion autoencoder's code scaling "
                                     "every block): UNet2DModel has no such input"),
                (m.patch_size > 1, f"model.patch_size = {m.patch_size}: UNet2DModel has no pixel unshuffle around "
                                   "its convolutions"),
                (m.channel_mult[0] != 1, f"model.channel_mult[0] = {m.channel_mult[0]}: diffuse's first convolution is "
                 f"model.channels = {m.channels} wide and its first level {m.channels * m.channel_mult[0]}, where "
                 "UNet2DModel's conv_in is as wide as its first level; train with channel_mult starting at 1")]
    for present, why in features:
        if present:
            raise ValueError(f"{why}; diffusers cannot express this network")
    if m.num_heads > 1 and len(attention_widths(cfg)) > 1:
        raise ValueError(f"model.num_heads = {m.num_heads} over attention blocks of widths {sorted(attention_widths(cfg))}: "
                         "UNet2DModel fixes the width of a head (attention_head_dim), not their number, so its blocks of "
                         "different widths would have different head counts; diffusers cannot express this network "
                         "(num_heads = 1, or attention at one width, exports)")
    if m.prediction == "edm":
        raise ValueError("model.prediction = 'edm' (EDM's preconditioning around the network): diffusers' DDPM and DDIM "
                         "schedulers take eps, x0 or v outputs of the bare network; export a run of another prediction")
    if s.kind == "flow":
        if m.prediction != "flow":
            raise ValueError(f"schedule.kind = 'flow' with model.prediction = {m.prediction!r}: diffusers' "
                             "FlowMatchEulerDiscreteScheduler takes the velocity (model.prediction = 'flow')")
    elif s.kind not in DISCRETE_KINDS:
        raise ValueError(f"schedule.kind = {s.kind!r}, a process in continuous time: diffusers' DDPM and DDIM schedulers "
                         f"number T discrete steps; export a run of a discrete schedule ({', '.join(DISCRETE_KINDS)}) or flow")
    elif m.prediction not in PREDICTION_TYPES:
        raise ValueError(f"model.prediction = {m.prediction!r} on the discrete VP process: diffusers' DDPM and DDIM "
                         f"schedulers take {', '.join(PREDICTION_TYPES)}")


def attention_widths(cfg: RunConfig) -> set[int]:
    """The widths of the U-Net's self-attention blocks: its levels at model.attention_resolutions, and the middle."""
    m = cfg.model
    size = cfg.data.image_size // m.patch_size
    widths = {m.channels * mult for i, mult in enumerate(m.channel_mult) if size // 2**i in m.attention_resolutions}
    return widths | {m.channels * m.channel_mult[-1]}


def unet_config(cfg: RunConfig, num_classes: int) -> dict:
    """UNet2DModel's constructor arguments for the U-Net of `cfg` (checked with `check_exportable`) with `num_classes`
    classes in its data (0 or a network that is not class-conditional: no class embedding)."""
    m, d = cfg.model, cfg.data
    check_exportable(cfg)
    levels = len(m.channel_mult)
    attends = [d.image_size // 2**i in m.attention_resolutions for i in range(levels)]
    width = max(attention_widths(cfg))
    return dict(sample_size=d.image_size, in_channels=d.channels, out_channels=d.channels * (2 if m.learned_variance else 1),
                block_out_channels=[m.channels * k for k in m.channel_mult], layers_per_block=m.num_res_blocks,
                down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attends],
                up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
                attention_head_dim=None if m.num_heads == 1 else width // m.num_heads,  # None: one head as wide as the block
                norm_num_groups=m.norm_groups, norm_eps=1e-6, dropout=m.dropout, act_fn="silu",
                time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1, center_input_sample=False,
                downsample_padding=1, downsample_type="conv", upsample_type="conv", add_attention=True,
                resnet_time_scale_shift="default", mid_block_scale_factor=1,
                num_class_embeds=num_classes + 1 if m.class_conditional and num_classes else None)


_RESNET = {"emb": "time_emb_proj", "skip": "conv_shortcut"}  # a residual block's tensors diffusers names otherwise
_RULES = [(re.compile(p), r) for p, r in (
    (r"^time_mlp\.0\.", "time_embedding.linear_1."), (r"^time_mlp\.2\.", "time_embedding.linear_2."),
    (r"^label_emb\.", "class_embedding."), (r"^norm_out\.", "conv_norm_out."),
    (r"^(down|up)\.(\d+)\.blocks\.(\d+)\.", r"\1_blocks.\2.resnets.\3."),
    (r"^(down|up)\.(\d+)\.attns\.(\d+)\.", r"\1_blocks.\2.attentions.\3."),
    (r"^downsample\.(\d+)\.conv\.", r"down_blocks.\1.downsamplers.0.conv."),
    (r"^upsample\.(\d+)\.conv\.", r"up_blocks.\1.upsamplers.0.conv."),
    (r"^mid1\.", "mid_block.resnets.0."), (r"^mid2\.", "mid_block.resnets.1."), (r"^mid_attn\.", "mid_block.attentions.0."))]


def unet_weights(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffuse's U-Net state dict under UNet2DModel's names. A self-attention block's qkv, a 1x1 convolution (3C, C, 1, 1)
    whose output rows are [q; k; v] with heads in consecutive channels, becomes the linear layers to_q, to_k, to_v
    (C, C) (diffusers splits heads the same way); its out convolution to_out.0, its norm group_norm. The augmentation
    map of non-leaking augmentation (augment_map, without bias) is left out: sampling feeds it zeros, so it adds
    nothing."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("augment_map."):
            continue
        for pattern, repl in _RULES:
            name = pattern.sub(repl, name)
        if ".resnets." in name:
            head, leaf, kind = name.rsplit(".", 2)
            name = f"{head}.{_RESNET.get(leaf, leaf)}.{kind}"
        elif ".attentions." in name:
            head, leaf, kind = name.rsplit(".", 2)
            if leaf == "qkv":
                for part, chunk in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0)):
                    out[f"{head}.{part}.{kind}"] = chunk.flatten(1) if kind == "weight" else chunk
                continue
            name = f"{head}.{'to_out.0' if leaf == 'out' else 'group_norm' if leaf == 'norm' else leaf}.{kind}"
            tensor = tensor.flatten(1) if leaf == "out" and kind == "weight" else tensor
        out[name] = tensor
    return out


def scheduler_config(cfg: RunConfig) -> tuple[str, dict]:
    """(the diffusers scheduler class's name, its config) that samples the process of `cfg` as its [sample] section
    says (the module docstring). Warns (UserWarning) where diffusers' sampling will differ from `diffuse sample` on the
    run: a sampler other than ddpm or ddim, a grid spacing diffusers' schedulers lack, dynamic thresholding, a grid
    that starts below step T."""
    s, m, sample = cfg.schedule, cfg.model, cfg.sample
    if s.kind == "flow":
        if sample.clip:
            _differs("sample.clip = true: diffusers' flow scheduler never clips x_0 (and `diffuse sample DIR` reads the "
                     "export without clipping; pass --no-clip to the run to compare)")
        return FLOW_SCHEDULER, {k: v for k, v in FLOW_FIXED.items() if v is not None}
    kind = "DDPMScheduler" if sample.sampler == "ddpm" or m.learned_variance else "DDIMScheduler"
    if sample.sampler not in ("ddpm", "ddim"):
        _differs(f"sample.sampler = {sample.sampler!r} is written as {kind} ({'the learned variance needs DDPM' if m.learned_variance else 'DDIMPipeline runs DDIM'}); "
                 f"`diffuse sample DIR --sampler {sample.sampler}` samples the export as the run does")
    spacing = sample.spacing
    if spacing not in SPACINGS:
        _differs(f"sample.spacing = {spacing!r} has no diffusers timestep_spacing; written as 'trailing'")
        spacing = "trailing"
    if sample.dynamic_threshold:
        _differs(f"sample.dynamic_threshold = {sample.dynamic_threshold} is not written (diffuse reads no diffusers "
                 f"thresholding); sample with `diffuse sample DIR --threshold dynamic:{sample.dynamic_threshold}`")
    schedule = schedule_from_config(s)
    if isinstance(schedule, Schedule) and schedule.top_step < schedule.T:
        _differs(f"diffuse's grids of this schedule start at step {schedule.top_step} (log-SNR above "
                 f"{LOG_SNR_MIN}), diffusers' at step T = {schedule.T}: their samples differ")
    conf = dict(num_train_timesteps=s.T, beta_start=s.beta_start, beta_end=s.beta_end,
                prediction_type=PREDICTION_TYPES[m.prediction], clip_sample=bool(sample.clip), clip_sample_range=1.0,
                thresholding=False, timestep_spacing=spacing, steps_offset=0, rescale_betas_zero_snr=s.zero_terminal_snr)
    named = NAMED_BETAS.get(s.kind)
    if s.kind == "cosine" and (s.cosine_s, s.max_beta) != (0.008, 0.999):  # squaredcos_cap_v2 fixes both
        named = None
    if named:
        conf["beta_schedule"] = named
    else:  # constant betas, a cosine of another offset: the betas themselves (before any zero-SNR rescaling)
        betas = cosine_betas(s.T, s.cosine_s, s.max_beta) if s.kind == "cosine" else torch.full((s.T,), float(s.beta_end))
        conf.update(beta_schedule="linear", trained_betas=[float(b) for b in betas])
    if kind == "DDPMScheduler":
        conf["variance_type"] = "learned_range" if m.learned_variance else DDPM_VARIANCE[sample.variance]
    else:
        conf["set_alpha_to_one"] = True
    return kind, conf


def _differs(what: str) -> None:
    warnings.warn(f"{what}: diffusers' pipeline samples the export otherwise than `diffuse sample` samples the run",
                  UserWarning, stacklevel=3)


def export_diffusers(run_dir: str | Path, out: str | Path, *, ema: bool = True, step: int | None = None) -> Path:
    """Write the run in `run_dir` (its EMA weights, or the raw ones with ema=False, of checkpoint `step` or the newest)
    as a diffusers pipeline folder `out` (the module docstring); returns `out`.

    Everything is checked before a weight loads: FileNotFoundError when `run_dir` holds no run, ValueError from
    `check_exportable` and when `out` is a file or a non-empty folder (an export never overwrites), ImportError naming
    the install command without diffusers. The folder is written under a temporary name beside `out` and renamed into
    place, so a failed export leaves no half folder."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.toml); export a folder written by `diffuse train`")
    cfg = load_config(run_dir / "config.toml")
    check_exportable(cfg)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; an export never overwrites: choose another --out")
    try:
        import diffusers
    except ImportError:
        raise ImportError(f"exporting to diffusers needs diffusers: {INSTALL}") from None
    c = ckpt.load_checkpoint(run_dir, step)
    num_classes = int(c.state.get("num_classes", 0))
    kind, sched = scheduler_config(cfg)
    unet = diffusers.UNet2DModel(**unet_config(cfg, num_classes))
    weights = unet_weights(c.tensors["ema" if ema else "model"])
    if augment_dim(cfg):
        warnings.warn("the network's augmentation map (train.augment_p > 0) is left out: sampling feeds it zeros",
                      UserWarning, stacklevel=2)
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{run_dir}: the checkpoint's tensors do not map onto UNet2DModel (missing {missing[:3]}, left "
                         f"over {unexpected[:3]}); the network differs from the config.toml beside it")
    scheduler = getattr(diffusers, kind).from_config(sched)
    pipeline = (diffusers.DDIMPipeline if kind == "DDIMScheduler" else diffusers.DDPMPipeline)(unet=unet, scheduler=scheduler)
    classes = num_classes if unet.config.num_class_embeds else 0
    record = {"run": str(run_dir), "step": c.step, "weights": "ema" if ema else "model", "num_classes": classes,
              "null_label": classes if classes else None,  # the last class row: "no class" (pretrained.num_classes)
              "condition_dropout": dict(cfg.train.condition_dropout)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        ckpt.write_atomically(tmp / EXPORT_FILE, json.dumps(record, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
