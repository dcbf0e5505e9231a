"""Golden trajectories (docs: ../shared/reviews/architecture-2026-12-06.md, D8; issue 32): tiny float32 CPU runs of
every kind of model and training option, 3 optimizer steps each, whose saved weights after step 3 must equal the
weights the code gave when they were recorded. They pin the training numerics: the draw order of every random
number, each loss formula and weighting, the optimizer, EMA and post-hoc EMA updates, the autoencoder's two
optimizers, the latent cache. A refactor that "changes nothing" passes them unchanged.

Each case is a config file of configs/ with overrides (a row of CASES), trained by `diffuse.train.train` into a
tmp_path run folder with the CPU forced (torch.cuda.is_available patched to False) and one thread (conftest.py);
the checkpoint of step 3 is read with `diffuse.checkpoint.load_checkpoint`. Every module the run saves is compared
with tests/golden/<case>.json: "model", "ema", "disc" (autoencoders with the GAN), "phema" (post-hoc EMA tracks, the
"phema.*" tensors of the state group) and "importance" (the L_vlb importance sampler's history and counts).

What is stored per module: the sha256 of its tensors (sorted by name; each name, dtype, shape and raw bytes), and per
tensor a float64 fingerprint [sum, L2 norm, dot with a fixed standard-normal vector of the tensor's size (numpy
PCG64, seed 0)]. The check:
- sha256 equal: bit for bit, pass. This is what holds on the machine that recorded them (the CPU and torch version
  are in each file) for a change that truly changes nothing: set DIFFUSE_GOLDEN_EXACT=1 to demand it.
- otherwise each fingerprint value must be within TOLERANCE of the recorded one, scaled by the tensor's L2 norm
  (see `deviation`): another CPU's kernels (vector width, oneDNN, threads) round float32 differently, and 3 Adam
  steps carry those roundings into the weights; a warning says the module is not bit-identical.

Re-recording: `DIFFUSE_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py` rewrites tests/golden/*.json (each
case then reports "skipped: recorded"). Re-record ONLY in a commit that is meant to change training numerics (a new
draw, a fixed loss formula), say so in its message, and run the suite before it to see which cases moved and why. A
refactor must never re-record: if a case fails, the refactor changed the trajectory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from diffuse.checkpoint import load_checkpoint
from diffuse.config import apply_overrides, load_config
from diffuse.train import train

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
RECORD = os.environ.get("DIFFUSE_RECORD_GOLDEN") == "1"
EXACT = os.environ.get("DIFFUSE_GOLDEN_EXACT") == "1"
STEPS = 3
PROBE_SEED = 0  # the seed of the standard-normal vectors the tensors are dotted with

# The fingerprint tolerance, relative to each tensor's L2 norm (`deviation`). Measured on the recording machine by
# training all ten cases again under changes that only round differently, each against the recorded threads = 1 run:
# the same run again (bit-identical), torch 2.14.1 instead of 2.13.0 (bit-identical), 2 threads (worst deviation
# 8.4e-5), ATEN_CPU_CAPABILITY=avx2 (4.2e-5), =default, i.e. no vector kernels (4.3e-5), oneDNN off (4.6e-5), avx2
# with 2 threads (9.2e-5); the worst tensors are mostly small GroupNorm biases, most often in the latent cases (the
# autoencoder's rounding carries into the latents). 1e-3 is 11x the worst of them. Real changes measured against it:
# swapping the draws of t and eps moves every diffusion case by 0.9 to 3.4; commitment_beta x 1.1 moves ae_vq by
# 5.6e-2; the hybrid loss's lambda x 1.1 moves vp_hybrid by 2.0e-3 (its variance output layer). Smaller than the
# noise, and seen only by the sha256: kl_weight 1e-6 -> 2e-6 (3e-6 after 3 steps).
TOLERANCE = 1e-3

# What every case shares: 3 float32 steps, a checkpoint at step 3, nothing else written on the way (a case's own
# overrides come after these, and a later override of a key wins).
COMMON = ["train.steps=3", "train.checkpoint_every=3", "train.log_every=1", "train.sample_every=0", "train.fid_every=0",
          "train.time_limit=0", "train.mixed_precision=no", "train.seed=0", "train.lr=1e-3", "train.warmup_steps=2",
          "train.batch_size=8"]
# a tiny U-Net on the 8x8 digits of scikit-learn
PIXELS = ["data.source=digits", "data.image_size=8", "data.channels=1",
          "model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.norm_groups=4",
          "model.attention_resolutions=[4]", "model.num_heads=1", "model.dropout=0.0",
          "train.ema_decay=0.9", "sample.steps=4", "sample.n=4"]
# a tiny autoencoder of the digits at 16x16 (f = 2: 2 x 8 x 8 latents) with the patch GAN on from the first step
AUTOENCODER = ["data.source=digits", "data.image_size=16", "data.channels=1",
               "autoencoder.channels=[8, 16]", "autoencoder.latent_channels=2", "autoencoder.num_res_blocks=1",
               "autoencoder.norm_groups=4", "autoencoder.disc_start=0", "autoencoder.disc_weight=0.5",
               "autoencoder.disc_channels=8", "autoencoder.disc_layers=2"]
# a tiny U-Net on the 8x8 latents of that autoencoder (the run of the `autoencoder_run` fixture)
LATENT = ["data.source=digits", "data.image_size=16", "data.channels=1",
          "model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.norm_groups=4",
          "model.attention_resolutions=[4]", "model.num_heads=1", "train.ema_decay=0.9", "sample.steps=4", "sample.n=4"]

# name: (config file in configs/, overrides). A value "{autoencoder}" is the autoencoder_run fixture's folder.
CASES = {
    # rectified flow, class-conditional with label dropout, self-conditioning, non-leaking augmentation, post-hoc EMA
    "flow_cond": ("mnist_cond.toml", PIXELS + ["model.self_condition=true", "train.augment_p=0.5",
                                               "train.condition_dropout={label = 0.3}", "train.posthoc_ema=[0.05, 0.1]",
                                               "train.ema_snapshot_every=3"]),
    # discrete VP (linear, T = 1000), eps with a learned variance on the hybrid loss; flips and dropout masks
    "vp_hybrid": ("mnist.toml", PIXELS + ["model.prediction=eps", "model.learned_variance=true", "train.loss=hybrid",
                                          "train.loss_weighting=none", "train.hflip=true", "model.dropout=0.1"]),
    # L_vlb alone with importance-sampled steps; T = 4 and 32 images a step, so every term has its 10 losses after
    # 2 steps and step 3 draws from the non-uniform p_t (losses.ImportanceSampler)
    "vlb_importance": ("mnist.toml", PIXELS + ["model.prediction=eps", "model.learned_variance=true", "train.loss=vlb",
                                               "train.loss_weighting=none", "schedule.T=4", "train.batch_size=32"]),
    # the noisy classifier (t and eps, cross-entropy)
    "classifier": ("mnist_classifier.toml", PIXELS),
    # the KL autoencoder with the GAN on from step 1 (also the autoencoder of the latent cases)
    "ae_kl": ("ae_mnist.toml", AUTOENCODER),
    # the VQ autoencoder (EMA codebook with dead-code restarts) with the GAN on from step 1
    "ae_vq": ("ae_mnist_vq.toml", AUTOENCODER + ["autoencoder.codebook_size=16"]),
    # latent diffusion on ae_kl's run, the training set encoded once (RUN/latents.safetensors)
    "latent_cached": ("ldm_mnist.toml", LATENT + ["latent.autoencoder={autoencoder}", "latent.cache=true"]),
    # the same, each batch encoded when drawn (posterior samples seeded by the batch's indices)
    "latent_uncached": ("ldm_mnist.toml", LATENT + ["latent.autoencoder={autoencoder}", "latent.cache=false"]),
    # super-resolution 4x4 -> 8x8 with noise-conditioning augmentation (the level as a scalar input)
    "superres": ("sr_digits.toml", PIXELS + ["task.noise_aug_max=0.5", "model.scalar_inputs=1"]),
    # offset noise (draw 4) and two micro-batches a step (DDP's no_sync path, the loss summed in parts); added after the
    # refactor, recorded from the code before it (6537029) and checked against the code after
    "vp_offset_accum": ("mnist.toml", PIXELS + ["model.prediction=eps", "train.loss_weighting=none", "train.offset_noise=0.1",
                                                "train.grad_accumulation=2"]),
    # the KL autoencoder whose GAN switches on at step 3 of 3 (the discriminator's group absent, then present)
    "ae_kl_late_gan": ("ae_mnist.toml", AUTOENCODER + ["autoencoder.disc_start=2"]),
    # text-to-image on captioned shapes with the trainable byte-level encoder and caption dropout
    "text_chars": ("text_shapes.toml", ["data.crops=32", "data.image_size=16", "model.channels=8",
                                        "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.norm_groups=4",
                                        "model.attention_resolutions=[8]", "model.cross_attention_resolutions=[8]",
                                        "model.num_heads=1", "model.context_dim=16", "train.ema_decay=0.9",
                                        "train.condition_dropout={text = 0.3}", "sample.steps=4", "sample.n=4"]),
}


def config(case: str, autoencoder: Path | None = None):
    name, overrides = CASES[case]
    overrides = [o.replace("{autoencoder}", str(autoencoder)) for o in COMMON + overrides]
    return apply_overrides(load_config(ROOT / "configs" / name), overrides)


@pytest.fixture(autouse=True, scope="module")
def cpu_only():
    """The runs are CPU runs wherever the suite runs (a GPU machine included): the Trainer takes CUDA
    whenever torch.cuda.is_available()."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        yield


