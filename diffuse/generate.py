"""Sampling: `generate` draws samples from any denoiser with a named sampler, classifier-free or classifier guidance,
thresholding, a start partway down the grid (SDEdit) and a projection after each step; `generate_in_chunks` draws many
in chunks with their own seeds. Nothing here knows what kind of run made the denoiser (runs.py opens runs).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from .guidance import (ClassifierFreeGuidance, ClassifierGuidance, ClipX0, Conditioned, DynamicThreshold, SelfConditioning,
                       SplitCalls)
from .precision import autocast_dtype
from .samplers import SAMPLERS, NonFiniteSample, Step, ddim


@torch.no_grad()
def generate(denoiser, n: int, shape: tuple[int, ...], *, sampler: str = "ddim", steps: int | None = 50,
             spacing: str | None = None, clip: bool | None = None, dynamic_threshold: float = 0.0, labels: Tensor | None = None,
             cond: dict | None = None, uncond: dict | None = None, guidance: float = 0.0, classifier=None, seed: int = 0,
             device: str | torch.device = "cpu", callback=None, start: tuple[Tensor, float] | None = None, project=None,
             grid: Tensor | None = None, guidance_interval: tuple[float, float] | None = None, mixed_precision: str = "no",
             guide=None, **options) -> Tensor:
    """Draw n samples of `shape` ((C, H, W) images, or any rank) with a named sampler; x_T and all noise from `seed`.

    steps = None or 0 is every step of the schedule (0 means this in every command and config); spacing None is the
    process's own default (`NoiseSchedule.default_spacing`: trailing, karras for EDM).

    `cond` is a condition dict (condition.py) of the network, each value batched (n, ...); `labels` (n,) (or one
    label for all) is short for cond["label"]. Guidance w > 0 applies classifier-free guidance of cond against
    `uncond` (every key of cond that uncond does not give at its null value, the network's `condition_spec.null`; a
    negative prompt gives "text" and leaves a label null), or, with
    `classifier` (x_t, model_time) -> logits, classifier guidance towards `labels` at scale w (the denoiser may then
    be unconditional). `guidance_interval` (lo, hi) limits classifier-free guidance to the noise levels
    sigma_t / alpha_t in (lo, hi] (Kynkaanniemi et al. 2024), which also saves the unconditional call outside it. The guided x_0 is
    dynamically thresholded at percentile `dynamic_threshold` if > 0, else clipped to [-1, 1] if `clip` (None: if the
    denoiser's data are bounded, `Denoiser.bounded`, i.e. images and not latents; ValueError for clipping or
    thresholding an unbounded denoiser's x_0). `guide` ((denoiser, seed) -> denoiser), if given, wraps the conditioned
    and guided denoiser inside the thresholding: CLIP guidance (guidance.NoisyClipGuidance, ClipX0Guidance) or any
    wrapper; it gets this draw's `seed`, so a wrapper that draws (ClipX0Guidance's cutouts) draws anew for each chunk
    of `generate_in_chunks` and one chunk drawn alone repeats.
    `mixed_precision` ("no", "auto", "bf16", "fp16"; `autocast_dtype`) runs the network's convolutions and matrix
    products under torch.autocast while the sampler's own arithmetic and the returned samples stay float32: on a CPU
    with native bf16 the demo network samples 1.6-1.9x faster, and its samples agree with float32 ones to about
    1e-3 in mean absolute value (bench/RESULTS.md "CPU budget"; a test). "no" (the default here) is plain float32;
    a run's sample.mixed_precision ("auto" by default) is what the CLI and the web page pass.
    `options` are sampler options (eta, variance, s_churn, ...), checked (samplers.OPTIONS); those the
    sampler does not take are ignored, so a config's defaults can be passed to any sampler.

    `start` = (x_start (n, C, H, W), t_start in [0, 1]) runs only the part of the grid below t_start, from
    x_start at t_start (SDEdit: x_start a draw of q(x_t_start | x_0) of a guide image); t_start = 0 returns
    x_start, t_start at or above the grid's top is an ordinary run from x_start. `project(x_s, s) -> x_s` is
    applied after every step (inpainting, RePaint, ILVR; see samplers.base.walk). `grid` replaces the grid of `steps`
    and `spacing` with explicit times (decreasing to 0, with jumps back up allowed: RePaint's resampling). The noise drawn for x_T is
    drawn either way, so a run with a start uses the same noise stream as one without.

    Raises ValueError for a bad sampler, option, guidance weight, label set or condition; NonFiniteSample, naming the
    step, as soon as the samples become NaN or infinite. A grid that does not start at the top of the
    schedule ("leading" with few steps) gives a warning that says how much signal the start lacks.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    amp = autocast_dtype(mixed_precision, device)
    if not (0 <= guidance < math.inf):
        raise ValueError(f"the guidance weight must be a finite number >= 0, got {guidance}")
    info = SAMPLERS[sampler]
    kw = info.check_options(options)
    # an adaptive solver takes only the ends of its grid: from the top to the first step, then the x_0 prediction
    schedule = denoiser.schedule
    info.check_schedule(schedule, sampler)
    if grid is not None:  # an explicit grid, which may step back up (RePaint's resampling)
        if info.calls_per_step == 0:
            raise ValueError(f"{sampler} is an adaptive solver that picks its own steps; it takes no grid (use another sampler)")
        grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
    else:
        spacing = spacing or schedule.default_spacing
        grid = schedule.grid(2, "linspace") if info.calls_per_step == 0 else sampling_grid(schedule, steps, spacing)
        last = float(schedule.ve_sigma(grid[-2:-1])[0])  # the noise level of the final x_0 prediction
        if len(grid) > 10 and last > 0.5:
            warnings.warn(f"the {spacing} grid of {len(grid) - 1} steps on the {schedule.kind} process ends at noise level "
                          f"sigma/alpha = {last:.3g}, so its final x_0 prediction is blurred; use spacing "
                          f"{'karras' if schedule.kind == 'edm' else 'log_snr'} (or more steps)", UserWarning, stacklevel=2)
    shortfall = schedule.start_shortfall(grid)
    if shortfall > 0.01 and start is None:  # a partial run (SDEdit) starts below the top on purpose
        warnings.warn(f"the {spacing} grid of {len(grid) - 1} step(s) starts at step {round(float(grid[0]) * schedule.T)} of "
                      f"{schedule.T}, not at the top ({round(schedule.t_top * schedule.T)}): x_t there holds alpha_t - alpha_top = "
                      f"{shortfall:.2g} more of the data than the start x_T ~ N(0, I) has, so the samples come out "
                      "noisy; use spacing trailing (the default), which starts at the top for any step count",
                      UserWarning, stacklevel=2)
    if start is not None:
        x_start, t_start = start
        if not 0 <= t_start <= 1:
            raise ValueError(f"t_start must lie in [0, 1], got {t_start}")
        if tuple(x_start.shape) != (n, *shape):
            raise ValueError(f"x_start must have shape {(n, *shape)} (n, *shape), got {tuple(x_start.shape)}")
        if t_start == 0:
            grid = grid.new_zeros(1)  # no move: x_start is returned
        elif t_start < float(grid[0]):  # the grid from its first time below t_start on (a grid with jumps keeps them)
            first = int(torch.nonzero(grid < t_start)[0])
            grid = torch.cat([grid.new_tensor([t_start]), grid[first:]])
    g = torch.Generator(device).manual_seed(seed)
    x_T = torch.randn((n, *shape), generator=g, device=device)
    if schedule.prior_std != 1.0:  # VE: x_T ~ N(0, sigma_max^2 I) (Karras et al. 2022, Algorithm 1, line 1)
        x_T = x_T * schedule.prior_std
    if start is not None:
        x_T = start[0].to(device=device, dtype=x_T.dtype)
    bounded = getattr(denoiser, "bounded", True)
    clip = bounded if clip is None else clip
    if not bounded and (clip or dynamic_threshold):
        raise ValueError("clip / dynamic_threshold hold x_0 to [-1, 1], and this denoiser's data (latents) have no such "
                         "range; pass clip=False and dynamic_threshold=0 (or leave clip out)")
    den = conditioned(denoiser, n, device, cond, uncond, labels, guidance, classifier, shape, guidance_interval)
    if guide is not None:
        den = guide(den, seed)
    if dynamic_threshold:
        den = DynamicThreshold(den, dynamic_threshold)
    elif clip:
        den = ClipX0(den)

    watch = FiniteWatch(sampler, callback, deferred=torch.device(device).type == "cuda")
    if project is not None:
        kw["project"] = project
    # autocast reaches only the network's convolutions and matrix products; x_t stays float32 and a float32 x_t
    # promotes the network's bf16 output back to float32 in the prediction, so the sampler steps in float32
    with torch.autocast(torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None):
        x = info(den, x_T, grid, generator=g, callback=watch, **kw).to(x_T.dtype)
    watch.close()
    return x


class FiniteWatch:
    """A sampler callback that stops at the first step whose x_s is NaN or infinite and says where, then passes each
    step on to `callback`. Eager (on a CPU, where reading a tensor costs nothing): it reads every step and raises at
    once. `deferred` (on a GPU, where a read waits for the device): it keeps the first bad step on the device and
    raises NonFiniteSample from `close()`, after the loop, with the same message; the host never waits in the loop."""

    def __init__(self, sampler: str, callback=None, *, deferred: bool = False):
        self.sampler, self.callback, self.deferred = sampler, callback, deferred
        self.steps: list[tuple[int, int, float, float]] = []  # deferred: (index, total, t, s) of each step seen
        self.first: Tensor | None = None   # deferred: the position in `steps` of the first bad step, -1 while none
        self.x0_bad: Tensor | None = None  # deferred: whether the x_0 prediction of that step was non-finite too

    def __call__(self, step: Step) -> None:
        bad = ~torch.isfinite(step.x_next).all()

        def x0_bad() -> Tensor:
            return ~torch.isfinite(step.x0).all() if step.x0 is not None else torch.zeros_like(bad)

        if not self.deferred:
            if bool(bad):
                self._raise(step.index, step.total, step.t, step.s, bool(x0_bad()))
        else:
            if self.first is None:
                self.first = torch.full((), -1, dtype=torch.long, device=bad.device)
                self.x0_bad = torch.zeros((), dtype=torch.bool, device=bad.device)
            new = (self.first < 0) & bad
            self.x0_bad = torch.where(new, x0_bad(), self.x0_bad)
            self.first = torch.where(new, torch.full_like(self.first, len(self.steps)), self.first)
            self.steps.append((step.index, step.total, step.t, step.s))
        if self.callback is not None:
            self.callback(step)

    def close(self) -> None:
        """Deferred: one read of the first bad step; raises NonFiniteSample if there was one."""
        if self.first is not None and (k := int(self.first)) >= 0:
            self._raise(*self.steps[k], bool(self.x0_bad))

    def _raise(self, index: int, total: int, t: float, s: float, x0_bad: bool):
        source = ("the denoiser's x_0 prediction there is already non-finite: check the run's weights (--no-ema, an "
                  "earlier checkpoint), or lower the guidance weight of a guided run" if x0_bad else
                  "the denoiser's x_0 prediction there is finite, the update overflowed: lower the guidance weight "
                  "or the sampler options")
        raise NonFiniteSample(f"{self.sampler}: the samples became non-finite at step {index + 1}"
                              f"{f' of {total}' if total else ''} (t = {t:.4g} -> {s:.4g}); {source}. Nothing was written")


def sampling_grid(schedule, steps: int | None, spacing: str | None) -> Tensor:
    """The grid `generate` walks for `steps` (None or 0: every step) and `spacing` (None: the process's default)."""
    return schedule.grid(steps or None, spacing or schedule.default_spacing)


@torch.no_grad()
def invert(denoiser, x0: Tensor, *, steps: int | None = 50, spacing: str | None = None, grid: Tensor | None = None,
           cond: dict | None = None, labels: Tensor | None = None, refine: int = 0, device: str | torch.device = "cpu",
           mixed_precision: str = "no", callback=None) -> Tensor:
    """x_T of the images x0 (n, ...) by DDIM inversion (samplers.ddim.invert) on the grid `generate` would walk for
    `steps` and `spacing` (or an explicit decreasing `grid`), under the condition `cond` (and `labels`) bound as
    `generate` binds it, without guidance or clipping (neither is invertible). `generate(..., sampler="ddim", eta=0,
    clip=False, start=(x_T, 1.0))` with the same grid and condition renders x0 back, with an error of O(1/steps)
    (less with `refine` fixed-point iterations). Returns x_T (n, ...) float32 on `device`. Raises ValueError for a
    bad grid, condition or refine; NonFiniteSample naming the move where x became NaN or infinite."""
    amp = autocast_dtype(mixed_precision, device)
    x0 = torch.as_tensor(x0).to(device=device, dtype=torch.float32)
    n = x0.shape[0]
    grid = sampling_grid(denoiser.schedule, steps, spacing) if grid is None else torch.as_tensor(grid, dtype=torch.float64)
    den = conditioned(denoiser, n, device, cond, None, labels, 0.0, None, tuple(x0.shape[1:]))
    with torch.autocast(torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None):
        return ddim.invert(den, x0, grid, refine=refine, callback=callback).to(torch.float32)


CHUNK = 128
"""Samples per chunk when `diffuse sample` and `eval` draw many (generate_in_chunks): on a 2-core CPU the demo network
runs several times faster on batches of 128-256 images than on one batch of 2,000, whose activations overflow the
caches (bench/RESULTS.md, issue 19). Classifier-free guidance doubles the batch it asks of the network; `generate` runs
it as two calls of the chunk (guidance.SplitCalls), so the network never sees more than a chunk at once."""


def chunk_seed(seed: int, k: int) -> int:
    """The seed of chunk k of a draw made in chunks (`generate_in_chunks`): chunk 0 keeps `seed`, so a draw that fits in
    one chunk is the draw `generate` makes; later chunks get independent seeds from numpy's SeedSequence of (seed, k)."""
    return seed if k == 0 else int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0] >> 1)


