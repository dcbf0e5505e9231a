"""`diffuse demo`: train a diffusion model on the bundled MNIST digits on a laptop CPU, then show what it learned.

The model (configs/mnist_cond.toml) is a class-conditional rectified flow that samples with classifier-free guidance
in a limited interval of noise levels (the recipe of issue 19, bench/cpu_budget.py), with the weights
of a post-hoc EMA of length DEMO_SIGMA_REL rebuilt from the run's snapshots (Karras et al. 2024) into RUN/posthoc_ema.
Writes into the demo folder: the run (config, checkpoints, log, loss curve), a grid of samples
(each row the digits 0..9, each column's digit under it), a
forward-process strip (x_t at t = 0, 0.05, ..., 1 as in the lecture figure, t under each column), a reverse-trajectory
strip (x_t above the predicted x_0 at the same step; the step and t under each column, the rows named), and an
animated GIF of the denoising (a step counter above each frame, 0.3 s a step).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch import Tensor

from ..config import RunConfig, load_config
from ..data import load_dataset
from ..ema import snapshot_steps
from ..runs import write_run
from ..generate import default_labels, generate
from ..runs import load_run
from ..kinds.diffusion import sample_config_kwargs
from ..train import train
from ..visualize import labelled_grid, save_gif, save_image

DEMO_CONFIG = Path(__file__).parents[1] / "configs" / "mnist_cond.toml"  # diffuse/configs
DEMO_SIGMA_REL = 0.10
"""The post-hoc EMA length the demo samples with, one of the run's own tracks (so it is rebuilt exactly). On two runs
of the rectified-flow recipe (bench/RESULTS.md "CPU budget", 2026-12-01) sigma_rel 0.10 against 0.03: unguided FID
10.6 against 14.0 and 12.1 against 14.4, guided accuracy 98.1% against 97.3% at a guided FID 1 higher. (The VP recipe
before issue 19, guided at every step, preferred 0.03: bench/recipes.py.)"""


GIF_FRAME_MS, GIF_HOLD_MS = 300, 2500  # denoising.gif: each step 0.3 s (11 frames in 3 s), the samples held 2.5 s
DEMO_SNAPSHOTS_KEPT = 4
"""The post-hoc EMA snapshots the demo keeps once it has rebuilt its EMA: the last and three spread over the run
(thin_snapshots). A snapshot holds one float32 copy of the network per track of train.posthoc_ema (two), so four are
8x the model file where every snapshot of an 8-minute run (one each 100 steps: 57 on a fast CPU) was 301 MB for a
2.7 MB model; tests/test_demo.py checks the bound of 10x from the config. The rebuilt sigma_rel 0.10 is one of the
tracks, so it is exact from any of them; `diffuse ema demo/run --sigma-rel S` rebuilds other lengths from the four
(`ema.reconstructable_range` says which)."""


def thin_snapshots(directory: str | Path, keep: int = DEMO_SNAPSHOTS_KEPT) -> list[Path]:
    """Delete all but `keep` (>= 2) post-hoc EMA snapshots in DIR: the last one and, for k = 1 .. keep - 1, the one
    nearest to step k / keep of the last (each chosen once), so the kept ones spread over the run. Returns the deleted
    paths; none when DIR holds `keep` or fewer. ValueError for keep < 2 (a rebuild needs two)."""
    if keep < 2:
        raise ValueError(f"keep at least 2 post-hoc EMA snapshots (a rebuild needs two), got {keep}")
    steps = sorted(snapshot_steps(directory))
    if len(steps) <= keep:
        return []
    kept = {steps[-1]}
    for k in range(1, keep):
        target = steps[-1] * k / keep
        kept.add(min((s for s in steps if s not in kept), key=lambda s: abs(s - target)))
    doomed = [path for step, path in sorted(snapshot_steps(directory).items()) if step not in kept]
    for path in doomed:
        path.unlink()
    return doomed


def demo_config() -> RunConfig:
    """The tuned CPU configuration (configs/mnist_cond.toml ships inside the package)."""
    return load_config(DEMO_CONFIG)


def forward_strip(schedule, x0: Tensor, cols: int = 20, seed: int = 0) -> Tensor:
    """x_t of q(x_t | x_0) at t = 0, 1/cols, ..., 1 for each image (x_0, x_50, ..., x_1000 of a 1,000-step schedule with
    cols = 20), with the same eps along a row, for any process: (rows * (cols + 1), C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g)
    strip = [x0] + [schedule.q_sample(x0, torch.tensor(k / cols), eps) for k in range(1, cols + 1)]
    return torch.stack(strip, dim=1).flatten(0, 1)


def first_of_each_class(labels: Tensor, n: int) -> list[int]:
    """Indices of the first example of each class (up to n), so a figure shows different digits."""
    firsts = [int((labels == c).nonzero()[0]) for c in labels.unique()[:n]]
    return firsts if len(firsts) > 1 else list(range(min(n, len(labels))))


class Trajectory(NamedTuple):
    """What `reverse_trajectory` keeps of one sampling run."""

    strip: Tensor             # 2n rows of `frames` images: x_t above the predicted x_0, (2 n frames, C, H, W)
    gif: list[Tensor]         # x_T, then x after each step: steps + 1 tensors (n, C, H, W)
    samples: Tensor           # the final samples (n, C, H, W)
    kept: list[tuple[int, float]]  # the strip's columns: (0-based step index, its time t)
    times: list[float]        # the time of each gif frame: the grid's times, then 0


