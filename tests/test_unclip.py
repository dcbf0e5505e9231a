"""The unCLIP prior (kinds/unclip.py, nets/unclip.py): the causal mask, the scaling round trip, classifier-free
guidance of the prior and its caption dropout, best-of-k, bad input; and (slow) that a prior trained a few hundred
steps on a CLIP of captioned digits predicts embeddings nearer the true image's than an unrelated caption's image."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffuse.condition import ConditionSpec
from diffuse.config import RunConfig, apply_overrides, save_config
from diffuse.denoiser import Denoiser
from diffuse.guidance import ClassifierFreeGuidance
from diffuse.kinds.unclip import (SCALES, UnclipPriorObjective, clip_run, evaluate_run, load_prior, pick_best, prior_cosines, sample_image_embeddings,
                                  scale_embedding, text_condition, unscale_embedding)
from diffuse.nets.clip import unit
from diffuse.nets.unclip import FINAL, PriorTransformer, causal_mask
from diffuse.schedule import Schedule, ScheduleConfig

D, d, M = 6, 5, 7


def tiny_prior(seed: int = 0) -> PriorTransformer:
    torch.manual_seed(seed)
    return PriorTransformer(D, d, M, width=8, layers=2, heads=2).eval()


def inputs(B: int = 3, real: int = 4, seed: int = 1) -> tuple:
    """(x (B, D), t (B,), text_embed (B, D), context (B, M, d) zero after `real` tokens, mask (B, M))."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(M)[None].expand(B, M) < real
    context = torch.randn(B, M, d, generator=g) * mask[..., None]
    return torch.randn(B, D, generator=g), torch.rand(B, generator=g), torch.randn(B, D, generator=g), context, mask


# --- the network ---------------------------------------------------------------------------------------------------
def test_causal_mask_is_the_closed_form():
    valid = torch.tensor([[True, True, False, True]])
    blocked = causal_mask(valid)[0]
    for i in range(4):
        for j in range(4):
            assert bool(blocked[i, j]) == (j > i or (j == 2 and i != 2)), (i, j)


@torch.no_grad()
def test_earlier_positions_do_not_see_later_ones():
    """Changing the noised image embedding (position M + 2) changes no earlier position's output, and changes its own
    and the query's; changing the text embedding (position M) leaves every caption token as it was."""
    net = tiny_prior()
    x, t, te, c, m = inputs()
    h = net.hidden(x, t, te, c, m)
    assert h.shape == (3, M + FINAL, 8)
    h2 = net.hidden(x + 1, t, te, c, m)
    torch.testing.assert_close(h2[:, :M + 2], h[:, :M + 2], rtol=0, atol=1e-6)
    assert float((h2[:, M + 2:] - h[:, M + 2:]).abs().amin(-1).min()) > 1e-4  # both later positions move, every row
    h3 = net.hidden(x, t, te + 1, c, m)
    torch.testing.assert_close(h3[:, :M], h[:, :M], rtol=0, atol=1e-6)
    assert float((h3[:, M:] - h[:, M:]).abs().amax()) > 1e-4


@torch.no_grad()
def test_padding_does_not_change_the_prediction():
    """Padded caption tokens are never attended, so a caption padded further (or less) gives the same prediction."""
    net = tiny_prior()
    x, t, te, c, m = inputs(real=3)
    full = net(x, t, te, c, m)
    torch.testing.assert_close(net(x, t, te, c[:, :3], m[:, :3]), full, rtol=0, atol=1e-5)
    c2 = c.clone()
    c2[:, 5:] = 7.0  # what sits at padded positions is never read
    torch.testing.assert_close(net(x, t, te, c2, m), full, rtol=0, atol=1e-5)


# --- the diffused variable -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", SCALES)
def test_scaling_round_trip(how):
    g = torch.Generator().manual_seed(0)
    z = unit(torch.randn(200, D, generator=g) + 0.5)  # a cone of unit embeddings, as a CLIP's
    stats = {"mean": z.mean(0), "std": z.std(0)}
    s = scale_embedding(z, how, stats)
    torch.testing.assert_close(unscale_embedding(s, how, stats), z, rtol=0, atol=1e-6)
    if how == "sqrt_d":  # norm sqrt(D), cosines unchanged
        torch.testing.assert_close(s.norm(dim=1), torch.full((200,), math.sqrt(D)))
        torch.testing.assert_close(unit(s) @ unit(s).T, z @ z.T, rtol=0, atol=1e-6)
    else:  # zero mean and unit std per coordinate over the training embeddings
        torch.testing.assert_close(s.mean(0), torch.zeros(D), rtol=0, atol=1e-5)
        torch.testing.assert_close(s.std(0), torch.ones(D), rtol=0, atol=1e-5)
    torch.testing.assert_close(text_condition(z * 3).norm(dim=1), torch.full((200,), math.sqrt(D)))
    with pytest.raises(ValueError, match="unclip.scale"):
        scale_embedding(z, "l2", stats)


