"""Denoiser -> Denoiser wrappers for conditional generation; every sampler gets them for free.

Each wrapper takes a denoiser (anything with `schedule` and `__call__(x_t, t, **cond) ->
Prediction`) and is one, so they compose: DynamicThreshold(ClassifierFreeGuidance(den, 3, cond, uncond)).
A wrapper changes x_0 or eps and re-derives the other from x_t = alpha_t x_0 + sigma_t eps, so
the prediction stays consistent with x_t (as improved-diffusion does when it clips); classifier-free guidance
combines both predictions with the same weights, which is that consistency without a division by alpha_t.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .augment import LABELS as AUGMENT_LABELS, apply as augment_apply
from .condition import concat_conditions
from .denoiser import Prediction, eps_to_x0, scales, x0_to_eps
from .schedule import to_device
from .samplers.base import NonFiniteSample


def _with_x0(x_t: Tensor, t, x0: Tensor, schedule, like: Prediction) -> Prediction:
    """A prediction with this x_0, eps re-derived, and `like`'s learned variance (guidance changes the mean only)."""
    alpha, sigma = scales(schedule, t, x_t)
    return Prediction(x0=x0, eps=x0_to_eps(x_t, x0, alpha, sigma), variance_mix=like.variance_mix)


def _with_eps(x_t: Tensor, t, eps: Tensor, schedule, like: Prediction) -> Prediction:
    alpha, sigma = scales(schedule, t, x_t)
    return Prediction(x0=eps_to_x0(x_t, eps, alpha, sigma), eps=eps, variance_mix=like.variance_mix)


class Conditioned:
    """A denoiser with its condition bound, e.g. Conditioned(den, label=labels): samplers pass only (x_t, t)."""

    def __init__(self, denoiser, **cond):
        self.denoiser, self.schedule, self.cond = denoiser, denoiser.schedule, cond

    def __call__(self, x_t: Tensor, t, **more) -> Prediction:
        return self.denoiser(x_t, t, **self.cond, **more)


class SelfConditioning:
    """Self-conditioning at sampling (Chen et al. 2023, "Analog Bits", sec. 3 and Algorithm 2): every call passes the
    x_0 estimate of the previous call as `self_cond` (none on the first), so each sampler hands the network its
    previous estimate without knowing of it. The state lives for one sampling run: `generate` wraps afresh each time.
    Inside guidance (only SplitCalls is below it), so the conditional and unconditional halves each see their own estimate,
    and it feeds back the network's own, unclipped x_0 (the clipping of ClipX0 acts outside it), which is what
    training feeds (the trainer's estimate is not clipped either).
    Guidance in an interval (ClassifierFreeGuidance) switches between calls of B (the conditional model alone) and 2B
    ([conditional; unconditional], in that order); across the switch the conditional rows keep their estimate: on
    entering, the unconditional half starts from none (zeros, as at the first step), and on leaving, the conditional
    half goes on. A call of any other batch shape starts from no estimate."""

    def __init__(self, denoiser):
        self.denoiser, self.schedule, self.previous = denoiser, denoiser.schedule, None

    def carried(self, x_t: Tensor) -> Tensor | None:
        """The estimate this call receives: the previous one for the same shape, its conditional half or it padded
        with zeros for the unconditional half across guidance's B <-> 2B switch, else None."""
        prev, B = self.previous, x_t.shape[0]
        if prev is None or prev.shape[1:] != x_t.shape[1:]:
            return None
        if prev.shape[0] == B:
            return prev
        if prev.shape[0] == 2 * B:  # guidance stopped: the conditional half (the first B rows) goes on
            return prev[:B]
        if 2 * prev.shape[0] == B:  # guidance started: the unconditional half has no estimate of its own yet
            return torch.cat([prev, torch.zeros_like(prev)])
        return None

    def __call__(self, x_t: Tensor, t, **cond) -> Prediction:
        prev = self.carried(x_t)
        pred = self.denoiser(x_t, t, **cond, **({} if prev is None else {"self_cond": prev}))
        self.previous = pred.x0.detach()
        return pred


