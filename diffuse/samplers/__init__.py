"""Samplers: pure functions sample(denoiser, x_T, grid, *, generator, callback) -> x_0.

They call the denoiser and read alpha_t, sigma_t from its schedule, nothing else: no network,
no prediction type, no hidden state between calls. `SAMPLERS` names each one for the CLI, with
its denoiser calls per grid step (multi-stage samplers make fewer on the step into t = 0).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from . import ddim, ddpm, dpm_solver, karras, sde
from .base import OPTIONS, Callback, CountCalls, NonFiniteSample, Option, Step, require_positive_alpha


@dataclass(frozen=True)
class SamplerInfo:
    """A named sampler: call it as the sampler function itself."""

    fn: Callable
    calls_per_step: int       # denoiser calls per grid step (0: adaptive)
    options: tuple[str, ...]  # keyword options it takes besides generator and callback (keys of OPTIONS)
    about: str
    zero_snr: bool = True     # can start at alpha_T = 0 (a zero-terminal-SNR schedule); False: works in sigma / alpha
    vp_only: bool = False     # integrates the VP-SDE, which only the variance-preserving processes have

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def check_options(self, options: dict) -> dict:
        """The options this sampler takes, each checked (ValueError for a bad value); the other samplers' options are
        dropped (a config's defaults go to any sampler). ValueError for a name that is no sampler's option (a typo, or
        an argument of `generate` misspelt, which would otherwise be dropped in silence)."""
        unknown = sorted(k for k in options if k not in OPTIONS)
        if unknown:
            raise ValueError(f"unknown sampler option(s) {', '.join(map(repr, unknown))}; the options are "
                             f"{', '.join(OPTIONS)} (each sampler takes some of them); check the spelling")
        return {k: OPTIONS[k].check(k, v) for k, v in options.items() if k in self.options}

    def check_schedule(self, schedule, name: str) -> None:
        """ValueError when this sampler cannot run on `schedule` (alpha_T = 0 for a sampler in sigma / alpha; a process
        that is not variance preserving for the VP-SDE samplers)."""
        if not self.zero_snr:
            require_positive_alpha(schedule, name)
        if self.vp_only:
            sde.require_vp(schedule, name)


SAMPLERS: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo(ddpm.sample, 1, ("variance",), "ancestral, Ho et al. 2020 Algorithm 2"),
    "ddim": SamplerInfo(ddim.sample, 1, ("eta",), "Song et al. 2021, any eta"),
    "dpmpp-2m": SamplerInfo(functools.partial(dpm_solver.sample, order=2), 1, (), "DPM-Solver++(2M), Lu et al. 2022"),
    "dpmpp-3m": SamplerInfo(functools.partial(dpm_solver.sample, order=3), 1, ("reference_3m",), "DPM-Solver++ 3rd-order multistep"),
    "dpmpp-2s": SamplerInfo(dpm_solver.sample_2s, 2, (), "DPM-Solver++(2S), single-step, Lu et al. 2022"),
    "euler": SamplerInfo(karras.euler, 1, (), "Euler in sigma, Karras et al. 2022", zero_snr=False),
    "heun": SamplerInfo(karras.heun, 2, ("s_churn", "s_tmin", "s_tmax", "s_noise"), "Heun, EDM Algorithm 1 (2 with s_churn)", zero_snr=False),
    "dpm2": SamplerInfo(karras.dpm2, 2, (), "DPM-Solver-2 in sigma, Karras et al. 2022", zero_snr=False),
    "euler-ancestral": SamplerInfo(karras.euler_ancestral, 1, ("eta",), "Euler ancestral in sigma", zero_snr=False),
    "sde-em": SamplerInfo(sde.euler_maruyama, 1, (), "reverse VP-SDE by Euler-Maruyama, Song et al. 2021", zero_snr=False, vp_only=True),
    "sde-pc": SamplerInfo(sde.predictor_corrector, 2, ("snr", "corrector_steps"), "predictor-corrector with Langevin, Song et al. 2021", zero_snr=False, vp_only=True),
    "ode-rk45": SamplerInfo(sde.probability_flow, 0, ("rtol", "atol"), "probability-flow ODE by adaptive RK45 (steps ignored)", zero_snr=False, vp_only=True),
}

def check_plan(schedule, sampler: str, steps: int | None, spacing: str | None) -> None:
    """What `generate` checks of a sampler on a schedule before it draws, for a command to check before it loads a
    model or starts a progress bar: the sampler exists and runs on this process (SamplerInfo.check_schedule), and its
    grid of `steps` (None or 0: every step) and `spacing` (None: the process's default) can be made. ValueError naming
    the problem and the fix."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    info = SAMPLERS[sampler]
    info.check_schedule(schedule, sampler)
    if info.calls_per_step:  # an adaptive solver makes its own grid
        schedule.grid(steps or None, spacing or schedule.default_spacing)


__all__ = ["OPTIONS", "SAMPLERS", "check_plan", "Option", "SamplerInfo", "Callback", "CountCalls", "NonFiniteSample", "Step", "ddim", "ddpm", "dpm_solver", "karras", "sde"]