def run_case(case: str, run_dir: Path, autoencoder: Path | None = None) -> Path:
    train(config(case, autoencoder), run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory, cpu_only) -> Path:
    """ae_kl's run folder: its own golden case, and the autoencoder of the latent cases."""
    return run_case("ae_kl", tmp_path_factory.mktemp("golden") / "ae_kl")


# --- fingerprints ---------------------------------------------------------------------------------------------------
@functools.cache
def probe(n: int) -> np.ndarray:
    return np.random.default_rng(PROBE_SEED).standard_normal(n)


def modules(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The saved modules of a run's step-3 checkpoint, by name, each {tensor name: tensor}."""
    c = load_checkpoint(run_dir)
    assert c.step == STEPS, f"the newest checkpoint of {run_dir} is step {c.step}, not {STEPS}"
    out = {k: dict(c.tensors[k]) for k in ("model", "ema", "disc") if k in c.tensors}
    state = c.tensors.get("state", {})
    # the post-hoc EMA tracks, and the importance sampler's state once it holds losses (train.loss = "vlb")
    for group in ("phema", "importance"):
        tensors = {k.removeprefix(group + "."): v for k, v in state.items() if k.startswith(group + ".")}
        if tensors and (group != "importance" or bool(tensors["count"].any())):
            out[group] = tensors
    return out


def sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(t: torch.Tensor) -> list[float]:
    """[sum, L2 norm, dot with probe(numel)] in float64 (math.fsum: exact sums, independent of the summation order)."""
    x = t.detach().cpu().double().reshape(-1).numpy()
    return [math.fsum(x), math.sqrt(math.fsum(x * x)), float(np.dot(x, probe(x.size)))]


def describe(run_dir: Path) -> dict:
    return {group: {"sha256": sha256(tensors),
                    "tensors": {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                                       "fingerprint": fingerprint(t)} for name, t in sorted(tensors.items())}}
            for group, tensors in modules(run_dir).items()}


