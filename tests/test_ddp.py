"""DistributedDataParallel on CPU with gloo: 2 processes compute what 1 process computes.

The Trainer draws every random number of a step (data order, flips, t, eps, dropout masks) for
the whole global batch and lets each process take its slice, so the DDP-averaged gradient of a
2-process step must equal the single-process gradient, and a few full `fit()` steps must end at
the same weights. Rank 0 alone writes to the (shared) run folder.

This file is also the worker script. The test starts it twice with the environment torchrun
gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which is what
`python -m torch.distributed.run --nproc_per_node 2 tests/test_ddp.py IMAGES RUNS OUT` does,
minus the launcher's own start-up (importing torch once more costs seconds on 2 cores).
The data is a small image folder rather than the bundled digits so that the workers need not
import scikit-learn.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import start_workers, wait_workers

STEPS = 3
WORLD = 2


def tiny_cfg(images: Path):
    from diffuse.config import RunConfig, apply_overrides

    return apply_overrides(RunConfig(), [
        "data.source=folder", f"data.path={json.dumps(str(images))}", "data.image_size=8", "data.channels=1",
        "schedule.T=100",
        "model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.norm_groups=4",
        "model.attention_resolutions=[4]", "model.dropout=0.2",
        "train.batch_size=8", f"train.steps={STEPS}", "train.lr=1e-3", "train.warmup_steps=2", "train.hflip=true",
        "train.ema_decay=0.9", "train.log_every=100", "train.sample_every=0", "train.checkpoint_every=2",
        "train.mixed_precision=no",  # fp32: these tests compare the sharded step's sums with one process's to 1e-5
        'train.log_to=["jsonl", "csv", "tensorboard"]',  # rank 0 tracks (test_ddp_only_rank0_writes)
    ])


def make_images(folder: Path, n: int = 20) -> Path:
    """n random 8x8 grayscale PNGs (2 epochs of batch 8 in 3 steps: the epoch reshuffle is exercised)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(folder / f"{i:03d}.png")
    return folder


def perturb(model: torch.nn.Module) -> None:
    """Move every weight off its initial value (zero-initialised layers make most gradients 0 at step 0)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


# --- the worker -----------------------------------------------------------------------------------
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_CHANGE_EVENTS = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "os.link",
                  "os.symlink", "os.chmod", "os.utime"}


def _record_writes(root: Path, log: list) -> None:
    """Record, through an audit hook, every file-system change this process makes below `root`."""
    root_s = str(root.resolve()) + os.sep

    def under(p) -> bool:
        try:
            return os.path.abspath(os.fsdecode(p)).startswith(root_s)
        except TypeError:  # a file descriptor
            return False

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
            if writes and under(path):
                log.append([event, os.fsdecode(path)])
        elif event in _CHANGE_EVENTS and args and under(args[0]):
            log.append([event, os.fsdecode(args[0])])

    sys.addaudithook(hook)


def _worker(images: Path, run_root: Path, out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from diffuse.train import Trainer

    rank = int(os.environ["RANK"])
    writes: list = []
    _record_writes(run_root, writes)
    cfg = tiny_cfg(images)

    trainer = Trainer(cfg, run_root / "grad", progress=False)
    assert (trainer.rank, trainer.world) == (rank, WORLD), (trainer.rank, trainer.world)
    perturb(trainer.model)  # the same on both ranks
    loss = trainer.loss_and_backward()
    if rank == 0:
        save_file({n: p.grad.contiguous() for n, p in trainer.model.named_parameters()}, str(out / "grads.safetensors"))
        save_file({"loss": loss.detach().reshape(1)}, str(out / "loss.safetensors"))

    trainer = Trainer(cfg, run_root / "fit", progress=False)
    trainer.fit()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, str(out / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in trainer.ema.model.state_dict().items()}, str(out / "ema.safetensors"))
    dist.barrier()
    dist.destroy_process_group()
    (out / f"writes_rank{rank}.json").write_text(json.dumps(writes))


KILL_STEPS = 30


def kill_cfg(images: Path):
    """tiny_cfg trained longer, with every file the trainer writes: checkpoints, log lines, loss plots, sample grids and
    post-hoc EMA snapshots every few steps."""
    from diffuse.config import apply_overrides

    return apply_overrides(tiny_cfg(images), [
        f"train.steps={KILL_STEPS}", "train.log_every=1", "train.checkpoint_every=3", "train.sample_every=4",
        "sample.n=4", "sample.steps=2", "train.posthoc_ema=[0.1]", "train.ema_snapshot_every=3"])


def _fit_worker(images: Path, run: Path) -> None:
    """Train (or resume) kill_cfg into `run` on this process's rank."""
    import torch.distributed as dist

    from diffuse.train import Trainer

    Trainer(kill_cfg(images), run, progress=False).fit()
    dist.barrier()
    dist.destroy_process_group()


