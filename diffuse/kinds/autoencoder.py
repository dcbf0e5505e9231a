"""The autoencoder kind (model.kind = "autoencoder"): latent diffusion's first stage (Rombach et al. 2022, sec. 3.1),
the [autoencoder] network of nets/autoencoder.py trained by the one Trainer as two optimizer groups:

    main  the autoencoder: rec + KL (or codebook + commitment) + [step >= disc_start] disc_weight * lambda * L_GAN
          (nets.autoencoder.autoencoder_loss; Esser et al. 2021, eqs. 6-7)
    disc  the patch discriminator's hinge loss (nets.autoencoder.discriminator_loss), only once the GAN is on

both AdamW with betas (0.5, 0.9) (taming-transformers and LDM), the autoencoder's gradients clipped by train.grad_clip,
the discriminator's not. Trained on all but every tenth image of the data (`held_out`); the held-out part is what
the reconstruction grids show and `train.fid_every` scores (PSNR, rFID, codebook usage). No EMA.

The one draw of a step is the KL posterior's noise for the global batch; a VQ codebook's dead-code restarts draw from
the trainer's generator inside the quantiser (the same on every process).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .. import distributed
from ..nets.autoencoder import (Autoencoder, check_config as check_autoencoder, PatchDiscriminator, autoencoder_loss, codebook_usage, discriminator_loss, gan_active,
                           latent_scale_factor, perplexity, psnr)
from ..config import RunConfig
from ..data import Subset
from ..metrics import fid
from ..stages import ENCODE_BATCH
from ..visualize import save_grid, to_uint8
from .base import DIFFUSION_TRAINING, Context, Group, Objective, ignored


HELD_OUT = 10           # every tenth image of an autoencoder run's data is held out of its training, for `diffuse eval`


def held_out(n: int) -> tuple[Tensor, Tensor]:
    """(training indices, held-out indices) of n images: every HELD_OUT-th image, indices 9, 19, 29, ... (at least one,
    the last), is held out: a fixed split, so the trainer and `diffuse eval` agree, and an interleaved one, so data
    stored in class order (the bundled MNIST digits: 500 zeros, then 500 ones, ...) give every class to both parts.
    ValueError for fewer than 2 images."""
    if n < 2:
        raise ValueError(f"an autoencoder run needs at least 2 images (one to train on, one held out), got {n}")
    test = torch.arange(HELD_OUT - 1, n, HELD_OUT) if n >= HELD_OUT else torch.tensor([n - 1])
    keep = torch.ones(n, dtype=torch.bool)
    keep[test] = False
    return torch.arange(n)[keep], test


@torch.no_grad()
def reconstruction_scores(ae: Autoencoder, x: Tensor, feature_net: torch.nn.Module | None = None) -> dict:
    """An autoencoder's scores on held-out images x (N, C, H, W) in [-1, 1]: n_held_out, latent_shape, PSNR of D(E(x))
    (dB, mean over images), the latents' std and latent_scale_factor (Rombach et al. 2022, app. D.1), for VQ the
    codebook usage and perplexity over all positions (van den Oord et al. 2017), and with `feature_net` the rFID: FID
    (Heusel et al. 2017) of the reconstructions, rounded to 8 bits as saved images are, against x. ValueError for
    rFID of fewer than 2 images."""
    device = next(ae.parameters()).device
    z = torch.cat([ae.encode(part.to(device)) for part in x.split(ENCODE_BATCH)])
    rec = torch.cat([ae.decode(part).clamp(-1, 1).cpu() for part in z.split(ENCODE_BATCH)])
    rec = torch.from_numpy(to_uint8(rec)).permute(0, 3, 1, 2).float() / 127.5 - 1  # as a saved image would be
    record = {"n_held_out": len(x), "latent_shape": list(z.shape[1:]), "psnr": float(psnr(x, rec).mean()),
              "latent_std": float(z.double().std()), "latent_scale_factor": latent_scale_factor(z)}
    if ae.quantizer is not None:
        counts = sum(ae.quantizer(part, update=False).counts for part in z.split(ENCODE_BATCH))
        record.update(codebook_usage=float(codebook_usage(counts)), perplexity=float(perplexity(counts)),
                      codebook_size=len(ae.quantizer.codebook))
    if feature_net is not None:
        if len(x) < 2:
            raise ValueError(f"rFID needs at least 2 held-out images, got {len(x)}")
        record["rfid"] = fid(x, rec, feature_net)
    return record


class AutoencoderObjective(Objective):
    groups = {"main": Group(("model",), betas=(0.5, 0.9)), "disc": Group(("disc",), betas=(0.5, 0.9), clip=False)}
    ema = None
    separable = False  # batch-mean losses and an adaptive weight of the whole batch's gradients
    progress_desc = "autoencoder"
    loss_name = "autoencoder loss"
    nonfinite_hint = "Lower train.lr or autoencoder.disc_weight, and keep train.grad_clip > 0"

    def __init__(self, cfg: RunConfig, data, ctx: Context):
        t = cfg.train
        self.cfg, self.ctx, self.pixels = cfg, ctx, data
        self.train_idx, self.test_idx = held_out(len(data))
        self.dataset = Subset(data, self.train_idx)
        for ok, msg in ((1 <= t.batch_size <= len(self.train_idx), f"train.batch_size must be in 1..{len(self.train_idx)} "
                         f"(the training part of {len(data)} images), got {t.batch_size}"),
                        (t.mixed_precision != "fp16", "train.mixed_precision = 'fp16' is not used for autoencoders (the "
                         "adaptive GAN weight divides gradient norms); use 'bf16', 'auto' or 'no'"),
                        (not t.fid_every or len(self.test_idx) >= 2,
                         f"train.fid_every needs at least 2 held-out images for an rFID and every tenth image of "
                         f"{len(data)} images holds {len(self.test_idx)}; use more images or train.fid_every = 0"),
                        (not t.fid_every or t.fid_features != "digits" or cfg.data.channels == 1,
                         f"train.fid_features = 'digits' is the feature space of 1-channel digits and the data have "
                         f"{cfg.data.channels} channels; set train.fid_features = 'inception:PATH' (or MODULE:ATTR), or "
                         "train.fid_every = 0")):
            if not ok:
                raise ValueError(msg)
        # loaded now: a bad feature spec fails before training
        self.feature_net = ctx.feature_network(t.fid_features, ctx.device) if t.fid_every else None
        self.latent_shape = None

    @classmethod
    def unused(cls, cfg: RunConfig) -> list[tuple[str, str, str]]:
        """Everything of the diffusion model: the run trains the [autoencoder] network, with no noise process."""
        return ignored(cfg, 'model.kind = "autoencoder" trains the [autoencoder] network, with no noise process',
                       ("model", "schedule", "sample", "task", "latent"), (*DIFFUSION_TRAINING, "fid_steps", "hflip"))

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """The [autoencoder] section's values (nets.autoencoder.check_config)."""
        check_autoencoder(cfg.autoencoder)

    def build(self) -> dict[str, nn.Module]:
        a, d = self.cfg.autoencoder, self.cfg.data
        model = Autoencoder(a, d.channels)
        self.latent_shape = model.latent_shape(d.image_size, d.channels)  # the images fit the levels, or ValueError
        if a.disc_weight <= 0:
            return {"model": model}
        disc = PatchDiscriminator(a, d.channels)
        if d.image_size < disc.min_size:
            raise ValueError(f"data.image_size = {d.image_size} is too small for autoencoder.disc_layers = {a.disc_layers} "
                             f"(needs {disc.min_size}); lower autoencoder.disc_layers or set autoencoder.disc_weight = 0")
        return {"model": model, "disc": disc}

    def draw(self, B: int, g: torch.Generator) -> dict[str, Tensor]:
        """The KL posterior's noise eps (B, c, h, w) for z = mu + sigma eps; nothing for VQ."""
        return {"eps": torch.randn((B, *self.latent_shape), generator=g)} if self.cfg.autoencoder.kind == "kl" else {}

    def losses(self, x: Tensor, extras: dict, d: dict, step: int) -> dict:
        a, model, disc = self.cfg.autoencoder, self.modules["model"], self.modules.get("disc")
        out = self.nets["model"](x, generator=self.ctx.generator, eps=d.get("eps"))
        terms = autoencoder_loss(model, x, out, step, disc, reduce=lambda g: distributed.mean(g, self.ctx.world))
        log = {k: v.detach() for k, v in terms.items() if k != "loss"}
        log["psnr"] = psnr(x, out.reconstruction.detach().float().clamp(-1, 1)).mean()
        if out.quantized is not None:
            log.update(usage=codebook_usage(out.quantized.counts), perplexity=perplexity(out.quantized.counts))
        losses = {"main": terms["loss"], "log": log}
        if disc is not None and gan_active(a, step):
            dl = discriminator_loss(self.nets["disc"], x, out.reconstruction, step, a)
            losses["disc"] = dl["loss"]
            log.update(disc_loss=dl["loss"].detach(), logits_real=dl["logits_real"], logits_fake=dl["logits_fake"])
        return losses

    def checkpoint_info(self) -> dict:
        return {"kind": "autoencoder", "num_classes": 0, "latent_shape": list(self.latent_shape)}

    @torch.no_grad()
    def preview(self, trainer, n: int = 16) -> Path:
        """RUN/samples/step_N.png: n held-out images (top row) above their reconstructions D(E(x)) (bottom row)."""
        model = self.modules["model"]
        x, _ = self.pixels.batch(self.test_idx[:n])
        model.eval()
        try:
            rec = model.decode(model.encode(x.to(trainer.device))).clamp(-1, 1).cpu()
        finally:
            model.train()
        return save_grid(torch.cat([x, rec]), trainer.run_dir / "samples" / f"step_{trainer.step:08d}.png", nrow=len(x))

    def evaluate(self, trainer) -> tuple[dict, None]:
        """reconstruction_scores (PSNR, rFID in train.fid_features, latent std; VQ usage and perplexity) of the first
        train.fid_samples held-out images."""
        model = self.modules["model"]
        x, _ = self.pixels.batch(self.test_idx[:self.cfg.train.fid_samples])
        model.eval()
        try:
            return {"held_out": reconstruction_scores(model, x, self.feature_net)}, None
        finally:
            model.train()
