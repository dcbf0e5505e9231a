"""unCLIP's decoder (Ramesh et al. 2022, "Hierarchical text-conditional image generation with CLIP latents", sec. 2.1;
lecture 002, "DALL-E 2"): a denoiser (model.kind = "denoiser" with model.image_embed_dim = D > 0) whose U-Net takes the
CLIP image embedding z_i of the image it denoises, as the condition `image_embed` (B, D), for the one Trainer:

    repeat: x_0 ~ q(x_0);  z_i = f(x_0), the frozen CLIP's unit image embedding at t = 0;  t, eps as the process draws;
            z_i -> 0 (the null) with probability train.condition_dropout.image_embed (the paper: 10%), and the caption
            -> "" with its own probability (the paper: 50%) when the run also reads captions;
            gradient step on || eps - eps_theta(alpha_t x_0 + sigma_t eps, t, z_i [, caption]) ||^2   (any target)

z_i reaches the network two ways (nets.unet.UNet._image_embed): projected and added to the time embedding, and projected
into model.image_embed_tokens extra cross-attention tokens after the caption's. The null is zeros (no unit embedding is
zero, so the network can tell it apart; Karlo learns a null vector instead), and it replaces both paths at once (the
DALLE2-pytorch#144 bug: hiddens never dropped). Classifier-free guidance on z_i is then the existing machinery
(generate's `guidance`, the null from the condition spec).

The CLIP (`[unclip] clip`) is a stage: pinned by checkpoint step (unclip.clip_step, 0 = its newest when training starts,
then saved) and checked before anything loads: its images must be this run's (data.channels, data.image_size) and its
width model.image_embed_dim. It embeds each prepared training batch (after flips and augmentation) in the objective's
`conditions_from` hook, under no gradient: it is never trained here and not part of the run's checkpoints. The decoder
works on pixels (the paper's 64 x 64 base model); a latent decoder is refused.

Embedding a batch costs one forward of the CLIP's image tower (the U-Net's contracting path at width 16, no backward):
0.08 s of a 1.84 s step of configs/unclip_decoder_shapes.toml at batch 32 (float32, one thread of a loaded 2-core CPU,
2026-12-07), so the embeddings are not cached.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor

from .. import checkpoint as ckpt
from ..config import RunConfig, load_config
from ..generate import generate
from ..tasks.unclip import image_embeddings
from ..visualize import save_grid
from .base import Context
from .clip import load_clip
from .diffusion import DiffusionObjective, build_denoiser, sample_config_kwargs


# --- the CLIP stage --------------------------------------------------------------------------------------------------
def clip_run(path: str | Path, name: str = "unclip.clip") -> tuple[Path, RunConfig]:
    """(absolute path, config) of a CLIP run named by `name`. ValueError when empty or of another kind;
    FileNotFoundError when the folder holds no run."""
    if not str(path):
        raise ValueError(f"{name} is empty: name the CLIP run whose image embeddings condition the decoder (`diffuse train "
                         "configs/clip_shapes.toml --out runs/clip_shapes`, then unclip.clip = \"runs/clip_shapes\")")
    run = Path(path).expanduser().resolve()
    if not (run / "config.toml").is_file():
        raise FileNotFoundError(f"{name} = {str(path)!r}: {run} holds no run (no config.toml); train the CLIP first: "
                                "`diffuse train configs/clip_shapes.toml --out runs/clip_shapes`")
    cfg = load_config(run / "config.toml")
    if cfg.model.kind != "clip":
        raise ValueError(f"{name} = {str(path)!r} holds a {cfg.model.kind} run, not a CLIP (model.kind = \"clip\"); name "
                         "one trained with configs/clip_shapes.toml")
    return run, cfg


def check_clip(cfg: RunConfig, clip_cfg: RunConfig, name: str = "unclip.clip") -> None:
    """ValueError naming the mismatch and the fix when the CLIP of `clip_cfg` cannot embed the images of `cfg` into the
    width its decoder takes: image channels and side (data.channels, data.image_size), embedding width (clip.dim against
    model.image_embed_dim)."""
    d, c = cfg.data, clip_cfg.data
    if (d.channels, d.image_size) != (c.channels, c.image_size):
        raise ValueError(f"{name}: the CLIP reads {c.channels}-channel images of side {c.image_size}, and this run's are "
                         f"{d.channels}-channel of side {d.image_size} (data.channels, data.image_size): train the CLIP on "
                         "images of this run's size, or set this run's data to the CLIP's")
    if clip_cfg.clip.dim != cfg.model.image_embed_dim:
        raise ValueError(f"{name}: the CLIP's embeddings have width {clip_cfg.clip.dim} (its clip.dim) and "
                         f"model.image_embed_dim = {cfg.model.image_embed_dim}: set model.image_embed_dim = "
                         f"{clip_cfg.clip.dim}")


def resolve_clip(cfg: RunConfig, saved: RunConfig | None) -> RunConfig:
    """unclip.clip as an absolute path and unclip.clip_step pinned (the saved run's, else the CLIP's newest checkpoint).
    FileNotFoundError when the CLIP holds no checkpoint yet."""
    cfg = copy.deepcopy(cfg)
    run, _ = clip_run(cfg.unclip.clip)
    cfg.unclip.clip = str(run)
    if saved is not None and not cfg.unclip.clip_step:
        cfg.unclip.clip_step = saved.unclip.clip_step
    if not cfg.unclip.clip_step:
        step = ckpt.latest_step(run)
        if step is None:
            raise FileNotFoundError(f"the CLIP run {run} holds no checkpoint yet; let it save one first")
        cfg.unclip.clip_step = step
    return cfg


# --- the objective -----------------------------------------------------------------------------------------------------
class UnclipDecoderObjective(DiffusionObjective):
    """DiffusionObjective with the condition `image_embed` = the frozen CLIP's z_i of each prepared training image
    (`conditions_from`), dropped per train.condition_dropout like any key. Previews: the first training images above,
    their decodings from z_i (and caption) with the fixed noise of train.seed as x_T below."""

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """The diffusion checks, then: pixels (no latent.autoencoder), unclip.clip a CLIP run whose images and width are
        this run's (`check_clip`). ValueError / FileNotFoundError naming the setting."""
        if cfg.latent.autoencoder:  # before the diffusion checks read the autoencoder run
            raise ValueError("model.image_embed_dim: unCLIP's decoder works on pixels (the CLIP embeds the images, not the "
                             "latents): remove latent.autoencoder")
        super().check_config(cfg)
        if cfg.task.kind != "none":
            raise ValueError(f"model.image_embed_dim with task.kind = '{cfg.task.kind}': the decoder's condition is the "
                             "image embedding; remove task.kind")
        _, clip_cfg = clip_run(cfg.unclip.clip)
        check_clip(cfg, clip_cfg)

    @classmethod
    def resolve(cls, cfg: RunConfig, saved: RunConfig | None) -> RunConfig:
        return resolve_clip(super().resolve(cfg, saved), saved)

    def __init__(self, cfg: RunConfig, data, ctx: Context):
        super().__init__(cfg, data, ctx)
        _, self.clip = load_clip(cfg.unclip.clip, ctx.device, cfg.unclip.clip_step or None)

    def conditions_from(self, x0: Tensor) -> dict[str, Tensor]:
        """{"image_embed": z_i (B, D)} of the prepared clean batch, by the frozen CLIP at t = 0."""
        return {"image_embed": image_embeddings(self.clip, x0)}

    @torch.no_grad()
    def fixed_samples(self, trainer, n: int, steps: int = 0) -> tuple[Tensor, list[Tensor]]:
        """Decodings of the first n training images' z_i (and captions) with the EMA weights, x_T from the fixed noise
        of train.seed and the run's [sample] settings (`steps` > 0 replaces sample.steps). Returns (samples, [those
        images])."""
        idx = torch.arange(n) % len(self.dataset)
        x, extras = self.dataset.batch(idx)
        x = x.to(trainer.device)
        cond = {"image_embed": image_embeddings(self.clip, x)}
        if self.cfg.model.text_encoder:
            cond["text"] = extras["text"].to(trainer.device)
        kwargs = sample_config_kwargs(self.cfg.sample) | ({"steps": steps} if steps else {})
        out = generate(build_denoiser(self.cfg, trainer.ema.model), n, self.space.shape, cond=cond,
                       seed=self.cfg.train.seed, device=trainer.device, **kwargs)
        return out, [x]

    def preview(self, trainer) -> Path:
        """RUN/samples/step_NNNNNNNN.png: sample.n training images above, their decodings below."""
        out, (x,) = self.fixed_samples(trainer, min(self.cfg.sample.n, len(self.dataset)))
        return save_grid(torch.cat([x, out]), trainer.run_dir / "samples" / f"step_{trainer.step:08d}.png",
                         nrow=len(x))
