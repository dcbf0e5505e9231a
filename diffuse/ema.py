"""Averages of the weights: the EMA of DDPM, and post-hoc EMA (power-function EMA tracks, snapshots, and any other EMA
length rebuilt from them later).

EMA: theta_ema <- d * theta_ema + (1 - d) * theta after every step (Ho et al. 2020: decay 0.9999), `EMA`.

Post-hoc EMA:

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2), sec. 3 and
appendix C. Equation numbers are those of the arXiv version as cited in NVlabs/edm2 `training/phema.py`.

A power-function EMA at step t averages theta_1..theta_t with the profile p(tau) = (gamma+1) tau^gamma / t^(gamma+1)
on [0, t] (unit mass); its width is sigma_rel, the profile's standard deviation over t. Reading theta(tau) = theta_k
for tau in (k-1, k], the EMA with `power_ema_beta` is exactly the integral of p(tau) theta(tau): the weight of
theta_k is (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1). So snapshots taken at steps t_i of tracks gamma_i are
integrals of known profiles, and a profile p_r is rebuilt as the least-squares combination sum_i x_i p_i.

Snapshot file `phema_{step:08d}.safetensors`: tensors "{track}.{param}" (float32) for every track plus
"buffers.{name}" (as the model holds them); string metadata format="diffuse-phema", version="1", step,
sigma_rels and gammas (JSON lists, one entry per track, in track order).
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from .checkpoint import write_atomically

__all__ = ["EMA", "fold", "sigma_rel_to_gamma", "gamma_to_sigma_rel", "power_ema_beta", "posthoc_coefficients", "PowerEMA",
           "Snapshot", "list_snapshots", "reconstruct", "reconstructable_range", "snapshot_steps"]

GAMMA_MIN = (math.sqrt(5) - 3) / 2
"""gamma where sigma_rel(gamma) peaks: d/dgamma log sigma_rel^2 = 0 gives gamma^2 + 3 gamma + 1 = 0."""
SIGMA_REL_MAX = ((1 + math.sqrt(5)) / 2) ** -2.5
"""sigma_rel(GAMMA_MIN) = golden ratio^-5/2 ~= 0.3003: no power-function profile is wider."""
MAX_ERROR = 0.05
"""Default bound on the relative L2 profile error of a reconstruction. Changing sigma_rel by 5% / 10% itself moves
a profile (same t, sigma_rel 0.05-0.10) by 0.038-0.044 / 0.074-0.085, so within 0.05 one gets the EMA asked for
about as closely as a ~6% change of sigma_rel would, finer than EMA lengths are usually compared."""
FORMAT, VERSION = "diffuse-phema", "1"
_SNAP_RE = re.compile(r"phema_(\d{8,})\.safetensors")


class EMA:
    """theta_ema <- d * theta_ema + (1 - d) * theta after every step (DDPM: decay 0.9999).

    With `warmup`, d = min(decay, (1 + n) / (10 + n)) at update n (as TensorFlow's
    ExponentialMovingAverage with num_updates): without it, a short run's average would still be
    dominated by the initial weights (0.999^400 = 0.67).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, n: int, keep: Tensor | None = None) -> None:
        """Fold in the weights after update n (0-based). `keep` (a 0-d float tensor on the weights' device, 1 or 0):
        with 0 the average holds still, decided on the device without a host synchronisation (train.Trainer's
        deferred checks)."""
        fold(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - self.decay_at(n), keep)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def fold(average: list[Tensor], new: list[Tensor], weight: float, keep: Tensor | None = None) -> None:
    """average <- average + weight * keep * (new - average), in place over lists of tensors (one fused kernel per
    list: torch._foreach_*). keep None is 1 (a lerp); a 0-d tensor keep of 0 leaves the average as it is."""
    if keep is None:
        torch._foreach_lerp_(average, new, weight)
        return
    delta = torch._foreach_sub(new, average)
    torch._foreach_mul_(delta, keep * weight)
    torch._foreach_add_(average, delta)


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))) (EDM2 eq. 123). gamma: float in [GAMMA_MIN ~= -0.382,
    inf); below it sigma_rel falls again, so the map would not be invertible. Returns sigma_rel in (0, ~0.3003].
    Raises ValueError for gamma outside that range, NaN or inf."""
    if not (math.isfinite(gamma) and gamma >= GAMMA_MIN):
        raise ValueError(f"gamma must be finite and >= {GAMMA_MIN:.6f}, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The inverse of `gamma_to_sigma_rel` (EDM2 eq. 126, Algorithm 2): with s = sigma_rel^-2, gamma is the largest
    real root of gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0. sigma_rel: float in (0, SIGMA_REL_MAX ~=
    0.3003]. Returns gamma >= GAMMA_MIN (0.05 -> 16.97, 0.10 -> 6.94). Raises ValueError outside, NaN or inf."""
    if not (math.isfinite(sigma_rel) and 0 < sigma_rel <= SIGMA_REL_MAX):
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.6f}], got {sigma_rel}")
    s = sigma_rel ** -2.0
    return max(float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max()), GAMMA_MIN)  # double root at the max


