"""The kinds of model the one Trainer trains, by the value of model.kind (KINDS): what a kind does lives in its module here.

Adding a kind: write its Objective (kinds/base.py) in a module of this package, add it here, and add it to the
contract test (tests/test_kinds.py), which checks exact resume and DDP for every row of this table.
"""

import dataclasses

from ..config import RunConfig, check_unused
from .autoencoder import AutoencoderObjective
from .base import Context, Group, Objective, ignored
from .diffusion import ClassifierObjective, DiffusionObjective
from .diffae import DiffAEClassifierObjective, DiffAEObjective, DiffAEPriorObjective, semantic_unused
from .digit_classifier import DigitClassifierObjective
from .segmentation import SegmentationObjective

KINDS: dict[str, type[Objective]] = {
    "denoiser": DiffusionObjective,
    "classifier": ClassifierObjective,
    "autoencoder": AutoencoderObjective,
    "digit_classifier": DigitClassifierObjective,
    "segmenter": SegmentationObjective,
    "diffae": DiffAEObjective,
    "diffae_prior": DiffAEPriorObjective,
    "diffae_classifier": DiffAEClassifierObjective,
}



def unused_rows(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """The kind's ignored settings (Objective.unused) and, for every kind but the segmenter, the [segment] section; for
    every kind but the diffusion autoencoder's second runs, the [semantic] section."""
    segment = [] if cfg.model.kind == "segmenter" else ignored(cfg, 'only model.kind = "segmenter" reads it', ("segment",))
    own = KINDS[cfg.model.kind].unused(cfg)
    semantic = [] if cfg.model.kind in ("diffae_prior", "diffae_classifier") else semantic_unused(cfg, cfg.model.kind)
    return own + [row for row in segment + semantic if row[0] not in {r[0] for r in own}]


def ignored_sections(cfg: RunConfig) -> tuple[str, ...]:
    """The config sections a run's kind ignores whole (every key of them among its unused settings): what its saved
    config.toml leaves out (config.save_config)."""
    rows = {key for key, _, _ in unused_rows(cfg)}
    return tuple(f.name for f in dataclasses.fields(cfg) if f.name != "model"
                 and all(f"{f.name}.{g.name}" in rows for g in dataclasses.fields(getattr(cfg, f.name))))


def check_config(cfg: RunConfig) -> None:
    """Every check of a training config that needs neither its data nor a write: settings that would do nothing
    (config.check_unused) and its kind's own (Objective.check_config: the network against the shape it works on), so a
    bad config is refused before the data load, before a latent run encodes its data and before anything is written.
    ConfigError or ValueError naming the setting; FileNotFoundError naming latent.autoencoder when it holds no run."""
    check_unused(cfg, unused_rows(cfg))
    KINDS[cfg.model.kind].check_config(cfg)


__all__ = ["KINDS", "Context", "Group", "Objective", "check_config", "ignored_sections", "unused_rows"]
