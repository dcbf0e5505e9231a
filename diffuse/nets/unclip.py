"""The unCLIP prior's network (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents",
sec. 2.2; lecture 002, "DALL-E 2": the diffusion prior): a decoder-only transformer with a causal attention mask over

    [ caption token states c_1 .. c_M,  text embedding z_t,  time embedding of t,  noised image embedding z_i^(t),  query ]

whose output at the last position, the learned query, is the prediction of the clean image embedding z_i (the paper
predicts the unnoised z_i directly; DALLE2-pytorch's DiffusionPriorNetwork, Karlo's PriorTransformer lay the tokens out
the same way). Widths: D, the CLIP embedding width; d, the width of the CLIP text tower's token states; W, the
transformer's. Padded caption tokens are never attended (a padded query attends its real predecessors), so the output
does not depend on how far a caption is padded. Positions: the caption tokens carry a learned embedding per index, the
four final tokens one each of their own, so a caption of any length up to M puts them in the same place.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..condition import ConditionSpec
from .blocks import timestep_embedding

FINAL = 4  # the tokens after the caption's: text embedding, time, noised image embedding, query


def causal_mask(valid: Tensor) -> Tensor:
    """The attention mask of the prior: (B, L) bool, True for a real token, -> (B, L, L) bool, True where query i may
    NOT attend key j: j > i (causal), or key j padding and j != i (every query attends at least itself)."""
    L = valid.shape[1]
    later = torch.ones(L, L, dtype=torch.bool, device=valid.device).triu(1)  # (L, L): j > i
    own = torch.eye(L, dtype=torch.bool, device=valid.device)
    return later[None] | (~valid[:, None, :] & ~own[None])


class PriorTransformer(nn.Module):
    """f_theta(z_i^(t), t, z_t, c) -> z_i hat: (B, D) noised (scaled) image embeddings, (B,) model times and the
    condition `text_embed` (B, D) and `context` (B, M', d) with `context_mask` (B, M') (M' <= max_tokens) ->
    (B, D), the clean embedding (Denoiser prediction "x0"). Pre-norm transformer layers (torch's, GELU, 4x MLP), a
    final LayerNorm and a linear read-out of the last position. ValueError for widths < 1, a width not divisible by the
    heads, or embeddings of another width."""

    num_classes = 0

    def __init__(self,
                 dim: int,              # D, the CLIP embedding width (the diffused variable's and the text embedding's)
                 text_width: int,       # d, the CLIP text tower's token-state width
                 max_tokens: int,       # M, the CLIP tokenizer's tokens per caption
                 width: int = 128,      # W (DALLE2-pytorch's example config: 768)
                 layers: int = 4,       # transformer layers (the example: 12)
                 heads: int = 4,        # attention heads (the example: 12)
                 dropout: float = 0.0):
        super().__init__()
        if min(dim, text_width, max_tokens, width, layers, heads) < 1 or width % heads:
            raise ValueError(f"the unCLIP prior needs every width, layer and head count >= 1 and unclip.width divisible by "
                             f"unclip.heads; got D {dim}, d {text_width}, M {max_tokens}, width {width}, layers {layers}, "
                             f"heads {heads}")
        self.dim, self.width, self.max_tokens = dim, width, max_tokens
        self.condition_spec = ConditionSpec(context_dim=text_width, text_embed=dim)
        self.tokens_in = nn.Linear(text_width, width)              # caption token states -> W
        self.token_pos = nn.Parameter(torch.randn(max_tokens, width) * 0.02)
        self.text_embed_in = nn.Linear(dim, width)                 # z_t -> W
        self.time_in = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))  # of a sinusoid of t
        self.image_in = nn.Linear(dim, width)                      # z_i^(t) -> W
        self.query = nn.Parameter(torch.randn(width) * 0.02)      # the learned query whose output is the prediction
        self.final_pos = nn.Parameter(torch.randn(FINAL, width) * 0.02)
        self.heads = heads
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def hidden(self, x: Tensor, t: Tensor, text_embed: Tensor, context: Tensor, context_mask: Tensor | None = None
               ) -> Tensor:
        """Every position's output after the last layer, before the read-out: (B, M' + 4, W)."""
        B, M = context.shape[:2]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"the unCLIP prior diffuses embeddings of shape (B, {self.dim}), got {tuple(x.shape)}")
        if M > self.max_tokens:
            raise ValueError(f"the context holds {M} tokens and the prior reads at most {self.max_tokens} (its CLIP's "
                             "model.max_tokens); tokenize the caption with that CLIP")
        self.condition_spec.check({"text_embed": text_embed, "context": context,
                                   **({} if context_mask is None else {"context_mask": context_mask})}, x)
        valid = torch.ones(B, M, dtype=torch.bool, device=x.device) if context_mask is None else context_mask.bool()
        t_emb = self.time_in(timestep_embedding(t.expand(B), self.width).to(x.dtype))
        final = torch.stack([self.text_embed_in(text_embed), t_emb, self.image_in(x), self.query.expand(B, -1)], 1)
        h = torch.cat([self.tokens_in(context) + self.token_pos[:M], final + self.final_pos], 1)  # (B, M + 4, W)
        mask = causal_mask(torch.cat([valid, valid.new_ones(B, FINAL)], 1))                       # (B, L, L)
        mask = mask.repeat_interleave(self.heads, 0)                                               # (B heads, L, L)
        for block in self.blocks:
            h = block(h, src_mask=mask)
        return h

    def forward(self, x: Tensor, t: Tensor, text_embed: Tensor, context: Tensor, context_mask: Tensor | None = None
                ) -> Tensor:
        return self.out(self.norm(self.hidden(x, t, text_embed, context, context_mask)[:, -1]))
