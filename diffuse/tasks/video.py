"""Sampling video tasks with any sampler: frames given, frames generated, and videos longer than the model.

A video x is (B, C, F, H, W); `observed` (B, F) bool says which frames are given (x^a, clean) and which are generated
(x^b). Three ways to sample x^b given x^a, each composed with the sampling walk only through the denoiser, the start
or the projection after each step (docs/architecture.md), so each runs with every sampler and process:

    masked conditioning  (Harvey et al. 2022, FDM; Hoppe et al. 2022, RaMViD): a network trained with some frames given
                         clean and an `observed` channel. `ObservedFrames` calls it with x_in = where(observed, x^a, x_t)
                         (`condition_frames`, the convention training uses too) and returns x_0 = x^a on the observed
                         frames, so the sampler's own x_t there never reaches the network.
    replacement          (Ho et al. 2022, sec. 3.1, the baseline; RePaint without resampling): a model of the joint
                         (x^a, x^b) trained without conditioning; after every step z_s^a is overwritten by a draw of
                         q(z_s^a | x^a) (tasks.editing.inpaint_projection over frames). Known to be incoherent: x^b
                         follows x^a too weakly (measured in tests/test_video_tasks.py).
    reconstruction       (Ho et al. 2022, sec. 3.1, eq. 7): the same joint model, with
      guidance               x~^b(z_t) = x^^b(z_t) - (w_r alpha_t / 2) grad_{z_t^b} ||x^a - x^^a(z_t)||^2,
                         the gradient taken through the denoiser (`ReconstructionGuidance`), plus the replacement of
                         z_t^a (exact: z_t^a = alpha_t x^a + sigma_t eps^a is independent of x^b given x^a).

Long videos (Harvey et al. 2022, FDM `sampling_schemes.py`): a scheme is a list of stages (obs_indices,
latent_indices) of at most F_model frames each (`autoregressive`, `hierarchy_2`), each conditioned on at most
max_observed done frames, the nearest (`nearest_done`; a masked model's video.max_observed: training never gave it
more; None, no cap, for replacement or reconstruction guidance, which have no observed channel); `sample_long` runs
each stage with the masked-conditioning model, telling the network the stage's frame_index so it sees the frames' spacing
(`relative_frame_index`: the positions less the stage's first, as training with video.max_span gives them).
`sample_stages` runs any such plan around given frames anywhere: prediction of a long video is the given first frames
then a scheme's stages; interpolation of a long video is `interpolation_stages` (each gap filled from both sides).

SDEdit of a video (Meng et al. 2022, `sdedit_video`): the whole video noised to t0, x_t0 = alpha_t0 x_0 + sigma_t0 eps,
then denoised, as tasks.editing.sdedit does an image.
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Iterator

import torch
from torch import Tensor

from ..denoiser import Prediction, scales, x0_to_eps
from ..generate import chunk_seed, generate
from ..guidance import SelfConditioning, x0_loss_grad
from ..samplers.base import Project
from ..schedule import NoiseSchedule
from .editing import inpaint_projection, sdedit_checked

Stage = tuple[list[int], list[int]]  # (obs_indices, latent_indices) of one stage of a long video, each sorted


# --- frames given and generated -----------------------------------------------------------------------------------
def check_video(video: Tensor, name: str = "the video") -> None:
    """A video batch: a finite float tensor (B, C, F, H, W). ValueError naming the shape otherwise."""
    if not isinstance(video, Tensor) or video.ndim != 5 or not video.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (batch, channels, frames, height, width), got "
                         f"{getattr(video, 'dtype', type(video).__name__)} {tuple(getattr(video, 'shape', ()))}")
    if not bool(torch.isfinite(video).all()):
        raise ValueError(f"{name} holds NaN or infinite values")


def check_observed(observed, video: Tensor, *, some: bool = True) -> Tensor:
    """The observed frames of video (B, C, F, H, W) as a (B, F) bool tensor on its device: observed may be (F,) (the same
    frames for every video) or (B, F), bool or 0/1. ValueError for another shape or value; for no frame observed when
    `some` (that is unconditional sampling: `generate`), for every frame observed (nothing to generate)."""
    B, F = video.shape[0], video.shape[2]
    m = torch.as_tensor(observed, device=video.device)
    if m.ndim == 1:
        m = m.expand(B, -1)
    if tuple(m.shape) != (B, F):
        raise ValueError(f"observed must say for each of the {F} frames whether it is given, shape ({F},) or ({B}, {F}), "
                         f"got {tuple(torch.as_tensor(observed).shape)}")
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("observed must be bool or hold only 0 (generate the frame) and 1 (the frame is given)")
        m = m == 1
    if some and not bool(m.any(1).all()):
        raise ValueError("observed gives no frame of some video: that is unconditional sampling (generate, `diffuse "
                         "sample`); mark the given frames True")
    if bool(m.all(1).any()):
        raise ValueError("observed gives every frame of some video: nothing to generate; mark the frames to generate False")
    return m


def condition_frames(x_t: Tensor, x_obs: Tensor, observed: Tensor) -> Tensor:
    """where(observed, x_obs, x_t) over frames: x_t (B, C, F, H, W) with the observed frames (observed (B, F) bool)
    replaced by those of x_obs (B, C, F, H, W), clean. What a masked-conditioning network is given, in training
    (FDM's x = x_t (1 - obs) + x_0 obs) and in sampling alike."""
    return torch.where(observed[:, None, :, None, None].to(x_t.device), x_obs.to(x_t), x_t)


def _with_x0(x_t: Tensor, t, x0: Tensor, schedule, like: Prediction) -> Prediction:
    """A prediction with this x_0 and eps re-derived from x_t = alpha_t x_0 + sigma_t eps; like's learned variance."""
    alpha, sigma = scales(schedule, t, x_t)
    return Prediction(x0=x0, eps=x0_to_eps(x_t, x0, alpha, sigma), variance_mix=like.variance_mix)


def relative_frame_index(positions: Tensor) -> Tensor:
    """The network's frame_index of frames at `positions` (B, F) (sorted, the first the earliest): positions -
    positions[:, :1], so the first frame is 0. The one convention of training (kinds.video, video.max_span) and of
    `sample_stages`; the relative-position bias reads only differences (nets.blocks.frame_distance_features), so
    absolute positions give the same network output."""
    return positions - positions[:, :1]


def _rows(x_obs: Tensor, x_t: Tensor, what: str) -> None:
    if x_obs.shape != x_t.shape:
        raise ValueError(f"{what} was built for videos {tuple(x_obs.shape)} and called on {tuple(x_t.shape)}; build it "
                         "for the batch it samples (generate's n and shape)")


class ObservedFrames:
    """A masked-conditioning network's denoiser with its given frames bound (Harvey et al. 2022, FDM; Hoppe et al. 2022):
    each call passes x_in = condition_frames(x_t, x_obs, observed), cond observed (and the frames' frame_index, if
    given) to the network, and returns x_0 = x_obs on the observed frames with eps re-derived from the sampler's x_t,
    so every sampler walks the generated frames unchanged and its x_t on the observed frames never reaches the
    network. x_obs (B, C, F, H, W) (values on unobserved frames unused), observed (B, F) bool (check_observed),
    frame_index (B, F) the frames' positions in time (None: the network's default arange(F)). A network with
    self-conditioning gets its previous estimate (guidance.SelfConditioning) inside. ValueError for a network whose
    condition_spec takes no `observed` (not trained with model.video_observed: use replacement or reconstruction
    guidance)."""

    def __init__(self, denoiser, x_obs: Tensor, observed: Tensor, frame_index: Tensor | None = None):
        spec = getattr(getattr(denoiser, "net", None), "condition_spec", None)
        if spec is not None and not spec.observed:
            raise ValueError("this network was not trained with given frames (model.video_observed = false), so it has no "
                             "observed channel; sample with reconstruction guidance or replacement instead "
                             "(tasks.video.sample_reconstruction, sample_replacement)")
        self.schedule, self.bounded = denoiser.schedule, getattr(denoiser, "bounded", True)
        self.denoiser = SelfConditioning(denoiser) if spec is not None and spec.self_condition else denoiser
        self.x_obs, self.observed = x_obs, observed
        self.cond = {"observed": observed} if frame_index is None else {"observed": observed, "frame_index": frame_index}

    def __call__(self, x_t: Tensor, t, **cond) -> Prediction:
        _rows(self.x_obs, x_t, "ObservedFrames")
        cond = {**cond, **{k: v.to(x_t.device) for k, v in self.cond.items()}}
        pred = self.denoiser(condition_frames(x_t, self.x_obs, self.observed), t, **cond)
        return _with_x0(x_t, t, condition_frames(pred.x0, self.x_obs, self.observed), self.schedule, pred)


def sample_masked(denoiser, video: Tensor, observed, *, frame_index: Tensor | None = None, seed: int = 0,
                  device: str | torch.device = "cpu", **generate_kw) -> Tensor:
    """The generated frames of video (B, C, F, H, W) given its observed frames (observed (F,) or (B, F): prediction
    forward or backward, interpolation, or none given: unconditional generation) from a masked-conditioning network
    (`ObservedFrames`), by `generate` with any sampler; `generate_kw` as there (sampler, steps, clip, ...). Returns
    (B, C, F, H, W) with the observed frames exactly those of `video`. ValueError for a bad video or observed mask
    (every frame given) or a network without an observed channel."""
    check_video(video)
    video = video.to(device)
    m = check_observed(observed, video, some=False)
    den = ObservedFrames(denoiser, video, m, None if frame_index is None else torch.as_tensor(frame_index, device=device))
    x = generate(den, video.shape[0], tuple(video.shape[1:]), seed=seed, device=device, **generate_kw)
    return condition_frames(x, video, m)


# --- a model of the joint, trained without conditioning ---------------------------------------------------------------
def replacement_projection(schedule: NoiseSchedule, x_obs: Tensor, observed: Tensor, generator: torch.Generator) -> Project:
    """z_s <- z_s with its observed frames replaced by a draw of q(z_s^a | x^a) after every step (Ho et al. 2022, sec. 3.1,
    "replacement"): tasks.editing.inpaint_projection over frames, the video (B, C, F, H, W) read as images
    (B, C, F H, W) whose known rows are the observed frames' (observed (B, F) bool). At s = 0 the observed frames are
    x^a exactly."""
    B, C, F, H, W = x_obs.shape
    known = observed[:, None, :, None, None].expand(B, 1, F, H, W).reshape(B, 1, F * H, W)
    project = inpaint_projection(schedule, x_obs.reshape(B, C, F * H, W), known.float(), generator)

    def replace(z_s: Tensor, s: float) -> Tensor:
        return project(z_s.reshape(B, C, F * H, W), s).reshape(z_s.shape)

    return replace


def reconstruction_grad(denoiser, x_t: Tensor, t, x_obs: Tensor, observed: Tensor, **cond) -> tuple[Prediction, Tensor]:
    """The denoiser's prediction at z_t (B, C, F, H, W) and grad_{z_t} ||x^a - x^^a(z_t)||^2, the squared error of its x_0
    on the observed frames (observed (B, F) bool), each video's own, the gradient through the denoiser (autograd)."""
    a = observed[:, None, :, None, None].to(x_t)

    def error(x0: Tensor, _t: Tensor) -> Tensor:  # (B,): each video's squared error on its observed frames
        return ((x_obs.to(x0) - x0) ** 2 * a).flatten(1).sum(1)

    return x0_loss_grad(denoiser, x_t, t, error, **cond)


class ReconstructionGuidance:
    """Reconstruction guidance (Ho et al. 2022, "Video Diffusion Models", sec. 3.1, eq. 7) of a model of the joint
    (x^a, x^b) trained without conditioning, towards the observed frames x^a:
        x~^b(z_t) = x^^b(z_t) - (w_r alpha_t / 2) grad_{z_t^b} ||x^a - x^^a(z_t)||^2,
    the gradient through the denoiser. It is E[x^b | z_t, x^a] = E[x^b | z_t] + (sigma_t^2 / alpha_t) grad_{z_t^b} log
    q(x^a | z_t) with q(x^a | z_t) ~= N(x^^a(z_t), (sigma_t^2 / alpha_t^2) I), times w_r (the paper takes w_r > 1). In
    eps terms (x_0 = (z_t - sigma_t eps) / alpha_t at a fixed z_t): eps~^b = eps^^b + (w_r alpha_t^2 / (2 sigma_t))
    grad, i.e. the score gains w_r grad_{z_t^b} log N(x^a; x^^a(z_t), (sigma_t^2 / alpha_t^2) I), as classifier
    guidance gains s grad log p(y | z_t). On the observed frames x_0 = x^a (with the replacement of z_t^a,
    `sample_reconstruction`, eps there is then the noise z_t^a was drawn with). x_obs (B, C, F, H, W), observed (B, F)
    bool, weight w_r >= 0 (0: the replacement method alone). ValueError for a negative or non-finite weight."""

    def __init__(self, denoiser, x_obs: Tensor, observed: Tensor, weight: float):
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"the reconstruction guidance weight w_r must be a finite number >= 0 (Ho et al. 2022 take "
                             f"w_r > 1; 0 is the replacement method alone), got {weight!r}")
        self.denoiser, self.schedule, self.bounded = denoiser, denoiser.schedule, getattr(denoiser, "bounded", True)
        self.x_obs, self.observed, self.weight = x_obs, observed, float(weight)

    def __call__(self, x_t: Tensor, t, **cond) -> Prediction:
        _rows(self.x_obs, x_t, "ReconstructionGuidance")
        if self.weight == 0:
            pred = self.denoiser(x_t, t, **cond)
            return _with_x0(x_t, t, condition_frames(pred.x0, self.x_obs, self.observed), self.schedule, pred)
        pred, grad = reconstruction_grad(self.denoiser, x_t, t, self.x_obs, self.observed, **cond)
        alpha, _ = scales(self.schedule, t, x_t)
        x0_b = pred.x0 - (self.weight * alpha / 2) * grad  # eq. 7; only x0 on z^b is kept below
        return _with_x0(x_t, t, condition_frames(x0_b, self.x_obs, self.observed), self.schedule, pred)


