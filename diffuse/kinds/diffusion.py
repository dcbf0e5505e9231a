"""The diffusion kind (model.kind = "denoiser") and the noisy classifier (model.kind = "classifier"): Algorithm 1 of
Ho et al. 2020 and its extensions, as an objective for the one Trainer.

repeat: x_0 ~ q(x_0); t ~ p(t) (Uniform{1..T}, or the process's own); eps ~ N(0, I);
        gradient step on || eps - eps_theta(alpha_t x_0 + sigma_t eps, t) ||^2   (or the hybrid or VLB loss, any target)

A step's draws, for the global batch and in this order (the order fixes the trajectory: tests/test_golden.py):
1. flip uniforms (drawn even without train.hflip); 2. t, or the importance-sampled steps of train.loss = "vlb";
3. eps; 4. the offset noise; 5. the augmentation labels; 6. one seed per example for a trained task's condition;
7. one dropout uniform per condition key, keys sorted; 8. the self-conditioning coin.

The network may work on the images or on the latents of an autoencoder run (a stage: stages.py), and on a condition
dict of any keys its ConditionSpec takes (labels, a concatenated image, scalars, captions' tokens).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..augment import LABELS as AUGMENT_LABELS, apply as augment_apply, draw as augment_draw
from ..condition import ConditionSpec
from ..data import shape_of
from ..data.captions import Captioned
from ..denoiser import Denoiser
from ..nets.classifier import NoisyClassifier
from ..nets.diffae import DiffusionAutoencoder, MLPSkipNet
from ..nets.unet import UNet, check_config as check_network
from ..config import RunConfig, SampleConfig, load_config
from ..stages import (PixelSpace, check_latent_config, diffusion_shape, prepare_latent_training, resolve_autoencoder,
                      resolve_latent_config)
from ..likelihood import bits_per_dim, vlb_term
from ..losses import ImportanceSampler, classifier_loss, hybrid_loss, l_simple
from ..metrics import extract_features, feature_statistics, frechet_distance
from ..generate import default_labels, generate
from ..samplers import SAMPLERS
from ..schedule import Schedule, to_device
from ..tasks.image_to_image import check_task, condition_keys as task_condition_keys, training_condition, viewable
from ..visualize import save_grid, to_uint8
from .base import Context, Objective


# --- the network and its denoiser, for training and sampling ------------------------------------------------------
def build_model(cfg: RunConfig, num_classes: int) -> UNet | NoisyClassifier | DiffusionAutoencoder | MLPSkipNet:
    """The network of a config, for the variable it diffuses (stages.diffusion_shape: images, or their latents; a
    diffusion autoencoder's codes for its latent DDIM, of width read from that run's config)."""
    if cfg.model.kind == "diffae_prior":  # the codes' width is the diffusion autoencoder's
        source = Path(cfg.semantic.run).expanduser() / "config.toml"
        if not source.is_file():
            raise FileNotFoundError(f"semantic.run = {cfg.semantic.run!r}: {source.parent} holds no run; the latent DDIM "
                                    "draws that diffusion autoencoder's codes and is read with it: restore it")
        return MLPSkipNet(load_config(source).model.semantic_dim, cfg.semantic.hidden, cfg.semantic.layers)
    channels, size, _ = diffusion_shape(cfg)
    if cfg.model.kind == "diffae":
        return DiffusionAutoencoder(cfg.model, in_channels=channels, image_size=size, num_classes=num_classes,
                                    out_channels=channels * (2 if cfg.model.learned_variance else 1))
    if cfg.model.kind == "classifier":
        return NoisyClassifier(cfg.model, in_channels=channels, image_size=size, num_classes=num_classes)
    if cfg.model.kind == "autoencoder":
        raise ValueError("model.kind = 'autoencoder' is the first stage of latent diffusion, not a denoiser: name the run in "
                         "latent.autoencoder of a diffusion config (e.g. configs/ldm_mnist.toml)")
    return UNet(cfg.model, in_channels=channels, image_size=size, num_classes=num_classes,
                out_channels=channels * (2 if cfg.model.learned_variance else 1), augment_dim=augment_dim(cfg))


def augment_dim(cfg: RunConfig) -> int:
    """The width of the augmentation labels a config's network takes: len(augment.LABELS) with train.augment_p > 0."""
    return len(AUGMENT_LABELS) if cfg.train.augment_p > 0 and cfg.model.kind in ("denoiser", "diffae") else 0


