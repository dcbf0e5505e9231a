"""The diffusion autoencoder's kinds (Preechakul et al. 2022; lecture 002, "Diffusion Autoencoders"):

    "diffae"             the semantic encoder and the conditional decoder, trained together by the diffusion loss of
                         DiffusionObjective (the paper's ||eps - eps_theta(x_t, t, Enc(x_0))||^2, or the config's target
                         and weighting) with z_sem = Enc(x_0): the encoder learns only through it; on the training
                         split of its data (every tenth image is held out, as for the autoencoder: kinds.autoencoder.held_out)
    "diffae_prior"       the latent DDIM: eps_omega(z_t, t) on the frozen encoder's codes of the training images,
                         z-normalised, MLPSkipNet, the L1 loss and a constant beta = 0.008 (app. B); a second run
    "diffae_classifier"  a linear classifier on the z-normalised codes, trained on the labels or on a measured attribute
                         (data.attributes) split at its median; its weight vectors are the edit directions (sec. 4.2)

The codes of a diffusion autoencoder run's training images are a stage (`semantic_codes`): its EMA encoder at a pinned
checkpoint, cached in RUN/codes.safetensors under that checkpoint's manifest hash, with their mean and std over the
training images (the z-normalisation the second runs and the edits use).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checkpoint as ckpt
from ..config import RunConfig, load_config
from ..data import Subset, load_dataset
from ..data.attributes import ATTRIBUTES, binarise, measure
from ..denoiser import Denoiser
from ..generate import generate
from ..stages import PixelSpace, Stage, cached, in_batches, pin_step
from ..visualize import save_grid
from .autoencoder import held_out
from .base import DIFFUSION_TRAINING, Context, Group, Objective, ignored
from .diffusion import DiffusionObjective, build_denoiser, build_model, sample_config_kwargs


# --- the diffusion autoencoder -----------------------------------------------------------------------------------------
class DiffAEObjective(DiffusionObjective):
    """model.kind = "diffae": DiffusionObjective's loss with the decoder conditioned on z_sem = Enc(x_0) of the same
    (flipped) image, encoder and decoder one module (nets.diffae.DiffusionAutoencoder: one EMA, one optimizer). Trains on
    all but the held-out tenth of the data. Previews: the first training images above, their decoding from z_sem alone
    (x_T from the fixed noise) below."""

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        refused = [(cfg.model.semantic_dim < 1, "model.semantic_dim must be >= 1, the width of z_sem (64 for 28 px digits)"),
                   (bool(cfg.latent.autoencoder), "latent.autoencoder: the semantic encoder reads pixels; remove it"),
                   (cfg.model.self_condition, "model.self_condition: the decoder's second input is z_sem; set it to false"),
                   (cfg.model.class_conditional or bool(cfg.model.text_encoder) or cfg.model.context_dim > 0,
                    "a class, caption or context beside z_sem: the semantic code is the decoder's condition (it learns the "
                    "class itself; a diffae_classifier with semantic.target = 'label' finds its direction); remove them"),
                   (cfg.task.kind != "none", f"task.kind = '{cfg.task.kind}': a diffusion autoencoder reconstructs its input; "
                                             "remove it"),
                   (cfg.train.loss == "vlb", 'train.loss = "vlb": the paper trains the plain eps loss; use "simple"')]
        for bad, why in refused:
            if bad:
                raise ValueError(f'model.kind = "diffae": {why}')

    @classmethod
    def unused(cls, cfg: RunConfig) -> list[tuple[str, str, str]]:
        return super().unused(cfg) + [("train.fid_every", 'model.kind = "diffae" previews reconstructions; its samples come '
                                       'from a "diffae_prior" run', "remove it")] * bool(cfg.train.fid_every)

    def __init__(self, cfg: RunConfig, data, ctx: Context):
        self.train_idx, self.test_idx = held_out(len(data))
        super().__init__(cfg, Subset(data, self.train_idx), ctx)

    def build(self) -> dict[str, nn.Module]:
        return {"model": build_model(self.cfg, self.dataset.num_classes)}

    def losses(self, x0: Tensor, cond: dict, d: dict, step: int) -> dict:
        return super().losses(x0, {**cond, "encode": x0}, d, step)

    @torch.no_grad()
    def preview(self, trainer) -> Path:
        """RUN/samples/step_NNNNNNNN.png: sample.n training images, and below each its decoding from z_sem with the
        fixed noise of train.seed as x_T (what the code alone holds)."""
        n = min(self.cfg.sample.n, len(self.dataset))
        x, _ = self.dataset.batch(torch.arange(n))
        x = x.to(trainer.device)
        net = trainer.ema.model
        z = net.encode(x)
        out = generate(build_denoiser(self.cfg, net), n, tuple(x.shape[1:]), cond={"z_sem": z}, seed=self.cfg.train.seed,
                       device=trainer.device, **sample_config_kwargs(self.cfg.sample))
        return save_grid(torch.cat([x, out]), trainer.run_dir / "samples" / f"step_{trainer.step:08d}.png", nrow=n)

    def evaluate(self, trainer) -> tuple[dict, float | None]:
        return {}, None


# --- the codes of a diffusion autoencoder run: a stage ------------------------------------------------------------------
def semantic_run(path: str | Path, name: str = "semantic.run") -> tuple[Path, RunConfig]:
    """(absolute path, config) of a diffusion autoencoder run. FileNotFoundError naming `name` when the folder holds no
    run, ValueError when it holds another kind."""
    if not str(path):
        raise ValueError(f"{name} is empty: name a diffusion autoencoder run (`diffuse train configs/diffae_digits.toml "
                         "--out runs/diffae`)")
    run = Path(path).expanduser().resolve()
    if not (run / "config.toml").is_file():
        raise FileNotFoundError(f"{name} = {str(path)!r}: {run} holds no run (no config.toml); train the diffusion "
                                "autoencoder first: `diffuse train configs/diffae_digits.toml --out runs/diffae`")
    cfg = load_config(run / "config.toml")
    if cfg.model.kind != "diffae":
        raise ValueError(f"{name} = {str(path)!r} holds a {cfg.model.kind} run, not a diffusion autoencoder "
                         '(model.kind = "diffae"); name one trained with configs/diffae_digits.toml')
    return run, cfg


def load_diffae(run: str | Path, device="cpu", step: int | None = None, ema: bool = True
                ) -> tuple[RunConfig, Denoiser, int]:
    """(config, denoiser over DiffusionAutoencoder in eval mode without gradients, step) of a diffusion autoencoder run
    at checkpoint `step` (None: the newest), its EMA (or raw) weights. FileNotFoundError when the step is gone."""
    run, cfg = semantic_run(run, "the run")
    step = step or ckpt.latest_step(run)
    if step is None or step not in ckpt.checkpoint_folders(run):
        raise FileNotFoundError(f"the diffusion autoencoder run {run} holds no checkpoint {step if step else ''}; let its "
                                "training save one (train.checkpoint_every, and at the end)")
    c = ckpt.load_checkpoint(run, step)
    net = build_model(cfg, int(c.state["num_classes"]))
    group = "ema" if ema else "model"
    ckpt.load_weights(net, c.tensors[group], config=run / "config.toml",
                      weights=Path(ckpt.CHECKPOINTS) / f"step_{c.step:08d}" / f"{group}.safetensors")
    return cfg, build_denoiser(cfg, net.to(device).eval().requires_grad_(False)), c.step


def semantic_codes(run: str | Path, step: int, device="cpu") -> dict[str, Tensor]:
    """The codes of a diffusion autoencoder run's training images (its data's training split) from its EMA encoder at
    checkpoint `step`: {"codes" (N, d), "index" (N,) the images' indices in its data, "mean" (d,), "std" (d,) over
    them}, on the CPU, cached in RUN/codes.safetensors under the checkpoint's manifest hash (stages.cached)."""
    run, cfg = semantic_run(run, "the run")
    data = load_dataset(cfg.data)
    train_idx, _ = held_out(len(data))

    def compute() -> dict[str, Tensor]:
        _, den, _ = load_diffae(run, device, step)
        codes = torch.cat([den.net.encode(x.to(device)).float().cpu() for x in in_batches(Subset(data, train_idx))])
        return {"codes": codes, "index": train_idx, "mean": codes.mean(0), "std": codes.std(0).clamp_min(1e-6)}

    key = Stage("diffae", run, step).key(data=vars(cfg.data), n=len(train_idx))
    return cached(run / "codes.safetensors", key, compute)


