"""`diffuse sample` and `diffuse edit predict|interpolate` of video runs (app/requests.py, app/commands.py): the GIF has the
frames asked and its contact sheet the size of one, long videos go by a scheme only on a masked-conditioning model,
prediction keeps the given frames exactly by every method, each request's command line parses back to it, and what a
video run cannot do (or an image run is asked to) is refused by name."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.app import cli
from diffuse.app.commands import edit_command, eval_command, sample_command
from diffuse.app.requests import EditRequest, RequestError, SampleRequest, resolve
from diffuse.config import RunConfig, apply_overrides, load_config
from diffuse.data.video import read_video
from diffuse.runs import open_run
from diffuse.visualize import contact_sheet, save_video

SIDE, FRAMES = 16, 4
TINY = ["data.image_size=16", "data.frames=4", "data.digit_size=8", "data.velocity=1", "data.crops=16",
        "model.channels=8", "model.norm_groups=4", "train.batch_size=4", "train.steps=2", "train.warmup_steps=0",
        "train.time_limit=0", "train.checkpoint_every=2", "train.log_every=1", "train.ema_decay=0.5",
        "train.mixed_precision=no", "video.max_observed=2", "video.p_images=0", "sample.steps=2", "sample.n=2"]


def train_tiny(folder, *extra):
    from diffuse.train import Trainer

    cfg = apply_overrides(load_config("video_digits"), [*TINY, *extra])
    Trainer(cfg, folder, progress=False).fit()
    return str(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A masked-conditioning video run (model.video_observed) and one trained without given frames."""
    root = tmp_path_factory.mktemp("video_runs")
    return {"masked": train_tiny(root / "masked"),
            "plain": train_tiny(root / "plain", "model.video_observed=false", "video.max_observed=0")}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """An input GIF of 6 frames, 16x16, grayscale: a bright square moving right over a gradient."""
    x = torch.linspace(-1, 1, SIDE)[None, None, None, :].expand(1, 1, 6, SIDE, SIDE).clone()
    for f in range(6):
        x[0, 0, f, 4:8, 2 + f:6 + f] = 1
    path = tmp_path_factory.mktemp("clip") / "in.gif"
    save_video(x[0], path)
    return str(path)


def run_cli(*argv):
    args = cli.parser().parse_args([str(a) for a in argv])
    {"sample": sample_command, "edit": edit_command, "eval": eval_command}[args.command](args)
    return args


def frames_of(path) -> np.ndarray:
    return read_video(path)[..., 0]  # grayscale: three equal channels


def test_sample_writes_a_gif_of_n_frames_and_its_contact_sheet(runs, tmp_path):
    out = tmp_path / "v.gif"
    run_cli("sample", runs["masked"], "--n", 1, "--frames", 3, "--out", out, "--device", "cpu")
    assert frames_of(out).shape == (3, SIDE, SIDE)
    sheet = Image.open(out.with_suffix(".png"))
    assert sheet.size == contact_sheet(torch.zeros(1, 1, 3, SIDE, SIDE)).size  # one row, 3 columns, 2x
    default = tmp_path / "d.npy"  # the run's data.frames by default; .npy the array (N, C, F, H, W) in [0, 1]
    run_cli("sample", runs["masked"], "--n", 2, "--out", default, "--device", "cpu")
    array = np.load(default)
    assert array.shape == (2, 1, FRAMES, SIDE, SIDE) and 0 <= array.min() and array.max() <= 1


def test_sample_writes_an_mp4_with_its_contact_sheet(runs, tmp_path):
    pytest.importorskip("imageio_ffmpeg")  # the [video] extra
    out = tmp_path / "v.mp4"
    run_cli("sample", runs["masked"], "--n", 1, "--frames", 3, "--out", out, "--device", "cpu")
    assert read_video(out).shape[:3] == (3, SIDE, SIDE) and out.with_suffix(".png").is_file()


