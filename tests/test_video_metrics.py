"""The video metrics (diffuse/video_metrics.py): closed forms, the truth scores as the truth, and each metric moves the
way its definition says when the videos are spoiled."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from diffuse.config import DataConfig
from diffuse.data.video import MovingDigits, bundled_digits
from diffuse.train import digit_classifier
from diffuse.video_metrics import (acceleration, best_of_k, centre_of_mass, fd_digits_video, frame_labels, glyph_centre,
                                   identity_kept, over_generated, psnr, ssim, trajectory_error, true_centres)

CFG = DataConfig(source="moving_digits", image_size=32, channels=1, frames=8, digits_per_video=1, digit_size=14,
                 velocity=3, bounce="deterministic", crops=200)


@pytest.fixture(scope="module")
def digits():
    return MovingDigits(CFG, split="test")


@pytest.fixture(scope="module")
def classifier():
    return digit_classifier()


def test_psnr_and_ssim_closed_forms():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(3, 1, 4, 16, 16, generator=g) * 1.6 - 0.8
    assert torch.isinf(psnr(real, real)).all() and torch.allclose(ssim(real, real), torch.ones(3, 4, dtype=torch.float64))
    noise = torch.where(torch.rand(real.shape, generator=g) < 0.5, -0.1, 0.1)  # |error| = 0.1 everywhere, no clipping
    expected = 10 * math.log10(4 / 0.01)                                     # R = 2: 10 log10(R^2 / MSE) = 26.02 dB
    assert torch.allclose(psnr(real + noise, real), torch.full((3,), expected, dtype=torch.float64), atol=1e-4)
    assert (ssim(real + noise, real) < 1).all()
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(real[:, :, :2], real)
    with pytest.raises(ValueError, match="at least 11x11 pixels"):
        ssim(real[..., :10, :10], real[..., :10, :10])


def test_psnr_is_mcvds_per_video_not_the_mean_of_per_frame_psnrs():
    """MCVD (ncsn_runner.py): PSNR of a video = 10 log10(R^2 / MSE over its frames). Frames with errors 0.1 and 0.3 give
    10 log10(4 / 0.05) = 19.03 dB (the mean of per-frame PSNRs: 21.25); an exact frame beside one of error 0.1 gives
    10 log10(4 / 0.005) = 29.03 dB, not +inf; the given frames (generated False) are left out of the MSE."""
    real = torch.zeros(1, 1, 3, 16, 16)
    fake = real.clone()
    fake[:, :, 1], fake[:, :, 2] = 0.1, 0.3
    assert float(psnr(fake, real, [False, True, True])) == pytest.approx(10 * math.log10(4 / 0.05), abs=1e-5)  # float32 frames
    assert float(psnr(fake[:, :, :2], real[:, :, :2])) == pytest.approx(10 * math.log10(4 / 0.005), abs=1e-5)  # float32 frames
    assert float(psnr(fake, real, [True, True, False])) == pytest.approx(10 * math.log10(4 / 0.005), abs=1e-5)  # float32 frames
    assert float(psnr(fake, real)) == pytest.approx(10 * math.log10(4 / (0.1 / 3)), abs=1e-5)  # float32 frames


def _ssim_reference(a: np.ndarray, b: np.ndarray, L: float = 2.0) -> float:
    """Wang et al. 2004, eq. 13 with a Gaussian window (sigma 1.5, truncated at 3.5 sigma: 11x11), population
    (co)variances, C1 = (0.01 L)^2, C2 = (0.03 L)^2, averaged over the pixels whose window lies inside the frame."""
    from scipy.ndimage import gaussian_filter

    f = lambda x: gaussian_filter(x, 1.5, truncate=3.5, mode="reflect")  # noqa: E731
    mu_a, mu_b = f(a), f(b)
    var_a, var_b, cov = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s[5:-5, 5:-5].mean())


def test_ssim_is_wang_et_al_with_a_gaussian_window_as_mcvd():
    """Each frame's SSIM equals eq. 13 of Wang et al. 2004 with the Gaussian window (sigma 1.5) and population
    covariances (written out here with scipy), and differs from the 7x7 uniform window with sample covariances
    (scikit-image's default, what this measured before)."""
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    real = torch.rand(2, 1, 3, 24, 24, generator=g) * 2 - 1
    fake = (real + 0.3 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    got = ssim(fake, real)
    a, b = fake.double().numpy(), real.double().numpy()
    want = torch.tensor([[_ssim_reference(a[i, 0, f], b[i, 0, f]) for f in range(3)] for i in range(2)])
    assert torch.allclose(got, want.double(), atol=1e-5), (got, want)
    uniform = torch.tensor([[structural_similarity(a[i, 0, f], b[i, 0, f], data_range=2.0) for f in range(3)]
                            for i in range(2)], dtype=torch.float64)
    assert (got - uniform).abs().min() > 1e-3


def test_scores_count_the_generated_frames_only_and_best_of_k_picks_the_best():
    per_frame = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert over_generated(per_frame, [False, False, True, True]).tolist() == [35.0]  # the given frames left out
    with pytest.raises(ValueError, match="no generated frame"):
        over_generated(per_frame, [False] * 4)
    scores = torch.tensor([[1.0, 5.0], [3.0, 2.0], [2.0, 4.0]])  # K = 3 samples of B = 2 videos
    assert best_of_k(scores) == {"best": 4.0, "mean": pytest.approx(17 / 6)}


def test_the_digit_is_kept_in_true_videos_and_not_in_shuffled_frames(digits, classifier):
    x, _ = digits.batch(torch.arange(100))
    true = torch.tensor([digits.trajectory(i).labels[0] for i in range(100)])
    kept = identity_kept(frame_labels(x, classifier, crop=digits.digit_size), true)
    assert kept["constant"] > 0.8 and kept["true"] > 0.8, kept
    perm = torch.stack([torch.roll(torch.arange(100), k) for k in range(8)], 1)  # frame f from video i - f
    shuffled = x[perm, :, torch.arange(8)].permute(0, 2, 1, 3, 4)
    spoiled = identity_kept(frame_labels(shuffled, classifier, crop=digits.digit_size), true)
    assert spoiled["constant"] < 0.1 and spoiled["constant"] < kept["constant"] - 0.7, (kept, spoiled)


def test_trajectory_error_is_zero_for_the_truth_and_the_shift_for_a_shifted_video(digits):
    glyphs = bundled_digits(digits.digit_size)[0]
    free = digits.size - digits.digit_size
    fits = [i for i in range(100) if (digits.trajectory(i).positions[:, 0].max(0) <= [free - 3, free - 4]).all()][:10]
    trs = [digits.trajectory(i) for i in fits]
    x, _ = digits.batch(torch.tensor(fits))
    generated = torch.tensor([False] * 4 + [True] * 4)
    centres = true_centres(trs, glyphs)
    assert trajectory_error(x, centres, generated).max() < 1e-4
    shifted = torch.from_numpy(np.stack([digits.render(dataclasses.replace(t, positions=t.positions + [3, 4])) for t in trs]))
    err = trajectory_error(shifted[:, None] * 2 - 1, centres, generated)
    assert torch.allclose(err, torch.full_like(err, 5.0), atol=1e-4)  # a (3, 4) shift is 5 pixels away
    straight = acceleration(x, trs, generated)
    assert torch.nan_to_num(straight, 0.0).max() < 1e-4 and not torch.isnan(straight).all()
    jitter = x.clone()
    jitter[:, :, 5] = shifted[:, None, 5] * 2 - 1  # frame 5 moved off the line by 5 px
    assert (torch.nan_to_num(acceleration(jitter, trs, generated), 0.0) > 2).any()
    two = MovingDigits(dataclasses.replace(CFG, digits_per_video=2), split="test")
    with pytest.raises(ValueError, match="one-digit videos"):
        true_centres([two.trajectory(0)], glyphs)


def test_the_centre_of_mass_ignores_a_background_near_minus_one():
    """A digit (a bundled glyph, 14 px) pasted at (3, 16) on a 32x32 canvas whose background is -0.97, as a generated
    frame's often is: the centre of mass is the glyph's true centre (exactly; within 0.1 px with noise of std 0.02 on
    the background), where weights (x + 1) / 2 give the background a mass of ~15 pulling it ~3 px towards the
    canvas's centre."""
    glyph = torch.tensor(bundled_digits(14)[0][7], dtype=torch.float64)  # (14, 14) in [0, 1]
    frame = torch.full((32, 32), -0.97, dtype=torch.float64)
    frame[3:17, 16:30] += 1.97 * glyph  # ink 1 on the glyph's strokes
    true = torch.tensor([3.0, 16.0], dtype=torch.float64) + torch.from_numpy(glyph_centre(glyph.numpy()))
    got = centre_of_mass(frame[None, None, None])[0, 0]
    assert float((got - true).norm()) < 1e-6, (got, true)
    noise = 0.02 * torch.randn(32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noisy = torch.where(frame > -0.97, frame, frame + noise)
    assert float((centre_of_mass(noisy[None, None, None])[0, 0] - true).norm()) < 0.1
    naive = (((frame + 1) / 2)[..., None] * torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0),
                                                                        indexing="ij"), -1)).sum((0, 1)) / ((frame + 1) / 2).sum()
    assert float((naive - true).norm()) > 2  # the old weights: the defect this guards against
    assert torch.isnan(centre_of_mass(torch.full((1, 1, 1, 8, 8), -0.97))).all()  # an empty frame: no centre


