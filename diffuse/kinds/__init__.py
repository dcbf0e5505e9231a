"""The kinds of model the one Trainer trains, by the value of model.kind: the only place a kind's name is read.

Adding a kind: write its Objective (kinds/base.py) in a module of this package, add it here, and add it to the
contract test (tests/test_kinds.py), which checks exact resume and DDP for every row of this table.
"""

from .autoencoder import AutoencoderObjective
from .base import Context, Group, Objective
from .diffusion import ClassifierObjective, DiffusionObjective

KINDS: dict[str, type[Objective]] = {
    "denoiser": DiffusionObjective,
    "classifier": ClassifierObjective,
    "autoencoder": AutoencoderObjective,
}

__all__ = ["KINDS", "Context", "Group", "Objective"]
