"""Conditioning as data (condition.py): condition dicts and their nulls, the U-Net's extra inputs (concatenated
image, scalars, cross-attention), per-key dropout in the trainer, classifier-free guidance over dicts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffuse.condition import ConditionSpec, batch_condition, concat_conditions
from diffuse.config import ConfigError, RunConfig, apply_overrides, from_dict
from diffuse.data import load_dataset
from diffuse.denoiser import Denoiser
from diffuse.guidance import ClassifierFreeGuidance
from diffuse.nets.blocks import CrossAttention
from diffuse.nets.unet import UNet
from diffuse.generate import generate
from diffuse.runs import load_run
from diffuse.schedule import Schedule
from diffuse.train import Trainer

from test_train import BASE
from test_unet import inputs, perturb, small_cfg

SPEC = ConditionSpec(num_classes=10, image_channels=2, scalars=1, context_dim=6)


def full_cond(b=4, seed=0, tokens=3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"label": torch.randint(0, 10, (b,), generator=g), "image": torch.randn(b, 2, 8, 8, generator=g),
            "scalars": torch.rand(b, 1, generator=g), "context": torch.randn(b, tokens, 6, generator=g)}


def full_net(**kw) -> UNet:
    cfg = small_cfg(class_conditional=True, cond_channels=2, scalar_inputs=1, context_dim=6,
                    cross_attention_resolutions=[8, 4], **kw)
    return perturb(UNet(cfg, in_channels=1, image_size=8, num_classes=10)).eval()


# --- the dict and its nulls ----------------------------------------------------------------------------
def test_null_values_of_each_kind():
    cond = {**full_cond(), "context_mask": torch.tensor([[True, False, True]] * 4)}
    null = SPEC.null(cond)
    assert null["label"].tolist() == [10] * 4  # the extra index num_classes: "no class"
    assert not null["image"].any() and not null["scalars"].any() and not null["context"].any()
    assert null["context_mask"].all()  # the null context attends every (zero) token
    only = SPEC.null(cond, keys=["label"])  # guidance over one key keeps the others
    assert torch.equal(only["image"], cond["image"]) and only["label"].tolist() == [10] * 4


def test_drop_replaces_exactly_the_marked_examples_of_each_key():
    cond = full_cond()
    dropped = SPEC.drop(cond, {"label": torch.tensor([True, False, False, True]),
                               "image": torch.tensor([False, True, False, False])})
    assert dropped["label"].tolist() == [10, int(cond["label"][1]), int(cond["label"][2]), 10]
    assert not dropped["image"][1].any() and torch.equal(dropped["image"][[0, 2, 3]], cond["image"][[0, 2, 3]])
    assert torch.equal(dropped["context"], cond["context"])  # a key with no mask keeps its values


def test_batch_and_concat():
    items = [{"label": torch.tensor(k)} for k in range(3)]
    assert batch_condition(items)["label"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="same condition keys"):
        batch_condition([{"label": torch.tensor(0)}, {}])
    with pytest.raises(ValueError, match="same keys"):
        concat_conditions({"label": torch.zeros(1)}, {})


@pytest.mark.parametrize("change, match", [
    (dict(extra=torch.zeros(4)), r"does not take the condition key\(s\) \['extra'\].*known kinds"),
    (dict(label=None), r"pass \['label'\]"),
    (dict(image=torch.zeros(4, 3, 8, 8)), r"condition image must have shape \(4, 2, 8, 8\)"),
    (dict(context=torch.zeros(4, 3, 5)), r"context must have shape \(4, M, 6\).*model.context_dim"),
    (dict(scalars=torch.zeros(4)), r"scalars must have shape \(4, 1\)"),
    (dict(label=torch.full((4,), 11)), r"labels must lie in 0..9 \(or 10, the null label\)"),
    (dict(label=torch.zeros(4)), "integer tensor"),
    (dict(context_mask=torch.zeros(4, 3, dtype=torch.bool)), "at least one True"),
    (dict(context_mask=torch.ones(4, 2, dtype=torch.bool)), r"context_mask must be a bool tensor of shape \(4, 3\)"),
])
def test_bad_conditions_are_named(change, match):
    net = full_net()
    x, t = inputs(4)
    cond = {k: v for k, v in {**full_cond(), **change}.items() if v is not None}
    with pytest.raises(ValueError, match=match):  # as generate checks a condition once, values included
        SPEC.check(cond, x, values=True)
    if "lie in" in match or "True" in match:  # values are read once per sampling run, not on every forward
        net(x, t, **{k: v for k, v in cond.items() if k not in ("label", "context_mask")},
            label=torch.zeros(4, dtype=torch.long))
        with pytest.raises(ValueError, match=match):
            generate(Denoiser(net, Schedule.linear(100)), 4, (1, 8, 8), cond=cond, steps=2)
    else:
        with pytest.raises(ValueError, match=match):
            net(x, t, **cond)


def test_unconditional_net_refuses_a_condition_by_name():
    net = UNet(small_cfg(), in_channels=1, image_size=8)
    x, t = inputs(4)
    with pytest.raises(ValueError, match=r"\['label'\].*none \(it is unconditional\)"):
        net(x, t, label=torch.zeros(4, dtype=torch.long))


# --- the U-Net's inputs ----------------------------------------------------------------------------------
def test_every_key_reaches_the_output_and_only_its_examples():
    net, (x, t), cond = full_net(), inputs(4), full_cond()
    base = net(x, t, **cond)
    for key in ("label", "image", "scalars", "context"):
        other = dict(cond)
        other[key] = cond[key].clone()
        other[key][1] = full_cond(seed=1)[key][1] if key != "label" else (cond["label"][1] + 1) % 10
        out = net(x, t, **other)
        assert (out[1] - base[1]).abs().max() > 1e-3, key  # the changed example moves
        torch.testing.assert_close(out[[0, 2, 3]], base[[0, 2, 3]])  # the others do not


def test_masked_tokens_do_not_change_the_output():
    """Padding: a context with extra tokens masked out gives the output of the context without them."""
    net, (x, t), cond = full_net(), inputs(4), full_cond(tokens=2)
    padded = torch.cat([cond["context"], 100 * torch.randn(4, 3, 6)], dim=1)
    mask = torch.tensor([[True, True, False, False, False]] * 4)
    torch.testing.assert_close(net(x, t, **{**cond, "context": padded, "context_mask": mask}), net(x, t, **cond))


def test_cross_attention_is_softmax_qk_v():
    """Rombach et al. 2022, sec. 3.3: Q = W_Q phi(z), K = W_K tau(y), V = W_V tau(y), softmax(Q K^T / sqrt(d)) V."""
    torch.manual_seed(0)
    block = perturb(CrossAttention(channels=8, context_dim=5, num_heads=2, groups=4))
    x, ctx = torch.randn(2, 8, 3, 3), torch.randn(2, 4, 5)
    z = block.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    q = z @ block.q.weight[:, :, 0, 0].T + block.q.bias
    k, v = (ctx @ block.kv.weight.T + block.kv.bias).chunk(2, dim=-1)
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        heads.append(torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(4), dim=-1) @ v[..., s])
    attended = torch.cat(heads, dim=-1)  # (B, HW, C)
    out = attended @ block.out.weight[:, :, 0, 0].T + block.out.bias
    torch.testing.assert_close(block(x, ctx), x + out.transpose(1, 2).reshape(2, 8, 3, 3), atol=1e-5, rtol=1e-5)


def test_a_new_nets_cross_attention_starts_switched_off():
    """Zero-initialised output layers: with every other weight trained (perturbed), a fresh cross-attention still
    adds nothing, so the net starts as the plain U-Net; once its output layer moves, the context matters."""
    net = UNet(small_cfg(context_dim=6, cross_attention_resolutions=[8, 4]), in_channels=1, image_size=8).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not ("cross" in name and ".out." in name):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    x, t = inputs(4)
    c1, c2 = full_cond(seed=0)["context"], full_cond(seed=1)["context"]
    torch.testing.assert_close(net(x, t, context=c1), net(x, t, context=c2))
    perturb(net)
    assert (net(x, t, context=c1) - net(x, t, context=c2)).abs().max() > 1e-3


def test_bad_cross_attention_configs():
    with pytest.raises(ValueError, match="cross_attention_resolutions \\[16\\] are not feature-map sizes"):
        UNet(small_cfg(context_dim=4, cross_attention_resolutions=[16]), in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="set both or neither"):
        UNet(small_cfg(context_dim=4), in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="must be >= 0"):
        UNet(small_cfg(cond_channels=-1), in_channels=1, image_size=8)


# --- guidance over dicts -------------------------------------------------------------------------------
def test_cfg_with_cond_equal_uncond_is_the_conditional_model_and_null_is_unconditional():
    net, (x, _), cond = full_net(), inputs(4), full_cond()
    den = Denoiser(net, Schedule.linear(100))
    t = 0.37
    conditional = den(x, t, **cond)
    for w in (0.0, 1.0, 5.0):
        torch.testing.assert_close(ClassifierFreeGuidance(den, w, cond, cond)(x, t).eps, conditional.eps,
                                   atol=1e-5, rtol=1e-5)
    # dropping every key gives one unconditional model: it no longer depends on the condition's values
    a, b = den(x, t, **SPEC.null(cond)), den(x, t, **SPEC.null(full_cond(seed=5)))
    torch.testing.assert_close(a.eps, b.eps)
    guided = ClassifierFreeGuidance(den, 2.0, cond, SPEC.null(cond))(x, t)
    torch.testing.assert_close(guided.eps, 3 * conditional.eps - 2 * a.eps, atol=1e-5, rtol=1e-5)


def test_generate_guides_a_dict_against_its_null_by_default():
    net = full_net()
    den = Denoiser(net, Schedule.linear(100))
    cond = full_cond()
    kw = dict(sampler="ddim", steps=3, seed=1, clip=False)
    default = generate(den, 4, (1, 8, 8), cond=cond, guidance=2.0, **kw)
    explicit = generate(den, 4, (1, 8, 8), cond=cond, uncond=SPEC.null(cond), guidance=2.0, **kw)
    torch.testing.assert_close(default, explicit)
    image_kept = generate(den, 4, (1, 8, 8), cond=cond, uncond=SPEC.null(cond, keys=["label"]), guidance=2.0, **kw)
    assert (image_kept - default).abs().max() > 1e-4  # guiding on the label alone is another model
    with pytest.raises(ValueError, match=r"condition 'image' must hold one value per sample, shape \(4, ...\)"):
        generate(den, 4, (1, 8, 8), cond={**cond, "image": cond["image"][:2]}, **kw)


# --- training: per-key dropout, a conditioned model through the Trainer -------------------------------------
class Paired:
    """The 8x8 digits with a condition image (the 4x4 downsample, upsampled: SR3's y) and a scalar, as a dataset."""

    def __init__(self):
        self.digits = load_dataset(apply_overrides(RunConfig(), BASE).data)
        self.num_classes = self.digits.num_classes
        self.condition_keys = ("label", "image", "scalars")

    def __len__(self):
        return len(self.digits)

    def batch(self, idx):
        x, cond = self.digits.batch(idx)
        low = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2.0, mode="nearest")
        return x, {**cond, "image": low, "scalars": (idx.double() % 7 / 7).float()[:, None]}


