"""What a kind of model gives the one Trainer (train.py): its modules, its random draws, its losses per optimizer group,
and what it shows and measures. The Trainer owns everything else (devices, DDP, precision, micro-batches, NaN checks,
clipping, EMA, checkpoints and exact resume, logs, time limits); a kind never runs a loop of its own.

One training step, as the Trainer runs it:

    x, extras = dataset.batch(this process's rows of the global batch)
    d = objective.draw(B, generator)                   every random number of the step, for the global batch, in order
    x, extras, d = objective.inputs(x, extras, d_local)   deterministic per-batch preparation (flips, conditions, ...)
    for each micro-batch:  losses = objective.losses(x, extras, d, step)   group -> per-example losses
                           backward of each group's mean, into that group's parameters only
    objective.after_backward(d, gathered aux)          e.g. the importance sampler's history of L_t
    for each group with a loss this step: unscale, clip, step, schedule
    objective.after_step()                              e.g. CLIP's clamp of its temperature (before the EMA update)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..data import load_dataset


DIFFUSION_TRAINING = ("loss", "loss_weighting", "min_snr_gamma", "p2_k", "p2_gamma", "vlb_lambda", "condition_dropout",
                      "augment_p", "offset_noise", "posthoc_ema", "ema_decay", "ema_warmup")  # [train] keys of diffusion only


def ignored(cfg: RunConfig, why: str, sections: tuple[str, ...] = (), train: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """Objective.unused's rows for a kind that ignores whole `sections` (all but model.kind) and the named [train] keys:
    (section.key, why, "remove it")."""
    out = [(f"{section}.{f.name}", why, "remove it") for section in sections
           for f in dataclasses.fields(getattr(cfg, section)) if (section, f.name) != ("model", "kind")]
    return out + [(f"train.{k}", why, "remove it") for k in train]


@dataclass(frozen=True)
class Group:
    """One optimizer (AdamW, train.lr with the warm-up and decay of train.lr_schedule, train.weight_decay) over the
    parameters of the named modules. The first group of a kind is "main": its checkpoint names are "optimizer" and
    "lr_schedule"; another group g's are "g_optimizer" and "g_lr_schedule"."""

    modules: tuple[str, ...]                   # names in the kind's module dict
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's (beta1, beta2); taming-transformers and LDM: (0.5, 0.9)
    clip: bool = True                          # train.grad_clip applies (and its norm is checked and logged)


@dataclass
class Context:
    """Where a kind's objective trains: the run folder, the device, this process (rank of world), the config saved
    in the run folder by an earlier session (None for a new run), the trainer's generator, and the resolver of feature
    networks by name (train.fid_features)."""

    run_dir: Path
    device: torch.device
    rank: int = 0
    world: int = 1
    saved: RunConfig | None = None
    generator: torch.Generator | None = None  # the trainer's: every draw of a step (checkpointed)
    feature_network: Callable | None = None    # (spec, device) -> frozen feature network (train.feature_network)


