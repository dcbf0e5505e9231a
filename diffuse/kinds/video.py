"""The video denoiser (model.kind = "denoiser" with model.video = true): the diffusion kind on videos x (B, C, F, H, W),
for the one Trainer. It is thin: it adds to DiffusionObjective's draws and loss only what a video does differently.

- One t and one eps per video (Ho et al. 2022; FDM): DiffusionObjective's draws already are per example.
- Masked conditioning, one model for generation, forward and backward prediction and interpolation (FDM, Harvey et al.
  2022, `sample_all_masks`; RaMViD, Hoppe et al. 2022; MCVD, Voleti et al. 2022): per video a boolean `observed` (F,)
  ([video]: p_unconditional, max_observed, patterns; `draw_observed`); the network sees
  x_in = where(observed, x_0, x_t) (`condition_frames`) with the indicator channel (model.video_observed), and the loss
  is the mean over the generated frames only (`masked_l_simple`).
- Joint image-video training (Ho et al. 2022, sec. 3): a share video.p_images of the examples are made of independent
  frames (frame f is frame j_f of video i_f, both uniform, drawn per frame), marked `independent` so temporal attention
  lets each attend only itself; no frame of them is observed.
- Frame subsets of a longer window (FDM, Harvey et al. 2022, who train on frames drawn from a whole video with their
  indices): with video.max_span = M > data.frames = F, the data yield windows of M consecutive frames
  (data.load_dataset(span=M)), each example is F sorted distinct frames of its window (`draw_frame_subsets`), and the
  network is told frame_index = the positions less the first (so the first is 0; tasks.video passes each stage's
  indices the same way). The masks and image examples act on the F chosen frames as on consecutive ones.
- Previews are contact sheets (a row per video, a column per frame) of unconditional samples; the FID of
  train.fid_every is per frame (each frame of unconditional sample videos an image, against the frames of the first
  training videos): it measures what the frames look like, not how they move (the video metrics of trained runs do).

A step's draws: DiffusionObjective's (flips, t, eps, offset noise, dropout; the others are refused), then with
video.p_images > 0: 9. the image coins (B,), 10. their source videos (B, F), 11. their source frames (B, F); then with
video.max_observed > 0: 12. the unconditional coins (B,), 13. k (B,), 14. the pattern (B,), 15. the scattered frames'
uniforms (B, F); then with video.max_span > data.frames: 16. the extents' uniforms (B,), 17. the offsets' uniforms (B,),
18. the inner frames' uniforms (B, max_span - 2). All are drawn whatever their values, so the trajectory depends only on
the seed. (With video.p_images the image frames of draw 11 range over the whole window, 0..max_span - 1.)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..config import RunConfig
from ..data import load_dataset, shape_of
from ..data.video import VIDEO_SOURCES, check_video_config
from ..denoiser import Denoiser
from ..generate import default_labels, generate
from ..losses import ImportanceSampler, l_simple
from ..metrics import extract_features, feature_statistics, frechet_distance
from ..nets.unet import fold_frames
from ..schedule import to_device
from ..stages import PixelSpace
from ..tasks.video import condition_frames, relative_frame_index
from ..visualize import save_contact_sheet, to_uint8
from .base import Context
from .diffusion import DiffusionObjective, build_denoiser, check, sample_config_kwargs

PATTERNS = ("prediction", "backward", "interpolation", "scattered")  # config.VideoPattern, in draw order


# --- masked conditioning: which frames are given, the network's input and the loss ---------------------------------
def draw_observed(B: int, frames: int, max_observed: int, p_unconditional: float, patterns: list[str],
                  g: torch.Generator) -> Tensor:
    """Which frames of each of B videos are given clean: (B, frames) bool.

    Per video: with probability p_unconditional none (RaMViD's uncondition_rate); else k ~ Uniform{1..max_observed}
    frames in a pattern drawn uniformly from `patterns`: "prediction" the first k, "backward" the last k,
    "interpolation" the first ceil(k/2) and last floor(k/2) (k = 1: the first frame), "scattered" k distinct frames
    uniformly at random. Always draws B + B + B + B * frames numbers from g, in that order. ValueError for
    max_observed outside 1..frames - 1 (a video needs a frame to generate) or an unknown pattern."""
    if not 1 <= max_observed < frames:
        raise ValueError(f"video.max_observed must be in 1..{frames - 1} (data.frames - 1), got {max_observed}")
    unknown = [p for p in patterns if p not in PATTERNS]
    if unknown or not patterns:
        raise ValueError(f"video.patterns must name some of {list(PATTERNS)}, got {patterns}")
    unconditional = torch.rand(B, generator=g) < p_unconditional
    k = torch.randint(1, max_observed + 1, (B, 1), generator=g)
    pattern = torch.randint(0, len(patterns), (B,), generator=g)
    rank = torch.rand(B, frames, generator=g).argsort(1).argsort(1)  # each frame's rank: a uniform random order
    f = torch.arange(frames)
    chosen = {"prediction": f < k, "backward": f >= frames - k, "interpolation": (f < (k + 1) // 2) | (f >= frames - k // 2),
              "scattered": rank < k}
    observed = torch.stack([chosen[p] for p in patterns])[pattern, torch.arange(B)]  # (B, frames)
    return observed & ~unconditional[:, None]


def masked_l_simple(denoiser: Denoiser, x0: Tensor, t: Tensor, eps: Tensor, observed: Tensor, *, weighting: str = "none",
                    norm: str = "l2", cond: dict | None = None, **weights) -> Tensor:
    """Per-video L_simple on the generated frames only, (B,):

        L = w(t) sum_f (1 - o_f) mean_{c,h,w} |F_theta(x_in, t)_f - target_f|^p / sum_f (1 - o_f),
        x_in = where(o, x_0, alpha_t x_0 + sigma_t eps)

    o = observed (B, F) bool, p = 2 (norm "l2") or 1 ("l1"), target and w(t) those of losses.l_simple (any prediction and
    weighting): RaMViD's sum_flat(mse m) / sum_flat(m) and FDM's mean_flat with the latent mask. The network's output
    on observed frames does not enter (nor its gradient). `cond`: the network's condition (with "observed" itself when
    it takes it); `weights`: l_simple's weighting parameters. ValueError when a video has every frame observed."""
    latent = ~observed.to(x0.device)
    n_latent = latent.sum(1)
    if not bool((n_latent > 0).all()):
        raise ValueError("every frame of a video is observed: masked conditioning needs a frame to generate")
    raw = denoiser.raw(condition_frames(denoiser.schedule.q_sample(x0, t, eps), x0, observed), t, **(cond or {}))
    # observed frames: the target itself, in float32 as l_simple compares (a bf16 copy would leave its rounding error)
    kept = torch.where(latent[:, None, :, None, None], raw.float(), denoiser.target(x0, eps, t).float())
    return l_simple(denoiser, x0, t, eps, weighting=weighting, norm=norm, raw=kept, **weights) * (x0.shape[2] / n_latent)


