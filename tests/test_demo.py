"""The demo's figures, on a tiny model (the real demo is timed by bench/, not here)."""

import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffuse import Denoiser, Schedule
from diffuse.app import demo
from diffuse.config import apply_overrides
from diffuse.ema import snapshot_steps
from diffuse.schedule import Flow

from test_cli import TINY


@pytest.mark.parametrize("s", [Schedule.linear(), Flow()], ids=["vp", "flow"])
def test_forward_strip_columns_follow_the_closed_form(s):
    """Columns x_t = alpha_t x_0 + sigma_t eps at t = k/20 with one eps per row, for a discrete and a continuous process."""
    x0 = torch.full((2, 1, 4, 4), 0.5)
    strip = demo.forward_strip(s, x0, cols=20).view(2, 21, 1, 4, 4)
    assert torch.equal(strip[:, 0], x0)
    eps = (strip[:, 1] - s.alpha(torch.tensor(0.05)).float() * x0) / s.sigma(torch.tensor(0.05)).float()
    eps_last = (strip[:, -2] - s.alpha(torch.tensor(0.95)).float() * x0) / s.sigma(torch.tensor(0.95)).float()
    torch.testing.assert_close(eps, eps_last, rtol=1e-4, atol=1e-4)  # the same noise along a row


def test_first_of_each_class():
    assert demo.first_of_each_class(torch.tensor([0, 0, 1, 2, 1, 2]), 10) == [0, 2, 3]
    assert demo.first_of_each_class(torch.zeros(5, dtype=torch.long), 3) == [0, 1, 2]  # unlabeled


def test_demo_writes_every_figure(tmp_path, monkeypatch):
    cfg = apply_overrides(demo.demo_config(), TINY + ["train.steps=40", "train.ema_snapshot_every=4"])
    monkeypatch.setattr(demo, "demo_config", lambda: cfg)
    paths = demo.run_demo(tmp_path, n_samples=10, progress=False)
    for name in ("samples", "forward process", "reverse trajectory", "denoising animation", "loss curve"):
        assert paths[name].is_file(), name
    assert paths["sampled weights"] == tmp_path / "run" / "posthoc_ema"  # the figures use the rebuilt EMA
    snapshots = tmp_path / "run" / "ema_snapshots"
    assert sorted(snapshot_steps(snapshots)) == [8, 20, 28, 40]  # thinned after the rebuild: 4 of 10, spread
    model = next((tmp_path / "run" / "checkpoints").iterdir()) / "model.safetensors"
    assert sum(p.stat().st_size for p in snapshots.iterdir()) <= 10 * model.stat().st_size
    paths = demo.run_demo(tmp_path, n_samples=10, progress=False)  # a second call resumes and rebuilds it again
    assert paths["sampled weights"] == tmp_path / "run" / "posthoc_ema"
    assert Image.open(paths["forward process"]).size[0] == 2 * (2 + 21 * 10)  # 21 columns of 8 px + padding, x2
    gif = Image.open(paths["denoising animation"])
    assert gif.n_frames == 6 and gif.info["duration"] == demo.GIF_FRAME_MS  # x_T and one per step of sample.steps=5


def test_a_short_demo_falls_back_to_the_runs_ema(tmp_path, monkeypatch):
    cfg = apply_overrides(demo.demo_config(), TINY)  # 4 steps: one snapshot, nothing to rebuild from
    monkeypatch.setattr(demo, "demo_config", lambda: cfg)
    with pytest.warns(UserWarning, match="the figures use the run's own EMA: post-hoc EMA needs >= 2 snapshots"):
        paths = demo.run_demo(tmp_path, n_samples=10, progress=False)
    assert paths["sampled weights"] == tmp_path / "run"


def test_reverse_trajectory_keeps_x_t_above_predicted_x0():
    s = Schedule.linear()
    den = Denoiser(lambda x, n: torch.zeros_like(x), s)  # eps = 0: x0_hat = x_t / alpha_t
    strip, frames, out, kept, times = demo.reverse_trajectory(den, 2, (1, 4, 4), sampler="ddim", steps=6, frames=3,
                                                              clip=False)
    assert len(frames) == 7 and torch.equal(frames[-1], out)  # x_T and one frame per step
    grid_t = s.grid(6).tolist()
    assert [i for i, _ in kept] == [0, 2, 5] and [t for _, t in kept] == pytest.approx([grid_t[i] for i in (0, 2, 5)])
    assert times == pytest.approx(grid_t) and grid_t[-1] == 0  # each frame's time: x_T at the top, the samples at 0
    rows = strip.view(2, 2, 3, 1, 4, 4)  # (sample, [x_t, x0_hat], frame, C, H, W)
    t0 = s.grid(6)[0]
    torch.testing.assert_close(rows[:, 1, 0], rows[:, 0, 0] / s.alpha(t0).float())


