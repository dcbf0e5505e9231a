"""Training-free editing (tasks/editing.py): SDEdit, inpainting with RePaint's resampling, ILVR, driven by exact
denoisers of Gaussian data whose answers are known in closed form."""

from __future__ import annotations

import pytest
import torch

from diffuse.denoiser import Denoiser
from diffuse.generate import generate
from diffuse.samplers import SAMPLERS
from diffuse.schedule import EDM, Flow, Schedule, VPCosine
from diffuse.tasks import ilvr, inpaint, low_pass, repaint_grid, sdedit
from diffuse.tasks.editing import check_mask, sdedit_time

from conftest import gaussian_eps

D = 4  # a 2 x 2 image whose 4 pixels are correlated
_g = torch.Generator().manual_seed(0)
_A = torch.randn(D, D, generator=_g, dtype=torch.float64)
SIGMA = 0.3 * (_A @ _A.T / D + 0.05 * torch.eye(D, dtype=torch.float64))
MU = torch.tensor([0.2, -0.1, 0.3, 0.0], dtype=torch.float64)


def correlated_denoiser(schedule) -> Denoiser:
    """The exact denoiser of x_0 ~ N(MU, SIGMA): E[x_0 | x_t] = MU + alpha SIGMA (alpha^2 SIGMA + sigma^2 I)^-1 (x_t - alpha MU)."""
    def net(x, model_time):
        t = schedule.t_from_model_time(model_time).expand(x.shape[0])
        a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
        xf = x.flatten(1).double()
        M = a[:, :, None] ** 2 * SIGMA + s[:, :, None] ** 2 * torch.eye(D, dtype=torch.float64)
        x0 = MU + a * (SIGMA @ torch.linalg.solve(M, (xf - a * MU)[..., None]))[..., 0]
        return ((xf - a * x0) / s).view_as(x).to(x.dtype)
    return Denoiser(net, schedule)


def image(values, n):
    """n copies of a 2 x 2 image, float32 like every sample (generate draws x_T in float32)."""
    return torch.as_tensor(values, dtype=torch.float32).view(1, 1, 2, 2).expand(n, 1, 2, 2).clone()


# --- SDEdit ------------------------------------------------------------------------------------------------
def test_sdedit_strength_0_is_the_guide_and_1_is_unconditional_sampling():
    den = correlated_denoiser(Schedule.linear())
    guide = image([1.0, -1.0, 0.5, 0.5], 8)
    torch.testing.assert_close(sdedit(den, guide, 0.0, steps=10, clip=False), guide)
    for sampler in ("ddim", "ddpm", "dpmpp-2m"):
        plain = generate(den, 8, (1, 2, 2), sampler=sampler, steps=10, seed=4, clip=False)
        torch.testing.assert_close(sdedit(den, guide, 1.0, sampler=sampler, steps=10, seed=4, clip=False), plain)


def test_sdedit_draws_the_posterior_of_its_noised_guide():
    """SDEdit with the exact ancestral sampler from x_t0 = alpha g + sigma z samples p(x_0 | x_t0), so over z the
    output is Gaussian with mean MU + alpha^2 S A^-1 (g - MU) and covariance S - alpha G S + sigma^2 G G^T, where
    A = alpha^2 S + sigma^2 I and G = alpha S A^-1 (S = SIGMA). 4,000 samples: within ~3 Monte-Carlo errors."""
    s = Schedule.linear()
    den = correlated_denoiser(s)
    g = torch.tensor([1.0, -1.0, 0.5, 0.5], dtype=torch.float64)
    strength = 0.5
    t0 = torch.tensor(sdedit_time(s, strength), dtype=torch.float64)
    a, sg = float(s.alpha(t0)), float(s.sigma(t0))
    G = a * SIGMA @ torch.linalg.inv(a**2 * SIGMA + sg**2 * torch.eye(D, dtype=torch.float64))
    mean, cov = MU + G @ (a * g - a * MU), SIGMA - a * G @ SIGMA + sg**2 * G @ G.T
    out = sdedit(den, image(g, 4000), strength, sampler="ddpm", steps=400, clip=False, seed=3).flatten(1)
    torch.testing.assert_close(out.mean(0).double(), mean, atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(out.T).double(), cov, atol=0.04, rtol=0)


SDEDIT_PROCESSES = {"linear": Schedule.linear(), "cosine": Schedule.cosine(), "vp_cosine": VPCosine(), "edm": EDM(),
                    "flow": Flow()}


@pytest.mark.parametrize("strength", [0.05, 0.25, 0.5, 0.75, 0.95])
def test_sdedit_strength_is_one_noise_level_on_every_process(strength):
    """strength s starts where sigma/alpha = s / (1 - s) on every process: x_t0 / (alpha + sigma) is (1 - s) guide and
    s noise, the guide's share alpha / (alpha + sigma) = 1 - s (t0 = s * t_top gave EDM sigma/alpha = 4 at s = 0.05)."""
    for name, schedule in SDEDIT_PROCESSES.items():
        t0 = torch.tensor(sdedit_time(schedule, strength), dtype=torch.float64)
        a, sg = float(schedule.alpha(t0)), float(schedule.sigma(t0))
        assert a / (a + sg) == pytest.approx(1 - strength, rel=1e-6), name
    for schedule in SDEDIT_PROCESSES.values():  # the ends: the guide itself, the grids' top
        assert sdedit_time(schedule, 0.0) == 0.0 and sdedit_time(schedule, 1.0) == schedule.t_top
        assert sdedit_time(schedule, 0.9999) == schedule.t_top  # sigma/alpha 9999 is above every top: the top


