"""Self-conditioning (Chen et al. 2023): training feeds the model its own stop-gradient x_0 estimate on half the steps,
and every sampler passes the previous estimate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffuse import Denoiser, Schedule
from diffuse.condition import ConditionSpec
from diffuse.config import RunConfig, apply_overrides
from diffuse.denoiser import eps_to_x0, scales
from diffuse.nets.unet import UNet, UNetConfig
from diffuse.generate import generate
from diffuse.train import Trainer

from test_train import BASE


class Recorder(nn.Module):
    """A self-conditioned eps network (a fixed smooth function of x_t, t and the estimate) that records each call."""

    def __init__(self):
        super().__init__()
        self.condition_spec = ConditionSpec(self_condition=True)
        self.calls = []

    def forward(self, x, index, self_cond=None):
        prev = torch.zeros_like(x) if self_cond is None else self_cond
        out = torch.tanh(0.5 * x + 0.1 * prev) + 1e-4 * index.view(-1, 1, 1, 1)
        self.calls.append((x.clone(), index.clone(), self_cond, out))
        return out


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp-2m", "dpmpp-2s", "heun", "euler-ancestral"])
def test_every_sampler_passes_the_previous_estimate(sampler):
    """Call k + 1 receives exactly the x_0 that call k implied (eps -> x_0 at its own x_t and t), whatever the
    sampler's number of calls per step; the first call receives none."""
    schedule, net = Schedule.linear(T=100), Recorder()
    generate(Denoiser(net, schedule), 3, (1, 4, 4), sampler=sampler, steps=5, seed=0)
    assert net.calls[0][2] is None and len(net.calls) >= 5
    for (x, index, _, raw), (_, _, prev, _) in zip(net.calls, net.calls[1:]):
        alpha, sigma = scales(schedule, schedule.t_from_model_time(index.double()), x)
        torch.testing.assert_close(prev, eps_to_x0(x, raw, alpha, sigma))  # unclipped: what the network predicted


def test_each_half_of_guidance_sees_its_own_estimate():
    schedule = Schedule.linear(T=100)
    calls = []

    class Labelled(nn.Module):
        condition_spec = ConditionSpec(num_classes=3, self_condition=True)

        def forward(self, x, index, label, self_cond=None):
            calls.append((label.clone(), self_cond))
            prev = torch.zeros_like(x) if self_cond is None else self_cond
            return 0.3 * x + 0.1 * prev + 0.05 * label.view(-1, 1, 1, 1)

    generate(Denoiser(Labelled(), schedule), 2, (1, 2, 2), sampler="ddim", steps=3, labels=1, guidance=2.0, clip=False)
    # each step asks for [cond; null label] at once, which generate runs as two calls of n = 2 (SplitCalls)
    assert [c[0].tolist() for c in calls] == [[1, 1], [3, 3]] * 3
    assert calls[0][1] is None and calls[1][1] is None
    assert not torch.equal(calls[2][1], calls[3][1])  # the two halves' estimates differ: each got its own


