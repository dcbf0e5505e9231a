"""The unCLIP prior (model.kind = "unclip_prior"; Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation
with CLIP Latents", sec. 2.2; lecture 002, "DALL-E 2"): a diffusion model over the CLIP image embeddings z_i of a frozen
CLIP run (model.kind = "clip", [unclip] clip) conditioned on the caption's text embedding z_t and token states, by a
small causal transformer predicting the clean embedding (nets/unclip.py; Denoiser prediction "x0", the MSE of
DALLE2-pytorch's predict_x_start and the paper's sec. 2.2):

    L = E || f_theta(z_i^(t), t, z_t, c) - z_i ||^2,        z_i^(t) = alpha_t z_i + sigma_t eps

The caption is dropped (its embedding and its tokens together, one coin per example) for a share unclip.text_dropout
of the examples (the paper: 10%), so the same network is the unconditional model of classifier-free guidance. Only the
caption is dropped: the noised image embedding stays in both branches (DALLE2-pytorch#285: its forward_with_cond_scale
also replaces the noised input by a learned null in the unconditional branch).

The diffused variable. CLIP embeddings are unit vectors, about 1/sqrt(D) per coordinate, badly scaled for a process
that adds unit-variance noise (DALLE2-pytorch#60). unclip.scale = "sqrt_d" (the default) diffuses sqrt(D) z_i / |z_i|
(DALLE2-pytorch's image_embed_scale); "znorm" diffuses (z_i - mean) / std over the training embeddings (Karlo's
clip_mean and clip_std). sqrt_d is the default because it keeps the geometry CLIP scores with: the map is a multiple of
the identity, so cosines (the metrics, best-of-2) are the same before and after it, and it needs no statistics; on
runs/clip_plain (clip_shapes.toml) the unit embeddings' coordinates have std 0.117 about a mean of norm 0.29, so the
scaled coordinates have std ~0.94, as close to unit as z-normalising makes them. The training embeddings' mean and
std are saved with every checkpoint either way (what "znorm" unscales with). The text embedding enters as
sqrt(D) z_t / |z_t| whatever the scale.

The embeddings of the CLIP run's training images (its data's training split: every tenth image is held out, as the
CLIP's own), their captions' text embeddings and token states are a stage (`clip_embeddings`): the pinned CLIP
checkpoint's towers, cached in CLIPRUN/unclip_embeddings_step_NNNNNNNN.safetensors under that checkpoint's manifest hash.

Sampling (`sample_image_embeddings`): any sampler of the run's process, classifier-free guidance of weight w
(eps~ = (1 + w) f(c) - w f(null), Ho & Salimans 2022; DALLE2-pytorch's cond_scale and Karlo's guidance scale s are
1 + w: Karlo's prior default 4.0 is w = 3), best-of-k by the cosine to the caption's text embedding (the paper samples
two and keeps the one with the higher dot product), unscaled to unit vectors in CLIP's space. Measurement
(`evaluate_run`, `diffuse eval PRIORRUN --metric prior`): the cosines of the predicted embedding to the true image's,
to the caption's text embedding and to an unrelated caption's image, on the CLIP's held-out images (DALLE2-pytorch's
report_cosine_sims).

unCLIP's decoder (Ramesh et al. 2022, "Hierarchical text-conditional image generation with CLIP latents", sec. 2.1;
lecture 002, "DALL-E 2"): a denoiser (model.kind = "denoiser" with model.image_embed_dim = D > 0) whose U-Net takes the
CLIP image embedding z_i of the image it denoises, as the condition `image_embed` (B, D), for the one Trainer:

    repeat: x_0 ~ q(x_0);  z_i = f(x_0), the frozen CLIP's unit image embedding at t = 0;  t, eps as the process draws;
            z_i -> 0 (the null) with probability train.condition_dropout.image_embed (the paper: 10%), and the caption
            -> "" with its own probability (the paper: 50%) when the run also reads captions;
            gradient step on || eps - eps_theta(alpha_t x_0 + sigma_t eps, t, z_i [, caption]) ||^2   (any target)

z_i reaches the network two ways (nets.unet.UNet._image_embed): projected and added to the time embedding, and projected
into model.image_embed_tokens extra cross-attention tokens after the caption's. The null is zeros (no unit embedding is
zero, so the network can tell it apart; Karlo learns a null vector instead), and it replaces both paths at once (the
DALLE2-pytorch#144 bug: hiddens never dropped). Classifier-free guidance on z_i is then the existing machinery
(generate's `guidance`, the null from the condition spec).

The CLIP (`[unclip] clip`) is a stage: pinned by checkpoint step (unclip.clip_step, 0 = its newest when training starts,
then saved) and checked before anything loads: its images must be this run's (data.channels, data.image_size) and its
width model.image_embed_dim. It embeds each prepared training batch (after flips and augmentation) in the objective's
`conditions_from` hook, under no gradient: it is never trained here and not part of the run's checkpoints. The decoder
works on pixels (the paper's 64 x 64 base model); a latent decoder is refused.

Embedding a batch costs one forward of the CLIP's image tower (the U-Net's contracting path at width 16, no backward):
0.08 s of a 1.84 s step of configs/unclip_decoder_shapes.toml at batch 32 (float32, one thread of a loaded 2-core CPU,
2026-12-07), so the embeddings are not cached.
"""

