"""The noisy classifier p_phi(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021, sec. 4).

As in the paper it is the downsampling half of the U-Net (residual blocks with the time
embedding, self-attention at the chosen resolutions, the middle block), followed by GroupNorm,
SiLU, a spatial average and a linear layer to the class logits (the paper pools with attention
at 8x8; the average is the simpler choice for small images). It is trained on x_t ~ q(x_t | x_0)
at uniformly drawn t with cross-entropy (train.Trainer with model.kind = "classifier").
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import Attention, Downsample, Level, ResBlock, norm, timestep_embedding
from .unet import UNetConfig, check_config


class UNetEncoder(nn.Module):
    """The U-Net's contracting path and middle block, then GroupNorm, SiLU, a spatial mean and a linear layer:
    (B, C, H, W) [, (B,) model times] -> (B, out_dim). With `time` every residual block takes the time embedding (the
    noisy classifier); without it none does (the diffusion autoencoder's semantic encoder, which reads clean images:
    Preechakul et al. 2022's BeatGANsEncoderModel with use_time_condition false, its head GroupNorm, SiLU, pooling,
    1x1 convolution). ValueError for an input of the wrong shape."""

    def __init__(self, cfg: UNetConfig, in_channels: int, image_size: int, out_dim: int, time: bool = True):
        super().__init__()
        check_config(cfg, image_size, 0)
        ch, groups, heads, p = cfg.channels, cfg.norm_groups, cfg.num_heads, cfg.patch_size
        emb_dim = 4 * ch if time else 0
        self.cfg, self.in_channels, self.out_dim = cfg, in_channels, out_dim
        if time:
            self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels * p * p, ch, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        res, w_in = image_size // p, ch
        for i, m in enumerate(cfg.channel_mult):
            w = ch * m
            blocks = [ResBlock(w_in if j == 0 else w, w, emb_dim, cfg.dropout, groups) for j in range(cfg.num_res_blocks)]
            w_in = w
            self.down.append(Level(blocks, res in cfg.attention_resolutions, heads, groups))
            last = i == len(cfg.channel_mult) - 1
            self.downsample.append(nn.Identity() if last else Downsample(w))
            res = res if last else res // 2
        self.mid1 = ResBlock(w_in, w_in, emb_dim, cfg.dropout, groups)
        self.mid_attn = Attention(w_in, heads, groups)
        self.mid2 = ResBlock(w_in, w_in, emb_dim, cfg.dropout, groups)
        self.norm_out = norm(groups, w_in)
        self.head = nn.Linear(w_in, out_dim)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        timed = hasattr(self, "time_mlp")
        if timed != (t is not None):
            raise ValueError(f"{type(self).__name__} " + ("takes the time t (B,)" if timed else "takes no time input"))
        emb = self.time_mlp(timestep_embedding(t.expand(x.shape[0]), self.cfg.channels)) if timed else None
        h = self.conv_in(F.pixel_unshuffle(x, self.cfg.patch_size))
        for level, down in zip(self.down, self.downsample):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
            h = down(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(-2, -1)))


class NoisyClassifier(UNetEncoder):
    """logits_phi(x_t, t): (B, C, H, W), (B,) step indices -> (B, num_classes). ValueError for fewer than 2 classes."""

    def __init__(self, cfg: UNetConfig, in_channels: int, image_size: int, num_classes: int):
        if num_classes < 2:
            raise ValueError(f"a classifier needs a labelled dataset with at least 2 classes, got {num_classes}")
        super().__init__(cfg, in_channels, image_size, num_classes, time=True)
        self.num_classes = num_classes
