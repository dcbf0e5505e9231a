"""The kinds of model the one Trainer trains, by the value of model.kind (KINDS): what a kind does lives in its module here.

Adding a kind: write its Objective (kinds/base.py) in a module of this package, add it here, and add it to the
contract test (tests/test_kinds.py), which checks exact resume and DDP for every row of this table.
"""

from ..config import RunConfig, check_unused
from .autoencoder import AutoencoderObjective
from .base import Context, Group, Objective, ignored
from .diffusion import ClassifierObjective, DiffusionObjective
from .digit_classifier import DigitClassifierObjective
from .segmentation import SegmentationObjective

KINDS: dict[str, type[Objective]] = {
    "denoiser": DiffusionObjective,
    "classifier": ClassifierObjective,
    "autoencoder": AutoencoderObjective,
    "digit_classifier": DigitClassifierObjective,
    "segmenter": SegmentationObjective,
}



def check_config(cfg: RunConfig) -> None:
    """Every check of a training config that needs neither its data nor a write: settings that would do nothing
    (config.check_unused) and its kind's own (Objective.check_config: the network against the shape it works on), so a
    bad config is refused before the data load, before a latent run encodes its data and before anything is written.
    ConfigError or ValueError naming the setting; FileNotFoundError naming latent.autoencoder when it holds no run."""
    kind = KINDS[cfg.model.kind]
    segment = [] if cfg.model.kind == "segmenter" else ignored(cfg, 'only model.kind = "segmenter" reads it', ("segment",))
    check_unused(cfg, kind.unused(cfg) + segment)
    kind.check_config(cfg)


__all__ = ["KINDS", "Context", "Group", "Objective", "check_config"]