def power_ema_beta(step: int, gamma: float) -> float:
    """beta = (1 - 1/step)^(gamma+1) (EDM2 eq. 127 with unit steps): the decay of `ema <- beta ema + (1-beta) theta`
    at the step-th optimizer step (1-based; beta = 0 at step 1). Unrolled, theta_k gets weight
    (k^(gamma+1) - (k-1)^(gamma+1)) / step^(gamma+1), i.e. ~ k^gamma. Raises ValueError for step < 1 or gamma <= -1."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (1-based optimizer step), got {step!r}")
    if not (math.isfinite(gamma) and gamma > -1):
        raise ValueError(f"gamma must be finite and > -1, got {gamma}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def _profile_inner(ta: np.ndarray, ga: np.ndarray, tb: np.ndarray, gb: np.ndarray) -> np.ndarray:
    """<p_a, p_b> = integral of p_a p_b over [0, inf) for unit-mass profiles (EDM2 eq. 151, Algorithm 3):
    (ga+1)(gb+1) / (ga+gb+1) * (min/max)^(gamma of the longer one) / max(ta, tb). Broadcasting float64 arrays;
    t in steps (> 0), gamma > -1/2; units 1/steps."""
    short, long_ = np.minimum(ta, tb), np.maximum(ta, tb)
    g_long = np.where(ta < tb, gb, ga)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * (short / long_) ** g_long / long_


def _solver(t_snap, gamma_snap):
    """Factor the snapshots' Gram matrix A once (float64 eigendecomposition, pseudo-inverse with lstsq's cutoff)
    and return target (t_r, gamma_r) -> (coefficients, relative_error); see `posthoc_coefficients`."""
    t = np.asarray(t_snap, dtype=np.float64).reshape(-1)
    g = np.asarray(gamma_snap, dtype=np.float64).reshape(-1)
    if t.size == 0 or t.shape != g.shape:
        raise ValueError(f"need >= 1 snapshot and as many times as gammas, got {t.size} and {g.size}")
    if not (np.all(np.isfinite(t)) and np.all(t > 0) and np.all(np.isfinite(g)) and np.all(g > -0.5)):
        raise ValueError("snapshot times must be finite and > 0, gammas finite and > -1/2")
    A = _profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    w, V = np.linalg.eigh(A)
    keep = w > w.max() * t.size * np.finfo(np.float64).eps
    A_pinv = (V[:, keep] / w[keep]) @ V[:, keep].T

    def solve(t_r: float, g_r: float) -> tuple[np.ndarray, float]:
        if not (math.isfinite(t_r) and t_r > 0 and math.isfinite(g_r) and g_r > -0.5):
            raise ValueError(f"target needs finite t > 0 and gamma > -1/2, got t={t_r}, gamma={g_r}")
        b = _profile_inner(t, g, np.float64(t_r), np.float64(g_r))
        c = float(_profile_inner(np.float64(t_r), np.float64(g_r), np.float64(t_r), np.float64(g_r)))
        x = A_pinv @ b
        if abs(x.sum()) < 1e-12:
            return x, math.inf
        x = x / x.sum()  # as EDM2: a constant parameter is reproduced exactly
        err2 = c - 2 * x @ b + x @ A @ x  # ||p_r - sum x_i p_i||^2
        return x, math.sqrt(max(err2, 0.0) / c)

    return solve


def posthoc_coefficients(t_snap, gamma_snap, t_target: float, gamma_target: float) -> tuple[np.ndarray, float]:
    """Least-squares post-hoc EMA (EDM2 appendix C.3, Algorithm 3). t_snap, gamma_snap: (n,) steps and gammas of the
    snapshots; target (t_target, gamma_target). Solves A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_r> in float64
    (pseudo-inverse, so duplicate snapshots are fine), then scales x to sum 1 as EDM2 does. Returns (x (n,) float64,
    relative_error = ||p_r - sum x_i p_i|| / ||p_r|| from the same Gram matrix, in [0, inf)). Raises ValueError for
    empty/mismatched input, t <= 0, gamma <= -1/2 (profile not square-integrable) or non-finite values."""
    return _solver(t_snap, gamma_snap)(float(t_target), float(gamma_target))


class PowerEMA:
    """Power-function EMAs of a model's parameters, one track per sigma_rel (float32 copies, no grad, on the model's
    device); buffers are copied as they are at each update. `step` counts the updates folded in so far."""

    def __init__(self, model: nn.Module, sigma_rels=(0.05, 0.10)):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.step = 0
        params = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        self.tracks = [{n: p.clone() for n, p in params.items()} for _ in self.sigma_rels]
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, keep: Tensor | None = None) -> None:
        """Fold in the weights after optimizer step `step` (1-based); steps must come one by one (1, 2, ...). `keep`
        as for EMA.update: a 0-d tensor 0 holds every track still."""
        if step != self.step + 1:
            raise ValueError(f"PowerEMA.update expects step {self.step + 1} (1-based, consecutive), got {step}; "
                             "restore a saved state with load_state_dict when resuming")
        new = [p.detach().float() for _, p in model.named_parameters()]
        for track, gamma in zip(self.tracks, self.gammas):
            fold(list(track.values()), new, 1.0 - power_ema_beta(step, gamma), keep)
        for name, b in model.named_buffers():
            self.buffers[name].copy_(b)
        self.step = step

    def track(self, i: int) -> dict[str, Tensor]:
        """Track i's parameters and the buffers, ready for model.load_state_dict."""
        return {**self.tracks[i], **self.buffers}

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensors: "{track}.{param}" and "buffers.{name}" (clones). Metadata: see `metadata`."""
        out = {f"{i}.{n}": p.clone() for i, tr in enumerate(self.tracks) for n, p in tr.items()}
        return out | {f"buffers.{n}": b.clone() for n, b in self.buffers.items()}

    def metadata(self) -> dict:
        """Plain-Python state beside `state_dict`: {"step": int, "sigma_rels": list, "gammas": list}."""
        return {"step": self.step, "sigma_rels": list(self.sigma_rels), "gammas": list(self.gammas)}

    def load_state_dict(self, state: dict[str, Tensor], metadata: dict) -> None:
        """Restore from `state_dict` / `metadata` exactly. Raises ValueError for other sigma_rels or other keys."""
        if list(metadata["sigma_rels"]) != list(self.sigma_rels):
            raise ValueError(f"saved sigma_rels {metadata['sigma_rels']} differ from {list(self.sigma_rels)}")
        if set(state) != set(self.state_dict()):
            raise ValueError(f"PowerEMA state keys differ: {sorted(set(state) ^ set(self.state_dict()))[:5]}")
        for k, v in state.items():
            i, n = k.split(".", 1)
            (self.buffers if i == "buffers" else self.tracks[int(i)])[n].copy_(v)
        self.step = int(metadata["step"])

    def save_snapshot(self, directory, step: int) -> Path:
        """Write all tracks to DIR/phema_{step:08d}.safetensors atomically (checkpoint.write_atomically: a failed write,
        a full disk, leaves the earlier snapshots and raises checkpoint.WriteError naming the file).
        `step` must be the current `self.step`. Returns the path. Format: see the module docstring."""
        if step != self.step or step < 1:
            raise ValueError(f"save_snapshot(step={step}) but the EMA holds step {self.step}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "version": VERSION, "step": str(step),
                "sigma_rels": json.dumps(list(self.sigma_rels)), "gammas": json.dumps(list(self.gammas))}
        path = directory / f"phema_{step:08d}.safetensors"
        write_atomically(path, save({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, metadata=meta))
        return path


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file as `list_snapshots` reads it: the step it was taken at, each track's sigma_rel and gamma."""

    path: Path
    step: int
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]


