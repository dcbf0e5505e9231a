"""The kinds of model the one Trainer trains, by the value of model.kind (KINDS): what a kind does lives in its module here.

Adding a kind: write its Objective (kinds/base.py) in a module of this package, add it here, and add it to the
contract test (tests/test_kinds.py), which checks exact resume and DDP for every row of this table.
"""

import dataclasses

from ..config import RunConfig, check_unused
from .autoencoder import AutoencoderObjective
from .base import Context, Group, Objective, ignored
from .clip import ClipObjective
from .diffusion import ClassifierObjective, DiffusionObjective
from .diffae import DiffAEClassifierObjective, DiffAEObjective, DiffAEPriorObjective, semantic_unused
from .digit_classifier import DigitClassifierObjective
from .segmentation import SegmentationObjective
from .unclip import UnclipDecoderObjective, UnclipPriorObjective
from .video import VideoObjective

KINDS: dict[str, type[Objective]] = {
    "denoiser": DiffusionObjective,
    "classifier": ClassifierObjective,
    "autoencoder": AutoencoderObjective,
    "digit_classifier": DigitClassifierObjective,
    "segmenter": SegmentationObjective,
    "diffae": DiffAEObjective,
    "diffae_prior": DiffAEPriorObjective,
    "diffae_classifier": DiffAEClassifierObjective,
    "clip": ClipObjective,
    "unclip_prior": UnclipPriorObjective,
}
VIDEO_KINDS: dict[str, type[Objective]] = {  # model.kind -> its objective for a video network (model.video = true)
    "denoiser": VideoObjective,
}


def objective_class(cfg: RunConfig) -> type[Objective]:
    """The Objective a config trains: KINDS[model.kind], or VIDEO_KINDS[model.kind] for a video network (model.video;
    a video run stays a "denoiser" run for sampling and the app). ValueError naming model.video for a kind without a
    video objective, and for video data (data.frames) without model.video."""
    if not cfg.model.video:
        if cfg.data.frames:
            raise ValueError(f"data.frames = {cfg.data.frames} makes videos (C, F, H, W), which an image network does not "
                             "take: set model.video = true (and model.video_observed for masked conditioning), or "
                             "data.frames = 0 with an image source")
        if cfg.model.kind == "denoiser" and cfg.model.image_embed_dim:  # unCLIP's decoder (kinds/unclip.py)
            return UnclipDecoderObjective
        return KINDS[cfg.model.kind]
    if cfg.model.image_embed_dim:
        raise ValueError("model.image_embed_dim makes unCLIP's decoder of images; a video network takes no CLIP image "
                         "embedding: set model.image_embed_dim = 0, or model.video = false")
    if cfg.model.kind not in VIDEO_KINDS:
        raise ValueError(f'model.video = true makes a video denoiser; model.kind = "{cfg.model.kind}" has no video version: '
                         f'set model.kind = {" or ".join(map(repr, VIDEO_KINDS))}, or model.video = false')
    return VIDEO_KINDS[cfg.model.kind]



def unused_rows(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """The kind's ignored settings (Objective.unused) and, for every kind but the segmenter, the [segment] section; for
    every kind but the diffusion autoencoder's second runs, the [semantic] section; for every run but a video
    denoiser's, the [video] section."""
    segment = [] if cfg.model.kind == "segmenter" else ignored(cfg, 'only model.kind = "segmenter" reads it', ("segment",))
    own = objective_class(cfg).unused(cfg)
    semantic = [] if cfg.model.kind in ("diffae_prior", "diffae_classifier") else semantic_unused(cfg, cfg.model.kind)
    video = [] if cfg.model.video else ignored(cfg, "only a video denoiser (model.video = true) reads it", ("video",))
    clip = [] if cfg.model.kind == "clip" else ignored(cfg, 'only model.kind = "clip" reads it', ("clip",))
    decoder = cfg.model.kind == "denoiser" and cfg.model.image_embed_dim > 0
    if cfg.model.kind == "unclip_prior":
        unclip = []
    elif decoder:  # the decoder reads the CLIP stage only
        unclip = [(f"unclip.{f.name}", "unCLIP's decoder reads only unclip.clip and unclip.clip_step (the rest is the "
                   'prior\'s, model.kind = "unclip_prior")', "remove it")
                  for f in dataclasses.fields(cfg.unclip) if f.name not in ("clip", "clip_step")]
    else:
        unclip = ignored(cfg, 'only unCLIP (model.kind = "unclip_prior", or a "denoiser" with model.image_embed_dim > 0) '
                         "reads it", ("unclip",))
    if cfg.model.kind != "denoiser":
        unclip += [(f"model.{k}", f'model.kind = "{cfg.model.kind}" takes no CLIP image embedding (unCLIP\'s decoder is a '
                    '"denoiser")', "remove it") for k in ("image_embed_dim", "image_embed_tokens")]
    elif not decoder:
        unclip.append(("model.image_embed_tokens", "model.image_embed_dim = 0 (no CLIP image embedding)", "remove it"))
    return own + [row for row in segment + semantic + video + clip + unclip if row[0] not in {r[0] for r in own}]


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
    objective_class(cfg).check_config(cfg)


__all__ = ["KINDS", "VIDEO_KINDS", "Context", "Group", "Objective", "UnclipDecoderObjective", "check_config",
           "ignored_sections", "objective_class", "unused_rows"]
