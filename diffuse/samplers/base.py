"""What every sampler shares: the walk over a grid (start, projection, jumps back up), the per-step report,
noise from a generator, the options and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

import torch
from torch import Tensor

from ..schedule import transition_variance

if TYPE_CHECKING:
    from ..denoiser import Prediction


@dataclass
class Step:
    """One step of a sampler, as reported to its callback: from x_t at time t to x_s at time s."""

    index: int      # 0-based step number
    total: int      # number of steps in the grid
    t: float        # current time
    s: float        # next time (0 at the last step; above t on a jump back up)
    x: Tensor       # x_t
    x0: Tensor | None  # the denoiser's prediction of x_0 at (x_t, t); None on a jump back up (s > t)
    x_next: Tensor  # x_s


Callback = Callable[[Step], None]


class NonFiniteSample(ValueError):
    """A sampler's x (or the denoiser's prediction) became NaN or infinite; the message names the step."""


class GridStep(NamedTuple):
    """One move of a sampler from time t to time s (s < t: a denoising step; s > t: a jump back up), with the
    schedule's scales at both, as floats."""

    index: int      # 0-based position in the grid
    total: int      # number of moves in the grid
    t: float
    s: float
    alpha_t: float
    sigma_t: float
    alpha_s: float
    sigma_s: float


def require_positive_alpha(schedule, name: str) -> None:
    """Samplers in the VE noise level sigma_t / alpha_t (karras.py) and the VP-SDE ones (beta(t) = -d log alphabar / dt)
    are infinite at alpha_T = 0: a clear error on a zero-terminal-SNR schedule (Lin et al. 2024)."""
    if getattr(schedule, "zero_terminal_snr", False):
        raise ValueError(f"{name} works in sigma_t / alpha_t or the VP-SDE's beta(t), both infinite at the first step of a "
                         "zero-terminal-SNR schedule (alphabar_T = 0); use ddim, ddpm, dpmpp-2m, dpmpp-3m or dpmpp-2s, "
                         "or set schedule.zero_terminal_snr = false")


def grid_steps(schedule, grid: Tensor, *, jumps: bool = False) -> Iterator[GridStep]:
    """Walk consecutive pairs (t, s) of a grid of times in [0, 1] that ends at t = 0; scales in float64 as floats.

    The grid decreases strictly, or, with `jumps`, may step back up (never stays put). Raises ValueError
    for a grid of fewer than two times, one that does not end at 0, or times out of order or outside [0, 1].
    """
    ts = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if len(ts) < 2:
        raise ValueError("a sampling grid needs at least two times: the start and the final t = 0")
    if ts[-1] != 0:
        raise ValueError(f"a sampling grid must end at t = 0 (clean data), got {float(ts[-1])}")
    if bool((ts < 0).any() | (ts > 1).any()):
        raise ValueError("sampling times must lie in [0, 1]")
    moves = ts[1:] - ts[:-1]
    if not bool((moves < 0).all()) and not (jumps and bool((moves != 0).all())):
        raise ValueError("sampling times must decrease strictly from at most 1 down to 0"
                         + (" (jumps back up allowed, but no time twice in a row)" if jumps else ""))
    alpha, sigma = schedule.alpha(ts).tolist(), schedule.sigma(ts).tolist()
    n = len(ts) - 1
    for i in range(n):
        yield GridStep(i, n, float(ts[i]), float(ts[i + 1]), alpha[i], sigma[i], alpha[i + 1], sigma[i + 1])


# A sampler's update rule: (the move, x_t, the history list) -> (x_s, the prediction at x_t). Multistep rules keep
# what they need of earlier steps in `history`, which the walk empties after a jump back up.
Update = Callable[[GridStep, Tensor, list], "tuple[Tensor, Prediction]"]
Project = Callable[[Tensor, float], Tensor]


def forward_jump(x: Tensor, step: GridStep, generator: torch.Generator | None) -> Tensor:
    """x_s ~ q(x_s | x_t) for s > t: x_s = (alpha_s / alpha_t) x_t + sqrt(sigma_s^2 - (alpha_s / alpha_t)^2 sigma_t^2) z,
    the forward process from t on to s (Kingma et al. 2021, appendix A); RePaint's step back up in its resampling
    schedule (Lugmayr et al. 2022, Algorithm 1, line 10: x_t ~ N(sqrt(1 - beta) x_{t-1}, beta I))."""
    var = transition_variance(step.alpha_s, step.sigma_s, step.alpha_t, step.sigma_t)  # q(x_s | x_t) with t < s
    return (step.alpha_s / step.alpha_t) * x + math.sqrt(max(var, 0.0)) * gaussian_like(x, generator)


