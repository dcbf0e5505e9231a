"""The DDPM U-Net (Ho et al. 2020, appendix B; lecture 003 "U-Net", lecture 000 "Network Architecture").

A PixelCNN++-style U-Net: a contracting path of residual blocks and downsamplings, a middle
of residual + self-attention + residual, and an expanding path that concatenates the skip
connection of the matching resolution before each block. Every residual block receives the
time embedding (sinusoidal, then a 2-layer MLP) as a per-channel bias; self-attention runs at
the chosen resolutions. With width 128, multipliers (1, 2, 2, 2), two blocks per level and
attention at 16x16 this is the 35.7M-parameter CIFAR-10 model of the paper.

`patch_size` p > 1 folds each p x p patch into channels before the first convolution and
unfolds the output after the last (pixel unshuffle / shuffle; the patching of Hoogeboom et al.
2023, "simple diffusion", to spend compute at lower resolution). It is lossless; on a 2-core CPU
a patch-2 net of width 32 trains 1.5x faster per image than the width-16 demo net, though on
the 28x28 digits it bought no quality per second (bench/RESULTS.md): it pays at larger images.

`video` makes it the factorised space-time U-Net of Ho et al. 2022 ("Video Diffusion Models", sec. 3; lecture 002
"Video Generation", option 2): x is (B, C, F, H, W); every 2D convolution, GroupNorm and spatial attention runs on each
frame alone (frames folded into the batch, so each is a space-only 1x3x3 convolution), and a temporal attention block
(nets.blocks.TemporalAttention) mixes the frames at each pixel. Where: after every residual block of every level and in
the middle (after its spatial attention), as video-diffusion-pytorch's Unet3D, not only after each spatial attention
(Ho et al., FDM): attention over F frames costs O(H W F^2 C) against the convolutions' O(H W F 9 C^2), so unlike spatial
attention there is no quadratic cost in the resolution to avoid, and our configs put spatial attention only at the
lowest resolution (7 or 8 px), where frames would meet only at a quarter of the resolution of the motion. The price,
measured on one CPU thread (AMD EPYC, 2026-12-07): a width-32 net (channel_mult [1, 2, 2], 4 heads) on 2 videos of 8
frames of 32x32 has 13% more parameters and its forward takes 0.49 s against 0.30 s for the image net on the 16 frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..condition import ConditionSpec
from .blocks import (Attention, CrossAttention, Downsample, Frames, Level, ResBlock, TemporalAttention, Upsample,
                     frame_distance_features, independent_frames, norm, timestep_embedding, zero_init)
from .text import text_encoder


@dataclass
class UNetConfig:
    channels: int = 128                                             # base width C (DDPM CIFAR-10: 128)
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])  # width C*m at each resolution; one downsampling between levels
    num_res_blocks: int = 2                                         # residual blocks per level (DDPM: 2)
    attention_resolutions: list[int] = field(default_factory=lambda: [16])  # feature-map sizes with self-attention (DDPM: 16x16)
    num_heads: int = 1                                              # attention heads (DDPM: 1)
    dropout: float = 0.1                                            # in every residual block (DDPM CIFAR-10: 0.1)
    norm_groups: int = 32                                           # GroupNorm groups (DDPM: 32); must divide every width
    kind: Literal["denoiser", "classifier", "autoencoder", "digit_classifier", "segmenter", "diffae", "diffae_prior",
                  "diffae_classifier", "clip", "unclip_prior"] = "denoiser"               # the U-Net, its encoder as a noisy classifier
    #                                                                 (nets.classifier), a run of the [autoencoder] (kinds.autoencoder),
    #                                                                 a pixel classifier on features ([segment]), a diffusion
    #                                                                 autoencoder, or its latent DDIM or linear classifier ([semantic]),
    #                                                                 or a CLIP (nets.clip, [clip])
    #                                                                 or the unCLIP prior over a CLIP's embeddings (nets.unclip, [unclip])
    patch_size: int = 1                                             # run the U-Net on p x p patches stacked as channels (space-to-depth)
    class_conditional: bool = False                                 # add a class-label embedding (and a null label) to the time embedding
    cond_channels: int = 0                                          # channels of a condition image concatenated to x_t (SR3, Palette); 0: none
    scalar_inputs: int = 0                                          # scalars per example embedded like the time (cascade noise level); 0: none
    context_dim: int = 0                                            # width d of a cross-attention context (B, M, d), e.g. text tokens; 0: none
    cross_attention_resolutions: list[int] = field(default_factory=list)  # feature-map sizes with cross-attention on the context
    text_encoder: Literal["", "minilm", "chars"] = ""               # the context from a caption (text.py): frozen MiniLM-L6 (context_dim
    #                                                                 384, the [text] extra) or a small trainable byte-level encoder
    #                                                                 of width context_dim trained with the U-Net; "" = none
    max_tokens: int = 16                                            # tokens per caption the text encoder takes (special tokens included)
    prediction: Literal["eps", "x0", "v", "flow", "edm"] = "eps"    # what the network outputs (DDPM: eps; Salimans & Ho 2022: v;
    #                                                                 flow: eps - x_0, rectified flow; edm: F of EDM's preconditioning)
    sigma_data: float = 0.5                                         # prediction "edm": the data's std (Karras et al. 2022: 0.5)
    learned_variance: bool = False                                  # also output v of Sigma (Nichol & Dhariwal 2021): twice the channels
    self_condition: bool = False                                    # also take the previous x_0 estimate (Chen et al. 2023)
    semantic_dim: int = 0                                           # model.kind = "diffae": width d of the semantic code z_sem that
    #                                                                 scales every residual block (Preechakul et al. 2022: 512 at
    #                                                                 64-256 px faces; 64 for the 28 px digits); 0: none
    checkpointing: bool = False                                     # recompute each block's activations in the backward pass
    #                                                                 instead of keeping them: less memory, ~1/3 more compute
    video: bool = False                                             # x is (B, C, F, H, W): 2D layers per frame plus temporal
    #                                                                 attention over frames (Ho et al. 2022); conditions
    #                                                                 frame_index and independent (condition.py)
    video_observed: bool = False                                    # video: also take `observed` (B, F), which frames are given
    #                                                                 clean, as one more input channel (FDM's mask channel)
    image_embed_dim: int = 0                                        # unCLIP's decoder: width D of the CLIP image embedding z_i it
    #                                                                 takes as `image_embed` (the [unclip] CLIP's clip.dim); 0: none
    image_embed_tokens: int = 4                                     # extra cross-attention tokens projected from z_i (Ramesh et
    #                                                                 al. 2022, sec. 2.1: 4), after any caption's tokens; 0: the
    #                                                                 time-embedding path only


class UNet(nn.Module):
    """eps_theta(x_t, t, **cond): (B, C, H, W), (B,) model times, a condition dict -> (B, out_channels, H, W).

    The condition (condition.py) holds what `condition_spec` lists: `label` (B,) embedded and added to the time
    embedding (with a null label for classifier-free guidance), `image` (B, cond_channels, H, W) concatenated to
    x_t (Saharia et al. 2021, SR3), `scalars` (B, k) embedded like the time and added, `context` (B, M, d) [and
    `context_mask` (B, M)] attended by cross-attention at cross_attention_resolutions (Rombach et al. 2022, sec.
    3.3) or, with a text_encoder, `text` (B, max_tokens) token ids that it turns into that context, and with
    self_condition an optional `self_cond` (B, C, H, W), the previous x_0 estimate, concatenated to x_t (zeros when
    absent; Chen et al. 2023); with augment_dim an optional `augment` (B, augment_dim), the
    augmentation labels of non-leaking augmentation (augment.py), mapped into the embedding (zeros when absent); with
    semantic_dim d, `z_sem` (B, d), the diffusion autoencoder's semantic code, which scales every residual block after its
    adaptive GroupNorm (Preechakul et al. 2022; nets.blocks.ResBlock); with image_embed_dim D, `image_embed` (B, D), a
    CLIP image embedding, added to the time embedding and turned into image_embed_tokens extra context tokens (unCLIP's
    decoder, Ramesh et al. 2022, sec. 2.1; `_image_embed`). A key the model does not take, or a missing one, is a ValueError
    naming it.

    With model.video: x (B, C, F, H, W) -> (B, out_channels, F, H, W), t (B,) one time per video, the per-example keys
    above shared by its frames, and `frame_index` (B, F) (default arange(F)), the frames' positions in time, whose
    differences bias temporal attention; `independent` (B, F) bool, frames that attend only themselves (all True:
    image mode, each frame exactly what the net gives it alone); with model.video_observed, `observed` (B, F) bool,
    the frames given clean in x, fed as an extra input channel (Harvey et al. 2022, FDM). The temporal additions have
    4C^2 + 10C + Ch + h parameters per block of width C with h heads (nets.blocks.TemporalAttention), one block per
    residual block of every level and one in the middle.
    """

    def __init__(self, cfg: UNetConfig, in_channels: int, image_size: int, num_classes: int = 0, out_channels: int | None = None,
                 augment_dim: int = 0):
        super().__init__()
        check_config(cfg, image_size, num_classes)
        ch, groups, heads, p = cfg.channels, cfg.norm_groups, cfg.num_heads, cfg.patch_size
        emb_dim = 4 * ch
        self.cfg = cfg
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = num_classes if cfg.class_conditional else 0
        self.text_encoder = None
        if cfg.text_encoder:  # tau_theta: captions -> the cross-attention context (Rombach et al. 2022, sec. 3.3)
            width = {"dim": cfg.context_dim} if cfg.text_encoder == "chars" else {}  # MiniLM's width is its own
            self.text_encoder = text_encoder(cfg.text_encoder, cfg.max_tokens, **width)
            if self.text_encoder.dim != cfg.context_dim:
                raise ValueError(f"model.text_encoder = '{cfg.text_encoder}' gives token states of width {self.text_encoder.dim}: "
                                 f"set model.context_dim = {self.text_encoder.dim}")
            null_text = tuple(int(i) for i in self.text_encoder.tokenize([""])[0] if i)
        text = (cfg.max_tokens, null_text) if cfg.text_encoder else (0, ())
        self.condition_spec = ConditionSpec(self.num_classes, cfg.cond_channels, cfg.scalar_inputs,
                                            0 if cfg.text_encoder or cfg.image_embed_dim else cfg.context_dim,
                                            cfg.self_condition, augment_dim, *text, semantic=cfg.semantic_dim,
                                            video=cfg.video, observed=cfg.video_observed, image_embed=cfg.image_embed_dim)
        style = cfg.semantic_dim  # every residual block is also scaled by z_sem (nets.blocks.ResBlock)
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # row num_classes is the null label: "no class", the unconditional model of classifier-free guidance
        self.label_emb = nn.Embedding(self.num_classes + 1, emb_dim) if self.num_classes else None
        self.conv_in = nn.Conv2d((in_channels * (2 if cfg.self_condition else 1) + cfg.cond_channels + cfg.video_observed)
                                 * p * p, ch, 3, padding=1)
        if augment_dim:  # the augmentation labels, mapped linearly into the embedding (EDM's map_augment, no bias: 0 -> 0)
            self.augment_map = nn.Linear(augment_dim, emb_dim, bias=False)
        if cfg.scalar_inputs:  # each scalar gets a sinusoidal embedding like the time's; one MLP maps them all
            self.scalar_mlp = nn.Sequential(nn.Linear(cfg.scalar_inputs * ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.image_embed_dim:  # unCLIP's decoder (Ramesh et al. 2022, sec. 2.1): z_i into the time embedding and into tokens
            self.image_embed_time = nn.Linear(cfg.image_embed_dim, emb_dim)
            if cfg.image_embed_tokens:
                self.image_embed_context = nn.Linear(cfg.image_embed_dim, cfg.image_embed_tokens * cfg.context_dim)
        xres, ctx = cfg.cross_attention_resolutions, cfg.context_dim

        widths = [ch * m for m in cfg.channel_mult]
        skips = [ch]  # widths of the activations the expanding path will concatenate
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        res, w_in = image_size // p, ch
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(w_in, w, emb_dim, cfg.dropout, groups, style))
                w_in = w
                skips.append(w)
            self.down.append(Level(blocks, res in cfg.attention_resolutions, heads, groups, ctx if res in xres else 0,
                                   cfg.video))
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else Downsample(w))
            if not last:
                skips.append(w)
                res //= 2

        self.mid1 = ResBlock(w_in, w_in, emb_dim, cfg.dropout, groups, style)
        self.mid_attn = Attention(w_in, heads, groups)
        if cfg.video:
            self.mid_temporal = TemporalAttention(w_in, heads, groups)
        self.mid2 = ResBlock(w_in, w_in, emb_dim, cfg.dropout, groups, style)
        if res in xres:
            self.mid_cross = CrossAttention(w_in, ctx, heads, groups)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(w_in + skips.pop(), w, emb_dim, cfg.dropout, groups, style))
                w_in = w
            self.up.append(Level(blocks, res in cfg.attention_resolutions, heads, groups, ctx if res in xres else 0,
                                 cfg.video))
            self.upsample.append(Upsample(w) if i > 0 else nn.Identity())
            if i > 0:
                res *= 2
        self.norm_out = norm(groups, w_in)
        self.conv_out = zero_init(nn.Conv2d(w_in, (in_channels if out_channels is None else out_channels) * p * p, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        return self._run(x, t, cond)

    def decoder_layout(self) -> list[tuple[int, int]]:
        """(width, side) of each decoder block's activation, by block index (module-level `decoder_layout`)."""
        return decoder_layout(self.cfg, self.image_size)

    def decoder_features(self, x: Tensor, t: Tensor, blocks: list[int], **cond: Tensor) -> dict[int, Tensor]:
        """The activations of the decoder blocks `blocks` (indices of `decoder_layout`) at (x, t, cond): block index ->
        (B, width, side, side). The forward stops after the last block asked for. ValueError naming the blocks this
        network has when an index is not one of them."""
        n = len(self.decoder_layout())
        bad = [b for b in blocks if not (isinstance(b, int) and 0 <= b < n)]
        if bad or not blocks:
            raise ValueError(f"decoder blocks {bad or '[]'} are not blocks of this U-Net: it has {n} decoder blocks, "
                             f"0..{n - 1} (UNet.decoder_layout: (width, side) of each)")
        return self._run(x, t, cond, set(blocks))

    def _run(self, x: Tensor, t: Tensor, cond: dict, keep: set[int] | None = None):
        """The forward pass; with `keep`, the activations of those decoder blocks instead of the output (video:
        (B, width, F, side, side))."""
        self._check_input(x)
        self.condition_spec.check(cond, x)
        emb = self.time_mlp(timestep_embedding(t.expand(x.shape[0]), self.cfg.channels))  # (B, 4C)
        if self.label_emb is not None:
            emb = emb + self.label_emb(cond["label"])
        if cond.get("augment") is not None:  # absent at sampling: zeros, "not augmented"
            emb = emb + self.augment_map(cond["augment"].to(emb.dtype))
        if self.cfg.scalar_inputs:  # scalars in [0, 1] see the frequencies model times in [0, 1000) see
            s = cond["scalars"].float() * 1000
            emb = emb + self.scalar_mlp(torch.cat([timestep_embedding(s[:, i], self.cfg.channels)
                                                   for i in range(s.shape[1])], dim=1))
        if self.cfg.semantic_dim:  # each block splits [time embedding, z_sem] (nets.blocks.ResBlock)
            emb = torch.cat([emb, cond["z_sem"].to(emb.dtype)], dim=1)
        if self.cfg.self_condition:  # the previous x_0 estimate, zeros when there is none (Chen et al. 2023, sec. 3)
            prev = cond.get("self_cond")
            x = torch.cat([x, torch.zeros_like(x) if prev is None else prev.to(x.dtype)], dim=1)
        if self.cfg.cond_channels:
            x = torch.cat([x, cond["image"].to(x.dtype)], dim=1)
        context, mask = self.text_encoder(cond["text"]) if self.text_encoder is not None else (cond.get("context"),
                                                                                                 cond.get("context_mask"))
        if self.cfg.image_embed_dim:
            emb, context, mask = self._image_embed(cond["image_embed"], emb, context, mask)
        frames = None
        if self.cfg.video:  # fold the frames into the batch; each per-video input is shared by its frames
            if self.cfg.video_observed:  # FDM's mask channel: 1 on the frames given clean
                observed = cond["observed"].to(x.dtype)[:, None, :, None, None]
                x = torch.cat([x, observed.expand(-1, 1, -1, *x.shape[3:])], dim=1)
            frames = self._frames(x, cond)
            x = fold_frames(x)
            emb = emb.repeat_interleave(frames.count, dim=0)
            context, mask = (None if c is None else c.repeat_interleave(frames.count, dim=0) for c in (context, mask))
        h = self._layers(F.pixel_unshuffle(x, self.cfg.patch_size), emb, context, mask, frames, keep)
        if frames is None:
            return h
        return {i: unfold_frames(a, frames.count) for i, a in h.items()} if keep else unfold_frames(h, frames.count)

    def _image_embed(self, z: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None):
        """unCLIP's two paths for the CLIP image embedding z (B, D) (Ramesh et al. 2022, sec. 2.1; diffusers'
        UnCLIPTextProjModel): emb + W_t (sqrt(D) z), and K = image_embed_tokens tokens W_c (sqrt(D) z) (B, K, context_dim)
        after the caption's tokens (attended: the mask grows by K True). sqrt(D) z has coordinates of about unit size
        (a unit z has ~1/sqrt(D) per coordinate; DALLE2-pytorch#60). The null z = 0 reaches both paths, so guidance on z
        drops both (DALLE2-pytorch#144)."""
        z = z.to(emb.dtype) * self.cfg.image_embed_dim ** 0.5
        emb = emb + self.image_embed_time(z)
        if not self.cfg.image_embed_tokens:
            return emb, context, mask
        tokens = self.image_embed_context(z).view(z.shape[0], self.cfg.image_embed_tokens, self.cfg.context_dim)
        if context is None:
            return emb, tokens, None
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(tokens.shape[:2])], dim=1)
        return emb, torch.cat([context.to(tokens.dtype), tokens], dim=1), mask

    def _check_input(self, x: Tensor) -> None:
        """ValueError naming the shape this net takes (and the setting that changes it) when x is not it."""
        if self.cfg.video and (x.ndim != 5 or x.shape[1] != self.in_channels):
            raise ValueError(f"this U-Net is a video net (model.video = true): it expects x of shape (B, {self.in_channels}, "
                             f"F, H, W), got {tuple(x.shape)}; pass frames as a 5-D tensor (one image: F = 1), or build "
                             "the net with model.video = false for images")
        if not self.cfg.video and (x.ndim != 4 or x.shape[1] != self.in_channels):
            raise ValueError(f"UNet expects input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
                             + ("; videos (B, C, F, H, W) need model.video = true" if x.ndim == 5 else ""))
        factor = self.cfg.patch_size * 2 ** (len(self.cfg.channel_mult) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"image sides {tuple(x.shape[-2:])} must be divisible by {factor} (patch_size "
                             f"{self.cfg.patch_size} times one halving per level of channel_mult {self.cfg.channel_mult})")

    @staticmethod
    def _frames(x: Tensor, cond: dict) -> Frames:
        """The video layout of x (B, C, F, H, W) for temporal attention: frame distances from cond["frame_index"]
        (default arange(F), evenly spaced) and the attention mask of cond["independent"] (default: none)."""
        B, n = x.shape[0], x.shape[2]
        index = cond.get("frame_index")
        if index is None:
            index = torch.arange(n, device=x.device).expand(B, n)
        independent = cond.get("independent")
        return Frames(n, frame_distance_features(index.to(x.device)),
                      None if independent is None else independent_frames(independent.to(x.device)))

    def _layers(self, x: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None, frames: Frames | None,
                keep: set[int] | None):
        """The network from conv_in to conv_out on x (N, C_in p^2, H/p, W/p), N = B or B * F (frames folded)."""
        h = self.conv_in(x)
        hs = [h]
        for level, down in zip(self.down, self.downsample):
            for i in range(len(level.blocks)):
                h = self._checkpointed(level.block, i, h, emb, context, mask, frames)
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)
        h = self._checkpointed(self._middle, h, emb, context, mask, frames)
        kept, index = {}, 0
        for level, up in zip(self.up, self.upsample):
            for i in range(len(level.blocks)):
                h = self._checkpointed(self._up_block, level, i, h, hs.pop(), emb, context, mask, frames)
                if i == len(level.blocks) - 1:
                    h = up(h)
                if keep is not None and index in keep:
                    kept[index] = h
                    if len(kept) == len(keep):
                        return kept
                index += 1
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.cfg.patch_size)

    @staticmethod
    def _up_block(level: Level, i: int, h: Tensor, skip: Tensor, emb: Tensor, context: Tensor | None,
                  mask: Tensor | None, frames: Frames | None) -> Tensor:
        """Block i of an expanding level on [h, skip] (the concatenation inside, so checkpointing does not keep it)."""
        return level.block(i, torch.cat([h, skip], dim=1), emb, context, mask, frames)

    def _middle(self, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None,
                frames: Frames | None) -> Tensor:
        h = self.mid_attn(self.mid1(h, emb))
        if frames is not None:  # temporal attention after the spatial attention (Ho et al. 2022, sec. 3)
            h = self.mid_temporal(h, frames)
        h = self.mid2(h, emb)
        return self.mid_cross(h, context, mask) if hasattr(self, "mid_cross") else h

    def _checkpointed(self, fn, *args):
        """fn(*args), with model.checkpointing while training: activation checkpointing (Chen et al. 2016, "Training
        deep nets with sublinear memory cost"), one block at a time, so the backward pass recomputes each block's
        activations instead of keeping them. The RNG state is replayed, so dropout draws the same masks and the
        gradients equal the plain path's."""
        if self.cfg.checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


