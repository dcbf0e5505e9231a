"""Every file a command writes goes through one atomic-write path (checkpoint.write_atomically): a full disk or a kill -9
leaves the earlier file as it was, and the error names the file, the reason in words and what was kept. Broken files
left by older versions (an empty config.toml, a cut eval.json, a torn log line) get a message naming the file and the
fix, or still load.

The disk-full tests mount a small tmpfs, which needs root (CI runs as root); elsewhere they skip with the reason."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse import checkpoint as ckpt
from diffuse.checkpoint import (WriteError, append_json_record, open_log, read_json_records, read_log, save_checkpoint,
                                write_atomically)
from diffuse.app.cli import main
from diffuse.config import ConfigError, RunConfig, load_config, save_config
from diffuse.visualize import plot_loss, save_gif, save_grid, save_samples

from test_cli import TINY, _sets

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny class-conditional run with post-hoc EMA snapshots (for `diffuse ema`)."""
    out = tmp_path_factory.mktemp("atomic") / "run"
    assert main(["train", "configs/mnist_cond_vp.toml", *_sets(TINY), "--set", "train.ema_snapshot_every=2",
                 "--out", str(out)]) == 0
    return out


class Disk:
    """A small tmpfs: `fill()` takes every free byte, `free()` gives them back."""

    def __init__(self, root: Path):
        self.root, self.filler = root, root / ".filler"

    def fill(self) -> None:
        with open(self.filler, "ab", buffering=0) as f:
            for size in (65536, 4096, 1):  # down to the last byte
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * size)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the disk-full tests mount a small tmpfs, which needs root (CI runs as root)")
    root = tmp_path / "disk"
    root.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield Disk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def _no_litter(folder: Path) -> None:
    assert not [p.name for p in folder.rglob(".*.tmp")], "a failed write left its temporary file behind"


def _assert_full_disk_error(e: WriteError, path: Path, kept: str) -> None:
    text = str(e)
    assert e.errno == errno.ENOSPC and str(path) in text and "no space left on device" in text, text
    assert kept in text and "[Errno" not in text, text


# --- a full disk --------------------------------------------------------------------------------------------------------
def test_every_writer_keeps_the_earlier_file_on_a_full_disk(disk):
    """Each writer (configs, eval records, sample arrays and grids, GIFs, loss plots, checkpoints, logs) first writes a
    file, then fails on the full disk: the error names the file and says the earlier one is kept, which is unchanged."""
    root = disk.root
    x = torch.linspace(-1, 1, 4 * 64).reshape(4, 1, 8, 8)
    big = torch.rand(64, 1, 28, 28) * 2 - 1
    writers = {  # name: (first write, the write that fails)
        "config.toml": (lambda p: save_config(RunConfig(), p),
                        lambda p: save_config(RunConfig(), p) or write_atomically(p, "x" * 100_000)),
        "eval.json": (lambda p: [append_json_record(p, {"fid": float(i), "pad": "x" * 100}) for i in range(15)],
                      lambda p: append_json_record(p, {"fid": 99.0, "pad": "y" * 100_000})),
        "samples.npy": (lambda p: save_samples(x, p), lambda p: save_samples(big, p)),
        "samples.png": (lambda p: save_samples(x, p), lambda p: save_samples(big, p)),
        "grid.png": (lambda p: save_grid(x, p), lambda p: save_grid(big, p, scale=8)),
        "trajectory.gif": (lambda p: save_gif([x, x], p), lambda p: save_gif([big] * 20, p, scale=4)),
        "loss.png": (lambda p: plot_loss([1, 2], [1.0, 0.5], p), lambda p: plot_loss(list(range(1, 999)), [1.0] * 998, p)),
    }
    for name, (first, _) in writers.items():
        first(root / name)
    before = {name: (root / name).read_bytes() for name in writers}
    disk.fill()
    for name, (_, failing) in writers.items():
        with pytest.raises(WriteError) as info:
            failing(root / name)
        _assert_full_disk_error(info.value, root / name, f"the earlier {name} is kept as it was")
        assert (root / name).read_bytes() == before[name], name
    with pytest.raises(WriteError) as info:  # a new file: nothing is left in its place
        save_samples(x, root / "new.png")
    _assert_full_disk_error(info.value, root / "new.png", "nothing was written in its place")
    assert not (root / "new.png").exists()
    _no_litter(root)
    assert len(read_json_records(root / "eval.json")) == 15  # all earlier records are still there
    assert np.load(root / "samples.npy").shape == (4, 1, 8, 8)


