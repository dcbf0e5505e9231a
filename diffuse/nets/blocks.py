"""The U-Net's building blocks (Ho et al. 2020, appendix B; Dhariwal & Nichol 2021), shared by the U-Net, the noisy
classifier and the autoencoder: the sinusoidal time embedding, GroupNorm, zero-initialised output layers, residual
blocks with the time embedding, self- and cross-attention, down- and upsampling, and dropout drawn for the global
batch under DDP; for video, temporal attention over the frames at each pixel with a relative-position bias from the
frame indices (Ho et al. 2022, "Video Diffusion Models", sec. 3; Harvey et al. 2022, FDM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer sinusoidal position embedding of the (possibly fractional) step index t (Vaswani et al. 2017, sec. 3.5).

    (B,) -> (B, dim): [sin(t w_i), cos(t w_i)] with w_i = max_period^(-i / (dim/2 - 1)), i = 0..dim/2-1,
    as in the DDPM code (frequencies from 1 down to exactly 1/max_period).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero-initialise the last layer of a residual branch so each block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ShardedDropout(nn.Dropout):
    """nn.Dropout whose mask is drawn for a whole global batch, of which the input is slice `rank` of `world`.

    Under DDP every process holds the same global RNG state (the trainer seeds them alike), so plain
    dropout would give every process the masks of the first examples of the batch: the processes'
    masks would be identical, and a step would differ from the same step in one process. Drawing
    the global batch's mask and keeping this process's rows gives every example the mask it gets
    in a single process (train.Trainer sets `shard`; one process: (0, 1), plain dropout).
    """

    shard: tuple[int, int] = (0, 1)  # (rank, world size)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        rank, world = self.shard
        n = x.shape[0]
        keep = torch.empty((n * world, *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep[rank * n:(rank + 1) * n] / (1 - self.p)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + time bias, GroupNorm -> SiLU -> dropout -> conv, + skip (1x1 if widths differ).

    emb_dim = 0: no time input (the diffusion autoencoder's semantic encoder). style_dim > 0: the block of the diffusion
    autoencoder's decoder (Preechakul et al. 2022, sec. 3.1, the reference's ResBlock with two conditions): emb is
    [time embedding (emb_dim), z_sem (style_dim)], and after the second GroupNorm
        h = (1 + t_scale) GN(h) + t_shift,   then   h = h (1 + z_scale),   (t_scale, t_shift) = Linear(SiLU(t_emb)),
        z_scale = Linear(SiLU(z_sem)),
    the time's adaptive GroupNorm (Dhariwal & Nichol 2021, sec. 3) times a per-channel scale of the semantic code."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int, style_dim: int = 0):
        super().__init__()
        self.emb_dim, self.style_dim = emb_dim, style_dim
        self.norm1 = norm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        if emb_dim:
            self.emb = nn.Linear(emb_dim, out_ch * (2 if style_dim else 1))
        if style_dim:
            self.style = nn.Linear(style_dim, out_ch)
        self.norm2 = norm(groups, out_ch)
        self.dropout = ShardedDropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:  # x (B, C_in, H, W), emb (B, emb_dim + style_dim) or None
        h = self.conv1(F.silu(self.norm1(x)))
        if self.style_dim:
            t_emb, z = emb.split([self.emb_dim, self.style_dim], dim=1)
            t_scale, t_shift = self.emb(F.silu(t_emb))[:, :, None, None].chunk(2, dim=1)
            h = self.norm2(h) * (1 + t_scale) + t_shift
            h = h * (1 + self.style(F.silu(z))[:, :, None, None])
        else:
            if self.emb_dim:
                h = h + self.emb(F.silu(emb))[:, :, None, None]
            h = self.norm2(h)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Self-attention over all H*W positions, residual (the DDPM "AttnBlock", with heads)."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"model.num_heads = {num_heads} must divide the width {channels}")
        self.heads = num_heads
        self.norm = norm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads), softmax(q k^T / sqrt(d)) v
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class CrossAttention(nn.Module):
    """Cross-attention from the image features to a context (Rombach et al. 2022, sec. 3.3), residual:
        Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V,  Q = W_Q phi(z_t),  K = W_K tau(y),  V = W_V tau(y)
    with phi(z_t) the (normalised) feature map at H*W positions and tau(y) (B, M, context_dim) the context tokens;
    a context_mask (B, M), True for real tokens, keeps padding out of the softmax. Zero-initialised output."""

    def __init__(self, channels: int, context_dim: int, num_heads: int, groups: int):
        super().__init__()
        self.heads = num_heads
        self.norm = norm(groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        d = C // self.heads
        q = self.q(self.norm(x)).reshape(B, self.heads, d, H * W).transpose(-1, -2)  # (B, heads, HW, d)
        k, v = self.kv(context.to(x.dtype)).reshape(B, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)  # (B, heads, M, d)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


def frame_distance_features(frame_index: Tensor) -> Tensor:
    """FDM's features of the distance between frames (Harvey et al. 2022, `rpe.py` `RPENet`): for query frame i and key
    frame j with d = index_j - index_i, [log(1 + max(d, 0)), log(1 + max(-d, 0)), 1[d == 0]].

    frame_index (B, F), integers or floats in any units (any spacing; only differences enter, so adding a constant to
    every index changes nothing) -> (B, F, F, 3) float32, query frames along dim 1, key frames along dim 2.
    """
    index = frame_index.float()
    d = index[:, None, :] - index[:, :, None]  # (B, F_query, F_key)
    return torch.stack([torch.log1p(d.clamp(min=0)), torch.log1p((-d).clamp(min=0)), (d == 0).float()], dim=-1)


@dataclass
class Frames:
    """How a batch of B videos of F frames sits in the U-Net: frames folded into the batch (row b * F + f is frame f of
    video b) for the 2D layers, with what temporal attention needs to unfold them: `features` (B, F, F, 3), the frame
    distances (frame_distance_features), and `allowed` (B, F, F) bool, which key frames each query frame may attend
    (None: all), e.g. only itself for an image (`independent_frames`)."""

    count: int  # F, frames per video
    features: Tensor  # (B, F, F, 3) float
    allowed: Tensor | None = None  # (B, F, F) bool, or None


def independent_frames(independent: Tensor) -> Tensor:
    """(B, F) bool, True for a frame that is an independent image (Ho et al. 2022, sec. 3: images appended to each
    video for joint training, masked so they do not mix) -> (B, F, F) bool attention mask: query frame i may attend
    key frame j when i == j or both are video frames. An all-True row is image mode: every frame alone."""
    video = ~independent
    return torch.eye(independent.shape[1], dtype=torch.bool, device=independent.device) | (video[:, :, None] & video[:, None, :])


class TemporalAttention(Attention):
    """Self-attention over the F frames at each of the H*W pixels, residual (Ho et al. 2022, sec. 3, the "temporal
    attention" block; B*H*W sequences of length F), with a relative-position bias from the frame indices:
        h = x + W_out softmax(Q K^T / sqrt(d) + b(index_j - index_i)) V,   per head,
    b = Linear(SiLU(Linear(features))) one scalar per head, on FDM's distance features (frame_distance_features;
    Harvey et al. 2022 feed them with the time embedding to per-head key embeddings; here a scalar bias per head, as
    the T5 bias of video-diffusion-pytorch, so it enters scaled_dot_product_attention as an additive mask and any
    spacing of frames works). W_out and the bias's last layer start at zero, so a fresh block is the identity and a
    fresh video net is the image net on each frame.

    Parameters for width C and h heads: GroupNorm 2C, qkv 3C^2 + 3C, out C^2 + C, bias MLP 4C + Ch + h;
    4C^2 + 10C + Ch + h in all.
    """

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__(channels, num_heads, groups)  # norm, qkv, out (zero) and the heads, as spatial attention's
        self.rpe = nn.Sequential(nn.Linear(3, channels), nn.SiLU(), zero_init(nn.Linear(channels, num_heads)))

    def forward(self, x: Tensor, frames: Frames) -> Tensor:  # x (B*F, C, H, W), frames folded into the batch
        BF, C, H, W = x.shape
        n, heads = frames.count, self.heads
        B = BF // n
        qkv = self.qkv(self.norm(x)).reshape(B, n, 3, heads, C // heads, H * W)
        # each (B, HW, heads, F, d): one sequence per pixel; contiguous, as the attention kernels read it (CPU: 1.15x)
        q, k, v = qkv.permute(2, 0, 5, 3, 1, 4).contiguous().unbind(0)
        bias = self.rpe(frames.features).permute(0, 3, 1, 2)  # (B, heads, F_query, F_key)
        if frames.allowed is not None:  # the diagonal is always allowed, so no row is all -inf
            bias = bias.masked_fill(~frames.allowed[:, None], float("-inf"))
        # the bias broadcasts over the H*W pixels (never copied per pixel)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None].to(q.dtype))  # (B, HW, heads, F, d)
        return x + self.out(h.permute(0, 3, 2, 4, 1).reshape(BF, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The residual blocks of one resolution, each optionally followed by self-attention, by cross-attention
    on the context (context_dim > 0) and (temporal) by temporal attention over the frames."""

    def __init__(self, blocks: list[ResBlock], attend: bool, num_heads: int, groups: int, context_dim: int = 0,
                 temporal: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(
            Attention(b.conv2.out_channels, num_heads, groups) if attend else nn.Identity() for b in blocks
        )
        if context_dim:
            self.cross = nn.ModuleList(CrossAttention(b.conv2.out_channels, context_dim, num_heads, groups) for b in blocks)
        if temporal:
            self.temporal = nn.ModuleList(TemporalAttention(b.conv2.out_channels, num_heads, groups) for b in blocks)

    def block(self, i: int, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None,
              frames: Frames | None = None) -> Tensor:
        """Residual block i, then its attention, cross-attention and temporal attention (where this level has them;
        frames: the video layout, given exactly when the level is temporal)."""
        h = self.attns[i](self.blocks[i](h, emb))
        if hasattr(self, "cross"):
            h = self.cross[i](h, context, mask)
        return self.temporal[i](h, frames) if hasattr(self, "temporal") else h
