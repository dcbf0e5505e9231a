"""The space-time U-Net (nets/unet.py with model.video; nets/blocks.py TemporalAttention): a fresh video net is the image
net on each frame, image mode makes every frame what the net gives it alone, frames and their indices permute together,
only differences of frame indices count, gradients reach the temporal parameters, the observed-frames channel, and bad
shapes refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffuse.nets.blocks import TemporalAttention
from diffuse.nets.unet import UNet, UNetConfig

B, C, FRAMES, SIDE = 2, 1, 4, 8
CFG = UNetConfig(channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4], num_heads=2, dropout=0.0,
                 norm_groups=4, class_conditional=True, context_dim=6, cross_attention_resolutions=[4])


def video_net(seed: int = 0, **changes) -> UNet:
    torch.manual_seed(seed)
    return UNet(dataclasses.replace(CFG, video=True, **changes), C, SIDE, num_classes=3).eval()


def image_net(seed: int = 0) -> UNet:
    """An image net with every weight moved off its initialisation (a fresh U-Net outputs zeros: conv_out starts at 0)."""
    torch.manual_seed(seed)
    net = UNet(CFG, C, SIDE, num_classes=3).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def perturb_temporal(net: UNet, seed: int = 1) -> UNet:
    """Move every temporal-attention parameter off zero, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "temporal" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return net


def trained_video_net() -> UNet:
    net = video_net()
    net.load_state_dict(image_net().state_dict(), strict=False)
    return perturb_temporal(net)


def inputs(frames: int = FRAMES, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, frames, SIDE, SIDE, generator=g)
    t = torch.tensor([3.0, 700.0])
    cond = {"label": torch.tensor([0, 2]), "context": torch.randn(B, 5, 6, generator=g)}
    return x, t, cond


def test_a_fresh_video_net_is_the_image_net_on_each_frame():
    image = image_net()
    video = video_net(seed=5)
    missing, unexpected = video.load_state_dict(image.state_dict(), strict=False)
    assert not unexpected and missing and all("temporal" in k for k in missing)
    x, t, cond = inputs()
    with torch.no_grad():
        out = video(x, t, **cond)
        assert out.shape == x.shape and out.abs().max() > 0.1  # not the zeros of a fresh conv_out
        for f in range(FRAMES):
            torch.testing.assert_close(out[:, :, f], image(x[:, :, f], t, **cond), rtol=1e-5, atol=1e-5)
        feats = video.decoder_features(x, t, [1], **cond)[1]  # (B, width, F, side, side)
        torch.testing.assert_close(feats[:, :, 2], image.decoder_features(x[:, :, 2], t, [1], **cond)[1],
                                   rtol=1e-5, atol=1e-5)


