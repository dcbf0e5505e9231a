"""Segmentation from diffusion features: a label-efficient pixel classifier on a trained model's activations
(Baranchuk et al. 2022, "Label-efficient semantic segmentation with diffusion models", ICLR; lecture 002, "Semantic
Segmentation").

A trained denoiser has to know what is where in an image to remove noise from it, so its activations should carry
semantics. The method, as the reference code does it:

    x_t = alpha_t x_0 + sigma_t eps        for a few t, one eps shared by every image (share_noise)
    f(x_0) = concat_t,b  up(h_b(x_t, t))   the decoder blocks' activations h_b, bilinearly upsampled to the image
    y(pixel) = mode_m argmax MLP_m(f)      an ensemble of M pixel MLPs dim -> 128 -> 32 -> C on f at each pixel,
                                           trained with cross-entropy on a handful of labelled images

and the uncertainty of a pixel is the ensemble's Jensen-Shannon divergence H(mean_m p_m) - mean_m H(p_m).
The times are given on DDPM's linear schedule (T = 1000; the reference's steps 50, 150, 250 index alphabar from 0, so
they are t = 0.051, 0.151, 0.251 here, where t = n / T has alphabar of n betas and the network's time input n - 1 = 50,
150, 250, as there) and read on any run's process at the same log-SNR, so a flow or EDM run is probed at the same noise
levels.

This module holds the math of it (features, the ensemble, the vote, the score); kinds/segmentation.py makes it a
kind of model the one Trainer trains, with the features a cached stage of the run.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .data.segmentation import IGNORE, SegmentationSet
from .denoiser import Denoiser
from .schedule import NoiseSchedule, Schedule

FeatureSource = Literal["diffusion", "random", "pixels", "autoencoder", "digit_classifier"]


@dataclass
class SegmentConfig:
    """[segment]: a segmentation run (model.kind = "segmenter"): where its pixel features come from, which labelled
    images it trains and is scored on, and its head."""

    source: str = ""                 # the run the features come from: a diffusion run (features "diffusion", "random")
    #                                  or an autoencoder run (features "autoencoder"); "" for "pixels", "digit_classifier"
    source_step: int = 0             # that run's checkpoint; 0 = its newest when training starts, then saved (pinned)
    features: FeatureSource = "diffusion"  # diffusion: the run's decoder activations (Baranchuk et al. 2022); the
    #                                  baselines: random (the same U-Net with random weights), pixels (values and x, y),
    #                                  autoencoder (its latents, upsampled), digit_classifier (its conv maps, upsampled)
    times: list[float] = field(default_factory=lambda: [0.051, 0.151, 0.251])  # noise levels, as times of DDPM's
    #                                  linear schedule: the reference's q_sample steps 50, 150, 250 (0-based, so alphabar of
    #                                  51, 151, 251 betas: t = 0.051, ...), read on the run's process at the same log-SNR
    blocks: list[int] = field(default_factory=list)  # decoder blocks read (UNet.decoder_layout); [] = every block (the
    #                                  paper's [5, 6, 7, 8, 12] index the 18 blocks of a 256 px decoder; the 28-32 px
    #                                  decoders here have 9, and bench/RESULTS.md's block x time grid measures each)
    head: Literal["ensemble", "unet"] = "ensemble"   # the pixel MLP ensemble on the features, or (a baseline) a U-Net
    #                                  trained end to end on the labelled images ([model] describes it)
    members: int = 10                # MLPs in the ensemble (the paper: 10)
    hidden: list[int] = field(default_factory=lambda: [128, 32])  # their hidden widths (the paper: 128, 32 for < 30 classes)
    train_images: int = 20           # labelled images trained on (the paper: 20-40; 0 = every image not held out)
    test_images: int = 100           # images held out for the score (the same set for every train.seed)
    classes: Literal["shape", "shape_colour"] = "shape"  # data.source = "shapes": circle / square / triangle, or one
    #                                  class per colour and shape
    feature_batch: int = 8           # images per feature pass (the reference's users ran out of memory: batch it)
    noise_seed: int = 0              # seeds the one noise shared by every image, and the random U-Net's weights


def vp_linear_times(times, schedule: NoiseSchedule) -> Tensor:
    """Times t on DDPM's linear schedule (Ho et al. 2020: beta 1e-4..0.02, T = 1000) -> the times of `schedule` with the
    same log-SNR, t' = schedule.t_from_log_snr(log(alphabar_t / (1 - alphabar_t))) (Kingma et al. 2021, eq. 2: a
    process is read by its SNR), float64 (len(times),): the identity for a linear 1000-step run, and the same noise level on a cosine,
    flow or EDM process; a level the process never reaches is read at its nearest end, with a UserWarning. ValueError
    for a time outside (0, 1)."""
    t = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    if len(t) == 0 or not bool(((t > 0) & (t < 1)).all()):
        raise ValueError(f"segment.times must be a non-empty list of times in (0, 1) of DDPM's linear schedule (the "
                         f"paper's steps 50, 150, 250 are 0.051, 0.151, 0.251), got {list(map(float, t))}")
    ref = Schedule.linear(1000)
    if isinstance(schedule, Schedule) and schedule.T == ref.T and torch.equal(schedule.betas, ref.betas):
        return t
    wanted = ref.log_snr(t)
    out = schedule.t_from_log_snr(wanted).clamp(schedule.t_min, schedule.t_top)
    missed = ~torch.isclose(schedule.log_snr(out), wanted, rtol=0, atol=1e-3)
    if bool(missed.any()):
        far = [float(a) for a, b in zip(t, missed) if b]
        warnings.warn(f"segment.times {far}: this run's process does not reach their noise level (log-SNR "
                      f"{[round(float(ref.log_snr(a)), 2) for a in far]}); they are read at the nearest end of its "
                      f"times [{schedule.t_min:g}, {schedule.t_top:g}]", UserWarning, stacklevel=2)
    return out


def upsample(maps: list[Tensor], side: int) -> Tensor:
    """Feature maps (B, C_i, h_i, w_i) bilinearly resized to side x side and concatenated: (B, sum C_i, side, side)
    float32 (the reference's `collect_features`, upsample_mode "bilinear")."""
    return torch.cat([F.interpolate(m.float(), size=(side, side), mode="bilinear", align_corners=False)
                      if m.shape[-1] != side or m.shape[-2] != side else m.float() for m in maps], dim=1)


@torch.no_grad()
def unet_features(denoiser: Denoiser, z: Tensor, times: Tensor, blocks: list[int], noise: Tensor, side: int,
                  cond: dict | None = None) -> Tensor:
    """The decoder activations of a U-Net denoiser at each time, upsampled and concatenated (Baranchuk et al. 2022,
    sec. 3): z (B, C, h, w) the clean variable (images, or a latent run's latents), `times` (K,) of the run's process,
    `blocks` decoder block indices, `noise` (1 or B, C, h, w) the shared eps, `cond` the network's (null) condition.
    -> (B, K * sum_b width_b, side, side) float32, ordered time-major, then block."""
    cond = cond or {}
    maps = []
    for t in times:
        x_t = denoiser.schedule.q_sample(z, t.expand(z.shape[0]), noise.expand_as(z))
        x_in, model_time = denoiser.network_input(x_t, t)
        found = denoiser.net.decoder_features(x_in, model_time, blocks, **cond)
        maps += [found[b] for b in blocks]
    return upsample(maps, side)


def pixel_coordinates(x: Tensor) -> Tensor:
    """The pixels-and-position baseline: x (B, C, H, W) with two channels of the pixel's (x, y) in [-1, 1] appended,
    (B, C + 2, H, W)."""
    B, _, H, W = x.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, H, device=x.device), torch.linspace(-1, 1, W, device=x.device), indexing="ij")
    return torch.cat([x.float(), xs.expand(B, 1, H, W), ys.expand(B, 1, H, W)], dim=1)