def test_the_demos_snapshots_stay_within_ten_times_the_model():
    """From the demo's config, not by training: the bytes of DEMO_SNAPSHOTS_KEPT snapshot files (every track of
    train.posthoc_ema, float32, with their buffers and metadata) against the bytes of model.safetensors."""
    from safetensors.torch import save

    from diffuse.ema import PowerEMA
    from diffuse.kinds.diffusion import build_model

    cfg = demo.demo_config()
    model = build_model(cfg, num_classes=10)
    model_bytes = len(save(model.state_dict()))
    assert 2.5e6 < model_bytes < 3e6  # the 687k-parameter network, 2.7 MB
    snapshot = PowerEMA(model, cfg.train.posthoc_ema)
    snapshot.step = 1
    snapshot_bytes = (snapshot.save_snapshot(Path(tempfile.mkdtemp()), 1)).stat().st_size
    assert len(cfg.train.posthoc_ema) * model_bytes < snapshot_bytes < (len(cfg.train.posthoc_ema) + 0.1) * model_bytes
    assert demo.DEMO_SNAPSHOTS_KEPT * snapshot_bytes <= 10 * model_bytes


def test_thin_snapshots_keeps_the_last_and_a_spread(tmp_path):
    for step in range(100, 2001, 100):
        (tmp_path / f"phema_{step:08d}.safetensors").write_bytes(b"x")
    deleted = demo.thin_snapshots(tmp_path, keep=4)
    assert sorted(snapshot_steps(tmp_path)) == [500, 1000, 1500, 2000] and len(deleted) == 16
    assert demo.thin_snapshots(tmp_path, keep=4) == []  # already thin
    with pytest.raises(ValueError, match="keep at least 2"):
        demo.thin_snapshots(tmp_path, keep=1)


def _ink(img, box):
    """Whether a region of an image holds anything but white (text)."""
    return min(img.convert("L").crop(box).getextrema()) < 128


def test_the_forward_figure_has_t_under_each_column():
    """The strip itself, pixel for pixel, with a title above and t = k/20 written under each of its 21 columns."""
    from diffuse.visualize import grid

    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    img = demo.forward_figure(Flow(), x0)
    plain = grid(demo.forward_strip(Flow(), x0), 21)
    plain = plain.resize((plain.width * 2, plain.height * 2), Image.NEAREST)
    top = img.height - plain.height - 17  # the title's line above, the labels' line (11 px font + 6) below
    assert img.width == plain.width and img.crop((0, top, img.width, top + plain.height)).tobytes() == plain.tobytes()
    below = top + plain.height
    for k in range(21):  # a label inside each column's span, none in the gaps' middle between them
        left = 2 * (2 + k * 10)
        assert _ink(img, (left, below, left + 16, img.height)), k
    assert _ink(img, (0, 0, img.width, top))  # the title


def test_the_reverse_figure_names_rows_and_steps():
    den = Denoiser(lambda x, n: torch.zeros_like(x), Schedule.linear())
    traj = demo.reverse_trajectory(den, 2, (1, 8, 8), sampler="ddim", steps=6, frames=3, clip=False)
    img = demo.reverse_figure(traj, 6)
    plain_width = 2 * (2 + 3 * 10)
    margin = img.width - plain_width
    assert margin > 30 and _ink(img, (0, 20, margin, img.height - 20))  # the row names: x_t, x_0 pred.
    with pytest.raises(ValueError, match="takes 3 column and 4 row labels, got 3 and 3"):
        from diffuse.visualize import labelled_grid
        labelled_grid(traj.strip, 3, columns=["a", "b", "c"], rows=["x"] * 3)


def test_gif_captions_and_pace(tmp_path):
    from diffuse.visualize import save_gif

    frames = [torch.full((2, 1, 8, 8), v) for v in (-1.0, 0.0, 1.0)]
    path = save_gif(frames, tmp_path / "a.gif", nrow=2, scale=3, frame_ms=300, hold_last_ms=2500,
                    captions=["step 0 of 2", "step 1 of 2", "step 2 of 2"])
    gif = Image.open(path)
    durations = []
    for k in range(gif.n_frames):
        gif.seek(k)
        durations.append(gif.info["duration"])
    assert durations == [300, 300, 2500] and gif.height > 3 * (2 + 10)  # a caption line above the grid
    with pytest.raises(ValueError, match="2 captions for 3 frames"):
        save_gif(frames, tmp_path / "b.gif", captions=["a", "b"])


def test_the_readme_opens_with_the_demos_grid_and_its_pictures_exist():
    """The first thing under the README's title is the grid the demo drew, then the screenshots; every picture it shows
    is in the repository (docs/make_readme_figures.py makes them)."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)|<img src=\"([^\"]+)\"", readme)
    paths = [a or b for a, b in pictures]
    assert paths[:3] == ["docs/figures/samples.png", "docs/screenshots/sample_tab.png", "docs/screenshots/edit_tab.png"]
    assert readme.index("docs/figures/samples.png") < readme.index("## Set-up")
    assert [p for p in paths if not (root / p).is_file()] == []
    assert "diffuse-lectures" in readme and "Debian's `diffuse` package" in readme