# --- guidance and the caption's dropout ------------------------------------------------------------------------------
@torch.no_grad()
def test_classifier_free_guidance_of_the_prior_is_the_combination_of_its_two_predictions():
    """x0~ = (1 + w) f(x_t, t, caption) - w f(x_t, t, null), null = zero text embedding and zero tokens, all attended
    (DALLE2-pytorch's null + (cond - null) s with s = 1 + w)."""
    net = tiny_prior()
    den = Denoiser(net, Schedule.from_config(ScheduleConfig(kind="cosine", T=1000)), prediction="x0", bounded=False)
    x, _, te, c, m = inputs()
    cond = {"text_embed": te, "context": c, "context_mask": m}
    null = net.condition_spec.null(cond)
    assert not null["text_embed"].any() and not null["context"].any() and bool(null["context_mask"].all())
    t = torch.full((3,), 0.6, dtype=torch.float64)
    mt = den.schedule.model_time(t).float()
    w = 3.0
    want = (1 + w) * net(x, mt, **cond) - w * net(x, mt, **null)
    got = ClassifierFreeGuidance(den, w, cond, null)(x, t).x0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_caption_is_dropped_whole():
    """One coin per example drops the text embedding and its tokens together; the other examples keep both."""
    obj = UnclipPriorObjective.__new__(UnclipPriorObjective)
    net = tiny_prior()
    obj.modules = {"model": net}
    _, _, te, c, m = inputs()
    dropped = torch.tensor([True, False, True])
    out = obj.condition({"text_embed": te, "context": c, "context_mask": m}, {"text_embed": dropped})
    for i, drop in enumerate(dropped.tolist()):
        if drop:
            assert not out["text_embed"][i].any() and not out["context"][i].any() and bool(out["context_mask"][i].all())
        else:
            assert torch.equal(out["text_embed"][i], te[i]) and torch.equal(out["context"][i], c[i])
            assert torch.equal(out["context_mask"][i], m[i])


# --- best of k -------------------------------------------------------------------------------------------------------
def test_pick_best_keeps_the_candidate_nearest_the_caption():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([math.cos(0.3), math.sin(0.3)])  # cosine 0.955 to (1, 0), 0.296 to (0, 1)
    b = torch.tensor([math.cos(1.2), math.sin(1.2)])  # cosine 0.362 to (1, 0), 0.932 to (0, 1)
    cand = torch.stack([torch.stack([b * 5, a * 2]), torch.stack([b * 0.1, a * 9])])  # norms differ: cosines decide
    got = pick_best(cand, text)
    assert torch.equal(got[0], a * 2) and torch.equal(got[1], b * 0.1)


def test_prior_cosines_closed_form():
    e = torch.eye(4)
    image, text = e[[0, 0, 1, 2]], e[[0, 0, 1, 3]]
    caps = ["a", "a", "b", "c"]
    out = prior_cosines(image.clone(), image, text, caps, torch.zeros(4) + 0.5)
    assert out["cos_pred_image"] == 1.0 and out["cos_pred_text"] == 0.75 and out["share_pred_closer_to_own_image"] == 1.0
    assert out["cos_pred_unrelated_image"] == 0.0 and out["baseline_cos_image_same_caption_image"] == 1.0
    assert out["baseline_cos_train_mean_image"] == pytest.approx(0.5)


# --- runs --------------------------------------------------------------------------------------------------------------
CLIP = ["model.kind=clip", "data.source=digits", "model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1",
        "model.norm_groups=4", "model.attention_resolutions=[]", "model.text_encoder=chars", "model.max_tokens=24",
        "clip.dim=16", "clip.text_width=16", "data.image_size=8", "data.channels=1", "train.batch_size=64", "train.lr=2e-3",
        "train.warmup_steps=5", "train.sample_every=0", "train.mixed_precision=no", "train.log_every=1000"]
PRIOR = ["model.kind=unclip_prior", "model.prediction=x0", "unclip.width=32", "unclip.layers=2", "unclip.heads=2",
         "schedule.kind=cosine", "train.batch_size=64", "train.lr=1e-3", "train.warmup_steps=5", "train.ema_decay=0.99",
         "train.sample_every=0", "train.mixed_precision=no", "train.log_every=1000", "sample.steps=10",
         "sample.guidance=1.0"]


