"""The digit classifier kind (model.kind = "digit_classifier"): the fixed feature network of the digit metrics
(nets/digits.py: FID, KID, IS and precision/recall of digit models), trained by the one Trainer with cross-entropy on
labelled 1-channel digits. `train.digit_classifier` trains it once with its recipe (train.DIGIT_RECIPE) into a cache
folder, so every machine measures in the same feature space. No draws of its own (its dropout masks come from the
global RNG), no EMA: the raw weights are the instrument.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RunConfig
from ..nets.digits import DigitClassifier
from .base import DIFFUSION_TRAINING, Context, Group, Objective, ignored


class DigitClassifierObjective(Objective):
    groups = {"main": Group(("model",))}
    ema = None
    progress_desc = "digit classifier"

    @classmethod
    def unused(cls, cfg: RunConfig) -> list[tuple[str, str, str]]:
        """Everything of the diffusion model: the network is the fixed DigitClassifier, trained on clean digits."""
        return ignored(cfg, 'model.kind = "digit_classifier" trains the fixed digit classifier (nets/digits.py) on clean digits',
                       ("model", "schedule", "sample", "task", "latent", "autoencoder"), (*DIFFUSION_TRAINING, "fid_every", "hflip"))

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        if cfg.data.channels != 1:
            raise ValueError(f"model.kind = 'digit_classifier' reads 1-channel digits; set data.channels = 1 (it is "
                             f"{cfg.data.channels})")

    def __init__(self, cfg: RunConfig, data, ctx: Context):
        if data.num_classes != 10:
            raise ValueError(f"the digit classifier has 10 outputs, one per digit; the data have {data.num_classes} classes "
                             "(use data.source = 'mnist' or 'digits', or a folder with ten class sub-folders)")
        self.cfg, self.dataset = cfg, data

    def build(self) -> dict[str, nn.Module]:
        return {"model": DigitClassifier()}

    def losses(self, x: Tensor, cond: dict, d: dict, step: int) -> dict:
        """Cross-entropy of each digit's logits against its label, (b,)."""
        return {"main": F.cross_entropy(self.nets["model"](x), cond["label"], reduction="none")}