def per_pixel(features: Tensor, masks: Tensor | None = None, ignore: int = 255) -> tuple[Tensor, Tensor | None]:
    """(N, D, H, W) features -> (N H W, D) rows, one per pixel in image-major, row-major order, and masks (N, H, W) ->
    their labels (N H W,); with masks, pixels labelled `ignore` are left out of both."""
    rows = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    if masks is None:
        return rows, None
    labels = masks.reshape(-1)
    keep = labels != ignore
    return rows[keep], labels[keep]


def vote(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The ensemble's answer and its uncertainty per pixel (Baranchuk et al. 2022, sec. 3; the reference's
    `predict_labels`): logits (M, P, C) -> (labels (P,) int64, the mode of the members' argmaxes, ties to the lower
    class; uncertainty (P,) float32, the Jensen-Shannon divergence H(mean_m p_m) - mean_m H(p_m) in nats, 0 when the
    members agree exactly, at most log M)."""
    M, P, C = logits.shape
    votes = torch.zeros(P, C, dtype=torch.int32, device=logits.device).scatter_add_(
        1, logits.argmax(-1).T, torch.ones(P, M, dtype=torch.int32, device=logits.device))  # (P, C) members per class
    labels = votes.argmax(-1)  # first maximum: ties go to the lower class
    logp = logits.float().log_softmax(-1)
    p = logp.exp()
    mean = p.mean(0)
    entropy_of_mean = -(mean * mean.clamp_min(1e-30).log()).sum(-1)
    mean_entropy = -(p * logp).sum(-1).mean(0)
    return labels, (entropy_of_mean - mean_entropy).clamp_min(0)


def confusion(pred: Tensor, target: Tensor, num_classes: int, ignore: int = 255) -> Tensor:
    """The confusion matrix (C, C) int64, rows the true class, columns the predicted, over pixels not labelled
    `ignore` (the reference also counts an ignored pixel predicted as k in k's union; here it counts nowhere)."""
    keep = target != ignore
    t, p = target[keep].reshape(-1).long(), pred[keep].reshape(-1).long()
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou(conf: Tensor) -> Tensor:
    """Per-class intersection over union from a confusion matrix (C, C): TP / (TP + FP + FN), float64 (C,), NaN for a
    class neither present nor predicted (accumulated over the whole test set as the reference's `compute_iou`, which
    scores such a class 0 and keeps it in its mean; here it has no IoU and is left out)."""
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))


