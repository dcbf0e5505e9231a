"""Video metrics: generated frames against the true ones, the digit kept, the known physics, and a Frechet distance of
videos (issue 35; the analogues of MCVD's and FDM's evaluations on moving digits, see the module of each function).

A module beside metrics.py, not a section of it: metrics.py compares two *sets of images* in a feature space; these
compare each generated video with *its own* ground truth (PSNR, SSIM, the trajectory of moving digits) or read a
video over time (the label kept, the per-video features). Videos are (B, C, F, H, W) in [-1, 1] as everywhere.

Which frames count: every per-frame score is averaged over the *generated* frames only (`generated` (F,) or (B, F)
bool, the complement of the observed mask of tasks.video), and PSNR pools the squared error over them before the log
(MCVD's); the given frames are copies of the truth and would only raise the score (MCVD's and FDM's protocol: scores
of the predicted frames).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch import Tensor, nn

from .data.video import Trajectory
from .metrics import extract_features, feature_statistics, frechet_distance

__all__ = ["frame_mse", "psnr", "ssim", "over_generated", "best_of_k", "digit_crops", "frame_labels", "identity_kept", "centre_of_mass",
           "glyph_centre", "true_centres", "trajectory_error", "acceleration", "video_features", "fd_digits_video"]

DATA_RANGE = 2.0  # videos in [-1, 1]


def _check_pair(fake: Tensor, real: Tensor) -> None:
    for name, v in (("generated", fake), ("true", real)):
        if not isinstance(v, Tensor) or v.ndim != 5:
            raise ValueError(f"the {name} videos must be a tensor (B, C, F, H, W), got "
                             f"{tuple(getattr(v, 'shape', ())) or type(v).__name__}")
    if fake.shape != real.shape:
        raise ValueError(f"generated videos {tuple(fake.shape)} and true videos {tuple(real.shape)} differ in shape; "
                         "compare each generated video with its own truth, frame by frame")


# --- frames against the truth (MCVD, Voleti et al. 2022, runners/ncsn_runner.py) -------------------------------------
def frame_mse(fake: Tensor, real: Tensor) -> Tensor:
    """Per-frame mean squared error, (B, F): the mean over (C, H, W) of frame f of fake (clipped to [-1, 1]) against
    real, both (B, C, F, H, W). ValueError for other shapes."""
    _check_pair(fake, real)
    return ((fake.detach().double().clamp(-1, 1) - real.detach().double()) ** 2).mean(dim=(1, 3, 4))


def psnr(fake: Tensor, real: Tensor, generated=None) -> Tensor:
    """PSNR of each video in dB, (B,), MCVD's (Voleti et al. 2022, runners/ncsn_runner.py): 10 log10(R^2 / MSE) with
    R = 2 (the range of [-1, 1]; MCVD's frames in [0, 1] with R = 1 give the same number) and MSE the mean squared
    error over the video's generated frames (`frame_mse` averaged over `generated` (F,) or (B, F) bool; None: every
    frame), fake clipped to [-1, 1]. Not the mean of per-frame PSNRs, which is never lower (Jensen: -log is convex)
    and +inf as soon as one frame is exact. +inf only for a video whose generated frames are all exact. ValueError for
    other shapes or a video without a generated frame."""
    mse = frame_mse(fake, real)
    mse = over_generated(mse, torch.ones(mse.shape[-1], dtype=torch.bool) if generated is None else generated)
    return 10 * torch.log10(DATA_RANGE ** 2 / mse)


SSIM_SIGMA = 1.5  # Wang et al. 2004's Gaussian window; skimage truncates it at 3.5 sigma: 11x11 pixels
SSIM_WINDOW = 11


def ssim(fake: Tensor, real: Tensor) -> Tensor:
    """Per-frame SSIM (Wang et al. 2004) in [-1, 1], (B, F), as MCVD computes it (Voleti et al. 2022,
    runners/ncsn_runner.py): scikit-image's structural_similarity with Gaussian weights (sigma 1.5, an 11x11 window),
    the population covariance (use_sample_covariance False) and K1 = 0.01, K2 = 0.03 (Wang et al.'s constants),
    data_range 2 (frames in [-1, 1]; the same number as [0, 1] frames with range 1), the channels of an RGB frame
    averaged, of frame f of fake (clipped) against real, (B, C, F, H, W); MCVD's per-video SSIM is its mean over the
    frames (`over_generated`). 1 for identical frames. ValueError for other shapes or frames under 11x11 pixels."""
    _check_pair(fake, real)
    if min(real.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM's Gaussian window (sigma {SSIM_SIGMA}, {SSIM_WINDOW}x{SSIM_WINDOW}) needs frames of at "
                         f"least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(real.shape[-2:])}")
    a = fake.detach().float().clamp(-1, 1).cpu().numpy()
    b = real.detach().float().cpu().numpy()
    B, C, F = real.shape[:3]
    out = torch.empty(B, F, dtype=torch.float64)
    for i in range(B):
        for f in range(F):
            out[i, f] = float(structural_similarity(a[i, :, f], b[i, :, f], data_range=DATA_RANGE, channel_axis=0,
                                                    gaussian_weights=True, sigma=SSIM_SIGMA, use_sample_covariance=False))
    return out


def over_generated(per_frame: Tensor, generated) -> Tensor:
    """The mean of per-frame scores (..., B, F) over the generated frames of each video -> (..., B). `generated` (F,)
    or (B, F) bool: True where the frame was generated (not given). ValueError when a video has no generated frame."""
    g = torch.as_tensor(generated, dtype=torch.bool)
    g = g.expand(per_frame.shape[-2:]) if g.ndim == 1 else g
    if g.shape != per_frame.shape[-2:]:
        raise ValueError(f"generated must be (F,) or (B, F) = {tuple(per_frame.shape[-2:])}, got {tuple(g.shape)}")
    if not bool(g.any(-1).all()):
        raise ValueError("some video has no generated frame: there is nothing to score; pass the frames the model wrote")
    g = g.to(per_frame.device)
    return torch.where(g, per_frame, torch.zeros_like(per_frame)).sum(-1) / g.sum(-1)


def best_of_k(scores: Tensor) -> dict[str, float]:
    """MCVD's protocol (Voleti et al. 2022, `preds_per_test` samples, `best_psnr`/`best_ssim`): scores (K, B) of K samples
    of each of B test videos (each already a video's score over its generated frames: `psnr(..., generated)`,
    `over_generated(ssim(...), generated)`) -> {"best": the mean
    over videos of the best of the K samples (higher is better), "mean": the mean over samples and videos}. ValueError
    for another shape."""
    if not isinstance(scores, Tensor) or scores.ndim != 2:
        raise ValueError(f"scores must be (K samples, B videos), got {tuple(getattr(scores, 'shape', ()))}")
    return {"best": float(scores.max(0).values.mean()), "mean": float(scores.mean())}


# --- the digit kept over frames -----------------------------------------------------------------------------------------
def digit_crops(videos: Tensor, side: int) -> Tensor:
    """Each frame's side x side window centred on its centre of mass (`centre_of_mass`; rounded to whole pixels, the
    canvas padded with background -1 where the window leaves it), (B, C, F, side, side). With side = the digit's box
    (data.digit_size) a moving digit is framed as the classifier's MNIST digits are (a glyph centred by its mass in its
    box); the whole canvas would show it small and off-centre (the digit classifier then reads 3% of true one-digit
    videos right). An empty frame gets the canvas's top-left window. ValueError for a side outside 1..H."""
    B, C, F, H, W = videos.shape
    if not 1 <= side <= min(H, W):
        raise ValueError(f"the crop side must be 1..{min(H, W)} pixels (the frame), got {side}; pass the digit size")
    top = (centre_of_mass(videos) - (side - 1) / 2).nan_to_num(0.0).round().long() + side  # in the padded canvas
    padded = torch.nn.functional.pad(videos.detach().float(), (side, side, side, side), value=-1.0)
    r = top[..., 0, None] + torch.arange(side)  # (B, F, side)
    c = top[..., 1, None] + torch.arange(side)
    b, f = torch.arange(B)[:, None, None, None], torch.arange(F)[None, :, None, None]
    out = padded.permute(0, 2, 3, 4, 1)[b, f, r[..., :, None], c[..., None, :]]  # (B, F, side, side, C)
    return out.permute(0, 4, 1, 2, 3)