def normalise(z: Tensor, stats: dict[str, Tensor], on: bool = True) -> Tensor:
    """(z - mean) / std over the training codes (Preechakul et al. 2022, sec. 4.2, "z-normalised"); identity when off."""
    return (z - stats["mean"].to(z)) / stats["std"].to(z) if on else z


def denormalise(z: Tensor, stats: dict[str, Tensor], on: bool = True) -> Tensor:
    """The inverse of `normalise`: z std + mean."""
    return z * stats["std"].to(z) + stats["mean"].to(z) if on else z


class CodeDataset:
    """Codes (N, d) as a dataset (data.base's protocol, shape (d,)), with extras per code ({"target": (N,)})."""

    condition_keys: tuple[str, ...] = ()

    def __init__(self, codes: Tensor, num_classes: int = 0, **extras: Tensor):
        self.codes, self.extras, self.num_classes = codes, extras, num_classes
        self.shape = tuple(codes.shape[1:])

    def __len__(self) -> int:
        return len(self.codes)

    def batch(self, idx: Tensor) -> tuple[Tensor, dict]:
        return self.codes[idx], {k: v[idx] for k, v in self.extras.items()}


def resolve_semantic(cfg: RunConfig, saved: RunConfig | None) -> RunConfig:
    """semantic.run as an absolute path and semantic.run_step pinned (the saved run's, else the newest checkpoint)."""
    cfg = copy.deepcopy(cfg)
    run, _ = semantic_run(cfg.semantic.run)
    cfg.semantic.run = str(run)
    cfg.semantic.run_step = pin_step(run, cfg.semantic.run_step, saved.semantic.run_step if saved else 0,
                                     "diffusion autoencoder")
    return cfg


