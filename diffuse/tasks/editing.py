"""Training-free editing with any trained model: SDEdit, inpainting with RePaint's resampling, and ILVR.

Each task composes the sampling walk (samplers.base.walk, through generate.generate) with a start point, a
projection after each step or a grid that steps back up in time; none reaches inside the denoiser or the
sampler, so every task runs with every sampler, guidance wrapper and noise process (lecture 002, "Image
Editing" and "Conditional Generation"). Images are (B, C, H, W) in [-1, 1].

    SDEdit   (Meng et al. 2022, Algorithm 1): x_{t0} ~ q(x_{t0} | x_g) of a guide image x_g, then the reverse
             process from t0, where the noise level sigma/alpha is strength / (1 - strength) on every process (the
             rectified flow's mix (1 - s) guide + s noise): 0 returns the guide, 1 is unconditional sampling.
    Inpaint  (Lugmayr et al. 2022, RePaint eq. 8-9): after every step, x_{t-1} = m * x^known_{t-1} + (1 - m) *
             x^unknown_{t-1} with x^known_{t-1} ~ q(x_{t-1} | x_0) of the known image and m = 1 on known pixels;
             RePaint's resampling (Algorithm 1, with the jump schedule of its code): every `jump_length` steps
             the walk goes back up jump_length steps by q(x_t | x_{t-1}) and down again, `jump_n_samples` - 1
             times, so the unknown region harmonises with the known one.
    ILVR     (Choi et al. 2021, Algorithm 1; lecture 002): x_{t-1} <- phi_N(y_{t-1}) + x'_{t-1} - phi_N(x'_{t-1}),
             y_{t-1} ~ q(y_{t-1} | y) of a reference y, phi_N a low-pass filter of factor N, for t above t_stop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import check_images
from ..generate import generate
from ..samplers.base import Project
from ..schedule import NoiseSchedule


def _noise(shape, generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(like)


# --- SDEdit ------------------------------------------------------------------------------------------------
STRENGTH_HELP = ("the noise the image gets, the same on every process (VP, EDM, flow): strength s starts at noise level "
                 "sigma/alpha = s / (1 - s), where the start is (1 - s) image + s noise (the rectified flow's x_t at "
                 "t = s); 0 returns the image, 1 is unconditional sampling; about 0.7-0.85 turns pen strokes into digits "
                 "(bench/RESULTS.md)")


def sdedit_time(schedule: NoiseSchedule, strength: float) -> float:
    """The time t0 SDEdit noises its guide to: where sigma_t0 / alpha_t0 = strength / (1 - strength), on every process.

    One meaning for every process (discrete and continuous VP, EDM, rectified flow): x_t0 / (alpha_t0 + sigma_t0) is
    (1 - strength) guide + strength noise, the rectified flow's x_t at t = strength, so the guide keeps the same share
    of the start whatever the schedule (the old t0 = strength * t_top was linear in sigma on EDM, where strength 0.05
    already started at sigma/alpha = 4). 0 returns the guide, 1 is unconditional sampling from the grids' top t_top;
    a level above the top starts at t_top. ValueError for a strength outside [0, 1]."""
    if not (isinstance(strength, (int, float)) and 0 <= strength <= 1):
        raise ValueError(f"the SDEdit strength must be a number in [0, 1] (0: the guide itself, 1: unconditional "
                         f"sampling), got {strength!r}")
    if strength == 0:
        return 0.0
    top = schedule.t_top
    if strength == 1:
        return top
    t0 = float(schedule.t_from_ve_sigma(torch.tensor(strength / (1 - strength), dtype=torch.float64)))
    return min(t0, top)


def check_input(x: Tensor, name: str, pixels: bool) -> None:
    """An editing input: a finite (n, C, H, W) batch in [-1, 1] (data.check_images) when `pixels`; latents (z = s E(x)
    of stages.py, pixels = False) have no range, so only their shape and finiteness are checked. ValueError otherwise."""
    if pixels:
        return check_images(x, name, min_n=1)
    if not isinstance(x, Tensor) or x.ndim != 4 or len(x) < 1 or not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be a finite (n, c, h, w) batch of latents, got {getattr(x, 'shape', type(x).__name__)}")


def sdedit(denoiser, guide: Tensor, strength: float, *, seed: int = 0, device: str | torch.device = "cpu",
           pixels: bool = True, **generate_kw) -> Tensor:
    """SDEdit (Meng et al. 2022): the guide x_g (n, C, H, W) in [-1, 1] (a stroke painting, a rough sketch) noised to
    t0 = sdedit_time(schedule, strength), where sigma/alpha = strength / (1 - strength) on every process, with
    q(x_t0 | x_g) = N(alpha_t0 x_g, sigma_t0^2 I), then denoised by `generate` from t0.

    The noise is the stream of an ordinary run with this seed (its x_T / prior_std), so strength 1 is exactly the
    unconditional run of the same seed (started from the prior, as every run) and strength 0 returns the guide.
    `generate_kw`: sampler, steps, labels, guidance, ... as in `generate`. pixels = False: the guide is a latent
    (latent diffusion), with no [-1, 1] range. Raises ValueError for a strength outside [0, 1] or a guide that is not
    a finite image batch.
    """
    check_input(guide, "the guide image", pixels)
    return sdedit_checked(denoiser, guide, strength, seed=seed, device=device, **generate_kw)


def sdedit_checked(denoiser, guide: Tensor, strength: float, *, seed: int = 0, device: str | torch.device = "cpu",
                   **generate_kw) -> Tensor:
    """`sdedit` of a guide already checked, of any shape (n, ...): images, latents, videos (n, C, F, H, W)
    (tasks.video.sdedit_video). x_t0 = alpha_t0 x_g + sigma_t0 eps (schedule.q_sample) with eps generate's first draw
    of `seed`, then `generate` from (x_t0, t0). ValueError for a strength outside [0, 1]."""
    t0 = sdedit_time(denoiser.schedule, strength)
    n, shape = guide.shape[0], tuple(guide.shape[1:])
    if strength == 1:
        return generate(denoiser, n, shape, seed=seed, device=device, **generate_kw)
    g = torch.Generator(device).manual_seed(seed)
    z = torch.randn((n, *shape), generator=g, device=device)  # generate's own first draw: its x_T / prior_std
    guide = guide.to(device=device, dtype=z.dtype)
    x_t0 = denoiser.schedule.q_sample(guide, torch.tensor(t0, dtype=torch.float64), z)
    return generate(denoiser, n, shape, seed=seed, device=device, start=(x_t0, t0), **generate_kw)


# --- inpainting and RePaint --------------------------------------------------------------------------------------
def check_mask(mask: Tensor, image: Tensor) -> Tensor:
    """The known-pixel mask m (1 known, 0 to generate) as a float tensor broadcastable to image (B, C, H, W): it may be
    (H, W), (1 or B, 1 or C, H, W). Raises ValueError for another size, values other than 0 and 1, or a mask that is
    all known (nothing to inpaint) or all unknown (plain sampling)."""
    m = torch.as_tensor(mask)
    if m.ndim == 2:
        m = m[None, None]
    if (m.ndim != 4 or tuple(m.shape[-2:]) != tuple(image.shape[-2:]) or m.shape[0] not in (1, image.shape[0])
            or m.shape[1] not in (1, image.shape[1])):
        raise ValueError(f"the mask must have the image's size {tuple(image.shape[-2:])} (as (H, W) or (B|1, C|1, H, W)), "
                         f"got {tuple(torch.as_tensor(mask).shape)}")
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("the mask must hold only 0 (generate) and 1 (keep)")
    if bool((m == 1).all()):
        raise ValueError("the mask keeps every pixel: nothing to inpaint; mark the region to generate")
    if bool((m == 0).all()):
        raise ValueError("the mask keeps no pixel: that is unconditional sampling (`diffuse sample`); mark the pixels to keep")
    return m.to(image.dtype)


def inpaint_projection(schedule: NoiseSchedule, known: Tensor, mask: Tensor, generator: torch.Generator) -> Project:
    """x_s <- m * x^known_s + (1 - m) * x_s with x^known_s ~ q(x_s | x_0 = known) (Lugmayr et al. 2022, eq. 8-9); at
    s = 0 the known pixels are the known image exactly."""
    m = check_mask(mask, known)

    def project(x_s: Tensor, s: float) -> Tensor:
        x_known = schedule.q_sample(known.to(x_s), torch.tensor(s, dtype=torch.float64), _noise(x_s.shape, generator, x_s))
        return m.to(x_s) * x_known + (1 - m.to(x_s)) * x_s

    return project


def repaint_grid(grid: Tensor, jump_length: int = 10, jump_n_samples: int = 10) -> Tensor:
    """RePaint's resampling schedule (Lugmayr et al. 2022, sec. 4.2 and its code's jump schedule) over a decreasing grid
    g_0 > ... > g_K = 0: going down level by level, on arriving at levels 1, 1 + L, 1 + 2L, ... (<= K - L; level k is
    g_{K-k}) the walk climbs back up L levels, one q(x_s | x_t) at a time, and comes down again; jump_n_samples - 1
    times at each such level. jump_n_samples = 1 is the grid itself. The paper uses T = 250, L = 10, r = 10.
    """
    g = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if jump_length < 1 or jump_n_samples < 1:
        raise ValueError(f"RePaint needs jump_length >= 1 and jump_n_samples >= 1, got {jump_length}, {jump_n_samples}")
    K = len(g) - 1
    jumps = {level: jump_n_samples - 1 for level in range(1, K - jump_length + 1, jump_length)}
    levels, level = [K], K
    while level > 0:
        level -= 1
        levels.append(level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            for _ in range(jump_length):
                level += 1
                levels.append(level)
    return g[[K - k for k in levels]]


def inpaint(denoiser, image: Tensor, mask: Tensor, *, jump_length: int = 10, jump_n_samples: int = 1, seed: int = 0,
            device: str | torch.device = "cpu", sampler: str = "ddim", steps: int | None = 50, spacing: str | None = None,
            pixels: bool = True, **generate_kw) -> Tensor:
    """Fill the pixels where mask = 0 of image (n, C, H, W) in [-1, 1], keeping those where mask = 1: the known
    region is replaced by its noised version after every step (RePaint eq. 8-9); jump_n_samples > 1 adds RePaint's
    resampling (`repaint_grid`), which costs about jump_n_samples times the network calls. Works with every
    sampler (multistep solvers restart their history after each jump). pixels = False: image is a latent with a
    latent mask (stages.LatentSpace.mask). Raises ValueError for a bad mask (`check_mask`) or resampling setting;
    ode-rk45 takes no projection."""
    check_input(image, "the image", pixels)
    m = check_mask(mask, image)
    image = image.to(device)
    g = torch.Generator(device).manual_seed(seed + 1)  # the known region's noise: its own stream, after x_T's
    project = inpaint_projection(denoiser.schedule, image, m.to(device), g)
    n, shape = image.shape[0], tuple(image.shape[1:])
    if jump_n_samples == 1:
        return generate(denoiser, n, shape, sampler=sampler, steps=steps, spacing=spacing, seed=seed, device=device,
                        project=project, **generate_kw)
    grid = repaint_grid(denoiser.schedule.grid(steps or None, spacing), jump_length, jump_n_samples)
    return generate(denoiser, n, shape, sampler=sampler, steps=steps, spacing=spacing, seed=seed, device=device,
                    project=project, grid=grid, **generate_kw)


# --- ILVR ------------------------------------------------------------------------------------------------------
def low_pass(x: Tensor, factor: int) -> Tensor:
    """phi_N(x): the mean of each N x N block, repeated over the block (downsample by N, upsample back): the
    orthogonal projection onto images constant on N x N blocks, so phi_N(phi_N(x)) = phi_N(x). (ILVR uses a
    bicubic resizer, a smoother low-pass of the same factor.)"""
    if factor < 1 or x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"the ILVR factor N = {factor} must be >= 1 and divide the image size {tuple(x.shape[-2:])}")
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")


def ilvr_projection(schedule: NoiseSchedule, reference: Tensor, factor: int, generator: torch.Generator,
                    t_stop: float = 0.0) -> Project:
    """x_s <- phi_N(y_s) + x_s - phi_N(x_s) with y_s ~ q(y_s | y) of the reference y (Choi et al. 2021, Algorithm 1,
    line 5), applied while s >= t_stop (ILVR's conditioning range; t_stop = 0: every step, so the output's low-pass
    phi_N(x_0) is the reference's exactly)."""
    low_pass(reference, factor)  # checks the factor

    def project(x_s: Tensor, s: float) -> Tensor:
        if s < t_stop:
            return x_s
        y_s = schedule.q_sample(reference.to(x_s), torch.tensor(s, dtype=torch.float64), _noise(x_s.shape, generator, x_s))
        return low_pass(y_s, factor) + x_s - low_pass(x_s, factor)

    return project


def ilvr(denoiser, reference: Tensor, factor: int, *, t_stop: float = 0.0, seed: int = 0,
         device: str | torch.device = "cpu", pixels: bool = True, **generate_kw) -> Tensor:
    """ILVR (Choi et al. 2021): samples whose N x N block means follow the reference (n, C, H, W) in [-1, 1] through
    the whole walk, so the outputs share its coarse structure and vary in the detail below the factor (more
    diversity for larger N). t_stop in [0, 1]: stop conditioning below it (ILVR's range). Raises ValueError for a
    factor that does not divide the size or a t_stop outside [0, 1]. pixels = False: the reference is a latent."""
    check_input(reference, "the reference image", pixels)
    if not (isinstance(t_stop, (int, float)) and 0 <= t_stop <= 1) or math.isnan(t_stop):
        raise ValueError(f"t_stop must be in [0, 1], got {t_stop!r}")
    reference = reference.to(device)
    g = torch.Generator(device).manual_seed(seed + 1)
    project = ilvr_projection(denoiser.schedule, reference, factor, g, t_stop)
    return generate(denoiser, reference.shape[0], tuple(reference.shape[1:]), seed=seed, device=device, project=project,
                    **generate_kw)


# --- the same edits in a latent space -------------------------------------------------------------------------
def latent_factor(factor: int, latent_shape: tuple[int, ...], image_size: int) -> int:
    """ILVR's factor N in pixels as a factor over latent cells, N / f, for latents of shape (c, H/f, W/f) of images of
    side image_size. ValueError naming the fix unless N is a multiple of f whose quotient divides the latent side."""
    side = latent_shape[-1]
    f = image_size // side
    if factor < 1 or factor % f or side % (factor // f):
        raise ValueError(f"ILVR factor {factor}: a latent-diffusion run low-passes its latents, so the factor must be a "
                         f"multiple of its downsampling f = {f} whose quotient divides the latent side {side} (e.g. "
                         f"{', '.join(str(f * k) for k in range(1, side + 1) if side % k == 0)})")
    return factor // f


def latent_edit(task: str, denoiser, latent_space, image: Tensor, mask: Tensor | None = None, *,
                strength: float = 0.5, factor: int = 2, options: dict | None = None, **generate_kw) -> Tensor:
    """An editing task of tasks/editing.py run in latent space (Rombach et al. 2022, sec. 4.5: the editing tasks of the
    pixel models work on z = s E(x) through the same denoiser): "sdedit" of the guide, "inpaint" of the known image,
    "ilvr" of the reference, each image (n, C, H, W) in [-1, 1] encoded first; the outputs decoded (n, C, H, W).
    Inpainting keeps a latent cell where the mask (1 = keep, (H, W) or broadcastable to the image) keeps all of its
    f x f pixels (LatentSpace.mask), then pastes the kept pixels back exactly, as pixel-space inpainting returns them.
    ILVR low-passes the latents over factor / f cells, so `factor` must be a multiple of f whose quotient divides the
    latent side. `options` go to the task (jump_length, jump_n_samples; t_stop); generate_kw to the sampler. SDEdit at
    strength 0 returns the image itself, as in pixel space (not the autoencoder's reconstruction of it).
    ValueError naming the fix for a mask that keeps no whole cell or a factor that does not fit."""
    f = latent_space.image_shape[-1] // latent_space.shape[-1]
    options = options or {}
    if task == "ilvr":
        latent_factor(factor, latent_space.shape, latent_space.image_shape[-1])
    if task == "inpaint":
        m = latent_space.mask(mask)
        if not bool(m.any()):
            raise ValueError(f"no {f}x{f} cell of the image is wholly kept by the mask, so the latent-diffusion run (f = {f}) "
                             "has nothing to keep; mark a larger region to keep")
    if task == "sdedit" and sdedit_time(denoiser.schedule, strength) == 0:  # strength 0: the image itself, as in pixel
        check_input(image, "the guide image", True)                        # space, not its reconstruction D(E(x))
        return image.to(device=generate_kw.get("device", image.device), dtype=torch.float32)
    z = latent_space.encode(image)
    if task == "sdedit":
        return latent_space.decode(sdedit(denoiser, z, strength, pixels=False, **options, **generate_kw))
    if task == "ilvr":
        return latent_space.decode(ilvr(denoiser, z, factor // f, pixels=False, **options, **generate_kw))
    if task != "inpaint":
        raise ValueError(f"unknown edit {task!r} for a latent-diffusion run; choose sdedit, inpaint or ilvr")
    x = latent_space.decode(inpaint(denoiser, z, m, pixels=False, **options, **generate_kw))
    keep = check_mask(mask, image).to(x)
    return keep * image.to(x) + (1 - keep) * x