def test_sdedit_keeps_the_same_share_of_the_guide_on_vp_flow_and_edm():
    """With the exact denoiser of data N(0, c^2), the probability-flow ODE (DPM-Solver++(2M), 50 steps) from x_t0 keeps c / sqrt(c^2 + r0^2) of the
    guide, r0 = sigma/alpha at t0: a white and a black guide end 2 c / sqrt(c^2 + r0^2) apart whatever the process.
    At strength 0.5 (r0 = 1) the outputs are 0.894 apart on each (they were 0.27 on linear VP, 0.88 on flow and 0.024
    on EDM with t0 = strength * t_top)."""
    c = 0.5
    for strength in (0.25, 0.5, 0.75):
        r0 = strength / (1 - strength)
        expected = 2 * c / (c**2 + r0**2) ** 0.5
        for name in ("linear", "cosine", "edm", "flow"):
            schedule = SDEDIT_PROCESSES[name]
            den = Denoiser(gaussian_eps(schedule, 0.0, c), schedule, prediction="eps")
            white, black = (sdedit(den, torch.full((64, 1, 2, 2), v), strength, sampler="dpmpp-2m", steps=50, seed=1,
                                   clip=False) for v in (1.0, -1.0))
            assert float((white - black).abs().mean()) == pytest.approx(expected, rel=0.01), (name, strength)


def test_sdedit_refuses_a_bad_strength():
    den = correlated_denoiser(Schedule.linear())
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
            sdedit(den, image([0, 0, 0, 0], 2), bad)


# --- inpainting and RePaint ----------------------------------------------------------------------------------
KNOWN, UNKNOWN = [0, 1], [2, 3]
MASK = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)  # keep the top row, generate the bottom row


def exact_conditional(known):
    """The Gaussian of the unknown pixels given the known ones: the answer inpainting aims at."""
    S_kk, S_uk = SIGMA[KNOWN][:, KNOWN], SIGMA[UNKNOWN][:, KNOWN]
    mean = MU[UNKNOWN] + S_uk @ torch.linalg.solve(S_kk, known[KNOWN] - MU[KNOWN])
    return mean, SIGMA[UNKNOWN][:, UNKNOWN] - S_uk @ torch.linalg.solve(S_kk, S_uk.T)


@pytest.mark.parametrize("sampler", sorted(n for n in SAMPLERS if n != "ode-rk45"))
def test_inpainting_keeps_the_known_pixels_exactly_with_every_sampler(sampler):
    den = correlated_denoiser(Schedule.linear())
    known = image([0.8, -0.5, 0.0, 0.0], 16)
    out = inpaint(den, known, MASK, sampler=sampler, steps=8, clip=False, seed=0)
    assert torch.equal(out.flatten(1)[:, KNOWN], known.flatten(1)[:, KNOWN])
    assert out.flatten(1)[:, UNKNOWN].std(0).min() > 0.05  # the unknown pixels are drawn, not copied
    rep = inpaint(den, known, MASK, sampler=sampler, steps=8, jump_length=2, jump_n_samples=3, clip=False, seed=0)
    assert torch.equal(rep.flatten(1)[:, KNOWN], known.flatten(1)[:, KNOWN])


def test_repaint_resampling_moves_the_unknown_pixels_toward_the_exact_conditional():
    """Replacing the known pixels after each step alone leaves the unknown ones nearly at their prior (here their mean
    is 0.54 away from the conditional's); RePaint's resampling lets them follow the known ones. Measured with 2,000
    samples of the exact ancestral sampler (50 steps): the error in mean and covariance falls as jump_n_samples
    grows (1 -> 5 -> 20, jump length 1), to a tenth of the mean's gap. It is not the exact conditional: RePaint's
    fixed point conditions on a noised copy of the known pixels at every level, which loses a little of them."""
    den = correlated_denoiser(Schedule.linear())
    values = torch.tensor([0.8, -0.5, 0.0, 0.0], dtype=torch.float64)
    mean, cov = exact_conditional(values)
    errors = []
    for r in (1, 5, 20):
        out = inpaint(den, image(values, 2000), MASK, sampler="ddpm", steps=50, jump_length=1, jump_n_samples=r,
                      clip=False, seed=1).flatten(1)[:, UNKNOWN]
        errors.append((float((out.mean(0).double() - mean).abs().max()), float((torch.cov(out.T).double() - cov).abs().max())))
    assert errors[0][0] > 0.4  # plain replacement barely moves the unknown pixels
    assert errors[0][0] > errors[1][0] > errors[2][0] and errors[2][0] < 0.12, errors
    assert errors[0][1] > errors[2][1] and errors[2][1] < 0.07, errors