def _joint_sample(denoiser, video: Tensor, observed, weight: float, seed: int, device, generate_kw: dict) -> Tensor:
    check_video(video)
    video = video.to(device)
    m = check_observed(observed, video)
    g = torch.Generator(device).manual_seed(seed + 1)  # z^a's noise: its own stream, after x_T's (as tasks.editing)
    project = replacement_projection(denoiser.schedule, video, m, g)
    den = ReconstructionGuidance(denoiser, video, m, weight)
    x = generate(den, video.shape[0], tuple(video.shape[1:]), seed=seed, device=device, project=project, **generate_kw)
    return condition_frames(x, video, m)


def sample_replacement(denoiser, video: Tensor, observed, *, seed: int = 0, device: str | torch.device = "cpu",
                       **generate_kw) -> Tensor:
    """The generated frames of video (B, C, F, H, W) given its observed frames (observed (F,) or (B, F)) from a model of
    the joint trained without conditioning, by the replacement method (Ho et al. 2022, sec. 3.1: z_s^a overwritten by a
    draw of q(z_s^a | x^a) after every step; RePaint without resampling), any sampler (`generate_kw`). The baseline:
    its x^b follows x^a too weakly. Returns (B, C, F, H, W), the observed frames exactly `video`'s. ValueError for a bad
    video or observed mask (none or every frame given)."""
    return _joint_sample(denoiser, video, observed, 0.0, seed, device, generate_kw)