@pytest.mark.parametrize("scheme", ["autoregressive", "hierarchy-2"])
def test_long_videos_take_a_scheme_on_a_masked_model(runs, tmp_path, scheme):
    out = tmp_path / "long.gif"
    with warnings.catch_warnings(record=True) as caught:  # the runs train on windows of 64 frames (video.max_span)
        warnings.simplefilter("always")
        run_cli("sample", runs["masked"], "--n", 1, "--frames", 9, "--scheme", scheme, "--out", out, "--device", "cpu")
    assert frames_of(out).shape == (9, SIDE, SIDE)
    assert not [w for w in caught if "the run was trained on" in str(w.message)]  # 9 frames: within the span
    with pytest.raises(RequestError, match="--frames 9 is more than the 4 frames.*pass --scheme autoregressive or "
                                           "--scheme hierarchy-2"):
        resolve(SampleRequest(runs["masked"], n=1, frames=9))
    with pytest.raises(RequestError, match="needs a masked-conditioning model.*pass --frames 4 or fewer") as e:
        resolve(SampleRequest(runs["plain"], n=1, frames=9, scheme=scheme))
    assert e.value.field == "frames"
    with pytest.raises(RequestError, match="--scheme does nothing here: 4 frames fit"):
        resolve(SampleRequest(runs["masked"], n=1, scheme=scheme))


@pytest.mark.parametrize("run, method", [("masked", "masked"), ("masked", "replacement"), ("plain", "replacement"),
                                         ("plain", "reconstruction")])
def test_predict_keeps_the_given_frames_exactly(runs, clip, tmp_path, run, method):
    out = tmp_path / "p.gif"
    extra = ["--guidance-weight", 2] if method == "reconstruction" else []
    run_cli("edit", "predict", runs[run], "--video", clip, "--given", "0,1", "--method", method, "--n", 1, *extra,
            "--out", out, "--device", "cpu")
    got, given = frames_of(out), frames_of(clip)[:FRAMES]
    assert got.shape == (FRAMES, SIDE, SIDE)
    assert np.array_equal(got[:2], given[:2])  # the given frames, pixel for pixel (both 8-bit)
    assert not np.array_equal(got[2:], given[2:])  # the rest generated
    sheet = np.asarray(Image.open(out.with_suffix(".png")).convert("RGB")).astype(int)
    red = (sheet[..., 0] == 255) & (sheet[..., 1] == 0) & (sheet[..., 2] == 0)
    cols = np.flatnonzero(red.any(0))  # the red frames around the given frames, columns 0 and 1 only
    assert cols.size and cols.max() < 2 * (2 + 2 * (SIDE + 2)) + 2
    assert sheet.shape[0] > contact_sheet(torch.zeros(2, 1, FRAMES, SIDE, SIDE)).size[1] - 1  # input row + output row


@pytest.mark.parametrize("sampler", ["heun", "euler-ancestral", "sde-pc"])
def test_every_sampler_draws_and_edits_videos(runs, clip, tmp_path, sampler):
    out = tmp_path / "s.npy"
    run_cli("sample", runs["masked"], "--n", 1, "--frames", 6, "--scheme", "autoregressive", "--sampler", sampler,
            "--steps", 2, "--out", out, "--device", "cpu")
    assert np.load(out).shape == (1, 1, 6, SIDE, SIDE)
    edited = tmp_path / "e.npy"
    run_cli("edit", "predict", runs["plain"], "--video", clip, "--given", "0", "--method", "replacement", "--sampler",
            sampler, "--steps", 2, "--n", 1, "--out", edited, "--device", "cpu")
    given = read_video(clip)[0, ..., 0].astype(np.float32) / 255
    assert np.abs(np.load(edited)[0, 0, 0] - given).max() < 1 / 255 + 1e-6  # the given frame kept (8-bit input)


def test_interpolate_keeps_both_ends(runs, clip, tmp_path):
    out = tmp_path / "i.gif"
    run_cli("edit", "interpolate", runs["masked"], "--video", clip, "--n", 1, "--out", out, "--device", "cpu")
    got, given = frames_of(out), frames_of(clip)[:FRAMES]
    assert np.array_equal(got[[0, 3]], given[[0, 3]])  # default --given: the first and the last frame


def parsed(argv) -> SampleRequest:
    args = cli.parser().parse_args([*argv, "--out", "x.gif"])
    return (SampleRequest if args.command == "sample" else EditRequest).from_args(args)


@pytest.mark.parametrize("request_", [
    SampleRequest("RUN", n=3, frames=12, scheme="hierarchy-2", seed=4),
    EditRequest("RUN", n=2, task="predict", video="in.gif", given=(0, 1, 2), method="masked", frames=4),
    EditRequest("RUN", n=1, task="interpolate", video="-odd.mp4", given=(0, 3), method="reconstruction",
                guidance_weight=1.5, steps=5)])