def train_pair(folder, clip_steps: int, prior_steps: int):
    from diffuse.train import train

    train(apply_overrides(RunConfig(), [*CLIP, f"train.steps={clip_steps}", f"train.checkpoint_every={clip_steps}"]),
          folder / "clip", progress=False)
    train(apply_overrides(RunConfig(), [*PRIOR, f"unclip.clip={json.dumps(str(folder / 'clip'))}",
                                        f"train.steps={prior_steps}", f"train.checkpoint_every={prior_steps}"]),
          folder / "prior", progress=False)
    return folder / "clip", folder / "prior"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step CLIP of captioned digits and a 2-step prior on it."""
    return train_pair(tmp_path_factory.mktemp("unclip"), 2, 2)


def test_a_prior_run_samples_unit_embeddings_and_refuses_bad_input(runs, tmp_path):
    clip, prior_run = runs
    prior = load_prior(prior_run)
    z = sample_image_embeddings(prior, ["a handwritten three", "a handwritten four"], guidance=2.0, steps=3, best_of=2)
    assert z.shape == (2, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    same = sample_image_embeddings(prior, ["a handwritten three", "a handwritten four"], guidance=2.0, steps=3, best_of=2)
    assert torch.equal(z, same)  # the seed fixes every draw
    other = sample_image_embeddings(prior, ["a handwritten three"], guidance=2.0, steps=3, sampler="dpmpp-2m", seed=1)
    torch.testing.assert_close(other.norm(dim=1), torch.ones(1))  # any sampler of the process
    for prompts, match in [([""], "prompt 0"), (["  "], "prompt 0"), ([], "at least one prompt"),
                           (["a handwritten seven and much more text than fits"], "24")]:
        with pytest.raises(ValueError, match=match):
            sample_image_embeddings(prior, prompts, steps=2)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="guidance"):
            sample_image_embeddings(prior, ["a handwritten one"], guidance=bad, steps=2)
    with pytest.raises(ValueError, match="best_of"):
        sample_image_embeddings(prior, ["a handwritten one"], steps=2, best_of=0)
    with pytest.raises(ValueError, match="not an unCLIP prior"):
        load_prior(clip)


def test_the_clip_run_must_be_a_clip(runs, tmp_path):
    clip, prior_run = runs
    with pytest.raises(ValueError, match="unclip.clip is empty"):
        clip_run("")
    with pytest.raises(FileNotFoundError, match="holds no run"):
        clip_run(tmp_path / "nothing")
    with pytest.raises(ValueError, match="not a CLIP"):
        clip_run(prior_run)
    other = tmp_path / "denoiser"
    other.mkdir()
    save_config(RunConfig(), other / "config.toml")
    cfg = apply_overrides(RunConfig(), [*PRIOR, f"unclip.clip={json.dumps(str(other))}"])
    from diffuse.kinds import check_config

    with pytest.raises(ValueError, match='holds a denoiser run, not a CLIP'):
        check_config(cfg)
    with pytest.raises(ValueError, match="unclip.text_dropout > 0"):
        check_config(apply_overrides(cfg, [f"unclip.clip={json.dumps(str(clip))}", "unclip.text_dropout=0.0"]))
    spec = ConditionSpec(text_embed=D)
    with pytest.raises(ValueError, match="text_embed"):
        spec.check({"text_embed": torch.zeros(2, D + 1)}, torch.zeros(2, D))


@pytest.mark.slow
def test_a_trained_prior_predicts_the_captions_image_embedding(tmp_path):
    """A CLIP of captioned digits (150 steps) and a prior on it (300 steps): on held-out captions, its best-of-2
    embeddings are nearer (cosine) the true image's than an unrelated caption's image, for most pairs and on average."""
    _, prior_run = train_pair(tmp_path, 150, 300)
    r = evaluate_run(prior_run, n=60, steps=10)
    assert r["share_pred_closer_to_own_image"] > 0.8, r
    assert r["cos_pred_image"] > r["cos_pred_unrelated_image"] + 0.2, r


def test_diffuse_eval_reports_the_prior_cosines(runs, capsys):
    from diffuse.app.cli import main

    _, prior_run = runs
    assert main(["eval", str(prior_run), "--n", "12", "--steps", "2", "--guidance", "0"]) == 0
    record = json.loads((prior_run / "eval.json").read_text())[-1]
    assert record["metric"] == "prior" and record["n_held_out"] == 12 and record["guidance"] == 0
    assert -1 <= record["cos_pred_unrelated_image"] <= 1 and 0 <= record["share_pred_closer_to_own_image"] <= 1
    assert main(["eval", str(prior_run), "--metric", "fid"]) == 2
    assert "does not apply to an unCLIP prior run" in capsys.readouterr().err