def sample_reconstruction(denoiser, video: Tensor, observed, weight: float = 2.0, *, seed: int = 0,
                          device: str | torch.device = "cpu", **generate_kw) -> Tensor:
    """The generated frames of video (B, C, F, H, W) given its observed frames from a model of the joint trained without
    conditioning, by reconstruction guidance of weight w_r (`ReconstructionGuidance`, Ho et al. 2022 eq. 7) with the
    replacement of z^a, any sampler (`generate_kw`; the gradient costs one backward pass through the network a step).
    Returns (B, C, F, H, W), the observed frames exactly `video`'s. ValueError for a bad video, observed mask or weight."""
    return _joint_sample(denoiser, video, observed, weight, seed, device, generate_kw)


# --- long videos: FDM's sampling schemes -----------------------------------------------------------------------------
def _check_scheme(frames: int, total: int, observed_first: int, step: int) -> None:
    if not (isinstance(frames, int) and frames >= 2):
        raise ValueError(f"the model's frame count F_model must be an integer >= 2, got {frames!r}")
    if not (isinstance(total, int) and total >= 1):
        raise ValueError(f"the video length must be an integer >= 1, got {total!r}")
    if not (isinstance(observed_first, int) and 0 <= observed_first < total):
        raise ValueError(f"the observed first frames must number 0..{total - 1} (fewer than the video's {total}), got "
                         f"{observed_first!r}")
    if not (isinstance(step, int) and 1 <= step < frames):
        raise ValueError(f"the frames generated per stage (step) must be 1..{frames - 1}, fewer than the model's "
                         f"{frames} so that each stage conditions on done frames, got {step!r}")


