"""`diffuse demo --toy`: the two-pixel picture of lecture 004, trained and drawn in under a minute on one CPU core.

"Consider two-pixel images: each axis represents the value of a pixel in a two-pixel image." Every point of the plane
is an image; the good images (the data) live in a few small clusters, noise everywhere else. The toy data are such a
picture: a mixture of three tight Gaussians (mixture.GaussianMixture) in [-1, 1]^2. A continuous-time VP process
(schedule.VPCosine, alpha^2 + sigma^2 = 1) spreads them into N(0, I); a small MLP (nets.diffae.MLPSkipNet) learns eps,
i.e. the score -eps / sigma_t, with L_simple; the mixture's exact score at every t (mixture.noised_score) is drawn
beside the learned one. Writes into the output folder:

    forward_process.png       the cloud of x_t at six times, spreading from the clusters to N(0, I)
    reverse_trajectories.png  DDIM paths from N(0, I) back to the data: the learned network and the exact score
    score_field.png           sigma_t * score (= -eps) learned and exact at three times, with their relative error
    reverse_process.gif       the cloud flowing back, a step counter in each frame
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..denoiser import Denoiser
from ..generate import generate
from ..losses import l_simple
from ..mixture import GaussianMixture, exact_eps
from ..nets.diffae import MLPSkipNet
from ..schedule import VPCosine
from ..visualize import save_image

TOY_DATA = GaussianMixture.isotropic(means=[[-0.6, -0.5], [0.55, 0.6], [0.6, -0.45]], stds=[0.08, 0.08, 0.08],
                                     weights=[0.4, 0.3, 0.3])
"""The good two-pixel images: three clusters (a dark image, a bright one, one bright-dark pair)."""
TOY_STEPS = 1200        # optimizer steps of the toy (about 10 s on one core)
TOY_BATCH = 256         # points per step
TOY_SAMPLER_STEPS = 40  # DDIM steps of the reverse figures
FORWARD_TIMES = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
SCORE_TIMES = (0.1, 0.3, 0.6)
LIMIT = 3.2             # the plots' half-width in pixel values


def toy_denoiser(seed: int = 0) -> Denoiser:
    """An untrained toy network (MLPSkipNet on (B, 2) points, 4 layers of 128) read as eps through VPCosine."""
    torch.manual_seed(seed)
    return Denoiser(MLPSkipNet(2, hidden=128, layers=4), VPCosine(), "eps", bounded=False)


def train_toy(steps: int = TOY_STEPS, *, batch: int = TOY_BATCH, lr: float = 2e-3, seed: int = 0,
              time_limit: float | None = None, data: GaussianMixture = TOY_DATA) -> tuple[Denoiser, list[float]]:
    """Train the toy network with L_simple on fresh draws of `data` (AdamW, cosine decay of lr); stops early after
    `time_limit` seconds (None or 0: none). Returns (denoiser in eval mode, the loss of every step)."""
    den = toy_denoiser(seed)
    net, schedule = den.net, den.schedule
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        x0 = data.sample(batch, g).float()
        t = schedule.sample_t(batch, g)
        eps = torch.randn(x0.shape, generator=g)
        loss = l_simple(den, x0, t, eps).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        losses.append(loss.item())
        if time_limit and time.perf_counter() - start > time_limit:
            break
    net.eval()
    return den, losses


@torch.no_grad()
def eps_error(den: Denoiser, data: GaussianMixture, t: float, n: int = 4000, seed: int = 0) -> float:
    """The relative error E||eps_theta(x_t) - eps*(x_t)||^2 / E||eps*(x_t)||^2 over x_t ~ p_t, eps* the exact
    (mixture.exact_eps); the same as the score's relative error, since both are eps / -sigma_t. In [0, inf)."""
    g = torch.Generator().manual_seed(seed)
    x0, eps = data.sample(n, g).float(), torch.randn(n, data.dim, generator=g)
    tt = torch.full((n,), t, dtype=torch.float64)
    xt = den.schedule.q_sample(x0, tt, eps)
    mt = den.schedule.model_time(tt).float()
    exact = exact_eps(data, den.schedule)(xt, mt)
    return float(((den.net(xt, mt) - exact) ** 2).sum() / (exact**2).sum())


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_image(fig) -> Image.Image:
    """A matplotlib figure rendered to a PIL image, and closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    _pyplot().close(fig)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _plane(ax, title: str) -> None:
    """The plane of two-pixel images: equal axes named after the pixels."""
    ax.set_xlim(-LIMIT, LIMIT)
    ax.set_ylim(-LIMIT, LIMIT)
    ax.set_aspect("equal")
    ax.set_xlabel("pixel 1")
    ax.set_ylabel("pixel 2")
    ax.set_title(title, fontsize=9)


def _unit_circles(ax) -> None:
    """The 1- and 2-sigma circles of N(0, I), where the forward process ends."""
    a = np.linspace(0, 2 * np.pi, 200)
    for r in (1, 2):
        ax.plot(r * np.cos(a), r * np.sin(a), color="0.4", lw=0.8, ls="--")


def forward_figure(data: GaussianMixture, schedule, path: Path, n: int = 1500, seed: int = 0) -> Path:
    """The cloud of x_t = alpha_t x_0 + sigma_t eps at FORWARD_TIMES, one x_0 and eps per point throughout."""
    plt = _pyplot()
    g = torch.Generator().manual_seed(seed)
    x0, eps = data.sample(n, g).float(), torch.randn(n, data.dim, generator=g)
    fig, axes = plt.subplots(1, len(FORWARD_TIMES), figsize=(3 * len(FORWARD_TIMES), 3.3), dpi=80)
    for ax, t in zip(axes, FORWARD_TIMES):
        tt = torch.tensor(t, dtype=torch.float64)
        xt = schedule.q_sample(x0, tt, eps)
        ax.scatter(xt[:, 0], xt[:, 1], s=2, alpha=0.5)
        if t == FORWARD_TIMES[-1]:
            _unit_circles(ax)
        _plane(ax, f"t = {t:g}: alpha = {float(schedule.alpha(tt)):.2f}, sigma = {float(schedule.sigma(tt)):.2f}")
    fig.suptitle("forward process: two-pixel images spread from the data to N(0, I) (dashed: 1 and 2 sigma)", fontsize=10)
    fig.tight_layout()
    save_image(_figure_image(fig), path)
    return path


def trajectories(den: Denoiser, n: int, seed: int = 1) -> list[torch.Tensor]:
    """DDIM (eta 0) from x_T ~ N(0, I): [x_T, ..., x_0] as TOY_SAMPLER_STEPS + 1 tensors (n, 2)."""
    xs = []

    def record(step):
        if step.index == 0:
            xs.append(step.x)
        xs.append(step.x_next)

    generate(den, n, (2,), sampler="ddim", steps=TOY_SAMPLER_STEPS, seed=seed, clip=False, callback=record)
    return xs


def reverse_figure(learned: Denoiser, exact: Denoiser, data: GaussianMixture, path: Path, n: int = 40) -> Path:
    """Paths from the same x_T to the data under the learned network and under the exact score, over the data."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2), dpi=80)
    dots = data.sample(600, torch.Generator().manual_seed(2))
    for ax, den, name in ((axes[0], learned, "learned network"), (axes[1], exact, "exact score")):
        path_xs = torch.stack(trajectories(den, n)).numpy()  # (steps + 1, n, 2)
        ax.scatter(dots[:, 0], dots[:, 1], s=2, color="0.75", label="data")
        ax.plot(path_xs[:, :, 0], path_xs[:, :, 1], lw=0.7, alpha=0.7)
        ax.scatter(path_xs[0, :, 0], path_xs[0, :, 1], s=10, marker="o", color="k", label="x_T ~ N(0, I)")
        ax.scatter(path_xs[-1, :, 0], path_xs[-1, :, 1], s=14, marker="x", color="tab:red", label="x_0")
        _plane(ax, f"reverse process, {name}: DDIM, {TOY_SAMPLER_STEPS} steps")
    axes[0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    save_image(_figure_image(fig), path)
    return path


@torch.no_grad()
def score_figure(learned: Denoiser, data: GaussianMixture, path: Path, points: int = 17) -> Path:
    """sigma_t * score (= -eps) on a grid of the plane at SCORE_TIMES: the learned network above, the exact below,
    each column titled with the learned field's relative error over x_t ~ p_t (eps_error)."""
    plt = _pyplot()
    schedule = learned.schedule
    exact = exact_eps(data, schedule)
    u = torch.linspace(-2.5, 2.5, points)
    grid = torch.stack(torch.meshgrid(u, u, indexing="xy"), -1).reshape(-1, 2)
    fig, axes = plt.subplots(2, len(SCORE_TIMES), figsize=(3.6 * len(SCORE_TIMES), 7.4), dpi=80)
    for col, t in enumerate(SCORE_TIMES):
        mt = schedule.model_time(torch.full((len(grid),), t, dtype=torch.float64)).float()
        err = eps_error(learned, data, t)
        for row, (field, name) in enumerate(((-learned.net(grid, mt), "learned"), (-exact(grid, mt), "exact"))):
            ax = axes[row, col]
            ax.quiver(grid[:, 0], grid[:, 1], field[:, 0], field[:, 1], angles="xy", scale_units="xy", scale=9,
                      width=0.004, color="tab:blue" if row == 0 else "tab:green")
            ax.scatter(data.means[:, 0] * float(schedule.alpha(torch.tensor(t))),
                       data.means[:, 1] * float(schedule.alpha(torch.tensor(t))), s=20, color="tab:red", marker="x")
            _plane(ax, f"{name}, t = {t:g}" + (f" (relative error {err:.3f})" if row == 0 else ""))
            ax.set_xlim(-2.7, 2.7)
            ax.set_ylim(-2.7, 2.7)
    fig.suptitle("sigma_t * score = -eps: where each two-pixel image moves (x: the clusters' centres alpha_t mu_k)",
                 fontsize=10)
    fig.tight_layout()
    save_image(_figure_image(fig), path)
    return path


def reverse_gif(den: Denoiser, data: GaussianMixture, path: Path, n: int = 800, frame_ms: int = 120,
                hold_ms: int = 2000) -> Path:
    """The cloud of n samples flowing from N(0, I) to the data, one frame per DDIM step, each titled with its step and
    time; the last frame held."""
    plt = _pyplot()
    xs = trajectories(den, n, seed=3)
    grid_t = den.schedule.grid(TOY_SAMPLER_STEPS).tolist() + [0.0]
    dots = data.sample(400, torch.Generator().manual_seed(2))
    fig, ax = plt.subplots(figsize=(4, 4.2), dpi=70)  # one figure, its cloud moved frame by frame
    ax.scatter(dots[:, 0], dots[:, 1], s=2, color="0.8")
    cloud = ax.scatter(xs[0][:, 0], xs[0][:, 1], s=3, color="tab:blue", alpha=0.6)
    _plane(ax, "reverse process")  # the axes laid out once, with their labels
    fig.tight_layout()
    frames = []
    for k, x in enumerate(xs):
        cloud.set_offsets(x.numpy())
        _plane(ax, f"reverse process: step {k} of {len(xs) - 1}, t = {grid_t[min(k, len(grid_t) - 1)]:.2f}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        frames.append(Image.open(io.BytesIO(buffer.getvalue())).convert("P", palette=Image.ADAPTIVE))
    plt.close(fig)
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    return save_image(frames[0], path, save_all=True, append_images=frames[1:], duration=durations, loop=0)


def run_toy_demo(out: str | Path = "demo_toy", *, steps: int = TOY_STEPS, time_limit: float | None = None) -> dict[str, Path]:
    """Train the toy (steps, or fewer within time_limit seconds) and write its figures into `out`; returns their
    paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    learned, losses = train_toy(steps, time_limit=time_limit)
    trained = time.perf_counter()
    exact = Denoiser(exact_eps(TOY_DATA, learned.schedule), learned.schedule, "eps", bounded=False)
    paths = {
        "forward process": forward_figure(TOY_DATA, learned.schedule, out / "forward_process.png"),
        "reverse trajectories": reverse_figure(learned, exact, TOY_DATA, out / "reverse_trajectories.png"),
        "score field": score_figure(learned, TOY_DATA, out / "score_field.png"),
        "reverse animation": reverse_gif(learned, TOY_DATA, out / "reverse_process.gif"),
    }
    print(f"trained {len(losses)} steps in {trained - start:.0f} s (last loss {np.mean(losses[-100:]):.3f}), drew the "
          f"figures in {time.perf_counter() - trained:.0f} s")
    return paths
