"""Training on frame subsets of a longer window (video.max_span; FDM, Harvey et al. 2022): the subsets follow the law
kinds.video.draw_frame_subsets states (every subset's probability, each position's inclusion), moving digits render a
frame at any position exactly as a longer video does, folder clips span the window, the objective takes the drawn
frames and tells the network their relative frame_index, max_span = data.frames trains bit for bit as consecutive
frames, and bad values are refused by name. (Exact resume and DDP: the "video_span" row of tests/test_kinds.py.)"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from diffuse.config import ConfigError, RunConfig, apply_overrides
from diffuse.data import DataConfig, MovingDigits, VideoFolder, load_dataset
from diffuse.kinds.video import draw_frame_subsets, frame_subset_extents
from diffuse.visualize import save_video

TINY = ["data.source=moving_digits", "data.image_size=8", "data.frames=4", "data.crops=32", "data.digit_size=4",
        "data.velocity=1", "data.channels=1", "model.video=true", "model.video_observed=true", "model.channels=8",
        "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.norm_groups=4", "model.attention_resolutions=[4]",
        "model.dropout=0", "schedule.T=100", "train.batch_size=8", "train.sample_every=0", "train.mixed_precision=no",
        "train.lr=3e-3", "train.warmup_steps=0", "video.max_observed=2", "sample.n=2", "sample.steps=2"]


def config(*extra) -> RunConfig:
    return apply_overrides(RunConfig(), [*TINY, *extra])


def trainer(path, *extra, steps: int = 1):
    from diffuse.train import Trainer

    return Trainer(config(f"train.steps={steps}", *extra), path, progress=False)


# --- the law of the subsets ---------------------------------------------------------------------------------------
def extent_weight(L: int, F: int, M: int) -> float:
    """P(L), written out: (1 / (L - 1)) / sum_{k = F..M} 1 / (k - 1)."""
    return (1 / (L - 1)) / sum(1 / (k - 1) for k in range(F, M + 1))


def subset_probability(S: tuple[int, ...], F: int, M: int) -> float:
    """The stated law of one sorted subset S of 0..M - 1: P(L) for its extent, 1 / (M - L + 1) for its first frame, one
    over the C(L - 2, F - 2) choices of its inner frames."""
    L = S[-1] - S[0] + 1
    return extent_weight(L, F, M) / (M - L + 1) / math.comb(L - 2, F - 2) if L >= F else 0.0


def inclusion_probability(p: int, F: int, M: int) -> float:
    """P(position p is drawn): over the extent L and first frame o, p is the first, the last, or one of the L - 2 inner
    candidates of which F - 2 are chosen."""
    total = 0.0
    for L in range(F, M + 1):
        for o in range(M - L + 1):
            inside = (F - 2) / (L - 2) if o < p < o + L - 1 else 0.0
            total += extent_weight(L, F, M) / (M - L + 1) * (float(p in (o, o + L - 1)) + inside)
    return total


def test_every_subset_has_its_stated_probability():
    F, M, n = 4, 7, 200_000
    law = {S: subset_probability(S, F, M) for S in itertools.combinations(range(M), F)}
    assert sum(law.values()) == pytest.approx(1, abs=1e-12) and min(law.values()) > 0  # every subset can be drawn
    pos = draw_frame_subsets(n, F, M, torch.Generator().manual_seed(0))
    assert pos.dtype == torch.int64 and pos.shape == (n, F)
    assert bool((pos[:, 1:] > pos[:, :-1]).all()) and int(pos.min()) >= 0 and int(pos.max()) < M  # sorted, distinct
    counts = {}
    for row in map(tuple, pos.tolist()):
        counts[row] = counts.get(row, 0) + 1
    assert set(counts) <= set(law)
    for S, p in law.items():  # each of the 35 subsets within 5 standard errors of its probability
        assert abs(counts.get(S, 0) / n - p) < 5 * math.sqrt(p * (1 - p) / n), S


def test_each_position_is_drawn_with_its_exact_probability_and_extents_are_log_uniform():
    F, M, n = 8, 32, 100_000  # configs/video_digits.toml's
    pos = draw_frame_subsets(n, F, M, torch.Generator().manual_seed(1))
    assert bool((pos[:, 1:] > pos[:, :-1]).all())
    freq = torch.zeros(M, dtype=torch.float64).index_add_(0, pos.reshape(-1), torch.ones(n * F, dtype=torch.float64)) / n
    exact = torch.tensor([inclusion_probability(p, F, M) for p in range(M)], dtype=torch.float64)
    assert float(exact.sum()) == pytest.approx(F)  # F frames per draw
    se = (exact * (1 - exact) / n).sqrt()
    assert bool(((freq - exact).abs() < 5 * se).all()), (freq - exact) / se
    assert exact[0] < F / M < exact[M // 2]  # not a uniform subset (F / M each): short extents fall anywhere inside
    extents = pos[:, -1] - pos[:, 0] + 1
    want = frame_subset_extents(F, M)
    got = torch.bincount(extents - F, minlength=M - F + 1).double() / n
    assert torch.allclose(want, torch.tensor([extent_weight(L, F, M) for L in range(F, M + 1)], dtype=torch.float64))
    assert bool(((got - want).abs() < 5 * (want * (1 - want) / n).sqrt()).all())
    assert float(got[0]) == pytest.approx(0.0906, abs=0.005)  # ~9 % of the examples are 8 consecutive frames


def test_a_window_of_the_frames_themselves_is_arange_and_the_draws_are_counted():
    g = torch.Generator().manual_seed(3)
    assert torch.equal(draw_frame_subsets(5, 4, 4, g), torch.arange(4).expand(5, 4))
    B, F, M = 6, 4, 10
    g, h = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    draw_frame_subsets(B, F, M, g)
    torch.rand(B, generator=h, dtype=torch.float64), torch.rand(B, generator=h, dtype=torch.float64)
    torch.rand(B, M - 2, generator=h)  # the stated B + B + B (M - 2) numbers, whatever their values
    assert torch.equal(g.get_state(), h.get_state())
    for frames, span in ((1, 4), (5, 4)):
        with pytest.raises(ValueError, match="frame subsets take 2 <= frames <= span"):
            draw_frame_subsets(2, frames, span, g)


# --- the data: frames at any position ----------------------------------------------------------------------------------
S, D = 24, 12  # a small canvas, a big digit: bounces every few frames


def digits_cfg(**kw) -> DataConfig:
    return DataConfig(**{**dict(source="moving_digits", image_size=S, digit_size=D, frames=4, crops=16, velocity=4), **kw})


@pytest.mark.parametrize("bounce", ["deterministic", "stochastic"])
def test_a_frame_at_any_position_is_that_frame_of_a_longer_video(bounce):
    short = MovingDigits(digits_cfg(bounce=bounce, digits_per_video=2))
    long = MovingDigits(digits_cfg(bounce=bounce, digits_per_video=2, frames=40))
    window = MovingDigits(digits_cfg(bounce=bounce, digits_per_video=2), span=16)
    assert window.shape == (1, 16, S, S) and window.frames == 4
    bounced = False
    for i in range(6):
        tr = long.trajectory(i)
        bounced |= bool((np.diff(np.sign(tr.velocities), axis=0) != 0).any())
        consecutive = long.render(tr)  # (40, S, S)
        at = [0, 7, 8, 23, 39, 3]
        assert np.array_equal(short.frames_at(i, at), consecutive[at])  # exact, past the short video's 4 frames
        assert np.array_equal(window.batch(torch.tensor([i]))[0][0, 0].numpy(), consecutive[:16] * 2 - 1)
        assert np.array_equal(short.batch(torch.tensor([i]))[0][0, 0].numpy(), consecutive[:4] * 2 - 1)
        assert np.array_equal(short.trajectory(i, 40).positions, tr.positions)
    assert bounced, "the videos must bounce within 40 frames for the test to test the physics"
    with pytest.raises(ValueError, match="frame positions must be one or more indices >= 0"):
        short.frames_at(0, [2, -1])
    with pytest.raises(ValueError, match=r"span = 3 must be 0 or at least data.frames = 4"):
        MovingDigits(digits_cfg(), span=3)


def marked_video(T: int) -> torch.Tensor:
    """(1, T, S, S) in [-1, 1] on the 8-bit grid, frame t carrying 20 t in pixel (0, 0)."""
    x = MovingDigits(digits_cfg(frames=T)).batch(torch.tensor([0]))[0][0]
    x = ((x + 1) * 127.5).round() / 127.5 - 1
    for t in range(T):
        x[:, t, 0, 0] = t * 20 / 127.5 - 1
    return x


def frame_numbers(x: torch.Tensor) -> list:
    return ((x[:, 0, :, 0, 0] + 1) * 127.5 / 20).round().int().tolist()


def test_folder_clips_span_the_window_at_the_stride(tmp_path, monkeypatch):
    save_video(marked_video(10), tmp_path / "a.gif")
    for stride, span, want in ((1, 4, [[0, 1, 2, 3], [4, 5, 6, 7]]), (2, 3, [[0, 2, 4]]), (1, 2, [[0, 1], [2, 3], [4, 5],
                                                                                                     [6, 7], [8, 9]])):
        data = VideoFolder(tmp_path, frames=2, image_size=S, channels=1, frame_stride=stride, span=span)
        assert data.shape == (1, span, S, S) and data.pure_batches
        assert frame_numbers(data.batch(torch.arange(len(data)))[0]) == want
    kept = VideoFolder(tmp_path, frames=2, image_size=S, channels=1, span=4)
    monkeypatch.setattr("diffuse.data.video.MAX_IN_MEMORY_BYTES", 0)
    lazy = VideoFolder(tmp_path, frames=2, image_size=S, channels=1, span=4)
    assert not lazy.pure_batches and torch.equal(lazy.batch(torch.tensor([1, 0]))[0], kept.batch(torch.tensor([1, 0]))[0])
    with pytest.raises(ValueError, match=r"video .*a.gif has 10 frame\(s\), fewer than one clip of video.max_span = 6 \(the "
                                         r"window data.frames = 2 are drawn from\) taken every data.frame_stride = 2 "
                                         r"frame\(s\) spans \(11\); lower video.max_span or data.frame_stride"):
        VideoFolder(tmp_path, frames=2, image_size=S, channels=1, frame_stride=2, span=6)
    with pytest.raises(ValueError, match=r"span = 1 must be 0 or at least data.frames = 2"):
        VideoFolder(tmp_path, frames=2, image_size=S, channels=1, span=1)
    cfg = DataConfig(source="video_folder", path=str(tmp_path), image_size=S, channels=1, frames=2, frame_stride=2)
    assert load_dataset(cfg, span=5).shape == (1, 5, S, S)


# --- the objective ------------------------------------------------------------------------------------------------------
def test_the_objective_takes_the_drawn_frames_and_tells_their_relative_index(tmp_path):
    tr = trainer(tmp_path / "run", "video.p_images=0.5", "video.max_span=10")
    obj = tr.objective
    idx = torch.arange(8)
    x, cond = obj.dataset.batch(idx)
    assert x.shape == (8, 1, 10, 8, 8) and obj.space.shape == (1, 4, 8, 8)
    d = obj.draw(8, torch.Generator().manual_seed(5))
    pos, images = d["positions"], d["images"]
    assert 0 < int(images.sum()) < 8 and int(pos[:, -1].max()) >= 4  # frames beyond the first F are drawn
    x_in, c, _ = obj.inputs(x, dict(cond), dict(d))
    assert x_in.shape == (8, 1, 4, 8, 8)
    assert torch.equal(c["frame_index"], pos - pos[:, :1]) and bool((c["frame_index"][:, 0] == 0).all())
    for b in range(8):
        if images[b]:  # independent frames of any frame of other windows
            for f in range(4):
                video, _ = obj.dataset.batch(d["image_sources"][b, f:f + 1])
                assert torch.equal(x_in[b, :, f], video[0, :, int(d["image_frames"][b, f])])
        else:  # frame f is the frame at pos[b, f] of video b: rendered there by the dataset itself
            want = torch.from_numpy(obj.dataset.frames_at(int(idx[b]), pos[b].tolist())) * 2 - 1
            assert torch.equal(x_in[b, 0], want)
    assert int(d["image_frames"].max()) >= 4  # image frames from the whole window
    assert not bool(c["observed"][images].any()) and c["observed"].shape == (8, 4)
    for rows in (slice(0, 4), slice(4, 8)):  # two processes' slices
        part = obj.inputs(x[rows], {}, {k: v[rows] if v.ndim else v for k, v in d.items()})
        assert torch.equal(part[0], x_in[rows]) and torch.equal(part[1]["frame_index"], c["frame_index"][rows])


def test_the_frames_draw_comes_last_and_leaves_the_others_alone(tmp_path):
    plain = trainer(tmp_path / "a", "video.p_images=0.25").objective.draw(8, torch.Generator().manual_seed(9))
    span = trainer(tmp_path / "b", "video.p_images=0.25", "video.max_span=12").objective.draw(8, torch.Generator().manual_seed(9))
    assert set(span) == set(plain) | {"positions"}
    for key, v in plain.items():
        if key != "image_frames":  # drawn over the window: 0..11 instead of 0..3
            assert torch.equal(span[key], v), key


def test_a_window_of_data_frames_trains_bit_for_bit_as_consecutive_frames(tmp_path):
    runs = [trainer(tmp_path / name, "video.p_images=0.25", *extra, steps=2) for name, extra in
            (("plain", []), ("span", ["video.max_span=4"]))]
    for tr in runs:
        tr.fit()
    plain, span = (tr.model.state_dict() for tr in runs)
    assert [h for _, h in runs[0].history] == [h for _, h in runs[1].history]
    for key, w in plain.items():
        assert torch.equal(span[key], w), key
    assert any(not torch.equal(w, runs[0].ema.model.state_dict()[k]) for k, w in plain.items() if w.is_floating_point())


@pytest.mark.parametrize("extra, error, message", [
    (["video.max_span=3"], ValueError, r"video.max_span = 3 must be 0 \(consecutive frames\) or at least data.frames = 4"),
    (["video.max_span=2.5"], ConfigError, r"video.max_span must be an integer, got 2.5"),
    (["video.max_span=true"], ConfigError, r"video.max_span must be an integer, got True"),
])
def test_bad_spans_are_refused_by_name(extra, error, message):
    from diffuse.kinds import check_config

    with pytest.raises(error, match=message):
        check_config(config(*extra))


def test_an_image_run_or_data_without_windows_is_refused(tmp_path):
    from diffuse.kinds import check_config
    from diffuse.train import Trainer

    with pytest.raises(ConfigError, match=r"video.max_span = 8 is ignored because only a video denoiser"):
        check_config(apply_overrides(RunConfig(), ["video.max_span=8"]))
    cfg = config("train.steps=1", "video.max_span=8")
    with pytest.raises(ValueError, match=r"video.max_span = 8 draws frames from windows of 8 frames and the data yield "
                                         r"examples of 4: load them with data.load_dataset\(cfg.data, span=8\)"):
        Trainer(cfg, tmp_path / "run", progress=False, dataset=load_dataset(cfg.data))
    with pytest.raises(ValueError, match=r"video.max_span = 3 takes windows .* at least data.frames = 4"):
        load_dataset(cfg.data, span=3)
    with pytest.raises(ValueError, match=r"video.max_span = 8 takes windows of frames from videos"):
        load_dataset(dataclasses.replace(RunConfig().data, source="mnist"), span=8)