def test_checkpoints_and_logs_on_a_full_disk(disk):
    root = disk.root / "run"
    save_checkpoint(root, 1, {"model": {"w": torch.ones(4)}}, {"step": 1})
    with open_log(root / "log.jsonl") as log:
        log.write(json.dumps({"step": 1, "loss": 0.5}) + "\n")
        disk.fill()
        with pytest.raises(WriteError) as info:
            log.write(json.dumps({"step": 2, "loss": 0.4, "pad": "x" * 100_000}) + "\n")
        _assert_full_disk_error(info.value, root / "log.jsonl", "the lines written before are kept")
    with pytest.raises(WriteError) as info:
        save_checkpoint(root, 2, {"model": {"w": torch.ones(100_000)}}, {"step": 2})
    _assert_full_disk_error(info.value, root / "checkpoints" / "step_00000002", "the newest: step 1")
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["step_00000001"]  # no half-written save left
    assert ckpt.load_checkpoint(root).step == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a line cut by the full disk is left out
        assert read_log(root / "log.jsonl")[0] == {"step": 1, "loss": 0.5}


def test_train_on_a_full_disk_leaves_no_empty_config_and_runs_once_there_is_space(disk, capsys):
    out = disk.root / "run"
    args = ["train", "configs/mnist.toml", *_sets(TINY), "--out", str(out)]
    disk.fill()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"could not write {out / 'config.toml'}" in err and "no space left on device" in err, err
    assert not (out / "config.toml").exists()
    disk.free()
    assert main(args) == 0  # the same command, once there is space (it was "holds a run with a different config")
    assert load_config(out / "config.toml").data.source == "digits"


def test_sample_and_eval_on_a_full_disk_keep_the_earlier_files(run, disk, capsys):
    old = disk.root / "old.npy"
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--out", str(old)]) == 0
    before = old.read_bytes()
    erun = disk.root / "erun"  # the run's config and newest checkpoint, and an eval.json of 15 records
    (erun / "checkpoints").mkdir(parents=True)
    (erun / "config.toml").write_bytes((run / "config.toml").read_bytes())
    step = ckpt.latest_step(run)
    os.system(f"cp -r {run / 'checkpoints' / f'step_{step:08d}'} {erun / 'checkpoints'}")
    records = [{"metric": "fid", "fid": float(i), "pad": "x" * 200} for i in range(15)]
    (erun / "eval.json").write_text(json.dumps(records, indent=1))
    evals = (erun / "eval.json").read_bytes()
    disk.fill()
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "64", "--steps", "2", "--out", str(old)]) == 2
    assert "the earlier old.npy is kept as it was" in capsys.readouterr().err
    assert old.read_bytes() == before
    assert main(["eval", str(erun), "--metric", "vlb", "--n", "2", "--vlb-samples", "1"]) == 2
    err = capsys.readouterr().err
    assert f"could not write {erun / 'eval.json'}" in err and "the earlier eval.json is kept as it was" in err, err
    assert (erun / "eval.json").read_bytes() == evals
    disk.free()
    assert main(["eval", str(erun), "--metric", "vlb", "--n", "2", "--vlb-samples", "1"]) == 0
    assert len(read_json_records(erun / "eval.json")) == 16


# --- files broken by older versions --------------------------------------------------------------------------------------
def test_an_empty_or_broken_run_config_names_the_file_and_the_fix(run, tmp_path, capsys):
    new = tmp_path / "new"
    new.mkdir()
    (new / "config.toml").write_text("")
    assert main(["train", "configs/mnist.toml", *_sets(TINY), "--out", str(new)]) == 2
    err = capsys.readouterr().err
    assert f"{new / 'config.toml'} is empty" in err and f"delete {new / 'config.toml'}" in err, err
    assert "different config" not in err  # it was read as the defaults and compared with the command's config
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.toml").write_text("[data\nsource = ")
    (broken / "checkpoints").symlink_to(run / "checkpoints")
    with pytest.raises(ConfigError, match=r"config.toml is not valid TOML .*holds checkpoints .*write the config"):
        load_config(broken / "config.toml")
    other = tmp_path / "c.toml"  # an empty config file of another name is the defaults (a template)
    other.write_text("")
    assert load_config(other) == RunConfig()


def test_a_broken_eval_json_is_refused_before_the_measurement(run, tmp_path, capsys, monkeypatch):
    import diffuse.runs

    erun = tmp_path / "erun"
    os.system(f"cp -r {run} {erun}")
    text = json.dumps([{"metric": "fid", "fid": float(i), "pad": "x" * 200} for i in range(15)], indent=1)
    for broken in (text[:3000], "", '{"fid": 1}'):
        (erun / "eval.json").write_text(broken)
        monkeypatch.setattr(diffuse.runs, "load_run", lambda *a, **k: pytest.fail("loaded the model first"))
        assert main(["eval", str(erun), "--metric", "vlb", "--n", "2"]) == 2
        err = capsys.readouterr().err
        assert f"{erun / 'eval.json'}" in err and f"mv {erun / 'eval.json'} {erun / 'eval.json'}.broken" in err, err
        assert (erun / "eval.json").read_text() == broken  # never overwritten


def test_a_torn_log_line_still_loads_and_the_next_append_starts_a_new_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')  # kill -9 mid-append
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torn last line is no surprise: no warning
        assert [r["step"] for r in read_log(log)] == [1, 2]
    with open_log(log) as f:  # the trainer's append after a resume
        f.write(json.dumps({"step": 3, "loss": 0.3}) + "\n")
    assert log.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "loss": 0.3}\n'
    log.write_text('{"step": 1}\n{"step": 2, "lo{"step": 3}\n{"step": 4}\n')  # a torn line appended to by an old version
    with pytest.warns(UserWarning, match=r"log.jsonl: left out 1 line\(s\) .*\(line 2\)"):
        assert [r["step"] for r in read_log(log)] == [1, 4]
    assert read_log(tmp_path / "none.jsonl") == []


