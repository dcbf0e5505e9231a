"""DistributedDataParallel on CPU with gloo: 2 processes compute what 1 process computes.

The Trainer draws every random number of a step (data order, flips, t, eps, dropout masks) for
the whole global batch and lets each process take its slice, so the DDP-averaged gradient of a
2-process step must equal the single-process gradient, and a few full `fit()` steps must end at
the same weights. Rank 0 alone writes to the (shared) run folder.

This file is also the worker script: the test launches
`python -m torch.distributed.run --nproc_per_node 2 --standalone tests/test_ddp.py RUN OUT`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 3
OVERRIDES = [
    "data.source=digits", "data.image_size=8", "data.channels=1",
    "schedule.timesteps=100",
    "model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.norm_groups=4",
    "model.attention_resolutions=[4]", "model.dropout=0.1",
    "train.batch_size=8", f"train.steps={STEPS}", "train.lr=1e-3", "train.warmup_steps=2", "train.hflip=true",
    "train.ema_decay=0.9", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=2",
    "sample.steps=4", "sample.n=4",
]


def tiny_cfg():
    from diffuse.config import RunConfig, apply_overrides

    return apply_overrides(RunConfig(), OVERRIDES)


# --- the worker (runs under torchrun) ------------------------------------------------------------
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _record_writes(root: Path, log: list) -> None:
    """Record, through an audit hook, every file-system change this process makes below `root`."""
    root = str(root.resolve())

    def under(p) -> bool:
        try:
            return os.path.abspath(os.fsdecode(p)).startswith(root)
        except TypeError:  # a file descriptor
            return False

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in (mode or "") for c in "wax+") if mode else bool((flags or 0) & _WRITE_FLAGS)
            if writes and under(path):
                log.append([event, os.fsdecode(path)])
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "os.link",
                       "os.symlink", "os.chmod", "os.utime"):
            if args and under(args[0]):
                log.append([event, os.fsdecode(args[0])])

    sys.addaudithook(hook)


def _worker(run_root: Path, out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from diffuse.train import Trainer

    rank = int(os.environ["RANK"])
    writes: list = []
    _record_writes(run_root, writes)
    cfg = tiny_cfg()

    trainer = Trainer(cfg, run_root / "grad", progress=False)
    assert trainer.world == 2 and trainer.rank == rank, (trainer.world, trainer.rank)
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
    (out / f"writes_rank{rank}.json").write_text(json.dumps(writes))
    dist.destroy_process_group()


# --- the test process ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Launch the 2-process run once; returns (run root, output folder)."""
    base = tmp_path_factory.mktemp("ddp")
    run_root, out = base / "runs", base / "out"
    run_root.mkdir()
    out.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           __file__, str(run_root), str(out)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the 2-process run timed out after {e.timeout} s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"the 2-process run failed (exit {proc.returncode})\nstdout:\n{proc.stdout[-5000:]}\n"
                    f"stderr:\n{proc.stderr[-10000:]}")
    return run_root, out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same work in this (single) process: grads of one loss_and_backward, weights after fit()."""
    from diffuse.train import Trainer

    assert int(os.environ.get("WORLD_SIZE", "1")) == 1
    base = tmp_path_factory.mktemp("single")
    cfg = tiny_cfg()
    trainer = Trainer(cfg, base / "grad", progress=False)
    assert trainer.world == 1
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
    assert any(g.abs().sum() > 0 for g in grads.values())
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
    rank0 = json.loads((out / "writes_rank0.json").read_text())
    rank1 = json.loads((out / "writes_rank1.json").read_text())
    assert rank1 == [], f"rank 1 wrote into the run folder: {rank1[:10]}"
    written = {Path(p).name for _, p in rank0}
    assert {"config.toml", "log.jsonl", "loss.png", "manifest.json"} <= written  # the hook does see rank 0's writes
    # the shared run folder holds one run's files, laid out like the single-process run
    run = run_root / "fit"
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in single["run"].iterdir())
    assert ckpt.latest_step(run) == STEPS
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))  # one line per step, not one per rank
    c = ckpt.load_checkpoint(run)
    assert c.state["world_size"] == 2


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