def semantic_unused(cfg: RunConfig, kind: str) -> list[tuple[str, str, str]]:
    """The [semantic] section for every kind but the two that read it, and the keys of the other of the two."""
    if kind not in ("diffae_prior", "diffae_classifier"):
        return ignored(cfg, 'only model.kind = "diffae_prior" or "diffae_classifier" reads it', ("semantic",))
    other = ("target",) if kind == "diffae_prior" else ("hidden", "layers")
    return [(f"semantic.{k}", f'model.kind = "{kind}" does not read it', "remove it") for k in other]


# --- the latent DDIM ---------------------------------------------------------------------------------------------------
class DiffAEPriorObjective(DiffusionObjective):
    """model.kind = "diffae_prior": the latent DDIM of Preechakul et al. 2022 (sec. 3.3): a diffusion model over the
    z-normalised codes (N, d) of a diffusion autoencoder's training images with MLPSkipNet (semantic.hidden,
    semantic.layers), trained by DiffusionObjective's loss on vectors (the paper: eps, L1, schedule "constant" 0.008).
    Previews: codes drawn by it, decoded by the autoencoder with the fixed noise as x_T."""

    @classmethod
    def unused(cls, cfg: RunConfig) -> list[tuple[str, str, str]]:
        why = 'model.kind = "diffae_prior" is an MLP over codes (semantic.hidden, semantic.layers)'
        model = [(f"model.{f}", why, "remove it") for f in (
            "channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads", "dropout", "norm_groups",
            "patch_size", "class_conditional", "cond_channels", "scalar_inputs", "context_dim", "cross_attention_resolutions",
            "text_encoder", "max_tokens", "learned_variance", "self_condition", "checkpointing", "semantic_dim")]
        rest = [(k, why, "remove it") for k, w, f in DiffusionObjective.unused(cfg) if not k.startswith("model.")]
        return (model + rest + ignored(cfg, why + ", on the codes of semantic.run's data", ("data", "task", "latent", "autoencoder", "segment")) +
                [("train.fid_every", why + "; measure its decoded samples with `diffuse eval`", "remove it")] * bool(cfg.train.fid_every)
                + semantic_unused(cfg, "diffae_prior"))

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        semantic_run(cfg.semantic.run)
        s = cfg.semantic
        for bad, why in [(s.hidden < 1 or s.layers < 2, f"semantic.hidden must be >= 1 and semantic.layers >= 2, got "
                                                        f"{s.hidden}, {s.layers}"),
                         (cfg.train.hflip, "train.hflip would reverse the code's entries; set it to false"),
                         (cfg.train.loss != "simple", f"train.loss = '{cfg.train.loss}' needs the images' discrete "
                                                      "likelihood; codes train with 'simple' (the paper: L1, train.loss_norm)"),
                         (cfg.train.offset_noise > 0, "train.offset_noise shifts image channels; set it to 0"),
                         (cfg.train.augment_p > 0, "train.augment_p augments images, not codes; set it to 0"),
                         (cfg.model.prediction == "edm" and cfg.schedule.kind != "edm",
                          "model.prediction = 'edm' needs schedule.kind = 'edm'")]:
            if bad:
                raise ValueError(f'model.kind = "diffae_prior": {why}')

    @classmethod
    def resolve(cls, cfg: RunConfig, saved: RunConfig | None) -> RunConfig:
        cfg = resolve_semantic(cfg, saved)
        cfg.sample.clip = False  # codes have no [-1, 1] range
        return cfg

    @classmethod
    def load_data(cls, cfg: RunConfig):
        return codes_for(cfg)

    def __init__(self, cfg: RunConfig, data, ctx: Context):
        self.ctx, self.cfg = ctx, cfg
        self.dataset = self.pixels = data
        self.space = PixelSpace(data.shape)
        self.importance_sampling, self.augment_p, self.dropout = False, 0.0, {}
        self.importance = None
        self._decoder = None

    def build(self) -> dict[str, nn.Module]:
        return {"model": build_model(self.cfg, 0)}

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass

    def checkpoint_info(self) -> dict:
        """The training codes' mean and std: what de-normalises the codes it draws (saved with every checkpoint)."""
        return {"mean": self.dataset.stats["mean"].tolist(), "std": self.dataset.stats["std"].tolist()}

    @torch.no_grad()
    def preview(self, trainer) -> Path:
        """RUN/samples/step_NNNNNNNN.png: sample.n codes drawn by the EMA prior, decoded (sample_pair)."""
        if self._decoder is None:
            self._decoder = load_diffae(self.cfg.semantic.run, trainer.device, self.cfg.semantic.run_step)
        d = self._decoder[0].data
        x = sample_pair(build_denoiser(self.cfg, trainer.ema.model), self._decoder[1], self.dataset.stats, self.cfg,
                        self.cfg.sample.n, (d.channels, d.image_size, d.image_size), seed=self.cfg.train.seed,
                        device=trainer.device, decoder_kw=sample_config_kwargs(self._decoder[0].sample))
        return save_grid(x, trainer.run_dir / "samples" / f"step_{trainer.step:08d}.png")

    def evaluate(self, trainer) -> tuple[dict, float | None]:
        return {}, None