def test_fd_digits_video_is_zero_for_a_set_against_itself_and_grows_with_a_perturbation(digits, classifier):
    x, _ = digits.batch(torch.arange(200))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 200 videos in 384 dimensions: singular, fine for an ordering
        same = fd_digits_video(x, x, classifier)
        g = torch.Generator().manual_seed(0)
        small = fd_digits_video(x, (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1), classifier)
        large = fd_digits_video(x, (x + 0.6 * torch.randn(x.shape, generator=g)).clamp(-1, 1), classifier)
    assert abs(same) < 1e-3 and 0 < small < large, (same, small, large)


@pytest.mark.slow
def test_the_video_benchmark_runs_end_to_end_in_its_smoke_mode(tmp_path):
    """bench/video.py --smoke (~45 s on a busy 2-core CPU): trains its three runs 2 steps each, measures every part,
    leaves bench/RESULTS.md alone."""
    root = Path(__file__).resolve().parents[1]
    results = root / "bench" / "RESULTS.md"
    before = results.read_text() if results.is_file() else None
    done = subprocess.run([sys.executable, str(root / "bench" / "video.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert {v["steps"] for v in r["runs"].values()} == {2}
    methods = {(row["task"], row["method"]) for row in r["tasks"]}
    assert len(methods) == 8 and ("prediction 4 -> 4", "reconstruction guidance") in methods
    copied = [row for row in r["tasks"] if row["method"] == "nearest given frame, copied"]
    assert all(row["label constant"] == 1.0 and row["trajectory px"] > 0 for row in copied)  # a frozen digit: kept, not moving
    assert [row["run"] for row in r["joint"]] == ["masked", "video-only"]
    assert [row["scheme"] for row in r["long"]] == ["autoregressive", "hierarchy-2"]
    assert [row["frames"] for row in r["cost"]] == [4, 8] and all(row["frames/s"] > 0 for row in r["cost"])
    assert (results.read_text() if results.is_file() else None) == before