def mean_iou(conf: Tensor) -> float:
    """mIoU: the mean of `iou` over the classes present or predicted (background included: it is a class here)."""
    values = iou(conf)
    return float(values[~values.isnan()].mean())


def class_ious(conf: Tensor, class_names: list[str]) -> dict[str, float | None]:
    """Class name -> IoU from a confusion matrix, None (JSON null) for a class neither present nor predicted."""
    return {name: None if math.isnan(v) else v for name, v in zip(class_names, map(float, iou(conf)))}


def check_classes(data: SegmentationSet, class_names: list[str]) -> None:
    """ValueError when labelled images cannot be scored against a run of `class_names`: more classes, or classes named
    otherwise (a folder without classes.txt, named "class 0", "class 1", ..., is read by index)."""
    if data.num_classes > len(class_names):
        raise ValueError(f"the labelled images have {data.num_classes} classes and this run segments {len(class_names)} "
                         f"({class_names}); score it on masks of its own classes")
    by_index = all(name == f"class {k}" for k, name in enumerate(data.class_names))
    if not by_index and list(data.class_names) != list(class_names[:data.num_classes]):
        raise ValueError(f"the labelled images name their classes {data.class_names} and this run's are {class_names}: the "
                         "same index would be scored as different classes; write the run's names, in its order, in the "
                         "folder's classes.txt")


def score(predict, data: SegmentationSet, num_classes: int, chunk: int = 16) -> Tensor:
    """The confusion matrix (C, C) of predict(images (b, C, S, S)) -> labels (b, S, S) over a labelled set, `chunk`
    images at a time (features are never held for the whole set)."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for idx in torch.arange(len(data)).split(chunk):
        part = data.subset(idx)
        conf += confusion(predict(part.images), part.masks, num_classes, IGNORE)
    return conf
