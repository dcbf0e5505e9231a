"""Loss weightings written for every prediction type and process (losses.loss_weight): the weighted loss of a network
whose x_0 is off by delta is lambda(t) ||delta||^2, with lambda the weighting's formula, whatever the target."""

from __future__ import annotations

import pytest
import torch

from diffuse.denoiser import PREDICTION_TYPES, Denoiser, edm_scalings, training_target
from diffuse.losses import l_simple, x0_weight
from diffuse.schedule import EDM, Flow, Schedule, VPCosine

PROCESSES = {"linear": Schedule.linear, "vp_cosine": VPCosine, "edm": EDM, "flow": Flow}


def formula(weighting, alpha, sigma, sigma_data=0.5, gamma=5.0, k=1.0, g=1.0):
    snr = (alpha / sigma) ** 2
    return {"min_snr": torch.minimum(snr, torch.full_like(snr, gamma)),       # Hang et al. 2023, eq. 9
            "p2": snr / (k + snr) ** g,                                            # Choi et al. 2022 (on eps: 1/(k+SNR)^g)
            "edm": 1 / edm_scalings(sigma / alpha, sigma_data)[1] ** 2}[weighting]  # Karras et al. 2022: 1 / c_out^2


@pytest.mark.parametrize("weighting", ["min_snr", "p2", "edm"])
@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
@pytest.mark.parametrize("kind", sorted(PROCESSES))
def test_the_weight_on_the_x0_error_is_the_formula_for_every_target(kind, prediction, weighting):
    s = PROCESSES[kind]()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64), torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.8, 0.95], dtype=torch.float64)
    alpha, sigma = s.alpha(t).view(-1, 1, 1, 1), s.sigma(t).view(-1, 1, 1, 1)
    x_t = alpha * x0 + sigma * eps
    delta = 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    wrong_x0 = x0 + delta  # a network whose x_0 is off by delta at this x_t
    raw = training_target(wrong_x0, (x_t - alpha * wrong_x0) / sigma, alpha, sigma, prediction)
    den = Denoiser(None, s, prediction=prediction)
    loss = l_simple(den, x0, t, eps, weighting=weighting, raw=raw, p2_gamma=0.5)
    lam = formula(weighting, alpha.flatten(), sigma.flatten(), g=0.5 if weighting == "p2" else 1.0)
    # l_simple computes in float32: agreement to its rounding
    torch.testing.assert_close(loss.double(), lam * delta.pow(2).flatten(1).mean(1), rtol=1e-4, atol=1e-9)


def test_known_special_cases():
    snr = torch.tensor([0.5, 5.0, 50.0], dtype=torch.float64)
    alpha = (snr / (1 + snr)).sqrt()
    sigma = (1 / (1 + snr)).sqrt()  # VP
    from diffuse.losses import loss_weight
    # min-SNR-5 on eps divides SNR out: min(SNR, 5) / SNR (Hang et al. 2023); on v: min(SNR, 5) / (SNR + 1)
    torch.testing.assert_close(loss_weight("min_snr", alpha, sigma, "eps"), snr.clamp(max=5) / snr)
    torch.testing.assert_close(loss_weight("min_snr", alpha, sigma, "v"), snr.clamp(max=5) / (snr + 1))
    # P2 with k = 1, gamma = 1 on eps: 1 / (1 + SNR)
    torch.testing.assert_close(loss_weight("p2", alpha, sigma, "eps"), 1 / (1 + snr))
    # EDM's lambda on an "edm" network is its plain loss: weight 1
    torch.testing.assert_close(loss_weight("edm", alpha, sigma, "edm"), torch.ones(3, dtype=torch.float64))
    assert torch.equal(loss_weight("none", alpha, sigma, "flow"), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="weighting must be one of none, min_snr, p2, edm"):
        x0_weight("snr", snr)