def generate_in_chunks(denoiser, n: int, shape: tuple[int, ...], *, chunk: int | None = None, seed: int = 0,
                       labels: Tensor | None = None, cond: dict | None = None, uncond: dict | None = None,
                       **kw) -> Tensor:
    """`generate` for n samples in chunks of at most `chunk` (None: all at once), so that 50,000 samples for a
    published FID fit in memory. Chunk k is drawn with seed `chunk_seed(seed, k)`; labels (n,) and each cond and
    uncond value (n, ...) are split alike. Returns (n, C, H, W) on the CPU. Raises ValueError for chunk < 1, and as `generate`."""
    chunk = n if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"the chunk size must be >= 1, got {chunk}")
    if labels is not None:
        labels = torch.as_tensor(labels).long().expand(n)
    out = []
    for k, lo in enumerate(range(0, n, chunk)):
        m = min(chunk, n - lo)
        part = {key: v[lo:lo + m] for key, v in (cond or {}).items()} or None
        null = None if uncond is None else {key: v[lo:lo + m] for key, v in uncond.items()}
        out.append(generate(denoiser, m, shape, seed=chunk_seed(seed, k), cond=part, uncond=null,
                            labels=None if labels is None else labels[lo:lo + m], **kw).cpu())
    return torch.cat(out)


