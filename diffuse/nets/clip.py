"""CLIP trained here (Radford et al. 2021): an image tower f and a text tower g whose L2-normalised embeddings
f(x) . g(c) score how well a caption fits an image, trained contrastively (kinds/clip.py: the symmetric InfoNCE).

    image tower  the U-Net's contracting path (nets/classifier.py UNetEncoder: residual blocks, attention, the middle
                 block, GroupNorm, SiLU, a spatial mean) and a linear layer to the embedding width D. The noise-aware
                 variant (GLIDE, Nichol et al. 2021, sec. 3.2) also takes x_t's continuous model time through the
                 U-Net's sinusoidal time embedding, the same input as the diffusion network's, so any sampler's t works
                 (GLIDE's noised CLIP instead looks up a learned token per integer timestep in a 1000-row table, which
                 a respaced sampler must map back to).
    text tower   a caption's tokens (nets/text.py), the mean of its token states over the real tokens (the mean pooling of
                 all-MiniLM-L6-v2 as sentence-transformers ships it), a linear layer to D. The "chars" encoder trains
                 with the image tower; "minilm" stays frozen and only the projection trains (LiT, Zhai et al. 2022).
    temperature  s = exp(logit_scale), logit_scale learned, initialised to log(1 / 0.07) (s ~ 14.3) and clamped to
                 [0, ln 100] after every optimizer step (open_clip's training loop, "as in the original paper").

The interface CLIP guidance reads (guidance.py): `image_embedding(x, model_time)` and `text_embedding(tokens)`, both
(B, D) unit vectors (eps 1e-12 in the norm, as glide-text2im).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .classifier import UNetEncoder
from .text import text_encoder
from .unet import UNetConfig

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # Radford et al. 2021, sec. 2.5: the temperature tau starts at 0.07
LOGIT_SCALE_MAX = math.log(100.0)      # open_clip clamps logit_scale to [0, ln 100] after each step
NORM_EPS = 1e-12


def unit(v: Tensor) -> Tensor:
    """v / (||v|| + 1e-12) along the last dimension (B, D) -> (B, D)."""
    return v / (v.norm(dim=-1, keepdim=True) + NORM_EPS)


class CLIP(nn.Module):
    """An image tower and a text tower with a shared embedding width `dim` and a learned temperature. ValueError for a
    dim < 1 and for the towers' own bad settings (nets/unet.check_config, nets/text.text_encoder)."""

    def __init__(self,
                 image_cfg: UNetConfig,    # the image tower's U-Net settings (model.channels, channel_mult, ...)
                 in_channels: int,         # image channels (3 for the shapes, 1 for digits)
                 image_size: int,          # image side
                 dim: int = 64,            # D, the embedding width (CLIP ViT-B/32: 512)
                 text: str = "chars",      # "chars" (trained) or "minilm" (frozen, LiT)
                 max_tokens: int = 64,     # tokens per caption (special tokens included)
                 text_width: int = 64,     # the chars encoder's width (minilm's is its own 384)
                 noise_aware: bool = False):  # the image tower takes x_t's model time (GLIDE's noised CLIP)
        super().__init__()
        if dim < 1:
            raise ValueError(f"the CLIP embedding width must be >= 1, got clip.dim = {dim}")
        self.dim, self.noise_aware = dim, noise_aware
        self.clean_time: float | None = None  # the model time of a clean image (kinds.clip.clean_model_time; set by build_clip)
        self.image_size, self.embed_dim = image_size, dim  # what guidance.clip_embedding checks x and g against
        self.image_tower = UNetEncoder(image_cfg, in_channels, image_size, dim, time=noise_aware)
        self.text_encoder = text_encoder(text, max_tokens, **({"dim": text_width} if text == "chars" else {}))
        self.text_proj = nn.Linear(self.text_encoder.dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def tokenize(self, captions: list[str]) -> Tensor:
        """(B, max_tokens) int64 ids of the captions for `text_embedding` (ValueError for a caption too long)."""
        return self.text_encoder.tokenize(captions)

    def image_embedding(self, x: Tensor, model_time: Tensor | None = None) -> Tensor:
        """f(x_t, t): images (B, C, H, W) in [-1, 1] (x_t of the run's process for the noise-aware tower) and their model
        times (B,) or a 0-d time (the schedule's model_time(t), as the U-Net takes) -> (B, D) unit vectors. A plain
        CLIP ignores model_time (it reads clean images: guide it on the predicted x_0); the noise-aware one raises
        ValueError without it."""
        if not self.noise_aware:
            return unit(self.image_tower(x))
        if model_time is None and self.clean_time is not None:  # a clean image, read where training read them
            model_time = torch.tensor(self.clean_time)
        if model_time is None:
            raise ValueError("this CLIP is noise-aware (clip.noise_aware = true): pass the model time of x_t, "
                             "schedule.model_time(t), as the diffusion network takes it (0-d or (B,))")
        return unit(self.image_tower(x, torch.as_tensor(model_time, device=x.device).float()))

    def text_embedding(self, tokens: Tensor) -> Tensor:
        """g(c): (B, L) int64 token ids (`tokenize`) -> (B, D) unit vectors: the mean of the encoder's states over the
        real tokens, projected."""
        states, mask = self.text_encoder(tokens)  # (B, L, d), (B, L)
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, d)
        return unit(self.text_proj(pooled))

    def forward(self, x: Tensor, tokens: Tensor, model_time: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(image embeddings (B, D), text embeddings (B, D), the temperature s = exp(logit_scale), 0-d): one call, so
        DDP sees every parameter used."""
        return self.image_embedding(x, model_time), self.text_embedding(tokens), self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """logit_scale into [0, ln 100], in place (after every optimizer step, as open_clip)."""
        self.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