from __future__ import annotations

import copy
import datetime
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import checkpoint as ckpt
from ..config import RunConfig, load_config
from ..data import load_dataset
from ..denoiser import Denoiser
from ..generate import generate
from ..guidance import check_guidance_scale
from ..nets.clip import CLIP, unit
from ..nets.unclip import PriorTransformer
from ..stages import PixelSpace, Stage, cached, pin_step
from ..tasks.unclip import image_embeddings
from ..visualize import save_grid
from .autoencoder import held_out
from .base import Context, ignored
from .clip import load_clip
from .diffusion import DiffusionObjective, build_denoiser, sample_config_kwargs

SCALES = ("sqrt_d", "znorm")
BATCH = 256  # images or captions per CLIP call


# --- the CLIP run -------------------------------------------------------------------------------------------------
def clip_run(path: str | Path, name: str = "unclip.clip") -> tuple[Path, RunConfig]:
    """(absolute path, config) of a CLIP run. ValueError for an empty `name` or a run of another kind,
    FileNotFoundError when the folder holds no run."""
    if not str(path):
        raise ValueError(f"{name} is empty: name a CLIP run (`diffuse train configs/clip_shapes.toml --out "
                         f"runs/clip_shapes`, then {name} = \"runs/clip_shapes\")")
    run = Path(path).expanduser().resolve()
    if not (run / "config.toml").is_file():
        raise FileNotFoundError(f"{name} = {str(path)!r}: {run} holds no run (no config.toml); train the CLIP first: "
                                "`diffuse train configs/clip_shapes.toml --out runs/clip_shapes`")
    cfg = load_config(run / "config.toml")
    if cfg.model.kind != "clip":
        raise ValueError(f'{name} = {str(path)!r} holds a {cfg.model.kind} run, not a CLIP (model.kind = "clip"); the '
                         "prior diffuses a CLIP's image embeddings and the decoder is conditioned on them: name one "
                         "trained with configs/clip_shapes.toml")
    return run, cfg


# --- unCLIP's decoder: the CLIP stage and the objective ---------------------------------------------------------
def check_clip(cfg: RunConfig, clip_cfg: RunConfig, name: str = "unclip.clip") -> None:
    """ValueError naming the mismatch and the fix when the CLIP of `clip_cfg` cannot embed the images of `cfg` into the
    width its decoder takes: image channels and side (data.channels, data.image_size), embedding width (clip.dim against
    model.image_embed_dim)."""
    d, c = cfg.data, clip_cfg.data
    if (d.channels, d.image_size) != (c.channels, c.image_size):
        raise ValueError(f"{name}: the CLIP reads {c.channels}-channel images of side {c.image_size}, and this run's are "
                         f"{d.channels}-channel of side {d.image_size} (data.channels, data.image_size): train the CLIP on "
                         "images of this run's size, or set this run's data to the CLIP's")
    if clip_cfg.clip.dim != cfg.model.image_embed_dim:
        raise ValueError(f"{name}: the CLIP's embeddings have width {clip_cfg.clip.dim} (its clip.dim) and "
                         f"model.image_embed_dim = {cfg.model.image_embed_dim}: set model.image_embed_dim = "
                         f"{clip_cfg.clip.dim}")