def snapshot_steps(directory) -> dict[int, Path]:
    """{step: path} of the snapshot files in DIR by their names (phema_NNNNNNNN.safetensors), without reading them;
    {} when DIR does not exist."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    return {int(m.group(1)): p for p in directory.iterdir() if (m := _SNAP_RE.fullmatch(p.name))}


def list_snapshots(directory) -> list[Snapshot]:
    """The snapshots in DIR, by step. Raises ValueError naming the file when one is unreadable or its metadata is
    wrong (truncated, not safetensors, step not matching its name). Tensor bytes carry no checksum: a flipped bit
    inside the data goes unnoticed. FileNotFoundError when DIR does not exist."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"no post-hoc EMA snapshot folder {directory}")
    out = []
    for step, path in sorted(snapshot_steps(directory).items()):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
            if meta.get("format") != FORMAT or int(meta["step"]) != step:
                raise ValueError(f"format {meta.get('format')!r}, step {meta.get('step')!r}")
            gammas = tuple(float(g) for g in json.loads(meta["gammas"]))
            sigma_rels = tuple(float(s) for s in json.loads(meta["sigma_rels"]))
            if len(gammas) != len(sigma_rels) or not {str(i) for i in range(len(gammas))} <= {
                    k.split(".", 1)[0] for k in keys}:
                raise ValueError("tracks in the metadata do not match the tensors")
        except Exception as e:
            raise ValueError(f"corrupt post-hoc EMA snapshot {path}: {type(e).__name__}: {e}") from e
        out.append(Snapshot(path, step, sigma_rels, gammas))
    return out