def machine() -> dict:
    """What the numbers depend on besides the code: the CPU (/proc/cpuinfo's model name), torch's kernels, versions."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    return {"cpu": names[0] if names else platform.processor(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def deviation(recorded: list[float], now: list[float], numel: int) -> float:
    """How far a tensor's fingerprint moved, in units of its recorded L2 norm (1e-30 guards an all-zero tensor): the
    largest of |d sum| / (sqrt(numel) norm), |d norm| / norm and |d dot| / norm. Each is at most about |d w| / |w|
    (the dot with a standard-normal vector is a random projection), the tensor's relative change."""
    (s0, n0, d0), (s1, n1, d1) = recorded, now
    scale = max(n0, 1e-30)
    return max(abs(s1 - s0) / (math.sqrt(max(numel, 1)) * scale), abs(n1 - n0) / scale, abs(d1 - d0) / scale)


def compare(case: str, golden: dict, now: dict) -> None:
    """Fail naming every module that is missing or moved past TOLERANCE (or, with DIFFUSE_GOLDEN_EXACT=1, that is not
    bit-identical); warn about modules that are within tolerance but not bit-identical. Modules the run saves beyond the
    recorded ones are not checked."""
    problems, inexact = [], []
    for group, rec in golden["modules"].items():
        if group not in now:
            problems.append(f"{group}: the run saved no such module (it saved {sorted(now)})")
            continue
        cur = now[group]
        if cur["sha256"] == rec["sha256"]:
            continue
        inexact.append(group)
        if EXACT:
            problems.append(f"{group}: not bit-identical (DIFFUSE_GOLDEN_EXACT=1)")
        names, cur_names = set(rec["tensors"]), set(cur["tensors"])
        if names != cur_names:
            problems.append(f"{group}: tensors missing {sorted(names - cur_names)[:5]}, "
                            f"new {sorted(cur_names - names)[:5]}")
        moved = []
        for name in sorted(names & cur_names):
            r, c = rec["tensors"][name], cur["tensors"][name]
            if (r["dtype"], r["shape"]) != (c["dtype"], c["shape"]):
                problems.append(f"{group}.{name}: {r['dtype']} {r['shape']} became {c['dtype']} {c['shape']}")
                continue
            d = deviation(r["fingerprint"], c["fingerprint"], math.prod(r["shape"]))
            if not d <= TOLERANCE:  # NaN fails too
                moved.append((d, name))
        if moved:
            moved.sort(reverse=True)
            worst = ", ".join(f"{name} {d:.2g}" for d, name in moved[:3])
            problems.append(f"{group}: {len(moved)} of {len(names)} tensors moved more than {TOLERANCE:g} of their norm "
                            f"(worst: {worst})")
    origin, here = golden["recorded_on"], machine()
    recorded = f"recorded on {origin['cpu']}, {origin['cpu_capability']}, torch {origin['torch']}"
    if problems:
        pytest.fail(f"golden trajectory {case!r} changed ({recorded}; this is {here['cpu']}, {here['cpu_capability']}, "
                    f"torch {here['torch']}):\n  " + "\n  ".join(problems) + "\nA refactor must not change these; re-record "
                    "only for a change meant to alter training numerics (see this file's docstring).", pytrace=False)
    if inexact:
        warnings.warn(f"golden trajectory {case!r}: {', '.join(inexact)} within tolerance but not bit-identical ({recorded}):"
                      " expected on another CPU or torch, not on the recording machine (DIFFUSE_GOLDEN_EXACT=1 fails it "
                      "there)", UserWarning, stacklevel=2)


