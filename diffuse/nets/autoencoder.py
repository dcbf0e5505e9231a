"""The first stage of latent diffusion: a KL- or VQ-regularised autoencoder with a patch discriminator.

Latent diffusion (Rombach et al. 2022, sec. 3.1; lectures 000 and 002, "Latent Diffusion Model") runs the diffusion
process on z = E(x): an encoder E compresses x in R^{H x W x C} to z in R^{h x w x c} with the downsampling rate
    f = H/h = W/w = 2^m                                          (lecture 002; one factor 2 per extra level)
and a decoder D reconstructs x~ = D(z). Two regularisations keep the latent's variance from growing arbitrarily:
  - "kl": a small KL penalty of q(z | x) = N(mu, sigma^2) towards N(0, I), as in a VAE (kl_weight ~ 1e-6);
  - "vq": a vector-quantisation layer (van den Oord et al. 2017, VQ-VAE) "absorbed by the decoder": a diffusion
    model works on the pre-quantisation z and `decode` quantises it first (lecture 002, "VQ-reg").
Both are trained as in taming-transformers (Esser et al. 2021, VQGAN): a reconstruction loss plus a hinge GAN loss
from a PatchGAN discriminator (Isola et al. 2017), weighted adaptively (eq. 7) and switched on after disc_start steps.
LDM's perceptual (LPIPS) term and its learned output log-variance are not included (no offline LPIPS weights).

Every loss term is a per-image sum over its elements (the squared norms of VQ-VAE eq. 3, LDM's summed
reconstruction and KL, so kl_weight = 1e-6 means what it means in LDM), averaged over the batch.
Images are (B, C, H, W) in [-1, 1]; latents (B, c, H/f, W/f). One training step:
    out = model(x, generator=g)
    ae = autoencoder_loss(model, x, out, step, disc);  opt.zero_grad();   ae["loss"].backward();  opt.step()
    d = discriminator_loss(disc, x, out.reconstruction, step);  opt_d.zero_grad();  d["loss"].backward();  opt_d.step()
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from .blocks import Attention, Downsample, Upsample, norm

LOGVAR_RANGE = (-30.0, 20.0)   # LDM's clamp of the posterior's log-variance (DiagonalGaussianDistribution)
LAPLACE_EPS = 1e-5             # Laplace smoothing of the EMA cluster sizes (Sonnet's VQ-VAE code)
ADAPTIVE_DELTA = 1e-4          # delta of Esser et al. 2021, eq. 7
ADAPTIVE_MAX = 1e4             # taming-transformers clamps lambda to [0, 1e4]


@dataclass
class AutoencoderConfig:
    kind: Literal["kl", "vq"] = "kl"          # regularisation of the latent (Rombach et al. 2022, sec. 3.1)
    latent_channels: int = 4                  # c (LDM KL-f8: 4, VQ-f4: 3)
    channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])  # width per level; m+1 levels: f = 2^m (LDM f8)
    num_res_blocks: int = 2                   # residual blocks per level (LDM: 2; the decoder has one more)
    norm_groups: int = 32                     # GroupNorm groups; must divide every width
    kl_weight: float = 1e-6                   # kind "kl": weight of the KL term (LDM KL-f8: 1e-6)
    codebook_size: int = 8192                 # kind "vq": K codes (LDM VQ-f4: 8192)
    commitment_beta: float = 0.25             # beta of VQ-VAE eq. 3 (van den Oord et al.: 0.25)
    codebook_update: Literal["ema", "loss"] = "ema"  # EMA cluster means (VQ-VAE app. A.1) or the codebook loss of eq. 3
    ema_decay: float = 0.99                   # gamma of the EMA update (VQ-VAE: 0.99)
    dead_code_threshold: float = 1.0          # restart codes whose EMA usage (assignments per batch) falls below; 0: never
    rec_loss: Literal["l1", "l2"] = "l1"      # |x - x~| (LDM, VQGAN) or (x - x~)^2
    disc_weight: float = 0.5                  # weight of the adaptive GAN term (LDM KL: 0.5, VQGAN: 0.8); 0: no GAN
    disc_start: int = 50001                   # optimizer steps before the GAN term is switched on (LDM KL-f8: 50001)
    disc_channels: int = 64                   # width of the discriminator's first layer (pix2pix: 64)
    disc_layers: int = 3                      # strided layers of the PatchGAN (pix2pix 70x70 patches: 3)

    @property
    def factor(self) -> int:
        """The downsampling rate f = 2^m for m+1 levels."""
        return 2 ** (len(self.channels) - 1)


def _number(name: str, value, low: float, high: float = math.inf, integer: bool = False) -> None:
    """ValueError unless autoencoder.<name> is a finite number (an integer if `integer`) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ValueError(f"autoencoder.{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"autoencoder.{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"autoencoder.{name} must be in [{low:g}, {high:g}], got {value!r}")


def check_config(cfg: AutoencoderConfig) -> None:
    """Raise ValueError naming the first bad field of cfg and how to fix it."""
    for name, choices in (("kind", ("kl", "vq")), ("codebook_update", ("ema", "loss")), ("rec_loss", ("l1", "l2"))):
        if getattr(cfg, name) not in choices:
            raise ValueError(f"autoencoder.{name} must be one of {', '.join(map(repr, choices))}, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.channels, (list, tuple)) or not cfg.channels:
        raise ValueError(f"autoencoder.channels must be a non-empty list of widths, one per level, got {cfg.channels!r}")
    for i, w in enumerate(cfg.channels):
        _number(f"channels[{i}]", w, 1, integer=True)
    _number("norm_groups", cfg.norm_groups, 1, integer=True)
    if any(w % cfg.norm_groups for w in cfg.channels):
        raise ValueError(f"autoencoder.norm_groups = {cfg.norm_groups} must divide every width in autoencoder.channels = "
                         f"{list(cfg.channels)}; pick a divisor of {math.gcd(*cfg.channels)}")
    _number("latent_channels", cfg.latent_channels, 1, integer=True)
    _number("num_res_blocks", cfg.num_res_blocks, 1, integer=True)
    _number("kl_weight", cfg.kl_weight, 0.0)
    _number("codebook_size", cfg.codebook_size, 2, integer=True)
    _number("commitment_beta", cfg.commitment_beta, 0.0)
    _number("ema_decay", cfg.ema_decay, 0.0, 1.0)
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ValueError(f"autoencoder.ema_decay must be strictly between 0 and 1 (1 never moves the codebook), got "
                         f"{cfg.ema_decay!r}; VQ-VAE uses 0.99")
    _number("dead_code_threshold", cfg.dead_code_threshold, 0.0)
    _number("disc_weight", cfg.disc_weight, 0.0)
    _number("disc_start", cfg.disc_start, 0, integer=True)
    _number("disc_channels", cfg.disc_channels, 1, integer=True)
    _number("disc_layers", cfg.disc_layers, 1, 8, integer=True)


# --- encoder and decoder (the LDM / VQGAN convolutional autoencoder) ---------------------------------------
class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, GroupNorm -> SiLU -> conv, + skip (1x1 if the widths differ); no time input."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(norm(groups, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1),
                                  norm(groups, out_ch), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


def _middle(width: int, groups: int) -> nn.Sequential:
    """ResBlock, self-attention, ResBlock at the lowest resolution (LDM's `mid`)."""
    return nn.Sequential(ResBlock(width, width, groups), Attention(width, 1, groups), ResBlock(width, width, groups))


class Encoder(nn.Sequential):
    """E: (B, C, H, W) in [-1, 1] -> (B, out_channels, H/f, W/f); out_channels = 2c (KL moments) or c (VQ)."""

    def __init__(self, cfg: AutoencoderConfig, in_channels: int, out_channels: int):
        w, g = cfg.channels, cfg.norm_groups
        layers: list[nn.Module] = [nn.Conv2d(in_channels, w[0], 3, padding=1)]
        for i, width in enumerate(w):
            layers += [ResBlock(w[max(i - 1, 0)] if j == 0 else width, width, g) for j in range(cfg.num_res_blocks)]
            layers += [Downsample(width)] if i < len(w) - 1 else []
        super().__init__(*layers, _middle(w[-1], g), norm(g, w[-1]), nn.SiLU(), nn.Conv2d(w[-1], out_channels, 3, padding=1))


class Decoder(nn.Sequential):
    """D: (B, c, h, w) -> (B, C, h f, w f), the mirror of the encoder with num_res_blocks + 1 blocks per level."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        w, g = cfg.channels, cfg.norm_groups
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, w[-1], 3, padding=1), _middle(w[-1], g)]
        for i in reversed(range(len(w))):
            layers += [ResBlock(w[min(i + 1, len(w) - 1)] if j == 0 else w[i], w[i], g) for j in range(cfg.num_res_blocks + 1)]
            layers += [Upsample(w[i])] if i > 0 else []
        super().__init__(*layers, norm(g, w[0]), nn.SiLU(), nn.Conv2d(w[0], out_channels, 3, padding=1))

    @property
    def last_layer(self) -> nn.Conv2d:
        """G_L, the layer whose gradients set the adaptive weight (Esser et al. 2021, eq. 7)."""
        return self[-1]


# --- the KL posterior ---------------------------------------------------------------------------------------
class DiagonalGaussian:
    """q(z | x) = N(mu, diag sigma^2) from the encoder's moments (B, 2c, h, w) = [mu, log sigma^2] along channels.

    log sigma^2 is clamped to [-30, 20] as in LDM, so sigma neither underflows nor overflows."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)     # (B, c, h, w) each
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None, eps: Tensor | None = None) -> Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) drawn from `generator` (on its own device; None: torch's global RNG),
        or the given `eps` of mu's shape (the reparameterisation of Kingma & Welling 2014, sec. 2.4: differentiable in
        mu and sigma)."""
        if eps is None:
            device = generator.device if generator is not None else self.mean.device
            eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device, self.mean.dtype)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum (mu^2 + sigma^2 - 1 - log sigma^2), per example (B,), in nats
        (Kingma & Welling 2014, app. B)."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


# --- vector quantisation --------------------------------------------------------------------------------------
@dataclass
class Quantized:
    z_q: Tensor          # (B, c, h, w) the nearest codes, with the straight-through gradient of z
    indices: Tensor      # (B, h, w) int64 code indices
    counts: Tensor       # (K,) assignments per code in this batch (sum them over batches to accumulate usage)
    commitment: Tensor   # (B,) beta ||z - sg[e]||^2
    codebook: Tensor     # (B,) ||sg[z] - e||^2 with codebook_update = "loss"; zeros with "ema" (the EMA replaces it)


def nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    """k(z) = argmin_j ||z - e_j||^2 for z (N, c) and codebook (K, c) -> (N,) (van den Oord et al. 2017, eqs. 1-2),
    with ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, in fp32 even under autocast: in bf16 the small cross term is lost and
    ~2.5% of positions get another code (so the EMA update and the commitment loss would use wrong assignments)."""
    with torch.autocast(z.device.type, enabled=False):
        z, codebook = z.float(), codebook.float()
        d2 = z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.t() + codebook.pow(2).sum(1)[None]
    return d2.argmin(dim=1)


def straight_through(z: Tensor, z_q: Tensor) -> Tensor:
    """z + sg[z_q - z]: the value of z_q with the gradient of z (van den Oord et al. 2017, sec. 3.1)."""
    return z + (z_q - z).detach()


def commitment_loss(z: Tensor, z_q: Tensor, beta: float) -> Tensor:
    """beta ||z_e(x) - sg[e]||^2, the third term of VQ-VAE eq. 3, per example (B,) for z, z_q (B, c, h, w)."""
    return beta * (z - z_q.detach()).pow(2).sum(dim=(1, 2, 3))


def codebook_loss(z: Tensor, z_q: Tensor) -> Tensor:
    """||sg[z_e(x)] - e||^2, the second term of VQ-VAE eq. 3, per example (B,)."""
    return (z.detach() - z_q).pow(2).sum(dim=(1, 2, 3))


def ema_update(cluster_size: Tensor, embed_sum: Tensor, counts: Tensor, sums: Tensor, decay: float) -> tuple[Tensor, Tensor, Tensor]:
    """One EMA step of the codebook (van den Oord et al. 2017, app. A.1, eqs. 6-8):
        N_i <- gamma N_i + (1 - gamma) n_i,   m_i <- gamma m_i + (1 - gamma) sum_j z_{i,j},   e_i = m_i / N_i
    with N Laplace-smoothed before the division (as in Sonnet's VectorQuantizerEMA), N_i <- (N_i + eps) / (n + K eps) n,
    n = sum_i N_i, so a code no batch has used is never divided by zero. cluster_size, counts (K,); embed_sum, sums (K, c).
    Returns the new (cluster_size, embed_sum, codebook)."""
    cluster_size = decay * cluster_size + (1 - decay) * counts
    embed_sum = decay * embed_sum + (1 - decay) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + LAPLACE_EPS) / (n + cluster_size.numel() * LAPLACE_EPS) * n
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def perplexity(counts: Tensor) -> Tensor:
    """exp(H(p)) = exp(-sum_k p_k log p_k), p = counts / sum(counts) for counts (K,) with a positive sum: K for a
    uniform use of K codes, 1 for one code."""
    p = counts.double() / counts.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())


def codebook_usage(counts: Tensor) -> Tensor:
    """The fraction of the K codes used at least once in `counts` (K,) (one batch's, or a sum over batches)."""
    return (counts > 0).double().mean()


class VectorQuantizer(nn.Module):
    """The VQ layer: z (B, c, h, w) -> the nearest of K codes e_j in R^c at every position, and the VQ losses.

    In training mode (and with update=True) each call also moves the codebook: the EMA update (codebook_update =
    "ema"; the codebook is then a buffer) or nothing (= "loss"; a parameter trained by the codebook loss); in both,
    codes whose EMA usage N_i falls below dead_code_threshold are restarted at random encoder outputs of the batch,
    drawn from `generator` (None: torch's global RNG), with N_i = threshold and m_i = threshold * e_i.
    Under DDP the update uses the global batch: counts and sums are summed over processes and restarts draw from
    every process's encoder outputs, so with the same `generator` state on every process (the trainer's) the
    codebooks stay equal and match one process's."""

    shard: tuple[int, int] = (0, 1)  # (rank, world size) of the training processes; the trainer sets it

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.beta, self.decay, self.threshold, self.ema = (cfg.commitment_beta, cfg.ema_decay, cfg.dead_code_threshold,
                                                           cfg.codebook_update == "ema")
        K, c = cfg.codebook_size, cfg.latent_channels
        codebook = torch.empty(K, c).uniform_(-1.0 / K, 1.0 / K)   # taming-transformers' initialisation
        if self.ema:
            self.register_buffer("codebook", codebook)
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("cluster_size", torch.ones(K))      # N_i: starts at 1, so e_i = m_i / N_i = the init
        self.register_buffer("embed_sum", codebook.clone())        # m_i

    def forward(self, z: Tensor, generator: torch.Generator | None = None, update: bool | None = None) -> Quantized:
        B, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)                    # (B h w, c)
        indices = nearest_code(flat.detach(), self.codebook.detach())  # (B h w,)
        z_q = self.codebook[indices].reshape(B, h, w, c).permute(0, 3, 1, 2)
        counts = torch.bincount(indices, minlength=self.codebook.shape[0]).to(self.codebook.dtype)  # (K,) n_i
        commit = commitment_loss(z, z_q, self.beta)
        book = torch.zeros_like(commit) if self.ema else codebook_loss(z, z_q)
        if self.training if update is None else update:
            self._update(flat.detach(), indices, counts, generator)
        return Quantized(straight_through(z, z_q), indices.reshape(B, h, w), counts, commit, book)

    @torch.no_grad()
    def _update(self, flat: Tensor, indices: Tensor, counts: Tensor, generator: torch.Generator | None) -> None:
        flat = flat.to(self.embed_sum.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)  # (K, c) sum_j z_ij over the codes' vectors
        world = self.shard[1]
        if world > 1:  # the global batch's counts, sums and encoder outputs
            counts, sums, flat = (distributed.total(counts.clone(), world), distributed.total(sums, world),
                                  distributed.gather(flat, world))
        cluster_size, embed_sum, codebook = ema_update(self.cluster_size, self.embed_sum, counts, sums, self.decay)
        self.cluster_size.copy_(cluster_size)
        if self.ema:
            self.embed_sum.copy_(embed_sum)
            self.codebook.copy_(codebook)
        dead = self.cluster_size < self.threshold                      # (K,)
        if dead.any():
            device = generator.device if generator is not None else flat.device
            pick = torch.randint(0, flat.shape[0], (int(dead.sum()),), generator=generator, device=device).to(flat.device)
            self.codebook.data[dead] = flat[pick]
            self.cluster_size[dead] = self.threshold
            self.embed_sum[dead] = self.threshold * flat[pick]


# --- the autoencoder --------------------------------------------------------------------------------------------
@dataclass
class AutoencoderOutput:
    reconstruction: Tensor                   # (B, C, H, W) x~ = D(z)
    latent: Tensor                           # (B, c, h, w) z: KL the posterior sample (or mode), VQ before quantisation
    posterior: DiagonalGaussian | None       # kind "kl"
    quantized: Quantized | None              # kind "vq"


class Autoencoder(nn.Module):
    """E and D with the KL posterior or the VQ layer between them; `encode`/`decode` are all latent diffusion needs."""

    def __init__(self, cfg: AutoencoderConfig, in_channels: int):
        super().__init__()
        check_config(cfg)
        _number("in_channels", in_channels, 1, integer=True)
        self.cfg, self.in_channels = cfg, in_channels
        c = cfg.latent_channels
        self.encoder = Encoder(cfg, in_channels, 2 * c if cfg.kind == "kl" else c)
        self.decoder = Decoder(cfg, in_channels)
        self.quantizer = VectorQuantizer(cfg) if cfg.kind == "vq" else None

    def latent_shape(self, image_size: int, channels: int) -> tuple[int, int, int]:
        """(c, image_size / f, image_size / f) for square images of `channels` channels; ValueError if the images
        do not fit this autoencoder."""
        if channels != self.in_channels:
            raise ValueError(f"this autoencoder takes {self.in_channels}-channel images, got data.channels = {channels}")
        if image_size < 1 or image_size % self.cfg.factor:
            raise ValueError(f"image size {image_size} must be a positive multiple of the downsampling factor f = "
                             f"{self.cfg.factor} (2^(len(autoencoder.channels) - 1)); change data.image_size or the levels")
        return self.cfg.latent_channels, image_size // self.cfg.factor, image_size // self.cfg.factor

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        """q(z | x) of the KL autoencoder for x (B, C, H, W) in [-1, 1]."""
        if self.quantizer is not None:
            raise ValueError('posterior() needs autoencoder.kind = "kl"; a VQ autoencoder has no posterior')
        return DiagonalGaussian(self.encoder(x))

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x (B, C, H, W) in [-1, 1] -> z (B, c, H/f, W/f), unscaled (multiply by latent_scale_factor for diffusion).
        KL: a posterior sample drawn from `generator` (what LDM trains its diffusion model on), or the mode mu when
        generator is None (deterministic); VQ: the encoder output before quantisation (generator unused)."""
        if self.quantizer is not None:
            return self.encoder(x)
        q = self.posterior(x)
        return q.mode() if generator is None else q.sample(generator)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, c, h, w) -> x~ (B, C, h f, w f); VQ quantises z first (the layer is part of the decoder, and this
        call never moves the codebook)."""
        if self.quantizer is not None:
            z = self.quantizer(z, update=False).z_q
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None, eps: Tensor | None = None) -> AutoencoderOutput:
        """Encode and decode for training. KL: z is sampled with the noise `eps` (B, c, h, w) or from `generator`
        (neither: the mode); VQ: the quantiser's update (in training mode) restarts dead codes with draws from
        `generator`."""
        if self.quantizer is None:
            q = self.posterior(x)
            z = q.mode() if generator is None and eps is None else q.sample(generator, eps)
            return AutoencoderOutput(self.decoder(z), z, q, None)
        z = self.encoder(x)
        vq = self.quantizer(z, generator)
        return AutoencoderOutput(self.decoder(vq.z_q), z, None, vq)


