"""train.log_to: every tracker gets the same scalars and pictures of a training run, each read back with its own
reader (read_log, the csv module, TensorBoard's EventAccumulator, the records of W&B's offline run file); a resumed
run's TensorBoard shows each step once; a tracker that is not installed, unknown or repeated is refused before
anything is written; the progress bar under a time limit shows the time left."""

from __future__ import annotations

import csv
import glob
import io
import json
import shutil
import struct
import typing

import numpy as np
import pytest
from PIL import Image

from diffuse import checkpoint as ckpt
from diffuse import trackers
from diffuse.config import ConfigError, apply_overrides
from diffuse.train import Trainer, time_left

from test_train import tiny_cfg

pytest.importorskip("tensorboard")  # the [track] extra, which .ci/run installs
pytest.importorskip("wandb")

ALL = '["jsonl", "csv", "tensorboard", "wandb"]'
POOL = "import torch\nnet = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())\n"  # 1 feature


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the tracker's own choice: offline
    monkeypatch.setenv("WANDB_SILENT", "true")


def tracked_cfg(tmp_path, *overrides, measured=True):
    """4 steps logged each, to every tracker, a checkpoint every 2; `measured`: a sample grid and an FID (in a 1-feature
    space) every 2."""
    (tmp_path / "pool.py").write_text(POOL)
    measures = ["train.sample_every=2", "train.fid_every=2", "train.fid_samples=8", "train.fid_steps=2",
                f"train.fid_features={tmp_path / 'pool.py'}:net"] if measured else []
    return tiny_cfg(f"train.log_to={ALL}", "train.steps=4", "train.log_every=1", "train.checkpoint_every=2", *measures,
                    *overrides)


# --- readers, one per tracker -----------------------------------------------------------------------------------------
def csv_rows(run) -> dict[tuple[int, str], float]:
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "name", "value"] and rows.count(rows[0]) == 1  # one header, also after a resume
    return {(int(step), name): float(value) for step, name, value in rows[1:]}


def tensorboard_events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    images = {(e.step, tag): np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
              for tag in acc.Tags()["images"] for e in acc.Images(tag)}
    return scalars, images, acc


def wandb_records(run) -> list:
    """The records of every offline run in RUN/wandb, read from its run-ID.wandb file: a LevelDB-style log (a 7-byte
    header, 32 KiB blocks of records: crc32, length, type; FULL = 1, FIRST/MIDDLE/LAST = 2/3/4) of W&B's Record
    protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, part, records = open(path, "rb").read(), 7, b"", []
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            room = 32768 - pos % 32768
            if room < 7:
                pos += room
                continue
            _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:  # padding to the end of the block
                pos += room
                continue
            part, pos = part + data[pos + 7:pos + 7 + n], pos + 7 + n
            if kind in (1, 4):
                records.append(part)
                part = b""
        for raw in records:
            out.append(pb.Record())
            out[-1].ParseFromString(raw)
    return out


def wandb_history(run) -> list[dict]:
    """The history rows (name -> value) of RUN/wandb's offline runs."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in wandb_records(run) if r.WhichOneof("record_type") == "history"]


# --- one run, every tracker ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracked")
    run = tmp / "run"
    Trainer(tracked_cfg(tmp), run, progress=False).fit()
    return run


def test_every_tracker_holds_the_same_scalars(tracked):
    logged = ckpt.read_log(tracked / "log.jsonl")
    assert [(r["step"], "fid" in r) for r in logged] == [(1, False), (2, False), (2, True), (3, False), (4, False), (4, True)]
    expected = {(r["step"], name): value for r in logged for name, value in trackers.scalars_of(r).items() if name != "step"}
    assert {"loss", "grad_norm", "lr", "images_per_s", "time", "fid"} == {name for _, name in expected}

    rows = csv_rows(tracked)
    assert rows == expected  # exactly: written with repr

    scalars, _, acc = tensorboard_events(tracked)
    assert scalars == pytest.approx(expected, rel=1e-6)  # float32 in the events
    assert "config" in acc.Tags()["tensors"][0]  # the run's config as text at step 0

    history = {row["_step"]: row for row in wandb_history(tracked)}
    assert sorted(history) == [1, 2, 3, 4]
    assert {(step, name): v for step, row in history.items() for name, v in row.items()
            if not name.startswith(("_", "samples/", "loss_figure/"))} == expected