class Objective:
    """One kind's training step without the loop. Subclasses set `groups`, `ema`, `separable` and implement `build`,
    `draw` and `losses`; the other hooks have do-nothing defaults.

    After construction (which prepares the data and checks the config, before any module is built or file written),
    `dataset` is what the Trainer draws batches from (`__len__`, `batch(idx) -> (x, extras)`, `num_classes`,
    `condition_keys`), and `cfg` is the config as trained (stages resolved)."""

    groups: dict[str, Group] = {"main": Group(("model",))}
    ema: str | None = "model"   # the module whose EMA (and post-hoc EMA tracks) is kept and sampled; None: no EMA
    separable: bool = True      # losses are per example, so a batch may be cut into micro-batches
    progress_desc = "training"  # the progress bar's label
    loss_name = "training loss"  # the main group's loss in messages
    nonfinite_hint = "Lower train.lr, keep train.grad_clip > 0, or use train.mixed_precision = 'no'"

    cfg: RunConfig
    dataset: Any

    @classmethod
    def unused(cls, cfg: RunConfig) -> list[tuple[str, str, str]]:
        """(section.key, why it does nothing for this kind, the fix) of the settings the kind ignores, for
        config.check_unused: e.g. an autoencoder run's [schedule]. Default: none."""
        return []

    @classmethod
    def load_data(cls, cfg: RunConfig):
        """The data the kind trains on when the Trainer is given none: data.load_dataset(cfg.data) by default (a
        segmentation run: its labelled images)."""
        return load_dataset(cfg.data)

    @classmethod
    def examples(cls, cfg: RunConfig, data) -> int:
        """How many examples a batch is drawn from, known before the kind prepares its data (train.batch_size must not
        exceed it): len(data) by default."""
        return len(data)

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """The checks that need neither the data nor a write (the network's structure against the shape it works on),
        run before the data load, before a stage is encoded and before anything is written; ValueError naming the
        setting. Default: none."""

    @classmethod
    def resolve(cls, cfg: RunConfig, saved: RunConfig | None) -> RunConfig:
        """The config with what training fixes resolved (stages pinned), before the Trainer compares it with `saved`."""
        return cfg

    def build(self) -> dict[str, nn.Module]:
        """The modules, built in a fixed order after torch.manual_seed(train.seed) (their initial weights)."""
        raise TypeError(f"{type(self).__name__} must define build()")

    def bind(self, nets: dict[str, nn.Module], modules: dict[str, nn.Module]) -> None:
        """Called once after `build`: `modules` as built (on the device), `nets` the same wrapped for DDP where several
        processes train (call these in `losses`, so gradients are reduced)."""
        self.modules, self.nets = modules, nets

    def draw(self, B: int, g: torch.Generator) -> dict[str, Tensor]:
        """Every random draw of a step for the global batch of B, from `g`, in a fixed order: tensors with leading
        dimension B (the Trainer keeps this process's rows) or 0-d."""
        return {}

    def inputs(self, x: Tensor, extras: dict, d: dict) -> tuple[Tensor, dict, dict]:
        """This process's batch prepared from its draws (no new random numbers); default: as it is."""
        return x, extras, d

    def losses(self, x: Tensor, extras: dict, d: dict, step: int) -> dict[str, Any]:
        """One micro-batch's losses: group name -> per-example losses (b,) (separable) or a 0-d batch loss; a group
        left out is neither stepped nor scheduled this step. Optional "aux": name -> per-example detached values,
        gathered over the global batch for `after_backward`; "log": name -> scalars for the log."""
        raise TypeError(f"{type(self).__name__} must define losses()")

    def after_backward(self, d: dict[str, Tensor], aux: dict[str, Tensor]) -> None:
        """Once per step, after the last micro-batch's backward and before the optimizers step, when `losses` returned
        "aux": the step's global draws and the aux values gathered over the global batch."""

    def after_step(self) -> None:
        """Once per step, after the optimizers stepped and before the EMA update: a constraint on the parameters (CLIP's
        logit_scale clamped to [0, ln 100], as open_clip after every optimizer step)."""

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors of the objective's own state, checkpointed for exact resume (EDM2 checkpoints its loss object)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass

    def checkpoint_info(self) -> dict:
        """JSON facts saved in every checkpoint's state.json beside the Trainer's (e.g. an autoencoder's latent shape)."""
        return {}

    def preview(self, trainer) -> Path | None:
        """Write what a person looks at during training (rank 0, every train.sample_every steps): sample or
        reconstruction grids under RUN/samples. Returns the file written (None: nothing to show)."""

    def evaluate(self, trainer) -> tuple[dict, float | None]:
        """The measurement of train.fid_every (rank 0): (a record for the log, a score where lower is better or None).
        The Trainer keeps the weights of the best score as the run folder RUN/best."""
        return {}, None