class SplitCalls:
    """A denoiser whose calls carry at most `max_batch` images: a larger call runs as consecutive calls of at most
    `max_batch` and their predictions are concatenated. The predictions are the same (the network treats each image
    on its own: GroupNorm, attention and conditions are per image; no batch statistics at sampling), but on a CPU a
    batch whose activations overflow the caches is slower per image: the demo network runs 20-50% faster per image
    at 128 than at 256 on a 2-core AVX2 CPU (bench/RESULTS.md, issue 19), and classifier-free guidance doubles the
    batch. `generate` wraps the network in it with max_batch = n, innermost, so guidance never doubles a call.

    x_t (B, C, H, W); t a number or shaped (B,); each condition tensor with B rows is split alike, anything else is
    passed whole to every call. Raises ValueError for max_batch < 1."""

    def __init__(self, denoiser, max_batch: int):
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.denoiser, self.schedule, self.max_batch = denoiser, denoiser.schedule, int(max_batch)

    def __call__(self, x_t: Tensor, t, **cond) -> Prediction:
        B, m = x_t.shape[0], self.max_batch
        if B <= m:
            return self.denoiser(x_t, t, **cond)

        def rows(v, lo: int):
            return v[lo:lo + m] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == B else v

        parts = [self.denoiser(x_t[lo:lo + m], rows(t, lo), **{k: rows(v, lo) for k, v in cond.items()})
                 for lo in range(0, B, m)]
        mix = None if parts[0].variance_mix is None else torch.cat([p.variance_mix for p in parts])
        return Prediction(torch.cat([p.x0 for p in parts]), torch.cat([p.eps for p in parts]), mix)


class ClipX0:
    """Static clipping of the predicted x_0 to the data range (Ho et al. 2020 code; Saharia et al. 2022, sec. 2.3)."""

    def __init__(self, denoiser, lo: float = -1.0, hi: float = 1.0):
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.lo, self.hi = lo, hi

    def __call__(self, x_t: Tensor, t, **cond) -> Prediction:
        pred = self.denoiser(x_t, t, **cond)
        return _with_x0(x_t, t, pred.x0.clamp(self.lo, self.hi), self.schedule, pred)


def dynamic_threshold(x0: Tensor, percentile: float) -> Tensor:
    """s = max(1, the percentile p of |x_0| over each example's pixels); x_0 <- clip(x_0, -s, s) / s
    (Saharia et al. 2022, Imagen, sec. 2.3): saturated pixels are pushed inward instead of clipped."""
    s = torch.quantile(x0.detach().abs().flatten(1).float(), percentile, dim=1).clamp_min(1.0).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


class DynamicThreshold:
    """Dynamic thresholding of the predicted x_0 at percentile p (Saharia et al. 2022; Imagen uses p = 0.995)."""

    def __init__(self, denoiser, percentile: float = 0.995):
        if not 0 < percentile <= 1:
            raise ValueError(f"the dynamic-threshold percentile must be in (0, 1], got {percentile}")
        self.denoiser, self.schedule, self.percentile = denoiser, denoiser.schedule, percentile

    def __call__(self, x_t: Tensor, t, **cond) -> Prediction:
        pred = self.denoiser(x_t, t, **cond)
        return _with_x0(x_t, t, dynamic_threshold(pred.x0, self.percentile), self.schedule, pred)


def same_condition(cond: dict, uncond: dict) -> bool:
    """Whether two condition dicts hold the same keys and equal values (tensors equal in shape and every element)."""
    if set(cond) != set(uncond):
        return False
    for k, v in cond.items():
        u = uncond[k]
        if torch.is_tensor(v) or torch.is_tensor(u):
            if not (torch.is_tensor(v) and torch.is_tensor(u) and v.shape == u.shape and bool(torch.equal(v, u.to(v)))):
                return False
        elif v != u:
            return False
    return True