def test_image_mode_gives_each_frame_what_it_gets_alone():
    net = trained_video_net()
    x, t, cond = inputs()
    index = torch.tensor([[0, 1, 2, 3], [5, 9, 10, 20]])
    with torch.no_grad():
        mixed = net(x, t, frame_index=index, **cond)
        alone = net(x, t, frame_index=index, independent=torch.ones(B, FRAMES, dtype=torch.bool), **cond)
        for f in range(FRAMES):
            one = net(x[:, :, f:f + 1], t, frame_index=index[:, f:f + 1], **cond)[:, :, 0]
            torch.testing.assert_close(alone[:, :, f], one, rtol=1e-5, atol=1e-5)
        assert (mixed - alone).abs().max() > 1e-3  # without the mask the frames do mix
        # Ho et al.'s joint training: frames 2, 3 are images appended to a 2-frame video; they do not mix with it
        independent = torch.tensor([[False, False, True, True]] * B)
        joint = net(x, t, frame_index=index, independent=independent, **cond)
        other = x.clone()
        other[:, :, 2:] = torch.randn_like(other[:, :, 2:])
        torch.testing.assert_close(net(other, t, frame_index=index, independent=independent, **cond)[:, :, :2],
                                   joint[:, :, :2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(joint[:, :, :2], net(x[:, :, :2], t, frame_index=index[:, :2], **cond),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(joint[:, :, 3], alone[:, :, 3], rtol=1e-5, atol=1e-5)


def test_permuting_frames_and_their_indices_permutes_the_output():
    net = trained_video_net()
    x, t, cond = inputs()
    index = torch.tensor([[0, 1, 3, 7], [2, 4, 5, 11]])
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = net(x, t, frame_index=index, **cond)
        torch.testing.assert_close(net(x[:, :, perm], t, frame_index=index[:, perm], **cond), out[:, :, perm],
                                   rtol=1e-5, atol=1e-5)


def test_only_differences_of_frame_indices_count():
    net = trained_video_net()
    x, t, cond = inputs()
    even = torch.arange(FRAMES).expand(B, FRAMES)
    with torch.no_grad():
        out = net(x, t, frame_index=even, **cond)
        assert torch.equal(net(x, t, **cond), out)  # the default is arange(F)
        assert torch.equal(net(x, t, frame_index=even + 1000, **cond), out)  # translation: the same distances
        torch.testing.assert_close(net(x, t, frame_index=even.double() - 3.5, **cond), out, rtol=1e-6, atol=1e-6)
        assert (net(x, t, frame_index=2 * even, **cond) - out).abs().max() > 1e-3  # spacing 2 is another video


def test_gradients_reach_the_temporal_parameters():
    x, t, cond = inputs()
    net = video_net()
    net.load_state_dict(image_net().state_dict(), strict=False)
    net(x, t, **cond).square().sum().backward()
    grads = {k: p.grad for k, p in net.named_parameters() if "temporal" in k}
    # fresh: only the zero-initialised output projections learn first (the rest sits behind them)
    assert all(grads[k].abs().max() > 0 for k in grads if ".out." in k)
    perturb_temporal(net)
    net.zero_grad()
    net(x, t, **cond).square().sum().backward()
    grads = {k: p.grad.clone() for k, p in net.named_parameters() if "temporal" in k}
    assert grads and all(g.abs().max() > 0 for g in grads.values()), [k for k, g in grads.items() if not g.any()]
    # activation checkpointing carries the frame layout through and gives the same gradients
    checkpointed = video_net(checkpointing=True).train()
    checkpointed.load_state_dict(net.state_dict())
    checkpointed(x, t, **cond).square().sum().backward()
    for k, p in checkpointed.named_parameters():
        if "temporal" in k:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-6)


def test_the_observed_frames_are_one_more_input_channel():
    plain = trained_video_net()
    net = video_net(video_observed=True)
    state = plain.state_dict()
    state["conv_in.weight"] = torch.cat([state["conv_in.weight"], torch.zeros(8, 1, 3, 3)], dim=1)  # the indicator's
    net.load_state_dict(state)
    x, t, cond = inputs()
    observed = torch.tensor([[True, True, False, False], [False, True, False, True]])
    with torch.no_grad():
        # with a zero weight on the indicator channel the net is the plain one, whatever is observed
        torch.testing.assert_close(net(x, t, observed=observed, **cond), plain(x, t, **cond), rtol=1e-5, atol=1e-5)
        net.conv_in.weight[:, 1:].normal_()
        assert (net(x, t, observed=observed, **cond) - net(x, t, observed=~observed, **cond)).abs().max() > 1e-3


def test_temporal_parameters_are_counted_in_the_docstring():
    """4C^2 + 10C + Ch + h per block of width C with h heads (TemporalAttention's docstring), one per residual block
    and one in the middle: widths 8 (down 1, up 2 blocks) and 16 (down 1, up 2, middle 1)."""
    h = CFG.num_heads
    per_block = [4 * w * w + 10 * w + w * h + h for w in [8] * 3 + [16] * 4]
    assert sum(p.numel() for p in TemporalAttention(16, h, 4).parameters()) == per_block[-1] == 1218
    image = UNet(CFG, C, SIDE, num_classes=3)
    extra = sum(p.numel() for p in video_net().parameters()) - sum(p.numel() for p in image.parameters())
    assert extra == sum(per_block) == 5934


def test_bad_shapes_are_refused_by_name():
    net = video_net(video_observed=True)
    x, t, cond = inputs()
    observed = torch.zeros(B, FRAMES, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^this U-Net is a video net \(model.video = true\): it expects x of shape "
                                         r"\(B, 1, F, H, W\), got \(2, 1, 8, 8\); pass frames as a 5-D tensor"):
        net(x[:, :, 0], t, observed=observed, **cond)
    with pytest.raises(ValueError, match=r"^frame_index must have shape \(2, 4\) \(batch, frames"):
        net(x, t, observed=observed, frame_index=torch.arange(5).expand(B, 5), **cond)
    with pytest.raises(ValueError, match=r"^frame_index must have shape \(2, 4\)"):
        net(x, t, observed=observed, frame_index=torch.arange(4), **cond)
    with pytest.raises(ValueError, match=r"^observed must be a bool tensor of shape \(2, 4\) .*got torch.float32 "
                                         r"\(2, 4\); from 0/1 values pass observed > 0.5"):
        net(x, t, observed=torch.full((B, FRAMES), 0.5), **cond)
    with pytest.raises(ValueError, match=r"pass \['observed'\] too"):
        net(x, t, **cond)
    with pytest.raises(ValueError, match=r"^independent must be a bool tensor of shape \(2, 4\)"):
        net(x, t, observed=observed, independent=torch.ones(B, FRAMES), **cond)
    with pytest.raises(ValueError, match=r"videos \(B, C, F, H, W\) need model.video = true$"):
        image_net()(x, t, **cond)
    with pytest.raises(ValueError, match=r"does not take the condition key\(s\) \['frame_index'\]"):
        image_net()(x[:, :, 0], t, frame_index=torch.zeros(B, 1), **cond)
    with pytest.raises(ValueError, match=r"^model.video_observed adds the observed-frames channel of a video net: set "
                                         r"model.video = true"):
        UNet(dataclasses.replace(CFG, video_observed=True), C, SIDE, num_classes=3)
    with pytest.raises(ValueError, match=r"^frame_index must be finite"):
        net.condition_spec.check({**cond, "observed": observed, "frame_index": torch.tensor([[0.0, 1, 2, float("nan")]] * 2)},
                                 x, values=True)
