"""Denoiser: a network (or any function) + a schedule -> predictions of x_0 and eps.

A network predicts one of eps, x_0 or v; every sampler and loss wants the others too. The
conversions below are the only place that knows about prediction types, so samplers never
branch on them (DESIGN.md, "The interfaces"). With x_t = alpha_t x_0 + sigma_t eps:

    eps -> x0:  x_0 = (x_t - sigma_t eps) / alpha_t           (Ho et al. 2020, eq. 15)
    x0 -> eps:  eps = (x_t - alpha_t x_0) / sigma_t
    v:          v = alpha_t eps - sigma_t x_0                  (Salimans & Ho 2022, sec. 4)
                x_0 = (alpha_t x_t - sigma_t v) / (alpha_t^2 + sigma_t^2),  eps = (sigma_t x_t + alpha_t v) / (alpha_t^2 + sigma_t^2)
                (the denominators are 1 for VP)
    flow:       u = eps - x_0, the velocity of x_t = (1 - t) x_0 + t eps (Liu et al. 2022; Lipman et al. 2023)
                x_0 = (x_t - sigma_t u) / (alpha_t + sigma_t),  eps = (x_t + alpha_t u) / (alpha_t + sigma_t)
    edm:        x_0 = c_skip y + c_out F(c_in y; c_noise) on y = x_t / alpha_t at sigma = sigma_t / alpha_t
                (Karras et al. 2022, eq. 7 and table 1, "preconditioning"; sigma_data the data's std)
    score:      grad log q(x_t) ~= -eps / sigma_t                (Song et al. 2021, eq. 5 / lecture 001)

A network with a learned variance (Nichol & Dhariwal 2021, sec. 3.1) returns twice the channels:
its prediction, then v, read as variance_mix = (v + 1) / 2 so that an output in [-1, 1] spans
[log beta-tilde, log beta] (eq. 15; the sampler or bound that knows the step mixes the two).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from .schedule import NoiseSchedule, append_dims, to_device

PredictionType = Literal["eps", "x0", "v", "flow", "edm"]
PREDICTION_TYPES = ("eps", "x0", "v", "flow", "edm")


@dataclass
class Prediction:
    """What a denoiser says about x_t: the clean image and the noise that was added, and, for a
    learned-variance network, variance_mix: log Sigma = v log beta_t + (1 - v) log beta-tilde_t (eq. 15)."""

    x0: Tensor
    eps: Tensor
    variance_mix: Tensor | None = None


def eps_to_x0(x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x_0 = (x_t - sigma_t eps) / alpha_t (Ho et al. 2020, eq. 15)."""
    return (x_t - sigma * eps) / alpha