def test_a_requests_command_line_parses_back_to_it(request_):
    assert parsed(request_.argv()) == request_


def test_what_a_video_run_cannot_do_is_refused_by_name(runs, clip, tmp_path):
    with pytest.raises(RequestError, match="edit inpaint edits images.*its edits are predict, interpolate .* and sdedit"):
        resolve(EditRequest(runs["masked"], task="inpaint", image=clip, mask=clip))
    with pytest.raises(RequestError, match="is a video run: edit sdedit takes --video IN.gif|.mp4, not --image"):
        resolve(EditRequest(runs["masked"], task="sdedit", image=clip, strength=0.5))
    with pytest.raises(RequestError, match="--method masked needs a masked-conditioning model.*--method reconstruction"):
        resolve(EditRequest(runs["plain"], task="predict", video=clip, method="masked"))
    with pytest.raises(RequestError, match="frame 7 is outside the video's 4 frames 0..3"):
        resolve(EditRequest(runs["masked"], task="predict", video=clip, given=(7,)))
    with pytest.raises(RequestError, match="--given names a frame twice"):
        resolve(EditRequest(runs["masked"], task="predict", video=clip, given=(0, 0)))
    with pytest.raises(RequestError, match="leaves a gap: use edit interpolate"):
        resolve(EditRequest(runs["masked"], task="predict", video=clip, given=(0, 2)))
    with pytest.raises(RequestError, match="has 6 frames, fewer than the 8 asked|at most the 4 frames"):
        resolve(EditRequest(runs["masked"], task="predict", video=clip, frames=8))
    with pytest.raises(RequestError, match="--guidance-weight is w_r of reconstruction guidance"):
        resolve(EditRequest(runs["masked"], task="predict", video=clip, guidance_weight=2.0))
    with pytest.raises(ValueError, match="is a video run: `diffuse eval`'s metrics measure images"):
        run_cli("eval", runs["masked"], "--metric", "fid")
    with pytest.raises(ValueError, match="is a video run; write .*v.gif"):
        run_cli("sample", runs["masked"], "--n", 1, "--out", tmp_path / "v.png", "--device", "cpu")
    caps = open_run(runs["masked"]).capabilities
    assert caps.video and caps.edits == ("predict", "interpolate", "sdedit") and caps.metrics == () and caps.observed
    assert not open_run(runs["plain"]).capabilities.observed


def test_an_image_run_refuses_frames_and_videos(tmp_path, clip):
    from diffuse.train import Trainer

    cfg = apply_overrides(RunConfig(), ["data.source=digits", "data.image_size=8", "model.channels=8",
                                        "model.channel_mult=[1,2]", "model.attention_resolutions=[4]", "model.norm_groups=4",
                                        "train.batch_size=8", "train.steps=1", "train.time_limit=0", "sample.steps=2"])
    image_run = tmp_path / "images"
    Trainer(cfg, image_run, progress=False).fit()
    with pytest.raises(RequestError, match="--frames draws videos, and .* is a model of images.*leave --frames out"):
        resolve(SampleRequest(str(image_run), n=1, frames=4))
    with pytest.raises(RequestError, match="edit predict needs a video run"):
        resolve(EditRequest(str(image_run), task="predict", video=clip))
    with pytest.raises(RequestError, match="--video needs a video run"):
        resolve(EditRequest(str(image_run), task="interpolate", video=clip))
    with pytest.raises(RequestError, match="--video needs a video run"):
        resolve(EditRequest(str(image_run), task="sdedit", video=clip, strength=0.5))
    with pytest.raises(ValueError, match="draws images, not videos"):
        run_cli("sample", image_run, "--n", 1, "--out", tmp_path / "x.gif", "--device", "cpu")