def guided_eps(eps_cond: Tensor, eps_uncond: Tensor, w: float | Tensor) -> Tensor:
    """eps~ = (1 + w) eps(x_t, c) - w eps(x_t) (Ho & Salimans 2022, eq. 6): w = 0 is the conditional model. The same
    combination of the two x_0 predictions is the x_0 that eps~ implies at the same x_t. w: a number, or one per
    example shaped (B, 1, ..., 1)."""
    return (1 + w) * eps_cond - w * eps_uncond


class ClassifierFreeGuidance:
    """Classifier-free guidance with weight w (Ho & Salimans 2022, eq. 6): eps~ = (1 + w) eps(x_t, cond) - w eps(x_t, uncond),
    in one batched call on [x_t with cond; x_t with uncond] (which `generate` runs as two calls of B, SplitCalls). The
    conditional rows come first: SelfConditioning relies on that order when the interval switches between B and 2B.

    cond and uncond are condition dicts (condition.py) with the same keys: uncond holds the null value of each key
    the guidance is over (ConditionSpec.null), e.g. the null label, and the cond's value of the others, so a
    super-resolution model can be guided on its class while both halves see the same low-resolution image. The
    network must have been trained with dropout on those keys (train.condition_dropout) so that their null values
    give the unconditional model. With cond = uncond it is the conditional model for every w.

    `interval` = (lo, hi) applies the guidance only where the noise level sigma_t / alpha_t lies in (lo, hi], and the
    conditional model (one network call) elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a limited
    interval improves sample and distribution quality in diffusion models", sec. 4: guidance at high noise collapses
    variety, at low noise it does little). None: every noise level. Raises ValueError unless 0 <= lo < hi.
    """

    def __init__(self, denoiser, w: float, cond: dict, uncond: dict, interval: tuple[float, float] | None = None):
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
        if interval is not None and not 0 <= interval[0] < interval[1]:
            raise ValueError(f"the guidance interval (lo, hi] of noise levels sigma/alpha needs 0 <= lo < hi, got {tuple(interval)}")
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.w, self.cond, self.uncond, self.interval = float(w), cond, uncond, interval
        self.same = same_condition(cond, uncond)
        if self.same and self.w:
            warnings.warn(f"classifier-free guidance (w = {self.w:g}) of a condition against itself (the condition equals "
                          "the unconditional one, e.g. an empty --prompt, or a negative prompt equal to the prompt) "
                          "changes nothing at any weight: the conditional model runs alone, one network call per step",
                          UserWarning, stacklevel=2)

    def __call__(self, x_t: Tensor, t, **more) -> Prediction:
        B = x_t.shape[0]
        if self.same:  # (1 + w) x_0(c) - w x_0(c) = x_0(c): one call
            return self.denoiser(x_t, t, **self.cond, **more)
        tt = torch.as_tensor(t, dtype=torch.float64).expand(B)
        w = self.w  # a number, or per example: w inside the interval (lo, hi], 0 outside
        if self.interval is not None and w:
            level = self.schedule.ve_sigma(tt)
            inside = (level > self.interval[0]) & (level <= self.interval[1])
            if not bool(inside.any()):
                w = 0.0
            elif not bool(inside.all()):
                w = to_device(w * inside, x_t.device).to(x_t.dtype).view(-1, *[1] * (x_t.ndim - 1))
        if not torch.is_tensor(w) and w == 0:  # the conditional model alone: one network call
            return self.denoiser(x_t, t, **self.cond, **more)
        both = self.denoiser(torch.cat([x_t, x_t]), torch.cat([tt, tt]), **concat_conditions(self.cond, self.uncond),
                             **concat_conditions(more, more))
        # eps~ of eq. 6, and the x_0 it implies: the conversions are affine in the prediction at a fixed x_t, so the same
        # weights on x_0 give exactly (x_t - sigma_t eps~) / alpha_t, without dividing by alpha_t (0 at zero terminal SNR)
        cond_v = None if both.variance_mix is None else both.variance_mix[:B]  # the conditional model's variance (as GLIDE)
        out = Prediction(guided_eps(both.x0[:B], both.x0[B:], w), guided_eps(both.eps[:B], both.eps[B:], w), cond_v)
        # read on a CPU only (free there); on a GPU the read would wait for it at every step, and the sampler's own
        # deferred check (generate.FiniteWatch) reports a non-finite x_0 after the loop
        if x_t.device.type == "cpu" and not bool(torch.isfinite(out.x0).all()) and bool(torch.isfinite(both.x0).all()):
            raise NonFiniteSample(f"classifier-free guidance with weight w = {self.w:g} overflowed at t = {float(tt.max()):.4g}: "
                                  "the conditional and unconditional predictions are finite, (1 + w) x_0(cond) - w "
                                  "x_0(uncond) is not; lower the guidance weight (--guidance, sample.guidance; typical "
                                  "values are 1-10)")
        return out