def test_guidance_in_an_interval_keeps_the_conditional_estimate_across_its_switches():
    """With guidance only in a middle interval of noise levels, the calls go n, n, [n, n], [n, n], n: entering, the
    conditional call gets the estimate of the last unguided call and the null-label call none (zeros); leaving, the
    conditional call gets the conditional half's estimate, not nothing."""
    schedule = Schedule.linear(T=100)
    calls = []

    class Labelled(nn.Module):
        condition_spec = ConditionSpec(num_classes=3, self_condition=True)

        def forward(self, x, index, label, self_cond=None):
            prev = torch.zeros_like(x) if self_cond is None else self_cond
            out = 0.3 * x + 0.1 * prev + 0.05 * label.view(-1, 1, 1, 1)
            calls.append((x.clone(), index.clone(), label.clone(), self_cond, out))
            return out

    den = Denoiser(Labelled(), schedule)
    generate(den, 2, (1, 2, 2), sampler="ddim", steps=5, labels=1, clip=False)
    levels = [float(schedule.ve_sigma(schedule.t_from_model_time(c[1][0].double()))) for c in calls]
    calls.clear()
    interval = ((levels[2] + levels[3]) / 2, levels[1])  # steps 1 and 2 (0-based) in (lo, hi], the others outside
    generate(den, 2, (1, 2, 2), sampler="ddim", steps=5, labels=1, guidance=2.0, guidance_interval=interval, clip=False)
    assert [c[2].tolist() for c in calls] == [[1, 1], [1, 1], [3, 3], [1, 1], [3, 3], [1, 1], [1, 1]]

    def estimate(call):
        x, index, _, _, out = call
        alpha, sigma = scales(schedule, schedule.t_from_model_time(index.double()), x)
        return eps_to_x0(x, out, alpha, sigma)

    torch.testing.assert_close(calls[1][3], estimate(calls[0]))  # step 1, cond: step 0's estimate (n -> 2n)
    torch.testing.assert_close(calls[2][3], torch.zeros_like(calls[2][0]))  # step 1, null label: none yet
    torch.testing.assert_close(calls[3][3], estimate(calls[1]))  # step 2: each half its own
    torch.testing.assert_close(calls[4][3], estimate(calls[2]))
    torch.testing.assert_close(calls[5][3], estimate(calls[3]))  # step 3, unguided: the cond half's (2n -> n)
    torch.testing.assert_close(calls[6][3], estimate(calls[5]))


def test_the_unet_without_an_estimate_equals_zeros_and_checks_its_shape():
    torch.manual_seed(0)
    net = UNet(UNetConfig(channels=8, channel_mult=[1, 2], num_res_blocks=1, norm_groups=4, attention_resolutions=[],
                          dropout=0.0, self_condition=True), in_channels=1, image_size=8)
    with torch.no_grad():
        for p in net.conv_out.parameters():
            p.normal_()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 40.0])
    torch.testing.assert_close(net(x, t), net(x, t, self_cond=torch.zeros_like(x)), rtol=0, atol=0)
    assert not torch.allclose(net(x, t), net(x, t, self_cond=torch.ones_like(x)))  # the estimate is read
    with pytest.raises(ValueError, match="self_cond.*shape of x_t"):
        net(x, t, self_cond=torch.zeros(2, 1, 4, 4))


def cfg(*overrides):
    return apply_overrides(RunConfig(), BASE + ["model.self_condition=true", "model.dropout=0", *overrides])


def test_training_feeds_the_stop_gradient_estimate_on_half_the_steps(tmp_path, monkeypatch):
    trainer = Trainer(cfg(), tmp_path / "run", progress=False)
    forward, steps = trainer.model.forward, []

    def spy(x, t, **cond):
        steps[-1].append((torch.is_grad_enabled(), cond.get("self_cond")))
        out = forward(x, t, **cond)
        steps[-1][-1] += (x, t, out.detach())
        return out

    monkeypatch.setattr(trainer.model, "forward", spy)
    for _ in range(40):
        steps.append([])
        trainer.train_step()
    with_estimate = [s for s in steps if len(s) == 2]
    assert all(len(s) in (1, 2) for s in steps) and 10 <= len(with_estimate) <= 30  # Binomial(40, 1/2)
    for first, second in with_estimate:
        grad_enabled, prev, x, t, raw = first
        assert not grad_enabled and prev is None  # the estimate: no gradient, no estimate of its own
        assert second[0] and second[1] is not None
        alpha, sigma = scales(trainer.denoiser.schedule, trainer.denoiser.schedule.t_from_model_time(t.double()), x)
        torch.testing.assert_close(second[1], eps_to_x0(x, raw, alpha, sigma))  # the estimate is what the loss pass sees
        assert not second[1].requires_grad
    assert all(s[0][0] and s[0][1] is None for s in steps if len(s) == 1)


def test_exact_resume_with_self_conditioning(tmp_path):
    from test_train import check_exact_resume
    check_exact_resume(cfg("train.checkpoint_every=3", "model.dropout=0.2"), tmp_path)
