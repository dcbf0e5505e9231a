"""The DDPM U-Net: the paper's CIFAR-10 model and config, shapes, conditioning, initialisation, bad configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffuse.config import load_config
from diffuse.nets.blocks import ShardedDropout, timestep_embedding
from diffuse.nets.unet import UNet, UNetConfig
from diffuse.schedule import Schedule
from diffuse.kinds.diffusion import build_model

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(**kw) -> UNetConfig:
    base = dict(channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4], num_heads=2,
                dropout=0.0, norm_groups=4)
    return UNetConfig(**{**base, **kw})


def perturb(net: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its initial value (the zero-initialised layers make an untrained net output 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def inputs(b=4, c=1, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, s, s, generator=g), torch.randint(0, 100, (b,), generator=g).float()


# --- the paper's model -------------------------------------------------------------------------------
def test_cifar10_config_has_the_papers_hyperparameters():
    cfg = load_config(ROOT / "configs" / "ddpm_cifar10.toml")
    t, m, s, d = cfg.train, cfg.model, cfg.schedule, cfg.data
    assert (d.image_size, d.channels) == (32, 3)
    assert (s.kind, s.T, s.beta_start, s.beta_end) == ("linear", 1000, 1e-4, 0.02)
    assert (t.lr, t.warmup_steps, t.batch_size, t.grad_clip, t.ema_decay) == (2e-4, 5000, 128, 1.0, 0.9999)
    assert t.weight_decay == 0 and t.hflip and t.loss_weighting == "none" and t.steps == 800_000
    assert (m.channels, m.channel_mult, m.num_res_blocks, m.attention_resolutions) == (128, [1, 2, 2, 2], 2, [16])
    assert (m.dropout, m.norm_groups, m.num_heads, m.prediction) == (0.1, 32, 1, "eps")
    betas = Schedule.from_config(s).betas
    assert len(betas) == 1001 and betas[1].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


def test_cifar10_unet_has_35_7M_parameters():
    cfg = load_config(ROOT / "configs" / "ddpm_cifar10.toml")
    net = build_model(cfg, num_classes=0)
    assert (net.in_channels, net.image_size, net.num_classes) == (3, 32, 0)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n
    # attention exactly at 16x16: one block per res block on the way down, one more on the way up, plus the middle
    attn = [mod for mod in net.modules() if mod.__class__.__name__ == "Attention"]
    assert len(attn) == 2 + 3 + 1
    with torch.no_grad():  # the one forward pass of the big model: batch 1
        out = net.eval()(torch.randn(1, 3, 32, 32), torch.tensor([10.0]))
    assert out.shape == (1, 3, 32, 32)


# --- a small model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,c,s", [
    ({}, 1, 8),
    ({"channel_mult": [1, 2, 2], "attention_resolutions": [8, 2], "num_res_blocks": 2}, 3, 8),
    ({"channel_mult": [1], "attention_resolutions": []}, 3, 6),
])
def test_output_shape_equals_input_shape(kw, c, s):
    net = perturb(UNet(small_cfg(**kw), in_channels=c, image_size=s))
    x, t = inputs(3, c, s)
    out = net(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    # the net also runs at other sizes that the levels can halve
    assert net(torch.randn(2, c, 2 * s, 2 * s), t[:2]).shape == (2, c, 2 * s, 2 * s)


def test_patching_is_a_unet_on_space_to_depth_channels():
    """patch_size 2 = pixel_unshuffle -> a patch-1 U-Net on 4x the channels at half the size -> pixel_shuffle."""
    patched = perturb(UNet(small_cfg(patch_size=2, attention_resolutions=[2]), in_channels=3, image_size=8)).eval()
    plain = UNet(small_cfg(attention_resolutions=[2]), in_channels=12, image_size=4).eval()
    plain.load_state_dict(patched.state_dict())  # same parameter shapes: only the in/out channel counts move
    x, t = inputs(2, 3, 8)
    with torch.no_grad():
        out = patched(x, t)
        ref = torch.nn.functional.pixel_shuffle(plain(torch.nn.functional.pixel_unshuffle(x, 2), t), 2)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="divisible by 4"):  # patch 2 times one halving
        patched(torch.randn(1, 3, 6, 6), t[:1])


def test_learned_variance_output_channels():
    net = UNet(small_cfg(), in_channels=3, image_size=8, out_channels=6)
    x, t = inputs(2, 3)
    assert net(x, t).shape == (2, 6, 8, 8)


def test_untrained_net_outputs_exactly_zero():
    net = UNet(small_cfg(dropout=0.1), in_channels=3, image_size=8).train()
    x, t = inputs(4, 3)
    assert torch.equal(net(x, t), torch.zeros_like(x))
    assert all(torch.equal(p, torch.zeros_like(p)) for p in net.conv_out.parameters())


def test_output_depends_on_t_with_perturbed_weights():
    net = perturb(UNet(small_cfg(), in_channels=1, image_size=8)).eval()
    x, _ = inputs(4)
    a, b = net(x, torch.full((4,), 3.0)), net(x, torch.full((4,), 700.0))
    assert (a - b).abs().max() > 1e-3
    # a batch mixes times per example: example i only sees its own t
    mixed = net(x, torch.tensor([3.0, 700.0, 3.0, 700.0]))
    torch.testing.assert_close(mixed[0::2], a[0::2])
    torch.testing.assert_close(mixed[1::2], b[1::2])
    # a scalar t is broadcast to the batch
    torch.testing.assert_close(net(x, torch.tensor(3.0)), a)


def test_output_depends_on_t_after_training_steps():
    torch.manual_seed(0)
    net = UNet(small_cfg(), in_channels=1, image_size=8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, _ = inputs(4)
    t_lo, t_hi = torch.full((4,), 3.0), torch.full((4,), 700.0)

    def step():
        opt.zero_grad()
        loss = ((net(x, t_lo) - x) ** 2).mean() + ((net(x, t_hi) + 0.5 * x) ** 2).mean()
        loss.backward()
        opt.step()

    with torch.no_grad():
        assert torch.equal(net(x, t_lo), net(x, t_hi))  # untrained: zero everywhere
    step()
    with torch.no_grad():  # one step only moves the zero output layer: still independent of t
        assert net(x, t_lo).abs().max() > 0
        assert torch.equal(net(x, t_lo), net(x, t_hi))
    for _ in range(3):
        step()
    with torch.no_grad():
        assert (net(x, t_lo) - net(x, t_hi)).abs().max() > 1e-4


def test_timestep_embedding():
    t = torch.tensor([0.0, 1.0, 999.0])
    e = timestep_embedding(t, 8)
    assert e.shape == (3, 8)
    torch.testing.assert_close(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # sin 0, cos 0
    torch.testing.assert_close(e[1, 0], torch.sin(torch.tensor(1.0)))  # the first frequency is 1
    torch.testing.assert_close(e[2, 3], torch.sin(torch.tensor(999.0 / 10000)))  # the last is 1/max_period (DDPM code)
    assert timestep_embedding(t, 7).shape == (3, 7)  # odd widths are padded


def test_class_conditional_output_depends_on_y():
    net = perturb(UNet(small_cfg(class_conditional=True), in_channels=1, image_size=8, num_classes=10)).eval()
    assert net.num_classes == 10 and net.label_emb.num_embeddings == 11 and net.condition_spec.keys == ("label",)
    x, t = inputs(4)
    a = net(x, t, label=torch.tensor([0, 0, 0, 0]))
    b = net(x, t, label=torch.tensor([0, 5, 0, 5]))
    torch.testing.assert_close(a[0::2], b[0::2])
    assert (a[1::2] - b[1::2]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"conditioned on \['label'\]: pass \['label'\]"):
        net(x, t)


def test_unconditional_model_ignores_dataset_classes():
    net = UNet(small_cfg(), in_channels=1, image_size=8, num_classes=10)
    assert net.num_classes == 0 and net.label_emb is None


def test_dropout_only_in_training_mode():
    net = perturb(UNet(small_cfg(dropout=0.5), in_channels=1, image_size=8))
    x, t = inputs(4)
    net.eval()
    torch.testing.assert_close(net(x, t), net(x, t), rtol=0, atol=0)
    net.train()
    torch.manual_seed(0)
    a = net(x, t)
    torch.manual_seed(1)
    b = net(x, t)
    torch.manual_seed(0)
    assert not torch.equal(a, b) and torch.equal(a, net(x, t))  # masks come from the global RNG


def test_sharded_dropout_slices_the_global_mask():
    """Rank r of w, fed rows [r n, (r+1) n) of a batch, drops exactly what one process drops there."""
    x = torch.randn(6, 5, 4, 4)
    full = ShardedDropout(0.3).train()
    torch.manual_seed(0)
    want = full(x)
    assert (want == 0).any() and (want != 0).any()
    for rank in range(3):
        part = ShardedDropout(0.3).train()
        part.shard = (rank, 3)
        torch.manual_seed(0)
        torch.testing.assert_close(part(x[2 * rank:2 * rank + 2]), want[2 * rank:2 * rank + 2], rtol=0, atol=0)
    torch.testing.assert_close(torch.nn.functional.dropout(x, 0.3, training=False), ShardedDropout(0.3).eval()(x))


# --- bad configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,size,key", [
    ({"norm_groups": 3}, 8, "model.norm_groups"),             # 3 divides neither 8 nor 16
    ({"channels": 12, "norm_groups": 8}, 8, "model.norm_groups"),  # 8 divides 24 but not 12
    ({"attention_resolutions": [16]}, 8, "model.attention_resolutions"),
    ({"attention_resolutions": [3]}, 8, "model.attention_resolutions"),
    ({"channel_mult": [1, 2, 2]}, 6, "data.image_size"),     # 6 cannot be halved twice
    ({"num_heads": 3}, 8, "model.num_heads"),
    ({"dropout": 1.0}, 8, "model.dropout"),
    ({"num_res_blocks": 0}, 8, "model.num_res_blocks"),
    ({"channel_mult": []}, 8, "model.channel"),
    ({"patch_size": 0}, 8, "model.patch_size"),
    ({"patch_size": 3}, 8, "patch_size"),                     # 8 is not a multiple of 3 * 2
    ({"patch_size": 2, "attention_resolutions": [8]}, 8, "model.attention_resolutions"),  # patched maps are 4 and 2
])
def test_bad_config_raises_value_error_naming_the_key(kw, size, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        UNet(small_cfg(**kw), in_channels=1, image_size=size)


def test_class_conditional_needs_labels():
    with pytest.raises(ValueError, match="model.class_conditional"):
        UNet(small_cfg(class_conditional=True), in_channels=1, image_size=8, num_classes=0)


def test_bad_input_shapes():
    net = UNet(small_cfg(), in_channels=1, image_size=8)
    t = torch.zeros(2)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.randn(2, 3, 8, 8), t)
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.randn(2, 1, 7, 8), t)