def condition_spec(cfg: RunConfig, num_classes: int) -> ConditionSpec:
    """The condition keys (condition.py) the U-Net of a config takes, with num_classes classes in its data."""
    m = cfg.model
    return ConditionSpec(num_classes if m.class_conditional else 0, m.cond_channels, m.scalar_inputs,
                         0 if m.text_encoder or m.image_embed_dim else m.context_dim, m.self_condition, augment_dim(cfg),
                         m.max_tokens if m.text_encoder else 0, image_embed=m.image_embed_dim)


def build_denoiser(cfg: RunConfig, net) -> Denoiser:
    return Denoiser(net, Schedule.from_config(cfg.schedule), prediction=cfg.model.prediction,
                    learned_variance=cfg.model.learned_variance, sigma_data=cfg.model.sigma_data,
                    bounded=not cfg.latent.autoencoder and cfg.model.kind not in ("diffae_prior", "unclip_prior"))  # latents, codes, embeddings: no range


def sample_config_kwargs(s: SampleConfig) -> dict:
    """`generate`'s keyword arguments for a run's [sample] section (sampler, steps, spacing, thresholding, guidance and
    the sampler options); callers override what their command line says."""
    return dict(sampler=s.sampler, steps=s.steps, spacing=s.spacing, clip=s.clip, dynamic_threshold=s.dynamic_threshold,
                guidance=s.guidance, guidance_interval=tuple(s.guidance_interval) or None, eta=s.eta, variance=s.variance,
                mixed_precision=s.mixed_precision)