def resolve_clip(cfg: RunConfig, saved: RunConfig | None) -> RunConfig:
    """unclip.clip as an absolute path and unclip.clip_step pinned (the saved run's, else the CLIP's newest checkpoint).
    FileNotFoundError when the CLIP holds no checkpoint yet."""
    cfg = copy.deepcopy(cfg)
    run, _ = clip_run(cfg.unclip.clip)
    cfg.unclip.clip = str(run)
    cfg.unclip.clip_step = pin_step(run, cfg.unclip.clip_step, saved.unclip.clip_step if saved else 0, "CLIP")
    return cfg


# --- the objective -----------------------------------------------------------------------------------------------------
class UnclipDecoderObjective(DiffusionObjective):
    """DiffusionObjective with the condition `image_embed` = the frozen CLIP's z_i of each prepared training image
    (`conditions_from`), dropped per train.condition_dropout like any key. Previews: the first training images above,
    their decodings from z_i (and caption) with the fixed noise of train.seed as x_T below."""

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """The diffusion checks, then: pixels (no latent.autoencoder), unclip.clip a CLIP run whose images and width are
        this run's (`check_clip`). ValueError / FileNotFoundError naming the setting."""
        if cfg.latent.autoencoder:  # before the diffusion checks read the autoencoder run
            raise ValueError("model.image_embed_dim: unCLIP's decoder works on pixels (the CLIP embeds the images, not the "
                             "latents): remove latent.autoencoder")
        super().check_config(cfg)
        if cfg.task.kind != "none":
            raise ValueError(f"model.image_embed_dim with task.kind = '{cfg.task.kind}': the decoder's condition is the "
                             "image embedding; remove task.kind")
        _, clip_cfg = clip_run(cfg.unclip.clip)
        check_clip(cfg, clip_cfg)

    @classmethod
    def resolve(cls, cfg: RunConfig, saved: RunConfig | None) -> RunConfig:
        return resolve_clip(super().resolve(cfg, saved), saved)

    def __init__(self, cfg: RunConfig, data, ctx: Context):
        super().__init__(cfg, data, ctx)
        _, self.clip = load_clip(cfg.unclip.clip, ctx.device, cfg.unclip.clip_step or None)

    def conditions_from(self, x0: Tensor) -> dict[str, Tensor]:
        """{"image_embed": z_i (B, D)} of the prepared clean batch, by the frozen CLIP at t = 0."""
        return {"image_embed": image_embeddings(self.clip, x0)}

    @torch.no_grad()
    def fixed_samples(self, trainer, n: int, steps: int = 0) -> tuple[Tensor, list[Tensor]]:
        """Decodings of the first n training images' z_i (and captions) with the EMA weights, x_T from the fixed noise
        of train.seed and the run's [sample] settings (`steps` > 0 replaces sample.steps). Returns (samples, [those
        images])."""
        idx = torch.arange(n) % len(self.dataset)
        x, extras = self.dataset.batch(idx)
        x = x.to(trainer.device)
        cond = {"image_embed": image_embeddings(self.clip, x)}
        if self.cfg.model.text_encoder:
            cond["text"] = extras["text"].to(trainer.device)
        kwargs = sample_config_kwargs(self.cfg.sample) | ({"steps": steps} if steps else {})
        out = generate(build_denoiser(self.cfg, trainer.ema.model), n, self.space.shape, cond=cond,
                       seed=self.cfg.train.seed, device=trainer.device, **kwargs)
        return out, [x]

    def preview(self, trainer) -> Path:
        """RUN/samples/step_NNNNNNNN.png: sample.n training images above, their decodings below."""
        out, (x,) = self.fixed_samples(trainer, min(self.cfg.sample.n, len(self.dataset)))
        return save_grid(torch.cat([x, out]), trainer.run_dir / "samples" / f"step_{trainer.step:08d}.png",
                         nrow=len(x))


# --- the diffused variable ------------------------------------------------------------------------------------------
def scale_embedding(z: Tensor, how: str, stats: dict[str, Tensor]) -> Tensor:
    """CLIP embeddings (B, D) -> the prior's variable (B, D): "sqrt_d": sqrt(D) z / |z| (norm sqrt(D); DALLE2-pytorch's
    image_embed_scale, crowsonkb in DALLE2-pytorch#60); "znorm": (z / |z| - mean) / std with the training embeddings'
    `stats` (Karlo's PriorTransformer clip_mean, clip_std). ValueError for another `how`."""
    z = unit(z)
    if how == "sqrt_d":
        return z * math.sqrt(z.shape[-1])
    if how == "znorm":
        return (z - stats["mean"].to(z)) / stats["std"].to(z)
    raise ValueError(f"unclip.scale = {how!r} is not a scaling; choose one of {', '.join(map(repr, SCALES))}")