def walk(schedule, x: Tensor, grid: Tensor, update: Update, *, generator: torch.Generator | None = None,
         callback: Callback | None = None, project: Project | None = None) -> Tensor:
    """The one sampling loop: every sampler is this walk with its own `update` (DESIGN.md, "one shared walk").

    x (B, ...) is the sample at the grid's first time, which may be below the top (an SDEdit-style partial
    run from a noised image). For each consecutive pair (t, s) of the grid:
      - s < t, a denoising step: x_s, pred = update(step, x_t, history); then x_s = project(x_s, s) if given
        (inpainting, RePaint, ILVR replace part of x_s after each step);
      - s > t, a jump back up: x_s ~ q(x_s | x_t) (`forward_jump`); the history is emptied.
    Each move is reported once to `callback` as a Step (x0 is None on a jump). A grid [0] is no move at all:
    x is returned as it is. Noise comes only from `generator`. Returns x at t = 0.
    """
    ts = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if len(ts) == 1 and float(ts[0]) == 0:
        return x
    history: list = []
    for step in grid_steps(schedule, ts, jumps=True):
        if step.s > step.t:
            x_next, x0 = forward_jump(x, step, generator), None
            history.clear()
        else:
            x_next, pred = update(step, x, history)
            x0 = pred.x0
            if project is not None:
                x_next = project(x_next, step.s)
        if callback is not None:
            callback(Step(step.index, step.total, step.t, step.s, x, x0, x_next))
        x = x_next
    return x


def gaussian_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn only from the passed generator."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class CountCalls:
    """A denoiser that counts its calls (a sampler's number of function evaluations, NFE) and the images they carry
    (`images`). Classifier-free guidance asks for 2B images a step, which `generate` sends as two calls of B
    (guidance.SplitCalls), so a guided step counts two calls."""

    def __init__(self, denoiser):
        self.denoiser, self.schedule, self.calls, self.images = denoiser, denoiser.schedule, 0, 0

    def __call__(self, x_t: Tensor, t, **cond):
        self.calls += 1
        self.images += x_t.shape[0]
        return self.denoiser(x_t, t, **cond)

    def __getattr__(self, name: str):  # the wrapped denoiser's other attributes (net, prediction, ...)
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)


@dataclass(frozen=True)
class Option:
    """A sampler's keyword option: its type and the values it takes. `parse` reads it from text (the CLI's
    --opt KEY=VALUE), `check` validates a value from Python or a config; both raise ValueError naming it."""

    kind: type                       # float, int, bool or str
    low: float | None = None         # smallest allowed number
    above: bool = False              # the number must exceed `low` (not equal it)
    high: float | None = None        # largest allowed number (far past any useful value: guards overflow)
    allow_inf: bool = False          # +inf is a meaningful value (s_tmax: no upper end)
    choices: tuple[str, ...] = ()    # the allowed strings (kind = str)
    example: str = ""                # a good value, for messages

    def rule(self) -> str:
        if self.kind is str:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        what = "an integer" if self.kind is int else "a finite number" if not self.allow_inf else "a number"
        return (what + ("" if self.low is None else f" {'>' if self.above else '>='} {self.low:g}")
                + ("" if self.high is None else f" and <= {self.high:g}"))

    def check(self, name: str, value):
        """`value` if it is valid for this option, else ValueError naming the option, the rule and an example."""
        bad = ValueError(f"{name} must be {self.rule()}, got {value!r}; e.g. {name}={self.example}")
        if self.kind is str:
            if value not in self.choices:
                raise bad
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int and not float(value).is_integer()):
            raise bad
        if math.isnan(value) or (math.isinf(value) and not (self.allow_inf and value > 0)):
            raise bad
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            raise bad
        if self.high is not None and value > self.high:
            raise bad
        return int(value) if self.kind is int else float(value)

    def parse(self, name: str, raw: str):
        """The option's value from text, checked: 'abc' for a number, 'nan', 'inf' (unless allowed) raise ValueError."""
        raw = raw.strip()
        if self.kind is bool:
            value = {"true": True, "false": False, "1": True, "0": False}.get(raw.lower(), raw)
        elif self.kind in (int, float):
            try:
                value = float(raw) if self.kind is float else int(raw)
            except ValueError:
                value = raw
        else:
            value = raw
        return self.check(name, value)


TOLERANCE = Option(float, low=0.0, above=True, high=1.0, example="1e-5")
OPTIONS: dict[str, Option] = {
    "eta": Option(float, low=0.0, high=100.0, example="1.0"),
    "variance": Option(str, choices=("beta_tilde", "beta"), example="beta"),
    "reference_3m": Option(bool, example="false"),
    "s_churn": Option(float, low=0.0, high=1e4, example="10"),
    "s_tmin": Option(float, low=0.0, example="0.05"),
    "s_tmax": Option(float, low=0.0, allow_inf=True, example="50"),
    "s_noise": Option(float, low=0.0, high=10.0, example="1.003"),
    "snr": Option(float, low=0.0, above=True, high=10.0, example="0.16"),
    "corrector_steps": Option(int, low=0, high=100, example="1"),
    "rtol": TOLERANCE,
    "atol": TOLERANCE,
}
"""Every sampler option by name, with the values it takes (the samplers' keyword arguments)."""