# --- frame subsets of a longer window (FDM) ------------------------------------------------------------------------
def frame_subset_extents(frames: int, span: int) -> Tensor:
    """P(L) for the extent L = last - first + 1 of `draw_frame_subsets`' frames, L = frames..span: (span - frames + 1,)
    float64, P(L) proportional to 1 / (L - 1), a discrete log-uniform law of the mean spacing (L - 1) / (frames - 1)
    (FDM draws its spacing log-uniformly: Harvey et al. 2022, `sample_some_indices`)."""
    w = 1.0 / (torch.arange(frames, span + 1, dtype=torch.float64) - 1)
    return w / w.sum()


def draw_frame_subsets(B: int, frames: int, span: int, g: torch.Generator) -> Tensor:
    """Which `frames` of a window of `span` consecutive frames each of B examples trains on: (B, frames) int64 positions
    in 0..span - 1, sorted ascending and distinct.

    The law, per example: the extent L (last - first + 1) is drawn from frame_subset_extents (P(L) ~ 1 / (L - 1) on
    frames..span, so L = frames, consecutive frames, is the likeliest); the first frame o uniformly in 0..span - L; the
    positions are o, o + L - 1 and frames - 2 inner ones, every (frames - 2)-subset of o + 1..o + L - 2 equally likely.
    FDM (Harvey et al. 2022, `sample_some_indices`) draws groups of evenly spaced frames (count uniform, spacing
    log-uniform, start uniform) and unites them; this draws one group of exactly `frames` with the same log-uniform
    extent but any spacing inside it, so the even spacings of hierarchy-2's first stage and the uneven ones of its
    in-between stages (sparse given frames around dense generated ones) both have positive probability. span = frames
    gives arange(frames). Always draws B + B + B * (span - 2) numbers from g, in that order. ValueError for frames < 2
    or span < frames."""
    if not 2 <= frames <= span:
        raise ValueError(f"frame subsets take 2 <= frames <= span, got frames = {frames}, span = {span} (video.max_span "
                         "must be at least data.frames)")
    cdf = frame_subset_extents(frames, span).cumsum(0)
    u_extent = torch.rand(B, generator=g, dtype=torch.float64)
    u_offset = torch.rand(B, generator=g, dtype=torch.float64)
    keys = torch.rand(B, span - 2, generator=g)  # one per candidate inner frame 1..span - 2
    L = frames + torch.searchsorted(cdf, u_extent, right=True).clamp(max=span - frames)  # (B,) extents
    first = (u_offset * (span - L + 1)).floor().long().clamp(max=span - L)  # (B,) uniform in 0..span - L
    inner = torch.arange(1, span - 1)  # the candidates' offsets from the first frame
    keys = torch.where(inner[None] < (L - 1)[:, None], keys, 2.0)  # only 1..L - 2 can be chosen
    chosen = keys.topk(frames - 2, dim=1, largest=False).indices + 1  # the frames - 2 smallest keys: a uniform subset
    offsets = torch.cat([torch.zeros(B, 1, dtype=torch.long), chosen, (L - 1)[:, None]], 1).sort(1).values
    return first[:, None] + offsets