def codes_for(cfg: RunConfig) -> CodeDataset:
    """The training codes of semantic.run at semantic.run_step, z-normalised if semantic.normalize, as a CodeDataset
    whose `stats` are the codes' mean and std, the normalisation (zeros and ones without it), and `index` the images'
    indices in the run's data (a classifier then adds `extras["target"]` and, for an attribute, `threshold`)."""
    stats = semantic_codes(cfg.semantic.run, cfg.semantic.run_step)
    on = cfg.semantic.normalize
    data = CodeDataset(normalise(stats["codes"], stats, on))
    d = stats["codes"].shape[1]  # without normalisation the codes' own space: mean 0, std 1
    data.stats = {"mean": stats["mean"] if on else torch.zeros(d), "std": stats["std"] if on else torch.ones(d)}
    data.index = stats["index"]
    return data


@torch.no_grad()
def sample_pair(prior: Denoiser, decoder: Denoiser, stats: dict, prior_cfg: RunConfig, n: int, shape: tuple[int, ...], *,
                seed: int = 0, device="cpu", decoder_kw: dict | None = None, callback=None) -> Tensor:
    """Unconditional samples of a diffusion autoencoder (Preechakul et al. 2022, sec. 3.3): z ~ the latent DDIM with its
    [sample] settings (the paper's T_latent = 200), de-normalised by the training codes' `stats` (mean, std), then
    x ~ the decoder given z from x_T ~ N(0, I) with generate's `decoder_kw` (sampler, steps, ...; the paper's T = 20).
    Seeds: `seed` for z, seed + 1 for x_T. Returns (n, *shape) on the CPU."""
    z = generate(prior, n, (prior.net.dim,), seed=seed, device=device,
                 **(sample_config_kwargs(prior_cfg.sample) | {"clip": False}))
    z = denormalise(z, stats, prior_cfg.semantic.normalize)
    return generate(decoder, n, shape, cond={"z_sem": z}, seed=seed + 1, device=device, callback=callback,
                    **(decoder_kw or {})).cpu()