def _usable(directory, step):
    """(snapshots at or before step, step (default: the last), solver over all their tracks); >= 2 snapshots."""
    snaps = list_snapshots(directory)
    step = snaps[-1].step if step is None and snaps else step
    used = [s for s in snaps if step is not None and s.step <= step]
    if len(used) < 2:
        raise ValueError(f"post-hoc EMA needs >= 2 snapshots up to step {step} in {directory}, found {len(used)}; "
                         "train longer or save snapshots more often (PowerEMA.save_snapshot)")
    t = [s.step for s in used for _ in s.gammas]
    return used, step, _solver(t, [g for s in used for g in s.gammas])


def reconstructable_range(directory, step=None, max_error: float = MAX_ERROR):
    """The interval (lo, hi) of sigma_rel whose EMA at `step` (default: last snapshot) the snapshots in DIR rebuild
    with relative profile error <= max_error: from the best point of a 64-point log grid over [1e-3, SIGMA_REL_MAX],
    the run of good grid points around it, its edges refined by 40 bisections each (an edge at the end of the grid
    stays there). None if no grid point qualifies. Raises as `reconstruct`."""
    _, step, solve = _usable(directory, step)
    err = lambda s: solve(step, sigma_rel_to_gamma(s))[1]
    grid = np.geomspace(1e-3, SIGMA_REL_MAX, 64)
    errs = [err(s) for s in grid]
    lo = hi = int(np.argmin(errs))
    if errs[lo] > max_error:
        return None
    while lo > 0 and errs[lo - 1] <= max_error:
        lo -= 1
    while hi < len(grid) - 1 and errs[hi + 1] <= max_error:
        hi += 1

    def edge(inside, outside):
        for _ in range(40):
            mid = math.sqrt(inside * outside)
            inside, outside = (mid, outside) if err(mid) <= max_error else (inside, mid)
        return float(inside)

    return (float(grid[0]) if lo == 0 else edge(grid[lo], grid[lo - 1]),
            float(grid[-1]) if hi == len(grid) - 1 else edge(grid[hi], grid[hi + 1]))


def reconstruct(directory, sigma_rel: float, step=None, max_error: float = MAX_ERROR, on_snapshot=None) -> dict[str, Tensor]:
    """Parameters (float32, CPU) of the power-function EMA of width sigma_rel at `step` (default: the last snapshot),
    as sum_i x_i snapshot_i over every track of every snapshot at or before `step`, plus the buffers of the newest
    of those snapshots. max_error bounds the relative L2 profile error (default `MAX_ERROR` = 0.05, what a ~6% change
    of sigma_rel itself does to a profile). Raises ValueError for sigma_rel outside (0, 0.3003] or NaN, for an error above
    max_error (naming the tracked sigma_rels and the reconstructable range), for < 2 snapshots or corrupt files;
    FileNotFoundError when DIR does not exist. `on_snapshot(done, total)` is told after each snapshot is read (a
    progress bar: reading them is the long part)."""
    used, step, solve = _usable(directory, step)
    try:
        x, err = solve(step, sigma_rel_to_gamma(sigma_rel))
        problem = None if err <= max_error else f"relative profile error {err:.3g} > max_error {max_error}"
    except ValueError as e:
        problem = str(e)
    if problem:
        rng = reconstructable_range(directory, step, max_error)
        rng_txt = "no sigma_rel" if rng is None else f"sigma_rel in [{rng[0]:.4f}, {rng[1]:.4f}]"
        raise ValueError(f"cannot reconstruct sigma_rel={sigma_rel} at step {step} from tracks sigma_rels="
                         f"{list(used[-1].sigma_rels)}: {problem}; the snapshots rebuild {rng_txt} within "
                         f"max_error={max_error}; pick a sigma_rel there, raise max_error, or track it directly")
    out, k = {}, 0
    for done, snap in enumerate(used, 1):
        with safe_open(str(snap.path), framework="pt") as f:
            for i in range(len(snap.gammas)):
                keys = {key.split(".", 1)[1]: key for key in f.keys() if key.startswith(f"{i}.")}
                if out and set(keys) != set(out):
                    raise ValueError(f"{snap.path} track {i} holds other parameters than {used[0].path}")
                for name, key in keys.items():
                    out[name] = out.get(name, 0) + float(x[k]) * f.get_tensor(key).double()
                k += 1
            buffers = {key.split(".", 1)[1]: f.get_tensor(key) for key in f.keys() if key.startswith("buffers.")}
        if on_snapshot is not None:
            on_snapshot(done, len(used))
    return {n: v.float() for n, v in out.items()} | buffers