def _check_cap(max_observed: int | None, frames: int, both_sides: bool, what: str) -> int:
    """The most frames a stage conditions on: max_observed (1..F_model - 1; at least 2 when each stage conditions on a
    frame on each side), or F_model - 1 when None (no cap)."""
    if max_observed is None:
        return frames - 1
    low = 2 if both_sides else 1
    if not (isinstance(max_observed, int) and low <= max_observed < frames):
        need = " (a frame before and one after each gap)" if both_sides else ""
        raise ValueError(f"{what}: max_observed, the most given frames the model was trained with (video.max_observed), "
                         f"must be {low}..{frames - 1}{need}, got {max_observed!r}" +
                         ("; use the autoregressive scheme" if both_sides and max_observed == 1 else ""))
    return max_observed


def nearest_done(done, latent: list[int], room: int) -> list[int]:
    """The done frames a stage generating `latent` (sorted) conditions on: up to `room` of them, the nearest (FDM
    conditions each stage on the done frames nearest it, Harvey et al. 2022): first the nearest done frame before the
    stage and the nearest after it (each that exists; the one before when room is 1), then the others by their
    distance to the stage's nearer end (the earlier on a tie). Sorted."""
    before = [i for i in done if i < latent[0]]
    after = [i for i in done if i > latent[-1]]
    first = ([max(before)] if before else []) + ([min(after)] if after else [])
    rest = sorted((set(before) | set(after)) - set(first), key=lambda i: (min(abs(i - latent[0]), abs(i - latent[-1])), i))
    return sorted((first + rest)[:max(room, 0)])