# --- the linear classifier on codes: the edit directions --------------------------------------------------------------
class DiffAEClassifierObjective(Objective):
    """model.kind = "diffae_classifier": a linear classifier on the z-normalised codes (Preechakul et al. 2022, sec.
    4.2, the reference's nn.Linear(style_ch, num_cls)): softmax cross-entropy over the classes for semantic.target =
    "label", binary cross-entropy on an attribute split at its training median otherwise (the paper's binary attributes,
    BCE). The one row of a binary attribute, or row k minus the rows' mean for class k (app.requests.Direction), is
    the direction w of z' = z + s sqrt(d) w / |w| (tasks.semantic.edit_code).
    Previews and evaluation: none; `diffuse edit manipulate` uses it."""

    groups = {"main": Group(("model",))}
    ema = None
    progress_desc = "code classifier"

    @classmethod
    def unused(cls, cfg: RunConfig) -> list[tuple[str, str, str]]:
        why = 'model.kind = "diffae_classifier" is a linear layer on codes'
        return (ignored(cfg, why + ", on the codes of semantic.run's data",
                        ("data", "model", "schedule", "sample", "task", "latent", "autoencoder", "segment"),
                        (*DIFFUSION_TRAINING, "fid_every", "hflip")) + semantic_unused(cfg, "diffae_classifier"))

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        semantic_run(cfg.semantic.run)
        if cfg.semantic.target != "label" and cfg.semantic.target not in ATTRIBUTES:
            raise ValueError(f"semantic.target = {cfg.semantic.target!r} is neither 'label' nor a measured attribute; choose "
                             f"one of 'label', {', '.join(map(repr, ATTRIBUTES))}")

    @classmethod
    def resolve(cls, cfg: RunConfig, saved: RunConfig | None) -> RunConfig:
        return resolve_semantic(cfg, saved)

    @classmethod
    def load_data(cls, cfg: RunConfig):
        data = codes_for(cfg)
        run, src = semantic_run(cfg.semantic.run)
        images = load_dataset(src.data)
        if cfg.semantic.target == "label":
            if images.num_classes < 2:
                raise ValueError(f"semantic.target = 'label' needs labelled images; {run}'s data have no classes: choose an "
                                 f"attribute ({', '.join(ATTRIBUTES)})")
            target = torch.cat([images.batch(i)[1]["label"] for i in data.index.split(256)])
            data.num_classes = images.num_classes
        else:
            values = torch.cat([measure(images.batch(i)[0], [cfg.semantic.target], empty="nan")[cfg.semantic.target]
                                for i in data.index.split(256)])
            empty = data.index[values.isnan()].tolist()
            if empty:
                raise ValueError(f"semantic.target = {cfg.semantic.target!r} cannot be measured on {len(empty)} image(s) of "
                                 f"{run}'s data without ink (indices {empty[:5]}); remove them from the data, or train on "
                                 "'label'")
            target, threshold = binarise(values)
            data.threshold = float(threshold)
            data.num_classes = 2
        data.extras = {"target": target.long()}
        return data

    def __init__(self, cfg: RunConfig, data, ctx: Context):
        self.cfg, self.dataset = cfg, data

    def build(self) -> dict[str, nn.Module]:
        d, k = self.dataset.shape[0], self.dataset.num_classes
        return {"model": nn.Linear(d, 1 if k == 2 and self.cfg.semantic.target != "label" else k)}

    def losses(self, z: Tensor, extras: dict, d: dict, step: int) -> dict:
        logits, y = self.nets["model"](z), extras["target"]
        if logits.shape[1] == 1:
            return {"main": F.binary_cross_entropy_with_logits(logits[:, 0], y.float(), reduction="none")}
        return {"main": F.cross_entropy(logits, y, reduction="none")}

    def checkpoint_info(self) -> dict:
        """The codes' statistics and, for an attribute, its median threshold: what an edit needs beside the weights."""
        info = {"mean": self.dataset.stats["mean"].tolist(), "std": self.dataset.stats["std"].tolist()}
        return info | ({"threshold": self.dataset.threshold} if hasattr(self.dataset, "threshold") else {})