def unscale_embedding(z: Tensor, how: str, stats: dict[str, Tensor]) -> Tensor:
    """The inverse of `scale_embedding`, back to unit vectors in CLIP's space (B, D): "sqrt_d": z / sqrt(D), "znorm":
    z std + mean (Karlo's post_process_latents), then z / |z| (CLIP scores unit vectors)."""
    if how == "sqrt_d":
        return unit(z / math.sqrt(z.shape[-1]))
    if how == "znorm":
        return unit(z * stats["std"].to(z) + stats["mean"].to(z))
    raise ValueError(f"unclip.scale = {how!r} is not a scaling; choose one of {', '.join(map(repr, SCALES))}")


def text_condition(text: Tensor) -> Tensor:
    """The text embedding as the prior reads it: sqrt(D) z_t / |z_t| (B, D), the scale of the diffused variable."""
    return unit(text) * math.sqrt(text.shape[-1])


# --- the embeddings of the CLIP run's training images: a stage ----------------------------------------------------
@torch.no_grad()
def embed(clip: CLIP, clip_cfg: RunConfig, images: Tensor | None, captions: list[str], device="cpu") -> dict[str, Tensor]:
    """A CLIP's embeddings, on the CPU: {"image": (N, D) unit image embeddings of `images` (N, C, H, W) in [-1, 1]
    (clean: a noise-aware CLIP reads them at t = 0; left out for images None), "text": (N, D) unit text embeddings,
    "context": (N, M, d) its text tower's token states (zero at padding), "context_mask": (N, M) bool} of the captions.
    ValueError for a caption over the tokenizer's length (nets/text.py)."""
    out = {"text": [], "context": [], "context_mask": []}
    tokens = clip.tokenize(list(captions))
    for part in tokens.split(BATCH):
        part = part.to(device)
        states, mask = clip.text_encoder(part)
        out["text"].append(clip.text_embedding(part).float().cpu())
        out["context"].append(states.float().cpu())
        out["context_mask"].append(mask.bool().cpu())
    out = {k: torch.cat(v) for k, v in out.items()}
    if images is not None:
        image = []
        for x in images.split(BATCH):  # clean images: a noise-aware CLIP reads them at its clean_model_time
            image.append(clip.image_embedding(x.to(device)).float().cpu())
        out["image"] = torch.cat(image)
    return out


def clip_embeddings(run: str | Path, step: int, device="cpu") -> dict[str, Tensor]:
    """The CLIP run's training images (its data's training split) embedded by its checkpoint `step` (`embed`), with
    "index" (N,) the images' indices in its data and "mean", "std" (D,) of the unit image embeddings over them; on the
    CPU, cached in RUN/unclip_embeddings_step_NNNNNNNN.safetensors (one file per checkpoint, so priors pinned to different
    steps do not overwrite each other's) under the checkpoint's manifest hash (stages.cached; a read-only CLIP run
    folder costs only the cache)."""
    run, cfg = clip_run(run)
    data = load_dataset(cfg.data)
    train_idx, _ = held_out(len(data))

    def compute() -> dict[str, Tensor]:
        _, clip = load_clip(run, device, step)
        images = torch.cat([data.batch(i)[0] for i in train_idx.split(BATCH)])
        out = embed(clip, cfg, images, [data.captions[i] for i in train_idx], device)
        return {**out, "index": train_idx, "mean": out["image"].mean(0), "std": out["image"].std(0).clamp_min(1e-6)}

    key = Stage("clip", run, step).key(data=vars(cfg.data), n=len(train_idx))
    return cached(run / f"unclip_embeddings_step_{step:08d}.safetensors", key, compute)


