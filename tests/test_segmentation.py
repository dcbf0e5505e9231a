"""Tests for segmentation from diffusion features (Baranchuk et al. 2022): the decoder activations against an oracle
built from forward hooks (guided-diffusion's output_blocks), the noise levels read at equal log-SNR on every process,
the features against a hand-built pipeline, the pixel ensemble against M separate datasetGAN MLPs (forward, running
statistics and one Adam step), the vote and its Jensen-Shannon divergence by hand, the score against scikit-learn, and
the "segmenter" kind end to end on a tiny MNIST diffusion run."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from diffuse.config import RunConfig, apply_overrides, load_config
from diffuse.denoiser import Denoiser
from diffuse.nets.unet import UNet, UNetConfig
from diffuse.schedule import EDM, Schedule, ScheduleConfig
from diffuse.nets.ensemble import PixelEnsemble
from diffuse.segmentation import (confusion, iou, mean_iou, per_pixel, pixel_coordinates, unet_features,
                                  upsample, vote, vp_linear_times)


def tiny_unet(seed: int = 0) -> UNet:
    """The brief's tiny U-Net on 16x16 one-channel images, every weight (the zero-initialised ones too) perturbed, so
    no block is the identity and no activation is zero; eval mode (no dropout)."""
    torch.manual_seed(seed)
    net = UNet(UNetConfig(channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[8], norm_groups=4),
               in_channels=1, image_size=16)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def hooked_output_blocks(net: UNet, x, t) -> list[torch.Tensor]:
    """What guided-diffusion's output_blocks[i] output, i = 0, 1, ..., read with forward hooks during net.forward: block
    i of an expanding level is [ResBlock, AttentionBlock (where the level attends), Upsample (the level's last block,
    but the top level's)], so its output is its attention's (an Identity where the level does not attend), or the
    level's upsample's for its last block."""
    seen, handles = [], []
    for level, up in zip(net.up, net.upsample):
        for i, attn in enumerate(level.attns):
            last = i == len(level.attns) - 1 and not isinstance(up, nn.Identity)
            handles.append((up if last else attn).register_forward_hook(lambda m, a, out: seen.append(out.detach().clone())))
    try:
        net(x, t)
    finally:
        for h in handles:
            h.remove()
    return seen


# --- the U-Net's decoder blocks -------------------------------------------------------------------------------------

def test_decoder_features_are_guided_diffusions_output_blocks():
    net = tiny_unet()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 1, 16, 16, generator=g), torch.tensor([3.0, 700.0])
    want = hooked_output_blocks(net, x, t)
    layout = net.decoder_layout()
    # 2 levels of num_res_blocks + 1 = 2 blocks; the lower level (width 16, side 8) ends upsampled to 16
    assert layout == [(16, 8), (16, 16), (8, 16), (8, 16)]
    assert len(want) == len(layout)
    with torch.no_grad():
        every = net.decoder_features(x, t, list(range(len(layout))))
    assert sorted(every) == list(range(len(layout)))
    for b, (width, side) in enumerate(layout):
        assert every[b].shape == (2, width, side, side) == want[b].shape, b
        assert torch.equal(every[b], want[b]), f"decoder block {b} differs from output_blocks[{b}]"
        with torch.no_grad():
            alone = net.decoder_features(x, t, [b])  # each block asked alone: the same activation, and only it
        assert list(alone) == [b] and torch.equal(alone[b], want[b])
    # the head on the last block's activation is the network's output
    with torch.no_grad():
        head = net.conv_out(F.silu(net.norm_out(every[len(layout) - 1])))
        assert torch.equal(head, net(x, t))


def test_decoder_features_stop_after_the_last_block_asked_and_refuse_other_blocks():
    net = tiny_unet()
    calls = []
    net.up[1].blocks[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        net.decoder_features(torch.zeros(1, 1, 16, 16), torch.zeros(1), [1, 0])
    assert calls == []  # blocks 0 and 1 are the lower level's: the top level never ran
    for bad in ([4], [-1], [], [0, 7]):
        with pytest.raises(ValueError, match=r"0\.\.3"):
            net.decoder_features(torch.zeros(1, 1, 16, 16), torch.zeros(1), bad)


# --- noise levels -----------------------------------------------------------------------------------------------------

def test_vp_linear_times_is_the_identity_on_ddpms_linear_schedule():
    t = [0.05, 0.15, 0.25, 0.5, 0.999]
    got = vp_linear_times(t, Schedule.linear(1000))
    assert got.dtype == torch.float64 and torch.equal(got, torch.tensor(t, dtype=torch.float64))


@pytest.mark.parametrize("schedule", [Schedule.from_config(ScheduleConfig(kind="cosine")),
                                      Schedule.from_config(ScheduleConfig(kind="linear", T=100, beta_start=1e-3, beta_end=0.2)),
                                      Schedule.from_config(ScheduleConfig(kind="scaled_linear")),
                                      Schedule.from_config(ScheduleConfig(kind="vp_cosine")),
                                      Schedule.from_config(ScheduleConfig(kind="flow")),
                                      Schedule.from_config(ScheduleConfig(kind="edm"))],
                         ids=["cosine", "linear100", "scaled_linear", "vp_cosine", "flow", "edm"])
def test_vp_linear_times_read_the_same_log_snr_on_every_process(schedule):
    t = torch.tensor([0.05, 0.15, 0.25, 0.6], dtype=torch.float64)
    # DDPM's linear schedule at step n = 1000 t by hand: alphabar_n = prod_{s <= n} (1 - beta_s)
    alphabar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[(t * 1000).round().long() - 1]
    want = (alphabar / (1 - alphabar)).log()
    mapped = vp_linear_times(t.tolist(), schedule)
    assert mapped.shape == (4,)
    torch.testing.assert_close(schedule.log_snr(mapped), want, rtol=0, atol=1e-6)
    assert bool((mapped > 0).all() and (mapped <= 1).all())


def test_vp_linear_times_stop_at_the_top_of_a_process_that_never_gets_that_noisy():
    weak = Schedule.linear(100)  # DDPM's betas over 100 steps: alphabar_100 = 0.36, log-SNR -0.57 at most
    with pytest.warns(UserWarning, match=r"segment.times \[0.6\]: this run's process does not reach"):
        mapped = vp_linear_times([0.05, 0.6], weak)  # 0.6 of the 1000-step schedule is log-SNR -4.7: out of reach
    assert float(mapped[1]) == weak.t_top == 1.0
    assert float(weak.log_snr(mapped[0])) == pytest.approx(float(Schedule.linear(1000).log_snr(0.05)), abs=1e-6)


@pytest.mark.parametrize("times", [[0.0], [1.0], [1.5], [-0.1], [0.1, 1.2], []])
def test_vp_linear_times_refuse_times_outside_the_open_unit_interval(times):
    with pytest.raises(ValueError, match=r"segment\.times.*\(0, 1\)"):
        vp_linear_times(times, Schedule.linear(1000))


# --- the features ----------------------------------------------------------------------------------------------------

def test_unet_features_are_the_noised_images_decoder_blocks_upsampled_time_major():
    net = tiny_unet()
    denoiser = Denoiser(net, Schedule.linear(1000), prediction="v")
    g = torch.Generator().manual_seed(2)
    z, noise = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1, torch.randn(1, 1, 16, 16, generator=g)
    times, blocks = torch.tensor([0.05, 0.25], dtype=torch.float64), [0, 2]
    got = unet_features(denoiser, z, times, blocks, noise, 32)
    alphabar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    parts = []
    for n in (50, 250):  # step n of 1000; the network's time input is its 0-based index n - 1
        a, s = alphabar[n - 1].sqrt().float(), (1 - alphabar[n - 1]).sqrt().float()
        with torch.no_grad():
            found = net.decoder_features(a * z + s * noise, torch.full((3,), n - 1.0), blocks)
        parts += [F.interpolate(found[b], size=(32, 32), mode="bilinear", align_corners=False) for b in blocks]
    want = torch.cat(parts, 1)
    assert got.shape == (3, 2 * (16 + 8), 32, 32) == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # at the image's own side no block is resized
    same = unet_features(denoiser, z, times[:1], [1, 3], noise, 16)
    with torch.no_grad():
        found = net.decoder_features(alphabar[49].sqrt().float() * z + (1 - alphabar[49]).sqrt().float() * noise,
                                     torch.full((3,), 49.0), [1, 3])
    torch.testing.assert_close(same, torch.cat([found[1], found[3]], 1), rtol=1e-5, atol=1e-5)


class Recorder(nn.Module):
    """A network that records the input it is called with, by forward and by decoder_features."""

    def __init__(self, net: UNet):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x, t, **cond):
        self.inputs.append(("forward", x.clone(), t.clone()))
        return self.net(x, t, **cond)

    def decoder_features(self, x, t, blocks, **cond):
        self.inputs.append(("decoder", x.clone(), t.clone()))
        return self.net.decoder_features(x, t, blocks, **cond)


def test_an_edm_network_is_probed_at_c_in_x_t_over_alpha_as_its_output_sees_it():
    net = Recorder(tiny_unet())
    schedule = EDM()
    denoiser = Denoiser(net, schedule, prediction="edm", sigma_data=0.5)
    g = torch.Generator().manual_seed(3)
    z, noise = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1, torch.randn(1, 1, 16, 16, generator=g)
    times = vp_linear_times([0.15], schedule)
    unet_features(denoiser, z, times, [0], noise, 16)
    x_t = schedule.q_sample(z, times.expand(2), noise.expand_as(z))
    with torch.no_grad():
        denoiser.output(x_t, times[0])
    (kind_a, x_a, t_a), (kind_b, x_b, t_b) = net.inputs
    assert (kind_a, kind_b) == ("decoder", "forward")
    sigma = float(schedule.sigma(times[0]))  # alpha = 1 for EDM: x_t = z + sigma eps
    c_in = 1 / math.sqrt(sigma**2 + 0.5**2)  # Karras et al. 2022, table 1
    torch.testing.assert_close(x_a, c_in * (z + sigma * noise), rtol=1e-5, atol=1e-6)
    assert torch.equal(x_a, x_b) and torch.equal(t_a, t_b)
    torch.testing.assert_close(t_a, torch.full((2,), 250 * math.log(sigma), dtype=torch.float32))
    # and network_input is that call
    x_in, t_in = denoiser.network_input(x_t, times[0])
    assert torch.equal(x_in, x_b) and torch.equal(t_in, t_b)


def test_upsample_per_pixel_and_pixel_coordinates():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    out = upsample([a, b], 8)
    assert torch.equal(out[:, 3:], b)
    assert torch.equal(out[:, :3], F.interpolate(a, size=(8, 8), mode="bilinear", align_corners=False))
    feats = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    masks = torch.tensor([[[0, 255], [1, 2]], [[2, 2], [255, 0]]])
    rows, labels = per_pixel(feats, masks, ignore=255)
    # image-major, then row-major: pixel (n, y, x) is row 4 n + 2 y + x, its features feats[n, :, y, x]
    keep = [(0, 0, 0), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 1)]
    assert labels.tolist() == [0, 1, 2, 2, 2, 0]
    assert torch.equal(rows, torch.stack([feats[n, :, y, x] for n, y, x in keep]))
    assert per_pixel(feats)[0].shape == (8, 3) and per_pixel(feats)[1] is None
    pc = pixel_coordinates(torch.zeros(1, 1, 3, 5))
    assert torch.equal(pc[0, 1, 2], torch.linspace(-1, 1, 5)) and torch.equal(pc[0, 2, :, 4], torch.linspace(-1, 1, 3))


# --- the pixel ensemble ----------------------------------------------------------------------------------------------

def datasetgan_mlps(ens: PixelEnsemble) -> list[nn.Sequential]:
    """M separate datasetGAN pixel classifiers (Linear, ReLU, BatchNorm1d, Linear, ReLU, BatchNorm1d, Linear) holding
    copies of the ensemble's members' weights and BatchNorm state."""
    out = []
    hidden = [bn.num_features // ens.members for bn in ens.norms]
    for m in range(ens.members):
        layers = []
        for k, w in enumerate(ens.weights):
            lin = nn.Linear(w.shape[1], w.shape[2])
            with torch.no_grad():
                lin.weight.copy_(w[m].T)
                lin.bias.copy_(ens.biases[k][m])
            layers.append(lin)
            if k < len(ens.norms):
                h, src = hidden[k], ens.norms[k]
                bn = nn.BatchNorm1d(h)
                with torch.no_grad():
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(bn, name).copy_(getattr(src, name)[m * h:(m + 1) * h])
                layers += [nn.ReLU(), bn]
        out.append(nn.Sequential(*layers))
    return out


def test_the_ensemble_is_m_separate_datasetgan_mlps_in_train_and_eval_mode():
    torch.manual_seed(5)
    ens = PixelEnsemble(6, 4, members=3, hidden=(16, 8))
    assert [tuple(w.shape) for w in ens.weights] == [(3, 6, 16), (3, 16, 8), (3, 8, 4)]
    mlps = datasetgan_mlps(ens)
    g = torch.Generator().manual_seed(6)
    for _ in range(3):  # train mode: batch statistics, running statistics updated
        f = torch.randn(40, 6, generator=g) * 3 + 1
        got = ens(f)
        assert got.shape == (3, 40, 4)
        for m, mlp in enumerate(mlps):
            torch.testing.assert_close(got[m], mlp(f), rtol=1e-5, atol=1e-6)
    for k, bn in enumerate(ens.norms):
        h = bn.num_features // 3
        for m, mlp in enumerate(mlps):
            mine = mlp[3 * k + 2]
            torch.testing.assert_close(bn.running_mean[m * h:(m + 1) * h], mine.running_mean)
            torch.testing.assert_close(bn.running_var[m * h:(m + 1) * h], mine.running_var)
    ens.eval()
    f = torch.randn(7, 6, generator=g)
    got = ens(f)
    for m, mlp in enumerate(mlps):
        torch.testing.assert_close(got[m], mlp.eval()(f), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0], got[1])  # the members differ


def test_one_adam_step_on_the_summed_loss_is_one_adam_step_of_each_mlp_on_its_own():
    torch.manual_seed(7)
    ens = PixelEnsemble(5, 3, members=4, hidden=(8, 6))
    mlps = datasetgan_mlps(ens)
    start = [w.detach().clone() for w in ens.weights]
    g = torch.Generator().manual_seed(8)
    f, y = torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
    opt = torch.optim.AdamW(ens.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):  # two steps: the second uses Adam's moments
        opt.zero_grad()
        logits = ens(f)
        sum(F.cross_entropy(logits[m], y) for m in range(4)).backward()
        opt.step()
    for mlp in mlps:
        own = torch.optim.AdamW(mlp.parameters(), lr=1e-2, weight_decay=0.1)
        for _ in range(2):
            own.zero_grad()
            F.cross_entropy(mlp(f), y).backward()
            own.step()
    after = datasetgan_mlps(ens)
    for m in range(4):
        for (name, want), got in zip(mlps[m].state_dict().items(), after[m].state_dict().values()):
            if not name.endswith("num_batches_tracked"):  # datasetgan_mlps copies the statistics, not the counter
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda e: f"member {m} {name}: {e}")
    assert all(float((w.detach() - w0).abs().min()) > 0 for w, w0 in zip(ens.weights, start))  # every weight moved


def test_the_ensemble_refuses_empty_widths_and_one_class():
    for args in [(0, 3, 2, (8,)), (4, 3, 0, (8,)), (4, 3, 2, ()), (4, 3, 2, (8, 0))]:
        with pytest.raises(ValueError, match="width"):
            PixelEnsemble(*args)
    with pytest.raises(ValueError, match="2 classes"):
        PixelEnsemble(4, 1)


# --- the vote --------------------------------------------------------------------------------------------------------

def js_by_hand(logits: torch.Tensor) -> torch.Tensor:
    p = logits.double().softmax(-1)  # (M, P, C)
    entropy = lambda q: -(q * q.log()).sum(-1)  # noqa: E731
    return entropy(p.mean(0)) - entropy(p).mean(0)


def test_vote_takes_the_majority_ties_to_the_lower_class():
    big = 10.0
    # 4 members, 3 pixels, 4 classes; each member's argmax per pixel:
    #   pixel 0: 2, 2, 3, 2 -> 2; pixel 1: 3, 1, 1, 3 -> tie 1 / 3 -> 1; pixel 2: 0, 3, 2, 1 -> 4-way tie -> 0
    picks = torch.tensor([[2, 3, 0], [2, 1, 3], [3, 1, 2], [2, 3, 1]])
    logits = F.one_hot(picks, 4).float() * big + torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(9))
    labels, unc = vote(logits)
    assert labels.dtype == torch.int64 and labels.tolist() == [2, 1, 0]
    assert unc.shape == (3,)
    # the most divided pixel is the most uncertain
    assert unc[2] > unc[1] > unc[0]


def test_vote_uncertainty_is_the_jensen_shannon_divergence():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(5, 50, 6, generator=g) * 2
    _, unc = vote(logits)
    torch.testing.assert_close(unc.double(), js_by_hand(logits), rtol=0, atol=1e-5)
    assert bool((unc <= math.log(5) + 1e-6).all())
    # identical members: 0
    same = logits[:1].expand(5, 50, 6)
    assert float(vote(same)[1].abs().max()) < 1e-5
    # members each certain of a different class: log M, the bound
    certain = F.one_hot(torch.arange(4).view(4, 1).expand(4, 3), 6).float() * 40
    torch.testing.assert_close(vote(certain)[1], torch.full((3,), math.log(4)), rtol=0, atol=1e-4)


# --- the score -------------------------------------------------------------------------------------------------------

def test_confusion_and_iou_agree_with_scikit_learn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(11)
    C = 5
    target = rng.integers(0, 4, (3, 10, 10))  # class 4 is neither present nor predicted ...
    pred = rng.integers(0, 4, (3, 10, 10))
    target[rng.random(target.shape) < 0.2] = 255  # ... and a fifth of the pixels are ignored
    pred[0, 0, :3] = 3
    target[0, 0, :3] = 255  # predictions on ignored pixels count for nothing
    conf = confusion(torch.from_numpy(pred), torch.from_numpy(target), C, ignore=255)
    keep = target != 255
    want = sklearn.confusion_matrix(target[keep], pred[keep], labels=list(range(C)))
    assert conf.dtype == torch.int64 and np.array_equal(conf.numpy(), want)
    values = iou(conf)
    want_iou = sklearn.jaccard_score(target[keep], pred[keep], labels=list(range(4)), average=None)
    np.testing.assert_allclose(values[:4].numpy(), want_iou, rtol=1e-12)
    assert math.isnan(values[4])
    assert mean_iou(conf) == pytest.approx(float(np.mean(want_iou)), rel=1e-12)
    # a class predicted but never present counts, with IoU 0
    pred2 = pred.copy()
    pred2[1, 5, 5], target[1, 5, 5] = 4, 0
    conf2 = confusion(torch.from_numpy(pred2), torch.from_numpy(target), C)
    assert float(iou(conf2)[4]) == 0.0
    keep = target != 255
    want2 = sklearn.jaccard_score(target[keep], pred2[keep], labels=list(range(5)), average=None)
    assert mean_iou(conf2) == pytest.approx(float(np.mean(want2)), rel=1e-12)


# --- the segmenter kind, end to end ------------------------------------------------------------------------------------

DIFFUSION = ["train.steps=20", "train.batch_size=16", "train.warmup_steps=5", "train.log_every=10",
             "train.checkpoint_every=10", "train.time_limit=0", "train.mixed_precision=no", "model.channels=8",
             "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.attention_resolutions=[14]",
             "model.norm_groups=4"]  # configs/mnist.toml made tiny: checkpoints at steps 10 and 20


def segmenter(*more: str) -> RunConfig:
    return apply_overrides(RunConfig(), [
        "model.kind=segmenter", "data.source=mnist", "data.image_size=28", "data.channels=1", "segment.members=4",
        "segment.train_images=10", "segment.test_images=20", "train.steps=30", "train.batch_size=256", "train.lr=1e-3",
        "train.warmup_steps=0", "train.log_every=10", "train.sample_every=0",
        "train.checkpoint_every=30", "train.mixed_precision=no", *more])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny MNIST diffusion run (configs/mnist.toml, 20 steps) and a segmenter trained 30 steps on its features."""
    from diffuse.train import train

    base = tmp_path_factory.mktemp("segment")
    source = train(apply_overrides(load_config("configs/mnist.toml"), DIFFUSION), base / "diffusion", progress=False)
    seg = train(segmenter(f"segment.source={json.dumps(str(source))}"), base / "segmenter", progress=False)
    return Path(source), Path(seg)


def cache_key(path: Path) -> dict:
    """The key a stage's cache was written under (stages.cached)."""
    return json.loads(bytes(load_file(path)["source"].tolist()).decode())


@pytest.mark.slow
def test_the_features_are_a_stage_cached_under_the_source_checkpoint(runs, tmp_path):
    from diffuse.kinds.segmentation import Features, load_labelled, split
    from diffuse.train import Trainer, train

    source, seg = runs
    cfg = load_config(seg / "config.toml")
    assert cfg.segment.source == str(source.resolve()) and cfg.segment.source_step == 20  # pinned: the newest
    key = cache_key(seg / "features.safetensors")
    assert key["source"] == str(source.resolve()) and key["step"] == 20 and len(key["weights"]) == 64
    # the cache holds the features of the training images, in split's order
    cached_features = load_file(seg / "features.safetensors")["features"]
    data = load_labelled(cfg)
    train_idx, _ = split(len(data), 10, 20, cfg.train.seed)
    assert key["images"] == train_idx.tolist()
    torch.testing.assert_close(cached_features, Features(cfg, "cpu")(data.images[train_idx]), rtol=1e-5, atol=1e-5)

    # resumed, the run reads its cache and never writes it
    again = tmp_path / "again"
    shutil.copytree(seg, again)
    before = os.stat(again / "features.safetensors")
    trainer = Trainer(segmenter(f"segment.source={json.dumps(str(source))}", "train.steps=35"), again, progress=False)
    assert trainer.step == 30
    trainer.fit()
    assert trainer.step == 35
    after = os.stat(again / "features.safetensors")  # a rewrite is atomic: a new file (inode) and time
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert load_config(again / "config.toml").segment.source_step == 20  # still pinned, though source holds newer

    # another source checkpoint is another key: the same cache file is recomputed, not trusted
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy2(seg / "features.safetensors", other / "features.safetensors")
    train(segmenter(f"segment.source={json.dumps(str(source))}", "segment.source_step=10", "train.steps=1"), other,
          progress=False)
    new_key = cache_key(other / "features.safetensors")
    assert new_key["step"] == 10 and new_key["weights"] != key["weights"]
    assert {k: v for k, v in new_key.items() if k not in ("step", "weights")} == \
           {k: v for k, v in key.items() if k not in ("step", "weights")}
    recomputed = load_file(other / "features.safetensors")["features"]
    assert recomputed.shape == cached_features.shape and not torch.allclose(recomputed, cached_features)
    at_10 = Features(load_config(other / "config.toml"), "cpu")(data.images[train_idx])
    torch.testing.assert_close(recomputed, at_10, rtol=1e-5, atol=1e-5)


def test_split_holds_out_the_same_images_for_every_seed():
    from diffuse.kinds.segmentation import split

    tests = set()
    for seed in range(5):
        train, test = split(100, 12, 30, seed)
        assert len(train) == 12 and len(test) == 30 and len(set(train.tolist())) == 12
        assert not set(train.tolist()) & set(test.tolist())
        tests.add(tuple(test.tolist()))
    assert len(tests) == 1
    assert split(100, 12, 30, 0)[0].tolist() != split(100, 12, 30, 1)[0].tolist()  # the seed picks the training images
    train, test = split(100, 0, 30, 3)  # 0: every image not held out
    assert sorted(train.tolist() + test.tolist()) == list(range(100))
    with pytest.raises(ValueError, match=r"segment\.train_images = 80 and segment\.test_images = 30.*110.*100"):
        split(100, 80, 30, 0)


@pytest.mark.slow
def test_a_trained_run_segments_as_its_objective_predicted(runs):
    from diffuse.checkpoint import checkpoint_folders
    from diffuse.data.segmentation import DIGIT_CLASSES
    from diffuse.kinds.segmentation import SegmentationRun
    from diffuse.segmentation import score
    from diffuse.train import Trainer

    source, seg = runs
    state = json.loads((checkpoint_folders(seg)[30] / "state.json").read_text())
    assert state["class_names"] == DIGIT_CLASSES and state["num_classes"] == 11
    run = SegmentationRun(seg)
    held = run.held_out()
    trainer = Trainer(segmenter(f"segment.source={json.dumps(str(source))}"), seg, progress=False)  # resumed at its end
    assert trainer.step == 30
    objective = trainer.objective
    assert torch.equal(held.images, objective.labelled.images[objective.test_idx])
    labels, unc = run.segment(held.images)
    want_labels, want_unc = objective.predict(held.images)
    assert labels.shape == (20, 28, 28) and torch.equal(labels, want_labels)
    torch.testing.assert_close(unc, want_unc)
    conf = score(lambda x: objective.predict(x)[0], held, 11)
    scored = run.evaluate()
    assert scored["miou"] == pytest.approx(mean_iou(conf)) and scored["images"] == 20
    assert scored["pixel_accuracy"] == pytest.approx(float(conf.diagonal().sum() / conf.sum()))


@pytest.mark.slow
def test_a_source_that_cannot_give_the_features_is_refused_before_anything_is_written(runs, tmp_path):
    from diffuse.train import Trainer, train

    source, seg = runs
    ae = train(apply_overrides(RunConfig(), [
        "model.kind=autoencoder", "data.source=mnist", "data.image_size=28", "data.channels=1", "train.steps=1",
        "train.batch_size=4", "train.sample_every=0", "train.mixed_precision=no", "autoencoder.channels=[8, 16]",
        "autoencoder.latent_channels=2", "autoencoder.num_res_blocks=1", "autoencoder.norm_groups=4",
        "autoencoder.disc_channels=8", "autoencoder.disc_layers=1"]), tmp_path / "ae", progress=False)
    src = f"segment.source={json.dumps(str(source))}"
    cases = [([f"segment.source={json.dumps(str(ae))}"], r"segment\.source = .* holds a autoencoder run"),
             ([f"segment.source={json.dumps(str(seg))}"], r"segment\.source = .* holds a segmenter run"),
             ([src, "segment.blocks=[0, 4]"], r"segment\.blocks = \[0, 4\].*0\.\.3"),
             ([src, "segment.times=[1.5]"], r"segment\.times.*\(0, 1\)"),
             ([f"segment.source={json.dumps(str(tmp_path / 'nothing'))}"], r"segment\.source.*no run")]
    for i, (more, match) in enumerate(cases):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            Trainer(segmenter(*more), tmp_path / f"r{i}", progress=False)
        assert not (tmp_path / f"r{i}").exists()
    plain = apply_overrides(load_config("configs/mnist.toml"), [*DIFFUSION, "segment.members=3"])
    with pytest.raises(ValueError, match=r"segment\.members = 3 is ignored"):
        Trainer(plain, tmp_path / "plain", progress=False)
    assert not (tmp_path / "plain").exists()


def test_the_pixel_baseline_learns_the_ink_on_the_digits(tmp_path):
    """Pixels and their position (segment.features = "pixels") on sklearn's 8x8 digits. A pixel's label is background
    where its value is <= 0 and 1 + the digit where it is > 0 (data.segmentation.digit_masks), so ink against background
    is a threshold of one feature, which the MLPs can learn from 20 images; which digit the ink belongs to is not in one
    pixel's value and position, so the digit classes are not asserted. Trained 200 steps, the background IoU and the IoU
    of "any digit" against background (the confusion matrix folded to 2 x 2) must be near 1, and the mIoU above that of
    predicting background everywhere (its background IoU over 11 classes)."""
    from diffuse.kinds.segmentation import SegmentationRun
    from diffuse.segmentation import score
    from diffuse.train import train

    run_dir = train(apply_overrides(RunConfig(), [
        "model.kind=segmenter", "data.source=digits", "data.image_size=8", "data.channels=1", "segment.features=pixels",
        "segment.members=3", "segment.train_images=20", "segment.test_images=50", "train.steps=200",
        "train.batch_size=255", "train.lr=1e-3", "train.warmup_steps=0", "train.log_every=50",
        "train.sample_every=0", "train.checkpoint_every=200", "train.mixed_precision=no"]), tmp_path / "pixels",
        progress=False)
    run = SegmentationRun(run_dir)
    held = run.held_out()
    conf = score(lambda x: run.segment(x)[0], held, 11).double()
    values = iou(conf.long())
    ink = conf[1:, 1:].sum()  # ink predicted as some digit
    binary_iou = ink / (conf[1:].sum() + conf[0, 1:].sum())
    trivial = float(conf[0].sum() / conf.sum()) / 11  # all background: IoU = the background fraction, 0 for the digits
    assert float(values[0]) > 0.95, values  # 1.0 when written
    assert float(binary_iou) > 0.95, conf
    assert mean_iou(conf.long()) > trivial


PIXELS = ["model.kind=segmenter", "data.source=digits", "data.image_size=8", "data.channels=1", "segment.features=pixels",
          "segment.members=2", "segment.hidden=[8, 4]", "segment.train_images=4", "segment.test_images=4",
          "train.batch_size=16", "train.lr=1e-2", "train.warmup_steps=0", "train.steps=1", "train.sample_every=0",
          "train.mixed_precision=no"]


# The ensemble's BatchNorm normalises by the statistics of the batch it sees, so micro-batches would take another
# step than the whole batch: the kind is not separable, and train.grad_accumulation > 1 is refused naming it.
def test_micro_batches_take_the_whole_batchs_step_or_are_refused(tmp_path):
    from diffuse.checkpoint import load_checkpoint
    from diffuse.train import Trainer

    def weights(run):
        return load_checkpoint(run).tensors["model"]

    whole = Trainer(apply_overrides(RunConfig(), PIXELS), tmp_path / "whole", progress=False).fit()
    try:
        halves = Trainer(apply_overrides(RunConfig(), [*PIXELS, "train.grad_accumulation=2"]), tmp_path / "halves",
                         progress=False).fit()
    except ValueError as e:  # refused: fine, if it names the setting
        assert "train.grad_accumulation" in str(e)
        return
    want, got = weights(whole), weights(halves)
    for key in want:
        if want[key].is_floating_point():
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_feature_memory_is_checked_before_it_is_spent():
    """The reference's users ran out of RAM (ddpm-segmentation #11: ~210 GB for 50 images at 256 px, 8448 values per
    pixel); the features' size is computed first, held three times while they become rows: 3 x 50 x 256^2 x 8448 x 4
    bytes = 309.4 GiB, refused naming the fixes; MemAvailable is read from /proc/meminfo."""
    from diffuse.kinds.segmentation import available_memory, check_memory
    check_memory(20, 28, 1008, available=2**30)  # 190 MB: fits in 1 GiB
    with pytest.raises(MemoryError, match=r"309\.4 GiB.*segment\.train_images.*segment\.blocks"):
        check_memory(50, 256, 8448, available=64 * 2**30)
    with pytest.raises(MemoryError):
        check_memory(20, 28, 1008, available=3 * 20 * 28 * 28 * 1008 * 4 - 1)  # one byte short
    free = available_memory()
    assert free is None or 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_each_member_trains_on_its_own_rows_of_the_batch():
    """Row j of a batch trains member j mod M: the ensemble on (M, P, dim) rows equals each datasetGAN MLP on its own
    rows (train mode: BatchNorm over its own rows only), and the kind's loss is the sum of the members' mean
    cross-entropies on them."""
    from diffuse.kinds.segmentation import SegmentationObjective
    torch.manual_seed(2)
    ens = PixelEnsemble(5, 3, members=4, hidden=(8, 6))
    mlps = datasetgan_mlps(ens)
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    got = ens(x.view(6, 4, 5).transpose(0, 1))  # (M, 6, C)
    for m, mlp in enumerate(mlps):
        torch.testing.assert_close(got[m], mlp(x[m::4]), rtol=1e-5, atol=1e-6)
    obj = SegmentationObjective.__new__(SegmentationObjective)
    obj.cfg, obj.nets = apply_overrides(RunConfig(), ["model.kind=segmenter", "segment.members=4"]), {"model": ens}
    want = sum(F.cross_entropy(mlp(x[m::4]), y[m::4]) for m, mlp in enumerate(mlps))
    torch.testing.assert_close(obj.losses(x, {"label": y}, {}, 0)["main"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_run_refuses_a_source_whose_pinned_weights_changed_and_bad_ensemble_settings(runs, tmp_path):
    """The head was trained on the source's checkpoint of a given sha256: if that checkpoint is rewritten (the source
    trained again into its folder), `diffuse segment` and `eval` refuse instead of reading other features. A batch that
    does not split into the members, a clip that would couple them, and scoring a run that holds nothing out are
    refused naming the setting."""
    from diffuse.checkpoint import CHECKPOINTS, MANIFEST
    from diffuse.kinds.segmentation import SegmentationRun
    from diffuse.train import train
    source, seg = runs
    copy_source, copy_seg = tmp_path / "diffusion", tmp_path / "segmenter"
    shutil.copytree(source, copy_source)
    cfg = load_config(seg / "config.toml")
    step = cfg.segment.source_step
    trained = train(segmenter(f"segment.source={json.dumps(str(copy_source))}", f"segment.source_step={step}",
                          "train.steps=2", "train.checkpoint_every=2"), copy_seg, progress=False)
    SegmentationRun(trained)  # as trained: fine
    manifest = copy_source / CHECKPOINTS / f"step_{step:08d}" / MANIFEST
    manifest.write_text(manifest.read_text() + " ")  # another checkpoint under the same step
    with pytest.raises(ValueError, match="now holds other weights"):
        SegmentationRun(trained)
    with pytest.raises(ValueError, match="segment.members = 4"):
        train(segmenter(f"segment.source={json.dumps(str(source))}", "train.batch_size=254"), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="train.grad_clip"):
        train(segmenter(f"segment.source={json.dumps(str(source))}", "train.grad_clip=0.5"), tmp_path / "c", progress=False)
    none_held = train(segmenter("segment.features=pixels", "segment.test_images=0", "train.steps=2",
                                "train.checkpoint_every=2"), tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="--real FOLDER"):
        SegmentationRun(none_held).evaluate()
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_conditional_source_trained_without_dropout_is_refused(tmp_path):
    """Features are read with the null label (an image has none); a class-conditional run trained without label dropout
    never trained that null label, so it is refused naming train.condition_dropout."""
    from diffuse.kinds.segmentation import check_source
    src = apply_overrides(load_config("configs/mnist.toml"), ["model.class_conditional=true"])
    cfg = segmenter("segment.source=x")
    with pytest.raises(ValueError, match=r"train.condition_dropout = \{label = 0.1\}"):
        check_source(cfg, src, tmp_path)
    check_source(cfg, apply_overrides(src, ["train.condition_dropout={label = 0.1}"]), tmp_path)


@pytest.mark.slow
def test_saved_configs_leave_out_the_sections_their_kind_ignores(runs):
    """A run folder's config.toml holds only what its kind reads: a denoiser's has no [segment] (nor [autoencoder]), a
    segmenter's no [schedule], [sample], [task], [autoencoder] or [latent]; so a later change of those defaults can never
    make an old run refuse to load (check_unused) or to resume (the [segment] defaults of runs saved while this issue
    was built made exactly that happen)."""
    from diffuse.kinds import check_config
    source, seg = runs
    diffusion_text, segmenter_text = (source / "config.toml").read_text(), (seg / "config.toml").read_text()
    assert "[model]" in diffusion_text and "[segment]" not in diffusion_text and "[autoencoder]" not in diffusion_text
    assert "[segment]" in segmenter_text and not any(f"[{s}]" in segmenter_text
                                                     for s in ("schedule", "sample", "task", "autoencoder", "latent"))
    for run in runs:
        check_config(load_config(run / "config.toml"))


def test_the_end_to_end_unet_head_segments_with_its_own_argmax(tmp_path):
    """segment.head = "unet" (the end-to-end baseline): a U-Net of [model] from the images to class logits, trained on
    the labelled images themselves; a trained run's labels are its logits' argmax, with zero uncertainty (one member),
    and evaluate() scores them like the ensemble's."""
    from diffuse.kinds.segmentation import SegmentationRun
    from diffuse.segmentation import confusion, mean_iou
    from diffuse.train import train
    cfg = apply_overrides(RunConfig(), [
        "model.kind=segmenter", "data.source=digits", "data.image_size=8", "data.channels=1", "segment.head=unet",
        "segment.train_images=12", "segment.test_images=10", "model.channels=8", "model.channel_mult=[1, 2]",
        "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.norm_groups=4", "model.dropout=0",
        "train.batch_size=4", "train.steps=5", "train.lr=1e-3", "train.warmup_steps=0", "train.sample_every=0",
        "train.checkpoint_every=5", "train.mixed_precision=no"])
    run = SegmentationRun(train(cfg, tmp_path / "unet", progress=False))
    test = run.held_out()
    labels, uncertainty = run.segment(test.images)
    logits = run.head(test.images, torch.zeros(len(test)))
    assert torch.equal(labels, logits.argmax(1)) and torch.equal(uncertainty, torch.zeros_like(uncertainty))
    assert run.evaluate()["miou"] == pytest.approx(mean_iou(confusion(labels, test.masks, run.num_classes)))


def test_a_too_small_pool_and_a_diffusers_source_are_refused_naming_the_fix(tmp_path):
    """split names how the pool grows where it can (the shapes: data.crops), nothing where it cannot (the bundled
    digits); a diffusers model folder as segment.source is refused naming why (its U-Net has no blocks by index)."""
    from diffuse.kinds.segmentation import source_path, split
    with pytest.raises(ValueError, match=r"need 110 labelled images, and the data hold 100; lower them \(or raise data.crops\)"):
        split(100, 10, 100, 0, "raise data.crops")
    with pytest.raises(ValueError, match=r"hold 100; lower them$"):
        split(100, 10, 100, 0)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="diffusers model folder"):
        source_path(segmenter(f"segment.source={json.dumps(str(tmp_path))}"))