def autoregressive(frames: int, total: int, observed_first: int = 0, step: int | None = None, *,
                   max_observed: int | None = None) -> Iterator[Stage]:
    """FDM's `Autoregressive` scheme (Harvey et al. 2022): a video of `total` frames from a model of `frames` (F_model)
    frames, the first `observed_first` given. Each stage conditions on the last frames - step frames done and generates
    the next `step` (default F_model / 2); with none given the first stage generates F_model frames from nothing.
    `max_observed` caps the frames a stage conditions on (the last ones, the nearest): a masked-conditioning model
    trained with at most video.max_observed given frames never saw more; None (no cap) for a model without an observed
    channel (replacement or reconstruction guidance have no indicator and no limit). Yields (obs_indices,
    latent_indices) sorted, at most F_model frames and at most max_observed obs per stage, every frame after the given
    ones latent exactly once. ValueError for sizes that do not fit (step must be 1..F_model - 1, max_observed
    1..F_model - 1)."""
    step = frames // 2 if step is None else step
    _check_scheme(frames, total, observed_first, step)
    cap = _check_cap(max_observed, frames, False, "autoregressive")
    done = observed_first
    if done == 0:
        done = min(frames, total)
        yield [], list(range(done))
    while done < total:
        obs = list(range(max(0, done - min(frames - step, cap)), done))
        latent = list(range(done, min(done + step, total)))
        yield obs, latent
        done = latent[-1] + 1


