"""Videos as data (data/video.py) and as files (visualize.save_video, contact sheets): the moving digits' physics, their
determinism and split, a video folder read back from what save_video wrote, and the refusals with their fixes."""

import dataclasses
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.config import ConfigError, RunConfig, check_unused
from diffuse.data import DataConfig, MovingDigits, VideoFolder, load_dataset, read_video
from diffuse.data.video import TEST_EVERY
from diffuse.speed import dataset_bytes
from diffuse.visualize import contact_sheet, save_contact_sheet, save_video

S, D, F = 24, 12, 10  # canvas, digit, frames: tiny, so the digits hit the walls often


def digits_cfg(**kw) -> DataConfig:
    base = dict(source="moving_digits", image_size=S, digit_size=D, frames=F, crops=64, velocity=4)
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def two_digits():
    return load_dataset(digits_cfg(digits_per_video=2))


def test_moving_digits_shape_range_and_protocol(two_digits):
    data = two_digits
    x, cond = data.batch(torch.arange(5))
    assert x.shape == (5, 1, F, S, S) == (5, *data.shape) and cond == {}
    assert (data.num_classes, data.condition_keys, data.pure_batches, len(data)) == (0, (), False, 64)
    assert x.min() == -1 and x.max() == 1  # black background, digits summed and clipped to white
    assert dataset_bytes(data) is None  # computed per batch: speed.hold_on_device leaves it on the host
    rgb = load_dataset(digits_cfg(channels=3)).batch(torch.arange(2))[0]
    assert rgb.shape == (2, 3, F, S, S) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_frames_are_the_digits_pasted_at_their_trajectory(two_digits):
    """Each frame is the sum of the two digit images at the recorded top-left positions, clipped to 1."""
    data = two_digits
    x = data.batch(torch.tensor([7]))[0][0, 0]  # (F, S, S)
    traj = data.trajectory(7)
    for t in range(F):
        canvas = torch.zeros(S, S)
        for k, digit in enumerate(traj.digits):
            r, c = traj.positions[t, k]
            canvas[r:r + D, c:c + D] += torch.tensor(data.glyphs[digit])
        assert torch.allclose(x[t], canvas.clamp(max=1) * 2 - 1, atol=1e-6)


def _check_physics(data: MovingDigits, n_videos: int) -> tuple[int, int]:
    """Assert the laws of every video; return (bounces seen, velocity components seen changing without a wall)."""
    free, v = S - D, data.velocity
    bounces = 0
    for i in range(n_videos):
        tr = data.trajectory(i)
        p, vel = tr.positions, tr.velocities
        assert p.min() >= 0 and p.max() <= free  # the digit's box stays wholly inside the canvas
        assert (np.abs(vel) <= v).all() and (vel != 0).any(-1).all()
        for t in range(F - 1):
            assert (p[t + 1] == np.clip(p[t] + vel[t], 0, free)).all()  # straight lines, stopped at a wall
            low = (p[t] + vel[t] <= 0) & (vel[t] < 0)
            high = (p[t] + vel[t] >= free) & (vel[t] > 0)
            wall = low | high
            hit = wall.any(-1)  # (n,) digits that bounced this frame
            bounces += int(hit.sum())
            assert (vel[t + 1][~hit] == vel[t][~hit]).all()  # constant velocity between bounces
            if data.bounce == "deterministic":
                assert (vel[t + 1] == np.where(wall, -vel[t], vel[t])).all()  # the component at the wall reflects
            else:  # redrawn: pointing away from each wall it hit, magnitude 1..v
                assert (vel[t + 1][low] >= 1).all() and (vel[t + 1][high] <= -1).all()
    return bounces


def test_deterministic_bounce_physics(two_digits):
    assert _check_physics(two_digits, 64) > 50  # the walls are hit often on this small canvas


def test_stochastic_bounce_physics_and_redraws():
    data = load_dataset(digits_cfg(bounce="stochastic"))
    assert _check_physics(data, 64) > 25
    redrawn = 0  # the stochastic rule really draws anew: some bounce leaves a velocity that is not the reflection
    for i in range(64):
        tr = data.trajectory(i)
        for t in range(F - 1):
            if (tr.velocities[t + 1] != tr.velocities[t]).any() and (tr.velocities[t + 1] != -tr.velocities[t]).any():
                redrawn += 1
    assert redrawn > 10