def check(cfg: RunConfig, dataset, classifier: bool = False, takes: tuple[int, ...] | None = None) -> None:
    """ValueError naming the setting and the fix when a diffusion (or noisy-classifier) config cannot train on
    `dataset`: its examples' shape against what the network takes (`takes`, default stages.diffusion_shape), the loss
    and its weighting, the process and the [sample] settings the trainer's grids use, conditions
    the model takes but the data do not yield, guidance without dropout, zero-terminal-SNR limits."""
    t = cfg.train
    schedule = Schedule.from_config(cfg.schedule)
    spec = condition_spec(cfg, dataset.num_classes)
    unknown_drop = sorted(k for k in t.condition_dropout if k not in spec.keys)
    check_task(cfg.task, cfg.data.channels, cfg.data.image_size, cfg.model.cond_channels, cfg.model.scalar_inputs)
    captioned = cfg.model.text_encoder and getattr(dataset, "captions", None) is not None
    yields = (*dataset.condition_keys, *task_condition_keys(cfg.task), *(("text",) if captioned else ()),
              *(("image_embed",) if cfg.model.image_embed_dim else ()))  # made from each x_0 (kinds/unclip.py)
    missing = [k for k in spec.keys if k not in yields] if not classifier else []
    shape, takes = shape_of(dataset), diffusion_shape(cfg) if takes is None else takes
    checks = [
        (not t.fid_every or t.fid_features != "digits" or cfg.data.channels == 1,
         f"train.fid_features = 'digits' measures 1-channel digits and the data has {cfg.data.channels} channels; give "
         "train.fid_features = 'inception:PATH' (the FID Inception-v3 weights file) or 'MODULE:ATTR' (your feature network)"),
        (shape == takes, f"the data yield examples of shape {shape} and the config's network takes {takes} (data.channels, "
                         "data.image_size, or a latent run's latents): make data.channels and data.image_size describe the "
                         "data"),
        (t.min_snr_gamma > 0, f"train.min_snr_gamma must be > 0, got {t.min_snr_gamma}"),
        (cfg.sample.steps >= 0, f"sample.steps must be >= 0 (0: every step), got {cfg.sample.steps}"),
        (schedule.T is None or cfg.sample.steps <= schedule.top_step,
         f"sample.steps = {cfg.sample.steps} is more than the schedule's {getattr(schedule, 'top_step', '')} "
         "sampling steps (Schedule.top_step); lower it, or 0 for every step"),
        (schedule.kind != "edm" or cfg.sample.spacing in ("karras", "log_snr"),
         f"sample.spacing = '{cfg.sample.spacing}' is uniform in t, and EDM's sigma = t sigma_max, so its grid would end at "
         "sigma = sigma_max / steps (a blurred final prediction); use sample.spacing = 'karras' (EDM eq. 5) or 'log_snr'"),
        (schedule.T is not None or cfg.sample.steps >= 1,
         f"sample.steps = 0 means every discrete step, and the {schedule.kind} process is continuous: give a number"),
        (schedule.T is not None or (t.loss == "simple" and not cfg.model.learned_variance),
         f"train.loss = '{t.loss}' and learned variances use the discrete bound (Ho et al. 2020, eq. 5) of the DDPM "
         f"schedules (linear, cosine); the {schedule.kind} process takes train.loss = 'simple'"),
        (0 <= t.augment_p <= 1, f"train.augment_p must be a probability in [0, 1] (EDM: 0.12), got {t.augment_p}"),
        (0 <= t.offset_noise <= 1, f"train.offset_noise must be in [0, 1] (typical 0.05-0.1), got {t.offset_noise}"),
        (t.p2_k > 0 and t.p2_gamma >= 0, f"train.p2_k must be > 0 and train.p2_gamma >= 0, got {t.p2_k}, {t.p2_gamma}"),
        (t.loss != "hybrid" or cfg.model.learned_variance,
         "train.loss = 'hybrid' trains a learned variance: set model.learned_variance = true"),
        (t.vlb_lambda >= 0, f"train.vlb_lambda must be >= 0, got {t.vlb_lambda}"),
        (all(0 <= p < 1 for p in t.condition_dropout.values()),
         f"train.condition_dropout probabilities must be in [0, 1), got {t.condition_dropout}"),
        (not unknown_drop, f"train.condition_dropout names {unknown_drop}, which the model does not take; its condition keys "
                           f"are {list(spec.keys)}" + (" (set model.class_conditional = true for 'label')" if "label" in unknown_drop else "")),
        (not cfg.model.text_encoder or captioned,
         f"model.text_encoder = '{cfg.model.text_encoder}' needs captioned images: data.source = 'shapes' (coloured shapes "
         "with captions), or 'mnist' / 'digits' (captioned 'a handwritten seven'), or a dataset with `captions`"),
        (not missing, f"the model takes the condition key(s) {missing} but the data yields only {list(yields)}; set "
                      "[task] kind (superres, colorize, inpaint, uncrop, jpeg: a condition image made from each training "
                      "image), pass a dataset that yields them (Trainer(..., dataset=...)), or remove them from [model]"),
        (not classifier or dataset.num_classes >= 2,
         "model.kind = 'classifier' needs a labelled dataset (class sub-folders, mnist or digits)"),
        (cfg.sample.guidance >= 0, f"sample.guidance must be >= 0, got {cfg.sample.guidance}"),
        (not cfg.sample.guidance_interval or (len(cfg.sample.guidance_interval) == 2
                                              and 0 <= cfg.sample.guidance_interval[0] < cfg.sample.guidance_interval[1]),
         f"sample.guidance_interval must be [lo, hi] with 0 <= lo < hi (noise levels sigma/alpha), or [] for every level; "
         f"got {cfg.sample.guidance_interval}"),
        (cfg.sample.guidance == 0 or any(t.condition_dropout.values()),
         "sample.guidance > 0 needs a model trained with condition dropout, e.g. train.condition_dropout = {label = 0.1} "
         "(the null condition is then the unconditional model)"),
        (0 <= cfg.sample.dynamic_threshold <= 1, f"sample.dynamic_threshold must be a percentile in (0, 1] or 0 (off), "
                                                 f"got {cfg.sample.dynamic_threshold}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    try:  # the sample grids of training use these: fail now, not at the first grid
        SAMPLERS[cfg.sample.sampler].check_options({"eta": cfg.sample.eta, "variance": cfg.sample.variance})
    except ValueError as e:
        raise ValueError(f"sample.{e}") from None
    if getattr(schedule, "zero_terminal_snr", False):
        if not classifier and cfg.model.prediction in ("eps", "edm"):
            raise ValueError(f'schedule.zero_terminal_snr = true makes alpha_T = 0, where model.prediction = "{cfg.model.prediction}" '
                             'cannot give x_0 (it divides by alpha_T; Lin et al. 2024, sec. 3.2): set model.prediction = "v"')
        if not classifier and t.loss_weighting in ("min_snr", "p2"):
            raise ValueError(f"train.loss_weighting = '{t.loss_weighting}' weighs the x_0 error by a multiple of the SNR, 0 at "
                             "the last step of a zero-terminal-SNR schedule, so the step sampling starts from would never "
                             "be trained: use train.loss_weighting = 'none' (the plain v loss of Lin et al. 2024) or 'edm'")
        try:
            SAMPLERS[cfg.sample.sampler].check_schedule(schedule, f"sample.sampler = '{cfg.sample.sampler}'")
            schedule.grid(cfg.sample.steps or None, cfg.sample.spacing)
        except ValueError as e:
            raise ValueError(f"schedule.zero_terminal_snr = true: {e}") from None


class DiffusionObjective(Objective):
    """model.kind = "denoiser": a U-Net through a Denoiser, trained with L_simple (any target and loss weighting), the
    hybrid loss or L_vlb with importance-sampled steps (Nichol & Dhariwal 2021); conditions dropped per key for
    classifier-free guidance; self-conditioning; non-leaking augmentation; offset noise; a trained image-to-image task's
    condition made from each x_0. On images, or on the latents of latent.autoencoder (a frozen stage, encoded once)."""

    classifier = False

    def __init__(self, cfg: RunConfig, data, ctx: Context):
        self.ctx, self.pixels = ctx, data   # the images: FID references and a task's inputs
        self.dataset, self.space = data, PixelSpace(shape_of(data))
        if cfg.latent.autoencoder:  # diffusion on z = s E(x) (Rombach et al. 2022), encoded once (latent.cache)
            check_latent_config(cfg, load_config(resolve_autoencoder(cfg) / "config.toml"))
            check(cfg, data, self.classifier, (cfg.data.channels, cfg.data.image_size, cfg.data.image_size))  # the images
            cfg, self.space, self.dataset = prepare_latent_training(cfg, data, ctx.run_dir, ctx.device, ctx.saved)
        self.cfg = cfg
        check(cfg, self.dataset, self.classifier)
        t = cfg.train
        self.importance = ImportanceSampler(cfg.schedule.T)  # train.loss = "vlb": p(t) from recent L_t
        self.importance_sampling = t.loss == "vlb" and not self.classifier
        self.augment_p = 0.0 if self.classifier else t.augment_p
        self.dropout = {} if self.classifier else {k: p for k, p in sorted(t.condition_dropout.items()) if p > 0}
        self._fid_reference = None  # (feature network, real mean, real covariance), made at the first FID

    @classmethod
    def unused(cls, cfg: RunConfig) -> list[tuple[str, str, str]]:
        """The loss settings the chosen loss and weighting ignore, and the [autoencoder] section (a diffusion run names
        a trained autoencoder in latent.autoencoder instead)."""
        t, m = cfg.train, cfg.model
        out = []
        if t.loss == "vlb":
            out += [(f"train.{k}", 'train.loss = "vlb" trains the bound alone, with importance-sampled t',
                     'set train.loss = "simple" or "hybrid", or remove it') for k in ("loss_weighting", "min_snr_gamma", "p2_k", "p2_gamma")]
        if t.loss_weighting != "min_snr":
            out.append(("train.min_snr_gamma", f'train.loss_weighting = "{t.loss_weighting}"', 'set train.loss_weighting = "min_snr" or remove it'))
        if t.loss_weighting != "p2":
            out += [(f"train.{k}", f'train.loss_weighting = "{t.loss_weighting}"', 'set train.loss_weighting = "p2" or remove it')
                    for k in ("p2_k", "p2_gamma")]
        if t.loss != "hybrid":
            out.append(("train.vlb_lambda", f'train.loss = "{t.loss}" has no lambda L_vlb term', 'set train.loss = "hybrid" or remove it'))
        if m.kind in ("denoiser", "classifier") and m.semantic_dim:
            out.append(("model.semantic_dim", "only a diffusion autoencoder has a semantic code",
                        'set model.kind = "diffae", or remove it'))
        if m.learned_variance and t.loss == "simple":
            out.append(("model.learned_variance", 'train.loss = "simple" never trains the variance output (ancestral '
                        "sampling would then use an untrained variance)", 'set train.loss = "hybrid" (or "vlb")'))
        return out + autoencoder_unused(cfg)

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """The U-Net (or classifier) of `cfg` fits the shape it diffuses: the images, or a latent run's latents, whose
        side is read from the autoencoder run's config.toml (no weights). FileNotFoundError naming latent.autoencoder
        when it holds no run."""
        side = cfg.data.image_size
        if cfg.latent.autoencoder:
            side //= load_config(resolve_autoencoder(cfg) / "config.toml").autoencoder.factor
        check_network(cfg.model, side, 1)  # the class count comes with the data; the network's structure does not

    @classmethod
    def resolve(cls, cfg: RunConfig, saved: RunConfig | None) -> RunConfig:
        """A latent run's autoencoder path, checkpoint step and scale pinned (stages.resolve_latent_config)."""
        return resolve_latent_config(cfg, saved) if cfg.latent.autoencoder else cfg

    def build(self) -> dict[str, nn.Module]:
        model = build_model(self.cfg, self.dataset.num_classes)
        if self.cfg.model.text_encoder:  # captions as the model's own tokens, once
            self.dataset = Captioned(self.dataset, model.text_encoder)
        return {"model": model}

    def bind(self, nets: dict[str, nn.Module], modules: dict[str, nn.Module]) -> None:
        super().bind(nets, modules)
        self.denoiser = build_denoiser(self.cfg, nets["model"])

    # --- the draws and the batch ---------------------------------------------------------------------------------
    def draw(self, B: int, g: torch.Generator) -> dict[str, Tensor]:
        cfg, shape = self.cfg, self.space.shape
        d = {"flip": torch.rand(B, generator=g) < 0.5}
        if self.importance_sampling:  # importance-sampled steps (Nichol & Dhariwal 2021, sec. 3.3)
            d["steps"], d["is_weight"] = self.importance.sample(B, g)
            d["t"] = d["steps"].double() / self.denoiser.schedule.T
        else:
            d["t"] = self.denoiser.schedule.sample_t(B, g)  # Algorithm 1, line 3 (or the process's own p(t))
        d["eps"] = torch.randn((B, *shape), generator=g)
        if cfg.train.offset_noise > 0:  # offset noise: a per-image, per-channel constant added to eps (Guttenberg 2023)
            offset = torch.randn((B, shape[0], *([1] * (len(shape) - 1))), generator=g)
            d["eps"] = d["eps"] + cfg.train.offset_noise * offset
        if self.augment_p > 0:  # non-leaking augmentation labels (Karras et al. 2022, app. F.2)
            d["augment"] = augment_draw(B, cfg.data.image_size, self.augment_p, g)
        if cfg.task.kind != "none":  # one seed per example for the task's condition image
            d["task_seeds"] = torch.randint(0, 2**62, (B,), generator=g)
        for key, p in self.dropout.items():  # Ho & Salimans 2022, Algorithm 1, line 3: one probability per key
            d[f"drop.{key}"] = torch.rand(B, generator=g) < p
        if cfg.model.self_condition:  # Chen et al. 2023, Algorithm 1: on half the steps, one coin per step
            d["self_condition"] = torch.rand((), generator=g) < 0.5
        return d

    def inputs(self, x0: Tensor, cond: dict, d: dict) -> tuple[Tensor, dict, dict]:
        """Flip, augment, the task's condition from the (flipped) x_0, the condition restricted to the model's keys
        with each dropped key replaced by its null; eps on the device."""
        dev = x0.device
        if self.cfg.train.hflip:
            x0 = torch.where(to_device(d["flip"], dev).view(-1, *([1] * (x0.ndim - 1))), x0.flip(-1), x0)
        if "augment" in d:
            x0 = augment_apply(x0, d["augment"])
        if "task_seeds" in d:
            cond.update(training_condition(self.cfg.task, x0, d["task_seeds"], self.denoiser.schedule))
        cond.update(self.conditions_from(x0))
        cond = self.condition(cond, {k.removeprefix("drop."): to_device(v, dev) for k, v in d.items() if k.startswith("drop.")})
        if "augment" in d:
            cond["augment"] = to_device(d["augment"], dev).float()
        return x0, cond, {**d, "eps": to_device(d["eps"], dev)}  # pinned, without waiting for the GPU (speed.to_device)

    def conditions_from(self, x0: Tensor) -> dict[str, Tensor]:
        """Conditions made from the prepared (flipped, augmented) clean batch x0 by a frozen network, before dropout:
        none here; unCLIP's decoder adds the CLIP image embedding (kinds/unclip.py)."""
        return {}

    def condition(self, cond: dict, dropped: dict[str, Tensor]) -> dict:
        """The batch's condition restricted to the keys the model takes, each key replaced by its null value where
        `dropped[key]` (train.condition_dropout): one network learns p(x | c) and p(x)."""
        spec = self.modules["model"].condition_spec
        takes = set(spec.keys) | ({"context_mask"} if spec.context_dim else set())
        return spec.drop({k: v for k, v in cond.items() if k in takes}, dropped)

    # --- the losses ----------------------------------------------------------------------------------------------
    def losses(self, x0: Tensor, cond: dict, d: dict, step: int) -> dict:
        t, eps, cfg = d["t"], d["eps"], self.cfg.train
        cond = dict(cond)
        if bool(d.get("self_condition", False)):
            cond["self_cond"] = self.estimate(x0, t, eps, cond)
        weighting = dict(weighting=cfg.loss_weighting, min_snr_gamma=cfg.min_snr_gamma, p2_k=cfg.p2_k, p2_gamma=cfg.p2_gamma)
        if cfg.loss == "simple":
            return {"main": l_simple(self.denoiser, x0, t, eps, norm=cfg.loss_norm, **weighting, **cond)}
        if cfg.loss == "hybrid":
            return {"main": hybrid_loss(self.denoiser, x0, t, eps, lam=cfg.vlb_lambda, **weighting, **cond)}
        vlb = bits_per_dim(vlb_term(self.denoiser, x0, d["steps"], eps, **cond), x0)
        return {"main": vlb * d["is_weight"].to(vlb), "aux": {"vlb": vlb.detach()}}

    @torch.no_grad()
    def estimate(self, x0: Tensor, t: Tensor, eps: Tensor, cond: dict) -> Tensor:
        """The model's own x_0 estimate at x_t = q_sample(x0, t, eps) without self-conditioning: sg(x_hat_0) of
        Chen et al. 2023, Algorithm 1 (no gradient flows through it)."""
        return self.denoiser(self.denoiser.schedule.q_sample(x0, t, eps), t, **cond).x0

    def after_backward(self, d: dict[str, Tensor], aux: dict[str, Tensor]) -> None:
        if self.importance_sampling:
            self.importance.update(d["steps"], aux["vlb"])

    def state_dict(self) -> dict[str, Tensor]:
        return {f"importance.{k}": v for k, v in self.importance.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "importance.history" in state:
            self.importance.load_state_dict({"history": state["importance.history"], "count": state["importance.count"]})

    # --- what it shows and measures ------------------------------------------------------------------------------
    @torch.no_grad()
    def fixed_samples(self, trainer, n: int, steps: int = 0) -> tuple[Tensor, list[Tensor]]:
        """n samples of the EMA weights from the fixed noise of train.seed, with the run's [sample] settings (`steps` > 0
        replaces sample.steps): a conditional model draws the classes in turn; a task model takes the conditions of the
        first n training images. Returns (samples, [its inputs, the truth] for a task model, else [])."""
        s, d, task = self.cfg.sample, self.cfg.data, self.cfg.task
        cond, shown = None, []
        if task.kind != "none":  # the first n training images' conditions: rows of inputs, outputs and the truth
            idx = torch.arange(min(n, len(self.dataset)))
            truth, _ = self.dataset.batch(idx)
            truth = truth.to(trainer.device)
            cond = training_condition(task, truth, idx, self.denoiser.schedule,
                                      level=task.aug_level if task.noise_aug_max > 0 else None)
            n, shown = len(idx), [viewable(cond["image"], d.channels), truth]
        if self.cfg.model.text_encoder:  # the first n training captions
            cond = {"text": self.dataset.batch(torch.arange(n) % len(self.dataset))[1]["text"].to(trainer.device)}
        kwargs = sample_config_kwargs(s) | ({"steps": steps} if steps else {})
        x = generate(build_denoiser(self.cfg, trainer.ema.model), n, self.space.shape,
                     labels=default_labels(n, self.modules["model"].num_classes), cond=cond, seed=self.cfg.train.seed,
                     device=trainer.device, **kwargs)
        return self.space.decode(x), shown

    def preview(self, trainer) -> Path:
        """RUN/samples/step_NNNNNNNN.png: `fixed_samples` of sample.n, a task model's inputs above and the truth below."""
        x, shown = self.fixed_samples(trainer, self.cfg.sample.n)
        n = x.shape[0]
        rows = [shown[0], x, shown[1]] if shown else [x]
        return save_grid(torch.cat(rows), trainer.run_dir / "samples" / f"step_{trainer.step:08d}.png", nrow=n if shown else None)

    def evaluate(self, trainer) -> tuple[dict, float]:
        """FID (metrics.py) of train.fid_samples `fixed_samples` of the EMA weights against as many training images (the
        first ones, whose conditions a task model gets), in train.fid_features' space. With few samples it is biased
        upward, so it is a curve to compare with itself, not a published FID."""
        t = self.cfg.train
        if self._fid_reference is None:
            net = self.ctx.feature_network(t.fid_features, trainer.device)
            real, _ = self.pixels.batch(torch.arange(min(t.fid_samples, len(self.pixels))))
            features = extract_features(real, net)
            if len(features) <= features.shape[1]:
                warnings.warn(f"train.fid_samples = {t.fid_samples} images in a {features.shape[1]}-dimensional feature space: "
                              f"the covariances are singular and the FID is strongly biased; use more than {features.shape[1]}",
                              UserWarning, stacklevel=2)
            self._fid_reference = (net, *feature_statistics(features))
        net, mu, sigma = self._fid_reference
        x, _ = self.fixed_samples(trainer, t.fid_samples, t.fid_steps)
        x = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() / 127.5 - 1  # 8-bit images, as `diffuse eval` scores
        fid = frechet_distance(mu, sigma, *feature_statistics(extract_features(x, net)))
        return {"fid": fid}, fid


def autoencoder_unused(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """The [autoencoder] section in a run of another kind: it trains no autoencoder."""
    return [(f"autoencoder.{f.name}", f'model.kind = "{cfg.model.kind}" does not train an autoencoder',
             'set model.kind = "autoencoder", or name a trained one in latent.autoencoder') for f in dataclasses.fields(cfg.autoencoder)]


class ClassifierObjective(DiffusionObjective):
    """model.kind = "classifier": the noisy classifier p(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021,
    sec. 4), cross-entropy on x_t of the run's process (losses.classifier_loss); draws flips, t, eps and offset noise
    as diffusion does, and nothing else. No previews or FID."""

    classifier = True

    @classmethod
    def unused(cls, cfg: RunConfig) -> list[tuple[str, str, str]]:
        """The denoiser's parameterisation, conditioning and losses: a noisy classifier has none of them."""
        why = 'model.kind = "classifier" trains a noisy classifier with cross-entropy'
        out = [(f"model.{k}", why, "remove it") for k in ("prediction", "learned_variance", "class_conditional", "cond_channels",
                                                          "scalar_inputs", "context_dim", "cross_attention_resolutions",
                                                          "self_condition")]
        out.append(("train.augment_p", why, "remove it"))
        out += [(f"train.{k}", why, "remove it") for k in ("loss", "loss_weighting", "min_snr_gamma", "p2_k", "p2_gamma", "vlb_lambda",
                                                           "condition_dropout")]
        out.append(("task.kind", 'model.kind = "classifier" trains a noisy classifier', "remove it"))
        return out + autoencoder_unused(cfg)

    def losses(self, x0: Tensor, cond: dict, d: dict, step: int) -> dict:
        return {"main": classifier_loss(self.nets["model"], self.denoiser.schedule, x0, cond["label"], d["t"], d["eps"])}

    def condition(self, cond: dict, dropped: dict[str, Tensor]) -> dict:
        return cond

    def preview(self, trainer) -> None:
        return None

    def evaluate(self, trainer) -> tuple[dict, float | None]:
        return {}, None

