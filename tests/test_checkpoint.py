"""Tests for diffuse.checkpoint: round trips, pruning, corruption, kill -9 mid-save, no pickle."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import diffuse.checkpoint as ck
from diffuse.checkpoint import (
    CheckpointWarning,
    capture_rng,
    flatten_state,
    generator_state,
    latest_step,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    set_generator_state,
    unflatten_state,
)


def _entries(run: Path) -> list[str]:
    return sorted(os.listdir(run / "checkpoints"))


def _simple(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {"w": torch.full((64, 32), value)}, "ema": {"w": torch.full((64, 32), value)}}


def _same(a, b) -> bool:
    """Deep equality that also demands identical types, dtypes and shapes; nan equals nan."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        same_keys = list(a) == list(b) and all(type(k) is type(k2) for k, k2 in zip(a, b))
        return same_keys and all(_same(a[k], b[k]) for k in a)
    return a == b


# --------------------------------------------------------------------------------------------- round trip


def test_round_trip_dtypes_and_state(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    model = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 3).to(torch.bfloat16),
        "f64": torch.randn(4, dtype=torch.float64),
        "i64": torch.tensor([-(2**62), 0, 2**62], dtype=torch.int64),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "transposed": base.t(),  # non-contiguous
        "strided": base[:, ::2],  # non-contiguous view of the same storage
        "base": base,
        "row": base[1],  # contiguous view of the same storage: safetensors refuses shared memory
        "tied": base,  # the same tensor under two names, like tied embeddings
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    state = {"step": 100, "lr": 1e-4, "best": float("inf"), "nan": float("nan"), "name": "ddpm",
             "flags": [True, None, {"deep": [1, 2.5]}]}
    path = save_checkpoint(tmp_path, 100, {"model": model, "ema": {"w": torch.ones(3)}}, state)

    assert path == tmp_path / "checkpoints" / "step_00000100"
    assert sorted(os.listdir(path)) == ["ema.safetensors", "manifest.json", "model.safetensors", "state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 100
    assert {n: m["size"] for n, m in manifest["files"].items()} == {
        n: (path / n).stat().st_size for n in ["ema.safetensors", "model.safetensors", "state.json"]
    }

    ckpt = load_checkpoint(tmp_path)
    assert (ckpt.step, ckpt.path) == (100, path)
    assert set(ckpt.tensors) == {"model", "ema"}
    for name, t in model.items():
        assert _same(ckpt.tensors["model"][name], t.detach().contiguous()), name
    assert _same(ckpt.state, state)
    assert _same(load_checkpoint(tmp_path, step=100).tensors["ema"]["w"], torch.ones(3))


def test_no_checkpoint_errors(tmp_path):
    assert latest_step(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_checkpoint(tmp_path / "missing-run")
    save_checkpoint(tmp_path, 5, _simple(5.0), {})
    assert latest_step(tmp_path) == 5
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 7 .*available steps: \[5\]"):
        load_checkpoint(tmp_path, step=7)


@pytest.mark.parametrize(
    ("tensors", "state", "error", "match"),
    [
        ({"../evil": {"w": torch.ones(1)}}, {}, ValueError, "not a valid file stem"),
        ({"a b": {"w": torch.ones(1)}}, {}, ValueError, "not a valid file stem"),
        ({"model": {"w": [1.0]}}, {}, TypeError, r"tensors\['model'\]\['w'\] is a list"),
        ({"model": torch.ones(1)}, {}, TypeError, "flat dict"),
        ({}, {"opt": {"lr": torch.tensor(1.0)}}, TypeError, r"state\['opt'\]\['lr'\] is a Tensor"),
        ({}, {"betas": (0.9, 0.99)}, TypeError, r"state\['betas'\] is a tuple.*flatten_state"),
        ({}, {"per_param": {0: 1.0}}, TypeError, r"state\['per_param'\] has the int key 0"),
        ({}, {"x": [np.int64(3)]}, TypeError, r"state\['x'\]\[0\] is a numpy.int64"),
    ],
)
def test_bad_arguments_name_the_problem_and_write_nothing(tmp_path, tensors, state, error, match):
    with pytest.raises(error, match=match):
        save_checkpoint(tmp_path, 1, tensors, state)
    assert not (tmp_path / "checkpoints").exists() or _entries(tmp_path) == []


# --------------------------------------------------------------------------------------------- commit and prune


def test_keep_prunes_to_newest(tmp_path):
    for step in (100, 200, 300, 400, 500):
        save_checkpoint(tmp_path, step, _simple(step), {"step": step}, keep=2)
    assert _entries(tmp_path) == ["step_00000400", "step_00000500"]
    save_checkpoint(tmp_path, 600, _simple(600), {"step": 600}, keep=3)
    save_checkpoint(tmp_path, 700, _simple(700), {"step": 700}, keep=None)
    assert _entries(tmp_path) == ["step_00000400", "step_00000500", "step_00000600", "step_00000700"]
    assert load_checkpoint(tmp_path).state == {"step": 700}
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 800, _simple(800), {}, keep=0)


def test_prune_only_after_commit_and_stale_tmp_cleanup(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 100, _simple(100), {"step": 100}, keep=2)
    save_checkpoint(tmp_path, 200, _simple(200), {"step": 200}, keep=2)
    # a crashed save from another process: half-written, no manifest
    stale = tmp_path / "checkpoints" / ".tmp-step_00000900-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")

    real_replace = os.replace

    def crash_on_commit(src, dst):
        if Path(src).name.startswith(".tmp-step_00000300"):
            raise OSError("simulated crash before the commit rename")
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash_on_commit)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 300, _simple(300), {"step": 300}, keep=2)
    monkeypatch.setattr(ck.os, "replace", real_replace)

    # nothing was pruned by the failed save, and neither .tmp folder counts as a checkpoint
    assert [e for e in _entries(tmp_path) if e.startswith("step_")] == ["step_00000100", "step_00000200"]
    assert sum(e.startswith(".tmp-") for e in _entries(tmp_path)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(tmp_path).state == {"step": 200}
    assert latest_step(tmp_path) == 200

    save_checkpoint(tmp_path, 300, _simple(300), {"step": 300}, keep=2)
    assert _entries(tmp_path) == ["step_00000200", "step_00000300"]


def test_resave_same_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 100, _simple(1.0), {"v": 1})
    save_checkpoint(tmp_path, 100, _simple(2.0), {"v": 2})
    assert _entries(tmp_path) == ["step_00000100"]  # no .old-* or .tmp-* left behind
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.state == {"v": 2} and torch.equal(ckpt.tensors["model"]["w"], torch.full((64, 32), 2.0))