def classifier_log_prob_grad(classifier: Callable[[Tensor, Tensor], Tensor], x_t: Tensor, model_time: Tensor,
                             labels: Tensor) -> Tensor:
    """grad_x log p_phi(y | x_t) for a classifier (x_t, model_time) -> logits and labels y (B,), one per example."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        logits = classifier(x, model_time)
        log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # half -> float32
        picked = log_p.gather(1, labels.view(-1, 1)).sum()
        return torch.autograd.grad(picked, x)[0].to(x_t.dtype)


class ClassifierGuidance:
    """Classifier guidance at scale s (Dhariwal & Nichol 2021): the score gains s grad log p_phi(y | x_t),
        eps~ = eps - s sigma_t grad_x log p_phi(y | x_t)               (sec. 4.2, eq. 14; Algorithm 2 for DDIM)
    so with every sampler it samples p(x_t) p_phi(y | x_t)^s. In ancestral sampling this moves the mean by
    (sigma_{t|s}^2 / alpha_{t|s}) s grad log p_phi: Algorithm 1's Sigma s grad log p_phi with beta_t in place of
    Sigma = beta-tilde_t (equal to first order in beta_t). `classifier(x_t, model_time)` returns logits; a noisy
    classifier (nets.classifier.NoisyClassifier, trained on x_t) or any differentiable function.
    """

    def __init__(self, denoiser, classifier: Callable[[Tensor, Tensor], Tensor], labels: Tensor, scale: float):
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.classifier, self.labels, self.scale = classifier, labels, float(scale)

    def __call__(self, x_t: Tensor, t, **cond) -> Prediction:
        pred = self.denoiser(x_t, t, **cond)
        tt = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])  # the host's times: read without waiting
        if self.scale == 0 or not bool((self.schedule.alpha(tt) > 0).all()):  # at alpha_t = 0, x_t is independent of y
            return pred
        model_time = to_device(self.schedule.model_time(tt).float(), x_t.device)
        grad = classifier_log_prob_grad(self.classifier, x_t, model_time, self.labels)
        return score_guided(x_t, t, self.schedule, pred, self.scale, grad, "classifier guidance", "the classifier's gradient",
                            "--guidance with --classifier; typical values are 1-10")


def score_guided(x_t: Tensor, t, schedule, pred: Prediction, scale: float, grad: Tensor, what: str, source: str,
                 fix: str) -> Prediction:
    """The prediction whose score gains s grad_x l(x_t) for a log-likelihood l: eps~ = eps - s sigma_t grad (Dhariwal &
    Nichol 2021, eq. 14; guided-diffusion's condition_score), x_0 re-derived from x_t. grad shaped as x_t. Raises
    NonFiniteSample (on a CPU, where the check is free) when eps~ overflows although eps and grad are finite, naming
    `what` (e.g. "classifier guidance"), `source` (what gave the gradient) and `fix` (the flag to lower)."""
    _, sigma = scales(schedule, t, x_t)
    eps = pred.eps - scale * sigma * grad
    if x_t.device.type == "cpu" and not bool(torch.isfinite(eps).all()) and bool(torch.isfinite(pred.eps).all()) \
            and bool(torch.isfinite(grad).all()):  # a CPU only, as classifier-free guidance's check
        level = float(torch.as_tensor(t, dtype=torch.float64).max())
        raise NonFiniteSample(f"{what} with scale s = {scale:g} overflowed at t = {level:.4g}: the model's eps and "
                              f"{source} are finite, eps - s sigma grad is not; lower the guidance scale ({fix})")
    return _with_eps(x_t, t, eps, schedule, pred)


# --- CLIP guidance (GLIDE, Nichol et al. 2021) and guidance by a loss on x_0 (k-diffusion's CLIP-guided sampler) --------
# The CLIP is duck-typed: `clip.image_embedding(x, model_time) -> (B, D)` (unit vectors for a real CLIP; x in the
# denoiser's space, model_time (B,) float as the U-Net's, ignored by a plain CLIP), and optionally `clip.image_size`
# (the side it was trained on) and `clip.embed_dim` (D), which are checked when present. Text embeddings g(c) are given.


def check_guidance_scale(scale, what: str, flag: str) -> float:
    """The scale as a float: a finite number >= 0, else ValueError naming `what` and the `flag` that sets it."""
    try:
        value = math.nan if isinstance(scale, (str, bytes, bool)) else float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"the {what} scale must be a finite number >= 0 (0: no guidance), got {scale!r}; pass one with {flag}")
    return value


def check_prompts(prompts) -> list[str]:
    """The prompts a CLIP's text tower embeds, as a list: a string or a sequence of strings, none empty or blank. An
    empty prompt has no content to guide towards: ValueError naming it."""
    listed = [prompts] if isinstance(prompts, str) else list(prompts)
    if not listed:
        raise ValueError("CLIP guidance needs a prompt to guide towards, got none; pass one with --prompt")
    for i, p in enumerate(listed):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} is {p!r}: CLIP guidance needs a non-empty prompt to guide towards (an empty one "
                             "says nothing); give it words with --prompt, or leave CLIP guidance out (--clip-scale 0)")
    return listed


def check_text_embedding(text_emb: Tensor, clip) -> Tensor:
    """The text embedding g(c), (D,) or (B, D), finite and of unit norm (CLIP's text tower L2-normalises it), and D the
    CLIP's width where it says (`clip.embed_dim`). ValueError naming the problem otherwise."""
    g = torch.as_tensor(text_emb)
    if g.ndim not in (1, 2) or g.shape[-1] == 0 or not g.is_floating_point():
        raise ValueError(f"the text embedding must be a float tensor (D,) or (B, D), got {g.dtype} {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise ValueError("the text embedding holds NaN or inf values; embed the prompt again with the CLIP's text tower")
    width = getattr(clip, "embed_dim", None)
    if width is not None and g.shape[-1] != int(width):
        raise ValueError(f"the text embedding is {g.shape[-1]} wide and this CLIP's embeddings are {int(width)} wide; embed "
                         "the prompt with the same CLIP run's text tower")
    norm = g.double().norm(dim=-1)
    if not bool(((norm - 1).abs() <= 1e-3).all()):
        raise ValueError(f"the text embedding must have unit norm (CLIP's are L2-normalised), got norms from "
                         f"{float(norm.min()):.4g} to {float(norm.max()):.4g}; pass g / g.norm(dim=-1, keepdim=True)")
    return g


def eval_mode(clip) -> None:
    """Put a CLIP that is an nn.Module in eval mode (dropout off, normalisation statistics fixed), as GLIDE guides."""
    if isinstance(clip, torch.nn.Module):
        clip.eval()


def clip_embedding(clip, x: Tensor, model_time: Tensor, text_emb: Tensor) -> Tensor:
    """f(x, t) (B, D) of the CLIP in float32 at least with autocast off, after checking x's side against
    `clip.image_size` (if it says) and the embedding's width and rows against text_emb's (D,) or (B, D).
    ValueError naming the mismatch."""
    size = getattr(clip, "image_size", None)
    if size is not None:
        want = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        if tuple(x.shape[-2:]) != want:
            raise ValueError(f"the CLIP was trained on {want[0]}x{want[1]} images and this run's are "
                             f"{x.shape[-2]}x{x.shape[-1]}; guide with a CLIP trained at the run's size (its data.image_size, "
                             "in the space the run samples: pixels or latents)")
    with torch.autocast(x.device.type, enabled=False):
        f = clip.image_embedding(x.to(torch.promote_types(x.dtype, torch.float32)), model_time)
    f = f.to(torch.promote_types(f.dtype, torch.float32))
    if f.ndim != 2 or f.shape[0] != x.shape[0]:
        raise ValueError(f"clip.image_embedding must return (B, D) = ({x.shape[0]}, D), got {tuple(f.shape)}")
    if f.shape[-1] != text_emb.shape[-1]:
        raise ValueError(f"the CLIP's image embeddings are {f.shape[-1]} wide and the text embedding {text_emb.shape[-1]}; "
                         "embed the prompt with the same CLIP run's text tower")
    if text_emb.ndim == 2 and text_emb.shape[0] != x.shape[0]:
        raise ValueError(f"the text embedding has {text_emb.shape[0]} rows for a batch of {x.shape[0]}; give one row per "
                         "sample or one (D,) for all")
    return f


def clip_score_grad(clip, x_t: Tensor, model_time: Tensor, text_emb: Tensor) -> Tensor:
    """grad_x sum_i f(x_i, t_i) . g_i for a CLIP f and text embeddings g ((D,) or (B, D)): each example's gradient of its
    own score (the CLIP treats each image on its own), shaped and typed as x_t; float32 at least, autocast off."""
    with torch.enable_grad(), torch.autocast(x_t.device.type, enabled=False):  # the backward too: it follows autocast
        x = x_t.detach().requires_grad_(True)
        f = clip_embedding(clip, x, model_time, text_emb)
        score = (f * text_emb.to(f)).sum()
        return torch.autograd.grad(score, x)[0].to(x_t.dtype)


class NoisyClipGuidance:
    """CLIP guidance with a noise-aware CLIP at scale s (Nichol et al. 2021, GLIDE, sec. 3.2; lecture 002): the score
    gains s grad_{x_t} f(x_t, t) . g(c),
        eps~ = eps - s sigma_t grad_{x_t} f(x_t, t) . g(c)       (as ClassifierGuidance, guided-diffusion's condition_score)
    Where the CLIP is optimal, f(x) . g(c) / tau = log p(c | x) - log p(c) (tau its temperature), so s = omega / tau is
    classifier guidance at the lecture's scale omega, and s = 1 / tau (about 100 once CLIP's logit scale saturates)
    samples p(x | c). Scale convention: GLIDE's cond_fn multiplies the cosine by
    exp(logit_scale) = 100 and then by its grad_scale, so GLIDE's grad_scale 3 is s = 300 here. Acting on the prediction,
    it works with every sampler and process (VP, EDM, flow); skipped where alpha_t = 0 (x_t is independent of c there).
    The CLIP runs in eval mode, float32, autocast off. clip: see `clip_embedding`; text_emb (D,) or (B, D) unit vectors.
    ValueError for a negative or non-finite scale, a text embedding of the wrong width or norm, or (when called) an
    x_t whose side is not the CLIP's `image_size`."""

    def __init__(self, denoiser, clip, text_emb: Tensor, scale: float):
        self.scale = check_guidance_scale(scale, "CLIP guidance", "--clip-scale")
        self.text_emb = check_text_embedding(text_emb, clip)
        self.denoiser, self.schedule, self.bounded = denoiser, denoiser.schedule, getattr(denoiser, "bounded", True)
        self.clip = clip
        eval_mode(clip)

    def __call__(self, x_t: Tensor, t, **cond) -> Prediction:
        pred = self.denoiser(x_t, t, **cond)
        tt = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])
        if self.scale == 0 or not bool((self.schedule.alpha(tt) > 0).all()):  # at alpha_t = 0, x_t is independent of c
            return pred
        model_time = to_device(self.schedule.model_time(tt).float(), x_t.device)
        grad = clip_score_grad(self.clip, x_t, model_time, self.text_emb.to(x_t.device))
        return score_guided(x_t, t, self.schedule, pred, self.scale, grad, "CLIP guidance", "the CLIP's gradient",
                            "--clip-scale")


def x0_loss_grad(denoiser, x_t: Tensor, t, loss: Callable[[Tensor, Tensor], Tensor], **cond) -> tuple[Prediction, Tensor]:
    """The denoiser's prediction at x_t (detached) and grad_{x_t} sum_i L_i(x^_0(x_t)), the gradient of the per-example
    losses loss(x0, t) -> (B,) (t (B,) float64) through the denoiser (autograd)."""
    tt = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        pred = denoiser(x, t, **cond)  # under the caller's autocast, as the network runs unguided
        total = loss(pred.x0, tt).sum()
        with torch.autocast(x_t.device.type, enabled=False):  # a CLIP's backward in float32 too (it follows autocast)
            grad = torch.autograd.grad(total, x)[0].to(x_t.dtype)
    mix = None if pred.variance_mix is None else pred.variance_mix.detach()
    return Prediction(pred.x0.detach(), pred.eps.detach(), mix), grad


class X0LossGuidance:
    """Guidance by a differentiable loss on the predicted x_0, the gradient taken through the denoiser (k-diffusion's
    sample_clip_guided.py; Ho et al. 2022's reconstruction guidance): the score gains -s grad_{x_t} L(x^_0(x_t), t),
        eps~ = eps + s sigma_t grad_{x_t} L,     i.e.  x~_0 = x^_0 - s (sigma_t^2 / alpha_t) grad_{x_t} L,
    which in EDM's terms (x = x_t / alpha_t, sigma = sigma_t / alpha_t) is k-diffusion's D~ = D - s sigma^2 grad_x L.
    loss(x0, t) -> (B,) per example (t (B,) float64, the continuous times), lower is better. Reconstruction guidance
    (tasks.video.ReconstructionGuidance) is this with L = (alpha_t^2 / (2 sigma_t^2)) ||x^a - x^_0^a||^2 and s = w_r,
    before its observed frames are replaced (tests/test_clip_guidance.py checks the two agree). Skipped where alpha_t = 0
    (x_0 cannot be read there) and at s = 0. ValueError for a negative or non-finite scale."""

    def __init__(self, denoiser, loss: Callable[[Tensor, Tensor], Tensor], scale: float, what: str = "x_0 loss guidance",
                 flag: str = "its scale argument"):
        self.scale = check_guidance_scale(scale, what, flag)
        self.denoiser, self.schedule, self.bounded = denoiser, denoiser.schedule, getattr(denoiser, "bounded", True)
        self.loss, self.what, self.flag = loss, what, flag

    def __call__(self, x_t: Tensor, t, **cond) -> Prediction:
        tt = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])
        if self.scale == 0 or not bool((self.schedule.alpha(tt) > 0).all()):
            return self.denoiser(x_t, t, **cond)
        pred, grad = x0_loss_grad(self.denoiser, x_t, t, self.loss, **cond)
        return score_guided(x_t, t, self.schedule, pred, self.scale, -grad, self.what, "the loss's gradient", self.flag)