# --- one atomic path for every command ---------------------------------------------------------------------------------
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_recording: list | None = None


def _hook(event, args):
    if _recording is None or event != "open":
        return
    path, mode, flags = args
    if not isinstance(path, (str, bytes, os.PathLike)):
        return
    writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
    if writes:
        _recording.append((os.fsdecode(path), mode if isinstance(mode, str) else "os.open"))


@contextlib.contextmanager
def recorded_writes(root: Path):
    """The files opened for writing below `root` while the block runs, as (path, mode)."""
    global _recording
    if not getattr(recorded_writes, "hooked", False):
        sys.addaudithook(_hook)  # audit hooks stay for the process; it records only inside this block
        recorded_writes.hooked = True
    found: list = []
    _recording = found
    try:
        yield found
    finally:
        _recording = None
        found[:] = [(p, m) for p, m in found if os.path.abspath(p).startswith(str(root.resolve()) + os.sep)]


def _only_temporary_files(written: list, allowed_appends=("log.jsonl",)) -> None:
    """Every file opened for writing is a temporary `.NAME.*.tmp` (renamed into place whole) or an appended log."""
    direct = [(p, m) for p, m in written
              if not (Path(p).name.startswith(".") and Path(p).name.endswith(".tmp"))
              and not (Path(p).name in allowed_appends and m in ("a", "rb+"))]
    assert not direct, f"written in place, not through checkpoint.write_atomically: {direct}"


def test_every_command_writes_through_the_atomic_path(run, tmp_path):
    """sample, edit (and its figure), eval, ema and train open no file for writing under its own name: each is written
    to a temporary name and renamed into place (log.jsonl, appended line by line, is the one exception)."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8), "L").save(tmp_path / "in.png")
    erun = tmp_path / "erun"
    os.system(f"cp -r {run} {erun}")
    with recorded_writes(tmp_path) as written:
        for args in (["sample", str(erun), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.npy")],
                     ["sample", str(erun), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.png")],
                     ["edit", "sdedit", str(erun), "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--steps", "2",
                      "--n", "2", "--out", str(tmp_path / "e.png")],
                     ["eval", str(erun), "--metric", "vlb", "--n", "2", "--vlb-samples", "1"],
                     ["ema", str(erun), "--sigma-rel", "0.1", "--out", str(tmp_path / "ema")],
                     ["train", "configs/mnist_cond_vp.toml", *_sets(TINY), "--set", "train.sample_every=2",
                      "--out", str(tmp_path / "train")]):
            assert main(args) == 0, args
    names = {Path(p).name for p, _ in written}
    for name in ("s.npy", "s.png", "e.png", "e_before_after.png", "eval.json", "config.toml", "loss.png", "manifest.json",
                 "step_00000002.png"):
        assert any(n.startswith(f".{name}.") for n in names), f"{name} was not written (or not atomically): {sorted(names)}"
    _only_temporary_files(written)


# --- kill -9 at any moment ---------------------------------------------------------------------------------------------------
# One "zygote" imports torch and diffuse once and forks a child per round that runs sample, edit, eval and ema over and
# over on the same outputs; the test SIGKILLs the child at a random moment and checks that every file written before
# still loads.
_ZYGOTE = r"""
import os, sys, traceback, warnings
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(1)
from diffuse.app.cli import main