PAIRED = BASE + ["model.class_conditional=true", "model.cond_channels=1", "model.scalar_inputs=1", "train.steps=4"]


def test_per_key_dropout_rates(tmp_path):
    cfg = apply_overrides(RunConfig(), PAIRED + ["train.condition_dropout={label=0.3, image=0.7}"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False, dataset=Paired())
    x, cond = trainer._batch(0)
    B = x.shape[0]
    draws = [trainer.objective.inputs(x, dict(cond), trainer.objective.draw(B, trainer.generator))[1] for _ in range(300)]
    label_share = float(torch.stack([(d["label"] == 10).double().mean() for d in draws]).mean())
    image_share = float(torch.stack([(d["image"].flatten(1).abs().sum(1) == 0).double().mean() for d in draws]).mean())
    assert label_share == pytest.approx(0.3, abs=0.04) and image_share == pytest.approx(0.7, abs=0.04)
    assert all(torch.equal(d["scalars"], cond["scalars"]) for d in draws)  # no probability given: never dropped


def test_a_conditioned_model_trains_saves_and_samples(tmp_path):
    cfg = apply_overrides(RunConfig(), PAIRED + ["train.condition_dropout={label=0.2}", "sample.guidance=1.0"])
    run = Trainer(cfg, tmp_path / "run", progress=False, dataset=Paired()).fit()
    cfg2, den, num_classes = load_run(run)
    assert cfg2.train.condition_dropout == {"label": 0.2} and den.net.condition_spec.keys == ("label", "image", "scalars")
    x, cond = Paired().batch(torch.arange(4))
    out = generate(den, 4, (1, 8, 8), cond=cond, guidance=1.0, steps=3)
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"pass \['image', 'scalars'\]"):
        generate(den, 4, (1, 8, 8), labels=cond["label"], steps=3)


