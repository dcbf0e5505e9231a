"""The networks of a diffusion autoencoder (Preechakul et al. 2022, "Diffusion Autoencoders: Toward a Meaningful and
Decodable Representation"; lecture 002, "Diffusion Autoencoders").

    z_sem = Enc(x_0)                       the semantic encoder: the U-Net's contracting path, pooled to a vector
    eps_theta(x_t, t, z_sem)               the decoder: the U-Net, every residual block scaled by z_sem
    eps_omega(z_t, t)                      the latent DDIM: an MLP with skip connections over (normalised) z_sem

The encoder learns only through the decoder's diffusion loss (both train together, model.kind = "diffae"); the latent
DDIM is a second run on the frozen encoder's codes (model.kind = "diffae_prior"), so unconditional samples draw z_sem
first, then the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..condition import ConditionSpec
from .blocks import timestep_embedding
from .classifier import UNetEncoder
from .unet import UNet, UNetConfig


class DiffusionAutoencoder(nn.Module):
    """The pair (semantic encoder, conditional decoder) as one module, so one EMA, one optimizer and DDP cover both.

    forward(x_t (B, C, H, W), t (B,) model times, **cond) is the decoder's eps (or v, x0, ...) prediction, with cond
    holding `z_sem` (B, d), or `encode` (B, C, H, W), the clean images whose code Enc(x_0) the decoder then takes (the
    training path: the encoder's gradient flows through the diffusion loss). `encode(x0)` alone gives z_sem. The
    condition keys are the decoder's (`condition_spec`: z_sem, plus a label or other keys the config adds).
    The encoder reuses the decoder's [model] widths and pools by the spatial mean then a Linear (the reference's
    AdaptiveAvgPool and 1x1 convolution; the reference goes one level deeper, to 1x1, which a mean makes unnecessary).
    ValueError for model.semantic_dim < 1."""

    def __init__(self, cfg: UNetConfig, in_channels: int, image_size: int, num_classes: int = 0,
                 out_channels: int | None = None, augment_dim: int = 0):
        super().__init__()
        if cfg.semantic_dim < 1:
            raise ValueError('model.kind = "diffae" needs model.semantic_dim >= 1, the width of z_sem (e.g. 64 for 28 px '
                             "digits; the paper's 512 is for 64-256 px faces)")
        self.encoder = UNetEncoder(cfg, in_channels, image_size, cfg.semantic_dim, time=False)
        self.decoder = UNet(cfg, in_channels, image_size, num_classes, out_channels, augment_dim)
        self.cfg, self.image_size, self.in_channels = cfg, image_size, in_channels

    @property
    def condition_spec(self) -> ConditionSpec:
        return self.decoder.condition_spec

    @property
    def num_classes(self) -> int:
        return self.decoder.num_classes

    def encode(self, x0: Tensor) -> Tensor:
        """z_sem = Enc(x_0): (B, C, H, W) images in [-1, 1] -> (B, semantic_dim)."""
        return self.encoder(x0)

    def forward(self, x: Tensor, t: Tensor, encode: Tensor | None = None, **cond: Tensor) -> Tensor:
        if encode is not None:
            cond = {**cond, "z_sem": self.encoder(encode)}
        return self.decoder(x, t, **cond)


class SkipLayer(nn.Module):
    """One layer of MLPSkipNet (the reference's MLPLNAct with condition_bias 1): Linear; then, for an inner layer,
    h (1 + Linear(SiLU(t_emb))), LayerNorm and SiLU; the last layer is the Linear alone."""

    def __init__(self, d_in: int, d_out: int, time_dim: int, inner: bool):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.inner = inner
        if inner:
            self.time = nn.Linear(time_dim, d_out)
            self.norm = nn.LayerNorm(d_out)

    def forward(self, h: Tensor, t_emb: Tensor) -> Tensor:
        h = self.linear(h)
        if self.inner:
            h = F.silu(self.norm(h * (1 + self.time(F.silu(t_emb)))))
        return h


class MLPSkipNet(nn.Module):
    """The latent DDIM's network eps_omega(z_t, t) (Preechakul et al. 2022, sec. 3.3 and app. B; the reference's
    MLPSkipNet): `layers` linear layers of width `hidden`, the input z_t concatenated again before every layer after the
    first (skip_layers 1..layers-1), LayerNorm and SiLU after each inner layer, the time as a scale h (1 + Linear(SiLU(
    t_emb))) of each inner layer, t_emb a 2-layer MLP of a 64-wide sinusoidal embedding to the code's width d. (B, d)
    codes, (B,) model times -> (B, d). The paper uses 10 layers of 2048 at d = 512; semantic.hidden and semantic.layers
    set width and depth. ValueError for dim < 1, hidden < 1, layers < 2, or codes of another shape."""

    condition_spec = ConditionSpec()  # unconditional
    num_classes = 0

    def __init__(self, dim: int, hidden: int = 512, layers: int = 10, time_embed: int = 64):
        super().__init__()
        if dim < 1 or hidden < 1 or layers < 2:
            raise ValueError(f"MLPSkipNet needs dim >= 1, hidden >= 1 and layers >= 2, got {dim}, {hidden}, {layers}")
        self.dim, self.time_embed = dim, time_embed
        self.time_mlp = nn.Sequential(nn.Linear(time_embed, dim), nn.SiLU(), nn.Linear(dim, dim))
        widths = [dim, *[hidden] * (layers - 1), dim]
        self.layers = nn.ModuleList(SkipLayer(widths[i] + (dim if i else 0), widths[i + 1], dim, inner=i < layers - 1)
                                    for i in range(layers))

    def forward(self, z: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"MLPSkipNet expects codes of shape (B, {self.dim}), got {tuple(z.shape)}")
        self.condition_spec.check(cond, z)
        t_emb = self.time_mlp(timestep_embedding(t.expand(z.shape[0]), self.time_embed))
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(h if i == 0 else torch.cat([h, z], dim=1), t_emb)  # the skip: z_t again
        return h
