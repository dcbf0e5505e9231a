"""Noise schedules: what alpha_t and sigma_t are.

Every noisy sample is x_t = alpha_t x_0 + sigma_t eps (DESIGN.md). For the DDPM family
(variance preserving) alpha_t = sqrt(alphabar_t) and sigma_t = sqrt(1 - alphabar_t), where
alphabar_n = prod_{s<=n} (1 - beta_s) over the T discrete steps n = 1..T (Ho et al. 2020,
eq. 4; lecture 000 "Diffusion Kernel", lecture 001 "forward process closed form").

Time is continuous, t in [0, 1], with step n sitting at t = n / T; t = 0 is clean data
(alphabar = 1). Samplers move along grids of t that end at 0; the map to a network's
discrete input (the 0-based index n - 1, as the DDPM code and diffusers use) lives here, in
`Schedule.model_time`, and nowhere else. Tables are kept in float64 (as improved-diffusion
does): 1 - alphabar near t = 0 loses digits in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


LOG_SNR_MIN = -10.2
"""Sampling grids start no higher than log-SNR -10.2 (alpha_t ~= 0.006), diffusers' `lambda_min_clipped` = -5.1 in
lambda = log(alpha/sigma). Above it x_t is pure
noise to within the accuracy of the start x_T ~ N(0, I), and reading x_0 = (x_t - sigma_t eps) / alpha_t there
multiplies a network's error by 1/alpha_t: the cosine schedule's last step has alpha_T = 5e-5, so an eps off by 1%
gives an x_0 off by 200 and few-step samplers explode. The linear schedule of Ho et al. ends at -10.1: all of its T
steps stay; the cosine schedule (T = 1000) keeps steps 1..996."""

Spacing = Literal["leading", "trailing", "linspace", "quadratic", "karras", "log_snr"]
SPACINGS = ("leading", "trailing", "linspace", "quadratic", "karras", "log_snr")


@dataclass
class ScheduleConfig:
    kind: Literal["linear", "cosine"] = "linear"  # Ho et al. 2020 linear betas, or Nichol & Dhariwal 2021 cosine
    timesteps: int = 1000                        # T, the number of discrete diffusion steps
    beta_start: float = 1e-4                     # linear: beta_1 (Ho et al.: 1e-4)
    beta_end: float = 0.02                       # linear: beta_T (Ho et al.: 0.02)
    cosine_s: float = 0.008                      # cosine: offset s that keeps beta_1 from being tiny
    max_beta: float = 0.999                      # cosine: betas are clipped here to avoid a singularity at t = T


def linear_betas(timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """beta_n increasing linearly from beta_1 to beta_T (Ho et al. 2020, sec. 4)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_alphabar(t: Tensor, s: float = 0.008) -> Tensor:
    """alphabar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2) (Nichol & Dhariwal 2021, eq. 17)."""
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(torch.zeros_like(t))