run, out = sys.argv[1], sys.argv[2]
commands = [
    ["sample", run, "--n", "3", "--steps", "2", "--out", f"{out}/s.npy"],
    ["sample", run, "--n", "3", "--steps", "2", "--out", f"{out}/s.png"],
    ["edit", "sdedit", run, "--image", f"{out}/in.png", "--strength", "0.5", "--steps", "2", "--n", "2", "--out", f"{out}/e.png"],
    ["eval", run, "--metric", "vlb", "--n", "2", "--vlb-samples", "1"],
    ["ema", run, "--sigma-rel", "0.1", "--out", f"{out}/ema"],
]
for line in sys.stdin:
    first = int(line)
    pid = os.fork()
    if pid == 0:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)  # the command's own output must not reach the zygote's pipe
            k = first
            while True:
                if main(commands[k % len(commands)]) != 0:
                    os._exit(3)
                k += 1
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


def _check_outputs(out: Path, run: Path, n_evals: int) -> int:
    """Every output written so far loads; returns the number of eval records (never fewer than before)."""
    from diffuse.runs import load_run

    if (out / "s.npy").exists():
        assert np.load(out / "s.npy").shape == (3, 1, 8, 8)
    for name in ("s.png", "e.png", "e_before_after.png"):
        if (out / name).exists():
            with Image.open(out / name) as img:
                img.load()
    records = read_json_records(run / "eval.json")
    assert len(records) >= n_evals
    if (out / "ema" / "config.toml").exists():
        load_config(out / "ema" / "config.toml")
        if (out / "ema" / "checkpoints").is_dir():
            with warnings.catch_warnings():
                warnings.simplefilter("error", ckpt.CheckpointWarning)  # no invalid checkpoint is ever exposed
                with contextlib.suppress(FileNotFoundError):  # killed before its first checkpoint committed
                    load_run(out / "ema")
    return len(records)


@pytest.mark.slow
def test_kill_during_sample_edit_eval_and_ema_leaves_every_earlier_file_loadable(run, tmp_path):
    erun, out = tmp_path / "erun", tmp_path / "out"
    os.system(f"cp -r {run} {erun}")
    out.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8), "L").save(out / "in.png")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1"}
    zygote = subprocess.Popen([sys.executable, "-c", _ZYGOTE, str(erun), str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    watchdog = threading.Timer(420, zygote.kill)  # never hang the test suite
    watchdog.start()
    rng = random.Random(38)
    n_evals, kills = 0, 0
    try:
        first_round = ("s.npy", "s.png", "e.png", "e_before_after.png", "ema/config.toml")
        for k, delay in enumerate([None] + [rng.uniform(0.05, 2.0) for _ in range(10)]):
            zygote.stdin.write(f"{k}\n")
            zygote.stdin.flush()
            child = int(zygote.stdout.readline())
            if delay is None:  # first: every command once (however busy the machine), then the kill
                deadline = time.monotonic() + 180
                while not all((out / name).exists() for name in first_round) and time.monotonic() < deadline:
                    threading.Event().wait(0.2)
            else:
                threading.Event().wait(delay)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            status = int(zygote.stdout.readline())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "a command failed by itself (stderr)"
            kills += 1
            n_evals = _check_outputs(out, erun, n_evals)
    finally:
        watchdog.cancel()
        zygote.stdin.close()
        zygote.wait(timeout=30)
    assert kills == 11 and n_evals >= 1
    for name in ("s.npy", "s.png", "e.png", "e_before_after.png", "ema/config.toml"):
        assert (out / name).exists(), f"{name} was never written in the first round"


# --- what the trainer and the post-hoc EMA write -------------------------------------------------------------------------
def test_a_resumed_run_appends_after_a_torn_log_line_on_a_line_of_its_own(tmp_path):
    out = tmp_path / "run"
    args = ["train", "configs/mnist.toml", *_sets(TINY), "--set", "train.log_every=1", "--out", str(out)]
    assert main(args[:-2] + ["--set", "train.steps=2"] + args[-2:]) == 0
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # kill -9 mid-append
    assert main(args) == 0  # resumes to train.steps = 4
    lines = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # the torn part is cut, no line merged


def test_a_post_hoc_ema_snapshot_on_a_full_disk_names_the_file(disk):
    from diffuse.ema import PowerEMA

    ema = PowerEMA(torch.nn.Linear(256, 256), [0.05, 0.1])
    ema.update(torch.nn.Linear(256, 256), 1)
    disk.fill()
    with pytest.raises(WriteError) as info:
        ema.save_snapshot(disk.root / "ema_snapshots", 1)
    _assert_full_disk_error(info.value, disk.root / "ema_snapshots" / "phema_00000001.safetensors", "nothing was written")
    _no_litter(disk.root)