# --- joint image-video training ---------------------------------------------------------------------------------------
def independent_images(x0: Tensor, images: Tensor, sources: Tensor, frames: Tensor, dataset) -> Tensor:
    """x0 (b, C, F, H, W) with each example where images (b,) is True replaced by independent images: its frame f is
    frame frames[i, f] of the dataset's video sources[i, f] ((b, F) int64 each). The other examples are returned as
    they are."""
    rows = images.nonzero()[:, 0].cpu()
    if not len(rows):
        return x0
    unique, inverse = sources[rows].unique(return_inverse=True)
    videos, _ = dataset.batch(unique)                              # (U, C, F, H, W)
    picked = videos.transpose(1, 2)[inverse, frames[rows]]         # (n, F, C, H, W)
    out = x0.clone()
    out[rows.to(x0.device)] = picked.transpose(1, 2).to(x0)
    return out


# --- the objective -------------------------------------------------------------------------------------------------
def check_video_training(cfg: RunConfig) -> None:
    """ValueError naming the setting and the fix for a video denoiser config (model.video) that cannot train: data that
    are not videos (data.check_video_config's checks too), [video] values, and the settings the video kind does not
    apply (a latent autoencoder, a trained task, the hybrid or VLB loss, self-conditioning, augmentation)."""
    d, v, m, t = cfg.data, cfg.video, cfg.model, cfg.train
    check_video_config(d)
    frames = d.frames
    checks = [
        (d.source in VIDEO_SOURCES, f'model.video = true trains on videos, and data.source = "{d.source}" holds images; set '
                                    'data.source = "moving_digits" or "video_folder" and data.frames, or model.video = false'),
        (not cfg.latent.autoencoder, f"latent.autoencoder = {cfg.latent.autoencoder!r}: a video denoiser works on pixels "
                                     "(the autoencoders encode images); remove latent.autoencoder"),
        (cfg.task.kind == "none", f'task.kind = "{cfg.task.kind}" makes a condition image of each training image; a video '
                                  'model is conditioned on given frames instead ([video] max_observed): set task.kind = "none"'),
        (t.loss == "simple", f'train.loss = "{t.loss}": a video denoiser trains the masked L_simple on its generated frames '
                             '(kinds.video.masked_l_simple), which has no VLB term: set train.loss = "simple"'),
        (not m.learned_variance, "model.learned_variance: the masked L_simple trains no variance; set it to false"),
        (not m.self_condition, "model.self_condition: a video denoiser's x_0 estimate would also have to be masked; "
                               "set model.self_condition = false"),
        (t.augment_p == 0, f"train.augment_p = {t.augment_p}: the non-leaking augmentation transforms images (B, C, H, W), "
                           "not videos; set train.augment_p = 0 (train.hflip flips whole videos)"),
        (0 <= v.max_observed < max(frames, 1), f"video.max_observed = {v.max_observed} must be in 0..{frames - 1} "
                                               f"(data.frames - 1: a video keeps a frame to generate); 0: no given frames"),
        (not v.max_observed or m.video_observed, f"video.max_observed = {v.max_observed} gives frames clean, which the "
                                                 "network must be told: set model.video_observed = true"),
        (v.max_observed or not m.video_observed, "model.video_observed adds the observed-frames channel, and "
                                                 "video.max_observed = 0 never gives a frame: set video.max_observed "
                                                 "(e.g. 4), or model.video_observed = false"),
        (0 <= v.p_unconditional <= 1, f"video.p_unconditional must be a probability in [0, 1] (RaMViD: 0.25), got "
                                      f"{v.p_unconditional}"),
        (bool(v.patterns) and len(set(v.patterns)) == len(v.patterns),
         f"video.patterns must name one or more distinct patterns of {list(PATTERNS)}, got {v.patterns}"),
        (0 <= v.p_images < 1, f"video.p_images must be in [0, 1) (the share of image examples; Ho et al. train mostly "
                              f"on videos), got {v.p_images}"),
        (not v.p_images or not m.class_conditional, "video.p_images makes examples of frames from different videos, "
                                                    "whose labels differ: set model.class_conditional = false, or "
                                                    "video.p_images = 0"),
        (v.max_span == 0 or v.max_span >= frames, f"video.max_span = {v.max_span} must be 0 (consecutive frames) or at "
                                                  f"least data.frames = {frames} (the window the frames are drawn from; "
                                                  f"FDM: the longest video sampled), e.g. {4 * frames}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


class VideoObjective(DiffusionObjective):
    """A video denoiser (model.video): DiffusionObjective's draws and L_simple per video, plus masked conditioning and
    joint image-video training ([video]; the module docstring)."""

    def __init__(self, cfg: RunConfig, data, ctx: Context):
        check_video_training(cfg)
        self.ctx, self.cfg, self.pixels, self.dataset = ctx, cfg, data, data
        d = cfg.data
        self.window = max(cfg.video.max_span, d.frames)  # the frames of a data example
        shape = shape_of(data)
        if cfg.video.max_span and len(shape) == 4 and shape[1] != self.window:
            raise ValueError(f"video.max_span = {cfg.video.max_span} draws frames from windows of {self.window} frames and "
                             f"the data yield examples of {shape[1]}: load them with data.load_dataset(cfg.data, "
                             f"span={self.window}) (the Trainer does when it is given no dataset)")
        self.space = PixelSpace((d.channels, d.frames, d.image_size, d.image_size))
        check(cfg, data, takes=(d.channels, self.window, d.image_size, d.image_size))
        self.importance = ImportanceSampler(cfg.schedule.T)  # never sampled (train.loss = "simple"); its state is saved
        self.importance_sampling, self.augment_p = False, 0.0
        self.dropout = {k: p for k, p in sorted(cfg.train.condition_dropout.items()) if p > 0}
        self._fid_reference = None

    @classmethod
    def unused(cls, cfg: RunConfig) -> list[tuple[str, str, str]]:
        """DiffusionObjective's, and the masks' settings when video.max_observed = 0."""
        out = super().unused(cfg)
        if not cfg.video.max_observed:
            out += [(f"video.{k}", "video.max_observed = 0 gives no frames", "set video.max_observed (e.g. 4) or remove it")
                    for k in ("p_unconditional", "patterns")]
        return out

    @classmethod
    def load_data(cls, cfg: RunConfig):
        """data.load_dataset(cfg.data), with windows of video.max_span frames when it is set."""
        return load_dataset(cfg.data, span=cfg.video.max_span)

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """DiffusionObjective's network check and check_video_training."""
        check_video_training(cfg)
        super().check_config(cfg)

    def draw(self, B: int, g: torch.Generator) -> dict[str, Tensor]:
        d = super().draw(B, g)
        v, F, n = self.cfg.video, self.cfg.data.frames, len(self.dataset)
        if v.p_images > 0:  # Ho et al. 2022, sec. 3: some examples are independent images
            d["images"] = torch.rand(B, generator=g) < v.p_images
            d["image_sources"] = torch.randint(0, n, (B, F), generator=g)
            d["image_frames"] = torch.randint(0, self.window, (B, F), generator=g)
        if v.max_observed:
            d["observed"] = draw_observed(B, F, v.max_observed, v.p_unconditional, v.patterns, g)
            if "images" in d:
                d["observed"] &= ~d["images"][:, None]
        if v.max_span > F:  # FDM: F frames of a window of max_span
            d["positions"] = draw_frame_subsets(B, F, v.max_span, g)
        return d

    def inputs(self, x0: Tensor, cond: dict, d: dict) -> tuple[Tensor, dict, dict]:
        """The chosen frames of each window taken (with video.max_span), the image examples' frames put in (before the
        flip), DiffusionObjective's preparation, then the condition keys `independent` (with video.p_images), `observed`
        (with model.video_observed) and `frame_index` (with video.max_span: relative_frame_index of the positions,
        arange(F) when max_span = data.frames) on the device."""
        F = self.cfg.data.frames
        if self.cfg.video.max_span:
            positions = d["positions"] if "positions" in d else torch.arange(F).expand(x0.shape[0], F)
            x0 = x0.gather(2, to_device(positions, x0.device)[:, None, :, None, None].expand(
                x0.shape[0], x0.shape[1], F, *x0.shape[3:]))  # (b, C, F, H, W) of (b, C, max_span, H, W)
        if "images" in d:
            x0 = independent_images(x0, d["images"], d["image_sources"], d["image_frames"], self.dataset)
        x0, cond, d = super().inputs(x0, cond, d)
        b, F = x0.shape[0], x0.shape[2]
        if "images" in d:
            cond["independent"] = to_device(d["images"], x0.device)[:, None].expand(b, F)
        if self.cfg.model.video_observed:
            cond["observed"] = to_device(d["observed"], x0.device)
        if self.cfg.video.max_span:
            cond["frame_index"] = to_device(relative_frame_index(positions), x0.device)
        return x0, cond, d

    def losses(self, x0: Tensor, cond: dict, d: dict, step: int) -> dict:
        t = self.cfg.train
        observed = cond.get("observed", torch.zeros(x0.shape[0], x0.shape[2], dtype=torch.bool, device=x0.device))
        return {"main": masked_l_simple(self.denoiser, x0, d["t"], d["eps"], observed, weighting=t.loss_weighting,
                                        norm=t.loss_norm, min_snr_gamma=t.min_snr_gamma, p2_k=t.p2_k,
                                        p2_gamma=t.p2_gamma, cond=cond)}

    @torch.no_grad()
    def fixed_samples(self, trainer, n: int, steps: int = 0) -> tuple[Tensor, list[Tensor]]:
        """n unconditional videos (no frame observed) of the EMA weights from the fixed noise of train.seed, with the
        run's [sample] settings; a class-conditional model draws the classes in turn. Returns (samples, [])."""
        F = self.cfg.data.frames
        cond = {"observed": torch.zeros(n, F, dtype=torch.bool, device=trainer.device)} if self.cfg.model.video_observed else None
        kwargs = sample_config_kwargs(self.cfg.sample) | ({"steps": steps} if steps else {})
        x = generate(build_denoiser(self.cfg, trainer.ema.model), n, self.space.shape, cond=cond, seed=self.cfg.train.seed,
                     labels=default_labels(n, self.modules["model"].num_classes), device=trainer.device, **kwargs)
        return x, []

    def preview(self, trainer) -> Path:
        """RUN/samples/step_NNNNNNNN.png: a contact sheet of sample.n unconditional videos, a row per video and a
        column per frame (visualize.contact_sheet)."""
        x, _ = self.fixed_samples(trainer, self.cfg.sample.n)
        return save_contact_sheet(x, trainer.run_dir / "samples" / f"step_{trainer.step:08d}.png")

    def evaluate(self, trainer) -> tuple[dict, float]:
        """Per-frame FID: the frames of ceil(train.fid_samples / F) unconditional sample videos of the EMA weights (the
        fixed noise of `fixed_samples`, 8-bit as saved) against the frames of as many first training videos, in
        train.fid_features' space. Biased upward with few frames: a curve to compare with itself."""
        t = self.cfg.train
        videos = -(-t.fid_samples // self.cfg.data.frames)
        if self._fid_reference is None:
            net = self.ctx.feature_network(t.fid_features, trainer.device)
            real, _ = self.pixels.batch(torch.arange(min(videos, len(self.pixels))))
            real = real[:, :, :self.cfg.data.frames]  # a window's first F frames (video.max_span)
            features = extract_features(fold_frames(real), net)
            if len(features) <= features.shape[1]:
                warnings.warn(f"train.fid_samples = {t.fid_samples}: {len(features)} frames in a {features.shape[1]}-"
                              "dimensional feature space: the covariances are singular and the FID is strongly biased; "
                              f"use more than {features.shape[1]}", UserWarning, stacklevel=2)
            self._fid_reference = (net, *feature_statistics(features))
        net, mu, sigma = self._fid_reference
        x, _ = self.fixed_samples(trainer, videos, t.fid_steps)
        frames = torch.from_numpy(to_uint8(fold_frames(x))).permute(0, 3, 1, 2).float() / 127.5 - 1
        fid = frechet_distance(mu, sigma, *feature_statistics(extract_features(frames, net)))
        return {"fid": fid}, fid