class EmbeddingDataset:
    """The prior's training data (data.base's protocol, shape (D,)): the scaled image embeddings, and per example the
    condition {"text_embed" (D,), "context" (M, d), "context_mask" (M,)}; `stats` the unit image embeddings' mean and
    std (D,)."""

    condition_keys = ("text_embed", "context")
    num_classes = 0

    def __init__(self, codes: Tensor, stats: dict[str, Tensor], **extras: Tensor):
        self.codes, self.stats, self.extras = codes, stats, extras
        self.shape = tuple(codes.shape[1:])

    def __len__(self) -> int:
        return len(self.codes)

    def batch(self, idx: Tensor) -> tuple[Tensor, dict]:
        return self.codes[idx], {k: v[idx] for k, v in self.extras.items()}


def embeddings_for(cfg: RunConfig) -> EmbeddingDataset:
    """The training embeddings of unclip.clip at unclip.clip_step, scaled by unclip.scale, as an EmbeddingDataset."""
    e = clip_embeddings(cfg.unclip.clip, cfg.unclip.clip_step)
    stats = {"mean": e["mean"], "std": e["std"]}
    return EmbeddingDataset(scale_embedding(e["image"], cfg.unclip.scale, stats), stats,
                            text_embed=text_condition(e["text"]), context=e["context"], context_mask=e["context_mask"])


def build_prior(cfg: RunConfig, clip_cfg: RunConfig) -> PriorTransformer:
    """The prior's transformer for a config and its CLIP run's config (D = clip.dim, d and M of its text tower)."""
    u, c = cfg.unclip, clip_cfg
    text_width = 384 if c.model.text_encoder == "minilm" else c.clip.text_width
    return PriorTransformer(c.clip.dim, text_width, c.model.max_tokens, u.width, u.layers, u.heads)


# --- the objective ----------------------------------------------------------------------------------------------------
class UnclipPriorObjective(DiffusionObjective):
    """model.kind = "unclip_prior": DiffusionObjective's L_simple on the CLIP image embeddings of unclip.clip (scaled:
    unclip.scale), the caption dropped per example with probability unclip.text_dropout (embedding and tokens
    together). Draws as DiffusionObjective: flips (unused), t, eps (B, D), one dropout uniform. No previews (the
    decoder is another run) and no FID: `diffuse eval PRIORRUN --metric prior` measures it."""

    @classmethod
    def unused(cls, cfg: RunConfig) -> list[tuple[str, str, str]]:
        why = 'model.kind = "unclip_prior" is a transformer over CLIP embeddings ([unclip])'
        model = [(f"model.{f}", why, "remove it") for f in (
            "channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads", "dropout", "norm_groups",
            "patch_size", "class_conditional", "cond_channels", "scalar_inputs", "context_dim", "cross_attention_resolutions",
            "text_encoder", "max_tokens", "learned_variance", "self_condition", "checkpointing", "semantic_dim")]
        rest = [(k, why, "remove it") for k, w, f in DiffusionObjective.unused(cfg) if not k.startswith("model.")]
        return (model + rest + ignored(cfg, why + ", on the embeddings of unclip.clip's data",
                                       ("data", "task", "latent", "autoencoder", "segment"))
                + [("train.fid_every", why + "; measure it with `diffuse eval RUN --metric prior`", "remove it")] * bool(cfg.train.fid_every)
                + [("train.condition_dropout", why + ": it drops the caption with unclip.text_dropout",
                    "remove it")] * bool(cfg.train.condition_dropout))

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        clip_run(cfg.unclip.clip)
        u, t = cfg.unclip, cfg.train
        for bad, why in [(min(u.width, u.layers, u.heads) < 1 or u.width % u.heads,
                          f"unclip.width, unclip.layers and unclip.heads must be >= 1 and the width divisible by the heads, "
                          f"got {u.width}, {u.layers}, {u.heads}"),
                         (not 0 <= u.text_dropout < 1, f"unclip.text_dropout must be a probability in [0, 1) (the paper: "
                                                       f"0.1), got {u.text_dropout}"),
                         (cfg.sample.guidance > 0 and u.text_dropout == 0,
                          "sample.guidance > 0 needs the unconditional model: set unclip.text_dropout > 0 (the paper: 0.1)"),
                         (cfg.sample.guidance < 0, f"sample.guidance must be >= 0, got {cfg.sample.guidance}"),
                         (t.hflip, "train.hflip would reverse the embedding's entries; set it to false"),
                         (t.loss != "simple", f"train.loss = '{t.loss}' needs the images' discrete likelihood; embeddings "
                                              "train with 'simple' (DALLE2-pytorch: the MSE of the clean embedding)"),
                         (t.offset_noise > 0, "train.offset_noise shifts image channels; set it to 0"),
                         (t.augment_p > 0, "train.augment_p augments images, not embeddings; set it to 0"),
                         (cfg.model.prediction == "edm" and cfg.schedule.kind != "edm",
                          "model.prediction = 'edm' needs schedule.kind = 'edm'")]:
            if bad:
                raise ValueError(f'model.kind = "unclip_prior": {why}')

    @classmethod
    def resolve(cls, cfg: RunConfig, saved: RunConfig | None) -> RunConfig:
        """The CLIP pinned as the decoder pins it (`resolve_clip`), and sample.clip off: embeddings have no [-1, 1] range."""
        cfg = resolve_clip(cfg, saved)
        cfg.sample.clip = False
        return cfg

    @classmethod
    def load_data(cls, cfg: RunConfig):
        return embeddings_for(cfg)

    def __init__(self, cfg: RunConfig, data, ctx: Context):
        self.ctx, self.cfg = ctx, cfg
        self.dataset = self.pixels = data
        self.space = PixelSpace(data.shape)
        self.importance_sampling, self.augment_p, self.importance = False, 0.0, None
        self.dropout = {"text_embed": cfg.unclip.text_dropout} if cfg.unclip.text_dropout > 0 else {}
        self.clip_cfg = clip_run(cfg.unclip.clip)[1]

    def build(self) -> dict[str, nn.Module]:
        return {"model": build_prior(self.cfg, self.clip_cfg)}

    def condition(self, cond: dict, dropped: dict[str, Tensor]) -> dict:
        """The caption dropped whole: where "text_embed" is dropped, its token states go with it (one coin, as
        DALLE2-pytorch's text_keep_mask), both at their null values (zeros; the mask attends every zero token)."""
        if "text_embed" in dropped:
            dropped = {**dropped, "context": dropped["text_embed"]}
        return super().condition(cond, dropped)

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass

    def checkpoint_info(self) -> dict:
        """The scaling and the training image embeddings' mean and std: what unscales the embeddings it draws."""
        return {"scale": self.cfg.unclip.scale, "mean": self.dataset.stats["mean"].tolist(),
                "std": self.dataset.stats["std"].tolist()}

    def preview(self, trainer) -> None:
        return None

    def evaluate(self, trainer) -> tuple[dict, float | None]:
        return {}, None


