"""The one Trainer: every kind of model (kinds/) trains through it, and none has a loop of its own.

A kind supplies its modules, its random draws for the global batch, its losses per optimizer group, and what it
shows and measures (kinds/base.py). The Trainer owns the rest: devices and DDP, seeds and the data position,
micro-batches, autocast and the grad scaler, NaN and inf checks, clipping, optimizer groups and their learning-rate
schedules, the EMA and post-hoc EMA tracks, checkpoints and exact resume, the log, progress, time limits, and when the
previews and measurements run.

Determinism: every random draw of a step (data order, and the kind's draws: flips, t, eps, ...) comes from the
trainer's own generator or from the step's seed, and is made for the whole global batch before each process takes its
slice; dropout masks come from the global RNG, identical on every rank, and are likewise drawn for the global batch
(nets.blocks.ShardedDropout). So a step computes the same gradient whatever the number of processes (DDP averages the
per-process means of equal slices), and resuming restores the generator, the data position, optimizers, LR
schedules, EMA, the kind's own state and the grad scaler exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed, speed
from .config import RunConfig, apply_overrides, load_config, resume_changes, save_config, to_dict
from .data import Dataset
from .ema import EMA, PowerEMA, SIGMA_REL_MAX, snapshot_steps
from .footprint import step_footprint
from .kinds import Context, check_config, ignored_sections, objective_class
from .nets.autoencoder import VectorQuantizer
from .nets.blocks import ShardedDropout
from .nets.digits import DigitClassifier
from .nets.ensemble import GlobalBatchNorm
from .nets.inception import inception_fid
from .precision import autocast_dtype
from .trackers import Trackers, check_trackers
from .visualize import plot_loss


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or weight; the step is not applied, and the message says
    what the last checkpoint holds (every checkpoint is written only with finite weights)."""


class ResumeError(RuntimeError):
    """A run folder cannot be resumed exactly as asked."""


SUSPECT_WEIGHT = 1e3  # a checkpoint with a larger |weight| is called likely diverged in the non-finite messages


def lr_factor(step: int, t) -> float:
    """The learning rate at optimizer step `step` (0-based) over train.lr: a linear warm-up min(1, (step + 1) / warmup)
    (DDPM: 5000 steps), times the decay of train.lr_schedule after it: "constant" 1; "cosine" (1 + cos(pi p)) / 2 with
    p = (step - warmup) / (steps - warmup) (Loshchilov & Hutter 2017, no restarts; 0 at train.steps); "linear" 1 - p
    (0 at train.steps; the digit classifier's recipe); "inverse_sqrt"
    1 / sqrt(max(step / warmup, 1)) (EDM2's decay, Karras et al. 2024, with t_ref = the warm-up)."""
    warm = t.warmup_steps
    factor = min(1.0, (step + 1) / warm) if warm else 1.0
    p = min(max((step - warm) / max(t.steps - warm, 1), 0.0), 1.0)  # the fraction of the decay done
    if t.lr_schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * p))
    elif t.lr_schedule == "linear":
        factor *= 1 - p
    elif t.lr_schedule == "inverse_sqrt":
        factor /= math.sqrt(max(step / warm, 1.0))
    return factor