# --- the page (app/webui.py): its video functions, without a browser ----------------------------------------------
def test_the_page_reads_checks_and_shows_videos(runs, clip, tmp_path):
    from diffuse.app.webui import check_video_upload, display, video_files, video_request

    assert check_video_upload(clip) == (6, SIDE, SIDE)
    with pytest.raises(ValueError, match=r"in.gif is 6 frames of 16x16 = 1,536 pixels, more than the 1,000 this page "
                                         r"reads \(diffuse serve --max-upload-pixels\)"):
        check_video_upload(clip, limit=1000)  # every frame counts
    fake = tmp_path / "fake.gif"
    fake.write_bytes(b"not a gif")
    with pytest.raises(ValueError, match="fake.gif cannot be read as a video.*upload a GIF or an MP4"):
        check_video_upload(str(fake))
    req = video_request(runs["masked"], "predict", clip, " 0, 1", "", tmp_path, n=1, steps=2)
    assert req.given == (0, 1) and req.method is None and req.video == str(tmp_path / "input.gif")
    assert (tmp_path / "input.gif").read_bytes() == open(clip, "rb").read()  # the command's input, beside its output
    with pytest.raises(ValueError, match="no video: upload a GIF or an MP4"):
        video_request(runs["masked"], "predict", None, "", "", tmp_path)
    plan = resolve(req)
    assert plan.argv()[:3] == ["edit", "predict", runs["masked"]]
    x = torch.rand(2, 1, FRAMES, SIDE, SIDE) * 2 - 1
    gif, shown, sheet = video_files(x, tmp_path, "edited", [x[:1]], plan.observed)
    assert read_video(gif).shape == (FRAMES, SIDE + 4, 2 * SIDE + 6, 3)  # 2 videos side by side (padded), 1x
    assert Image.open(shown).size[0] > Image.open(gif).size[0]  # the page's copy enlarged
    assert Image.open(sheet).size == contact_sheet(torch.zeros(3, 1, FRAMES, SIDE, SIDE)).size  # input row + 2 outputs
    assert display(x).width >= contact_sheet(x, 1).width  # a preview of videos: their contact sheet


def test_the_page_counts_a_gifs_frames_on_its_clock_and_an_edit_reads_only_the_frames_it_needs(runs, tmp_path):
    """A 2-frame GIF, 20 ms then 60 s (with a forged 1 ms clock): the page's pixel limit counts the 257 frames the
    reader makes of it (a 60 s frame counts data.video.GIF_MAX_REPEAT times), not the header's 2; an edit of the 4-frame
    run reads its first 4 frames only."""
    from diffuse.app.webui import check_video_upload

    black, white = Image.new("L", (SIDE, SIDE), 0), Image.new("L", (SIDE, SIDE), 255)
    path = tmp_path / "held.gif"
    black.save(path, save_all=True, append_images=[white], duration=[20, 60000], loop=0, comment=b"diffuse frame_ms=1")
    assert check_video_upload(str(path)) == (257, SIDE, SIDE)
    with pytest.raises(ValueError, match=r"held.gif is 257 frames on its clock \(2 stored, .*\) of 16x16 = 65,792 "
                                         r"pixels, more than the 10,000 this page reads"):
        check_video_upload(str(path), limit=10_000)  # the header's 2 x 256 = 512 pixels pass
    plan = resolve(EditRequest(runs["masked"], task="predict", video=str(path), given=(0, 1)))
    assert plan.video.shape == (1, 1, FRAMES, SIDE, SIDE)
    assert plan.video[0, 0, 0].max() == -1 and plan.video[0, 0, 1:].min() == 1


def test_the_page_serves_a_video_run_on_its_own_tab(runs, clip):
    pytest.importorskip("gradio")
    from diffuse.app.webui import build_app

    app = build_app([runs["masked"]], device="cpu")
    ui = app.webui
    assert ui.models.videos == [runs["masked"]] and ui.models.editors == []  # no image edits of a video run
    assert ui.models.runs == [runs["masked"]]  # the Sample tab draws its videos
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert {"tab-video", "v-upload", "v-sheet", "tab-sample"} <= ids and "tab-edit" not in ids
    handler = {f.name: f.fn for f in app.fns.values() if getattr(f, "name", "")}
    shown = {getattr(c, "elem_id", None): c for c in app.blocks.values()}

    def final(updates) -> dict:  # the last update of a job's generator, by elem_id
        *_, last = updates
        return {getattr(k, "elem_id", None): v for k, v in last.items()}

    def progress(*a, **k):
        pass

    done = final(handler["sample"](runs["masked"], "ddim", 2, None, 0, "all classes in turn", 0, 2, True, "", "",
                                   progress=progress))
    assert done["s-image"].height > done["s-image"].width / FRAMES  # the contact sheet: two rows of 4 frames
    assert done["s-command"].endswith("--out samples.gif") and "2 videos of 4 frames" in done["s-status"]
    assert read_video(done["s-gif"].value["path"] if isinstance(done["s-gif"].value, dict) else done["s-gif"].value
                      ).shape[0] == FRAMES
    done = final(handler["video_edit"](runs["masked"], "predict", clip, "0,1", "", 1, 0, 2, True,
                                       progress=progress))
    assert read_video(done["v-gif"]).shape[0] == FRAMES and "frames 0,1 given" in done["v-status"]
    assert "edit predict" in done["v-command"] and "--given 0,1" in done["v-command"]
    assert shown["v-upload"].file_types == [".gif", ".mp4"]