def spherical_dist_loss(u: Tensor, v: Tensor) -> Tensor:
    """2 arcsin(|u^ - v^| / 2)^2 over the last dim, u^ and v^ the unit vectors along u and v: theta^2 / 2, theta the
    angle between them (the geodesic distance on the unit sphere; k-diffusion's and the CLIP-guided diffusion notebooks'
    loss); 0 for equal directions, pi^2 / 2 for opposite ones. Broadcasts; returns the leading shape."""
    u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    return 2 * torch.arcsin((u - v).norm(dim=-1) / 2) ** 2


class RandomShift:
    """A random sub-pixel translation of each image by up to `max_shift` of its side in x and y (uniform), bilinear
    with reflected borders (augment.apply): k-diffusion's RandomAffine(0, (1/14, 1/14)) augmentation of the x_0 a CLIP
    sees, differentiable in the image. Square images (B, C, H, H). ValueError for max_shift outside [0, 0.5]."""

    def __init__(self, max_shift: float = 1 / 14):
        if not 0 <= max_shift <= 0.5:
            raise ValueError(f"max_shift is a fraction of the image side in [0, 0.5], got {max_shift}")
        self.max_shift = float(max_shift)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        labels = torch.zeros(x.shape[0], len(AUGMENT_LABELS), dtype=torch.float64, device=x.device)
        shift = torch.rand(x.shape[0], 2, generator=generator, dtype=torch.float64, device=generator.device)
        labels[:, 4:6] = ((2 * shift - 1) * self.max_shift).to(x.device)  # translate_x, translate_y over the side
        return augment_apply(x, labels)


