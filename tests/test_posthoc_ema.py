"""Tests for diffuse.ema: the sigma_rel <-> gamma map, the power EMA's exact weights, the Gram matrix against
quadrature, reconstruction against a directly tracked EMA, range errors, resume, corrupt snapshots."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.optimize import brentq
from torch import nn

import diffuse.ema as ph
from diffuse.ema import gamma_to_sigma_rel, list_snapshots, posthoc_coefficients, power_ema_beta, PowerEMA, reconstruct, reconstructable_range, sigma_rel_to_gamma


class Walker(nn.Module):
    """A toy "model": a parameter vector (and a step-count buffer) that the tests move by hand."""

    def __init__(self, n: int = 8):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def set(self, value: torch.Tensor) -> None:
        self.w.copy_(value)
        self.count += 1


def test_sigma_rel_gamma_round_trip_and_brentq():
    for s in np.geomspace(1e-4, 0.29, 25):
        g = sigma_rel_to_gamma(float(s))
        # the same inverse found another way: bracketed root of eq. 123 on the branch gamma >= GAMMA_MIN
        g_ref = brentq(lambda x: gamma_to_sigma_rel(x) - s, ph.GAMMA_MIN, 1e7, xtol=1e-13, rtol=1e-14)
        assert g == pytest.approx(g_ref, rel=1e-9, abs=1e-9)
        assert gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-12)
    for g in (0.0, 1.0, 6.94, 16.97, 100.0, 1e4):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(g)) == pytest.approx(g, rel=1e-9, abs=1e-9)
    # EDM2's tracked pair: the narrower profile has the larger exponent
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    # the widest profile: gamma^2 + 3 gamma + 1 = 0, sigma_rel = golden ratio^(-5/2)
    assert gamma_to_sigma_rel(ph.GAMMA_MIN) == pytest.approx(ph.SIGMA_REL_MAX, rel=1e-14)
    def eq123(g):
        return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))

    assert eq123(ph.GAMMA_MIN - 1e-3) < ph.SIGMA_REL_MAX and eq123(ph.GAMMA_MIN + 1e-3) < ph.SIGMA_REL_MAX


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 0.0, -0.1, 0.31, 0.5])
def test_sigma_rel_out_of_range_raises(bad):
    with pytest.raises(ValueError, match=r"\(0, 0\.300283\]"):
        sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, -1.0])
def test_gamma_out_of_range_raises(bad):
    with pytest.raises(ValueError, match="-0.381966"):
        gamma_to_sigma_rel(bad)


def test_beta_edges():
    assert power_ema_beta(1, 6.94) == 0.0  # the first step replaces the initial weights entirely
    assert power_ema_beta(10, 0.0) == pytest.approx(0.9)  # gamma = 0: the plain running mean
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="step"):
            power_ema_beta(bad, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        power_ema_beta(3, -1.0)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.25])
def test_power_ema_is_the_power_function_average(sigma_rel):
    """Unrolling ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t with beta_k = ((k-1)/k)^(gamma+1): theta_k keeps
    (1 - beta_k) prod_{j>k} beta_j = (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1), the integral of the continuous
    profile (gamma+1) tau^gamma / t^(gamma+1) over (k-1, k]. These are the exact weights (they telescope to 1);
    the naive k^gamma / sum k^gamma differs from them by O(gamma / t) in L1, asserted below as well."""
    torch.manual_seed(0)
    T, gamma = 1000, sigma_rel_to_gamma(sigma_rel)
    thetas = torch.randn(T, 3)
    model = Walker(3)
    ema = PowerEMA(model, (sigma_rel,))
    for k in range(1, T + 1):
        model.set(thetas[k - 1])
        ema.update(model, k)
    k = np.arange(1, T + 1, dtype=np.float64)
    w = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / T ** (gamma + 1)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    expected = w @ thetas.double().numpy()
    np.testing.assert_allclose(ema.tracks[0]["w"].double().numpy(), expected, atol=1e-5, rtol=0)
    naive = k**gamma / (k**gamma).sum()
    assert np.abs(w - naive).sum() < (gamma + 1) / T  # measured 0.02x / 0.05x / 0.31x this bound
    assert ema.track(0)["count"] == T


def test_coefficients_match_quadrature():
    """The closed-form Gram matrix (eq. 151) and the relative error agree with brute-force integration."""
    gs = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    t_snap = np.repeat([300.0, 600.0, 1000.0], 2)
    g_snap = np.tile(gs, 3)
    t_r, g_r = 1000.0, sigma_rel_to_gamma(0.07)
    x, err = posthoc_coefficients(t_snap, g_snap, t_r, g_r)
    assert x.sum() == pytest.approx(1.0, abs=1e-12)
    tau = (np.arange(400_000) + 0.5) * (t_r / 400_000)

    def p(t, g):
        return np.where(tau <= t, (g + 1) * (tau / t) ** g / t, 0.0)

    resid = p(t_r, g_r) - sum(xi * p(t, g) for xi, t, g in zip(x, t_snap, g_snap))
    err_quad = math.sqrt(np.sum(resid**2) / np.sum(p(t_r, g_r) ** 2))
    assert err == pytest.approx(err_quad, rel=1e-3)
    assert 1e-4 < err < 0.1  # 0.051: three snapshot times only
    # a target that is one of the snapshots is reproduced exactly
    x1, err1 = posthoc_coefficients(t_snap, g_snap, 600.0, gs[1])
    np.testing.assert_allclose(x1, np.eye(6)[3], atol=1e-8)
    assert err1 < 1e-6
    with pytest.raises(ValueError):
        posthoc_coefficients([100.0], [1.0, 2.0], 100.0, 1.0)
    with pytest.raises(ValueError):
        posthoc_coefficients([100.0, 200.0], [1.0, float("nan")], 100.0, 1.0)


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    """2000 steps of a Gaussian random walk; tracks (0.05, 0.10) snapshotted every 100 steps, 0.07 tracked directly."""
    d = tmp_path_factory.mktemp("phema")
    torch.manual_seed(1)
    model = Walker(64)
    ema, direct = PowerEMA(model), PowerEMA(model, (0.07,))
    theta, history, direct_at, track0_at = torch.zeros(64), [], {}, {}
    for k in range(1, 2001):
        theta = theta + torch.randn(64)
        history.append(theta)
        model.set(theta)
        ema.update(model, k)
        direct.update(model, k)
        if k % 100 == 0:
            ema.save_snapshot(d, k)
            direct_at[k], track0_at[k] = direct.tracks[0]["w"].clone(), ema.tracks[0]["w"].clone()
    return d, direct_at, track0_at, torch.stack(history).double()


# Measured with this seed: max |reconstructed - direct| over the 64 coordinates, in units of the walk's steps
# (the walk itself spans ~45), and as a fraction of how far the sigma_rel 0.05 EMA is from the 0.07 one:
#   step 2000 (20 snapshots): 0.0045, 0.09% (profile error 0.0025)
#   step 1000 (10 snapshots): 0.032,  0.93% (profile error 0.0091)
TOLERANCE = {2000: (0.01, 0.002), 1000: (0.06, 0.015)}


@pytest.mark.parametrize("step", [2000, 1000])
def test_reconstruct_matches_directly_tracked_ema(walk, step):
    d, direct_at, track0_at, history = walk
    snaps = list_snapshots(d)
    assert [s.step for s in snaps] == list(range(100, 2001, 100))
    assert not [f for f in os.listdir(d) if not f.startswith("phema_")]  # no temp files left behind
    rec = reconstruct(d, 0.07, step=None if step == 2000 else step)
    assert rec["count"] == step  # buffers come from the newest snapshot used
    direct = direct_at[step].double()
    diff = (rec["w"].double() - direct).abs()
    abs_tol, rel_tol = TOLERANCE[step]
    assert diff.max() < abs_tol
    assert diff.max() < rel_tol * (track0_at[step].double() - direct).abs().max()
    # Cauchy-Schwarz: each EMA is the integral of p(tau) theta(tau), theta piecewise constant on (k-1, k], and the
    # coefficients sum to 1, so per coordinate |rec - direct| <= err ||p_r|| ||theta - mean(theta)||_L2[0, step].
    used = [s for s in snaps if s.step <= step]
    g_r = sigma_rel_to_gamma(0.07)
    _, err = posthoc_coefficients([s.step for s in used for _ in s.gammas], [g for s in used for g in s.gammas],
                                  step, g_r)
    norm_p = (g_r + 1) / math.sqrt((2 * g_r + 1) * step)
    h = history[:step]
    assert torch.all(diff <= err * norm_p * ((h - h.mean(0)) ** 2).sum(0).sqrt() + 1e-4)


def test_reconstructable_range_and_errors(walk):
    d, *_ = walk
    lo, hi = reconstructable_range(d)
    assert 0.015 < lo < 0.035 and 0.2 < hi < 0.28  # measured (0.0246, 0.2441)
    g = sigma_rel_to_gamma
    t_snap = [s.step for s in list_snapshots(d) for _ in s.gammas]
    g_snap = [x for s in list_snapshots(d) for x in s.gammas]
    assert posthoc_coefficients(t_snap, g_snap, 2000, g(lo))[1] <= 0.05
    assert posthoc_coefficients(t_snap, g_snap, 2000, g(lo * 0.99))[1] > 0.05
    assert posthoc_coefficients(t_snap, g_snap, 2000, g(hi * 1.01))[1] > 0.05
    for bad in (0.5, 0.001, 0.28):
        with pytest.raises(ValueError, match=rf"sigma_rel={bad}.*0\.05, 0\.1.*\[{lo:.4f}, {hi:.4f}\]"):
            reconstruct(d, bad)
    with pytest.raises(ValueError, match="nan"):
        reconstruct(d, float("nan"))
    assert reconstructable_range(d, max_error=1e-9) is None


def test_too_few_snapshots(tmp_path):
    model = Walker()
    with pytest.raises(ValueError, match="found 0"):
        reconstruct(tmp_path, 0.07)
    ema = PowerEMA(model)
    ema.update(model, 1)
    ema.save_snapshot(tmp_path, 1)
    with pytest.raises(ValueError, match="found 1"):
        reconstruct(tmp_path, 0.07)
    with pytest.raises(ValueError, match="holds step 1"):
        ema.save_snapshot(tmp_path, 2)


def test_state_dict_resume_is_bit_identical(tmp_path):
    torch.manual_seed(2)
    values = torch.randn(60, 8)
    model = Walker()
    a = PowerEMA(model, (0.05, 0.1, 0.2))
    for k in range(1, 31):
        model.set(values[k - 1])
        a.update(model, k)
    save_file(a.state_dict(), tmp_path / "ema.safetensors")
    meta = a.metadata()
    b = PowerEMA(Walker(), (0.05, 0.1, 0.2))
    b.load_state_dict(load_file(tmp_path / "ema.safetensors"), meta)
    with pytest.raises(ValueError, match="expects step 31"):
        b.update(model, 30)
    for k in range(31, 61):
        model.set(values[k - 1])
        a.update(model, k)
        b.update(model, k)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and {"0.w", "2.w", "buffers.count"} <= sa.keys()
    assert all(torch.equal(sa[key], sb[key]) for key in sa)
    assert b.step == 60
    with pytest.raises(ValueError, match="sigma_rels"):
        PowerEMA(Walker(), (0.05,)).load_state_dict(sa, a.metadata())


def test_corrupt_snapshot_is_named(tmp_path):
    model = Walker()
    ema = PowerEMA(model)
    for k in range(1, 4):
        model.set(torch.full((8,), float(k)))
        ema.update(model, k)
        ema.save_snapshot(tmp_path, k)
    victim = tmp_path / "phema_00000002.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"corrupt post-hoc EMA snapshot .*phema_00000002\.safetensors"):
        list_snapshots(tmp_path)
    with pytest.raises(ValueError, match=r"phema_00000002\.safetensors"):
        reconstruct(tmp_path, 0.07)
    victim.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"phema_00000002\.safetensors"):
        list_snapshots(tmp_path)
    os.replace(tmp_path / "phema_00000003.safetensors", victim)  # a step that does not match its name
    with pytest.raises(ValueError, match=r"phema_00000002\.safetensors.*step '3'"):
        list_snapshots(tmp_path)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = Walker()
    ema = PowerEMA(model)
    ema.update(model, 1)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)  # the write fails after the bytes went out
    with pytest.raises(OSError, match="disk full"):
        ema.save_snapshot(tmp_path, 1)
    assert os.listdir(tmp_path) == []


def test_reconstruct_reports_each_snapshot_it_reads(walk):
    d, *_ = walk
    for step, used in ((None, 20), (1000, 10)):
        seen = []
        reconstruct(d, 0.07, step=step, on_snapshot=lambda done, total: seen.append((done, total)))
        assert seen == [(k, used) for k in range(1, used + 1)]


def test_the_ema_command_shows_its_progress(tmp_path, capsys, monkeypatch):
    from diffuse.app.cli import main
    from test_cli import TINY, _sets

    run, out = tmp_path / "run", tmp_path / "ema"
    assert main(["train", "configs/mnist.toml", *_sets(TINY + ["train.posthoc_ema=[0.05, 0.1]", "train.ema_snapshot_every=1"]),
                 "--out", str(run)]) == 0
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    capsys.readouterr()
    assert main(["ema", str(run), "--sigma-rel", "0.1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "post-hoc EMA 0.1: 100%" in err and "4/4" in err  # the 4 snapshots of 4 steps