def cosine_betas(timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """beta_n = 1 - alphabar(n/T) / alphabar((n-1)/T), clipped at max_beta (Nichol & Dhariwal 2021, sec. 3.2)."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alphabar = cosine_alphabar(t, s)
    return (1 - alphabar[1:] / alphabar[:-1]).clamp(max=max_beta)


class Schedule:
    """A discrete variance-preserving schedule beta_1..beta_T, read in continuous time.

    Tables are indexed by n = 0..T with n = 0 the clean data (alphabar_0 = 1, beta_0 = 0), so
    `alphabar[n]` is the paper's alphabar_n. Between grid points log(alphabar) is interpolated
    linearly, which is exact at every t = n / T.
    """

    def __init__(self, betas: Tensor, log_snr_min: float = LOG_SNR_MIN):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta_t must lie in (0, 1); check beta_start / beta_end / max_beta")
        self.T = len(betas)
        self.betas = torch.cat([betas.new_zeros(1), betas])  # beta[n], beta[0] = 0
        self.alphas = 1 - self.betas                          # alpha_n = 1 - beta_n
        self.alphabar = torch.cumprod(self.alphas, 0)         # alphabar_n = prod_{s<=n} alpha_s (eq. 4)
        self._log_alphabar = self.alphabar.log()
        # the top of every sampling grid: the last step n whose log-SNR is still >= log_snr_min (at least step 1)
        log_snr_n = self._log_alphabar[1:] - torch.log1p(-self.alphabar[1:])
        self.top_step = max(1, int((log_snr_n >= log_snr_min).sum()))

    @classmethod
    def linear(cls, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
        """The schedule of Ho et al. (2020): beta from 1e-4 to 0.02 over T = 1000 steps."""
        return cls(linear_betas(timesteps, beta_start, beta_end))

    @classmethod
    def cosine(cls, timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
        """The cosine schedule of Nichol & Dhariwal (2021), eq. 17."""
        return cls(cosine_betas(timesteps, s, max_beta))

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> Schedule:
        if cfg.timesteps < 1:
            raise ValueError(f"schedule.timesteps must be >= 1, got {cfg.timesteps}")
        if cfg.kind == "linear":
            if not 0 < cfg.beta_start <= cfg.beta_end < 1:
                raise ValueError(
                    f"schedule.beta_start / beta_end must satisfy 0 < start <= end < 1, got {cfg.beta_start}, {cfg.beta_end}"
                )
            return cls.linear(cfg.timesteps, cfg.beta_start, cfg.beta_end)
        if cfg.kind == "cosine":
            return cls.cosine(cfg.timesteps, cfg.cosine_s, cfg.max_beta)
        raise ValueError(f"schedule.kind must be one of 'linear', 'cosine', got {cfg.kind!r}")

    # --- continuous time ------------------------------------------------------------------
    def _table_at(self, table: Tensor, t: Tensor) -> Tensor:
        """Interpolate a table over n = 0..T at n = t * T (linear in the table's values)."""
        t = torch.as_tensor(t).to("cpu", torch.float64)  # the float64 tables stay on the CPU; callers move results
        n = (t * self.T).clamp(0, self.T)
        lo = n.floor().long().clamp(max=self.T - 1)
        w = n - lo
        return table[lo] * (1 - w) + table[lo + 1] * w

    def alphabar_at(self, t: Tensor) -> Tensor:
        """alphabar(t), float64; log-linear between the T grid points."""
        return self._table_at(self._log_alphabar, t).exp()

    def alpha(self, t: Tensor) -> Tensor:
        """alpha_t = sqrt(alphabar_t): the signal scale of x_t."""
        return self.alphabar_at(t).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        """sigma_t = sqrt(1 - alphabar_t): the noise scale of x_t."""
        return (1 - self.alphabar_at(t)).sqrt()

    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) = alpha_t^2 / sigma_t^2 = alphabar_t / (1 - alphabar_t) (Kingma et al. 2021, eq. 2)."""
        ab = self.alphabar_at(t)
        return ab / (1 - ab)

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda_t = log(alpha_t^2 / sigma_t^2)."""
        ab = self.alphabar_at(t)
        return ab.log() - torch.log1p(-ab)

    def ve_sigma(self, t: Tensor) -> Tensor:
        """sigma_t / alpha_t = SNR(t)^(-1/2): the noise level of x_t / alpha_t = x_0 + (sigma_t / alpha_t) eps, the
        variance-exploding view of the same process (Karras et al. 2022, sec. 2 and table 1, "VP": sigma(t))."""
        ab = self.alphabar_at(t)
        return ((1 - ab) / ab).sqrt()

    def sde_beta(self, t: Tensor) -> Tensor:
        """beta(t) of the VP-SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw (Song et al. 2021, eq. 11).

        beta(t) = -d log alphabar(t) / dt, exactly, for the log-linear interpolation: constant on
        each cell ((n-1)/T, n/T], where it is -T log(1 - beta_n) ~= T beta_n, so the discrete
        linear schedule is the VP-SDE with beta(t) ~= 0.1 + 19.9 t of Song et al. (2021).
        """
        t = torch.as_tensor(t).to("cpu", torch.float64)
        cell = (torch.ceil(t * self.T - 1e-9) - 1).clamp(0, self.T - 1).long()  # -1e-9: t = n/T in floats sits in cell n
        return self.T * (self._log_alphabar[cell] - self._log_alphabar[cell + 1])

    def t_from_log_alphabar(self, log_alphabar: Tensor) -> Tensor:
        """The exact inverse of `alphabar_at` on its log-linear interpolation; clamped to t in [0, 1]."""
        rising = -self._log_alphabar  # 0 = -log alphabar_0 < ... < -log alphabar_T
        y = (-torch.as_tensor(log_alphabar, dtype=torch.float64)).clamp(0, float(rising[-1]))
        hi = torch.searchsorted(rising, y).clamp(1, self.T)
        lo = hi - 1
        return (lo + (y - rising[lo]) / (rising[hi] - rising[lo])) / self.T

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """The time t with lambda_t = log_snr (alphabar = sigmoid(lambda)); DPM-Solver's t_lambda (Lu et al. 2022, sec. 3.4)."""
        return self.t_from_log_alphabar(torch.nn.functional.logsigmoid(torch.as_tensor(log_snr, dtype=torch.float64)))

    def t_from_ve_sigma(self, ve_sigma: Tensor) -> Tensor:
        """The time t with sigma_t / alpha_t = ve_sigma (alphabar = 1 / (1 + ve_sigma^2))."""
        return self.t_from_log_alphabar(-torch.log1p(torch.as_tensor(ve_sigma, dtype=torch.float64) ** 2))

    def model_time(self, t: Tensor) -> Tensor:
        """A network's time input for continuous t: the 0-based step index n - 1 = t * T - 1.

        DDPM networks and diffusers' schedulers number the steps 0..T-1, so step n (t = n/T)
        is fed as n - 1. This and `timesteps_from_indices` are the only places that convert.
        """
        return torch.as_tensor(t, dtype=torch.float64) * self.T - 1

    def timesteps_from_indices(self, indices) -> Tensor:
        """Continuous times for 0-based step indices (diffusers' `timesteps`), followed by t = 0."""
        idx = torch.as_tensor(indices, dtype=torch.float64)
        return torch.cat([(idx + 1) / self.T, idx.new_zeros(1)])

    # --- sampling grids -------------------------------------------------------------------
    def timesteps(self, steps: int | None = None, spacing: Spacing = "trailing", rho: float = 7.0) -> Tensor:
        """A decreasing grid of `steps` times ending with t = 0 (so `steps` denoiser calls for a one-stage sampler).

        Grids run over the steps n = 1..N, N = `top_step` (T unless the schedule's last steps fall below
        LOG_SNR_MIN). steps = None (or N) is every step N, N-1, ..., 1 (DDPM, Algorithm 2). Fewer steps pick a
        sub-sequence tau (Song et al. 2021, DDIM sec. 4.2). With the spacings of Lin et al. (2024, table 2):
        "trailing" n = round(N - k*N/steps) (the default: starts at the top, good for every sampler);
        "linspace" n = round(linspace(1, N, steps)); "quadratic" n - 1 = k + round((N - steps) u_k^2),
        u_k = k / (steps - 1) (DDIM's CIFAR-10 grid, Song et al. 2021 appendix D.2, spread over all N);
        "leading" n = 1 + k*(N//steps), DDIM's code and diffusers' "leading" exactly when N = T, which does NOT start
        at the top: its first step is 1 + (steps-1)*(N//steps), e.g. step 1 of 1000 for steps = 1 and step
        667 for steps = 3, where x_t still holds signal that the start x_T ~ N(0, I) lacks (Lin et al. 2024,
        sec. 3.3); `start_shortfall` measures it. Between the steps (fractional times, as diffusers' Karras
        option): "karras" sigma_k = (sigma_max^(1/rho) + u_k (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho in
        the VE noise level (Karras et al. 2022, eq. 5), "log_snr" uniform in lambda (Lu et al. 2022,
        DPM-Solver sec. 3.3); both from step N down to step 1. Every spacing but "leading" starts at step N
        for every steps >= 1.

        Raises ValueError for steps outside 1..N, an unknown spacing, or rho <= 0.
        """
        N = self.top_step
        steps = N if steps is None else int(steps)
        if not 1 <= steps <= N:
            top = f"the schedule's T = {self.T}" if N == self.T else (
                f"N = {N}, the steps of this schedule above log-SNR {LOG_SNR_MIN} (the last {self.T - N} hold no signal a network can read)")
            raise ValueError(f"steps must be between 1 and {top}, got {steps}")
        k = torch.arange(steps, dtype=torch.float64)
        u = k / max(steps - 1, 1)  # 0 .. 1
        if spacing == "leading":
            idx = k * (N // steps)
        elif spacing == "trailing":
            idx = torch.round(N - k * N / steps).flip(0) - 1
        elif spacing == "linspace":
            idx = torch.round(torch.linspace(0, N - 1, steps, dtype=torch.float64)) if steps > 1 else k + N - 1
        elif spacing == "quadratic":
            idx = k + torch.round((N - steps) * u**2) if steps > 1 else k + N - 1
        elif spacing in ("karras", "log_snr"):
            if spacing == "karras" and not rho > 0:
                raise ValueError(f"rho must be > 0, got {rho}")
            ends = torch.tensor([N / self.T, 1.0 / self.T], dtype=torch.float64)  # step N, step 1
            if spacing == "karras":
                hi, lo = self.ve_sigma(ends) ** (1 / rho)
                t = self.t_from_ve_sigma((hi + u * (lo - hi)) ** rho)
            else:
                hi, lo = self.log_snr(ends)
                t = self.t_from_log_snr(hi + u * (lo - hi))
            t[0], t[-1] = ends  # exact ends (the inverse is exact only to rounding)
            if steps == 1:
                t = ends[:1]
            return torch.cat([t, t.new_zeros(1)])
        else:
            raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
        return self.timesteps_from_indices(idx.flip(0))

    def start_shortfall(self, timesteps: Tensor) -> float:
        """alpha_t at a grid's first time minus alpha at the top step N: how much signal x_t has there that the
        start x_T ~ N(0, I) lacks (0 for grids that start at the top; ~1 for a one-step "leading" grid)."""
        t0 = torch.as_tensor(timesteps, dtype=torch.float64).flatten()[0]
        return float(self.alpha(t0) - self.alpha(torch.tensor(self.top_step / self.T, dtype=torch.float64)))

    # --- the forward process --------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps, a draw from q(x_t | x_0) (Ho et al. 2020, eq. 4)."""
        return append_dims(self.alpha(t), x0).to(x0.dtype) * x0 + append_dims(self.sigma(t), x0).to(x0.dtype) * eps

    def q_step(self, x_prev: Tensor, n: int, eps: Tensor) -> Tensor:
        """One Markov step x_n = sqrt(1 - beta_n) x_{n-1} + sqrt(beta_n) eps, q(x_n | x_{n-1}) (Ho et al. 2020, eq. 2)."""
        beta = self.betas[n]
        return (1 - beta).sqrt().to(x_prev.dtype) * x_prev + beta.sqrt().to(x_prev.dtype) * eps


def append_dims(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-example (B,) or scalar tensor to broadcast against `like` (B, C, H, W)."""
    v = torch.as_tensor(v, device=like.device)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def posterior(alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q(x_s | x_t, x_0) for s < t: coefficients of its mean and its variance.

    mean = c_x0 * x_0 + c_xt * x_t,  var = beta-tilde. With alpha_{t|s} = alpha_t / alpha_s and
    sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 (Kingma et al. 2021, appendix A):
        c_x0 = alpha_s sigma_{t|s}^2 / sigma_t^2,  c_xt = alpha_{t|s} sigma_s^2 / sigma_t^2,
        var  = sigma_{t|s}^2 sigma_s^2 / sigma_t^2.
    For adjacent steps (s = t - 1) sigma_{t|s}^2 = beta_t and this is Ho et al. (2020) eq. 7:
        c_x0 = sqrt(alphabar_{t-1}) beta_t / (1 - alphabar_t), c_xt = sqrt(alpha_t) (1 - alphabar_{t-1}) / (1 - alphabar_t),
        beta-tilde_t = (1 - alphabar_{t-1}) / (1 - alphabar_t) beta_t.
    """
    alpha_ts = alpha_t / alpha_s
    sigma2_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2  # = 1 - alphabar_t / alphabar_s for VP
    c_x0 = alpha_s * sigma2_ts / sigma_t**2
    c_xt = alpha_ts * sigma_s**2 / sigma_t**2
    var = sigma2_ts * sigma_s**2 / sigma_t**2
    return c_x0, c_xt, var


def transition_variance(alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor) -> Tensor:
    """sigma_{t|s}^2 = 1 - alphabar_t / alphabar_s: the variance of q(x_t | x_s); beta_t for adjacent steps."""
    return sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2


def interpolated_log_variance(v: Tensor, alpha_t: float, sigma_t: float, alpha_s: float, sigma_s: float) -> Tensor:
    """log Sigma_theta = v log beta_{t|s} + (1 - v) log beta-tilde_{t|s} (Nichol & Dhariwal 2021, eq. 15): a learned
    variance between the two fixed choices of Ho et al., beta (upper bound) and beta-tilde (lower bound)."""
    log_beta = math.log(transition_variance(alpha_t, sigma_t, alpha_s, sigma_s))
    log_beta_tilde = math.log(posterior(alpha_t, sigma_t, alpha_s, sigma_s)[2])
    return v * log_beta + (1 - v) * log_beta_tilde