# --- sampling ---------------------------------------------------------------------------------------------------------
@dataclass
class Prior:
    """A trained prior, ready to sample: its config, its denoiser (EMA weights, eval mode, no gradients), its CLIP (the
    pinned checkpoint of unclip.clip, for the prompts' embeddings), the scaling and stats, its checkpoint step."""

    cfg: RunConfig
    denoiser: Denoiser
    clip: CLIP
    clip_cfg: RunConfig
    scale: str
    stats: dict[str, Tensor]
    step: int


def load_prior(run: str | Path, device="cpu", step: int | None = None, ema: bool = True) -> Prior:
    """The prior of a run folder (model.kind = "unclip_prior") at checkpoint `step` (None: the newest), its EMA (or raw)
    weights, with its CLIP. FileNotFoundError for a folder without a run or the checkpoint; ValueError for another
    kind."""
    run = Path(run)
    if not (run / "config.toml").is_file():
        raise FileNotFoundError(f"{run} holds no run (no config.toml); train a prior with `diffuse train "
                                "configs/unclip_prior_shapes.toml --out runs/unclip_prior`")
    cfg = load_config(run / "config.toml")
    if cfg.model.kind != "unclip_prior":
        raise ValueError(f'{run} holds a {cfg.model.kind} run, not an unCLIP prior (model.kind = "unclip_prior"); pass a '
                         "run of configs/unclip_prior_shapes.toml")
    c = ckpt.load_checkpoint(run, step)
    clip_cfg, clip = load_clip(clip_run(cfg.unclip.clip, f"{run}'s unclip.clip")[0], device, cfg.unclip.clip_step)
    net = build_prior(cfg, clip_cfg)
    group = "ema" if ema else "model"
    ckpt.load_weights(net, c.tensors[group], config=run / "config.toml",
                      weights=Path(ckpt.CHECKPOINTS) / f"step_{c.step:08d}" / f"{group}.safetensors")
    stats = {k: torch.tensor(c.state[k], dtype=torch.float32) for k in ("mean", "std")}
    den = build_denoiser(cfg, net.to(device).eval().requires_grad_(False))
    return Prior(cfg, den, clip, clip_cfg, c.state["scale"], stats, c.step)


