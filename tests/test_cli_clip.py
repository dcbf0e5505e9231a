"""`diffuse sample RUN --clip CLIPRUN --prompt ... --clip-scale S` (issue 34, sec. 2): CLIP guidance of tiny trained runs
through the request/plan machinery. The guidance term is s sigma_t times the gradient of the cosine (noise-aware, GLIDE)
or of the spherical distance of the decoded x_0 through denoiser and decoder (plain, k-diffusion), computed here by
autograd by hand; guided samples score higher with the guiding CLIP than the unguided ones of the same noise, scale 0
is the unguided draw exactly, the command draws the library's pixels bit for bit, and every bad input is named."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from diffuse.app.cli import main, parser
from diffuse.app.requests import EditRequest, RequestError, SampleRequest, execute, resolve
from diffuse.config import RunConfig, apply_overrides, load_config, save_config
from diffuse.generate import chunk_seed, generate
from diffuse.guidance import ClipX0Guidance, NoisyClipGuidance, RandomShift, spherical_dist_loss
from diffuse.kinds.clip import clip_guidance, load_clip, prompt_embedding, same_process
from diffuse.runs import load_run
from diffuse.schedule import Schedule, ScheduleConfig
from diffuse.stages import space
from diffuse.train import train
from diffuse.visualize import to_unit

from test_cli import TINY, _sets
from test_latent import ae_cfg, ldm_cfg

PROMPT = "a handwritten seven"
CLIP = ["model.kind=clip", "data.source=digits", "data.channels=1", "data.image_size=8", "model.channels=8",
        "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.norm_groups=4",
        "model.dropout=0.0", "model.text_encoder=chars", "model.max_tokens=24", "clip.dim=16", "clip.text_width=16",
        "train.batch_size=32", "train.lr=3e-3", "train.warmup_steps=1", "train.log_every=1000", "train.sample_every=0",
        "train.checkpoint_every=1000", "train.mixed_precision=no", "train.steps=40"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An unconditional and a class-conditional pixel run on 8x8 digits (linear VP, v-prediction), an autoencoder and a
    class-conditional latent flow run on it, and a plain and a noise-aware CLIP (of the pixel runs' process) trained
    40 steps on captioned 8x8 digits."""
    root = tmp_path_factory.mktemp("clipcli")
    out = {k: root / k for k in ("uncond", "cond", "ae", "ldm", "plain", "noisy")}
    assert main(["train", "configs/mnist.toml", *_sets(TINY), "--out", str(out["uncond"])]) == 0
    assert main(["train", "configs/mnist_cond_vp.toml", *_sets(TINY), "--set", "train.condition_dropout={label=0.5}",
                 "--out", str(out["cond"])]) == 0
    train(ae_cfg(), out["ae"], progress=False)
    train(ldm_cfg(out["ae"]), out["ldm"], progress=False)
    train(apply_overrides(RunConfig(), CLIP), out["plain"], progress=False)
    # every example clean (t = 0): with the default share, 75% noised, 40 steps leave the tower untrained (the loss stays
    # at ln 32); its gradient at x_t is still f(x_t, t) . g's, which is what the tests check
    train(apply_overrides(RunConfig(), CLIP + ["clip.noise_aware=true", "clip.clean_share=1.0"]), out["noisy"],
          progress=False)
    return {k: str(v) for k, v in out.items()}


def variant(run: str, folder, *overrides: str) -> str:
    """A copy of a run folder whose config.toml has the overrides (the checks read the config before any weights)."""
    shutil.copytree(run, folder)
    save_config(apply_overrides(load_config(f"{folder}/config.toml"), list(overrides)), f"{folder}/config.toml")
    return str(folder)