@torch.no_grad()
def frame_labels(videos: Tensor, classifier: nn.Module, crop: int | None = None, batch_size: int = 500) -> Tensor:
    """The classifier's label (argmax of its logits) of every frame, (B, F) int64: videos (B, C, F, H, W) in [-1, 1],
    the channels averaged to gray for a 1-channel classifier (the digit classifier, train.digit_classifier). `crop`:
    classify each frame's crop x crop window around its centre of mass (`digit_crops`; for moving digits pass
    data.digit_size), None: the whole frame."""
    videos = videos.detach().float().clamp(-1, 1).mean(1, keepdim=True)
    if crop is not None:
        videos = digit_crops(videos, crop)
    B, C, F, H, W = videos.shape
    frames = videos.transpose(1, 2).reshape(B * F, 1, H, W)
    classifier.eval()
    param = next(iter(classifier.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    labels = torch.cat([classifier(frames[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(frames), batch_size)])
    return labels.reshape(B, F)


def identity_kept(labels: Tensor, true: Tensor | None = None) -> dict[str, float]:
    """The digit's identity over a video, from per-frame labels (B, F) (`frame_labels`): {"constant": the share of videos
    whose label is the same in every frame; with true labels (B,), "true": the share whose every frame carries the
    true label}. On one-digit moving digits this is "the digit stays the same digit". On two-digit videos a frame gets
    one label, the classifier's reading of the pair (often the larger or brighter digit): "constant" then measures that
    the reading does not flip over the video (overlaps can flip it in true videos too), not that both digits are
    kept; pass no true labels then."""
    if labels.ndim != 2:
        raise ValueError(f"labels must be (B videos, F frames), got {tuple(labels.shape)}; use frame_labels(videos, ...)")
    if true is not None and torch.as_tensor(true).numel() != labels.shape[0]:
        raise ValueError(f"true labels must be one per video ({labels.shape[0]}), got {torch.as_tensor(true).numel()}")
    constant = (labels == labels[:, :1]).all(1)
    out = {"constant": float(constant.double().mean())}
    if true is not None:
        out["true"] = float((labels == torch.as_tensor(true).reshape(-1, 1)).all(1).double().mean())
    return out


# --- the known physics (moving digits, one digit per video) -----------------------------------------------------------
def centre_of_mass(videos: Tensor) -> Tensor:
    """The centre of mass (row, col) in pixels of every frame, (B, F, 2) float64: the weights are the intensities
    v = (x + 1) / 2 in [0, 1] (clipped; channels averaged) above the frame's background, negatives set to 0:
    max(0, v - median(v) - 3 MAD(v)), MAD the median absolute deviation |v - median(v)|, pixel (r, c) at coordinates
    (r, c). The median is the background's level (a digit covers well under half the canvas) and 3 MAD its noise (0
    on a clean background, so a true frame's weights are its ink exactly): a generated background near -1 but not at
    it (e.g. -0.97, noisy) weighs (almost) nothing, where weights v would give it a mass spread over the whole canvas
    that pulls the centre towards the canvas's centre. NaN for an empty frame (nothing above the background). Meant
    for one digit per video: with two it is the pair's centre."""
    v = ((videos.detach().double().clamp(-1, 1) + 1) / 2).mean(1)  # (B, F, H, W)
    level = v.flatten(-2).median(-1).values[..., None, None]  # the background's level
    spread = (v - level).abs().flatten(-2).median(-1).values[..., None, None]  # its noise: the median absolute deviation
    w = (v - level - 3 * spread).clamp(min=0)
    H, W = w.shape[-2:]
    mass = w.sum((-2, -1))
    rows = (w.sum(-1) * torch.arange(H, dtype=torch.float64)).sum(-1) / mass
    cols = (w.sum(-2) * torch.arange(W, dtype=torch.float64)).sum(-1) / mass
    return torch.stack([rows, cols], -1)


def glyph_centre(glyph: np.ndarray) -> np.ndarray:
    """The centre of mass (row, col) of a digit's glyph (d, d) in [0, 1] within its own box, pixels, (2,) float64."""
    g = np.asarray(glyph, dtype=np.float64)
    return np.array([(g.sum(1) * np.arange(g.shape[0])).sum(), (g.sum(0) * np.arange(g.shape[1])).sum()]) / g.sum()


def true_centres(trajectories: list[Trajectory], glyphs: np.ndarray) -> Tensor:
    """Where the true digit's centre of mass is in every frame, (B, F, 2) float64: MovingDigits.trajectory's top-left
    positions[t, 0] (row, col) plus the centre of mass of the digit's own glyph (`glyph_centre` of glyphs[digits[0]],
    glyphs = data.video.bundled_digits(digit_size)[0]). Exactly the centre of mass of the rendered true frame (the
    digit is pasted whole, never cut by a wall, on a background of exactly -1, its median). ValueError for a video of more than one digit."""
    out = []
    for k, tr in enumerate(trajectories):
        if tr.positions.shape[1] != 1:
            raise ValueError(f"video {k} has {tr.positions.shape[1]} digits: the trajectory error follows one digit's "
                             "centre of mass; measure it on one-digit videos (data.digits_per_video = 1)")
        out.append(tr.positions[:, 0].astype(np.float64) + glyph_centre(glyphs[tr.digits[0]]))
    return torch.from_numpy(np.stack(out))


def trajectory_error(fake: Tensor, centres: Tensor, generated) -> Tensor:
    """Per video, the mean over the generated frames of the distance (pixels) between the centre of mass of the
    generated frame (`centre_of_mass`) and the true one (`true_centres`), (B,). fake (B, C, F, H, W), centres (B, F, 2),
    generated (F,) or (B, F) bool. An empty generated frame (no mass) counts as NaN."""
    d = (centre_of_mass(fake) - centres.double()).norm(dim=-1)  # (B, F)
    return over_generated(d, generated)


def acceleration(fake: Tensor, trajectories: list[Trajectory], generated) -> Tensor:
    """"Constant velocity between bounces": per video, the mean length (pixels / frame^2) of the second difference
    c_{t+1} - 2 c_t + c_{t-1} of the generated video's centre of mass, over the frames t in 1..F-2 whose true
    trajectory moves at constant velocity through t-1, t, t+1 (its own second difference 0: no bounce, no wall) and
    where one of t-1, t, t+1 is generated. 0 for the true videos; NaN for a video without such a frame.
    fake (B, C, F, H, W), trajectories the true ones (one digit each), generated (F,) or (B, F) bool."""
    c = centre_of_mass(fake)
    B, F = c.shape[:2]
    g = torch.as_tensor(generated, dtype=torch.bool).expand(B, F)
    second = (c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2]).norm(dim=-1)  # (B, F - 2), frame t = 1..F-2
    out = torch.full((B,), float("nan"), dtype=torch.float64)
    for i, tr in enumerate(trajectories):
        p = tr.positions[:, 0]
        straight = torch.from_numpy(~(p[2:] - 2 * p[1:-1] + p[:-2]).any(1))
        counted = straight & (g[i, 2:] | g[i, 1:-1] | g[i, :-2])
        if counted.any():
            out[i] = second[i][counted].mean()
    return out


# --- FD-digits-video: a Frechet distance of per-video features (not FVD) ----------------------------------------------
def video_features(videos: Tensor, feature_net: nn.Module, batch_size: int | None = None) -> Tensor:
    """Per-video features (B, 3 D) of videos (B, C, F, H, W): with f_t (D,) the feature network's features of frame t
    (metrics.extract_features; the digit classifier's penultimate layer, D = 128), [mean_t f_t, std_t f_t,
    mean_t |f_{t+1} - f_t|]: what the frames show, how much it varies, and how much it changes from frame to frame
    (the mean *absolute* difference: the signed one telescopes to (f_F - f_1) / (F - 1) and misses flicker).
    ValueError for fewer than 2 frames."""
    B, C, F, H, W = videos.shape
    if F < 2:
        raise ValueError(f"per-video features need at least 2 frames (differences between frames), got {F}")
    frames = videos.detach().float().clamp(-1, 1).transpose(1, 2).reshape(B * F, C, H, W)
    f = extract_features(frames, feature_net, batch_size).reshape(B, F, -1)
    return torch.cat([f.mean(1), f.std(1), (f[:, 1:] - f[:, :-1]).abs().mean(1)], dim=1)


def fd_digits_video(real: Tensor, fake: Tensor, feature_net: nn.Module, batch_size: int | None = None) -> float:
    """FD-digits-video: the Frechet distance (metrics.frechet_distance) between Gaussians fitted to the per-video features
    (`video_features`) of two sets of videos (B, C, F, H, W), in the digit classifier's space. It is NOT FVD (Unterthiner
    et al. 2018: I3D features of a network trained on Kinetics, not available offline); numbers compare only with
    each other, at the same number of videos. Biased upward when a set holds no more videos than the 3 D feature
    dimensions (warned). ValueError for sets of different frame shapes."""
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real videos {tuple(real.shape[1:])} and generated {tuple(fake.shape[1:])} (C, F, H, W) differ; "
                         "compare videos of the same size and length")
    fr, ff = video_features(real, feature_net, batch_size), video_features(fake, feature_net, batch_size)
    if min(len(fr), len(ff)) <= fr.shape[1]:
        warnings.warn(f"FD-digits-video from {len(fr)} real and {len(ff)} generated videos in a {fr.shape[1]}-dimensional "
                      "feature space: the covariances are singular and the value is strongly biased; compare only at the "
                      "same numbers of videos", UserWarning, stacklevel=2)
    return frechet_distance(*feature_statistics(fr), *feature_statistics(ff))
