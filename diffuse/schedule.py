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
from abc import ABC, abstractmethod
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
    kind: Literal["linear", "cosine", "scaled_linear", "sigmoid", "constant", "vp_cosine", "edm", "flow"] = "linear"  # the noise
    #   process (SCHEDULE_KINDS): linear / cosine: discrete VP, Ho et al. 2020 / Nichol & Dhariwal 2021; scaled_linear:
    #   Stable Diffusion's (Rombach et al. 2022); sigmoid: GeoDiff's (Xu et al. 2022); vp_cosine: the cosine VP in continuous t;
    #   constant: beta_n = beta_end for every n (the diffusion autoencoder's latent DDIM, Preechakul et al. 2022: 0.008);
    #   edm: VE with EDM's preconditioning and training sigmas (Karras et al. 2022); flow: rectified flow (Liu et al. 2022)
    T: int = 1000                                # the discrete kinds (DISCRETE_KINDS): the number of diffusion steps
    beta_start: float = 1e-4                     # linear, scaled_linear, sigmoid: beta_1 (Ho et al.: 1e-4; SD: 0.00085)
    beta_end: float = 0.02                       # linear, scaled_linear, sigmoid: beta_T (Ho et al.: 0.02; SD: 0.012); constant: beta
    cosine_s: float = 0.008                      # cosine, vp_cosine: offset s that keeps beta_1 from being tiny
    max_beta: float = 0.999                      # cosine: betas are clipped here to avoid a singularity at t = T
    sigma_min: float = 0.002                     # edm: the lowest noise level of a sampling grid (EDM: 0.002)
    sigma_max: float = 80.0                      # edm: the highest, where sampling starts (EDM: 80)
    p_mean: float = -1.2                         # edm: training ln sigma ~ N(p_mean, p_std^2) (EDM: -1.2, 1.2)
    p_std: float = 1.2
    t_sampling: Literal["uniform", "logit_normal"] = "logit_normal"  # flow: training t (Esser et al. 2024: logit-normal)
    logit_mean: float = 0.0                      # flow, logit_normal: t = sigmoid(logit_mean + logit_std z)
    logit_std: float = 1.0
    zero_terminal_snr: bool = False              # the discrete kinds: rescale to alphabar_T = 0 (Lin et al. 2024, Alg. 1);
    #   needs model.prediction = "v" (or "x0", "flow") and a sampler that starts at alpha = 0 (not the VE-sigma or SDE ones)


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """beta_n increasing linearly from beta_1 to beta_T (Ho et al. 2020, sec. 4)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def scaled_linear_betas(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """beta_n = (sqrt(beta_1) + (n - 1)/(T - 1) (sqrt(beta_T) - sqrt(beta_1)))^2: linear in sqrt(beta), the schedule of
    latent diffusion and Stable Diffusion (Rombach et al. 2022; diffusers' "scaled_linear")."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def sigmoid_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """beta_n = beta_1 + (beta_T - beta_1) sigmoid(-6 + 12 (n - 1)/(T - 1)) (Xu et al. 2022, GeoDiff; diffusers'
    "sigmoid"): slow at both ends, steep in the middle."""
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start


def constant_betas(T: int = 1000, beta: float = 0.008) -> Tensor:
    """beta_n = beta for every n: the schedule of the diffusion autoencoder's latent DDIM (Preechakul et al. 2022, app. B,
    "const0.008": alphabar_T = (1 - 0.008)^1000 = 3.3e-4)."""
    return torch.full((T,), float(beta), dtype=torch.float64)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas rescaled so that alphabar_T = 0 (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
    flawed", Algorithm 1): sqrt(alphabar_n) is shifted by -sqrt(alphabar_T) and scaled by
    sqrt(alphabar_1) / (sqrt(alphabar_1) - sqrt(alphabar_T)), which keeps alphabar_1 and the order of every SNR, and
    makes the last step pure noise (SNR 0, beta_T = 1), so training sees the x_T that sampling starts from.
    betas: (T,) in (0, 1), T >= 2; returns (T,) float64 with beta_T = 1."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if len(betas) < 2:
        raise ValueError(f"zero-terminal-SNR rescaling needs T >= 2 steps (step 1 keeps its value), got T = {len(betas)}")
    root = torch.cumprod(1 - betas, 0).sqrt()          # sqrt(alphabar_n), n = 1..T
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    alphabar = root**2
    return 1 - torch.cat([alphabar[:1], alphabar[1:] / alphabar[:-1]])  # beta_n = 1 - alphabar_n / alphabar_{n-1}


def cosine_alphabar(t: Tensor, s: float = 0.008) -> Tensor:
    """alphabar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2) (Nichol & Dhariwal 2021, eq. 17)."""
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(torch.zeros_like(t))


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """beta_n = 1 - alphabar(n/T) / alphabar((n-1)/T), clipped at max_beta (Nichol & Dhariwal 2021, sec. 3.2)."""
    t = torch.arange(T + 1, dtype=torch.float64) / T
    alphabar = cosine_alphabar(t, s)
    return (1 - alphabar[1:] / alphabar[:-1]).clamp(max=max_beta)


class NoiseSchedule(ABC):
    """x_t = alpha(t) x_0 + sigma(t) eps for t in [0, 1] (DESIGN.md, "The one idea"): the interface every process
    implements. Subclasses give alpha, sigma, t_from_log_snr (the inverse of log SNR), model_time (the network's time
    input), sample_t (the training distribution of t) and t_min (the last positive grid time); the rest follows.

    Processes: `Schedule` (discrete VP, DDPM), `VPCosine` (continuous VP), `EDM` (VE, Karras et al. 2022) and
    `Flow` (rectified flow). Values are float64 tensors of t (a float or a tensor).
    """

    kind = "?"
    default_spacing: Spacing = "trailing"  # the grid `grid` draws when no spacing is named
    variance_preserving = False  # alpha^2 + sigma^2 = 1: the VP-SDE samplers and the likelihood need it
    T: int | None = None          # discrete steps (only the DDPM schedule has them)
    t_min = 1e-3                  # the last positive time of every sampling grid

    @abstractmethod
    def alpha(self, t) -> Tensor:
        """alpha_t, the signal scale of x_t (float64)."""

    @abstractmethod
    def sigma(self, t) -> Tensor:
        """sigma_t, the noise scale of x_t (float64)."""

    @abstractmethod
    def t_from_log_snr(self, log_snr) -> Tensor:
        """The time t with log(alpha_t^2 / sigma_t^2) = log_snr: the inverse of `log_snr`."""

    @abstractmethod
    def model_time(self, t) -> Tensor:
        """The network's time input at t (float64)."""

    @abstractmethod
    def t_from_model_time(self, model_time) -> Tensor:
        """The inverse of `model_time`."""

    @abstractmethod
    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n training times (n,) float64, drawn from the process's training distribution with `generator`."""

    def snr(self, t) -> Tensor:
        """SNR(t) = alpha_t^2 / sigma_t^2 (Kingma et al. 2021, eq. 2)."""
        return (self.alpha(t) / self.sigma(t)) ** 2

    def log_snr(self, t) -> Tensor:
        """log SNR(t) = log(alpha_t^2 / sigma_t^2) = 2 lambda_t."""
        return 2 * (self.alpha(t).log() - self.sigma(t).log())

    def lam(self, t) -> Tensor:
        """lambda_t = log(alpha_t / sigma_t), half the log-SNR: DPM-Solver's time variable (Lu et al. 2022, sec. 3.1)."""
        return self.log_snr(t) / 2

    def t_from_lam(self, lam) -> Tensor:
        """The time t with lambda_t = lam: the inverse of `lam` (DPM-Solver's t_lambda, Lu et al. 2022, sec. 3.4)."""
        return self.t_from_log_snr(2 * torch.as_tensor(lam, dtype=torch.float64))

    def ve_sigma(self, t) -> Tensor:
        """sigma_t / alpha_t: the noise level of x_t / alpha_t = x_0 + (sigma_t / alpha_t) eps (Karras et al. 2022, table 1)."""
        return self.sigma(t) / self.alpha(t)

    def t_from_ve_sigma(self, ve_sigma) -> Tensor:
        """The time t with sigma_t / alpha_t = ve_sigma."""
        return self.t_from_log_snr(-2 * torch.as_tensor(ve_sigma, dtype=torch.float64).log())

    @property
    def t_top(self) -> float:
        """The first time of every sampling grid: 1, or where the log-SNR falls to LOG_SNR_MIN if it falls lower."""
        one = torch.tensor(1.0, dtype=torch.float64)
        return 1.0 if float(self.log_snr(one)) >= LOG_SNR_MIN else float(self.t_from_log_snr(torch.tensor(LOG_SNR_MIN, dtype=torch.float64)))

    @property
    def prior_std(self) -> float:
        """The std of the start x_T ~ N(0, prior_std^2 I) at t_top: sqrt(alpha^2 + sigma^2) there (1 for VP, sigma_max for VE)."""
        t = torch.tensor(self.t_top, dtype=torch.float64)
        return float(torch.hypot(self.alpha(t), self.sigma(t)))

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = alpha_t x_0 + sigma_t eps, a draw from q(x_t | x_0) (Ho et al. 2020, eq. 4, for VP)."""
        return append_dims(self.alpha(t), x0).to(x0.dtype) * x0 + append_dims(self.sigma(t), x0).to(x0.dtype) * eps

    def start_shortfall(self, grid: Tensor) -> float:
        """alpha at a grid's first time minus alpha at t_top: how much signal x_t has there that the start
        x_T ~ N(0, prior_std^2 I) lacks (0 for grids that start at the top; ~1 for a one-step "leading" grid)."""
        t0 = torch.as_tensor(grid, dtype=torch.float64).flatten()[0]
        return float(self.alpha(t0) - self.alpha(torch.tensor(self.t_top, dtype=torch.float64)))

    def _between_ends(self, spacing: str, u: Tensor, rho: float) -> Tensor:
        """Times at fractions u in [0, 1] from t_top to t_min: "karras" sigma_k = (sigma_max^(1/rho) + u_k (sigma_min^(1/rho)
        - sigma_max^(1/rho)))^rho in sigma_t / alpha_t (Karras et al. 2022, eq. 5), "log_snr" uniform in lambda (Lu et al.
        2022, sec. 3.3). The ends are set exactly (the inverses are exact only to rounding)."""
        if spacing == "karras" and not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        ends = torch.tensor([self.t_top, self.t_min], dtype=torch.float64)
        if spacing == "karras":
            hi, lo = self.ve_sigma(ends) ** (1 / rho)
            t = self.t_from_ve_sigma((hi + u * (lo - hi)) ** rho)
        else:
            hi, lo = self.log_snr(ends)
            t = self.t_from_log_snr(hi + u * (lo - hi))
        t[0] = ends[0]
        if len(t) > 1:
            t[-1] = ends[1]
        return t

    def grid(self, steps: int | None = 50, spacing: Spacing | None = None, rho: float = 7.0) -> Tensor:
        """A decreasing grid of `steps` times from t_top, ending with t = 0. "trailing": uniform in t, t_top (1 - k/K);
        "linspace": uniform from t_top to t_min; "quadratic": t_min + (t_top - t_min) u^2 (dense near the data);
        "karras": EDM's rho grid in sigma_t / alpha_t between the two (Karras et al. 2022, eq. 5); "log_snr": uniform
        in lambda (Lu et al. 2022, sec. 3.3). "leading" is a spacing of discrete steps only. Raises ValueError for
        steps < 1 (or None: a continuous process has no "every step"), an unknown spacing, or rho <= 0."""
        spacing = spacing or self.default_spacing
        if steps is None or int(steps) < 1:
            raise ValueError(f"steps must be >= 1 for the continuous {self.kind} process (it has no 'every step'), got {steps}")
        steps = int(steps)
        top, bottom = self.t_top, self.t_min
        k = torch.arange(steps, dtype=torch.float64)
        u = k / max(steps - 1, 1)
        if spacing == "trailing":
            t = top * (1 - k / steps)
        elif spacing == "linspace":
            t = top + u * (bottom - top)
        elif spacing == "quadratic":
            t = bottom + (top - bottom) * (1 - u) ** 2
        elif spacing in ("karras", "log_snr"):
            t = self._between_ends(spacing, u, rho)
        elif spacing == "leading":
            raise ValueError(f'spacing "leading" numbers discrete steps; the {self.kind} process has none: use trailing, '
                             "linspace, quadratic, karras or log_snr")
        else:
            raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
        if steps == 1:
            t = t[:1].clone()
            t[0] = top
        return torch.cat([t, t.new_zeros(1)])


class Schedule(NoiseSchedule):
    """A discrete variance-preserving schedule beta_1..beta_T, read in continuous time.

    Tables are indexed by n = 0..T with n = 0 the clean data (alphabar_0 = 1, beta_0 = 0), so
    `alphabar[n]` is the paper's alphabar_n. Between grid points log(alphabar) is interpolated
    linearly, which is exact at every t = n / T.

    A zero-terminal-SNR schedule (`rescale_zero_terminal_snr`, beta_T = 1) has alphabar_T = 0: its last cell is
    interpolated linearly in alphabar instead (log alphabar_T = -inf), so alpha(t) stays continuous and decreasing,
    and its grids start at step T (alpha = 0, x_T = eps exactly), not below LOG_SNR_MIN: a v-, x0- or flow-network
    reads x_0 there without dividing by alpha_T.
    """

    kind = "discrete VP"
    variance_preserving = True

    def __init__(self, betas: Tensor, log_snr_min: float = LOG_SNR_MIN):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()) and not (
                len(betas) >= 2 and bool(((betas[:-1] > 0) & (betas[:-1] < 1)).all()) and float(betas[-1]) == 1):
            raise ValueError("every beta_t must lie in (0, 1) (beta_T = 1 only for a zero-terminal-SNR schedule); check "
                             "beta_start / beta_end / max_beta")
        self.T = len(betas)
        self.betas = torch.cat([betas.new_zeros(1), betas])  # beta[n], beta[0] = 0
        self.alphabar = torch.cumprod(1 - self.betas, 0)      # alphabar_n = prod_{s<=n} (1 - beta_s) (eq. 4)
        self.zero_terminal_snr = float(self.alphabar[-1]) == 0
        self._log_alphabar = self.alphabar.log()              # -inf at n = T for zero terminal SNR
        # the top of every sampling grid: the last step n whose log-SNR is still >= log_snr_min (at least step 1);
        # with zero terminal SNR step T itself, where x_T ~ N(0, I) is exact
        log_snr_n = self._log_alphabar[1:] - torch.log1p(-self.alphabar[1:])
        self.top_step = self.T if self.zero_terminal_snr else max(1, int((log_snr_n >= log_snr_min).sum()))
        self.t_min = 1.0 / self.T

    @property
    def t_top(self) -> float:
        """The first time of every grid: step `top_step` (T unless the last steps fall below LOG_SNR_MIN)."""
        return self.top_step / self.T

    @property
    def prior_std(self) -> float:
        """1: variance preserving (x_T ~ N(0, I), Ho et al. 2020, Algorithm 2)."""
        return 1.0

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """t = k / T with k ~ Uniform{1, ..., T} (Algorithm 1, line 3), as float64 times in (0, 1]."""
        k = torch.randint(1, self.T + 1, (n,), generator=generator)
        return k.to(torch.float64) / self.T

    def t_from_model_time(self, model_time) -> Tensor:
        """The inverse of `model_time`: t = (index + 1) / T."""
        return (torch.as_tensor(model_time).to(torch.float64) + 1) / self.T

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
        """The schedule of Ho et al. (2020): beta from 1e-4 to 0.02 over T = 1000 steps."""
        return cls(linear_betas(T, beta_start, beta_end))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
        """The cosine schedule of Nichol & Dhariwal (2021), eq. 17."""
        return cls(cosine_betas(T, s, max_beta))

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> NoiseSchedule:
        """The schedule a config names, of any process (see `schedule_from_config`)."""
        return schedule_from_config(cfg)

    @classmethod
    def _discrete_from_config(cls, cfg: ScheduleConfig) -> Schedule:
        if cfg.T < 1:
            raise ValueError(f"schedule.T must be >= 1, got {cfg.T}")
        if cfg.kind in ("linear", "scaled_linear", "sigmoid"):
            if not 0 < cfg.beta_start <= cfg.beta_end < 1:
                raise ValueError(
                    f"schedule.beta_start / beta_end must satisfy 0 < start <= end < 1, got {cfg.beta_start}, {cfg.beta_end}"
                )
            betas = {"linear": linear_betas, "scaled_linear": scaled_linear_betas,
                     "sigmoid": sigmoid_betas}[cfg.kind](cfg.T, cfg.beta_start, cfg.beta_end)
        elif cfg.kind == "cosine":
            betas = cosine_betas(cfg.T, cfg.cosine_s, cfg.max_beta)
        elif cfg.kind == "constant":
            if not 0 < cfg.beta_end < 1:
                raise ValueError(f"schedule.beta_end, the constant beta, must lie in (0, 1), got {cfg.beta_end}")
            betas = constant_betas(cfg.T, cfg.beta_end)
        else:
            raise ValueError(f"schedule.kind must be one of {', '.join(map(repr, SCHEDULE_KINDS))}, got {cfg.kind!r}")
        return cls(rescale_zero_terminal_snr(betas) if cfg.zero_terminal_snr else betas)

    # --- continuous time ------------------------------------------------------------------
    def _table_at(self, table: Tensor, t: Tensor) -> Tensor:
        """Interpolate a table over n = 0..T at n = t * T (linear in the table's values)."""
        t = torch.as_tensor(t).to("cpu", torch.float64)  # the float64 tables stay on the CPU; callers move results
        n = (t * self.T).clamp(0, self.T)
        lo = n.floor().long().clamp(max=self.T - 1)
        w = n - lo
        return torch.where(w > 0, table[lo] + w * (table[lo + 1] - table[lo]), table[lo])  # exact (and finite) at w = 0

    def alphabar_at(self, t: Tensor) -> Tensor:
        """alphabar(t), float64; log-linear between the T grid points (linear in the last cell of a zero-terminal-SNR
        schedule, which ends at alphabar_T = 0)."""
        ab = self._table_at(self._log_alphabar, t).exp()
        if self.zero_terminal_snr:
            n = (torch.as_tensor(t).to("cpu", torch.float64) * self.T).clamp(0, self.T)
            ab = torch.where(n > self.T - 1, self.alphabar[-2] * (self.T - n), ab)
        return ab

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
        """log SNR(t) = log(alpha_t^2 / sigma_t^2) = log alphabar_t - log(1 - alphabar_t), exact at alphabar near 1."""
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
        beta = self.T * (self._log_alphabar[cell] - self._log_alphabar[cell + 1])
        if self.zero_terminal_snr:  # the last cell, linear in alphabar: -d log alphabar / dt = T / (T - n), inf at t = 1
            beta = torch.where(cell == self.T - 1, self.T / (self.T - t * self.T), beta)
        return beta

    def t_from_log_alphabar(self, log_alphabar: Tensor) -> Tensor:
        """The exact inverse of `alphabar_at` on its log-linear interpolation; clamped to t in [0, 1]."""
        rising = -self._log_alphabar  # 0 = -log alphabar_0 < ... < -log alphabar_T (+inf for zero terminal SNR)
        y = (-torch.as_tensor(log_alphabar, dtype=torch.float64)).clamp(0, float(rising[-1]))
        hi = torch.searchsorted(rising, y).clamp(1, self.T)
        lo = hi - 1
        t = (lo + (y - rising[lo]) / (rising[hi] - rising[lo])) / self.T
        if self.zero_terminal_snr:  # the last cell is linear in alphabar: alphabar = alphabar_{T-1} (T - n)
            last = (self.T - torch.exp(rising[-2] - y)) / self.T
            t = torch.where(hi == self.T, last, t)
        return t

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """The time t with log SNR(t) = log_snr (alphabar = sigmoid(log SNR))."""
        return self.t_from_log_alphabar(torch.nn.functional.logsigmoid(torch.as_tensor(log_snr, dtype=torch.float64)))

    def t_from_ve_sigma(self, ve_sigma: Tensor) -> Tensor:
        """The time t with sigma_t / alpha_t = ve_sigma (alphabar = 1 / (1 + ve_sigma^2))."""
        return self.t_from_log_alphabar(-torch.log1p(torch.as_tensor(ve_sigma, dtype=torch.float64) ** 2))

    def model_time(self, t: Tensor) -> Tensor:
        """A network's time input for continuous t: the 0-based step index n - 1 = t * T - 1.

        DDPM networks and diffusers' schedulers number the steps 0..T-1, so step n (t = n/T)
        is fed as n - 1. This and `grid_from_indices` are the only places that convert.
        """
        return torch.as_tensor(t, dtype=torch.float64) * self.T - 1

    def grid_from_indices(self, indices) -> Tensor:
        """Continuous times for 0-based step indices (diffusers' `timesteps`), followed by t = 0."""
        idx = torch.as_tensor(indices, dtype=torch.float64)
        return torch.cat([(idx + 1) / self.T, idx.new_zeros(1)])

    # --- sampling grids -------------------------------------------------------------------
    def grid(self, steps: int | None = None, spacing: Spacing | None = None, rho: float = 7.0) -> Tensor:
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
        spacing = spacing or self.default_spacing
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
            if self.zero_terminal_snr:
                raise ValueError(f'spacing "{spacing}" is uniform in a power of sigma_t / alpha_t or in lambda, both infinite at '
                                 "alphabar_T = 0 of a zero-terminal-SNR schedule; use trailing (Lin et al. 2024, sec. 3.3), "
                                 "linspace or quadratic")
            t = self._between_ends(spacing, u, rho)  # from step N (t_top) to step 1 (t_min)
            return torch.cat([t, t.new_zeros(1)])
        else:
            raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
        return self.grid_from_indices(idx.flip(0))

    # --- the forward process --------------------------------------------------------------
    def q_step(self, x_prev: Tensor, n: int, eps: Tensor) -> Tensor:
        """One Markov step x_n = sqrt(1 - beta_n) x_{n-1} + sqrt(beta_n) eps, q(x_n | x_{n-1}) (Ho et al. 2020, eq. 2)."""
        beta = self.betas[n]
        return (1 - beta).sqrt().to(x_prev.dtype) * x_prev + beta.sqrt().to(x_prev.dtype) * eps


class VPCosine(NoiseSchedule):
    """Continuous-time VP with the cosine schedule: alphabar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) pi / 2)
    for real t in [0, 1] (Nichol & Dhariwal 2021, eq. 17, read in continuous time as Kingma et al. 2021 do);
    alpha = sqrt(alphabar), sigma = sqrt(1 - alphabar). Training draws t ~ U(t_min, 1); the network sees 1000 t.
    It has the VP-SDE's beta(t) in closed form, so the SDE samplers and the likelihood run on it."""

    kind = "vp_cosine"
    variance_preserving = True

    def __init__(self, s: float = 0.008, t_min: float = 1e-3):
        self.s, self.t_min = s, t_min
        self._f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2

    def alphabar_at(self, t) -> Tensor:
        """alphabar(t) = cos^2((t + s) / (1 + s) pi / 2) / f(0) (eq. 17), 0 at t = 1."""
        return cosine_alphabar(torch.as_tensor(t, dtype=torch.float64), self.s).clamp(0, 1)

    def alpha(self, t) -> Tensor:
        return self.alphabar_at(t).sqrt()

    def sigma(self, t) -> Tensor:
        return (1 - self.alphabar_at(t)).sqrt()

    def t_from_log_alphabar(self, log_alphabar) -> Tensor:
        """The inverse of alphabar(t): t = (1 + s) (2 / pi) arccos(sqrt(alphabar f(0))) - s, clamped to [0, 1]."""
        ab = torch.as_tensor(log_alphabar, dtype=torch.float64).exp()
        t = (1 + self.s) * 2 / math.pi * torch.arccos((ab * self._f0).sqrt().clamp(max=1)) - self.s
        return t.clamp(0, 1)

    def t_from_log_snr(self, log_snr) -> Tensor:
        return self.t_from_log_alphabar(torch.nn.functional.logsigmoid(torch.as_tensor(log_snr, dtype=torch.float64)))

    def sde_beta(self, t) -> Tensor:
        """beta(t) = -d log alphabar / dt = pi / (1 + s) tan((t + s) / (1 + s) pi / 2) (Song et al. 2021, eq. 11)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return math.pi / (1 + self.s) * torch.tan((t + self.s) / (1 + self.s) * math.pi / 2)

    def model_time(self, t) -> Tensor:
        """1000 t: the range of a DDPM network's step index."""
        return 1000 * torch.as_tensor(t, dtype=torch.float64)

    def t_from_model_time(self, model_time) -> Tensor:
        return torch.as_tensor(model_time).to(torch.float64) / 1000

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """t ~ U(t_min, 1) (Kingma et al. 2021: continuous-time training)."""
        return self.t_min + (1 - self.t_min) * torch.rand(n, generator=generator, dtype=torch.float64)


class EDM(NoiseSchedule):
    """Variance exploding in the parameterisation of Karras et al. (2022, "EDM"), table 1: alpha_t = 1 and
    sigma_t = t sigma_max, so grids run from sigma_max down to sigma_min (t_min = sigma_min / sigma_max); the "karras"
    spacing is EDM's eq. 5. Training draws ln sigma ~ N(P_mean, P_std^2) (table 1, "EDM"); the network's time input is
    c_noise = ln(sigma) / 4 (table 1), scaled by 1000 to the range of a DDPM step index. The start is
    x_T ~ N(0, sigma_max^2 I). Preconditioning (c_skip, c_out, c_in with sigma_data) is the prediction type "edm"
    (denoiser.edm_scalings)."""

    kind = "edm"
    default_spacing = "karras"  # sigma = t sigma_max: a grid uniform in t would end at sigma_max / steps (EDM eq. 5 instead)

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, p_mean: float = -1.2, p_std: float = 1.2):
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f"schedule.sigma_min / sigma_max must satisfy 0 < min < max, got {sigma_min}, {sigma_max}")
        if not p_std > 0:
            raise ValueError(f"schedule.p_std must be > 0, got {p_std}")
        self.sigma_min, self.sigma_max, self.p_mean, self.p_std = sigma_min, sigma_max, p_mean, p_std
        self.t_min = sigma_min / sigma_max

    def alpha(self, t) -> Tensor:
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))

    def sigma(self, t) -> Tensor:
        return self.sigma_max * torch.as_tensor(t, dtype=torch.float64)

    def t_from_log_snr(self, log_snr) -> Tensor:
        """sigma = exp(-log_snr / 2), t = sigma / sigma_max."""
        return (-torch.as_tensor(log_snr, dtype=torch.float64) / 2).exp() / self.sigma_max

    def model_time(self, t) -> Tensor:
        """1000 c_noise = 1000 ln(sigma_t) / 4 = 250 ln(sigma_t) (Karras et al. 2022, table 1)."""
        return 250 * self.sigma(t).log()

    def t_from_model_time(self, model_time) -> Tensor:
        return (torch.as_tensor(model_time).to(torch.float64) / 250).exp() / self.sigma_max

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, table 1), as t = sigma / sigma_max, clipped to [t_min, 1]."""
        ln_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator, dtype=torch.float64)
        return (ln_sigma.exp() / self.sigma_max).clamp(self.t_min, 1.0)


class Flow(NoiseSchedule):
    """Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2023; Esser et al. 2024): x_t = (1 - t) x_0 + t eps,
    the straight path from data to noise, whose velocity dx_t / dt = eps - x_0 is the "flow" prediction's target.
    Training draws t uniform, or logit-normal t = sigmoid(m + s z) (Esser et al. 2024, sec. 3.1, "rf/lognorm(0, 1)").
    The network sees 1000 t. Grids start where the log-SNR falls to LOG_SNR_MIN (t = 0.994), not at t = 1
    (alpha = 0), and end at t_min."""

    kind = "flow"

    def __init__(self, t_sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0, t_min: float = 1e-3):
        if t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"schedule.t_sampling must be 'uniform' or 'logit_normal', got {t_sampling!r}")
        if not logit_std > 0:
            raise ValueError(f"schedule.logit_std must be > 0, got {logit_std}")
        self.t_sampling, self.logit_mean, self.logit_std, self.t_min = t_sampling, logit_mean, logit_std, t_min

    def alpha(self, t) -> Tensor:
        return 1 - torch.as_tensor(t, dtype=torch.float64)

    def sigma(self, t) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float64).clone()

    def t_from_log_snr(self, log_snr) -> Tensor:
        """(1 - t) / t = exp(log_snr / 2), so t = sigmoid(-log_snr / 2)."""
        return torch.sigmoid(-torch.as_tensor(log_snr, dtype=torch.float64) / 2)

    def model_time(self, t) -> Tensor:
        return 1000 * torch.as_tensor(t, dtype=torch.float64)

    def t_from_model_time(self, model_time) -> Tensor:
        return torch.as_tensor(model_time).to(torch.float64) / 1000

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, generator=generator, dtype=torch.float64) if self.t_sampling == "logit_normal" else None
        t = torch.sigmoid(self.logit_mean + self.logit_std * z) if z is not None else torch.rand(n, generator=generator, dtype=torch.float64)
        return t.clamp(self.t_min, 1.0)


DISCRETE_KINDS = ("linear", "cosine", "scaled_linear", "sigmoid", "constant")  # beta schedules of T steps (the Schedule class)
SCHEDULE_KINDS = (*DISCRETE_KINDS, "vp_cosine", "edm", "flow")


def schedule_from_config(cfg: ScheduleConfig) -> NoiseSchedule:
    """The process a [schedule] section names: discrete VP (DISCRETE_KINDS; T steps), continuous VP cosine, EDM, flow."""
    if cfg.kind in DISCRETE_KINDS:
        return Schedule._discrete_from_config(cfg)
    if cfg.kind == "vp_cosine":
        return VPCosine(cfg.cosine_s)
    if cfg.kind == "edm":
        return EDM(cfg.sigma_min, cfg.sigma_max, cfg.p_mean, cfg.p_std)
    if cfg.kind == "flow":
        return Flow(cfg.t_sampling, cfg.logit_mean, cfg.logit_std)
    raise ValueError(f"schedule.kind must be one of {', '.join(map(repr, SCHEDULE_KINDS))}, got {cfg.kind!r}")


def append_dims(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-example (B,) or scalar tensor to broadcast against `like` (B, C, H, W), on like's device."""
    v = to_device(torch.as_tensor(v), like.device)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def to_device(v: Tensor, device: torch.device | str) -> Tensor:
    """`v` on `device`. From the CPU to a GPU it goes through pinned memory without waiting (non_blocking): the schedule
    computes alpha_t, sigma_t and model times in float64 on the CPU, and a plain copy of them would make the host wait
    for the GPU at every network call (a pageable host-to-device copy synchronises the stream)."""
    device = torch.device(device)
    if v.device == device:
        return v
    if device.type == "cuda" and v.device.type == "cpu":
        return v.pin_memory().to(device, non_blocking=True)
    return v.to(device)


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