def test_crash_between_the_two_renames_of_a_resave(tmp_path):
    save_checkpoint(tmp_path, 100, _simple(1.0), {"v": 1})
    ckdir = tmp_path / "checkpoints"
    os.rename(ckdir / "step_00000100", ckdir / ".old-step_00000100-4242")  # old copy moved aside, new not in yet
    assert latest_step(tmp_path) == 100
    assert load_checkpoint(tmp_path, step=100).state == {"v": 1}
    save_checkpoint(tmp_path, 100, _simple(2.0), {"v": 2})
    assert _entries(tmp_path) == ["step_00000100"]
    assert load_checkpoint(tmp_path).state == {"v": 2}


def test_prune_counts_only_valid_checkpoints(tmp_path):
    for step in (100, 200):
        save_checkpoint(tmp_path, step, _simple(step), {"step": step}, keep=3)
    (tmp_path / "checkpoints" / "step_00000200" / "manifest.json").unlink()
    save_checkpoint(tmp_path, 300, _simple(300), {"step": 300}, keep=2)
    assert _entries(tmp_path) == ["step_00000100", "step_00000300"]


def test_saving_an_older_step_keeps_it(tmp_path):
    for step in (100, 200, 300):
        save_checkpoint(tmp_path, step, _simple(step), {"step": step}, keep=3)
    save_checkpoint(tmp_path, 150, _simple(150), {"step": 150}, keep=2)  # e.g. resumed from step 100
    assert _entries(tmp_path) == ["step_00000150", "step_00000300"]