def points(n=4, shape=(1, 8, 8), seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


# --- the guidance term is the gradient computed by hand --------------------------------------------------------------
@pytest.mark.parametrize("t", [0.2, 0.7])
def test_the_noise_aware_term_is_s_sigma_times_the_autograd_gradient_of_the_cosine(runs, t):
    """eps~ = eps - s sigma_t grad_{x_t} f(x_t, t) . g(c) (GLIDE, lecture 002), f the trained CLIP's image tower at the
    run's model time and g its text tower's embedding of the prompt, the gradient by autograd here."""
    _, den, _ = load_run(runs["uncond"])
    _, clip = load_clip(runs["noisy"])
    g = prompt_embedding(clip, PROMPT)
    s, x = 40.0, points()
    guided = clip_guidance(den, clip, g, s)
    assert isinstance(guided, NoisyClipGuidance)
    tt = torch.full((4,), t, dtype=torch.float64)
    x_in = x.clone().requires_grad_(True)
    f = clip.image_embedding(x_in, den.schedule.model_time(tt).float())
    grad, = torch.autograd.grad((f * g).sum(), x_in)
    assert grad.abs().max() > 1e-4  # the tower reads x (the test would pass trivially otherwise)
    sigma = float(den.schedule.sigma(tt)[0])
    with torch.no_grad():
        want = den(x, t).eps - s * sigma * grad
        got = guided(x, t)
    torch.testing.assert_close(got.eps, want, rtol=1e-5, atol=1e-6)
    alpha = float(den.schedule.alpha(tt)[0])
    torch.testing.assert_close(got.x0, (x - sigma * got.eps) / alpha, rtol=1e-5, atol=1e-5)  # x_0 re-derived


def test_the_plain_term_differentiates_the_decoded_x0_through_denoiser_and_decoder(runs):
    """A latent run with a plain CLIP: eps~ = eps + s sigma_t grad_{z_t} L, L = mean over k = 2 shifted copies of
    spherical_dist_loss(f(shift_j(D(z^_0(z_t) / s_f))), g), by autograd through the class-conditional latent flow
    denoiser and the autoencoder's decoder here."""
    cfg, den, _ = load_run(runs["ldm"])
    latent = space(cfg)
    _, clip = load_clip(runs["plain"])
    g = prompt_embedding(clip, PROMPT)
    labels = torch.tensor([7, 1, 7, 3])
    cond = lambda z, t: den(z, t, label=labels)  # noqa: E731
    cond.schedule = den.schedule
    s, t, z = 5.0, 0.6, points(shape=latent.shape, seed=3)
    guided = clip_guidance(cond, clip, g, s, cutouts=2, seed=11, decode=latent.decode_with_grad)
    assert isinstance(guided, ClipX0Guidance)
    z_in = z.clone().requires_grad_(True)
    images = latent.autoencoder.decode(den(z_in, t, label=labels).x0 / latent.scale_factor).clamp(-1, 1)
    gen, shift, loss = torch.Generator().manual_seed(11), RandomShift(), 0
    for _ in range(2):
        loss = loss + spherical_dist_loss(clip.image_embedding(shift(images, gen)), g) / 2
    grad, = torch.autograd.grad(loss.sum(), z_in)
    assert grad.abs().max() > 1e-5
    sigma = float(den.schedule.sigma(torch.tensor([t], dtype=torch.float64))[0])
    with torch.no_grad():
        want = den(z, t, label=labels).eps + s * sigma * grad
        got = guided(z, t)
    torch.testing.assert_close(got.eps, want, rtol=1e-5, atol=1e-6)


# --- sampling: the score rises, scale 0 is the unguided draw, the command is the library --------------------------
def sample(tmp_path, run, *flags) -> np.ndarray:
    path = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npy"
    assert main(["sample", run, "--n", "16", "--steps", "5", "--seed", "3", "--mixed-precision", "no", *flags,
                 "--out", str(path)]) == 0
    return np.load(path)


def clip_score(clip_run: str, x01: np.ndarray, prompt: str = PROMPT) -> float:
    """The mean cosine f(x, clean) . g(prompt) of the CLIP over samples in [0, 1] (the noise-aware one at t = 0, the
    clean images it trained on)."""
    cfg, clip = load_clip(clip_run)
    x = torch.from_numpy(x01) * 2 - 1
    model_time = Schedule.from_config(cfg.schedule).model_time(torch.zeros(len(x), dtype=torch.float64)).float() \
        if clip.noise_aware else None
    with torch.no_grad():
        return float((clip.image_embedding(x, model_time) @ prompt_embedding(clip, prompt)).mean())


@pytest.mark.parametrize("which,scale", [("noisy", "100"), ("plain", "50")])
def test_guided_samples_score_higher_and_scale_0_is_the_unguided_draw(runs, tmp_path, which, scale, capsys):
    """The same seed (x_T and every step's noise): scale 0 draws the unguided pixels exactly; a positive scale raises the
    guiding CLIP's mean cosine to the prompt over 16 samples (0.12 -> 0.4 and 0.43 -> 0.73 when this was written)."""
    base = sample(tmp_path, runs["uncond"])
    zero = sample(tmp_path, runs["uncond"], "--clip", runs[which], "--prompt", PROMPT, "--clip-scale", "0")
    np.testing.assert_array_equal(zero, base)
    guided = sample(tmp_path, runs["uncond"], "--clip", runs[which], "--prompt", PROMPT, "--clip-scale", scale)
    assert f"guided by the CLIP {runs[which]} towards '{PROMPT}' at scale {scale}" in capsys.readouterr().out
    assert clip_score(runs[which], guided) > clip_score(runs[which], base) + 0.05


def test_the_command_draws_the_librarys_pixels_bit_for_bit(runs, tmp_path):
    """`diffuse sample COND --label 3 --guidance 1.5 --clip PLAIN ... --clip-cutouts 2` (classifier-free guidance under
    CLIP guidance, dpmpp-2m) equals generate(..., guide=clip_guidance(...)) of the loaded run, CLIP and prompt."""
    flags = ["--label", "3", "--guidance", "1.5", "--guidance-interval", "all", "--sampler", "dpmpp-2m", "--steps", "4",
             "--spacing", "trailing", "--clip", runs["plain"], "--prompt", PROMPT, "--clip-scale", "30", "--clip-cutouts", "2"]
    cli = sample(tmp_path, runs["cond"], *flags)
    _, den, _ = load_run(runs["cond"])
    _, clip = load_clip(runs["plain"])
    g = prompt_embedding(clip, PROMPT)
    x = generate(den, 16, (1, 8, 8), sampler="dpmpp-2m", steps=4, spacing="trailing", labels=torch.full((16,), 3),
                 guidance=1.5, seed=3, mixed_precision="no", guide=lambda d, seed: clip_guidance(d, clip, g, 30.0, cutouts=2, seed=seed))
    np.testing.assert_array_equal(cli, to_unit(x).numpy())
    unguided = sample(tmp_path, runs["cond"], *flags[:-8])
    assert np.abs(unguided - cli).mean() > 1e-3  # the CLIP did act
    # in chunks (--batch-size 8) each chunk is generate at its own seed, its cutouts drawn from that seed too
    chunked = sample(tmp_path, runs["cond"], *flags, "--batch-size", "8")
    parts = [generate(den, 8, (1, 8, 8), sampler="dpmpp-2m", steps=4, spacing="trailing", labels=torch.full((8,), 3),
                      guidance=1.5, seed=chunk_seed(3, k), mixed_precision="no",
                      guide=lambda d, seed: clip_guidance(d, clip, g, 30.0, cutouts=2, seed=seed)) for k in (0, 1)]
    np.testing.assert_array_equal(chunked, to_unit(torch.cat(parts)).numpy())


def test_a_latent_run_is_guided_by_a_plain_clip_and_the_command_parses_back(runs, tmp_path):
    req = SampleRequest(runs["ldm"], n=4, steps=3, seed=5, label=7, clip_run=runs["plain"], prompt=PROMPT, clip_scale=20.0,
                        clip_cutouts=3, mixed_precision="no")
    plan = resolve(req)
    args = parser().parse_args([*plan.argv(), "--out", "x.npy"])
    assert SampleRequest.from_args(args) == req, plan.argv()
    guided, plain = execute(plan).x, execute(resolve(SampleRequest(runs["ldm"], n=4, steps=3, seed=5, label=7,
                                                                       mixed_precision="no"))).x
    assert guided.shape == (4, 1, 8, 8) and torch.isfinite(guided).all() and not torch.equal(guided, plain)


def test_same_process_ignores_the_training_draws_of_t_and_sees_the_rest():
    base = ScheduleConfig()
    assert same_process(base, ScheduleConfig(p_mean=0.3, t_sampling="uniform"))
    for other in (ScheduleConfig(kind="cosine"), ScheduleConfig(T=500), ScheduleConfig(beta_end=0.03), ScheduleConfig(kind="flow"),
                  ScheduleConfig(zero_terminal_snr=True)):
        assert not same_process(base, other), other
    assert same_process(ScheduleConfig(kind="edm"), ScheduleConfig(kind="edm", p_std=2.0))
    assert not same_process(ScheduleConfig(kind="edm"), ScheduleConfig(kind="edm", sigma_max=40.0))


# --- bad input: each named, with its fix ------------------------------------------------------------------------------
def bad_requests(runs, tmp_path):
    """(request fields, the field named, a piece of the message) for every refusal made before a model loads."""
    plain, noisy, clip = runs["plain"], runs["noisy"], dict(prompt=PROMPT, clip_scale=10.0)
    return [
        (dict(clip_run=variant(plain, tmp_path / "big", "data.image_size=16"), **clip), "clip_run",
         "trained on 1-channel 16x16 images and this run draws 1-channel 8x8 ones; train a CLIP at the run's size"),
        (dict(clip_run=variant(plain, tmp_path / "rgb", "data.channels=3"), **clip), "clip_run",
         "trained on 3-channel 8x8 images and this run draws 1-channel 8x8 ones"),
        (dict(clip_run=variant(noisy, tmp_path / "flow", "schedule.kind=flow"), **clip), "clip_run",
         "noise-aware and was trained on x_t of another process than this run's (schedule.kind = 'flow' there, 'linear' "
         "here): at a time t its x_t holds another mix of image and noise; train it on this run's process "
         "(--set schedule.kind=linear)"),
        (dict(clip_run=variant(noisy, tmp_path / "T", "schedule.T=500"), **clip), "clip_run", "schedule.T = 500 there"),
        (dict(clip_run=runs["cond"], **clip), "clip_run", "holds a denoiser run (model.kind = 'denoiser'), not a CLIP"),
        (dict(clip_run=runs["ae"], **clip), "clip_run", "holds a autoencoder run"),
        (dict(clip_run=plain, clip_scale=10.0), "prompt", "--clip guides the samples towards a caption: pass it with --prompt"),
        (dict(prompt=PROMPT), "prompt", "--prompt and --negative-prompt need a text-conditional run (model.text_encoder)"),
        (dict(prompt=PROMPT), "prompt", "takes no captions; --clip CLIPRUN --clip-scale S guides it towards --prompt"),
        (dict(clip_run=plain, prompt="", clip_scale=1.0), "prompt", "needs a non-empty prompt"),
        (dict(clip_run=plain, prompt="   ", clip_scale=1.0), "prompt", "needs a non-empty prompt"),
        (dict(clip_run=plain, prompt=PROMPT), "clip_scale", "--clip needs --clip-scale S"),
        (dict(clip_run=plain, prompt=PROMPT, clip_scale=float("nan")), "clip_scale", "--clip-scale must be a number >= 0, got nan"),
        (dict(clip_run=plain, prompt=PROMPT, clip_scale=float("inf")), "clip_scale", "--clip-scale must be a number >= 0, got inf"),
        (dict(clip_run=plain, prompt=PROMPT, clip_scale=-1.0), "clip_scale", "--clip-scale must be a number >= 0, got -1.0"),
        (dict(clip_run=plain, prompt=PROMPT, clip_scale="abc"), "clip_scale", "--clip-scale must be a number >= 0, got 'abc'"),
        (dict(clip_run=plain, prompt=PROMPT, clip_scale=True), "clip_scale", "--clip-scale must be a number >= 0, got True"),
        (dict(clip_run=plain, prompt=PROMPT, clip_scale=1.0, clip_cutouts=0), "clip_cutouts",
         "--clip-cutouts must be a whole number >= 1, got 0"),
        (dict(clip_run=plain, prompt=PROMPT, clip_scale=1.0, clip_cutouts=2.5), "clip_cutouts", "whole number >= 1, got 2.5"),
        (dict(clip_run=noisy, clip_cutouts=4, **clip), "clip_cutouts", "--clip-cutouts does nothing here: the CLIP"),
        (dict(clip_scale=3.0), "clip_scale", "--clip-scale needs --clip CLIPRUN"),
        (dict(clip_cutouts=3), "clip_cutouts", "--clip-cutouts needs --clip CLIPRUN"),
        (dict(clip_run=3, **clip), "clip_run", "--clip must be text, got 3"),
        (dict(clip_run=plain, negative_prompt="a one", **clip), "negative_prompt", "need a text-conditional run"),
    ]


def test_bad_requests_are_refused_naming_the_field_before_any_model_loads(runs, tmp_path, monkeypatch):
    monkeypatch.setattr("diffuse.app.requests.load_clip", lambda *a, **k: pytest.fail("a CLIP loaded"))
    for change, field, message in bad_requests(runs, tmp_path):
        with pytest.raises(RequestError) as e:
            resolve(SampleRequest(runs["uncond"], **change))
            pytest.fail(f"{change} was not refused")
        assert e.value.field == field and message in str(e.value), (change, str(e.value))


def test_a_noise_aware_clip_is_refused_on_a_latent_run_and_clips_beyond_images(runs):
    with pytest.raises(RequestError, match=r"noise-aware: it reads x_t of images, and this run diffuses latents of .*"
                                           r"guide it with a plain CLIP") as e:
        resolve(SampleRequest(runs["ldm"], clip_run=runs["noisy"], prompt=PROMPT, clip_scale=1.0))
    assert e.value.field == "clip_run"
    with pytest.raises(RequestError, match="CLIP guidance is `diffuse sample`'s") as e:
        resolve(EditRequest(runs["uncond"], task="sdedit", image="x.png", strength=0.5, clip_run=runs["plain"],
                            prompt=PROMPT, clip_scale=1.0))
    assert e.value.field == "clip_run"


def test_a_cascade_is_refused_before_its_stages_are_read(tmp_path):
    (tmp_path / "cascade.toml").write_text("")
    with pytest.raises(RequestError, match="--clip guides one run, and .* is a cascade: guide its base run") as e:
        resolve(SampleRequest(str(tmp_path), clip_run="clip", prompt=PROMPT, clip_scale=1.0))
    assert e.value.field == "clip_run"


def test_a_prompt_too_long_for_the_clips_text_tower_is_named_when_the_clip_loads(runs, capsys, tmp_path):
    long = "a handwritten seven, slanted to the right"  # 41 bytes and a begin token; the CLIP takes 24
    plan = resolve(SampleRequest(runs["uncond"], n=2, clip_run=runs["plain"], prompt=long, clip_scale=1.0))
    with pytest.raises(RequestError, match=r"the prompt needs 42 tokens .* more than its max_tokens = 24 .*shorten it") as e:
        execute(plan)
    assert e.value.field == "prompt"
    out = ["--out", str(tmp_path / "x.npy")]
    assert main(["sample", runs["uncond"], "--clip", runs["plain"], "--prompt", long, "--clip-scale", "1", *out]) == 2
    assert "max_tokens = 24" in capsys.readouterr().err


@pytest.mark.parametrize("value,message", [("abc", "'abc' is not a number"), ("nan", "'nan' is not a finite number"),
                                           ("inf", "'inf' is not a finite number"), ("-2", "must be >= 0, got -2")])
def test_the_command_line_refuses_a_scale_that_is_no_finite_number_at_parse_time(runs, capsys, tmp_path, value, message):
    argv = ["sample", runs["uncond"], "--clip", runs["plain"], "--prompt", PROMPT, "--out", str(tmp_path / "x.npy")]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--clip-scale", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --clip-scale" in err and message in err, err
    with pytest.raises(SystemExit):
        main([*argv, "--clip-scale", "1", "--clip-cutouts", "two"])
    assert "argument --clip-cutouts: 'two' is not an integer" in capsys.readouterr().err


@pytest.mark.parametrize("req", [
    SampleRequest("r", clip_run="-a clip run", prompt="-a seven", clip_scale=0.125, clip_cutouts=4),
    SampleRequest("r", n=3, label=2, guidance=2.0, clip_run="clip", prompt=PROMPT, clip_scale=300.0),
])
def test_clip_fields_round_trip_through_the_printed_command(req):
    args = parser().parse_args([*req.argv(), "--out", "x.png"])
    assert SampleRequest.from_args(args) == req, req.argv()
