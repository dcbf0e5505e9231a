"""The video denoiser's objective (kinds/video.py): the observed-frame masks follow their stated distribution, the masked
loss is the stated equation and ignores observed frames, joint image examples are made of independent frames, the
draws are the same cut into processes' slices, training lowers the loss, and bad settings are refused by name.
(Exact resume and 2-process DDP: the "video" row of tests/test_kinds.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffuse.config import RunConfig, apply_overrides
from diffuse.kinds.video import draw_observed, masked_l_simple
from diffuse.tasks.video import condition_frames

TINY = ["data.source=moving_digits", "data.image_size=8", "data.frames=4", "data.crops=32", "data.digit_size=4",
        "data.velocity=1", "data.channels=1", "model.video=true", "model.video_observed=true", "model.channels=8",
        "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.norm_groups=4", "model.attention_resolutions=[4]",
        "model.dropout=0", "schedule.T=100", "train.batch_size=8", "train.sample_every=0", "train.mixed_precision=no",
        "train.lr=3e-3", "train.warmup_steps=0", "video.max_observed=2", "sample.n=2", "sample.steps=2"]


def config(*extra) -> RunConfig:
    return apply_overrides(RunConfig(), [*TINY, *extra])


def trainer(tmp_path, *extra, steps: int = 1):
    from diffuse.train import Trainer

    return Trainer(config(f"train.steps={steps}", *extra), tmp_path / "run", progress=False)


# --- the masks ----------------------------------------------------------------------------------------------------
def draws(n=40_000, frames=8, max_observed=4, p=0.25, patterns=("prediction", "backward", "interpolation", "scattered"),
          seed=0):
    return draw_observed(n, frames, max_observed, p, list(patterns), torch.Generator().manual_seed(seed))


def test_masks_follow_the_stated_distribution():
    obs = draws()
    k = obs.sum(1)
    assert abs((k == 0).float().mean() - 0.25) < 0.01  # p_unconditional
    given = k[k > 0]
    assert int(given.max()) == 4
    for count in range(1, 5):  # k ~ Uniform{1..max_observed}
        assert abs((given == count).float().mean() - 0.25) < 0.01
    assert bool((k < 8).all())


@pytest.mark.parametrize("pattern", ["prediction", "backward", "interpolation"])
def test_each_structured_pattern_gives_the_frames_it_names(pattern):
    obs = draws(n=2000, patterns=(pattern,))
    k = obs.sum(1, keepdim=True)
    f = torch.arange(8)
    want = {"prediction": f < k, "backward": f >= 8 - k, "interpolation": (f < (k + 1) // 2) | (f >= 8 - k // 2)}[pattern]
    assert torch.equal(obs, want & (k > 0))


def test_patterns_are_drawn_uniformly_and_scattered_frames_uniformly():
    obs = draws(patterns=("prediction", "backward"))
    given = obs[obs.any(1)]
    prefix = given[:, 0] & ~given[:, -1]  # k <= 4 < 8: a prefix never holds the last frame, a suffix never the first
    assert abs(prefix.float().mean() - 0.5) < 0.01
    assert bool((given[:, 0] ^ given[:, -1]).all())
    scattered = draws(patterns=("scattered",)).float().mean(0)  # each frame given with probability 0.75 * E[k] / 8
    assert torch.allclose(scattered, torch.full((8,), 0.75 * 2.5 / 8), atol=0.01)


def test_masks_are_a_function_of_the_seed():
    assert torch.equal(draws(n=64, seed=3), draws(n=64, seed=3))
    assert not torch.equal(draws(n=64, seed=3), draws(n=64, seed=4))


def test_masks_refuse_what_leaves_no_frame_to_generate():
    with pytest.raises(ValueError, match=r"video.max_observed must be in 1..7"):
        draws(n=4, max_observed=8)
    with pytest.raises(ValueError, match="video.patterns must name some of"):
        draws(n=4, patterns=("sideways",))


# --- the loss -----------------------------------------------------------------------------------------------------
class Fixed(nn.Module):
    """A network that returns a fixed output and keeps what it was called with."""

    def __init__(self, out):
        super().__init__()
        self.out = nn.Parameter(out.clone())

    def forward(self, x, t, **cond):
        self.seen = x.detach().clone(), dict(cond)
        return self.out


def toy(out, prediction="eps"):
    from diffuse.denoiser import Denoiser
    from diffuse.schedule import Schedule, ScheduleConfig

    return Denoiser(Fixed(out), Schedule.from_config(ScheduleConfig(T=10)), prediction=prediction)


def test_masked_loss_is_the_mean_over_generated_frames():
    g = torch.Generator().manual_seed(0)
    x0, eps, out = (torch.randn(2, 1, 4, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    observed = torch.tensor([[True, False, False, True], [False, False, False, False]])
    den = toy(out)
    loss = masked_l_simple(den, x0, t, eps, observed, cond={"observed": observed})
    want = torch.stack([((out[0, :, [1, 2]] - eps[0, :, [1, 2]]) ** 2).mean(), ((out[1] - eps[1]) ** 2).mean()])
    assert torch.allclose(loss, want, rtol=1e-6)
    seen, cond = den.net.seen  # the network's input: the observed frames clean, the others noisy, and the indicator
    x_t = den.schedule.q_sample(x0, t, eps)
    assert torch.equal(seen[0, :, [0, 3]], x0[0, :, [0, 3]]) and torch.equal(seen[0, :, [1, 2]], x_t[0, :, [1, 2]])
    assert torch.equal(seen[1], x_t[1]) and torch.equal(cond["observed"], observed)
    assert torch.equal(condition_frames(x_t, x0, observed), seen)
    # the output on observed frames changes neither the loss nor gets a gradient
    loss.sum().backward()
    grad = den.net.out.grad
    assert torch.equal(grad[0, :, [0, 3]], torch.zeros_like(grad[0, :, [0, 3]])) and bool((grad[0, :, 1:3] != 0).all())
    changed = out.clone()
    changed[0, :, [0, 3]] += 100
    assert torch.equal(masked_l_simple(toy(changed), x0, t, eps, observed), loss.detach())


def test_masked_loss_with_l1_and_an_x0_target():
    g = torch.Generator().manual_seed(1)
    x0, eps, out = (torch.randn(1, 2, 3, 2, 2, generator=g) for _ in range(3))
    observed = torch.tensor([[False, True, False]])
    loss = masked_l_simple(toy(out, "x0"), x0, torch.tensor([0.5], dtype=torch.float64), eps, observed, norm="l1")
    assert torch.allclose(loss, (out[:, :, [0, 2]] - x0[:, :, [0, 2]]).abs().mean().view(1), rtol=1e-6)


def test_masked_loss_of_a_bf16_output_adds_no_rounding_on_observed_frames():
    g = torch.Generator().manual_seed(2)
    x0, eps, out = (torch.randn(1, 1, 4, 2, 2, generator=g) for _ in range(3))
    observed = torch.tensor([[True, True, False, False]])
    loss = masked_l_simple(toy(out.bfloat16()), x0, torch.tensor([0.6], dtype=torch.float64), eps, observed)
    assert torch.allclose(loss, ((out.bfloat16().float() - eps)[:, :, 2:] ** 2).mean().view(1), rtol=1e-6)


def test_masked_loss_refuses_a_video_without_a_frame_to_generate():
    x = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="every frame of a video is observed"):
        masked_l_simple(toy(x), x, torch.tensor([0.5]), x, torch.ones(1, 2, dtype=torch.bool))


# --- the objective in the Trainer -----------------------------------------------------------------------------------
def test_a_video_config_trains_the_video_objective_as_a_denoiser_run(tmp_path):
    from diffuse.kinds import VideoObjective

    tr = trainer(tmp_path)
    assert isinstance(tr.objective, VideoObjective) and tr.cfg.model.kind == "denoiser"
    d = tr.objective.draw(8, torch.Generator().manual_seed(0))
    assert d["eps"].shape == (8, 1, 4, 8, 8) and d["t"].shape == (8,)  # one eps per video, one t per video
    saved = (tmp_path / "run" / "config.toml").read_text()
    assert "[video]" in saved and "max_observed = 2" in saved


def test_an_image_run_leaves_the_video_section_out(tmp_path):
    from diffuse.config import ConfigError
    from diffuse.kinds import check_config

    cfg = apply_overrides(RunConfig(), ["video.max_observed=4"])
    with pytest.raises(ConfigError, match=r"video.max_observed = 4 is ignored because only a video denoiser \(model.video "
                                          r"= true\) reads it"):
        check_config(cfg)


def test_draws_cut_into_process_slices_give_the_slices_of_one_process(tmp_path):
    tr = trainer(tmp_path, "video.p_images=0.5")
    obj = tr.objective
    x, cond = obj.dataset.batch(torch.arange(8))
    d = obj.draw(8, torch.Generator().manual_seed(5))
    whole = obj.inputs(x, dict(cond), dict(d))
    for rows in (slice(0, 4), slice(4, 8)):  # two processes' slices
        part = obj.inputs(x[rows], {}, {k: v[rows] if v.ndim else v for k, v in d.items()})
        assert torch.equal(part[0], whole[0][rows])
        for key in ("observed", "independent"):
            assert torch.equal(part[1][key], whole[1][key][rows])


def test_image_examples_are_independent_frames_of_other_videos(tmp_path):
    tr = trainer(tmp_path, "video.p_images=0.5")
    obj = tr.objective
    x, _ = obj.dataset.batch(torch.arange(8))
    d = obj.draw(8, torch.Generator().manual_seed(1))
    images = d["images"]
    assert 0 < int(images.sum()) < 8
    x_in, cond, _ = obj.inputs(x, {}, dict(d))
    assert torch.equal(cond["independent"], images[:, None].expand(8, 4))
    assert not bool(cond["observed"][images].any())  # an image example has no given frame
    assert torch.equal(x_in[~images], x[~images])  # the videos as they were
    for b in images.nonzero()[:, 0].tolist():
        sources, frames = d["image_sources"][b], d["image_frames"][b]
        assert len(set(sources.tolist())) > 1  # frames of different videos
        for f in range(4):
            video, _ = obj.dataset.batch(sources[f:f + 1])
            assert torch.equal(x_in[b, :, f], video[0, :, int(frames[f])])


def test_training_lowers_the_masked_loss_on_a_fixed_batch(tmp_path):
    tr = trainer(tmp_path, "video.p_images=0.25", steps=40)
    obj = tr.objective
    x, cond = obj.dataset.batch(torch.arange(8))
    d = obj.draw(8, torch.Generator().manual_seed(7))
    x, cond, d = obj.inputs(x, cond, d)

    def loss():
        with torch.no_grad():
            return float(obj.losses(x, cond, d, 0)["main"].mean())

    before = loss()
    tr.fit()
    assert loss() < 0.7 * before


def test_preview_is_a_contact_sheet_of_unconditional_samples(tmp_path):
    from PIL import Image

    from diffuse.visualize import contact_sheet

    tr = trainer(tmp_path)
    path = tr.objective.preview(tr)
    x, _ = tr.objective.fixed_samples(tr, 2)
    assert x.shape == (2, 1, 4, 8, 8)
    assert Image.open(path).size == contact_sheet(x).size


def test_fid_during_training_is_per_frame(tmp_path):
    from diffuse.metrics import extract_features, feature_statistics, frechet_distance
    from diffuse.nets.unet import fold_frames
    from diffuse.train import Trainer

    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.Flatten())  # 18 features of an 8x8 frame

    tr = Trainer(config("train.steps=1", "train.fid_every=1", "train.fid_samples=30"), tmp_path / "run", progress=False,
                 features=lambda spec, device: features)
    record, score = tr.objective.evaluate(tr)
    real, _ = tr.objective.dataset.batch(torch.arange(8))  # ceil(30 / 4) = 8 videos, 32 frames
    x, _ = tr.objective.fixed_samples(tr, 8)
    fake = ((fold_frames(x).clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    want = frechet_distance(*feature_statistics(extract_features(fold_frames(real), features)),
                            *feature_statistics(extract_features(fake, features)))
    assert record == {"fid": score} and score == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["latent.autoencoder=runs/ae"], "a video denoiser works on pixels"),
    (["task.kind=superres", "model.cond_channels=1"], 'task.kind = "superres" makes a condition image'),
    (["train.loss=hybrid", "model.learned_variance=true"], 'train.loss = "hybrid": a video denoiser trains the masked'),
    (["model.self_condition=true"], "model.self_condition: a video denoiser's x_0 estimate"),
    (["train.augment_p=0.1"], "train.augment_p = 0.1: the non-leaking augmentation transforms images"),
    (["model.video_observed=false"], r"video.max_observed = 2 gives frames clean, which the network must be told: set "
                                     r"model.video_observed = true"),
    (["video.max_observed=0"], "model.video_observed adds the observed-frames channel, and video.max_observed = 0"),
    (["video.max_observed=4"], r"video.max_observed = 4 must be in 0..3 \(data.frames - 1"),
    (["video.p_unconditional=1.5"], r"video.p_unconditional must be a probability in \[0, 1\]"),
    (["video.patterns=[]"], "video.patterns must name one or more distinct patterns"),
    (["video.p_images=1.0"], r"video.p_images must be in \[0, 1\)"),
    (["video.p_images=0.5", "model.class_conditional=true"], "video.p_images makes examples of frames from different"),
    (["model.kind=classifier"], 'model.kind = "classifier" has no video version: set model.kind = \'denoiser\''),
    (["model.video=false", "model.video_observed=false", "video.max_observed=0"],
     "data.frames = 4 makes videos .* set model.video = true"),
    (["data.frames=1"], "set data.frames to the frames of each example"),
])
def test_settings_that_do_not_apply_to_video_are_refused_by_name(extra, message):
    from diffuse.kinds import check_config

    with pytest.raises(ValueError, match=message):
        check_config(config(*extra))


def test_a_video_network_on_images_is_refused():
    from diffuse.kinds import check_config

    cfg = apply_overrides(RunConfig(), ["data.source=mnist", "model.video=true"])
    with pytest.raises(ValueError, match='model.video = true trains on videos, and data.source = "mnist" holds images; '
                                         'set data.source = "moving_digits" or "video_folder" and data.frames'):
        check_config(cfg)


def test_the_shipped_config_trains_a_step(tmp_path):
    from pathlib import Path

    from diffuse.config import load_config
    from diffuse.kinds import VideoObjective, check_config
    from diffuse.train import Trainer

    cfg = load_config(Path(__file__).parents[1] / "configs" / "video_digits.toml")
    check_config(cfg)
    assert (cfg.data.frames, cfg.data.image_size, cfg.video.max_observed, cfg.video.max_span) == (8, 32, 4, 64)
    cfg.train.steps = 1
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    assert isinstance(tr.objective, VideoObjective)
    tr.fit()
    assert tr.step == 1 and 0 < tr.history[-1][1] < 10
