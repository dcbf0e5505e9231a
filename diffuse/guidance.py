"""Denoiser -> Denoiser wrappers for conditional generation; every sampler gets them for free.

Each wrapper takes a denoiser (anything with `schedule` and `__call__(x_t, t, **cond) ->
Prediction`) and is one, so they compose: DynamicThreshold(ClassifierFreeGuidance(den, 3, cond, uncond)).
A wrapper changes x_0 or eps and re-derives the other from x_t = alpha_t x_0 + sigma_t eps, so
the prediction stays consistent with x_t (as improved-diffusion does when it clips); classifier-free guidance
combines both predictions with the same weights, which is that consistency without a division by alpha_t.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

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
        alpha, sigma = scales(self.schedule, t, x_t)
        model_time = to_device(self.schedule.model_time(tt).float(), x_t.device)
        grad = classifier_log_prob_grad(self.classifier, x_t, model_time, self.labels)
        eps = pred.eps - self.scale * sigma * grad
        if x_t.device.type == "cpu" and not bool(torch.isfinite(eps).all()) and bool(torch.isfinite(pred.eps).all()) \
                and bool(torch.isfinite(grad).all()):  # a CPU only, as classifier-free guidance's check
            raise NonFiniteSample(f"classifier guidance with scale s = {self.scale:g} overflowed at t = {float(tt.max()):.4g}: "
                                  "the model's eps and the classifier's gradient are finite, eps - s sigma grad is not; "
                                  "lower the guidance scale (--guidance with --classifier; typical values are 1-10)")
        return _with_eps(x_t, t, eps, self.schedule, pred)