def hierarchy_2(frames: int, total: int, observed_first: int = 0, step: int | None = None, *,
                max_observed: int | None = None) -> Iterator[Stage]:
    """FDM's two-level hierarchy (`hierarchy-2`, Harvey et al. 2022): level 1 conditions on (the last F_model / 2 of)
    the given first frames and generates the rest of the stage's F_model frames spread evenly over the whole video,
    its last frame included (with none given, from frame 0 to the last); level 2 fills each gap between done frames,
    `step` frames at a time (default F_model / 2), conditioning on the nearest done frames before and after (alternately,
    up to F_model in all, at least one on each side; FDM spaces level 2's frames by a power law, here each gap is filled
    in order, which is the same when a gap fits one stage). `max_observed` caps the frames any stage conditions on (the
    nearest: level 1 the last given ones, level 2 the nearest on each side), as `autoregressive`'s; at least 2.
    Yields (obs_indices, latent_indices) sorted, at most F_model frames and at most max_observed obs per stage, every
    frame after the given ones latent exactly once. ValueError for sizes that do not fit."""
    step = frames // 2 if step is None else step
    _check_scheme(frames, total, observed_first, step)
    if step > frames - 2:
        raise ValueError(f"hierarchy-2 conditions each gap on a frame before and one after it, so it generates at most "
                         f"F_model - 2 = {frames - 2} frames per stage; got step {step}")
    cap = _check_cap(max_observed, frames, True, "hierarchy-2")
    obs = list(range(max(0, observed_first - min(frames // 2, cap)), observed_first))
    free = list(range(observed_first, total))
    k = min(frames - len(obs), len(free))
    picks = sorted({free[round(i * (len(free) - 1) / max(k - 1, 1))] for i in range(k)})  # free[0] .. free[-1]
    done = set(range(observed_first)) | set(picks)
    yield obs, picks
    while len(done) < total:
        start = min(i for i in range(total) if i not in done)
        gap_end = min((i for i in range(start, total) if i in done), default=total)
        latent = list(range(start, min(start + step, gap_end)))
        yield nearest_done(done, latent, min(frames - len(latent), cap)), latent
        done |= set(latent)


SCHEMES = {"autoregressive": autoregressive, "hierarchy-2": hierarchy_2}
"""The long-video sampling schemes by name (FDM's names)."""


def interpolation_stages(frames: int, total: int, given, step: int | None = None, *,
                         max_observed: int | None = None) -> list[Stage]:
    """The stages of an interpolation longer than the model: a video of `total` frames whose frames `given` are kept,
    from a masked-conditioning model of `frames` (F_model) frames, in stages (obs_indices, latent_indices) as FDM's
    schemes (Harvey et al. 2022), for `sample_stages`. While frames are missing, the leftmost gap with done frames
    on both sides is filled first: all of it when it has at most `step` frames (default F_model / 2), else `step`
    frames spread evenly inside it (hierarchy-2's level 1 within the gap), so the next stages fill shorter gaps; each
    such stage conditions on the nearest done frames before and after it, alternately, up to F_model frames in all
    (at least one on each side). Then the frames before the first given one and after the last (no done frame beyond
    them) continue outwards `step` at a time from the nearest done frames, as `autoregressive`. Every missing frame
    is latent exactly once, every stage has at most F_model frames and conditions only on frames done before it (for
    a Gaussian video whose frames are Markov in time, e.g. Sigma_ij = rho^|i - j|, the nearest done frame on each
    side is all the conditional needs, so the stages sample the exact conditional of the missing frames given the
    given ones). `given` the kept frames' indices (some, not every frame, each in 0..total - 1 once). `max_observed`
    caps the frames a stage conditions on (the nearest on each side, `nearest_done`), as `autoregressive`'s: the run's
    video.max_observed for a masked-conditioning model; at least 2. ValueError for sizes that do not fit (F_model >= 3:
    one frame on each side and one generated; step 1..F_model - 2)."""
    given = [operator.index(i) for i in given]
    if not (isinstance(frames, int) and frames >= 3):
        raise ValueError(f"interpolation in stages conditions each stage on a frame before and one after the frames it "
                         f"generates, so the model needs F_model >= 3 frames; got {frames!r}")
    step = frames // 2 if step is None else step
    if not (isinstance(total, int) and total >= 2):
        raise ValueError(f"the video length must be an integer >= 2, got {total!r}")
    if not (isinstance(step, int) and 1 <= step <= frames - 2):
        raise ValueError(f"the frames generated per stage (step) must be 1..{frames - 2} (F_model - 2, leaving a frame on "
                         f"each side), got {step!r}")
    cap = _check_cap(max_observed, frames, True, "interpolation in stages")
    done = set(given)
    if len(done) != len(given) or not done or not done < set(range(total)):
        raise ValueError(f"the given frames must be distinct indices in 0..{total - 1}, some but not all of the {total}; "
                         f"got {sorted(given)}")
    stages: list[Stage] = []
    while len(done) < total:
        missing = [i for i in range(total) if i not in done]
        inner = [i for i in missing if min(done) < i < max(done)]
        if inner:  # the leftmost gap between done frames: [s, e]
            s = inner[0]
            e = min(i for i in done if i > s) - 1
            L = e - s + 1
            latent = list(range(s, e + 1)) if L <= step else \
                [s - 1 + round((i + 1) * (L + 1) / (step + 1)) for i in range(step)]  # spread evenly, distinct
        elif missing[-1] > max(done):  # after the last done frame, onwards
            latent = list(range(max(done) + 1, min(max(done) + 1 + step, total)))
        else:  # before the first done frame, backwards
            latent = list(range(max(0, min(done) - step), min(done)))
        stages.append((nearest_done(done, latent, min(frames - len(latent), cap)), latent))
        done |= set(latent)
    return stages


def stage_span(stage: Stage) -> int:
    """The frames a stage (obs_indices, latent_indices) spreads over: last - first + 1."""
    idx = stage[0] + stage[1]
    return max(idx) - min(idx) + 1


def warn_span(stages, span: int | None) -> None:
    """A UserWarning when some stage spreads over more than `span` frames (the frames a run was trained on, max(
    video.max_span, data.frames); None: no check): its network never saw frames that far apart (FDM trains on spans
    covering the longest video it samples, Harvey et al. 2022)."""
    if span is None:
        return
    wide = [stage_span(st) for st in stages if stage_span(st) > span]
    if wide:
        warnings.warn(f"{len(wide)} of the {len(stages)} stages spread over up to {max(wide)} frames, more than the {span} "
                      "the run was trained on (max(video.max_span, data.frames)); the network never saw frames that far "
                      "apart, expect worse videos: ask for fewer frames, or train with video.max_span covering them",
                      UserWarning, stacklevel=3)


def sample_stages(denoiser, scheme, video: Tensor, given=(), *, frames: int | None = None,
                  max_observed: int | None = None, span: int | None = None, seed: int = 0,
                  device: str | torch.device = "cpu", **generate_kw) -> Tensor:
    """A video longer than the model in stages around given frames: video (B, C, T, H, W) holds the frames `given`
    (indices, kept exactly; the rest are overwritten); `scheme` is an iterable of stages (obs_indices, latent_indices)
    (`autoregressive`, `hierarchy_2` with observed_first, `interpolation_stages`). Each stage takes its frames
    idx = sorted(obs + latent), runs `sample_masked` on video[:, :, idx] with the obs frames given and frame_index =
    relative_frame_index(idx) = idx - idx[0] (the network sees their spacing, as video.max_span trains it), with seed chunk_seed(seed, stage), and writes its latent frames back.
    `generate_kw` as `generate`. Returns (B, C, T, H, W), the given frames exactly `video`'s. ValueError, before any
    sampling, for a given frame out of range, a stage with more than `frames` (F_model, if given) frames or more obs
    frames than `max_observed` (the run's video.max_observed, if given: training never gave more), one that
    conditions on a frame not yet done or generates one already done or out of range, or a scheme that leaves a frame
    undone. A UserWarning when a stage's frames spread over more than `span` (if given: the frames the run was trained
    on, max(video.max_span, data.frames)): the network never saw frames that far apart."""
    check_video(video)
    T = video.shape[2]
    given = [operator.index(i) for i in given]
    done = set(given)
    if len(done) != len(given) or not all(0 <= i < T for i in given):
        raise ValueError(f"the given frames must be distinct indices in 0..{T - 1} of the video's {T}, got {given}")
    stages = [(list(map(int, o)), list(map(int, lat))) for o, lat in scheme]
    for k, (obs, latent) in enumerate(stages):
        idx = obs + latent
        if not latent or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= T:
            raise ValueError(f"stage {k} of the scheme, obs {obs} latent {latent}, must generate some frames, name no frame "
                             f"twice and only frames 0..{T - 1}")
        if frames is not None and len(idx) > frames:
            raise ValueError(f"stage {k} of the scheme takes {len(idx)} frames, more than the model's {frames}")
        if max_observed is not None and len(obs) > max_observed:
            raise ValueError(f"stage {k} of the scheme conditions on {len(obs)} frames, more than the {max_observed} the "
                             "model was trained with (video.max_observed); pass max_observed to the scheme")
        if not set(obs) <= done or set(latent) & done:
            raise ValueError(f"stage {k} of the scheme conditions on frames not yet done {sorted(set(obs) - done)} or "
                             f"generates frames already done {sorted(set(latent) & done)}")
        done |= set(latent)
    if done != set(range(T)):
        raise ValueError(f"the scheme leaves frames {sorted(set(range(T)) - done)} of the {T} undone")
    warn_span(stages, span)
    out = video.to(device).clone()
    B = out.shape[0]
    for k, (obs, latent) in enumerate(stages):
        idx = sorted(obs + latent)
        observed = torch.tensor([i in obs for i in idx], device=device)
        frame_index = relative_frame_index(torch.tensor(idx, device=device).expand(B, -1))
        part = sample_masked(denoiser, out[:, :, idx], observed, frame_index=frame_index, seed=chunk_seed(seed, k),
                             device=device, **generate_kw)
        out[:, :, idx] = part
    return out


def sample_long(denoiser, scheme, video: Tensor, observed_first: int = 0, *, frames: int | None = None,
                max_observed: int | None = None, span: int | None = None, seed: int = 0,
                device: str | torch.device = "cpu", **generate_kw) -> Tensor:
    """A video longer than the model: video (B, C, T, H, W) holds the first `observed_first` frames (the rest are
    overwritten); `scheme` is an iterable of stages (obs_indices, latent_indices) (`autoregressive`, `hierarchy_2`),
    run by `sample_stages` with the first `observed_first` frames given. Returns (B, C, T, H, W). ValueError, before
    any sampling, as there, or for observed_first outside 0..T - 1."""
    check_video(video)
    T = video.shape[2]
    if not (isinstance(observed_first, int) and 0 <= observed_first < T):
        raise ValueError(f"observed_first must be 0..{T - 1}, the number of the video's first frames given, got {observed_first!r}")
    return sample_stages(denoiser, scheme, video, tuple(range(observed_first)), frames=frames, max_observed=max_observed,
                         span=span, seed=seed, device=device, **generate_kw)


# --- SDEdit of a video --------------------------------------------------------------------------------------------------
def sdedit_video(denoiser, video: Tensor, strength: float, *, seed: int = 0, device: str | torch.device = "cpu",
                 **generate_kw) -> Tensor:
    """SDEdit of videos (Meng et al. 2022, Algorithm 1; tasks.editing.sdedit for images): video (B, C, F, H, W) in
    [-1, 1], every frame noised to t0 = editing.sdedit_time(schedule, strength) (sigma/alpha = strength / (1 - strength)
    on every process) by x_t0 = alpha_t0 x_0 + sigma_t0 eps with one eps per video (generate's first draw of `seed`),
    then denoised by `generate` from (x_t0, t0) with any sampler (`generate_kw`). strength 0 returns the video, 1 is
    unconditional sampling of the same seed. A masked-conditioning network needs cond observed all False (its
    unconditional mode) in generate_kw. Returns (B, C, F, H, W). ValueError for a bad video (check_video, or values
    outside [-1, 1]) or a strength outside [0, 1]."""
    check_video(video)
    lo, hi = float(video.min()), float(video.max())
    if lo < -1 - 1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"the video must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; rescale it (x * 2 - 1 for "
                         "[0, 1] frames, x / 127.5 - 1 for 0..255)")
    return sdedit_checked(denoiser, video, strength, seed=seed, device=device, **generate_kw)
