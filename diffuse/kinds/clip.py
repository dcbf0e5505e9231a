"""The CLIP kind (model.kind = "clip"): an image tower and a text tower (nets/clip.py) trained with the symmetric
InfoNCE loss of Radford et al. 2021 (open_clip's ClipLoss) on captioned images (data.source = "shapes", "digits",
"mnist"), by the one Trainer; and its measurement, held-out retrieval recall (`diffuse eval CLIPRUN --metric retrieval`).

    L = ( CE(s I T^T, Y) + CE(s T I^T, Y) ) / 2       I, T: the global batch's unit image and text embeddings (N, D)

with s = exp(logit_scale) (clamped to [0, ln 100] after every step: Objective.after_step). The embeddings of every
process are gathered with their gradient (distributed.gather_with_grad), so each process computes the loss of the
whole global batch and 2-process DDP takes the step one process takes. Identical captions in one batch are not
negatives: the targets Y are soft, Y_ij = [c_i = c_j] / #{k : c_k = c_i}, the row's mass shared equally among the
images (texts) with the same caption; with all captions distinct Y = I, the plain CE of open_clip. The grammar's scenes
repeat captions ("a large red circle"), and captioned digits have only ten, so hard targets would push apart pairs that
are equally right.

The noise-aware variant (clip.noise_aware, GLIDE's noised CLIP, Nichol et al. 2021) reads x_t = alpha_t x_0 + sigma_t
eps of the run's [schedule] at its continuous model time, t = 0 for a share clip.clean_share of the examples and
t ~ U(0, t_top] otherwise; it can then guide a sampler from its first step.

A CLIP run guides a denoiser run (`diffuse sample RUN --clip CLIPRUN --prompt ... --clip-scale S`): `check_guiding_clip`
says whether it can, `prompt_embedding` embeds the prompt, `clip_guidance` picks the wrapper (guidance.py): GLIDE's
gradient at x_t for a noise-aware CLIP, k-diffusion's on the predicted x_0 (decoded on a latent run) for a plain one.

A step's draws, for the global batch and in this order (noise-aware only; a plain CLIP draws nothing): the clean
uniforms, the t uniforms, eps.

Every tenth image is held out of training (kinds/autoencoder.held_out), so `diffuse eval` measures unseen scenes.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checkpoint as ckpt, distributed
from ..config import RunConfig, load_config
from ..data import Subset, load_dataset
from ..data.captions import Captioned, digit_caption
from ..nets.clip import CLIP
from ..nets.unet import UNetConfig
from ..guidance import ClipX0Guidance, NoisyClipGuidance, check_prompts
from ..schedule import NoiseSchedule, Schedule, ScheduleConfig, to_device
from .autoencoder import held_out
from .base import DIFFUSION_TRAINING, Context, Group, Objective, ignored

TOWER_KEYS = ("kind", "channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads", "dropout",
              "norm_groups", "patch_size", "text_encoder", "max_tokens")  # the [model] keys a CLIP reads
NOISE_LEVELS = (0.0, 0.25, 0.5, 0.75)  # t of the noise-aware CLIP's retrieval figures
KS = (1, 5)                            # recall@k of the retrieval figures


# --- the loss ------------------------------------------------------------------------------------------------------
def caption_targets(tokens: Tensor) -> Tensor:
    """Soft InfoNCE targets of N captions' token ids (N, L): Y (N, N) float32, Y_ij = [c_i = c_j] / #{k : c_k = c_i}
    (rows sum to 1; symmetric; the identity when all captions differ)."""
    same = (tokens[:, None, :] == tokens[None, :, :]).all(-1).float()  # (N, N)
    return same / same.sum(1, keepdim=True)


def info_nce(image: Tensor, text: Tensor, scale: Tensor, targets: Tensor | None = None) -> Tensor:
    """The symmetric InfoNCE of CLIP, 0-d: (CE(s I T^T, Y) + CE(s T I^T, Y^T)) / 2 over unit embeddings image, text
    (N, D) (row i of each is pair i), temperature scale s (0-d) and soft targets Y (N, N) (caption_targets; None: the
    identity, open_clip's arange labels)."""
    logits = scale * image.float() @ text.float().T  # (N, N): image i against text j
    if targets is None:
        targets = torch.eye(len(image), device=image.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2


def draw_noise(B: int, shape: tuple[int, ...], schedule: NoiseSchedule, clean_share: float, g: torch.Generator) -> dict:
    """The noise-aware CLIP's draws for B examples: t (B,) float64, 0 with probability clean_share and U(0, t_top]
    otherwise, and eps (B, *shape)."""
    clean = torch.rand(B, generator=g) < clean_share
    t = schedule.t_top * (1 - torch.rand(B, generator=g, dtype=torch.float64))  # (0, t_top]
    return {"t": torch.where(clean, torch.zeros_like(t), t), "eps": torch.randn((B, *shape), generator=g)}


def clean_model_time(schedule: NoiseSchedule) -> float:
    """The model time at which a noise-aware CLIP reads a clean image x_0, the one value of training (its clean_share),
    retrieval, the unCLIP embeddings and x_0 guidance: model_time(0) where the process defines it (VP: -1, flow: 0),
    else model_time(t_min), the least noise the process knows (EDM: sigma = 0 has no log, model_time(0) = -inf)."""
    zero = float(schedule.model_time(torch.zeros(1, dtype=torch.float64))[0])
    if math.isfinite(zero):
        return zero
    return float(schedule.model_time(torch.full((1,), schedule.t_min, dtype=torch.float64))[0])


def clip_model_time(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """The noise-aware CLIP's model times (B,) float32 of times t (B,) float64: the schedule's, and at t = 0 (the clean
    examples) clean_model_time's."""
    return torch.where(t == 0, torch.tensor(clean_model_time(schedule), dtype=torch.float64),
                       schedule.model_time(t).double()).float()


# --- the objective ---------------------------------------------------------------------------------------------------
def build_clip(cfg: RunConfig) -> CLIP:
    """The CLIP of a config: the image tower from [model]'s U-Net keys (TOWER_KEYS), the text tower model.text_encoder;
    a noise-aware one knows its clean_model_time (so `image_embedding(x)` without a time reads x as clean)."""
    m, c, d = cfg.model, cfg.clip, cfg.data
    tower = dataclasses.replace(UNetConfig(), **{k: getattr(m, k) for k in TOWER_KEYS if k not in ("text_encoder", "max_tokens")})
    model = CLIP(tower, d.channels, d.image_size, c.dim, m.text_encoder, m.max_tokens, c.text_width, c.noise_aware)
    if c.noise_aware:
        model.clean_time = clean_model_time(Schedule.from_config(cfg.schedule))
    return model


def captioned(data):
    """The data's captions, or ValueError naming the sources that have them."""
    if getattr(data, "captions", None) is None:
        raise ValueError('model.kind = "clip" trains on captioned images: set data.source = "shapes" (coloured shapes '
                         'with their captions) or "digits" / "mnist" (captioned "a handwritten seven")')
    return data.captions


class ClipObjective(Objective):
    groups = {"main": Group(("model",))}
    ema = None            # the raw weights are the instrument (as the digit classifier's)
    separable = False     # the loss contrasts the whole global batch
    progress_desc = "CLIP"
    loss_name = "contrastive loss"

    @classmethod
    def unused(cls, cfg: RunConfig) -> list[tuple[str, str, str]]:
        """The denoiser's parameterisation and conditioning, sampling, tasks, stages, the diffusion losses, FID and
        flips (a flipped "on the left" scene would contradict its caption); the [schedule] of a plain CLIP."""
        why = 'model.kind = "clip" trains a contrastive image-text model'
        model = [(f"model.{f.name}", why + " (its image tower reads the U-Net's width keys only)", "remove it")
                 for f in dataclasses.fields(UNetConfig) if f.name not in TOWER_KEYS]
        plain = () if cfg.clip.noise_aware else ("schedule",)
        out = model + ignored(cfg, why, ("sample", "task", "latent", "autoencoder", *plain),
                              (*DIFFUSION_TRAINING, "fid_every", "hflip"))
        if not cfg.clip.noise_aware:
            out.append(("clip.clean_share", "a plain CLIP reads clean images only", "set clip.noise_aware = true, or remove it"))
        return out

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """A text encoder, an embedding width >= 1, a clean share in [0, 1]; the image tower fits the images."""
        if not cfg.model.text_encoder:
            raise ValueError('model.kind = "clip" needs a text tower: set model.text_encoder = "chars" (trained with the '
                             'image tower) or "minilm" (frozen, with a trained projection)')
        if not 0 <= cfg.clip.clean_share <= 1:
            raise ValueError(f"clip.clean_share is a share of the examples and must lie in [0, 1], got {cfg.clip.clean_share}")
        if cfg.clip.dim < 1 or cfg.clip.text_width < 1:
            raise ValueError(f"clip.dim and clip.text_width must be >= 1, got {cfg.clip.dim} and {cfg.clip.text_width}")

    def __init__(self, cfg: RunConfig, data, ctx: Context):
        captioned(data)
        if len(data) < 10:
            raise ValueError(f"a CLIP run holds out every tenth image for `diffuse eval`: it needs at least 10 images, got "
                             f"{len(data)}; raise data.crops")
        self.cfg, self.ctx, self.pixels = cfg, ctx, data
        self.train_idx, self.test_idx = held_out(len(data))
        if cfg.train.batch_size > len(self.train_idx):
            raise ValueError(f"train.batch_size must be in 1..{len(self.train_idx)} (the training part of {len(data)} "
                             f"images), got {cfg.train.batch_size}")
        self.schedule = Schedule.from_config(cfg.schedule) if cfg.clip.noise_aware else None
        self.dataset = Subset(data, self.train_idx)  # replaced by its captioned version in build

    def build(self) -> dict[str, nn.Module]:
        model = build_clip(self.cfg)
        self.dataset = Subset(Captioned(self.pixels, model.text_encoder), self.train_idx)
        return {"model": model}

    def draw(self, B: int, g: torch.Generator) -> dict[str, Tensor]:
        if self.schedule is None:
            return {}
        d = self.cfg.data
        return draw_noise(B, (d.channels, d.image_size, d.image_size), self.schedule, self.cfg.clip.clean_share, g)

    def losses(self, x: Tensor, extras: dict, d: dict, step: int) -> dict:
        """The global batch's InfoNCE with soft caption targets, 0-d (the same on every process)."""
        model_time = None
        if self.schedule is not None:  # x_t ~ q(x_t | x_0) at the model time the U-Net would take
            x = self.schedule.q_sample(x, d["t"], to_device(d["eps"], x.device))
            model_time = to_device(clip_model_time(self.schedule, d["t"]), x.device)
        image, text, scale = self.nets["model"](x, extras["text"], model_time)
        world = self.ctx.world
        image, text = distributed.gather_with_grad(image, world), distributed.gather_with_grad(text, world)
        targets = caption_targets(distributed.gather(extras["text"], world))
        return {"main": info_nce(image, text, scale, targets), "log": {"logit_scale": scale.detach().log()}}

    def after_step(self) -> None:
        """logit_scale into [0, ln 100] (open_clip's clamp after every optimizer step)."""
        self.modules["model"].clamp_logit_scale()


# --- the measurement -------------------------------------------------------------------------------------------------
def recall_at_k(sim: Tensor, match: Tensor, k: int) -> float:
    """The share of queries (rows of sim (Q, G)) with a correct item (match (Q, G) bool) among their k most similar
    gallery items. ValueError for k < 1."""
    if k < 1:
        raise ValueError(f"recall@k needs k >= 1, got {k}")
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (Q, k)
    return float(match.gather(1, top).any(1).float().mean())


def chance_recall(match: Tensor, k: int) -> float:
    """recall@k of a random ranking: the mean over queries of 1 - C(G - m, k) / C(G, k), m the query's correct items."""
    G = match.shape[1]
    k = min(k, G)
    return float(sum(1 - math.comb(G - int(m), k) / math.comb(G, k) for m in match.sum(1)) / len(match))


def retrieval(image: Tensor, text: Tensor, caption_ids: Tensor, ks=KS) -> dict:
    """Retrieval of N held-out pairs: image (N, D) and text (N, D) unit embeddings, caption_ids (N,) equal for equal
    captions. Text->image: each distinct caption queries the N images, correct those with that caption; image->text:
    each image queries the distinct captions, correct its own. {"t2i_r@k", "i2t_r@k", and their chance}."""
    ids, first = torch.unique(caption_ids, return_inverse=True)
    rows = torch.stack([(first == i).nonzero()[0, 0] for i in range(len(ids))])  # one text row per distinct caption
    unique_text = text[rows]                                  # (U, D)
    match = first[None, :] == torch.arange(len(ids))[:, None]  # (U, N): caption u describes image n
    sim = unique_text.float() @ image.float().T                # (U, N)
    out = {}
    for k in ks:
        out[f"t2i_r@{k}"], out[f"i2t_r@{k}"] = recall_at_k(sim, match, k), recall_at_k(sim.T, match.T, k)
        out[f"t2i_chance@{k}"], out[f"i2t_chance@{k}"] = chance_recall(match, k), chance_recall(match.T, k)
    return out


def load_clip(run_dir: str | Path, device: str | torch.device = "cpu", step: int | None = None) -> tuple[RunConfig, CLIP]:
    """(config, CLIP in eval mode without gradients) of a CLIP run folder (model.kind = "clip"), its newest checkpoint
    or `step`. ValueError naming the fix for a run of another kind; FileNotFoundError for a folder that holds no run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir} holds no run (no config.toml); train one with `diffuse train "
                                "configs/clip_shapes.toml --out RUN`")
    cfg = load_config(run_dir / "config.toml")
    if cfg.model.kind != "clip":
        raise ValueError(f"{run_dir} holds a {cfg.model.kind} (model.kind = {cfg.model.kind!r}), not a CLIP; pass a run of "
                         "configs/clip_shapes.toml")
    c = ckpt.load_checkpoint(run_dir, step)
    model = build_clip(cfg)
    ckpt.load_weights(model, c.tensors["model"], config=run_dir / "config.toml",
                      weights=Path(ckpt.CHECKPOINTS) / f"step_{c.step:08d}" / "model.safetensors")
    model.step = c.step
    return cfg, model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def retrieval_scores(model: CLIP, cfg: RunConfig, images: Tensor, captions: list[str], labels: Tensor | None = None,
                     seed: int = 0, batch: int = 256) -> dict:
    """A CLIP's held-out figures: retrieval (see `retrieval`) at each noise level t of NOISE_LEVELS for a noise-aware
    CLIP (x_t of cfg's schedule, eps from `seed`), at t = 0 for a plain one; and with digit `labels` (N,) the zero-shot
    accuracy of the ten prompts "a handwritten zero" .. "nine" (argmax of the cosine). images (N, C, H, W) in [-1, 1]."""
    device = model.logit_scale.device
    tokens = model.tokenize(list(captions))
    _, caption_ids = torch.unique(tokens, dim=0, return_inverse=True)
    text = torch.cat([model.text_embedding(part.to(device)) for part in tokens.split(batch)]).cpu()
    schedule = Schedule.from_config(cfg.schedule) if model.noise_aware else None
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    prompts = model.text_embedding(model.tokenize([digit_caption(k) for k in range(10)]).to(device)).cpu() if labels is not None else None
    levels = {}
    for t in (NOISE_LEVELS if model.noise_aware else (0.0,)):
        image = []
        for x, e in zip(images.split(batch), eps.split(batch)):
            x, mt = x.to(device), None
            if schedule is not None:
                tt = torch.full((len(x),), t, dtype=torch.float64)
                x, mt = schedule.q_sample(x, tt, e.to(device)), to_device(clip_model_time(schedule, tt), device)
            image.append(model.image_embedding(x, mt).cpu())
        image = torch.cat(image)
        level = retrieval(image, text, caption_ids)
        if prompts is not None:
            level["zero_shot_accuracy"] = float(((image @ prompts.T).argmax(1) == labels).float().mean())
        levels[f"t={t:g}"] = level
    return levels


def evaluate_run(run_dir: str | Path, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """`diffuse eval CLIPRUN --metric retrieval`'s record: the run's held-out images (every tenth of its data),
    retrieval recall@1/5 both ways per noise level, zero-shot digit accuracy on captioned digits, and what changes the
    figures (the gallery size and its distinct captions: chance rises as they fall); one key "t=T" per noise level
    holding that level's figures."""
    cfg, model = load_clip(run_dir, device)
    data = load_dataset(cfg.data)
    captions = captioned(data)
    _, test = held_out(len(data))
    images, cond = data.batch(test)
    digits = cfg.data.source in ("digits", "mnist")
    levels = retrieval_scores(model, cfg, images, [captions[i] for i in test], cond["label"] if digits else None, seed)
    return {"metric": "retrieval", "step": model.step, "n_held_out": len(test),
            "distinct_captions": len({captions[i] for i in test}), "noise_aware": model.noise_aware, "seed": seed,
            **levels, "note": "recall@k against the held-out gallery (every tenth image) per noise level t (x_t of the "
            "run's process, eps from the seed); a larger gallery or fewer distinct captions changes the figure; each "
            "*_chance is a random ranking's", "date": datetime.date.today().isoformat()}


# --- guiding a denoiser run (`diffuse sample RUN --clip CLIPRUN --prompt ... --clip-scale S`) -------------------------
PROCESS_TIMES = 65  # times from t_min to t_top at which `same_process` compares two processes


def same_process(a: ScheduleConfig, b: ScheduleConfig, times: int = PROCESS_TIMES) -> bool:
    """Whether two [schedule]s give one process as a noise-aware CLIP sees it: the same grid ends t_min and t_top and,
    at `times` times between them, the same alpha_t, sigma_t (x_t = alpha_t x_0 + sigma_t eps) and network time input
    (rel. 1e-6). Keys that only change how training draws t (edm's p_mean, flow's t_sampling) do not count."""
    sa, sb = Schedule.from_config(a), Schedule.from_config(b)
    if not (math.isclose(sa.t_min, sb.t_min, rel_tol=1e-9) and math.isclose(sa.t_top, sb.t_top, rel_tol=1e-9)):
        return False
    t = torch.linspace(sa.t_min, sa.t_top, times, dtype=torch.float64)
    return all(torch.allclose(f(sa, t).double(), f(sb, t).double(), rtol=1e-6, atol=1e-12)
               for f in (lambda s, t: s.alpha(t), lambda s, t: s.sigma(t), lambda s, t: s.model_time(t)))


def check_guiding_clip(run_cfg: RunConfig, clip_cfg: RunConfig, name: str) -> None:
    """Whether the CLIP run of config clip_cfg (called `name` in messages) can guide samples of the denoiser run of
    config run_cfg: a CLIP (model.kind = "clip") of the run's image channels and side; a noise-aware one also reads
    x_t itself, so it must know the run's process (`same_process`) and its space (CLIPs train on pixels here: a latent
    run is guided by a plain CLIP, which reads the decoded x_0). ValueError naming the mismatch and the fix."""
    if clip_cfg.model.kind != "clip":
        raise ValueError(f"{name} holds a {clip_cfg.model.kind} run (model.kind = {clip_cfg.model.kind!r}), not a CLIP; pass "
                         "a CLIP run, e.g. one of `diffuse train configs/clip_shapes.toml --out CLIPRUN`")
    if run_cfg.model.video:
        raise ValueError(f"{name} reads images and this run draws videos; CLIP guidance works on a model of images")
    d, c = run_cfg.data, clip_cfg.data
    if (c.channels, c.image_size) != (d.channels, d.image_size):
        raise ValueError(f"{name} was trained on {c.channels}-channel {c.image_size}x{c.image_size} images and this run "
                         f"draws {d.channels}-channel {d.image_size}x{d.image_size} ones; train a CLIP at the run's size "
                         f"(--set data.channels={d.channels} --set data.image_size={d.image_size})")
    if not clip_cfg.clip.noise_aware:
        return
    if run_cfg.latent.autoencoder:
        raise ValueError(f"{name} is noise-aware: it reads x_t of images, and this run diffuses latents of "
                         f"{run_cfg.latent.autoencoder} (a CLIP trains on images only); guide it with a plain CLIP "
                         "(trained without clip.noise_aware), which reads the decoded x_0")
    if not same_process(run_cfg.schedule, clip_cfg.schedule):
        keys = [f.name for f in dataclasses.fields(ScheduleConfig)
                if getattr(run_cfg.schedule, f.name) != getattr(clip_cfg.schedule, f.name)]
        there = ", ".join(f"schedule.{k} = {getattr(clip_cfg.schedule, k)!r} there, {getattr(run_cfg.schedule, k)!r} here"
                          for k in keys)
        sets = " ".join(f"--set schedule.{k}={getattr(run_cfg.schedule, k)}" for k in keys)
        raise ValueError(f"{name} is noise-aware and was trained on x_t of another process than this run's ({there}): "
                         f"at a time t its x_t holds another mix of image and noise; train it on this run's process "
                         f"({sets}), or guide with a plain CLIP (on the predicted x_0)")


def prompt_embedding(clip: CLIP, prompt: str) -> Tensor:
    """g(c) (D,), the unit text embedding of one prompt by the CLIP's text tower, on its device. ValueError for an empty
    prompt (guidance.check_prompts) or one that needs more tokens than the tower's max_tokens (never truncated)."""
    (prompt,) = check_prompts(prompt)
    encoder = clip.text_encoder
    need = len(encoder.encode_ids(prompt))
    if need > encoder.max_tokens:
        raise ValueError(f"the prompt needs {need} {encoder.unit} of the CLIP's text tower, more than its max_tokens = "
                         f"{encoder.max_tokens} (prompts are never truncated); shorten it")
    with torch.no_grad():
        return clip.text_embedding(clip.tokenize([prompt]).to(clip.logit_scale.device))[0]


def clip_guidance(denoiser, clip: CLIP, text_emb: Tensor, scale: float, cutouts: int = 1, seed: int = 0, decode=None):
    """`denoiser` guided by the CLIP towards the text embedding g = text_emb (D,) at scale s: a noise-aware CLIP by
    guidance.NoisyClipGuidance (GLIDE, Nichol et al. 2021, sec. 3.2: eps~ = eps - s sigma_t grad_{x_t} f(x_t, t) . g),
    a plain one by guidance.ClipX0Guidance (k-diffusion: the spherical distance of f(aug(x^_0)) to g, its gradient
    through the denoiser, averaged over `cutouts` RandomShift copies drawn from `seed`; x^_0 `decode`d first on a latent
    run). ValueError as theirs, and for cutouts or a decoder given with a noise-aware CLIP (it reads x_t itself)."""
    if clip.noise_aware:
        if cutouts != 1 or decode is not None:
            raise ValueError("a noise-aware CLIP guides x_t itself: it takes no cutouts and no decoder (those are the "
                             "plain CLIP's, on the predicted x_0)")
        return NoisyClipGuidance(denoiser, clip, text_emb, scale)
    return ClipX0Guidance(denoiser, clip, text_emb, scale, cutouts=cutouts, seed=seed, decode=decode)