class ClipX0Guidance(X0LossGuidance):
    """CLIP guidance with a plain CLIP on the predicted x_0 through the denoiser (k-diffusion's sample_clip_guided.py;
    the diffusers community CLIP-guided pipeline): X0LossGuidance with
        L(x_0) = mean over k cutouts j of spherical_dist_loss(f(aug_j(x_0)), g(c)),
    each cutout an independent draw of `augment` (default RandomShift(1/14), k-diffusion's; None: x_0 itself, so
    cutouts = 1 is the plain loss). The CLIP sees x_0 at the model time of the schedule's t_min, the least noise the
    process knows (t = 0 is -inf on EDM's), or, for a CLIP that states its `clean_time` (a noise-aware CLIP of nets/clip.py),
    at that time, where its training read clean images; so a noise-aware CLIP acts as a plain one; in eval mode, float32, autocast
    off. Scale s as k-diffusion's clip_guidance_scale (default 500 there);
    the k cutouts' losses are averaged, so the scale means the same for every k. The augmentations are drawn from a generator seeded with
    `seed` on the first call, so a run repeats. `decode` maps the predicted x_0 to the images the CLIP reads before
    the augmentations, differentiably (a latent run's decoder, stages.LatentSpace.decode_with_grad: the gradient then
    flows through decoder and denoiser); None: x_0 itself. ValueError for a bad scale, cutouts < 1 or text embedding."""

    def __init__(self, denoiser, clip, text_emb: Tensor, scale: float, cutouts: int = 1,
                 augment: Callable[[Tensor, torch.Generator], Tensor] | None = RandomShift(), seed: int = 0,
                 decode: Callable[[Tensor], Tensor] | None = None):
        if isinstance(cutouts, bool) or not isinstance(cutouts, int) or cutouts < 1:
            raise ValueError(f"cutouts is the number of augmented copies of x_0 the CLIP sees, an integer >= 1, got {cutouts!r}")
        super().__init__(denoiser, self.clip_loss, scale, "CLIP guidance on x_0", "--clip-scale")
        self.clip, self.text_emb = clip, check_text_embedding(text_emb, clip)
        self.cutouts, self.augment, self.seed, self.generator = cutouts, augment, seed, None
        self.decode = decode
        eval_mode(clip)

    def clip_loss(self, x0: Tensor, t: Tensor) -> Tensor:
        """mean_j spherical_dist_loss(f(aug_j(x0)), g) per example (B,), float32 at least (x0 decoded first if `decode`)."""
        if self.decode is not None:
            x0 = self.decode(x0)
        if self.generator is None or self.generator.device != x0.device:
            self.generator = torch.Generator(x0.device).manual_seed(self.seed)
        g = self.text_emb.to(x0.device)
        clean = (None if getattr(self.clip, "clean_time", None) is not None  # a CLIP that knows its clean time reads x_0 there
                 else to_device(self.schedule.model_time(torch.full_like(t, self.schedule.t_min)).float(), x0.device))
        total = 0.0
        for _ in range(self.cutouts):
            view = x0 if self.augment is None else self.augment(x0, self.generator)
            f = clip_embedding(self.clip, view, clean, g)
            total = total + spherical_dist_loss(f, g.to(f))
        return total / self.cutouts