def check_train(cfg: RunConfig, world: int, dataset, kind=None) -> None:
    """ValueError naming the setting and the fix for a [train] section the Trainer cannot run, whatever the kind (`kind`,
    its Objective class: micro-batches only for per-example losses)."""
    t = cfg.train
    examples = len(dataset) if kind is None else kind.examples(cfg, dataset)
    checks = [
        (t.steps >= 1, f"train.steps must be >= 1, got {t.steps}"),
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (t.batch_size % world == 0, f"train.batch_size = {t.batch_size} must be divisible by the number of processes ({world})"),
        (t.grad_accumulation >= 1 and (t.batch_size // world) % t.grad_accumulation == 0,
         f"train.grad_accumulation = {t.grad_accumulation} must be >= 1 and divide each process's batch "
         f"(train.batch_size {t.batch_size} / {world} process(es) = {t.batch_size // world})"),
        (kind is None or kind.separable or t.grad_accumulation == 1,
         f"train.grad_accumulation = {t.grad_accumulation}: model.kind = '{cfg.model.kind}' computes one loss of the whole "
         "batch (not one per example), so it trains without micro-batches; set train.grad_accumulation = 1 (lower "
         "train.batch_size to save memory)"),
        (t.lr_schedule != "inverse_sqrt" or t.warmup_steps >= 1,
         "train.lr_schedule = 'inverse_sqrt' decays from the end of the warm-up: set train.warmup_steps >= 1"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}"),
        (t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {t.grad_clip}"),
        (0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}"),
        (all(0 < s <= SIGMA_REL_MAX for s in t.posthoc_ema) and len(set(t.posthoc_ema)) == len(t.posthoc_ema),
         f"train.posthoc_ema lists the sigma_rel of each power-function EMA track, distinct values in (0, {SIGMA_REL_MAX:.4f}] "
         f"(EDM2: [0.05, 0.10]), got {t.posthoc_ema}"),
        (t.ema_snapshot_every >= 1, f"train.ema_snapshot_every must be >= 1, got {t.ema_snapshot_every}"),
        (t.fid_every >= 0 and t.fid_steps >= 0, f"train.fid_every and train.fid_steps must be >= 0, got {t.fid_every}, {t.fid_steps}"),
        (t.fid_samples >= 2, f"train.fid_samples must be >= 2 (and above the feature dimension, e.g. 500), got {t.fid_samples}"),
        (t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}"),
        (t.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {t.checkpoint_every}"),
        (t.sample_every >= 0, f"train.sample_every must be >= 0, got {t.sample_every}"),
        (t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}"),
        (t.time_limit >= 0, f"train.time_limit must be >= 0 seconds, got {t.time_limit}"),
        (examples >= t.batch_size, f"the dataset has {examples} {'images' if kind is None or examples == len(dataset) else 'examples'}, "
                                   f"fewer than train.batch_size = {t.batch_size}; lower train.batch_size"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def time_left(elapsed: float, limit: float, done: int, remaining: int) -> float:
    """Seconds until a run under train.time_limit stops: at the limit (`limit` - `elapsed`), or sooner when its
    `remaining` steps end first at the rate so far (`done` steps in `elapsed` seconds); never below 0."""
    left = max(limit - elapsed, 0.0)
    if done > 0 and elapsed > 0:
        left = min(left, remaining * elapsed / done)
    return left


def progress_disabled() -> bool:
    """TQDM_DISABLE read now (tqdm reads it once, when it is imported): 1, true, yes ... silence every progress bar,
    the trainer's and the sampling commands' alike."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


class Trainer:
    """Trains the kind of model a RunConfig names (model.kind: kinds.KINDS) into a run folder; an existing run folder
    is resumed.

    `inexact_resume=True` loads the weights even when some training state is missing or the config changed (the
    continuation then differs from an uninterrupted run). `dataset` replaces the one data.load_dataset builds from
    cfg.data: anything with `__len__`, `batch(idx) -> (x, cond)`, `num_classes` and `condition_keys`
    (data.ImageDataset's interface), e.g. pairs that carry a condition image. `features(spec, device)` resolves
    train.fid_features (default `feature_network`); `device` replaces this process's own; `one_process` trains in this process alone
    even inside a torchrun job (rank 0 training a measuring instrument while the others wait). `deferred_checks`
    (None: on CUDA without fp16) reads the non-finite checks of the losses and gradient norms once per log interval
    instead of at every step (`check_finite`), so the host never waits for the GPU inside the loop; its optimizers are
    then fused AdamW, which skip a step on the device once a check failed (see `train_step`). Raises ValueError (or config.ConfigError)
    naming the setting for a config that cannot train, before any module is built or file written; ResumeError when
    the run folder cannot be resumed as asked.
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, inexact_resume: bool = False, progress: bool = True,
                 dataset: Dataset | None = None, features=None, one_process: bool = False, device: str | None = None,
                 deferred_checks: bool | None = None):
        self.run_dir = Path(run_dir)
        self.rank, self.world = (0, 1) if one_process else distributed.init()
        self.is_main = self.rank == 0
        self.device = torch.device(device) if device is not None else distributed.device()
        saved = self.run_dir / "config.toml"
        saved_cfg = load_config(saved) if saved.is_file() else None
        kind = objective_class(cfg)  # KINDS[model.kind], or its video objective (model.video)
        cfg = kind.resolve(cfg, saved_cfg)  # stages pinned as training will pin them, so a resume compares like with like
        if saved_cfg is not None:
            changed = resume_changes(saved_cfg, cfg)
            if changed and not inexact_resume:
                raise ResumeError(f"{self.run_dir} holds a run with a different config ({changed}); resume it with its own "
                                  "config (`diffuse train RUN/config.toml --out RUN`), choose a new --out, or pass --inexact-resume")
        check_config(cfg)  # settings that would do nothing, the network against its shape: before data, stages or writes
        check_trackers(cfg.train.log_to)  # on every rank (the others would wait for rank 0 forever): a missing package named
        self.progress = progress and self.is_main and not progress_disabled()
        data = kind.load_data(cfg) if dataset is None else dataset
        check_train(cfg, self.world, data, kind)  # before the kind prepares anything (a stage's cache, a feature network)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)  # every draw of every step
        self.objective = kind(cfg, data, Context(self.run_dir, self.device, self.rank, self.world, saved_cfg, self.generator,
                                                 features or feature_network))
        self.cfg = cfg = self.objective.cfg
        t = cfg.train

        torch.manual_seed(t.seed)  # initial weights: the same on every rank
        self.modules = {name: m.to(self.device) for name, m in self.objective.build().items()}
        if speed.wanted(t.channels_last, self.device, "train.channels_last"):
            for m in self.modules.values():
                speed.to_channels_last(m)
        self.dataset = self.objective.dataset
        self.train_data = speed.hold_on_device(self.dataset, self.device, t.data_on_device)  # what the batches read
        for m in self.modules.values():  # dropout masks and VQ statistics of the global batch: each layer knows its process
            for sub in m.modules():
                if isinstance(sub, (ShardedDropout, VectorQuantizer, GlobalBatchNorm)):
                    sub.shard = (self.rank, self.world)
        averaged = self.objective.ema
        self.ema = EMA(self.modules[averaged], t.ema_decay, t.ema_warmup) if averaged else None
        self.phema = PowerEMA(self.modules[averaged], t.posthoc_ema) if averaged and t.posthoc_ema else None
        if speed.wanted(t.compile, self.device, "train.compile"):  # after the EMA copies: they stay eager
            for m in self.modules.values():
                if any(p.requires_grad for p in m.parameters()):
                    speed.compile_network(m, self.device)
        self.nets = {name: nn.parallel.DistributedDataParallel(m) if self.world > 1 and any(p.requires_grad for p in m.parameters())
                     else m for name, m in self.modules.items()}
        self.objective.bind(self.nets, self.modules)
        self.amp_dtype = autocast_dtype(t.mixed_precision, self.device, "train.mixed_precision")
        fp16 = self.amp_dtype == torch.float16
        self.deferred_checks = self.device.type == "cuda" and not fp16 if deferred_checks is None else deferred_checks
        if self.deferred_checks and (fp16 or not speed.fused_adamw_available(self.device)):
            raise ValueError("deferred non-finite checks skip a bad step inside fused AdamW, which "
                             + ("the fp16 loss scaler drives itself: use train.mixed_precision = 'bf16' or 'no'" if fp16
                                else f"this torch ({torch.__version__}) lacks on {self.device.type}: pass deferred_checks=False"))
        fused = self.deferred_checks or (self.device.type == "cuda" and speed.fused_adamw_available(self.device))
        self.params, self.optimizers, self.schedules = {}, {}, {}
        for name, group in self.objective.groups.items():  # a group whose modules this config does not build is left out
            if all(m in self.modules for m in group.modules):
                self.params[name] = [p for m in group.modules for p in self.modules[m].parameters() if p.requires_grad]
                self.optimizers[name] = speed.adamw(speed.decay_groups(self.params[name], t.weight_decay), fused=fused,
                                                    lr=t.lr, betas=group.betas, weight_decay=t.weight_decay)
                self.schedules[name] = torch.optim.lr_scheduler.LambdaLR(self.optimizers[name], lambda step: lr_factor(step, t))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)  # deferred checks: a step since the last check failed
        self._pending: list[tuple[int, Tensor, dict[str, Tensor]]] = []   # (step, all finite, its checked values)
        self.step = 0
        self.history: list[tuple[int, float]] = []
        self.fid_history: list[tuple[int, float]] = []  # (step, score) of train.fid_every
        self.best_fid = math.inf
        self.trackers: Trackers | None = None  # rank 0's, while fit runs
        self._try_resume(inexact_resume)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, saved, ignored_sections(cfg))

    # the main module, its optimizer and schedule, and a diffusion run's denoiser and space, by their usual names
    @property
    def model(self) -> nn.Module:
        return self.modules["model"]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimizers["main"]

    @property
    def lr_schedule(self) -> torch.optim.lr_scheduler.LambdaLR:
        return self.schedules["main"]

    @property
    def denoiser(self):
        return self.objective.denoiser

    @property
    def space(self):
        return self.objective.space

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
        return distributed.local(x, self.rank, self.world)

    def _batch(self, step: int) -> tuple[Tensor, dict]:
        x, cond = self.train_data.batch(self._local(self.global_batch_indices(step)))
        return speed.to_device(x, self.device), {k: speed.to_device(v, self.device) for k, v in cond.items()}

    # --- one step -----------------------------------------------------------------------------
    @torch.enable_grad()  # a trainer needs gradients, even called inside no_grad (a metric training its instrument)
    def loss_and_backward(self) -> Tensor:
        """Forward and backward of the current step; returns the main group's global mean loss (a 0-d tensor). The
        groups with a loss this step and the kind's logged values are kept for train_step."""
        B, k = self.cfg.train.batch_size, self.cfg.train.grad_accumulation
        x, extras = self._batch(self.step)
        draws = self.objective.draw(B, self.generator)
        d = {key: self._local(v) if v.ndim and v.shape[0] == B else v for key, v in draws.items()}
        x, extras, d = self.objective.inputs(x, extras, d)
        n = x.shape[0]
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        parts: dict[str, list[Tensor]] = {}
        aux: dict[str, list[Tensor]] = {}
        self._log: dict[str, Tensor] = {}
        for j, idx in enumerate(torch.arange(n).chunk(k)):  # micro-batches: the same examples and draws, fewer at once
            sl = slice(int(idx[0]), int(idx[-1]) + 1)
            cut = lambda v: v[sl] if isinstance(v, Tensor) and v.ndim and v.shape[0] == n else v  # noqa: E731
            with self._sync(j == k - 1), torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                                        enabled=self.amp_dtype is not None):
                out = self.objective.losses(cut(x), {key: cut(v) for key, v in extras.items()},
                                            {key: cut(v) for key, v in d.items()}, self.step)
                self._present = [name for name in self.optimizers if name in out]
                for i, name in enumerate(self._present):
                    loss = out[name].sum() / n if self.objective.separable else out[name]
                    if len(self.optimizers) == 1:
                        self.scaler.scale(loss).backward()
                    else:  # each group's loss into its own parameters only (a GAN's generator loss leaves D alone)
                        self.scaler.scale(loss).backward(inputs=self.params[name], retain_graph=i < len(self._present) - 1)
                    parts.setdefault(name, []).append(out[name].detach())
            for key, v in out.get("aux", {}).items():
                aux.setdefault(key, []).append(v)
            self._log = out.get("log", {})
        if aux:
            self.objective.after_backward(draws, {key: distributed.gather(torch.cat(v), self.world) for key, v in aux.items()})
        losses = {name: distributed.mean(torch.cat([p.reshape(-1) for p in v]).mean() if self.objective.separable
                                         else torch.stack(v).mean(), self.world) for name, v in parts.items()}
        if not self.deferred_checks:
            for name, value in losses.items():  # raised before any optimizer steps: the step is not applied
                if not torch.isfinite(value):
                    raise self._loss_error(name, value.item(), self.step + 1)
        self._losses = losses
        return losses["main"]

    def _sync(self, last: bool):
        """DDP reduces gradients once per step: no_sync on every DDP module but for the last micro-batch."""
        if last or self.world == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for net in self.nets.values():
            if isinstance(net, nn.parallel.DistributedDataParallel):
                stack.enter_context(net.no_sync())
        return stack

    def _loss_error(self, name: str, value: float, step: int) -> NonFiniteLoss:
        what = self.objective.loss_name if name == "main" else f"{name} loss"
        return NonFiniteLoss(f"the {what} became {value} at step {step}; {self.last_checkpoint()}. {self.objective.nonfinite_hint}")

    def _grad_error(self, name: str, value: float, loss: float, step: int) -> NonFiniteLoss:
        what = "gradient norm" if name == "main" else f"{name} gradient norm"
        return NonFiniteLoss(f"the {what} became {value} at step {step} (loss {loss:.4g}); the step was not applied; "
                             f"{self.last_checkpoint()}. Lower train.lr (now {self.cfg.train.lr:g}) and keep train.grad_clip > 0")

    def train_step(self) -> dict:
        """One optimizer step of every group with a loss this step; returns the logged values (loss, grad_norm, lr,
        the kind's own): floats, or 0-d tensors under deferred checks, which `fit` reads only at log steps.

        A non-finite loss or gradient norm raises NonFiniteLoss before any optimizer steps (the step is not applied).
        Under deferred checks nothing is read here: from the first such step on, every optimizer skips its update on the
        device (fused AdamW's found_inf, as torch's fp16 loss scaler uses it) and the EMAs hold still, until
        `check_finite` raises; the weights are then those from before that step."""
        loss = self.loss_and_backward()
        stats = {"loss": loss}
        clip = self.cfg.train.grad_clip
        norms = {}
        for name in self._present:  # every group's gradient norm is checked; clipped where the group says so
            self.scaler.unscale_(self.optimizers[name])
            clipped = self.objective.groups[name].clip and clip > 0
            norms[name] = grad_norm = nn.utils.clip_grad_norm_(self.params[name], clip if clipped else float("inf"))
            if not self.deferred_checks and not self.scaler.is_enabled() and not torch.isfinite(grad_norm):
                raise self._grad_error(name, grad_norm.item(), loss.item(), self.step + 1)  # fp16: the scaler skips such steps
            stats.setdefault("grad_norm" if name == "main" else f"{name}_grad_norm", grad_norm)
        keep = None
        if self.deferred_checks:
            checked = {**{f"loss:{k}": v for k, v in self._losses.items()}, **{f"grad:{k}": v for k, v in norms.items()}}
            finite = torch.isfinite(torch.stack([v.float() for v in checked.values()])).all()
            self._bad = self._bad | ~finite
            self._pending.append((self.step + 1, finite, checked))
            for opt in self.optimizers.values():
                opt.found_inf = self._bad.float()
            keep = (~self._bad).float()
        for name in self._present:
            self.scaler.step(self.optimizers[name])
        self.scaler.update()
        for name in self._present:
            self.schedules[name].step()
        self.objective.after_step()  # a constraint on the parameters (kinds/base.py), before the EMA reads them
        if self.ema is not None:
            self.ema.update(self.modules[self.objective.ema], self.step, keep)
        if self.phema is not None:
            self.phema.update(self.modules[self.objective.ema], self.step + 1, keep)  # its steps count from 1
        self.step += 1
        stats["lr"] = self.lr_schedule.get_last_lr()[0]
        stats.update(self._log)
        stats.update({f"{name}_loss": v for name, v in self._losses.items() if name != "main" and f"{name}_loss" not in stats})
        return stats if self.deferred_checks else {key: float(v) for key, v in stats.items()}

    def check_finite(self) -> None:
        """Deferred checks: read the finiteness of every step since the last check (one host synchronisation) and raise
        NonFiniteLoss naming the first step whose loss or gradient norm was NaN or infinite; the trainer's step is then
        set back to the step before it, whose parameters and EMAs it holds (buffers a forward pass updates, such as a VQ
        codebook's statistics, and the LR schedule and the draws' generator have moved on: resume from the last
        checkpoint rather than continue this trainer). Nothing to do without deferred checks."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        finite = torch.stack([ok for _, ok, _ in pending]).tolist()
        if all(finite):
            return
        step, _, checked = pending[finite.index(False)]
        values = {k: v.item() for k, v in checked.items()}
        self.step = step - 1
        self._bad = torch.zeros_like(self._bad)  # read: a caller that goes on anyway steps again
        loss = values["loss:main"]
        for key, value in values.items():
            if not math.isfinite(value):
                kind, name = key.split(":")
                raise (self._loss_error(name, value, step) if kind == "loss" else self._grad_error(name, value, loss, step))

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train up to train.steps (or train.time_limit seconds); returns the run folder."""
        t = self.cfg.train
        # under a time limit the step total is only a cap: show the count and rate, not a misleading ETA
        desc = self.objective.progress_desc
        bar = tqdm(total=None if t.time_limit else t.steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, desc=f"{desc} ({t.time_limit:g} s)" if t.time_limit else desc)
        start, seen, last_log, first = time.perf_counter(), 0, time.perf_counter(), self.step
        shown, failed = {}, True
        for m in self.modules.values():
            m.train()
        config = {k: v for k, v in to_dict(self.cfg).items() if k not in ignored_sections(self.cfg)}  # as config.toml
        try:
            # rank 0 tracks: log.jsonl (a torn last line a kill left cut first) and the other trackers of train.log_to
            self.trackers = Trackers(t.log_to, self.run_dir, self.step, config) if self.is_main else None
            while self.step < t.steps:
                stats = self.train_step()
                seen += t.batch_size
                bar.update(1)
                out_of_time = t.time_limit > 0 and distributed.agree(time.perf_counter() - start >= t.time_limit, self.device, self.world)
                snapshot = self.phema is not None and (self.step % t.ema_snapshot_every == 0 or self.step == t.steps or out_of_time)
                save = self.step % t.checkpoint_every == 0 or self.step == t.steps or out_of_time
                preview = t.sample_every and self.step % t.sample_every == 0
                measure = t.fid_every and self.step % t.fid_every == 0
                logged = self.step % t.log_every == 0 or self.step == t.steps
                if logged or snapshot or save or preview or measure:  # nothing leaves the loop before its steps are checked
                    self.check_finite()
                if logged:
                    now = time.perf_counter()
                    stats = {key: float(v) for key, v in stats.items()}  # under deferred checks, the one read of the interval
                    stats.update(images_per_s=seen / (now - last_log), time=now - start)
                    seen, last_log = 0, now
                    shown.update(loss=f"{stats['loss']:.4f}", img_s=f"{stats['images_per_s']:.0f}")
                    if self.trackers is not None:
                        self.trackers.scalars(self.step, stats)
                        self.history.append([self.step, stats["loss"]])
                if t.time_limit:  # the run ends at the limit or at train.steps, whichever comes first
                    left = time_left(time.perf_counter() - start, t.time_limit, self.step - first, t.steps - self.step)
                    bar.set_postfix({**shown, "left": tqdm.format_interval(left)}, refresh=False)
                elif shown:
                    bar.set_postfix(shown, refresh=False)
                aside = time.perf_counter()  # previews and measurements are not training: the images/s leave them out
                if preview and self.is_main:
                    grid = self.objective.preview(self)
                    if grid is not None:
                        self.trackers.image(self.step, "samples", grid)
                if measure and self.is_main:
                    self._evaluate()
                last_log += time.perf_counter() - aside
                if snapshot and self.is_main:
                    self.phema.save_snapshot(self.run_dir / "ema_snapshots", self.step)
                if save:
                    self.save()
                if out_of_time:
                    break
            failed = False
        finally:
            bar.close()
            if self.trackers is not None:
                self.trackers.close(failed)  # a W&B run is marked failed when training raised
                self.trackers = None
        return self.run_dir

    def _evaluate(self) -> None:
        """The kind's measurement (rank 0), tracked; a score better than every earlier one keeps its weights as the run
        folder RUN/best."""
        record, score = self.objective.evaluate(self)
        self.trackers.scalars(self.step, record)
        if score is None:
            return
        self.fid_history.append([self.step, score])
        if score < self.best_fid:
            self.best_fid = score
            best = self.run_dir / "best"
            best.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, best / "config.toml", ignored_sections(self.cfg))
            ckpt.save_checkpoint(best, self.step, self._weights(),
                                 {"step": self.step, "num_classes": self.dataset.num_classes, "fid": score}, keep=1)

    # --- checkpoints --------------------------------------------------------------------------
    def _weights(self) -> dict[str, dict[str, Tensor]]:
        """The checkpoint groups of the weights: each module by its name, and "ema"."""
        return {**{name: m.state_dict() for name, m in self.modules.items()},
                **({"ema": self.ema.model.state_dict()} if self.ema is not None else {})}

    @staticmethod
    def _state_names(group: str) -> tuple[str, str]:
        """The state.json names of a group's optimizer and LR schedule."""
        return ("optimizer", "lr_schedule") if group == "main" else (f"{group}_optimizer", f"{group}_lr_schedule")

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
        weights = self._weights()
        tensors = [w.detach().abs().max() for group in weights.values() for w in group.values()
                   if w.is_floating_point() and w.numel()]
        max_abs = float(torch.stack(tensors).max()) if tensors else 0.0  # torch's max keeps a NaN (Python's may drop it)
        if not math.isfinite(max_abs):
            raise NonFiniteLoss(f"the weights became non-finite by step {self.step}, so no checkpoint was written; "
                                f"{self.last_checkpoint()}. Lower train.lr and keep train.grad_clip > 0")
        if self.history:  # rendered here, not per log line: matplotlib costs ~0.1 s in the training loop
            plot_loss(*zip(*self.history), self.run_dir / "loss.png", fid=self.fid_history)
            if self.trackers is not None:  # the loss curve, and the FID curve of train.fid_every on it
                self.trackers.image(self.step, "loss_figure", self.run_dir / "loss.png")
        state_tensors, state = {}, {"step": self.step, "num_classes": self.dataset.num_classes, "world_size": self.world}
        for name, opt in self.optimizers.items():
            opt_name, sched_name = self._state_names(name)
            opt_tensors, state[opt_name] = ckpt.flatten_state(opt.state_dict(), opt_name)
            state_tensors.update(opt_tensors)
            state[sched_name] = self.schedules[name].state_dict()
        rng_tensors, rng_state = ckpt.capture_rng()
        state_tensors.update({f"rng.{k}": v for k, v in rng_tensors.items()}, **self.objective.state_dict(),
                             generator=ckpt.generator_state(self.generator),
                             **({f"phema.{k}": v for k, v in self.phema.state_dict().items()} if self.phema else {}))
        state.update({
            "scaler": self.scaler.state_dict(),
            "rng": rng_state,
            "history": self.history,
            "fid_history": self.fid_history,
            "best_fid": self.best_fid if math.isfinite(self.best_fid) else None,
            "max_abs_weight": max_abs,
            "last_loss": self.history[-1][1] if self.history else None,
            **({"phema": self.phema.metadata()} if self.phema else {}),
            **self.objective.checkpoint_info(),
        })
        ckpt.save_checkpoint(self.run_dir, self.step, {**weights, "state": state_tensors}, state,
                             keep=self.cfg.train.keep_checkpoints)

    def _resume_posthoc_ema(self, c) -> None:
        """Restore the post-hoc EMA tracks exactly (their profiles average every step since step 1, so they cannot
        restart partway: ResumeError, even under --inexact-resume), drop snapshots newer than the checkpoint (written by
        the interrupted run past it), and take the best score from RUN/best (which may be newer than the checkpoint)."""
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
        try:
            for name, m in self.modules.items():
                m.load_state_dict(c.tensors[name])
            if self.ema is not None:
                self.ema.model.load_state_dict(c.tensors["ema"])
        except (KeyError, RuntimeError) as e:
            raise ResumeError(f"the checkpoint at step {c.step} in {self.run_dir} does not fit this config's networks "
                              f"({type(e).__name__}: {e}); train into a new --out") from e
        self.step = int(c.state["step"])
        try:
            st, s = c.tensors["state"], c.state
            legacy = s.get("lr_schedules", [])  # autoencoder runs before the one Trainer: [main, disc]
            for i, (name, opt) in enumerate(self.optimizers.items()):
                opt_name, sched_name = self._state_names(name)
                opt.load_state_dict(speed.regroup_state(ckpt.unflatten_state(st, s[opt_name]), self.params[name], opt))
                sched = self.schedules[name]
                sched.load_state_dict(s[sched_name] if sched_name in s else legacy[i])
                if len(sched.base_lrs) != len(opt.param_groups):  # regrouped (speed.regroup_state): one schedule for all
                    sched.base_lrs, sched._last_lr = (v[:1] * len(opt.param_groups) for v in (sched.base_lrs, sched._last_lr))
            if "scaler" in s:
                self.scaler.load_state_dict(s["scaler"])
            ckpt.set_generator_state(self.generator, st["generator"])
            self.objective.load_state_dict(st)
            # restored last: building the model and data above drew from the global RNGs
            ckpt.restore_rng({k.removeprefix("rng."): v for k, v in st.items() if k.startswith("rng.")}, s["rng"])
            self.history = [list(h) for h in s.get("history", [])]
            self.fid_history = [list(h) for h in s.get("fid_history", [])]
            self.best_fid = math.inf if s.get("best_fid") is None else float(s["best_fid"])
        except (KeyError, IndexError, ValueError, RuntimeError) as e:
            if not inexact:
                raise ResumeError(f"the checkpoint at step {self.step} in {self.run_dir} lacks training state needed for an "
                                  f"exact resume ({type(e).__name__}: {e}); pass --inexact-resume to continue from its weights") from e
            warnings.warn(f"inexact resume from step {self.step}: {e}")
        self._resume_posthoc_ema(c)
        if inexact:  # the config may have changed: its lr and weight decay replace the ones in the checkpoint
            t = self.cfg.train
            for name, opt in self.optimizers.items():
                sched = self.schedules[name]
                sched.base_lrs = [t.lr] * len(opt.param_groups)
                for g in opt.param_groups:
                    g.update(initial_lr=t.lr, weight_decay=0.0 if g.get("no_decay") else t.weight_decay,
                             lr=t.lr * sched.lr_lambdas[0](sched.last_epoch))
                sched._last_lr = [g["lr"] for g in opt.param_groups]
        for opt in self.optimizers.values():  # optimizer state follows the parameters' device
            for p, v in opt.state.items():
                for k, tensor in v.items():
                    if isinstance(tensor, Tensor) and k != "step":
                        v[k] = tensor.to(p.device)


# --- the networks measurements use ---------------------------------------------------------------------------------
DIGIT_RECIPE = ["model.kind=digit_classifier", "data.source=mnist", "data.image_size=28", "data.channels=1",
                "train.batch_size=64", "train.steps=468", "train.lr=2e-3", "train.lr_schedule=linear", "train.warmup_steps=0",
                "train.grad_clip=0", "train.seed=0", "train.mixed_precision=no", "train.log_every=78", "train.sample_every=0",
                "train.checkpoint_every=468", "train.keep_checkpoints=1"]
"""The digit classifier's training: 6 epochs (468 steps of 64 of the 5,000 bundled MNIST digits), Adam at 2e-3 decayed
linearly to 0, no clipping, float32 on every machine, no augmentation (shifts of 1-2 pixels did not raise held-out
accuracy, 97%+ without, and would make the features blind to misplaced digits, which a sample-quality metric should
see). With DigitClassifier's layers it names the cache folder, so a change of either trains a new feature space."""
DIGIT_SPACE_VERSION = 2  # v1 (before 2026-12-06) was trained by a loop of its own, with other batches: other FIDs


def digit_classifier(cache_dir: str | os.PathLike | None = None) -> DigitClassifier:
    """The fixed digit classifier of the digit metrics, frozen: trained once by the one Trainer (DIGIT_RECIPE, model.kind
    "digit_classifier") into the run folder CACHE/digit_classifier-v2-{hash} (cache_dir, else $DIFFUSE_CACHE, else
    ~/.cache/diffuse), then loaded from it. It trains in this process alone, into a temporary folder renamed into place
    when done (a run another process finished first is kept); a damaged cache is trained again, with a warning. The
    global RNGs (CPU and CUDA) are left as they were: a run that measures an FID goes on drawing what it would have."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        return _cached_digit_classifier(cache_dir)


def _cached_digit_classifier(cache_dir: str | os.PathLike | None) -> DigitClassifier:
    run = digit_classifier_folder(cache_dir)
    root = run.parent
    if run.exists():
        problem = "it holds no valid checkpoint"
        if ckpt.latest_step(run) is not None:
            try:
                return _load_digits(run)
            except (KeyError, RuntimeError, ValueError, OSError) as e:
                problem = f"{type(e).__name__}: {e}"
        warnings.warn(f"ignoring the unreadable digit-classifier cache {run} ({problem}); retraining", UserWarning,
                      stacklevel=2)
        shutil.rmtree(run, ignore_errors=True)  # damaged: trained again, never trusted
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".digit_classifier-") as tmp:
        Trainer(apply_overrides(RunConfig(), DIGIT_RECIPE), Path(tmp) / "run", progress=False, one_process=True,
                device="cpu").fit()  # the CPU on every machine: one feature space
        try:
            os.replace(Path(tmp) / "run", run)
        except OSError:  # another process put its run there first: the same recipe, so the same network
            pass
    return _load_digits(run)


def digit_classifier_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """CACHE/digit_classifier-v{DIGIT_SPACE_VERSION}-{hash}: the hash covers the network's layers and DIGIT_RECIPE."""
    root = Path(cache_dir or os.environ.get("DIFFUSE_CACHE") or "~/.cache/diffuse").expanduser()
    with torch.device("meta"):  # the layers' repr only: no weights, no draws from the RNG
        layers = repr(DigitClassifier())
    key = hashlib.sha256(f"{layers}{DIGIT_RECIPE}".encode()).hexdigest()[:10]
    return root / f"digit_classifier-v{DIGIT_SPACE_VERSION}-{key}"


def _load_digits(run: Path) -> DigitClassifier:
    net = DigitClassifier()
    ckpt.load_weights(net, ckpt.load_checkpoint(run).tensors["model"], config=run / "config.toml", weights=run / "checkpoints")
    return net.eval().requires_grad_(False)


def _user_module(spec: str) -> nn.Module:
    """MODULE:ATTR or FILE.py:ATTR -> the nn.Module there, or what calling it with no arguments returns."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ValueError(f"feature network {spec!r}: expected digits, inception[:PATH], MODULE:ATTR or FILE.py:ATTR "
                         "(ATTR an nn.Module or a function returning one)")
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise FileNotFoundError(f"feature network file {where} does not exist")
        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"feature network {spec!r}: cannot import module {where!r} ({e}); check the name and "
                             "that it is on PYTHONPATH, or give a FILE.py:ATTR path") from e
    obj = module
    for name in attr.split("."):
        if not hasattr(obj, name):
            raise ValueError(f"feature network {spec!r}: {where} has no attribute {attr!r}")
        obj = getattr(obj, name)
    net = obj if isinstance(obj, nn.Module) else obj() if callable(obj) else None
    if not isinstance(net, nn.Module):
        raise ValueError(f"feature network {spec!r} is a {type(obj).__name__}, not an nn.Module or a function returning one")
    return net.eval().requires_grad_(False)


def feature_network(spec: str = "digits", device: str | torch.device = "cpu") -> nn.Module:
    """The feature network named by spec, frozen on device:

    - "digits": the cached digit classifier (1-channel digits; the default of `diffuse eval`);
    - "inception" or "inception:PATH": the standard FID Inception-v3 from a local weights file
      (PATH or $DIFFUSE_INCEPTION_WEIGHTS; see diffuse.nets.inception for where to get it);
    - "MODULE:ATTR" or "FILE.py:ATTR": any nn.Module of the user's, or a function returning one. Its
      `features(x)` (else `forward(x)`) gives the features of images in [-1, 1]; `forward(x)` gives
      the logits that the Inception Score needs.
    """
    if spec == "digits":
        return digit_classifier().to(device)
    if spec == "inception" or spec.startswith("inception:"):
        return inception_fid(spec.partition(":")[2] or None, device=device)
    return _user_module(spec).to(device)


def dry_run(cfg: RunConfig, **kw) -> str:
    """`diffuse train --dry-run`: one training step's footprint (footprint.step_footprint: parameters, FLOPs per image,
    peak memory), measured on a throw-away run folder with the config's data, model and options; nothing else is
    written. Raises as Trainer does for a bad config."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False, **kw)
        for m in trainer.modules.values():
            m.train()
        fp = step_footprint(trainer.train_step, trainer.model, cfg.train.batch_size // trainer.world, trainer.device)
    return (f"{fp.describe()}; at train.batch_size = {cfg.train.batch_size}, {cfg.train.steps:,} steps are "
            f"{fp.flops_per_image * cfg.train.batch_size * cfg.train.steps / 1e15:.3g} PFLOP")


def train(cfg: RunConfig, run_dir: str | Path, **kw) -> Path:
    """Train (or resume) a run of any kind; the Python API behind `diffuse train`. Returns the run folder."""
    trainer = Trainer(cfg, run_dir, **kw)
    try:
        return trainer.fit()
    finally:
        distributed.close()