def conditioned(denoiser, n: int, device, cond: dict | None, uncond: dict | None, labels, guidance: float, classifier,
                shape: tuple | None = None, interval: tuple[float, float] | None = None):
    """The denoiser with generate's condition bound, guided as asked (see `generate`)."""
    spec = getattr(getattr(denoiser, "net", None), "condition_spec", None)
    denoiser = SplitCalls(denoiser, n)  # innermost: guidance's doubled batch runs as two calls of n, faster on CPUs
    if spec is not None and spec.self_condition:  # each call passes the previous x_0 estimate (Chen et al. 2023)
        denoiser = SelfConditioning(denoiser)
    cond = dict(cond or {})
    if labels is not None:
        labels = torch.as_tensor(labels, device=device).long().expand(n)
        if spec is not None and spec.num_classes:
            cond["label"] = labels
        elif classifier is None:
            raise ValueError("labels were given but the model is not class-conditional (model.class_conditional = false)")
    cond = {k: torch.as_tensor(v, device=device) for k, v in cond.items()}
    for key, value in {**cond, **(uncond or {})}.items():
        if value.ndim == 0 or value.shape[0] != n:
            raise ValueError(f"condition {key!r} must hold one value per sample, shape ({n}, ...), got {tuple(value.shape)}")
    if spec is not None and shape is not None:  # once here, values included; the network checks shapes on every call
        spec.check(cond, torch.empty((n, *shape), device="meta"), values=True)
    if classifier is not None:
        if interval is not None:
            raise ValueError("a guidance interval limits classifier-free guidance; classifier guidance takes none (leave "
                             "--guidance-interval out)")
        if labels is None:
            raise ValueError("classifier guidance needs the labels to guide towards")
        return ClassifierGuidance(Conditioned(denoiser, **cond), classifier, labels, guidance)
    if not guidance:
        return Conditioned(denoiser, **cond)
    if not cond:
        raise ValueError("guidance needs a condition to guide towards (e.g. --label 7)")
    if uncond is None and spec is None:
        raise ValueError("classifier-free guidance of a network without a condition_spec needs uncond, the null condition")
    if spec is not None:  # every condition not given an unconditional value (a negative prompt) at its null
        uncond = {**spec.null(cond), **(uncond or {})}
    return ClassifierFreeGuidance(denoiser, guidance, cond, {k: torch.as_tensor(v, device=device) for k, v in uncond.items()},
                                  interval)


def default_labels(n: int, num_classes: int) -> Tensor | None:
    """The labels of n samples from a model with num_classes classes: every class in turn (0, 1, ..., 0, ...); None
    for an unconditional model."""
    return torch.arange(n) % num_classes if num_classes else None