def test_videos_are_a_pure_function_of_seed_split_and_index(two_digits):
    data = two_digits
    a = data.batch(torch.tensor([3, 9, 3]))[0]
    assert torch.equal(a[0], a[2])  # the same index twice in a batch
    again = load_dataset(digits_cfg(digits_per_video=2))
    assert torch.equal(again.batch(torch.tensor([9, 3]))[0], a[[1, 0]])  # another instance, another order
    assert not torch.equal(a[0], a[1])
    other_seed = MovingDigits(digits_cfg(digits_per_video=2), seed=1)
    assert not torch.equal(other_seed.batch(torch.tensor([3]))[0][0], a[0])


def test_split_holds_digit_instances_apart_and_keeps_every_class(two_digits):
    train, test = two_digits, MovingDigits(digits_cfg(digits_per_video=2), split="test")
    assert len(train.pool) == 4000 and len(test.pool) == 1000 and not set(train.pool) & set(test.pool)
    assert (test.pool % TEST_EVERY == TEST_EVERY - 1).all()
    assert np.bincount(train.labels[train.pool]).tolist() == [400] * 10  # every class in both splits
    assert np.bincount(test.labels[test.pool]).tolist() == [100] * 10
    used_train = {int(d) for i in range(64) for d in train.trajectory(i).digits}
    used_test = {int(d) for i in range(64) for d in test.trajectory(i).digits}
    assert used_train <= set(train.pool.tolist()) and used_test <= set(test.pool.tolist())
    assert not torch.equal(train.batch(torch.tensor([0]))[0], test.batch(torch.tensor([0]))[0])
    tr = test.trajectory(5)
    assert (tr.labels == test.labels[tr.digits]).all()


def test_out_of_range_index_is_refused(two_digits):
    with pytest.raises(IndexError, match=r"video index 64 is out of range: the dataset holds 64 videos \(0..63\)"):
        two_digits.batch(torch.tensor([0, 64]))
    assert len(list(iter(load_dataset(digits_cfg(crops=3))))) == 3  # iteration stops at the end (IndexError)


# --- writing and reading video files ---------------------------------------------------------------------------------
def _gray_video(n: int = 2) -> torch.Tensor:
    """n moving-digit videos (n, 1, F, S, S) with their pixel values exactly on the 8-bit grid."""
    x = load_dataset(digits_cfg()).batch(torch.arange(n))[0]
    return ((x + 1) * 127.5).round() / 127.5 - 1


def test_gif_round_trip_is_exact_for_grayscale(tmp_path):
    x = _gray_video(1)[0]  # (1, F, S, S)
    save_video(x, tmp_path / "videos" / "a.gif", fps=8)
    frames = read_video(tmp_path / "videos" / "a.gif")
    assert frames.shape == (F, S, S, 3)
    back = VideoFolder(tmp_path / "videos", frames=F, image_size=S, channels=1)
    assert len(back) == 1 and back.pure_batches
    assert torch.equal(back.batch(torch.tensor([0]))[0][0], x)


def test_gif_keeps_repeated_frames(tmp_path):
    """Pillow stores identical consecutive frames as one longer frame; the reader counts it on the GIF's clock."""
    x = _gray_video(1)[0]
    held = torch.cat([x[:, :3], x[:, 2:3], x[:, 2:3], x[:, 3:]], dim=1)  # frame 2 shown three times
    save_video(held, tmp_path / "held.gif", fps=12)
    assert Image.open(tmp_path / "held.gif").n_frames == F  # stored as F frames, one three times as long
    assert read_video(tmp_path / "held.gif").shape[0] == F + 2