def dumps(record: dict) -> str:
    """The golden file's JSON: indented, one line per tensor."""
    text = json.dumps({k: v for k, v in record.items() if k != "modules"}, indent=1)[:-2]
    groups = []
    for group, g in record["modules"].items():
        tensors = ",\n".join(f"    {json.dumps(name)}: {json.dumps(t)}" for name, t in g["tensors"].items())
        groups.append(f'  {json.dumps(group)}: {{\n   "sha256": {json.dumps(g["sha256"])},\n'
                      f'   "tensors": {{\n{tensors}\n   }}\n  }}')
    return text + ',\n "modules": {\n' + ",\n".join(groups) + "\n }\n}\n"


@pytest.mark.parametrize("case", list(CASES))
def test_golden_trajectory(case, tmp_path, request):
    autoencoder = request.getfixturevalue("autoencoder_run") if case.startswith(("ae_kl", "latent_")) else None
    run_dir = autoencoder if case == "ae_kl" else run_case(case, tmp_path / case, autoencoder)
    now = describe(run_dir)
    path = GOLDEN / f"{case}.json"
    if RECORD:
        GOLDEN.mkdir(exist_ok=True)
        name, overrides = CASES[case]
        record = {"case": case, "config": f"configs/{name}", "overrides": COMMON + overrides, "steps": STEPS,
                  "recorded_on": machine(), "modules": now}
        path.write_text(dumps(record))
        assert json.loads(path.read_text()) == json.loads(json.dumps(record))
        pytest.skip(f"recorded {path.name}")
    compare(case, json.loads(path.read_text()), now)