def x0_to_eps(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (x_t - alpha_t x_0) / sigma_t."""
    return (x_t - alpha * x0) / sigma


def v_target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, eq. 9 and appendix D)."""
    return alpha * eps - sigma * x0


def v_to_x0(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x_0 = (alpha_t x_t - sigma_t v) / (alpha_t^2 + sigma_t^2): alpha_t x_t - sigma_t v for VP."""
    return (alpha * x_t - sigma * v) / (alpha**2 + sigma**2)


def v_to_eps(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (sigma_t x_t + alpha_t v) / (alpha_t^2 + sigma_t^2): sigma_t x_t + alpha_t v for VP."""
    return (sigma * x_t + alpha * v) / (alpha**2 + sigma**2)


def flow_target(x0: Tensor, eps: Tensor) -> Tensor:
    """u = eps - x_0: the velocity d x_t / dt of rectified flow's x_t = (1 - t) x_0 + t eps (Liu et al. 2022, eq. 1)."""
    return eps - x0


def flow_to_x0(x_t: Tensor, u: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x_0 = (x_t - sigma_t u) / (alpha_t + sigma_t): x_t - t u for rectified flow."""
    return (x_t - sigma * u) / (alpha + sigma)


def flow_to_eps(x_t: Tensor, u: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (x_t + alpha_t u) / (alpha_t + sigma_t): x_t + (1 - t) u for rectified flow."""
    return (x_t + alpha * u) / (alpha + sigma)


def edm_scalings(ve_sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) of EDM's preconditioning at noise level sigma (Karras et al. 2022, table 1):
    c_skip = sigma_d^2 / (sigma^2 + sigma_d^2), c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2),
    c_in = 1 / sqrt(sigma^2 + sigma_d^2). With the loss ||F - F_target||^2 the effective weight on ||D - x_0||^2 is
    EDM's lambda(sigma) = 1 / c_out^2."""
    norm = (ve_sigma**2 + sigma_data**2).sqrt()
    return sigma_data**2 / norm**2, ve_sigma * sigma_data / norm, 1 / norm


def x0_error_scale(alpha: Tensor, sigma: Tensor, prediction: PredictionType, sigma_data: float = 0.5) -> Tensor:
    """c(t) with ||target error||^2 = c(t) ||x_0 error||^2 at a fixed x_t, for a network of this prediction type, read
    off the conversions above: eps alpha^2 / sigma^2 (= SNR; eq. 15 of Ho et al. 2020), x0 1, v (alpha^2 + sigma^2)^2
    / sigma^2 (SNR + 1 for VP), flow (alpha + sigma)^2 / sigma^2 (1 / t^2 for rectified flow), edm 1 / c_out^2 (EDM's
    lambda(sigma), Karras et al. 2022, table 1). A loss weighting divides it out to put its own weight on x_0."""
    if prediction == "eps":
        return alpha**2 / sigma**2
    if prediction == "x0":
        return torch.ones_like(alpha)
    if prediction == "v":
        return (alpha**2 + sigma**2) ** 2 / sigma**2
    if prediction == "flow":
        return (alpha + sigma) ** 2 / sigma**2
    if prediction == "edm":
        return 1 / edm_scalings(sigma / alpha, sigma_data)[1] ** 2
    raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")


def eps_to_score(eps: Tensor, sigma: Tensor) -> Tensor:
    """The score of q(x_t): grad_x log q(x_t) = -eps / sigma_t (Song et al. 2021; Vincent 2011)."""
    return -eps / sigma


def scales(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """alpha_t and sigma_t for a scalar or per-example t, shaped to broadcast against `like`, in its dtype."""
    t = torch.as_tensor(t, dtype=torch.float64).expand(like.shape[0])
    alpha = append_dims(schedule.alpha(t), like).to(like.dtype)
    sigma = append_dims(schedule.sigma(t), like).to(like.dtype)
    return alpha, sigma


def predict(raw: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction: PredictionType,
            sigma_data: float = 0.5) -> Prediction:
    """Turn a network's raw output of the given type into (x_0, eps)."""
    if prediction == "edm":
        c_skip, c_out, _ = edm_scalings(sigma / alpha, sigma_data)
        x0 = c_skip * (x_t / alpha) + c_out * raw
        return Prediction(x0=x0, eps=x0_to_eps(x_t, x0, alpha, sigma))
    if prediction == "flow":
        return Prediction(x0=flow_to_x0(x_t, raw, alpha, sigma), eps=flow_to_eps(x_t, raw, alpha, sigma))
    if prediction == "eps":
        return Prediction(x0=eps_to_x0(x_t, raw, alpha, sigma), eps=raw)
    if prediction == "x0":
        return Prediction(x0=raw, eps=x0_to_eps(x_t, raw, alpha, sigma))
    if prediction == "v":
        return Prediction(x0=v_to_x0(x_t, raw, alpha, sigma), eps=v_to_eps(x_t, raw, alpha, sigma))
    raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")


def training_target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction: PredictionType,
                    sigma_data: float = 0.5) -> Tensor:
    """What a network of the given type is regressed onto (edm: F_target = (x_0 - c_skip y) / c_out, Karras et al.
    2022, eq. 8, on y = x_0 + (sigma / alpha) eps)."""
    if prediction == "edm":
        ve = sigma / alpha
        c_skip, c_out, _ = edm_scalings(ve, sigma_data)
        return (x0 - c_skip * (x0 + ve * eps)) / c_out
    if prediction == "flow":
        return flow_target(x0, eps)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_target(x0, eps, alpha, sigma)
    raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")


class Denoiser:
    """net(x_t, model_time, **cond) -> raw output, read through a schedule as a Prediction.

    `net` is an nn.Module or any callable, e.g. a plain function (x_t, t) -> eps for tests with
    analytic answers; it receives the schedule's `model_time(t)` (the 0-based step index).
    Calling the denoiser takes continuous t in [0, 1] (a scalar or one per example). `bounded`: the data x_0 lies
    in [-1, 1] (images), so `generate` clips the x_0 prediction by default; False for latents (Rombach et al. 2022),
    which have no such range.
    """

    def __init__(self, net: Callable[..., Tensor], schedule: NoiseSchedule, prediction: PredictionType = "eps",
                 learned_variance: bool = False, sigma_data: float = 0.5, bounded: bool = True):
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTION_TYPES)}, got {prediction!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if getattr(schedule, "zero_terminal_snr", False) and prediction in ("eps", "edm"):
            raise ValueError(f'model.prediction = "{prediction}" reads x_0 through a division by alpha_t, and a zero-terminal-SNR '
                             'schedule has alpha_T = 0 (Lin et al. 2024, sec. 3.2): use model.prediction = "v" (their choice), '
                             '"x0" or "flow", or set schedule.zero_terminal_snr = false')
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.learned_variance = learned_variance
        self.sigma_data = sigma_data  # the data's std, for the "edm" preconditioning (EDM: 0.5)
        self.bounded = bounded  # x_0 lies in [-1, 1] (images), so samplers may clip it; latents (stages.py) do not

    def output(self, x_t: Tensor, t: Tensor, **cond) -> tuple[Tensor, Tensor | None]:
        """The network's own output at (x_t, t), one time per example, and variance_mix (None without a learned variance)."""
        out = self.net(*self.network_input(x_t, t), **cond)
        expected = (x_t.shape[0], 2 * x_t.shape[1], *x_t.shape[2:]) if self.learned_variance else x_t.shape
        if out.shape != expected:
            what = "twice the input channels (prediction, variance)" if self.learned_variance else "one value per input value"
            raise ValueError(f"the network returned shape {tuple(out.shape)} for input {tuple(x_t.shape)}; "
                             f"this denoiser needs {what}, shape {tuple(expected)}")
        if not self.learned_variance:
            return out, None
        raw, v = out.chunk(2, dim=1)
        return raw, (v + 1) / 2

    def network_input(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """What the network is called with at (x_t, t): x_t itself (c_in x_t / alpha_t for "edm", Karras et al. 2022,
        table 1) and the model time (B,) float32, one per example."""
        t = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])
        if self.prediction == "edm":  # the network sees c_in y = c_in x_t / alpha_t (Karras et al. 2022, table 1)
            alpha, sigma = scales(self.schedule, t, x_t)
            x_t = x_t * (edm_scalings(sigma / alpha, self.sigma_data)[2] / alpha)
        # float32 at least: bf16 cannot tell step 999 from 1000
        return x_t, to_device(self.schedule.model_time(t).float(), x_t.device)

    def raw(self, x_t: Tensor, t: Tensor, **cond) -> Tensor:
        """The network's prediction (eps, x0 or v) at (x_t, t), without any learned variance."""
        return self.output(x_t, t, **cond)[0]

    def __call__(self, x_t: Tensor, t: Tensor, **cond) -> Prediction:
        alpha, sigma = scales(self.schedule, t, x_t)
        raw, variance_mix = self.output(x_t, t, **cond)
        pred = predict(raw, x_t, alpha, sigma, self.prediction, self.sigma_data)
        pred.variance_mix = variance_mix
        return pred

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The regression target of this denoiser's network for x_t = alpha_t x0 + sigma_t eps."""
        alpha, sigma = scales(self.schedule, t, x0)
        return training_target(x0, eps, alpha, sigma, self.prediction, self.sigma_data)