def check_prompts(prompts) -> list[str]:
    """The prompts as a list, none empty or blank: an empty prompt has no caption to condition on (its embedding
    would be the text tower's reading of nothing, not the unconditional model). ValueError naming it."""
    listed = [prompts] if isinstance(prompts, str) else list(prompts)
    if not listed:
        raise ValueError("the prior needs at least one prompt to draw image embeddings for; pass one with --prompt")
    for i, p in enumerate(listed):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} is {p!r}: the prior draws the image embedding of a caption and needs words; "
                             "give it a caption such as 'a large red circle on the left' (--prompt)")
    return listed


def prompt_condition(prior: Prior, prompts: list[str]) -> tuple[dict[str, Tensor], Tensor]:
    """(the prior's condition {"text_embed", "context", "context_mask"} of the prompts on its device, their unit text
    embeddings (B, D)). ValueError for a prompt over the CLIP tokenizer's length."""
    device = next(prior.denoiser.net.parameters()).device
    e = embed(prior.clip, prior.clip_cfg, None, prompts, device)
    cond = {"text_embed": text_condition(e["text"]), "context": e["context"], "context_mask": e["context_mask"]}
    return {k: v.to(device) for k, v in cond.items()}, e["text"]


def pick_best(candidates: Tensor, text: Tensor) -> Tensor:
    """Of k candidate embeddings per caption (B, k, D), the one with the highest cosine to the caption's text
    embedding (B, D) -> (B, D) (Ramesh et al. 2022, sec. 2.2: two samples, the higher dot product with z_t)."""
    cos = (unit(candidates) * unit(text)[:, None, :]).sum(-1)                  # (B, k)
    return candidates[torch.arange(len(candidates)), cos.argmax(1)]


@torch.no_grad()
def sample_image_embeddings(prior: Prior | str | Path, prompts, guidance: float | None = None, steps: int | None = None,
                            best_of: int = 2, seed: int = 0, *, sampler: str | None = None, device=None,
                            **options) -> Tensor:
    """CLIP image embeddings (B, D) unit vectors in CLIP's space for B prompts: best_of draws per prompt from the prior
    (a loaded Prior or a run folder), guided with weight `guidance` (None: the run's sample.guidance; (1 + w) f(c) -
    w f(null), Ho & Salimans 2022), `steps` and `sampler` (None: the run's [sample]) and sampler `options` (eta, ...),
    unscaled, the one with the highest cosine to the prompt's text embedding kept (`pick_best`). x_T and all noise from
    `seed`. `device`: where a run folder is loaded (a loaded Prior samples where it is). Returns (B, D) on the CPU. ValueError for no prompt, an empty prompt, a prompt over the tokenizer's length, a guidance weight that is
    not a finite number >= 0, best_of < 1."""
    prompts = check_prompts(prompts)
    if isinstance(prior, (str, Path)):
        prior = load_prior(prior, device or "cpu")
    s = prior.cfg.sample
    guidance = check_guidance_scale(s.guidance if guidance is None else guidance, "prior's classifier-free guidance",
                                    "--guidance")
    if isinstance(best_of, bool) or not isinstance(best_of, int) or best_of < 1:
        raise ValueError(f"best_of is the number of draws per prompt to choose from and must be an integer >= 1 (the "
                         f"paper: 2), got {best_of!r}")
    cond, text = prompt_condition(prior, prompts)
    n = len(prompts) * best_of
    cond = {k: v.repeat_interleave(best_of, 0) for k, v in cond.items()}  # prompt i's draws are rows i k .. i k + k - 1
    kw = sample_config_kwargs(s) | {"guidance": guidance, "clip": False, "dynamic_threshold": 0.0}
    kw |= {k: v for k, v in (("steps", steps), ("sampler", sampler)) if v is not None} | options
    z = generate(prior.denoiser, n, (prior.denoiser.net.dim,), cond=cond, seed=seed,
                 device=next(prior.denoiser.net.parameters()).device, **kw)
    z = unscale_embedding(z.float().cpu(), prior.scale, prior.stats)
    return pick_best(z.view(len(prompts), best_of, -1), text)