def test_mp4_round_trip_within_codec_tolerance(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    x = _gray_video(1)[0]
    save_video(x, tmp_path / "a.mp4", fps=8)
    back = VideoFolder(tmp_path, frames=F, image_size=S, channels=1).batch(torch.tensor([0]))[0][0]
    assert back.shape == x.shape
    err = (back - x).abs()
    assert err.mean() < 0.02 and err.max() < 0.2  # H.264 at quality 9: here 0.1 levels of 255 on average, 5 at most


def test_folder_clips_stride_labels_and_resize(tmp_path):
    """Clips of F frames every `stride` frames tile each file; sub-folders are classes; frames are resized."""
    x = _gray_video(2)  # (2, 1, F, S, S)
    marked = x.clone()
    for t in range(F):  # frame t carries its index in pixel (0, 0), exactly representable in a GIF
        marked[:, :, t, 0, 0] = t * 20 / 127.5 - 1
    save_video(marked[0], tmp_path / "cats" / "a.gif")
    save_video(marked[1], tmp_path / "dogs" / "b.gif")
    (tmp_path / "notes.txt").write_text("not a video")
    with pytest.warns(UserWarning, match=r"ignored 1 file\(s\) that are not videos .*: notes.txt"):
        data = VideoFolder(tmp_path, frames=2, image_size=S, channels=1, frame_stride=3)
    # F = 10 frames, clips of 2 every 3rd frame: frames (0, 3), (6, 9) of each file
    assert len(data) == 4 and data.num_classes == 2 and data.condition_keys == ("label",)
    x2, cond = data.batch(torch.arange(4))
    assert cond["label"].tolist() == [0, 0, 1, 1]
    index = ((x2[:, 0, :, 0, 0] + 1) * 127.5 / 20).round().int()
    assert index.tolist() == [[0, 3], [6, 9], [0, 3], [6, 9]]
    assert torch.allclose(x2[1, :, 1], marked[0, :, 9], atol=1e-6)
    (tmp_path / "notes.txt").unlink()
    small = VideoFolder(tmp_path, frames=F, image_size=12, channels=3)
    assert small.batch(torch.tensor([1]))[0].shape == (1, 3, F, 12, 12)


def test_lazy_folder_equals_the_one_in_memory(tmp_path, monkeypatch):
    save_video(_gray_video(1)[0], tmp_path / "a.gif")
    kept = VideoFolder(tmp_path, frames=4, image_size=S, channels=1, frame_stride=1)
    monkeypatch.setattr("diffuse.data.video.MAX_IN_MEMORY_BYTES", 0)
    lazy = VideoFolder(tmp_path, frames=4, image_size=S, channels=1, frame_stride=1)
    assert not lazy.pure_batches and kept.pure_batches and len(lazy) == len(kept) == 2
    idx = torch.tensor([1, 0, 1])
    assert torch.equal(lazy.batch(idx)[0], kept.batch(idx)[0])


def test_contact_sheet_rows_columns_and_frame_numbers(tmp_path):
    x = _gray_video(2)  # (2, 1, F, S, S)
    sheet = contact_sheet(x, scale=1)
    pad = 2
    assert sheet.width == F * (S + pad) + pad and sheet.height > 2 * (S + pad) + pad  # + the row of frame numbers
    pixels = np.asarray(sheet)
    r, c = pad + (S + pad), pad + 3 * (S + pad)  # video 1, frame 3
    assert np.array_equal(pixels[r:r + S, c:c + S], ((x[1, 0, 3] + 1) * 127.5).round().numpy().astype(np.uint8))
    labels = pixels[2 * (S + pad) + pad:]
    assert (labels < 128).any() and (labels[:, :pad + S] < 128).any()  # a frame number is written under column 0
    save_contact_sheet(x, tmp_path / "sheet.png")
    assert Image.open(tmp_path / "sheet.png").size == (2 * sheet.width, 2 * (sheet.height - 14) + 14)


# --- refusals ------------------------------------------------------------------------------------------------------
def test_damaged_files_empty_folder_and_short_videos_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no video files \(.gif, .mp4.*\) in .*empty \(it is empty\).*Add GIF or MP4"):
        VideoFolder(empty, frames=2, image_size=S, channels=1)
    (empty / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"it holds 1 other file\(s\), e.g. a.txt"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            VideoFolder(empty, frames=2, image_size=S, channels=1)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.gif").write_bytes(b"GIF89a" + b"\x00" * 20)
    with pytest.raises(ValueError, match=r"video .*broken.gif cannot be decoded .*damaged, cut off or not a video; "
                                         r"re-encode it"):
        VideoFolder(bad, frames=2, image_size=S, channels=1)
    short = tmp_path / "short"
    save_video(_gray_video(1)[0], short / "s.gif")
    with pytest.raises(ValueError, match=r"video .*s.gif has 10 frame\(s\), fewer than one clip of data.frames = 4 taken "
                                         r"every data.frame_stride = 4 frame\(s\) spans \(13\); lower data.frames"):
        VideoFolder(short, frames=4, image_size=S, channels=1, frame_stride=4)
    with pytest.raises(FileNotFoundError, match="video folder .*nowhere does not exist; set data.path"):
        VideoFolder(tmp_path / "nowhere", frames=2, image_size=S, channels=1)


def test_damaged_mp4_is_named(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    save_video(_gray_video(1)[0], tmp_path / "whole.mp4")
    data = (tmp_path / "whole.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"video .*cut.mp4 cannot be decoded \(OSError: .*\): it is damaged, cut off"):
        VideoFolder(tmp_path, frames=2, image_size=S, channels=1)


def test_missing_video_extra_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if not installed
    (tmp_path / "a.mp4").write_bytes(b"\x00" * 10)
    with pytest.raises(ImportError, match=r'needs imageio and imageio-ffmpeg: pip install -e "\.\[video\]"'):
        read_video(tmp_path / "a.mp4")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[video\]", or write a .gif'):
        save_video(_gray_video(1)[0], tmp_path / "b.mp4")


def test_save_video_refusals(tmp_path):
    x = _gray_video(1)[0]
    with pytest.raises(ValueError, match=r"written as .gif or .mp4, not .avi"):
        save_video(x, tmp_path / "a.avi")
    with pytest.raises(ValueError, match=r"has 1 or 3 channels on axis 1, got shape \(1, 10, 1, 24, 24\); for frames "
                                         r"first \(F, C, H, W\) pass x.transpose\(0, 1\)"):
        save_video(x.transpose(0, 1), tmp_path / "a.gif")
    with pytest.raises(ValueError, match=r"fps must be > 0"):
        save_video(x, tmp_path / "a.gif", fps=0)
    pytest.importorskip("imageio_ffmpeg")
    with pytest.raises(ValueError, match=r"needs an even width and height, got 23x23; write a .gif, or pass scale=2"):
        save_video(x[..., :23, :23], tmp_path / "a.mp4")


@pytest.mark.parametrize("changes,message", [
    (dict(source="mnist", frames=8), r'data.frames = 8 asks for videos but data.source = "mnist" holds images; set '
                                     r'data.source = "moving_digits" or "video_folder", or data.frames = 0'),
    (dict(frames=0), r'data.source = "moving_digits" makes videos: set data.frames .*at least 2'),
    (dict(frames=1), r"data.frames .*at least 2, e.g. 8\), got 1"),
    (dict(digit_size=30), r"data.digit_size = 30 gives 30x30 digits, .*smaller than the 24x24 canvas \(data.image_size\)"
                          r".*set data.digit_size between 4 and 23"),
    (dict(digit_size=24), r"data.digit_size = 24 gives 24x24 digits"),
    (dict(velocity=0), r"data.velocity = 0 must be between 1 and 12 pixels per frame"),
    (dict(velocity=13), r"data.velocity = 13 must be between 1 and 12"),
    (dict(digits_per_video=0), r"data.digits_per_video must be >= 1"),
    (dict(crops=0), r'data.crops is the number of videos for data.source = "moving_digits"'),
    (dict(channels=2), r"data.channels must be 1 \(grayscale\) or 3"),
    (dict(source="video_folder", path=""), r'data.source = "video_folder" needs data.path'),
    (dict(source="video_folder", path="x", frame_stride=0), r"data.frame_stride must be >= 1"),
])
def test_bad_video_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(digits_cfg(**changes))


def test_default_digit_size_is_half_the_canvas():
    data = load_dataset(DataConfig(source="moving_digits", image_size=32, frames=2, crops=1))
    assert data.digit_size == 16 and data.glyphs.shape == (5000, 16, 16)


@pytest.mark.parametrize("data,message", [
    (dict(source="mnist", bounce="stochastic"), r'data.bounce = .stochastic. is ignored because data.source = "mnist" '
                                                r'is not moving digits; set data.source = "moving_digits"'),
    (dict(source="moving_digits", frames=8, frame_stride=2), r'data.frame_stride = 2 is ignored because data.source = '
                                                             r'"moving_digits" reads no video files'),
    (dict(source="moving_digits", frames=8, path="x"), r'data.path = .x. is ignored because data.source = '
                                                       r'"moving_digits" trains on the generated'),
    (dict(source="video_folder", frames=8, path="x", crops=10), r'data.crops = 10 is ignored because data.source = '
                                                                r'"video_folder" takes whole files'),
])
def test_settings_the_source_ignores_are_refused(data, message):
    cfg = RunConfig(data=dataclasses.replace(DataConfig(), **data))
    with pytest.raises(ConfigError, match=message):
        check_unused(cfg)
    ok = RunConfig(data=DataConfig(source="moving_digits", frames=8, crops=100, digit_size=14, velocity=3,
                                   bounce="stochastic", digits_per_video=2))
    check_unused(ok)  # every moving-digits setting is read


def test_a_still_clip_reads_back_with_all_its_frames(tmp_path):
    """Pillow writes a run of identical frames as one longer GIF frame; save_video's clock comment lets read_video
    count them again, so a still clip of 5 frames reads back as 5 (and a moving one as written)."""
    from diffuse.data.video import read_video
    from diffuse.visualize import save_video

    still = torch.zeros(1, 5, 8, 8)
    save_video(still, tmp_path / "still.gif")
    assert read_video(tmp_path / "still.gif").shape == (5, 8, 8, 3)
    half = torch.cat([torch.full((1, 2, 8, 8), -1.0), torch.full((1, 3, 8, 8), 1.0)], dim=1)  # 2 black, 3 white
    save_video(half, tmp_path / "half.gif")
    frames = read_video(tmp_path / "half.gif")
    assert frames.shape == (5, 8, 8, 3) and [int(f.max()) for f in frames] == [0, 0, 255, 255, 255]


def _long_still_gif(path, comment=b"diffuse frame_ms=1"):
    """A 2-frame 16x16 GIF, black for 20 ms then white for 60 s, with a comment claiming a 1 ms clock: on a 20 ms clock
    3001 frames, the reader's unbounded repeat before GIF_MAX_REPEAT."""
    black, white = Image.new("L", (16, 16), 0), Image.new("L", (16, 16), 255)
    black.save(path, save_all=True, append_images=[white], duration=[20, 60000], loop=0, comment=comment)
    return path


def test_a_gif_holding_a_frame_long_is_bounded_and_read_no_further_than_asked(tmp_path):
    """A frame counts at most GIF_MAX_REPEAT times and a clock under 10 ms is no clock (GIF durations are whole
    centiseconds): the 60 s frame of a 20 ms GIF is 256 frames, not 3000 (or 60,000 on its forged 1 ms clock);
    max_frames stops the reading there, the last source frame's repeats cut to fit."""
    from diffuse.data.video import GIF_MAX_REPEAT, gif_frame_count, gif_repeats

    path = _long_still_gif(tmp_path / "long.gif")
    assert Image.open(path).n_frames == 2
    assert gif_repeats([20, 60000], b"diffuse frame_ms=1") == [1, GIF_MAX_REPEAT] == [1, 256]
    assert gif_repeats([40, 80, 0], b"diffuse frame_ms=40") == [1, 2, 1] and gif_repeats([30, 90]) == [1, 3]
    assert gif_frame_count(path) == 257
    frames = read_video(path)
    assert frames.shape == (257, 16, 16, 3) and frames[0].max() == 0 and frames[1:].min() == 255
    short = read_video(path, max_frames=5)
    assert short.shape == (5, 16, 16, 3) and [int(f.max()) for f in short] == [0, 255, 255, 255, 255]
    assert read_video(path, max_frames=1).shape == (1, 16, 16, 3)
    assert read_video(path, max_frames=1000).shape[0] == 257
    with pytest.raises(ValueError, match="max_frames must be a whole number >= 1"):
        read_video(path, max_frames=0)


def test_an_mp4_is_read_no_further_than_asked(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    x = _gray_video(1)[0]
    save_video(x, tmp_path / "a.mp4", fps=8)
    whole, first = read_video(tmp_path / "a.mp4"), read_video(tmp_path / "a.mp4", max_frames=3)
    assert whole.shape[0] == F and np.array_equal(first, whole[:3])