# --- the test process ---------------------------------------------------------------------------------
def _start(images: Path, run_root: Path, out: Path, *extra: str) -> tuple[list, list[Path]]:
    """Start WORLD workers as torchrun would (this file with IMAGES RUNS OUT [fit]); returns (processes, their logs)."""
    logs = [out / f"rank{r}{'_'.join(('', *extra))}.log" for r in range(WORLD)]
    return start_workers([__file__, str(images), str(run_root), str(out), *extra], logs), logs


def _launch(images: Path, run_root: Path, out: Path, *extra: str, timeout: float = 180) -> None:
    """Start WORLD workers as torchrun would; fail with their output if one fails or they hang."""
    wait_workers(*_start(images, run_root, out, *extra), timeout)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, images):
    """Run the 2-process job once; returns (run root, output folder)."""
    base = tmp_path_factory.mktemp("ddp")
    run_root, out = base / "runs", base / "out"
    run_root.mkdir()
    out.mkdir()
    _launch(images, run_root, out)
    return run_root, out


@pytest.fixture(scope="module")
def single(tmp_path_factory, images):
    """The same work in this one process: grads of one loss_and_backward, weights after fit()."""
    from diffuse.train import Trainer

    assert int(os.environ.get("WORLD_SIZE", "1")) == 1
    base = tmp_path_factory.mktemp("single")
    cfg = tiny_cfg(images)
    trainer = Trainer(cfg, base / "grad", progress=False)
    assert trainer.world == 1
    perturb(trainer.model)
    loss = trainer.loss_and_backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer = Trainer(cfg, base / "fit", progress=False)
    trainer.fit()
    return {"loss": loss.reshape(1), "grads": grads, "model": trainer.model.state_dict(),
            "ema": trainer.ema.model.state_dict(), "run": base / "fit"}