@pytest.mark.parametrize("override, match", [
    ("train.condition_dropout={image=0.1}", r"names \['image'\], which the model does not take; its condition keys are \['label'\]"),
    ("train.condition_dropout={label=1.0}", r"probabilities must be in \[0, 1\)"),
    ("model.cond_channels=1", r"takes the condition key\(s\) \['image'\] but the data yields only \['label'\]"),
])
def test_bad_condition_settings_are_named(tmp_path, override, match):
    cfg = apply_overrides(RunConfig(), BASE + ["model.class_conditional=true", override])
    with pytest.raises(ValueError, match=match):
        Trainer(cfg, tmp_path / "run", progress=False)


def test_condition_dropout_config_and_the_old_label_dropout_key():
    cfg = from_dict({"train": {"label_dropout": 0.1}})  # run folders saved before condition dicts
    assert cfg.train.condition_dropout == {"label": 0.1}
    assert from_dict({"train": {"label_dropout": 0.0}}).train.condition_dropout == {}
    with pytest.raises(ConfigError, match=r"train.condition_dropout.label must be a number"):
        from_dict({"train": {"condition_dropout": {"label": "often"}}})
    with pytest.raises(ConfigError, match=r"train.condition_dropout must be a table"):
        from_dict({"train": {"condition_dropout": 0.1}})
    with pytest.raises(ConfigError, match="finite"):
        from_dict({"train": {"condition_dropout": {"label": math.nan}}})