def fold_frames(x: Tensor) -> Tensor:
    """(B, C, F, H, W) -> (B * F, C, H, W), row b * F + f is frame f of video b: the 2D layers see each frame alone."""
    B, C, n, H, W = x.shape
    return x.transpose(1, 2).reshape(B * n, C, H, W)


def unfold_frames(x: Tensor, frames: int) -> Tensor:
    """(B * F, C, H, W) -> (B, C, F, H, W), the inverse of fold_frames."""
    BF, C, H, W = x.shape
    return x.reshape(BF // frames, frames, C, H, W).transpose(1, 2).contiguous()


def decoder_layout(cfg: UNetConfig, image_size: int) -> list[tuple[int, int]]:
    """(width, side) of each decoder block's activation of the U-Net of `cfg` on images of side `image_size`, by block
    index, read off the config (no network built): the expanding path's residual blocks in the order they run (lowest
    resolution first, model.num_res_blocks + 1 per level), each with its attention, and the last block of a level after
    its upsampling, as guided-diffusion's `output_blocks[i]` (the blocks whose outputs Baranchuk et al. 2022 read)."""
    levels = len(cfg.channel_mult)
    out, side = [], image_size // cfg.patch_size // 2 ** (levels - 1)
    for i in reversed(range(levels)):
        for j in range(cfg.num_res_blocks + 1):
            upsampled = i > 0 and j == cfg.num_res_blocks
            out.append((cfg.channels * cfg.channel_mult[i], side * 2 if upsampled else side))
        side *= 2 if i > 0 else 1
    return out


def check_config(cfg: UNetConfig, image_size: int, num_classes: int) -> None:
    """ValueError naming the [model] setting and the fix when the U-Net of `cfg` cannot be built for images of side
    `image_size` with `num_classes` classes (widths, groups, levels, attention resolutions, cross-attention, text)."""
    if cfg.channels < 1 or not cfg.channel_mult or min(cfg.channel_mult) < 1:
        raise ValueError(f"model.channels and model.channel_mult must be positive, got {cfg.channels}, {cfg.channel_mult}")
    if cfg.num_res_blocks < 1:
        raise ValueError(f"model.num_res_blocks must be >= 1, got {cfg.num_res_blocks}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
    for m in cfg.channel_mult:
        if (cfg.channels * m) % cfg.norm_groups:
            raise ValueError(f"model.norm_groups = {cfg.norm_groups} must divide every width channels * mult = "
                             f"{[cfg.channels * k for k in cfg.channel_mult]}; pick e.g. norm_groups = 8")
    if cfg.channels % cfg.norm_groups:
        raise ValueError(f"model.norm_groups = {cfg.norm_groups} must divide model.channels = {cfg.channels}")
    if cfg.patch_size < 1:
        raise ValueError(f"model.patch_size must be >= 1, got {cfg.patch_size}")
    factor = cfg.patch_size * 2 ** (len(cfg.channel_mult) - 1)
    if image_size % factor:
        raise ValueError(f"image size {image_size} must be divisible by patch_size * 2^{len(cfg.channel_mult) - 1} = {factor} "
                         f"for patch_size {cfg.patch_size} and channel_mult {cfg.channel_mult}; change data.image_size, "
                         f"the patch size or drop a level")
    sizes = [image_size // cfg.patch_size // 2**i for i in range(len(cfg.channel_mult))]
    bad = [r for r in cfg.attention_resolutions if r not in sizes]
    if bad:
        raise ValueError(f"model.attention_resolutions {bad} are not feature-map sizes of this U-Net; choose from {sizes}")
    if cfg.cond_channels < 0 or cfg.scalar_inputs < 0 or cfg.context_dim < 0:
        raise ValueError("model.cond_channels, model.scalar_inputs and model.context_dim must be >= 0 (0: not used)")
    bad = [r for r in cfg.cross_attention_resolutions if r not in sizes]
    if bad:
        raise ValueError(f"model.cross_attention_resolutions {bad} are not feature-map sizes of this U-Net; choose from {sizes}")
    if cfg.text_encoder and not cfg.context_dim:
        raise ValueError(f"model.text_encoder = '{cfg.text_encoder}' needs cross-attention: set model.context_dim (384 for "
                         "minilm, the encoder's width such as 64 for chars) and model.cross_attention_resolutions")
    if cfg.text_encoder and cfg.max_tokens < 2:
        raise ValueError(f"model.max_tokens must be >= 2 (special tokens included), got {cfg.max_tokens}")
    if bool(cfg.context_dim) != bool(cfg.cross_attention_resolutions):
        raise ValueError("cross-attention needs both model.context_dim (the context's width) and "
                         f"model.cross_attention_resolutions (where to attend; from {sizes}); set both or neither")
    if cfg.semantic_dim < 0:
        raise ValueError(f"model.semantic_dim must be >= 0 (0: no semantic code), got {cfg.semantic_dim}")
    if cfg.image_embed_dim < 0 or cfg.image_embed_tokens < 0:
        raise ValueError(f"model.image_embed_dim and model.image_embed_tokens must be >= 0, got {cfg.image_embed_dim} and "
                         f"{cfg.image_embed_tokens}")
    if cfg.image_embed_dim and cfg.image_embed_tokens and not cfg.context_dim:
        raise ValueError(f"model.image_embed_tokens = {cfg.image_embed_tokens} projects the CLIP image embedding into "
                         "cross-attention tokens: set model.context_dim (their width, e.g. 64) and "
                         "model.cross_attention_resolutions (e.g. [16, 8]), or model.image_embed_tokens = 0 (the "
                         "time-embedding path only)")
    if cfg.image_embed_dim and cfg.context_dim and not cfg.image_embed_tokens and not cfg.text_encoder:
        raise ValueError("with model.image_embed_dim the cross-attention context is the caption's tokens and the image "
                         "embedding's: set model.image_embed_tokens >= 1 (the paper: 4) or a model.text_encoder, or drop "
                         "model.context_dim and model.cross_attention_resolutions")
    if cfg.video_observed and not cfg.video:
        raise ValueError("model.video_observed adds the observed-frames channel of a video net: set model.video = true "
                         "too, or drop model.video_observed")
    if cfg.class_conditional and num_classes < 1:
        raise ValueError("model.class_conditional needs a labelled dataset (class sub-folders, mnist or digits)")