# --- the measurement --------------------------------------------------------------------------------------------------
def unrelated(captions: list[str]) -> Tensor:
    """For each of N captions, the index of the nearest later one (cyclically) with a different caption (N,) int64.
    ValueError when all captions are the same."""
    if len(set(captions)) < 2:
        raise ValueError("the held-out images all have one caption; an unrelated caption's image needs two or more")
    N = len(captions)
    return torch.tensor([next((i + j) % N for j in range(1, N) if captions[(i + j) % N] != captions[i]) for i in range(N)])


def same_caption(captions: list[str]) -> Tensor:
    """For each of N captions, the index of the nearest later other one with the same caption, or -1 (N,) int64."""
    N = len(captions)
    return torch.tensor([next(((i + j) % N for j in range(1, N) if captions[(i + j) % N] == captions[i]), -1)
                         for i in range(N)])


def prior_cosines(pred: Tensor, image: Tensor, text: Tensor, captions: list[str], train_mean: Tensor) -> dict:
    """The prior's figures (DALLE2-pytorch's report_cosine_sims) for N held-out pairs: predicted embeddings `pred`, the
    true image embeddings `image` and text embeddings `text` (N, D), their captions; means over the pairs of
    cos(pred, its image), cos(pred, its caption), cos(pred, an unrelated caption's image), the share of pairs where the
    first beats the third, and the baselines: cos(image, caption) (CLIP's own), cos(image, another image of the same
    caption) (what a prior that reads only the caption can hope for), cos(image, an unrelated caption's image), and
    cos(the training images' mean embedding, image) (a prior that ignores the caption)."""
    cos = lambda a, b: (unit(a.float()) * unit(b.float())).sum(-1)  # noqa: E731
    other, same = unrelated(captions), same_caption(captions)
    has = same >= 0
    to_true, to_other = cos(pred, image), cos(pred, image[other])
    out = {"cos_pred_image": float(to_true.mean()), "cos_pred_text": float(cos(pred, text).mean()),
           "cos_pred_unrelated_image": float(to_other.mean()),
           "share_pred_closer_to_own_image": float((to_true > to_other).float().mean()),
           "baseline_cos_image_text": float(cos(image, text).mean()),
           "baseline_cos_image_same_caption_image": float(cos(image[has], image[same[has]]).mean()) if bool(has.any()) else None,
           "baseline_cos_image_unrelated_image": float(cos(image, image[other]).mean()),
           "baseline_cos_train_mean_image": float(cos(train_mean.expand_as(image), image).mean())}
    return out


def evaluate_run(run: str | Path, device="cpu", seed: int = 0, n: int | None = None, guidance: float | None = None,
                 steps: int | None = None, sampler: str | None = None, best_of: int = 2) -> dict:
    """`diffuse eval PRIORRUN --metric prior`'s record: `prior_cosines` of best-of-k predictions for the captions of the
    CLIP run's held-out images (every tenth of its data; the first n of them, all with n None), with the run's [sample]
    settings unless given."""
    prior = load_prior(run, device)
    data = load_dataset(prior.clip_cfg.data)
    _, test = held_out(len(data))
    test = test[:n] if n else test
    captions = [data.captions[i] for i in test]
    images = torch.cat([data.batch(i)[0] for i in test.split(BATCH)])
    true = embed(prior.clip, prior.clip_cfg, images, captions, device)
    pred = torch.cat([sample_image_embeddings(prior, captions[lo:lo + BATCH], guidance, steps, best_of, seed + lo,
                                              sampler=sampler) for lo in range(0, len(captions), BATCH)])
    s = prior.cfg.sample
    return {"metric": "prior", "step": prior.step, "n_held_out": len(test), "distinct_captions": len(set(captions)),
            "guidance": s.guidance if guidance is None else guidance, "steps": s.steps if steps is None else steps,
            "sampler": sampler or s.sampler, "best_of": best_of, "seed": seed,
            **prior_cosines(pred, true["image"], true["text"], captions, prior.stats["mean"]),
            "note": "cosines in the CLIP's space of best-of-k prior draws for the CLIP run's held-out captions (every "
                    "tenth image) against those images' embeddings; 'unrelated' is the next held-out image with another "
                    "caption; baselines need no prior", "date": datetime.date.today().isoformat()}