def test_trackers_that_hold_pictures_get_the_sample_grids_and_the_loss_figure(tracked):
    grids = {step: trackers.read_png(tracked / "samples" / f"step_{step:08d}.png") for step in (2, 4)}
    _, images, _ = tensorboard_events(tracked)
    assert sorted(images) == [(2, "loss_figure"), (2, "samples"), (4, "loss_figure"), (4, "samples")]
    for step, grid in grids.items():
        np.testing.assert_array_equal(images[step, "samples"], grid)  # the PNG's pixels, losslessly
    np.testing.assert_array_equal(images[4, "loss_figure"], trackers.read_png(tracked / "loss.png"))  # the last figure drawn

    history = {row["_step"]: row for row in wandb_history(tracked)}
    media = glob.glob(str(tracked / "wandb" / "offline-run-*"))[0]
    for step, grid in grids.items():
        row = history[step]
        assert row["samples/_type"] == row["loss_figure/_type"] == "image-file"
        np.testing.assert_array_equal(trackers.read_png(f"{media}/files/{row['samples/path']}"), grid)
    assert (tracked / "wandb" / "run_id").read_text() in media  # the offline run inside the run folder, under its id


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path):
    """Interrupted after logging step 3 with its last checkpoint at step 2: the resumed run logs steps 3 and 4 again;
    TensorBoard, log.jsonl and the csv drop the interrupted run's step 3 (one header), W&B keeps appending under the
    same run id."""
    cfg = tracked_cfg(tmp_path, measured=False)
    run = tmp_path / "run"
    Trainer(apply_overrides(cfg, ["train.steps=3"]), run, progress=False).fit()
    shutil.rmtree(run / "checkpoints" / "step_00000003")  # as if killed after logging step 3, before its checkpoint
    run_id = (run / "wandb" / "run_id").read_text()
    Trainer(cfg, run, progress=False).fit()
    logged = [r for r in ckpt.read_log(run / "log.jsonl")]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # step 3 once: the resumed run's
    resumed = logged[2:]
    scalars, _, _ = tensorboard_events(run)
    assert sorted(step for step, tag in scalars if tag == "loss") == [1, 2, 3, 4]
    assert scalars[3, "loss"] == pytest.approx(resumed[0]["loss"], rel=1e-6)  # the resumed run's, not the interrupted one's
    assert sorted(step for step, name in csv_rows(run) if name == "loss") == [1, 2, 3, 4]
    assert (run / "wandb" / "run_id").read_text() == run_id
    assert len(glob.glob(str(run / "wandb" / f"offline-run-*-{run_id}"))) == 2


def test_a_run_that_raises_marks_its_wandb_run_failed(tmp_path):
    trainer = Trainer(tiny_cfg('train.log_to=["wandb"]', "train.steps=4", "train.log_every=1"), tmp_path, progress=False)
    step = trainer.train_step

    def fails_at_step_3():
        if trainer.step == 2:
            raise RuntimeError("a failure mid-run")
        return step()

    trainer.train_step = fails_at_step_3
    with pytest.raises(RuntimeError, match="a failure mid-run"):
        trainer.fit()
    assert [row["_step"] for row in wandb_history(tmp_path)] == [1, 2]
    assert [r.exit.exit_code for r in wandb_records(tmp_path) if r.WhichOneof("record_type") == "exit"] == [1]
    assert not (tmp_path / "log.jsonl").exists()  # only the trackers named are written


# --- refusals and units ------------------------------------------------------------------------------------------------
def test_log_to_names_the_trackers_and_jsonl_is_the_default():
    assert tiny_cfg().train.log_to == ["jsonl"]
    assert list(trackers.TRACKERS) == list(typing.get_args(trackers.TrackerName))
    with pytest.raises(ConfigError, match="train.log_to\\[1\\] = 'mlflow' is not valid; choose one of 'jsonl', 'csv', "
                                          "'tensorboard', 'wandb'"):
        tiny_cfg('train.log_to=["jsonl", "mlflow"]')
    with pytest.raises(ConfigError, match="train.log_to must be a list of one of 'jsonl'"):
        tiny_cfg("train.log_to=tensorboard")


@pytest.mark.parametrize("log_to,match", [("[]", "train.log_to is empty"),
                                          ('["csv", "csv"]', "names a tracker twice"),
                                          ('["tensorboard"]', "the tensorboard package is not installed: pip install tensorboard"),
                                          ('["jsonl", "wandb"]', "the wandb package is not installed: pip install wandb")])
def test_a_tracker_that_cannot_run_is_refused_before_anything_is_written(tmp_path, monkeypatch, log_to, match):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a))
    with pytest.raises(ValueError, match=match):
        Trainer(tiny_cfg(f"train.log_to={log_to}"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_scalars_of_flattens_numbers_and_leaves_the_rest():
    record = {"fid": 1.5, "n": 3, "ok": True, "name": "x", "shape": [1, 2], "iou": {"background": 0.25, "cat": None},
              "held_out": {"psnr": 20.0, "deep": {"x": 1}}}
    assert trackers.scalars_of(record) == {"fid": 1.5, "n": 3.0, "ok": 1.0, "iou/background": 0.25, "held_out/psnr": 20.0,
                                           "held_out/deep/x": 1.0}


def test_time_left_is_the_limit_or_the_steps_whichever_ends_first():
    assert time_left(elapsed=100, limit=400, done=10, remaining=1000) == 300  # the limit comes first
    assert time_left(elapsed=100, limit=400, done=10, remaining=5) == 50  # 5 steps at 10 s each
    assert time_left(elapsed=500, limit=400, done=10, remaining=5) == 0
    assert time_left(elapsed=0, limit=400, done=0, remaining=5) == 400  # no rate yet


def test_the_progress_bar_under_a_time_limit_shows_the_time_left(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    Trainer(tiny_cfg("train.steps=3", "train.time_limit=3600"), tmp_path, progress=True).fit()
    err = capsys.readouterr().err
    assert "left=" in err and "(3600 s)" in err, err


def test_a_resume_drops_what_the_interrupted_run_logged_past_its_checkpoint(tmp_path):
    """Resumed at step 3, log.jsonl and log.csv keep steps 1-3 of the interrupted run and go on from there, as
    TensorBoard's purge_step does: no step is logged twice."""
    from diffuse.trackers import Trackers

    first = Trackers(["jsonl", "csv"], tmp_path, 0, {})
    for step in range(1, 6):
        first.scalars(step, {"loss": 1.0 / step})
    first.close()
    again = Trackers(["jsonl", "csv"], tmp_path, 3, {})
    again.scalars(4, {"loss": 0.2})
    again.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    rows = list(csv.reader((tmp_path / "log.csv").read_text().splitlines()))
    assert rows[0] == ["step", "name", "value"] and [int(r[0]) for r in rows[1:]] == [1, 2, 3, 4]
    assert float(rows[-1][2]) == 0.2
