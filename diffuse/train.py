"""Training (Ho et al. 2020, Algorithm 1) as a Trainer that can stop and resume exactly.

repeat: x_0 ~ q(x_0); t ~ Uniform{1..T}; eps ~ N(0, I);
        gradient step on || eps - eps_theta(sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps, t) ||^2

around it: Adam with linear warm-up, gradient clipping, an EMA of the weights, mixed precision
where the device supports it, periodic checkpoints, sample grids, a JSONL log and a loss curve.

Determinism: every random draw of a step (data order, flips, t, eps) comes from the trainer's
own generator or from the step's seed, and is made for the whole global batch before each
process takes its slice; dropout masks come from the global RNG, identical on every rank, and
are likewise drawn for the global batch (nets.unet.ShardedDropout). So a step computes the same
gradient whatever the number of processes (DDP averages the per-process means of equal
slices), and resuming restores the generator, the data position, optimizer, LR schedule, EMA
and grad scaler exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from . import checkpoint as ckpt
from .augment import apply as augment_apply, draw as augment_draw
from .config import RunConfig, check_unused, load_config, save_config, to_dict
from .data import ImageDataset, load_dataset
from .latent import PixelSpace, check_latent_config, prepare_latent_training, resolve_latent_config
from .likelihood import bits_per_dim, vlb_term
from .losses import ImportanceSampler, classifier_loss, hybrid_loss, l_simple
from .nets.unet import ShardedDropout
from .posthoc_ema import SIGMA_REL_MAX, PowerEMA, snapshot_steps
from .sample import (  # noqa: F401  (load_run, load_classifier, generate: the sampling API lived here before sample.py)
    autocast_dtype, cpu_has_native_bf16,
    build_denoiser, build_model, condition_spec, default_labels, generate, load_classifier, load_run, sample_config_kwargs)
from .samplers import SAMPLERS
from .tasks.image_to_image import check_task, condition_keys as task_condition_keys, training_condition, viewable
from .schedule import Schedule
from .visualize import plot_loss, save_grid, to_uint8


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or weight; the step is not applied, and the message says
    what the last checkpoint holds (every checkpoint is written only with finite weights)."""


class ResumeError(RuntimeError):
    """A run folder cannot be resumed exactly as asked."""


SUSPECT_WEIGHT = 1e3  # a checkpoint with a larger |weight| is called likely diverged in the non-finite messages


class EMA:
    """theta_ema <- d * theta_ema + (1 - d) * theta after every step (DDPM: decay 0.9999).

    With `warmup`, d = min(decay, (1 + n) / (10 + n)) at update n (as TensorFlow's
    ExponentialMovingAverage with num_updates): without it, a short run's average would still be
    dominated by the initial weights (0.999^400 = 0.67).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, n: int) -> None:
        """Fold in the weights after update n (0-based)."""
        ema = list(self.model.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - self.decay_at(n))
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def _distributed() -> tuple[int, int]:
    """(rank, world size), initialising the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of train.mixed_precision on `device` (sample.autocast_dtype)."""
    return autocast_dtype(mode, device, "train.mixed_precision")


class Captioned:
    """A captioned dataset (its `captions`, one per image) with each caption's tokens (text.py) under the condition key
    "text": the interface of data.ImageDataset. Tokenized once, by the model's own text encoder."""

    def __init__(self, base, encoder):
        self.base, self.tokens = base, encoder.tokenize(list(base.captions))
        self.num_classes, self.condition_keys, self.captions = base.num_classes, (*base.condition_keys, "text"), base.captions

    def __len__(self) -> int:
        return len(self.base)

    def batch(self, idx: Tensor) -> tuple[Tensor, dict]:
        x, cond = self.base.batch(idx)
        return x, {**cond, "text": self.tokens[idx]}


def lr_factor(step: int, t) -> float:
    """The learning rate at optimizer step `step` (0-based) over train.lr: a linear warm-up min(1, (step + 1) / warmup)
    (DDPM: 5000 steps), times the decay of train.lr_schedule after it: "constant" 1; "cosine" (1 + cos(pi p)) / 2 with
    p = (step - warmup) / (steps - warmup) (Loshchilov & Hutter 2017, no restarts; 0 at train.steps); "inverse_sqrt"
    1 / sqrt(max(step / warmup, 1)) (EDM2's decay, Karras et al. 2024, with t_ref = the warm-up)."""
    warm = t.warmup_steps
    factor = min(1.0, (step + 1) / warm) if warm else 1.0
    if t.lr_schedule == "cosine":
        p = min(max((step - warm) / max(t.steps - warm, 1), 0.0), 1.0)
        factor *= 0.5 * (1 + math.cos(math.pi * p))
    elif t.lr_schedule == "inverse_sqrt":
        factor /= math.sqrt(max(step / warm, 1.0))
    return factor


