"""The diffusion autoencoder (Preechakul et al. 2022): its networks' conditioning, its edits' algebra, the round trip of
encoding and decoding, the codes stage and the kinds' checks."""

import math

import pytest
import torch

from diffuse.denoiser import Denoiser
from diffuse.nets.blocks import ResBlock
from diffuse.nets.diffae import DiffusionAutoencoder, MLPSkipNet
from diffuse.nets.unet import UNetConfig
from diffuse.schedule import Schedule
from diffuse.tasks.semantic import decode, edit_code, encode, interpolation, lerp, slerp

TINY = UNetConfig(channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4], norm_groups=4,
                  dropout=0.0, semantic_dim=6)


def tiny_pair(seed: int = 0, prediction: str = "eps") -> Denoiser:
    """A DiffusionAutoencoder on 1x8x8 images whose zero-initialised output layers are drawn, so it predicts a nonzero
    eps that depends on x_t, t and z_sem."""
    torch.manual_seed(seed)
    net = DiffusionAutoencoder(TINY, 1, 8).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.05)
    return Denoiser(net, Schedule.linear(), prediction=prediction, bounded=False)


def test_the_decoder_block_scales_by_time_then_by_the_code():
    """ResBlock with a style: GN(h)(1 + t_scale) + t_shift, then times (1 + Linear(SiLU(z))) (the paper's AdaGN with z)."""
    torch.manual_seed(0)
    block = ResBlock(4, 4, 8, 0.0, 2, style_dim=3)
    torch.nn.init.normal_(block.conv2.weight)
    x, t_emb, z = torch.randn(2, 4, 5, 5), torch.randn(2, 8), torch.randn(2, 3)
    h = block.conv1(torch.nn.functional.silu(block.norm1(x)))
    scale, shift = block.emb(torch.nn.functional.silu(t_emb)).chunk(2, dim=1)
    h = block.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    h = h * (1 + block.style(torch.nn.functional.silu(z))[:, :, None, None])
    want = x + block.conv2(torch.nn.functional.silu(h))
    torch.testing.assert_close(block(x, torch.cat([t_emb, z], 1)), want)


def test_the_encoder_learns_through_the_diffusion_loss_alone():
    """Only the decoder's loss reaches the encoder: its gradient is nonzero, and the decoder's output depends on z_sem."""
    den = tiny_pair()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    t = torch.full((4,), 0.5)
    eps = torch.randn_like(x0)
    loss = ((den.raw(den.schedule.q_sample(x0, t, eps), t, encode=x0) - eps) ** 2).mean()
    loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in den.net.encoder.head.parameters())
    z = den.net.encode(x0).detach()
    x_t = den.schedule.q_sample(x0, t, eps)
    assert not torch.allclose(den(x_t, t, z_sem=z).eps, den(x_t, t, z_sem=z + 1).eps)


def test_mlp_skip_net_re_reads_its_input_at_every_layer():
    net = MLPSkipNet(5, hidden=7, layers=4)
    assert [layer.linear.in_features for layer in net.layers] == [5, 12, 12, 12]
    assert net.layers[-1].linear.out_features == 5 and not net.layers[-1].inner
    with pytest.raises(ValueError, match=r"codes of shape \(B, 5\)"):
        net(torch.randn(2, 4), torch.zeros(2))


def test_slerp_keeps_the_norm_and_lerp_does_not():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 1.0, 0.0])
    path = slerp(a, b, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(path[2], (a + b) / math.sqrt(2))
    assert float(lerp(a, b, torch.tensor([0.5])).norm()) == pytest.approx(1 / math.sqrt(2))
    torch.testing.assert_close(slerp(a, a, torch.tensor([0.3])), a[None])  # parallel: lerp
    z, x = interpolation(torch.zeros(2), torch.ones(2), a, b, 3)
    torch.testing.assert_close(z, torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="at least 2 frames"):
        interpolation(torch.zeros(2), torch.ones(2), a, b, 1)


def test_an_edit_moves_a_linear_classifiers_logit_by_s_sqrt_d_norm_w():
    """In normalised space the step is s sqrt(d) w/|w|, so a linear classifier's logit w . norm(z) + b rises by exactly
    s sqrt(d) |w|, whatever z; the step's normalised length is s sqrt(d)."""
    g = torch.Generator().manual_seed(0)
    d = 16
    z, w = torch.randn(5, d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    mean, std = torch.randn(d, generator=g, dtype=torch.float64), torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    norm = lambda v: (v - mean) / std  # noqa: E731
    for s in (0.3, -0.5, 0.0):
        edited = edit_code(z, w, s, mean, std)
        torch.testing.assert_close(norm(edited) @ w - norm(z) @ w, torch.full((5,), s * math.sqrt(d) * float(w.norm()),
                                                                              dtype=torch.float64))
        torch.testing.assert_close((norm(edited) - norm(z)).norm(dim=1), torch.full((5,), abs(s) * math.sqrt(d),
                                                                                     dtype=torch.float64))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="amount must be a finite number"):
            edit_code(z, w, bad, mean, std)
    with pytest.raises(ValueError, match="nonzero vector of the code's width 16"):
        edit_code(z, torch.zeros(d), 0.3, mean, std)


def test_encode_then_decode_returns_the_image():
    """DDIM inversion under z_sem then DDIM under z_sem (a v-prediction network with drawn weights): a first-order error
    (0.087 at 50 steps, 0.023 at 200) that refinement removes (2e-6); decoding the same x_T with another code gives
    another image (x_T alone does not hold it)."""
    den = tiny_pair(1, "v")
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    errors = []
    for steps, refine in ((50, 0), (200, 0), (50, 4)):
        z, x_T = encode(den, x0, steps=steps, refine=refine)
        errors.append(float((decode(den, z, x_T, steps=steps) - x0).abs().max()))
    assert errors[1] < errors[0] / 2.5 and errors[2] < 1e-4, errors
    other = decode(den, z.flip(0), x_T, steps=50)
    assert float((other - x0).abs().mean()) > 100 * errors[2]


def test_a_diffusion_autoencoder_config_refuses_what_it_cannot_use():
    from diffuse.config import RunConfig, apply_overrides
    from diffuse.kinds import check_config

    base = ["model.kind=diffae", "data.image_size=32"]
    for extra, match in ((["model.semantic_dim=0"], "semantic_dim must be >= 1"),
                         (["model.semantic_dim=4", "model.class_conditional=true"], "the semantic code is the decoder's condition"),
                         (["model.semantic_dim=4", "model.self_condition=true"], "model.self_condition"),
                         (["model.semantic_dim=4", "train.loss=vlb"], "plain eps loss")):
        with pytest.raises(ValueError, match=match):
            check_config(apply_overrides(RunConfig(), base + extra))