# --- edits of videos longer than the model, and SDEdit of a video -----------------------------------------------------
@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """An input GIF of 10 frames (more than the runs' 4), 16x16: a bright square moving right and down over a gradient."""
    x = torch.linspace(-1, 1, SIDE)[None, None, None, :].expand(1, 1, 10, SIDE, SIDE).clone()
    for f in range(10):
        x[0, 0, f, 2 + f // 2:6 + f // 2, 1 + f:5 + f] = 1
    path = tmp_path_factory.mktemp("long") / "long.gif"
    save_video(x[0], path)
    return str(path)


@pytest.mark.parametrize("task, given, scheme", [("predict", "0,1,2", None), ("predict", "0,1", "hierarchy-2"),
                                                 ("interpolate", "0,5,9", None), ("interpolate", "2,7", None)])
def test_a_video_longer_than_the_model_is_edited_in_stages(runs, long_clip, tmp_path, task, given, scheme):
    """10 frames with a 4-frame masked model: the output has all 10, the given frames pixel for pixel the input's, every
    other frame generated, in as many denoiser passes as the plan has stages."""
    out = tmp_path / "long.gif"
    extra = ["--scheme", scheme] if scheme else []
    run_cli("edit", task, runs["masked"], "--video", long_clip, "--frames", 10, "--given", given, *extra, "--n", 1,
            "--steps", 2, "--sampler", "ddim", "--out", out, "--device", "cpu")
    got, want = frames_of(out), frames_of(long_clip)
    kept = [int(i) for i in given.split(",")]
    assert got.shape == (10, SIDE, SIDE)
    assert np.array_equal(got[kept], want[kept])
    assert all(not np.array_equal(got[f], want[f]) for f in range(10) if f not in kept)
    plan = resolve(EditRequest(runs["masked"], task=task, video=long_clip, frames=10, given=tuple(kept), scheme=scheme,
                               n=1, steps=2, sampler="ddim", device="cpu"))
    from diffuse.app.requests import execute, video_stages
    stages = video_stages(task, 4, 10, kept, scheme, 2)  # the runs' video.max_observed = 2
    assert all(len(obs) <= 2 for obs, _ in stages)
    assert execute(plan).calls == 2 * len(stages)  # two DDIM steps per stage, each stage one network call per step
    assert Image.open(out.with_suffix(".png")).size == contact_sheet(torch.zeros(2, 1, 10, SIDE, SIDE)).size


def test_what_a_long_edit_cannot_do_is_refused_by_name(runs, long_clip):
    with pytest.raises(RequestError, match="--frames 10 is more than the 4 frames.*needs a masked-conditioning model "
                                           "\\(model.video_observed = true\\) and --method masked; pass --frames 4"):
        resolve(EditRequest(runs["plain"], task="predict", video=long_clip, frames=10))
    with pytest.raises(RequestError, match="and --method masked"):
        resolve(EditRequest(runs["masked"], task="interpolate", video=long_clip, frames=10, method="replacement"))
    with pytest.raises(RequestError, match="--scheme does nothing here: 4 frames fit the 4"):
        resolve(EditRequest(runs["masked"], task="predict", video=long_clip, scheme="hierarchy-2"))
    with pytest.raises(RequestError, match="--scheme does nothing here: only edit predict"):
        resolve(EditRequest(runs["masked"], task="interpolate", video=long_clip, frames=10, scheme="autoregressive"))
    with pytest.raises(RequestError, match="frame 9 is outside the video's 4 frames 0..3 \\(--frames N edits its first N"):
        resolve(EditRequest(runs["masked"], task="interpolate", video=long_clip, given=(0, 9)))
    with pytest.raises(RequestError, match="has 10 frames, fewer than the 12 asked"):
        resolve(EditRequest(runs["masked"], task="predict", video=long_clip, frames=12))


def test_a_long_video_spreading_beyond_the_trained_span_is_warned(runs):
    """The runs train on windows of max(video.max_span, data.frames) = 64 frames: hierarchy-2 over 66 frames spreads
    its first stage over all 66, which the network never saw; the page and the command line get a warning."""
    from diffuse.app.requests import execute

    plan = resolve(SampleRequest(runs["masked"], n=1, frames=66, scheme="hierarchy-2", steps=1, sampler="ddim",
                                 device="cpu"))
    with pytest.warns(UserWarning, match="spread over up to 66 frames, more than the 64 the run was trained on"):
        assert execute(plan).x.shape == (1, 1, 66, SIDE, SIDE)


def test_more_given_frames_than_the_masked_model_was_trained_with_are_refused(runs, clip):
    """The runs give at most video.max_observed = 2 frames in training: --given 0,1,2 on the 4-frame masked model is
    refused for --method masked (naming the limit and both fixes), accepted for reconstruction guidance (no observed
    channel, no limit); a long edit with 3 given frames conditions each stage on 2 of them, the nearest."""
    with pytest.raises(RequestError, match=r"--given names 3 frames, more than the 2 .* was trained with \(video."
                                           r"max_observed = 2\).*pass at most 2 in --given, or --method reconstruction") as e:
        resolve(EditRequest(runs["masked"], task="predict", video=clip, given=(0, 1, 2)))
    assert e.value.field == "given"
    plan = resolve(EditRequest(runs["masked"], task="predict", video=clip, given=(0, 1, 2), method="reconstruction"))
    assert plan.method == "reconstruction" and plan.observed.tolist() == [True, True, True, False]
    assert resolve(EditRequest(runs["masked"], task="predict", video=clip, given=(0, 1))).method == "masked"
    from diffuse.app.requests import default_given
    assert default_given("predict", 8, 2) == (0, 1) and default_given("predict", 8) == (0, 1, 2, 3)
    assert default_given("interpolate", 8, 1) == (0, 7)


def test_sdedit_of_a_video(runs, clip, tmp_path):
    """Strength 0 writes the input back (8-bit, pixel for pixel); strength 0.6 changes every frame; the masked run
    denoises in its unconditional mode (no frame observed) and a plain run as it is."""
    out = tmp_path / "same.gif"
    run_cli("edit", "sdedit", runs["masked"], "--video", clip, "--strength", 0, "--n", 1, "--out", out, "--device", "cpu")
    assert np.array_equal(frames_of(out), frames_of(clip)[:FRAMES])
    for run in ("masked", "plain"):
        moved = tmp_path / f"{run}.npy"
        run_cli("edit", "sdedit", runs[run], "--video", clip, "--strength", 0.6, "--n", 2, "--steps", 2, "--out", moved,
                "--device", "cpu")
        x = np.load(moved)
        assert x.shape == (2, 1, FRAMES, SIDE, SIDE) and not np.allclose(x[0], x[1])  # each output its own noise
        given = frames_of(clip)[:FRAMES].astype(np.float32) / 255
        assert all(np.abs(x[0, 0, f] - given[f]).max() > 0.05 for f in range(FRAMES))
    assert (tmp_path / "same.png").is_file()  # the contact sheet: the input, then the output
    with pytest.raises(RequestError, match="edit sdedit noises and denoises the whole video at once, at most the 4"):
        resolve(EditRequest(runs["masked"], task="sdedit", video=clip, strength=0.5, frames=6))
    with pytest.raises(RequestError, match="edit sdedit needs --strength"):
        resolve(EditRequest(runs["masked"], task="sdedit", video=clip))
    with pytest.raises(RequestError, match="--given does nothing here: only edit predict and interpolate"):
        resolve(EditRequest(runs["masked"], task="sdedit", video=clip, strength=0.5, given=(0,)))


@pytest.mark.parametrize("request_", [
    EditRequest("RUN", n=1, task="predict", video="in.gif", given=(0, 1), frames=32, scheme="hierarchy-2"),
    EditRequest("RUN", n=3, task="sdedit", video="in.mp4", strength=0.25, frames=4, seed=2)])
def test_a_long_or_sdedit_requests_command_line_parses_back_to_it(request_):
    assert parsed(request_.argv()) == request_