# --- the discriminator and the GAN losses ------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, sec. 3.2.2; taming's NLayerDiscriminator): disc_layers strided 4x4 convolutions,
    one stride-1 convolution, and a 4x4 convolution to one logit per overlapping patch: (B, C, H, W) ->
    (B, 1, H/2^L - 2, W/2^L - 2). GroupNorm instead of taming's BatchNorm, so a patch's logit does not depend on the
    rest of the batch (or on the process under DDP). Weights N(0, 0.02) as in pix2pix."""

    def __init__(self, cfg: AutoencoderConfig, in_channels: int):
        super().__init__()
        check_config(cfg)
        widths = [cfg.disc_channels * min(2**i, 8) for i in range(cfg.disc_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, cfg.disc_layers + 1):
            stride = 2 if i < cfg.disc_layers else 1
            layers += [nn.Conv2d(widths[i - 1], widths[i], 4, stride, 1, bias=False),
                       nn.GroupNorm(math.gcd(32, widths[i]), widths[i]), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.cfg, self.min_size = cfg, 3 * 2**cfg.disc_layers
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"images of {tuple(x.shape[-2:])} pixels are too small for autoencoder.disc_layers = "
                             f"{self.cfg.disc_layers}: it needs at least {self.min_size}; use fewer layers")
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """L_D = 1/2 (E[max(0, 1 - D(x))] + E[max(0, 1 + D(x~))]) (Lim & Ye 2017; taming's hinge_d_loss), a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """L_GAN = -E[D(x~)], the generator's side of the hinge loss, a scalar."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, reduce=None) -> Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta), delta = 1e-4 (Esser et al. 2021, eq. 7), with
    G_L the decoder's last layer; clamped to [0, 1e4] and detached (a weight, not a path for gradients). `reduce`
    (under DDP: the mean over processes) turns each process's gradients into the global batch's before the norms."""
    g_rec, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_gan, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    if reduce is not None:
        g_rec, g_gan = reduce(g_rec), reduce(g_gan)
    return (g_rec.norm() / (g_gan.norm() + ADAPTIVE_DELTA)).clamp(0.0, ADAPTIVE_MAX).detach()


def gan_active(cfg: AutoencoderConfig, step: int) -> bool:
    """Whether the GAN terms are on at optimizer step `step` (0-based): after disc_start warm-up steps, disc_weight > 0."""
    return cfg.disc_weight > 0 and step >= cfg.disc_start


def reconstruction_loss(x: Tensor, x_rec: Tensor, kind: str) -> Tensor:
    """sum |x - x~| ("l1") or sum (x - x~)^2 ("l2") over each image's pixels, (B,)."""
    diff = x - x_rec
    return (diff.abs() if kind == "l1" else diff.pow(2)).sum(dim=(1, 2, 3))


def autoencoder_loss(model: Autoencoder, x: Tensor, out: AutoencoderOutput, step: int,
                     disc: PatchDiscriminator | None = None, reduce=None) -> dict[str, Tensor]:
    """The generator-side loss of one batch x (B, C, H, W) and out = model(x), as batch means (scalars):
        loss = rec + kl_weight * kl                                (kind "kl"; LDM)
        loss = rec + codebook + commitment                         (kind "vq"; VQ-VAE eq. 3)
             + [step >= disc_start] disc_weight * lambda * gan     (VQGAN eqs. 6-7, hinge generator loss)
    Returns the named terms: loss, rec, kl | codebook + commitment, gan, adaptive_weight (0 when the GAN is off, and
    in eval mode, where taming-transformers sets it to 0 too). `reduce`: adaptive_weight's, under DDP."""
    cfg = model.cfg
    rec = reconstruction_loss(x, out.reconstruction, cfg.rec_loss).mean()
    terms = {"rec": rec}
    if out.posterior is not None:
        terms["kl"] = out.posterior.kl().mean()
        total = rec + cfg.kl_weight * terms["kl"]
    else:
        terms["codebook"], terms["commitment"] = out.quantized.codebook.mean(), out.quantized.commitment.mean()
        total = rec + terms["codebook"] + terms["commitment"]
    zero = rec.new_zeros(())
    terms["gan"], terms["adaptive_weight"] = zero, zero
    if disc is not None and gan_active(cfg, step):
        terms["gan"] = hinge_g_loss(disc(out.reconstruction))
        terms["adaptive_weight"] = (adaptive_weight(rec, terms["gan"], model.decoder.last_layer.weight, reduce)
                                     if model.training else zero)
        total = total + cfg.disc_weight * terms["adaptive_weight"] * terms["gan"]
    return {"loss": total, **terms}


def discriminator_loss(disc: PatchDiscriminator, x: Tensor, x_rec: Tensor, step: int,
                       cfg: AutoencoderConfig | None = None) -> dict[str, Tensor]:
    """The hinge loss of D on real x and reconstructions x~ (detached here), both (B, C, H, W); before disc_start it
    is 0 * L_D (the graph kept, so backward() runs and leaves zero gradients). cfg: the autoencoder's (default: the
    discriminator's own). Returns loss, logits_real, logits_fake (batch means, for logging)."""
    cfg = cfg if cfg is not None else disc.cfg
    real, fake = disc(x), disc(x_rec.detach())
    factor = 1.0 if gan_active(cfg, step) else 0.0
    return {"loss": factor * hinge_d_loss(real, fake), "logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}


# --- metrics --------------------------------------------------------------------------------------------------------
def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(data_range^2 / MSE) in dB, (B,) for x, y (B, C, H, W) in
    [-1, 1] (data range 2); take .mean() for the usual mean over images. Identical images give inf."""
    if x.shape != y.shape:
        raise ValueError(f"psnr needs two batches of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def latent_scale_factor(latents: Tensor) -> float:
    """1 / sigma^, sigma^2 = 1/(bchw) sum (z - mu^)^2 over all elements of a batch of latents (b, c, h, w) (Rombach et
    al. 2022, app. D.1, from the first batch; Stable Diffusion's 0.18215 for its KL-f8): z / sigma^ has unit variance,
    the scale the diffusion model's noise schedule assumes. ValueError for constant or non-finite latents."""
    std = latents.detach().double().std(correction=0).item()
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"the latents' standard deviation is {std}; need finite, non-constant latents (more than one)")
    return 1.0 / std