def reverse_trajectory(denoiser, n: int, shape: tuple[int, ...], *, sampler: str, steps: int, seed: int = 0,
                       frames: int = 10, **kw) -> Trajectory:
    """Sample n images, keeping x_t and the predicted x_0 at `frames` evenly spaced steps (Trajectory)."""
    keep = set(torch.linspace(0, steps - 1, frames).round().long().tolist())
    xs, x0s, gif, kept, times = [], [], [], [], []

    def record(step):
        if step.index == 0:
            gif.append(step.x)  # x_T
            times.append(float(step.t))
        gif.append(step.x_next)
        times.append(float(step.s))
        if step.index in keep:
            xs.append(step.x)
            x0s.append(step.x0)
            kept.append((step.index, float(step.t)))

    out = generate(denoiser, n, shape, sampler=sampler, steps=steps, seed=seed, callback=record, **kw)
    rows = [torch.stack(xs, 1), torch.stack(x0s, 1)]  # each (n, frames, C, H, W)
    strip = torch.stack(rows, 1).flatten(0, 2)         # n pairs of rows
    return Trajectory(strip, gif, out, kept, times)


def forward_figure(schedule, x0: Tensor, cols: int = 20) -> Image.Image:
    """The forward strip (forward_strip) with t under each column and a title."""
    strip = forward_strip(schedule, x0, cols)
    return labelled_grid(strip, cols + 1, columns=[f"t={k / cols:g}" for k in range(cols + 1)], scale=2, size=11,
                         title="forward process q(x_t | x_0): x_t = alpha_t x_0 + sigma_t eps, one eps per row")


def reverse_figure(trajectory: Trajectory, total: int) -> Image.Image:
    """The reverse strip with each column's step (of `total`) and time t under it and each row named: x_t, then the
    x_0 the denoiser predicts from it."""
    n = len(trajectory.samples)
    return labelled_grid(trajectory.strip, len(trajectory.kept), scale=2, size=11,
                         columns=[f"step {i + 1}/{total}\nt={t:.2f}" for i, t in trajectory.kept],
                         rows=[name for _ in range(n) for name in ("x_t", "x_0 pred.")],
                         title="reverse process: x_t at the start of each step, above the x_0 it predicts")


def run_demo(out: str | Path = "demo", *, time_limit: float | None = None, n_samples: int = 100, progress: bool = True) -> dict[str, Path]:
    """Train the demo model (resuming if `out` holds one), then write the figures; returns their paths."""
    out = Path(out)
    cfg = demo_config()
    if time_limit is not None:
        cfg.train.time_limit = time_limit
    start = time.perf_counter()
    run = out / "run"
    train(cfg, run, progress=progress)
    trained = time.perf_counter()

    weights = run
    if cfg.train.posthoc_ema:  # the rebuilt EMA (EDM2), as `diffuse ema` writes it
        try:
            weights = write_run(run, DEMO_SIGMA_REL, run / "posthoc_ema")
        except ValueError as e:  # a demo cut short has too few snapshots for this length
            warnings.warn(f"the figures use the run's own EMA: {e}", UserWarning, stacklevel=2)
        else:
            thin_snapshots(run / "ema_snapshots")  # rebuilt: keep a few (DEMO_SNAPSHOTS_KEPT), not hundreds of MB
    cfg, den, num_classes = load_run(weights)
    s, d = cfg.sample, cfg.data
    shape = (d.channels, d.image_size, d.image_size)
    kw = sample_config_kwargs(s)
    classes = num_classes if cfg.model.class_conditional else 0  # the classes in turn: each row of the grid reads 0..9
    digits = load_dataset(d)
    x0 = torch.stack([digits[i][0] for i in first_of_each_class(digits.labels, 10)])
    trajectory = reverse_trajectory(den, 8, shape, seed=1, labels=default_labels(8, classes), **kw)
    steps = len(trajectory.gif) - 1
    samples = generate(den, n_samples, shape, seed=0, labels=default_labels(n_samples, classes), **kw)
    about = f"{s.sampler}, {steps} steps" + (f", guidance {s.guidance:g}" if classes and s.guidance else "")
    paths = {
        "samples": save_image(labelled_grid(samples, 10, scale=2, size=11, title=f"samples ({about})",
                                            columns=[str(k) for k in range(10)] if classes == 10 else ()),
                              out / "samples.png"),
        "forward process": save_image(forward_figure(den.schedule, x0), out / "forward_process.png"),
        "reverse trajectory": save_image(reverse_figure(trajectory, steps), out / "reverse_trajectory.png"),
        "denoising animation": save_gif(trajectory.gif, out / "denoising.gif", nrow=8, scale=3, frame_ms=GIF_FRAME_MS,
                                        hold_last_ms=GIF_HOLD_MS, captions=[
                                            f"step {k} of {steps}, t = {t:.2f}" + (" (x_T: noise)" if k == 0 else "")
                                            for k, t in enumerate(trajectory.times)]),
        "loss curve": run / "loss.png",
        "run folder": run,
        "sampled weights": weights,
    }
    print(f"trained for {trained - start:.0f} s, sampled in {time.perf_counter() - trained:.0f} s")
    return paths
