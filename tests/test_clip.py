"""CLIP trained here (nets/clip.py, kinds/clip.py): the symmetric InfoNCE and its soft targets for repeated captions,
unit embeddings, the clamped temperature, the noise-aware tower's time input, a few steps that learn, and the retrieval
metric. The contract (exact resume, 2-process DDP) is tests/test_kinds.py's "clip" rows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffuse.kinds.clip import caption_targets, chance_recall, info_nce, recall_at_k, retrieval
from diffuse.nets.clip import CLIP, LOGIT_SCALE_INIT, LOGIT_SCALE_MAX
from diffuse.nets.unet import UNetConfig

TOWER = UNetConfig(channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[], norm_groups=4, dropout=0.0)


def tiny(noise_aware=False) -> CLIP:
    torch.manual_seed(0)
    return CLIP(TOWER, 3, 16, dim=8, text="chars", max_tokens=40, text_width=8, noise_aware=noise_aware)


def unit_rows(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_info_nce_is_the_hand_computed_symmetric_cross_entropy():
    I, T, s = unit_rows(3, 4, 0), unit_rows(3, 4, 1), torch.tensor(2.5)
    by_hand = 0.0
    for i in range(3):
        row = [s * float(I[i] @ T[j]) for j in range(3)]  # image i against every text
        col = [s * float(T[i] @ I[j]) for j in range(3)]  # text i against every image
        by_hand += (-row[i] + math.log(sum(math.exp(v) for v in row))) + (-col[i] + math.log(sum(math.exp(v) for v in col)))
    by_hand /= 2 * 3
    assert float(info_nce(I, T, s)) == pytest.approx(by_hand, rel=1e-6)


def test_equal_captions_share_the_target_mass_and_distinct_ones_give_the_plain_cross_entropy():
    model = tiny()
    tokens = model.tokenize(["a red circle", "a blue square", "a red circle"])
    Y = caption_targets(tokens)
    assert torch.equal(Y, torch.tensor([[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]]))
    I, T, s = unit_rows(3, 4, 0), unit_rows(3, 4, 1), torch.tensor(3.0)
    logits = s * I @ T.T
    logp_i, logp_t = logits.log_softmax(1), logits.T.log_softmax(1)
    want = -((Y * logp_i).sum(1).mean() + (Y * logp_t).sum(1).mean()) / 2  # each row's mass split between the two
    assert float(info_nce(I, T, s, Y)) == pytest.approx(float(want), rel=1e-6)
    distinct = caption_targets(model.tokenize(["one", "two", "three"]))
    assert torch.equal(distinct, torch.eye(3))
    plain = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    assert float(info_nce(I, T, s, distinct)) == pytest.approx(float(plain), rel=1e-6)


def test_embeddings_are_unit_vectors_and_the_temperature_starts_at_one_over_0_07():
    model = tiny()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    img, txt, s = model(x, model.tokenize(["a", "a small red circle", "two", "three blue squares"]))
    assert torch.allclose(img.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.allclose(txt.norm(dim=1), torch.ones(4), atol=1e-6)
    assert float(s.detach()) == pytest.approx(1 / 0.07, rel=1e-6) and float(model.logit_scale.detach()) == pytest.approx(LOGIT_SCALE_INIT)


def test_the_noise_aware_tower_reads_the_time_and_refuses_to_go_without_it():
    model = tiny(noise_aware=True).eval()
    with torch.no_grad():  # the residual blocks' last convolutions start at zero (each block the identity): wake them
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a, b = model.image_embedding(x, torch.tensor(0.0)), model.image_embedding(x, torch.tensor(500.0))
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(model.image_embedding(x, torch.tensor([0.0, 0.0])), a)
    with pytest.raises(ValueError, match="noise-aware.*model time"):
        model.image_embedding(x)
    plain = tiny().eval()
    assert torch.equal(plain.image_embedding(x, torch.tensor(3.0)), plain.image_embedding(x))  # a plain CLIP ignores it


def shapes_config(steps, *extra):
    from diffuse.config import RunConfig, apply_overrides

    return apply_overrides(RunConfig(), [
        "model.kind=clip", "data.source=shapes", "data.channels=3", "data.image_size=16", "data.crops=40",
        "model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.attention_resolutions=[]",
        "model.norm_groups=4", "model.dropout=0.0", "model.text_encoder=chars", "model.max_tokens=64", "clip.dim=16",
        "clip.text_width=16", "train.batch_size=32", "train.lr=3e-3", "train.warmup_steps=1", "train.log_every=1000",
        "train.sample_every=0", "train.checkpoint_every=1000", "train.mixed_precision=no", f"train.steps={steps}", *extra])


def test_the_temperature_is_clamped_into_0_ln100_after_every_step(tmp_path):
    from diffuse.train import Trainer

    trainer = Trainer(shapes_config(3), tmp_path / "run", progress=False)
    scale = trainer.modules["model"].logit_scale
    for start, want in ((9.0, LOGIT_SCALE_MAX), (-2.0, 0.0)):
        with torch.no_grad():
            scale.fill_(start)
        trainer.train_step()
        assert float(scale.detach()) == pytest.approx(want, abs=1e-7)


def test_weight_decay_shrinks_weight_matrices_and_spares_logit_scale_gains_and_biases(tmp_path):
    """AdamW's decoupled decay (Loshchilov & Hutter 2019, Alg. 2, line 12): a step with zero gradient moves a decayed
    parameter to p (1 - lr wd) and leaves an exempt one; exempt are ndim < 2 (open_clip, nanoGPT, DALLE2-pytorch)."""
    from diffuse.train import Trainer

    trainer = Trainer(shapes_config(3, "train.weight_decay=0.5", "train.warmup_steps=0"), tmp_path / "run", progress=False)
    model, opt = trainer.modules["model"], trainer.optimizers["main"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    lr = opt.param_groups[0]["lr"]
    for n, p in model.named_parameters():
        want = before[n] * (1 - lr * 0.5) if p.ndim >= 2 else before[n]
        assert torch.allclose(p.detach(), want, rtol=0, atol=1e-7), n
    assert model.logit_scale.ndim < 2 and any(p.ndim < 2 for p in model.parameters() if p is not model.logit_scale)


def test_a_few_steps_on_tiny_shapes_rank_the_training_pairs_above_chance(tmp_path):
    from diffuse.train import Trainer

    trainer = Trainer(shapes_config(60), tmp_path / "run", progress=False)
    trainer.fit()
    model = trainer.modules["model"].eval()
    x, cond = trainer.dataset.batch(torch.arange(32))
    with torch.no_grad():
        img, txt = model.image_embedding(x), model.text_embedding(cond["text"])
    _, ids = torch.unique(cond["text"], dim=0, return_inverse=True)
    r = retrieval(img, txt, ids)
    assert r["i2t_r@1"] > 3 * r["i2t_chance@1"] and r["t2i_r@1"] > 3 * r["t2i_chance@1"], r


def test_retrieval_is_perfect_on_matching_embeddings_and_at_chance_on_shuffled_ones():
    n = 400
    img, ids = unit_rows(n, 32, 0), torch.arange(n)
    perfect = retrieval(img, img.clone(), ids)
    assert all(perfect[f"{d}_r@{k}"] == 1.0 for d in ("t2i", "i2t") for k in (1, 5))
    assert perfect["t2i_chance@5"] == pytest.approx(5 / n) and perfect["i2t_chance@1"] == pytest.approx(1 / n)
    shuffled = retrieval(img, img[torch.randperm(n, generator=torch.Generator().manual_seed(1))], ids)
    for d in ("t2i", "i2t"):  # binomial: 400 queries at p = 5/400, std ~ 0.0056
        assert shuffled[f"{d}_r@5"] < 5 / n + 4 * math.sqrt(5 / n / n) and shuffled[f"{d}_r@1"] < 0.02
    # equal captions: image 2 shares image 0's caption, so either image answers that caption
    match = torch.tensor([[True, False, True], [False, True, False]])
    sim = torch.tensor([[0.1, 0.0, 0.9], [0.5, 0.2, 0.1]])
    assert recall_at_k(sim, match, 1) == 0.5 and chance_recall(match, 1) == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_retrieval_eval_of_a_run_and_its_bad_inputs(tmp_path):
    from diffuse.config import ConfigError
    from diffuse.kinds import check_config
    from diffuse.kinds.clip import evaluate_run, load_clip
    from diffuse.train import Trainer

    Trainer(shapes_config(1, "clip.noise_aware=true", "schedule.kind=flow"), tmp_path / "run", progress=False).fit()
    record = evaluate_run(tmp_path / "run")
    assert record["n_held_out"] == 4 and [k for k in record if k.startswith("t=")] == ["t=0", "t=0.25", "t=0.5", "t=0.75"]
    assert record["t=0"]["i2t_chance@5"] == pytest.approx(1.0) and record["t=0"]["t2i_r@5"] == 1.0  # 4 items: any 5 hit
    cfg, model = load_clip(tmp_path / "run")
    assert model.noise_aware and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="needs a text tower"):
        check_config(shapes_config(1, 'model.text_encoder=""'))
    with pytest.raises(ConfigError, match="schedule.kind = 'flow' is ignored"):
        check_config(shapes_config(1, "schedule.kind=flow"))
    from PIL import Image

    (tmp_path / "folder").mkdir()
    for i in range(40):  # an uncaptioned image folder
        Image.new("RGB", (16, 16), (6 * i, 0, 0)).save(tmp_path / "folder" / f"{i}.png")
    cfg = shapes_config(1, "data.source=folder", f"data.path={str(tmp_path / 'folder')!r}")
    cfg.data.crops = type(cfg.data)().crops
    with pytest.raises(ValueError, match='trains on captioned images: set data.source = "shapes"'):
        Trainer(cfg, tmp_path / "b", progress=False)


def test_diffuse_eval_on_captioned_digits_appends_retrieval_and_zero_shot_accuracy(tmp_path, capsys):
    import json

    from diffuse.app.cli import main
    from diffuse.config import RunConfig, apply_overrides
    from diffuse.train import Trainer

    cfg = apply_overrides(RunConfig(), [
        "model.kind=clip", "data.source=digits", "data.channels=1", "data.image_size=8", "model.channels=8",
        "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.norm_groups=4",
        "model.text_encoder=chars", "model.max_tokens=24", "clip.dim=8", "clip.text_width=8", "train.batch_size=32",
        "train.steps=2", "train.log_every=1000", "train.sample_every=0", "train.checkpoint_every=1000"])
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert main(["eval", str(tmp_path / "run"), "--metric", "retrieval", "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "run" / "eval.json").read_text())[-1]
    assert record["metric"] == "retrieval" and record["distinct_captions"] == 10 and [k for k in record if k.startswith("t=")] == ["t=0"]
    level = record["t=0"]  # the ten prompts are the held-out gallery's ten captions: zero-shot accuracy is i2t recall@1
    assert level["zero_shot_accuracy"] == pytest.approx(level["i2t_r@1"]) and level["i2t_chance@1"] == pytest.approx(0.1)
    assert main(["eval", str(tmp_path / "run"), "--metric", "fid"]) != 0
    assert "--metric fid does not apply to a CLIP run" in capsys.readouterr().err


def test_the_minilm_tower_trains_only_its_projection():
    torch.manual_seed(0)
    model = CLIP(TOWER, 3, 16, dim=8, text="minilm", max_tokens=16)
    text_params = [name for name, _ in model.named_parameters() if not name.startswith("image_tower")]
    assert text_params == ["logit_scale", "text_proj.weight", "text_proj.bias"] and model.text_proj.in_features == 384
    emb = model.text_embedding(model.tokenize(["a red circle", "a red circle", "two blue squares"]))
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-6) and torch.allclose(emb[0], emb[1])


@pytest.mark.parametrize("kind, want", [("linear", -1.0), ("flow", 0.0), ("edm", None)])
def test_one_clean_time_per_process_and_a_clean_read_without_a_time(kind, want):
    """clean_model_time: model_time(0) where finite (VP -1, flow 0), model_time(t_min) on EDM (model_time(0) = -inf);
    clip_model_time maps t = 0 there; a noise-aware CLIP built from a config reads x at it when given no time."""
    from diffuse.config import RunConfig, apply_overrides
    from diffuse.kinds.clip import build_clip, clean_model_time, clip_model_time
    from diffuse.schedule import Schedule

    cfg = apply_overrides(RunConfig(), ["model.kind=clip", "clip.noise_aware=true", f"schedule.kind={kind}",
                                        "data.source=shapes", "data.image_size=16", "data.channels=3", "model.channels=8",
                                        "model.channel_mult=[1, 2]", "model.attention_resolutions=[]", "model.norm_groups=4",
                                        "model.text_encoder=chars", "clip.dim=8", "clip.text_width=8"])
    schedule = Schedule.from_config(cfg.schedule)
    clean = clean_model_time(schedule)
    t_min = float(schedule.model_time(torch.tensor([schedule.t_min], dtype=torch.float64))[0])
    assert math.isfinite(clean) and clean == (t_min if want is None else want)
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    mt = clip_model_time(schedule, t)
    assert float(mt[0]) == pytest.approx(clean) and float(mt[1]) == pytest.approx(float(schedule.model_time(t)[1]))
    torch.manual_seed(0)
    model = build_clip(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert model.clean_time == clean
    assert torch.equal(model.image_embedding(x), model.image_embedding(x, torch.tensor(clean)))
    assert torch.isfinite(model.image_embedding(x)).all()


def test_a_noise_aware_clip_trains_and_retrieves_finite_on_edm(tmp_path):
    """EDM's model_time(0) is -inf: the clean share trains and retrieval at t = 0 reads at clean_model_time instead
    (a NaN loss or NaN recall before)."""
    import json

    from diffuse.app.cli import main
    from diffuse.config import RunConfig, apply_overrides
    from diffuse.train import Trainer

    cfg = apply_overrides(RunConfig(), [
        "model.kind=clip", "clip.noise_aware=true", "clip.clean_share=0.5", "schedule.kind=edm", "data.source=digits",
        "data.channels=1", "data.image_size=8", "model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1",
        "model.attention_resolutions=[]", "model.norm_groups=4", "model.text_encoder=chars", "model.max_tokens=24",
        "clip.dim=8", "clip.text_width=8", "train.batch_size=32", "train.steps=3", "train.log_every=1",
        "train.sample_every=0", "train.checkpoint_every=1000"])
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert main(["eval", str(tmp_path / "run"), "--metric", "retrieval", "--device", "cpu"]) == 0
    level = json.loads((tmp_path / "run" / "eval.json").read_text())[-1]["t=0"]
    assert all(math.isfinite(v) for v in level.values() if isinstance(v, float))