# --------------------------------------------------------------------------------------------- corruption


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: safetensors would still parse it, only the hash notices
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _wrong_hash(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.safetensors"]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))


CORRUPTIONS = {
    "flipped byte": (lambda d: _flip_byte(d / "model.safetensors"), "model.safetensors does not match its sha256"),
    "truncated": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors has .* bytes"),
    "missing manifest": (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    "wrong hash": (_wrong_hash, "model.safetensors does not match its sha256"),
    "garbled manifest": (lambda d: (d / "manifest.json").write_text("{not json"), "manifest.json is unreadable"),
    "unlisted file": (lambda d: (d / "extra.safetensors").write_bytes(b"x"), "files not named in manifest.json: extra"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupted_checkpoint_is_skipped(tmp_path, kind):
    corrupt, reason = CORRUPTIONS[kind]
    for step in (100, 200):
        save_checkpoint(tmp_path, step, _simple(step), {"step": step}, keep=5)
    corrupt(tmp_path / "checkpoints" / "step_00000200")

    with pytest.warns(CheckpointWarning) as record:
        ckpt = load_checkpoint(tmp_path)
    assert len(record) == 1
    assert "step_00000200" in str(record[0].message) and re.search(reason, str(record[0].message))
    assert ckpt.step == 100 and ckpt.state == {"step": 100}
    assert torch.equal(ckpt.tensors["model"]["w"], torch.full((64, 32), 100.0))
    assert latest_step(tmp_path) == 100
    with pytest.raises(ValueError, match=f"step_00000200 is invalid: {reason}"):
        load_checkpoint(tmp_path, step=200)

    corrupt(tmp_path / "checkpoints" / "step_00000100")
    both = f"all 2 checkpoints .* invalid: step_00000200: {reason}.*step_00000100: {reason}"
    with pytest.raises(FileNotFoundError, match=both):
        load_checkpoint(tmp_path)
    assert latest_step(tmp_path) is None


def test_manifest_of_another_step_is_rejected(tmp_path):
    save_checkpoint(tmp_path, 100, _simple(100), {})
    ckdir = tmp_path / "checkpoints"
    os.rename(ckdir / "step_00000100", ckdir / "step_00000200")  # copied under the wrong name
    with pytest.raises(ValueError, match="manifest.json says step 100"):
        load_checkpoint(tmp_path, step=200)


# --------------------------------------------------------------------------------------------- kill -9 mid-save

# Importing torch takes seconds, so one "zygote" process imports it once and forks a fresh saver
# per round; the test SIGKILLs that saver at a random moment of its save loop.
_ZYGOTE = r"""
import os, sys, traceback
import torch
from diffuse.checkpoint import latest_step, save_checkpoint

run = sys.argv[1]
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            step = latest_step(run) + 1
            while True:
                v = float(step)
                tensors = {
                    "model": {"w": torch.full((512, 1024), v), "n": torch.full((3,), step, dtype=torch.int64)},
                    "ema": {"w": torch.full((512, 1024), v)},
                }
                save_checkpoint(run, step, tensors, {"step": step}, keep=2)
                step += 1
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


def _assert_consistent(ckpt) -> None:
    """Every value equals the step, so files from two different saves cannot pass."""
    s = ckpt.step
    assert ckpt.state == {"step": s}
    assert torch.equal(ckpt.tensors["model"]["w"], torch.full((512, 1024), float(s)))
    assert torch.equal(ckpt.tensors["model"]["n"], torch.full((3,), s, dtype=torch.int64))
    assert torch.equal(ckpt.tensors["ema"]["w"], torch.full((512, 1024), float(s)))


def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, 0, {"model": {"w": torch.zeros(512, 1024), "n": torch.zeros(3, dtype=torch.int64)},
                             "ema": {"w": torch.zeros(512, 1024)}}, {"step": 0})
    repo = str(Path(ck.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    zygote = subprocess.Popen([sys.executable, "-c", _ZYGOTE, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(60, zygote.kill)  # never hang the test suite
    watchdog.start()
    rng = random.Random(20240611)
    last = 0
    try:
        for delay in [rng.uniform(0, 0.3) for _ in range(6)]:
            zygote.stdin.write("go\n")
            zygote.stdin.flush()
            child = int(zygote.stdout.readline())
            threading.Event().wait(delay)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            status = int(zygote.stdout.readline())
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            assert killed, "the saver failed by itself (see stderr)"

            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a kill must never expose an invalid step_* folder
                ckpt = load_checkpoint(run)
            _assert_consistent(ckpt)
            assert ckpt.step >= last  # pruning never removed the newest committed checkpoint
            assert latest_step(run) == ckpt.step
            last = ckpt.step
    finally:
        watchdog.cancel()
        zygote.stdin.close()
        zygote.wait(timeout=30)
    assert last > 0, "no save completed between kills"

    save_checkpoint(run, last + 1, {"model": {"w": torch.ones(1)}}, {"step": last + 1}, keep=2)
    assert _entries(run) == [f"step_{last:08d}", f"step_{last + 1:08d}"]  # crash leftovers cleaned


# --------------------------------------------------------------------------------------------- no pickle


def test_loading_never_unpickles(tmp_path, monkeypatch):
    _, skeleton = flatten_state({"a": (1, 2)})
    save_checkpoint(tmp_path, 1, _simple(1.0), {"opt": skeleton})

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during load")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    ckpt = load_checkpoint(tmp_path)
    assert latest_step(tmp_path) == 1
    assert torch.equal(ckpt.tensors["model"]["w"], torch.ones(64, 32))
    assert unflatten_state({}, ckpt.state["opt"]) == {"a": (1, 2)}


# --------------------------------------------------------------------------------------------- flatten / unflatten


def test_flatten_round_trip_preserves_types():
    obj = {
        0: {"t": torch.arange(3), "tuple": (1, 2.0, (None, "x")), "empty": ((), [], {})},
        "0": torch.ones(2, dtype=torch.bfloat16),  # same path name as key 0: must not collide
        "floats": [float("nan"), float("inf"), -float("inf"), -0.0, 1e-300, 1.0],
        "scalars": [True, False, None, 7, -(2**70), "s"],
        "a.b": torch.zeros(1),
        "a": {"b": torch.ones(1)},  # also flattens to "a.b"
        "__tuple__": [1],  # a key that looks like a tag
        "list_of_tensors": [torch.tensor(1.5), torch.tensor([True])],
        5: [{"nested": (torch.eye(2),)}],
    }
    tensors, skeleton = flatten_state(obj, prefix="opt")
    assert all(name.startswith("opt.") for name in tensors)
    assert {"opt.a.b", "opt.a.b~1", "opt.0", "opt.0.t"} <= set(tensors)
    assert len(tensors) == 7 and all(isinstance(t, torch.Tensor) for t in tensors.values())
    skeleton = json.loads(json.dumps(skeleton))  # the skeleton is JSON
    assert _same(unflatten_state(tensors, skeleton), obj)


def test_flatten_rejects_unsupported_values():
    with pytest.raises(TypeError, match=r"obj\['x'\]\[1\] is a numpy.ndarray"):
        flatten_state({"x": [1, np.zeros(2)]})
    with pytest.raises(TypeError, match="float key 1.5"):
        flatten_state({1.5: 0})
    with pytest.raises(KeyError, match="tensor 'gone'"):
        unflatten_state({}, {"__tensor__": "gone"})


def _train(model, opt, sched, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _make(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99), amsgrad=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def test_adam_state_dict_round_trip_through_checkpoint(tmp_path):
    model, opt, sched = _make(0)
    _train(model, opt, sched, 3, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)

    opt_t, opt_s = flatten_state(opt.state_dict())
    sch_t, sch_s = flatten_state(sched.state_dict())
    sc_t, sc_s = flatten_state(scaler.state_dict())
    save_checkpoint(tmp_path, 3, {"model": model.state_dict(), "optimizer": opt_t, "scheduler": sch_t, "scaler": sc_t},
                    {"optimizer": opt_s, "scheduler": sch_s, "scaler": sc_s})

    ckpt = load_checkpoint(tmp_path)
    restored_opt_sd = unflatten_state(ckpt.tensors["optimizer"], ckpt.state["optimizer"])
    assert _same(restored_opt_sd, opt.state_dict())  # int param ids, tuples (betas), 0-dim step tensors
    assert _same(unflatten_state(ckpt.tensors["scheduler"], ckpt.state["scheduler"]), sched.state_dict())
    assert _same(unflatten_state(ckpt.tensors["scaler"], ckpt.state["scaler"]), scaler.state_dict())

    model2, opt2, sched2 = _make(99)  # different init: everything must come from the checkpoint
    model2.load_state_dict(ckpt.tensors["model"])
    opt2.load_state_dict(restored_opt_sd)
    sched2.load_state_dict(unflatten_state(ckpt.tensors["scheduler"], ckpt.state["scheduler"]))
    _train(model, opt, sched, 4, seed=2)
    _train(model2, opt2, sched2, 4, seed=2)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"] == 1e-2 * 0.5**3


# --------------------------------------------------------------------------------------------- RNG


def _draw() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
            torch.rand(4).tolist(), torch.randn(2).tolist())


def test_rng_round_trip_through_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()  # leaves cached gaussians (python gauss_next, numpy has_gauss) in the state
    tensors, state = capture_rng()
    json.dumps(state)
    save_checkpoint(tmp_path, 1, {"rng": tensors}, {"rng": state})
    first = _draw()
    assert _draw() != first  # the generators really advance

    ckpt = load_checkpoint(tmp_path)
    restore_rng(ckpt.tensors["rng"], ckpt.state["rng"])
    assert _draw() == first
    restore_rng(tensors, state)  # in memory as well
    assert _draw() == first
    with pytest.raises(ValueError, match="capture_rng"):
        restore_rng({}, state)


def test_generator_state_helpers(tmp_path):
    g = torch.Generator().manual_seed(123)
    torch.rand(5, generator=g)
    save_checkpoint(tmp_path, 1, {"rng": {"sampler": generator_state(g)}}, {})
    expected = torch.rand(5, generator=g)
    g2 = torch.Generator()
    set_generator_state(g2, load_checkpoint(tmp_path).tensors["rng"]["sampler"])
    assert torch.equal(torch.rand(5, generator=g2), expected)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    """checkpoint.load_weights: a strict load, or a ValueError naming the config, the weights and what differs (torch's
    own RuntimeError was a traceback)."""
    from diffuse.checkpoint import load_weights

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    good = {k: v.clone() + 1 for k, v in net.state_dict().items()}
    assert load_weights(net, good, config="RUN/config.toml", weights="step_00000004") is net
    assert torch.equal(net[0].weight, good["0.weight"])
    wider = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"^RUN/config.toml does not match the weights step_00000004: 3 tensors differ "
                                         r"in shape \(e\.g\. 0\.weight: \[4, 3\] in the weights, \[8, 3\] in the network "
                                         r"config.toml describes\); .*restore the config"):
        load_weights(wider, good, config="RUN/config.toml", weights="step_00000004")
    deeper = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"2 tensors the network of config.toml has are not in the weights \(e\.g\. 2\.weight\)"):
        load_weights(deeper, good, config="RUN/config.toml", weights="w")
    with pytest.raises(ValueError, match=r"2 tensors of the weights have no place in it \(e\.g\. 1\.weight\)"):
        load_weights(torch.nn.Sequential(torch.nn.Linear(3, 4)), good, config="RUN/config.toml", weights="w")