@pytest.mark.parametrize("process", [EDM, Flow])
def test_inpainting_runs_on_every_process(process):
    s = process()
    den = Denoiser(gaussian_eps(s, 0.2, 0.5), s)
    known = torch.full((200, 1, 2, 2), 0.7)
    out = inpaint(den, known, MASK, sampler="dpmpp-2m", steps=20, clip=False, jump_length=2, jump_n_samples=2)
    assert torch.equal(out.flatten(1)[:, KNOWN], known.flatten(1)[:, KNOWN])
    # independent pixels: the unknown ones keep the prior N(0.2, 0.5^2)
    assert abs(float(out.flatten(1)[:, UNKNOWN].mean()) - 0.2) < 0.08 and abs(float(out.flatten(1)[:, UNKNOWN].std()) - 0.5) < 0.08


def test_repaint_grid_is_the_reference_schedule():
    """RePaint's get_schedule_jump (t_T = 6, jump_length 2, jump_n_sample 2) in levels: 6 5 4 3 2 1 [up 2 3] 2 1 0, with
    the extra jump at level 3 (j = 2): 6 5 4 3 [4 5] 4 3 2 1 [2 3] 2 1 0."""
    grid = torch.linspace(1, 0, 7, dtype=torch.float64)  # level k is time k / 6
    levels = (repaint_grid(grid, jump_length=2, jump_n_samples=2) * 6).round().long().tolist()
    assert levels == [6, 5, 4, 3, 4, 5, 4, 3, 2, 1, 2, 3, 2, 1, 0]
    assert torch.equal(repaint_grid(grid, 3, 1), grid)
    with pytest.raises(ValueError, match="jump_length >= 1"):
        repaint_grid(grid, 0, 2)


def test_ode_rk45_refuses_a_projection():
    den = correlated_denoiser(Schedule.linear())
    with pytest.raises(ValueError, match="no step to project after"):
        inpaint(den, image([0.8, -0.5, 0, 0], 2), MASK, sampler="ode-rk45")


@pytest.mark.parametrize("mask, match", [
    (torch.ones(1, 1, 3, 3), r"the mask must have the image's size \(2, 2\)"),
    (torch.ones(1, 1, 2, 2), "keeps every pixel: nothing to inpaint"),
    (torch.zeros(1, 1, 2, 2), "keeps no pixel"),
    (torch.full((1, 1, 2, 2), 0.5), "only 0 .generate. and 1 .keep."),
])
def test_bad_masks_are_named(mask, match):
    with pytest.raises(ValueError, match=match):
        check_mask(mask, torch.zeros(2, 1, 2, 2))


# --- ILVR ------------------------------------------------------------------------------------------------------
def test_low_pass_is_a_projection_onto_block_means():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = low_pass(x, 4)
    torch.testing.assert_close(low_pass(y, 4), y)
    torch.testing.assert_close(y[:, :, :4, :4].mean((-1, -2)), x[:, :, :4, :4].mean((-1, -2)))
    assert torch.equal(y[:, :, 0, 0], y[:, :, 3, 3])
    with pytest.raises(ValueError, match="must be >= 1 and divide the image size"):
        low_pass(x, 3)


def test_ilvr_outputs_share_the_references_low_pass_and_diversity_grows_with_the_factor():
    """Independent N(0.1, 0.4^2) pixels: with ILVR through every step, the samples' N x N block means equal the
    reference's (to float precision); below the factor they vary, more for larger N: the spread is the sampler's own
    times sqrt(1 - 1/N^2), the share of a pixel's variance outside its block mean."""
    s = Schedule.linear()
    den = Denoiser(gaussian_eps(s, 0.1, 0.4), s)
    ref = (torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.4 + 0.1).clamp(-1, 1)
    plain = float(generate(den, 1000, (1, 8, 8), sampler="ddpm", steps=50, clip=False, seed=2).std(0).mean())
    spread = {}
    for N in (2, 4, 8):
        out = ilvr(den, ref.expand(1000, 1, 8, 8), N, sampler="ddpm", steps=50, clip=False, seed=2)
        torch.testing.assert_close(low_pass(out, N), low_pass(ref, N).expand_as(out), atol=1e-5, rtol=0)
        spread[N] = float(out.std(0).mean())
        # the sampler's own spread (50 ancestral steps give 0.35, not 0.4) times the share ILVR leaves free
        assert spread[N] / plain == pytest.approx((1 - 1 / N**2) ** 0.5, rel=0.03), (N, spread[N], plain)
    assert spread[2] < spread[4] < spread[8]
    # stopping the conditioning early (t_stop) lets the last steps drift: close to the reference, not equal
    late = ilvr(den, ref.expand(1000, 1, 8, 8), 4, t_stop=0.1, sampler="ddpm", steps=50, clip=False, seed=2)
    drift = float((low_pass(late, 4) - low_pass(ref, 4)).abs().mean())
    assert 1e-3 < drift < 0.2, drift
    with pytest.raises(ValueError, match=r"t_stop must be in \[0, 1\]"):
        ilvr(den, ref, 4, t_stop=2.0)