@pytest.mark.slow
def test_ddp_gradients_equal_single_process(ddp_run, single):
    from safetensors.torch import load_file

    _, out = ddp_run
    grads = load_file(str(out / "grads.safetensors"))
    assert grads.keys() == single["grads"].keys()
    # the comparison means something: every parameter has a non-zero gradient
    assert all(g.abs().sum() > 0 for g in single["grads"].values())
    for name, g in single["grads"].items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")
    torch.testing.assert_close(load_file(str(out / "loss.safetensors"))["loss"], single["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ddp_fit_matches_single_process(ddp_run, single):
    from safetensors.torch import load_file

    _, out = ddp_run
    for group in ("model", "ema"):
        got = load_file(str(out / f"{group}.safetensors"))
        assert got.keys() == single[group].keys()
        for name, w in single[group].items():
            torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{group} {name}: {m}")


@pytest.mark.slow
def test_ddp_only_rank0_writes(ddp_run, single):
    from diffuse import checkpoint as ckpt

    run_root, out = ddp_run
    writes = [json.loads((out / f"writes_rank{r}.json").read_text()) for r in range(WORLD)]
    for r in range(1, WORLD):
        assert writes[r] == [], f"rank {r} wrote into the run folder: {writes[r][:10]}"
    written = {Path(p).name for _, p in writes[0]}
    assert {"log.jsonl", "log.csv"} <= written and any(n.startswith("events.out.tfevents") for n in written)  # rank 0 tracks
    # the hook sees rank 0's writes: the logs appended, every other file atomically,
    for name in ("config.toml", "loss.png", "manifest.json"):  # to a temporary name (checkpoint.write_atomically)
        assert any(n.startswith(f".{name}.") and n.endswith(".tmp") for n in written), (name, sorted(written))
    # the shared run folder holds one run, laid out like the single-process run
    run = run_root / "fit"
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in single["run"].iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", f"step_{STEPS:08d}"]
    lines = (run / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [STEPS]  # one line, not one per rank
    c = ckpt.load_checkpoint(run)
    assert (c.step, c.state["world_size"]) == (STEPS, WORLD)


@pytest.mark.slow
def test_kill_during_a_two_process_run_leaves_every_file_loadable_and_it_resumes(tmp_path, images):
    """kill -9 of both workers mid-run: config.toml, log.jsonl, loss.png, the sample grids, the newest checkpoint and the
    post-hoc EMA snapshots all load; the same command then resumes the run to its end."""
    import random
    import signal
    import warnings

    from PIL import Image

    from diffuse import checkpoint as ckpt
    from diffuse.config import load_config
    from diffuse.ema import list_snapshots

    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    procs, logs = _start(images, tmp_path, out, "fit")
    try:
        deadline = time.monotonic() + 120
        while len(ckpt.read_log(run / "log.jsonl")) < 4:  # training has started: kill it at a random moment after
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                "\n".join(f.read_text()[-3000:] for f in logs)
            time.sleep(0.05)
        time.sleep(random.Random(38).uniform(0.0, 1.0))
    finally:
        for p in procs:  # only our own workers, by their Popen handle
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
    logged = ckpt.read_log(run / "log.jsonl")  # a torn last line is left out
    assert 4 <= len(logged) < KILL_STEPS, "the kill came after the end: nothing was tested"
    load_config(run / "config.toml")
    for png in [run / "loss.png", *sorted((run / "samples").glob("*.png"))]:
        with Image.open(png) as img:
            img.load()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ckpt.CheckpointWarning)  # no invalid checkpoint is ever exposed
        last = ckpt.load_checkpoint(run).step
    list_snapshots(run / "ema_snapshots")
    _launch(images, tmp_path, out, "fit")  # the same command resumes
    c = ckpt.load_checkpoint(run)
    assert (c.step, c.state["world_size"]) == (KILL_STEPS, WORLD) and last < KILL_STEPS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a line torn by the kill and appended to after the resume is left out
        steps = [r["step"] for r in ckpt.read_log(run / "log.jsonl") if "loss" in r]
    assert steps[-1] == KILL_STEPS and set(range(last + 1, KILL_STEPS + 1)) <= set(steps)


@pytest.mark.slow
def test_two_machines_through_a_c10d_rendezvous_train_as_one_process(tmp_path, images, single):
    """Two "machines" on this host, each `torchrun --nnodes 2 --nproc-per-node 1` with the c10d rendezvous on
    127.0.0.1 (the README's multi-node command, with gloo on CPUs), train the run one process trains."""
    import socket
    import subprocess

    from diffuse import checkpoint as ckpt
    from diffuse.config import save_config

    config = tmp_path / "tiny.toml"
    save_config(tiny_cfg(images), config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "PYTEST_"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "diffuse-test", "--local-addr", "127.0.0.1",
            "--max-restarts", "0", "-m", "diffuse", "train", str(config), "--out", str(run)]
    logs = [tmp_path / f"machine{k}.log" for k in range(2)]
    machines = []
    for log in logs:
        with open(log, "w") as f:
            machines.append(subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT))
    try:
        codes = [m.wait(timeout=240) for m in machines]
    finally:
        for m in machines:
            if m.poll() is None:
                m.kill()
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    c = ckpt.load_checkpoint(run)
    assert c.step == STEPS
    for group in ("model", "ema"):
        for name, w in single[group].items():
            torch.testing.assert_close(c.tensors[group][name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{group} {name}: {m}")


if __name__ == "__main__":
    if sys.argv[4:] == ["fit"]:
        _fit_worker(Path(sys.argv[1]), Path(sys.argv[2]) / "run")
    else:
        _worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