def _validate(cfg: RunConfig, world: int, dataset: ImageDataset) -> None:
    t = cfg.train
    schedule = Schedule.from_config(cfg.schedule)
    spec = condition_spec(cfg, dataset.num_classes)
    unknown_drop = sorted(k for k in t.condition_dropout if k not in spec.keys)
    check_task(cfg.task, cfg.data.channels, cfg.data.image_size, cfg.model.cond_channels, cfg.model.scalar_inputs)
    captioned = cfg.model.text_encoder and getattr(dataset, "captions", None) is not None
    yields = (*dataset.condition_keys, *task_condition_keys(cfg.task), *(("text",) if captioned else ()))
    missing = [k for k in spec.keys if k not in yields] if cfg.model.kind == "denoiser" else []
    checks = [
        (t.steps >= 1, f"train.steps must be >= 1, got {t.steps}"),
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (t.batch_size % world == 0, f"train.batch_size = {t.batch_size} must be divisible by the number of processes ({world})"),
        (t.grad_accumulation >= 1 and (t.batch_size // world) % t.grad_accumulation == 0,
         f"train.grad_accumulation = {t.grad_accumulation} must be >= 1 and divide each process's batch "
         f"(train.batch_size {t.batch_size} / {world} process(es) = {t.batch_size // world})"),
        (t.lr_schedule != "inverse_sqrt" or t.warmup_steps >= 1,
         "train.lr_schedule = 'inverse_sqrt' decays from the end of the warm-up: set train.warmup_steps >= 1"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}"),
        (t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {t.grad_clip}"),
        (0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}"),
        (t.min_snr_gamma > 0, f"train.min_snr_gamma must be > 0, got {t.min_snr_gamma}"),
        (all(0 < s <= SIGMA_REL_MAX for s in t.posthoc_ema) and len(set(t.posthoc_ema)) == len(t.posthoc_ema),
         f"train.posthoc_ema lists the sigma_rel of each power-function EMA track, distinct values in (0, {SIGMA_REL_MAX:.4f}] "
         f"(EDM2: [0.05, 0.10]), got {t.posthoc_ema}"),
        (t.ema_snapshot_every >= 1, f"train.ema_snapshot_every must be >= 1, got {t.ema_snapshot_every}"),
        (t.fid_every >= 0 and t.fid_steps >= 0, f"train.fid_every and train.fid_steps must be >= 0, got {t.fid_every}, {t.fid_steps}"),
        (t.fid_samples >= 2, f"train.fid_samples must be >= 2 (and above the feature dimension, e.g. 500), got {t.fid_samples}"),
        (not t.fid_every or t.fid_features != "digits" or cfg.data.channels == 1,
         f"train.fid_features = 'digits' measures 1-channel digits and the data has {cfg.data.channels} channels; give "
         "train.fid_features = 'inception:PATH' (the FID Inception-v3 weights file) or 'MODULE:ATTR' (your feature network)"),
        (t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}"),
        (t.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {t.checkpoint_every}"),
        (t.sample_every >= 0, f"train.sample_every must be >= 0, got {t.sample_every}"),
        (t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}"),
        (t.time_limit >= 0, f"train.time_limit must be >= 0 seconds, got {t.time_limit}"),
        (len(dataset) >= t.batch_size, f"the dataset has {len(dataset)} images, fewer than train.batch_size = {t.batch_size}; "
                                       "lower train.batch_size"),
        (cfg.sample.steps >= 0, f"sample.steps must be >= 0 (0: every step), got {cfg.sample.steps}"),
        (schedule.T is None or cfg.sample.steps <= schedule.top_step,
         f"sample.steps = {cfg.sample.steps} is more than the schedule's {getattr(schedule, 'top_step', '')} "
         "sampling steps (Schedule.top_step); lower it, or 0 for every step"),
        (schedule.kind != "edm" or cfg.sample.spacing in ("karras", "log_snr"),
         f"sample.spacing = '{cfg.sample.spacing}' is uniform in t, and EDM's sigma = t sigma_max, so its grid would end at "
         "sigma = sigma_max / steps (a blurred final prediction); use sample.spacing = 'karras' (EDM eq. 5) or 'log_snr'"),
        (schedule.T is not None or cfg.sample.steps >= 1,
         f"sample.steps = 0 means every discrete step, and the {schedule.kind} process is continuous: give a number"),
        (schedule.T is not None or (t.loss == "simple" and not cfg.model.learned_variance),
         f"train.loss = '{t.loss}' and learned variances use the discrete bound (Ho et al. 2020, eq. 5) of the DDPM "
         f"schedules (linear, cosine); the {schedule.kind} process takes train.loss = 'simple'"),
        (0 <= t.augment_p <= 1, f"train.augment_p must be a probability in [0, 1] (EDM: 0.12), got {t.augment_p}"),
        (0 <= t.offset_noise <= 1, f"train.offset_noise must be in [0, 1] (typical 0.05-0.1), got {t.offset_noise}"),
        (t.p2_k > 0 and t.p2_gamma >= 0, f"train.p2_k must be > 0 and train.p2_gamma >= 0, got {t.p2_k}, {t.p2_gamma}"),
        (t.loss != "hybrid" or cfg.model.learned_variance,
         "train.loss = 'hybrid' trains a learned variance: set model.learned_variance = true"),
        (t.vlb_lambda >= 0, f"train.vlb_lambda must be >= 0, got {t.vlb_lambda}"),
        (all(0 <= p < 1 for p in t.condition_dropout.values()),
         f"train.condition_dropout probabilities must be in [0, 1), got {t.condition_dropout}"),
        (not unknown_drop, f"train.condition_dropout names {unknown_drop}, which the model does not take; its condition keys "
                           f"are {list(spec.keys)}" + (" (set model.class_conditional = true for 'label')" if "label" in unknown_drop else "")),
        (not cfg.model.text_encoder or captioned,
         f"model.text_encoder = '{cfg.model.text_encoder}' needs captioned images: data.source = 'shapes' (coloured shapes "
         "with captions), or 'mnist' / 'digits' (captioned 'a handwritten seven'), or a dataset with `captions`"),
        (not missing, f"the model takes the condition key(s) {missing} but the data yields only {list(yields)}; set "
                      "[task] kind (superres, colorize, inpaint, uncrop, jpeg: a condition image made from each training "
                      "image), pass a dataset that yields them (Trainer(..., dataset=...)), or remove them from [model]"),
        (cfg.model.kind == "denoiser" or dataset.num_classes >= 2,
         "model.kind = 'classifier' needs a labelled dataset (class sub-folders, mnist or digits)"),
        (cfg.sample.guidance >= 0, f"sample.guidance must be >= 0, got {cfg.sample.guidance}"),
        (not cfg.sample.guidance_interval or (len(cfg.sample.guidance_interval) == 2
                                              and 0 <= cfg.sample.guidance_interval[0] < cfg.sample.guidance_interval[1]),
         f"sample.guidance_interval must be [lo, hi] with 0 <= lo < hi (noise levels sigma/alpha), or [] for every level; "
         f"got {cfg.sample.guidance_interval}"),
        (cfg.sample.guidance == 0 or any(t.condition_dropout.values()),
         "sample.guidance > 0 needs a model trained with condition dropout, e.g. train.condition_dropout = {label = 0.1} "
         "(the null condition is then the unconditional model)"),
        (0 <= cfg.sample.dynamic_threshold <= 1, f"sample.dynamic_threshold must be a percentile in (0, 1] or 0 (off), "
                                                 f"got {cfg.sample.dynamic_threshold}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    try:  # the sample grids of training use these: fail now, not at the first grid
        SAMPLERS[cfg.sample.sampler].check_options({"eta": cfg.sample.eta, "variance": cfg.sample.variance})
    except ValueError as e:
        raise ValueError(f"sample.{e}") from None
    if getattr(schedule, "zero_terminal_snr", False):
        if cfg.model.kind == "denoiser" and cfg.model.prediction in ("eps", "edm"):
            raise ValueError(f'schedule.zero_terminal_snr = true makes alpha_T = 0, where model.prediction = "{cfg.model.prediction}" '
                             'cannot give x_0 (it divides by alpha_T; Lin et al. 2024, sec. 3.2): set model.prediction = "v"')
        if cfg.model.kind == "denoiser" and t.loss_weighting in ("min_snr", "p2"):
            raise ValueError(f"train.loss_weighting = '{t.loss_weighting}' weighs the x_0 error by a multiple of the SNR, 0 at "
                             "the last step of a zero-terminal-SNR schedule, so the step sampling starts from would never "
                             "be trained: use train.loss_weighting = 'none' (the plain v loss of Lin et al. 2024) or 'edm'")
        try:
            SAMPLERS[cfg.sample.sampler].check_schedule(schedule, f"sample.sampler = '{cfg.sample.sampler}'")
            schedule.grid(cfg.sample.steps or None, cfg.sample.spacing)
        except ValueError as e:
            raise ValueError(f"schedule.zero_terminal_snr = true: {e}") from None


class Trainer:
    """Trains the U-Net of a RunConfig into a run folder; an existing run folder is resumed.

    `inexact_resume=True` loads the weights even when some training state is missing or the
    config changed (the continuation then differs from an uninterrupted run). `dataset` replaces the one
    data.load_dataset builds from cfg.data: anything with `__len__`, `batch(idx) -> (x, cond)`, `num_classes`
    and `condition_keys` (data.ImageDataset's interface), e.g. pairs that carry a condition image.
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, inexact_resume: bool = False, progress: bool = True,
                 dataset: ImageDataset | None = None):
        self.run_dir = Path(run_dir)
        self.rank, self.world = _distributed()
        self.is_main = self.rank == 0
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        saved = self.run_dir / "config.toml"
        saved_cfg = load_config(saved) if saved.is_file() else None
        if cfg.latent.autoencoder:  # as prepare_latent_training will resolve it, so that a resume compares like with like
            cfg = resolve_latent_config(cfg, saved_cfg)
        if saved_cfg is not None:
            changed = _diff(_trajectory_keys(saved_cfg), _trajectory_keys(cfg))
            if changed and not inexact_resume:
                raise ResumeError(f"{self.run_dir} holds a run with a different config ({changed}); resume it with its own "
                                  "config (`diffuse train RUN/config.toml --out RUN`), choose a new --out, or pass --inexact-resume")
        check_unused(cfg)  # before the data loads: a setting that would do nothing fails fast
        self.progress = progress and self.is_main
        self.pixels = load_dataset(cfg.data) if dataset is None else dataset  # the images (FID references, task inputs)
        self.dataset, self.space = self.pixels, PixelSpace(cfg.data.channels, cfg.data.image_size)
        if cfg.latent.autoencoder:  # diffusion on z = s E(x) (Rombach et al. 2022), encoded once (latent.cache)
            check_latent_config(cfg, load_config(Path(cfg.latent.autoencoder) / "config.toml"))
            _validate(cfg, self.world, self.pixels)
            cfg, self.space, self.dataset = prepare_latent_training(cfg, self.pixels, self.run_dir, self.device, saved_cfg)
        self.cfg = cfg
        _validate(cfg, self.world, self.dataset)
        t = cfg.train

        torch.manual_seed(t.seed)  # initial weights: the same on every rank
        self.model = build_model(cfg, self.dataset.num_classes).to(self.device)
        if cfg.model.text_encoder:  # captions as the model's own tokens, once
            self.dataset = Captioned(self.dataset, self.model.text_encoder)
        for m in self.model.modules():  # dropout masks drawn for the global batch, each rank keeps its rows
            if isinstance(m, ShardedDropout):
                m.shard = (self.rank, self.world)
        self.ema = EMA(self.model, t.ema_decay, t.ema_warmup)
        self.phema = PowerEMA(self.model, t.posthoc_ema) if t.posthoc_ema else None  # post-hoc EMA tracks (EDM2)
        self.net = nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.denoiser = build_denoiser(cfg, self.net)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, t))
        self.amp_dtype = _autocast_dtype(t.mixed_precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.generator = torch.Generator().manual_seed(t.seed)  # t, eps and flips of every step
        self.importance = ImportanceSampler(cfg.schedule.T)  # train.loss = "vlb": p(t) from recent L_t
        self.step = 0
        self.history: list[tuple[int, float]] = []
        self.fid_history: list[tuple[int, float]] = []  # (step, FID) of train.fid_every
        self.best_fid = math.inf
        self._fid_reference = None  # (feature network, real mean, real covariance), made at the first FID
        self._try_resume(inexact_resume)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, saved)

    # --- data ---------------------------------------------------------------------------------
    def global_batch_indices(self, step: int) -> Tensor:
        """Dataset indices of the global batch of `step`: epoch-wise permutations, last partial batch dropped.

        A pure function of (seed, step), so the data position is the step itself.
        """
        b = self.cfg.train.batch_size
        per_epoch = len(self.dataset) // b
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch))
        return perm[k * b:(k + 1) * b]

    def _local(self, x: Tensor) -> Tensor:
        """This process's slice of a global-batch tensor."""
        n = x.shape[0] // self.world
        return x[self.rank * n:(self.rank + 1) * n]

    def _batch(self, step: int) -> tuple[Tensor, dict]:
        x, cond = self.dataset.batch(self._local(self.global_batch_indices(step)))
        return x.to(self.device), {k: v.to(self.device) for k, v in cond.items()}

    # --- one step of Algorithm 1 --------------------------------------------------------------
    def loss_and_backward(self) -> Tensor:
        """Forward and backward of the current step; returns the global mean loss (a 0-d tensor)."""
        cfg, B = self.cfg, self.cfg.train.batch_size
        x0, cond = self._batch(self.step)
        flip = torch.rand(B, generator=self.generator) < 0.5
        T = self.denoiser.schedule.T
        if cfg.train.loss == "vlb" and cfg.model.kind == "denoiser":  # importance-sampled steps (Nichol & Dhariwal, sec. 3.3)
            steps, is_weight = self.importance.sample(B, self.generator)
            t = steps.double() / T
        else:
            t = self.denoiser.schedule.sample_t(B, self.generator)  # Algorithm 1, line 3 (or the process's own p(t))
        eps = torch.randn((B, *self.space.shape), generator=self.generator)
        if cfg.train.offset_noise > 0:  # offset noise: a per-image, per-channel constant added to eps (Guttenberg 2023)
            eps = eps + cfg.train.offset_noise * torch.randn((B, self.space.shape[0], 1, 1), generator=self.generator)
        if cfg.train.hflip:
            x0 = torch.where(self._local(flip).to(self.device)[:, None, None, None], x0.flip(-1), x0)
        augment = None
        if cfg.train.augment_p > 0 and cfg.model.kind == "denoiser":  # non-leaking augmentation: x_0 and its labels
            augment = self._local(augment_draw(B, cfg.data.image_size, cfg.train.augment_p, self.generator))
            x0 = augment_apply(x0, augment)
        if cfg.task.kind != "none":  # the condition image made from the (flipped) x_0: one seed per example, global batch
            seeds = self._local(torch.randint(0, 2**62, (B,), generator=self.generator))
            cond.update(training_condition(cfg.task, x0, seeds, self.denoiser.schedule))
        t, eps = self._local(t), self._local(eps).to(self.device)
        if cfg.model.kind == "denoiser":
            cond = self._condition(cond, B)
        if augment is not None:
            cond["augment"] = augment.to(self.device, torch.float32)
        # self-conditioning: on half the steps (one draw per step, Chen et al. 2023, Algorithm 1) the model first
        # estimates x_0 without it, and that estimate, without its gradient, is the extra input of the loss's pass
        self_condition = cfg.model.self_condition and bool(torch.rand((), generator=self.generator) < 0.5)
        steps_local = self._local(steps) if cfg.train.loss == "vlb" and cfg.model.kind == "denoiser" else None
        weight_local = self._local(is_weight) if steps_local is not None else None
        n, k = x0.shape[0], cfg.train.grad_accumulation
        self.optimizer.zero_grad(set_to_none=True)
        parts, vlbs = [], []
        for j, idx in enumerate(torch.arange(n).chunk(k)):  # micro-batches: the same examples and draws, fewer at once
            sl = slice(int(idx[0]), int(idx[-1]) + 1)
            sync = self.net.no_sync() if self.world > 1 and j < k - 1 else contextlib.nullcontext()  # DDP: reduce once
            with sync, torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                part = {key: v[sl] for key, v in cond.items()}
                if self_condition:
                    part["self_cond"] = self._estimate(x0[sl], t[sl], eps[sl], part)
                per_example, vlb = self._per_example(x0[sl], t[sl], eps[sl], part,
                                                     None if steps_local is None else steps_local[sl],
                                                     None if weight_local is None else weight_local[sl])
                self.scaler.scale(per_example.sum() / n).backward()  # the mean over the local batch, in parts
            parts.append(per_example.detach())
            vlbs.append(vlb)
        if steps_local is not None:
            self.importance.update(steps, self._gather(torch.cat(vlbs)))
        global_loss = torch.cat(parts).mean()
        if self.world > 1:
            dist.all_reduce(global_loss)
            global_loss /= self.world
        if not torch.isfinite(global_loss):  # raised before the optimizer steps: the step is not applied
            raise NonFiniteLoss(f"the training loss became {global_loss.item()} at step {self.step + 1}; {self.last_checkpoint()}. "
                                "Lower train.lr, keep train.grad_clip > 0, or use train.mixed_precision = 'no'")
        return global_loss

    def _per_example(self, x0: Tensor, t: Tensor, eps: Tensor, cond: dict, steps: Tensor | None,
                     is_weight: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The per-example loss of (a micro-batch of) the step, and the bound terms in bits/dim when training on L_vlb."""
        cfg = self.cfg
        if cfg.model.kind == "classifier":
            return classifier_loss(self.net, self.denoiser.schedule, x0, cond["label"], t, eps), None
        if cfg.train.loss == "simple":
            return l_simple(self.denoiser, x0, t, eps, norm=cfg.train.loss_norm, **self._weighting(), **cond), None
        if cfg.train.loss == "hybrid":
            return hybrid_loss(self.denoiser, x0, t, eps, lam=cfg.train.vlb_lambda, **self._weighting(), **cond), None
        vlb = bits_per_dim(vlb_term(self.denoiser, x0, steps, eps, **cond), x0)
        return vlb * is_weight.to(vlb), vlb.detach()

    @torch.no_grad()
    def _estimate(self, x0: Tensor, t: Tensor, eps: Tensor, cond: dict) -> Tensor:
        """The model's own x_0 estimate at x_t = q_sample(x0, t, eps) without self-conditioning: sg(x_hat_0) of
        Chen et al. 2023, Algorithm 1 (no gradient flows through it)."""
        return self.denoiser(self.denoiser.schedule.q_sample(x0, t, eps), t, **cond).x0

    def _gather(self, local: Tensor) -> Tensor:
        """The global batch of a per-example tensor, from every process's slice."""
        if self.world == 1:
            return local.detach()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.detach().contiguous())
        return torch.cat(parts)

    def _weighting(self) -> dict:
        """The loss weighting's keyword arguments for l_simple and hybrid_loss."""
        t = self.cfg.train
        return dict(weighting=t.loss_weighting, min_snr_gamma=t.min_snr_gamma, p2_k=t.p2_k, p2_gamma=t.p2_gamma)

    def _condition(self, cond: dict, B: int) -> dict:
        """The batch's condition restricted to the keys the model takes, each key replaced by its null value with its
        probability train.condition_dropout[key] (Ho & Salimans 2022, Algorithm 1, line 3, one probability per key):
        one network learns p(x | c) and p(x). One draw of B uniforms per key with p > 0, in sorted key order."""
        spec = self.model.condition_spec
        takes = set(spec.keys) | ({"context_mask"} if spec.context_dim else set())
        cond = {k: v for k, v in cond.items() if k in takes}
        p = self.cfg.train.condition_dropout
        dropped = {key: self._local(torch.rand(B, generator=self.generator) < p[key]).to(self.device)
                   for key in sorted(p) if p[key] > 0}
        return spec.drop(cond, dropped)

    def train_step(self) -> dict:
        loss = self.loss_and_backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.train.grad_clip
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        if not torch.isfinite(grad_norm) and not self.scaler.is_enabled():  # fp16: the grad scaler skips such steps itself
            raise NonFiniteLoss(f"the gradient norm became {grad_norm.item()} at step {self.step + 1} (loss {loss.item():.4g}); "
                                f"the step was not applied; {self.last_checkpoint()}. Lower train.lr (now {self.cfg.train.lr:g}) "
                                "and keep train.grad_clip > 0")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()
        self.ema.update(self.model, self.step)
        if self.phema is not None:
            self.phema.update(self.model, self.step + 1)  # its steps count from 1
        self.step += 1
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": self.lr_schedule.get_last_lr()[0]}

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train up to train.steps (or train.time_limit seconds); returns the run folder."""
        t = self.cfg.train
        # under a time limit the step total is only a cap: show the count and rate, not a misleading ETA
        bar = tqdm(total=None if t.time_limit else t.steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, desc=f"training ({t.time_limit:g} s)" if t.time_limit else "training")
        start, seen, last_log = time.perf_counter(), 0, time.perf_counter()
        self.model.train()
        log = (self.run_dir / "log.jsonl").open("a") if self.is_main else None
        try:
            while self.step < t.steps:
                stats = self.train_step()
                seen += t.batch_size
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    now = time.perf_counter()
                    stats.update(step=self.step, images_per_s=seen / (now - last_log), time=now - start)
                    seen, last_log = 0, now
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{stats['images_per_s']:.0f}")
                    if log is not None:
                        log.write(json.dumps(stats) + "\n")
                        log.flush()
                        self.history.append([self.step, stats["loss"]])
                aside = time.perf_counter()  # sample grids and FIDs are not training: the images/s leave them out
                if t.sample_every and self.step % t.sample_every == 0 and self.cfg.model.kind == "denoiser":
                    self.sample_grid()
                if t.fid_every and self.step % t.fid_every == 0 and self.cfg.model.kind == "denoiser":
                    self._track_fid(log)
                last_log += time.perf_counter() - aside
                out_of_time = t.time_limit > 0 and self._agree(time.perf_counter() - start >= t.time_limit)
                if self.phema is not None and self.is_main and (
                        self.step % t.ema_snapshot_every == 0 or self.step == t.steps or out_of_time):
                    self.phema.save_snapshot(self.run_dir / "ema_snapshots", self.step)
                if self.step % t.checkpoint_every == 0 or self.step == t.steps or out_of_time:
                    self.save()
                if out_of_time:
                    break
        finally:
            bar.close()
            if log is not None:
                log.close()
        return self.run_dir

    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision, shared by all ranks (wall clocks differ between processes)."""
        if self.world == 1:
            return flag
        f = torch.tensor([float(flag)], device=self.device)
        dist.broadcast(f, 0)
        return bool(f.item())

    @torch.no_grad()
    def fixed_samples(self, n: int, steps: int = 0) -> tuple[Tensor, list[Tensor]]:
        """n samples of the EMA weights from the fixed noise of train.seed, with the run's [sample] settings (`steps` > 0
        replaces sample.steps): a conditional model draws the classes in turn; a task model takes the conditions of the
        first n training images. Returns (samples, [its inputs, the truth] for a task model, else [])."""
        s, d, task = self.cfg.sample, self.cfg.data, self.cfg.task
        cond, shown = None, []
        if task.kind != "none":  # the first n training images' conditions: rows of inputs, outputs and the truth
            idx = torch.arange(min(n, len(self.dataset)))
            truth, _ = self.dataset.batch(idx)
            truth = truth.to(self.device)
            cond = training_condition(task, truth, idx, self.denoiser.schedule,
                                      level=task.aug_level if task.noise_aug_max > 0 else None)
            n, shown = len(idx), [viewable(cond["image"], d.channels), truth]
        if self.cfg.model.text_encoder:  # the first n training captions
            cond = {"text": self.dataset.batch(torch.arange(n) % len(self.dataset))[1]["text"].to(self.device)}
        kwargs = sample_config_kwargs(s) | ({"steps": steps} if steps else {})
        x = generate(build_denoiser(self.cfg, self.ema.model), n, self.space.shape,
                     labels=default_labels(n, self.model.num_classes), cond=cond, seed=self.cfg.train.seed,
                     device=self.device, **kwargs)
        return self.space.decode(x), shown

    def sample_grid(self) -> Path | None:
        """Sample a grid with the EMA weights into RUN/samples/step_NNNNNNNN.png (rank 0): `fixed_samples` of sample.n,
        a task model's inputs above and the truth below."""
        if not self.is_main:
            return None
        x, shown = self.fixed_samples(self.cfg.sample.n)
        n = x.shape[0]
        rows = [shown[0], x, shown[1]] if shown else [x]
        return save_grid(torch.cat(rows), self.run_dir / "samples" / f"step_{self.step:08d}.png",
                         nrow=n if shown else None)

    # --- quality during training -------------------------------------------------------------
    def measure_fid(self) -> float:
        """FID (metrics.py) of train.fid_samples `fixed_samples` of the EMA weights against as many training images (the
        first ones, whose conditions a task model gets), in train.fid_features' space; rank 0 only. With few samples
        it is biased upward, so it is a curve to compare with itself, not a published FID."""
        from .metrics import extract_features, feature_network, feature_statistics, frechet_distance

        t = self.cfg.train
        if self._fid_reference is None:
            net = feature_network(t.fid_features, self.device)
            real, _ = self.pixels.batch(torch.arange(min(t.fid_samples, len(self.pixels))))
            features = extract_features(real, net)
            if len(features) <= features.shape[1]:
                warnings.warn(f"train.fid_samples = {t.fid_samples} images in a {features.shape[1]}-dimensional feature space: "
                              f"the covariances are singular and the FID is strongly biased; use more than {features.shape[1]}",
                              UserWarning, stacklevel=2)
            self._fid_reference = (net, *feature_statistics(features))
        net, mu, sigma = self._fid_reference
        x, _ = self.fixed_samples(t.fid_samples, t.fid_steps)
        x = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() / 127.5 - 1  # 8-bit images, as `diffuse eval` scores
        return frechet_distance(mu, sigma, *feature_statistics(extract_features(x, net)))

    def _track_fid(self, log) -> None:
        """Measure the FID (rank 0), log it, and keep the weights of the best so far as the run folder RUN/best."""
        if not self.is_main:
            return
        value = self.measure_fid()
        self.fid_history.append([self.step, value])
        if log is not None:
            log.write(json.dumps({"step": self.step, "fid": value}) + "\n")
            log.flush()
        if value < self.best_fid:
            self.best_fid = value
            best = self.run_dir / "best"
            best.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, best / "config.toml")
            ckpt.save_checkpoint(best, self.step, {"model": self.model.state_dict(), "ema": self.ema.model.state_dict()},
                                 {"step": self.step, "num_classes": self.dataset.num_classes, "fid": value}, keep=1)

    # --- checkpoints --------------------------------------------------------------------------
    def last_checkpoint(self) -> str:
        """What the newest committed checkpoint holds, for a message after training went non-finite."""
        last = ckpt.latest_step(self.run_dir)
        if last is None:
            return "no checkpoint was written yet"
        state = ckpt.read_state(self.run_dir, last)
        if "max_abs_weight" not in state:
            return (f"the last checkpoint (step {last}) in {self.run_dir} was written before checkpoints recorded their "
                    "weights' range, so whether it is good cannot be told; sample from it to check")
        w, loss = state["max_abs_weight"], state.get("last_loss")
        facts = f"largest |w| = {w:.3g}" + ("" if loss is None else f", last logged loss {loss:.4g}")
        if w > SUSPECT_WEIGHT:
            return (f"the last checkpoint (step {last}) in {self.run_dir} has finite weights but is likely diverged too "
                    f"({facts}; a trained network's weights stay below {SUSPECT_WEIGHT:g}): start again from scratch")
        return f"the last good checkpoint (step {last}) in {self.run_dir} is kept: its weights and EMA are finite ({facts})"

    def save(self) -> None:
        """Commit a checkpoint of everything an exact resume needs (rank 0 writes). Refuses (NonFiniteLoss) when the
        weights or their EMA hold NaN or inf, so every committed checkpoint has finite weights."""
        if not self.is_main:
            return
        weights = [p.detach().abs().max() for p in (*self.model.parameters(), *self.ema.model.parameters()) if p.numel()]
        max_abs = float(torch.stack(weights).max()) if weights else 0.0  # torch's max keeps a NaN (Python's may drop it)
        if not math.isfinite(max_abs):
            raise NonFiniteLoss(f"the weights became non-finite by step {self.step}, so no checkpoint was written; "
                                f"{self.last_checkpoint()}. Lower train.lr and keep train.grad_clip > 0")
        if self.history:  # rendered here, not per log line: matplotlib costs ~0.1 s in the training loop
            plot_loss(*zip(*self.history), self.run_dir / "loss.png", fid=self.fid_history)
        opt_tensors, opt_skeleton = ckpt.flatten_state(self.optimizer.state_dict(), "optimizer")
        rng_tensors, rng_state = ckpt.capture_rng()
        state_tensors = {**opt_tensors, **{f"rng.{k}": v for k, v in rng_tensors.items()},
                         **{f"importance.{k}": v for k, v in self.importance.state_dict().items()},
                         "generator": ckpt.generator_state(self.generator),
                         **({f"phema.{k}": v for k, v in self.phema.state_dict().items()} if self.phema else {})}
        state = {
            "step": self.step,
            "num_classes": self.dataset.num_classes,
            "world_size": self.world,
            "optimizer": opt_skeleton,
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state,
            "history": self.history,
            "fid_history": self.fid_history,
            "best_fid": self.best_fid if math.isfinite(self.best_fid) else None,
            "max_abs_weight": max_abs,
            "last_loss": self.history[-1][1] if self.history else None,
            **({"phema": self.phema.metadata()} if self.phema else {}),
        }
        ckpt.save_checkpoint(self.run_dir, self.step,
                             {"model": self.model.state_dict(), "ema": self.ema.model.state_dict(), "state": state_tensors},
                             state, keep=self.cfg.train.keep_checkpoints)

    def _resume_posthoc_ema(self, c) -> None:
        """Restore the post-hoc EMA tracks exactly (their profiles average every step since step 1, so they cannot
        restart partway: ResumeError, even under --inexact-resume), drop snapshots newer than the checkpoint (written by
        the interrupted run past it), and take the best FID from RUN/best (which may be newer than the checkpoint)."""
        if self.phema is not None:
            st = {k.removeprefix("phema."): v for k, v in c.tensors["state"].items() if k.startswith("phema.")}
            try:
                self.phema.load_state_dict(st, c.state["phema"])
            except (KeyError, ValueError) as e:
                raise ResumeError(f"the checkpoint at step {self.step} in {self.run_dir} has no post-hoc EMA tracks for "
                                  f"train.posthoc_ema = {self.cfg.train.posthoc_ema} ({type(e).__name__}: {e}); the tracks "
                                  "average every step from the first, so they cannot start now: resume with the run's own "
                                  "train.posthoc_ema, or train a new run") from e
        if self.is_main:
            for step, path in snapshot_steps(self.run_dir / "ema_snapshots").items():
                if step > self.step:
                    path.unlink()
        best = self.run_dir / "best"
        if ckpt.latest_step(best) is not None:
            self.best_fid = float(ckpt.read_state(best, ckpt.latest_step(best))["fid"])

    def _try_resume(self, inexact: bool) -> None:
        if ckpt.latest_step(self.run_dir) is None:
            return
        c = ckpt.load_checkpoint(self.run_dir)
        self.model.load_state_dict(c.tensors["model"])
        self.ema.model.load_state_dict(c.tensors["ema"])
        self.step = int(c.state["step"])
        try:
            st, s = c.tensors["state"], c.state
            self.optimizer.load_state_dict(ckpt.unflatten_state(st, s["optimizer"]))
            self.lr_schedule.load_state_dict(s["lr_schedule"])
            self.scaler.load_state_dict(s["scaler"])
            ckpt.set_generator_state(self.generator, st["generator"])
            if "importance.history" in st:
                self.importance.load_state_dict({"history": st["importance.history"], "count": st["importance.count"]})
            # restored last: building the model and data above drew from the global RNGs
            ckpt.restore_rng({k.removeprefix("rng."): v for k, v in st.items() if k.startswith("rng.")}, s["rng"])
            self.history = [list(h) for h in s.get("history", [])]
            self.fid_history = [list(h) for h in s.get("fid_history", [])]
            self.best_fid = math.inf if s.get("best_fid") is None else float(s["best_fid"])
        except (KeyError, ValueError, RuntimeError) as e:
            if not inexact:
                raise ResumeError(f"the checkpoint at step {self.step} in {self.run_dir} lacks training state needed for an "
                                  f"exact resume ({type(e).__name__}: {e}); pass --inexact-resume to continue from its weights") from e
            warnings.warn(f"inexact resume from step {self.step}: {e}")
        self._resume_posthoc_ema(c)
        if inexact:  # the config may have changed: its lr and weight decay replace the ones in the checkpoint
            t, sched = self.cfg.train, self.lr_schedule
            sched.base_lrs = [t.lr] * len(self.optimizer.param_groups)
            for g in self.optimizer.param_groups:
                g.update(initial_lr=t.lr, weight_decay=t.weight_decay, lr=t.lr * sched.lr_lambdas[0](sched.last_epoch))
            sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        for p, v in self.optimizer.state.items():  # optimizer state follows the parameters' device
            for k, tensor in v.items():
                if isinstance(tensor, Tensor) and k != "step":
                    v[k] = tensor.to(p.device)


# settings that change neither the weights nor the random draws of a step: free to change on resume
_FREE_ON_RESUME = {"train": {"steps", "time_limit", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
                             "num_workers", "ema_snapshot_every", "fid_every", "fid_samples", "fid_steps",
                             "fid_features"}}


def _trajectory_keys(cfg: RunConfig) -> dict:
    d = to_dict(cfg)
    d.pop("sample")
    return {s: {k: v for k, v in vals.items() if k not in _FREE_ON_RESUME.get(s, ())} for s, vals in d.items()}


def _diff(a: dict, b: dict) -> str:
    out = [f"{s}.{k}: {a[s][k]!r} -> {b[s][k]!r}" for s in a for k in a[s] if a[s].get(k) != b.get(s, {}).get(k)]
    return "; ".join(out[:5]) + (f"; and {len(out) - 5} more" if len(out) > 5 else "")


def dry_run(cfg: RunConfig, **kw) -> str:
    """`diffuse train --dry-run`: one training step's footprint (footprint.step_footprint: parameters, FLOPs per image,
    peak memory), measured on a throw-away run folder with the config's data, model and options; nothing else is
    written. Raises as Trainer does for a bad config."""
    import tempfile

    from .footprint import step_footprint

    with tempfile.TemporaryDirectory() as tmp:
        if cfg.model.kind == "autoencoder":
            from .latent import AutoencoderTrainer

            trainer = AutoencoderTrainer(cfg, Path(tmp) / "run", progress=False, **kw)
            world = 1
        else:
            trainer = Trainer(cfg, Path(tmp) / "run", progress=False, **kw)
            world = trainer.world
        trainer.model.train()
        fp = step_footprint(trainer.train_step, trainer.model, cfg.train.batch_size // world, trainer.device)
    return (f"{fp.describe()}; at train.batch_size = {cfg.train.batch_size}, {cfg.train.steps:,} steps are "
            f"{fp.flops_per_image * cfg.train.batch_size * cfg.train.steps / 1e15:.3g} PFLOP")


def train(cfg: RunConfig, run_dir: str | Path, **kw) -> Path:
    """Train (or resume) a run; the Python API behind `diffuse train`. model.kind = "autoencoder" trains the first stage
    of latent diffusion (latent.AutoencoderTrainer), any other kind a Trainer."""
    if cfg.model.kind == "autoencoder":
        from .latent import AutoencoderTrainer

        return AutoencoderTrainer(cfg, run_dir, **kw).fit()
    trainer = Trainer(cfg, run_dir, **kw)
    try:
        return trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
