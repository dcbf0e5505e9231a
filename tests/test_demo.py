"""The demo's figures, on a tiny model (the real demo is timed by bench/, not here)."""

import pytest
import torch
from PIL import Image

from diffuse import Denoiser, Schedule
from diffuse.app import demo
from diffuse.config import apply_overrides
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
    paths = demo.run_demo(tmp_path, n_samples=10, progress=False)  # a second call resumes and rebuilds it again
    assert paths["sampled weights"] == tmp_path / "run" / "posthoc_ema"
    assert Image.open(paths["forward process"]).size[0] == 2 * (2 + 21 * 10)  # 21 columns of 8 px + padding, x2
    assert Image.open(paths["denoising animation"]).n_frames > 1


def test_a_short_demo_falls_back_to_the_runs_ema(tmp_path, monkeypatch):
    cfg = apply_overrides(demo.demo_config(), TINY)  # 4 steps: one snapshot, nothing to rebuild from
    monkeypatch.setattr(demo, "demo_config", lambda: cfg)
    with pytest.warns(UserWarning, match="the figures use the run's own EMA: post-hoc EMA needs >= 2 snapshots"):
        paths = demo.run_demo(tmp_path, n_samples=10, progress=False)
    assert paths["sampled weights"] == tmp_path / "run"


def test_reverse_trajectory_keeps_x_t_above_predicted_x0():
    s = Schedule.linear()
    den = Denoiser(lambda x, n: torch.zeros_like(x), s)  # eps = 0: x0_hat = x_t / alpha_t
    strip, frames, out = demo.reverse_trajectory(den, 2, (1, 4, 4), sampler="ddim", steps=6, frames=3, clip=False)
    assert len(frames) == 7 and torch.equal(frames[-1], out)  # x_T and one frame per step
    rows = strip.view(2, 2, 3, 1, 4, 4)  # (sample, [x_t, x0_hat], frame, C, H, W)
    t0 = s.grid(6)[0]
    torch.testing.assert_close(rows[:, 1, 0], rows[:, 0, 0] / s.alpha(t0).float())
