"""The latent-diffusion autoencoder (diffuse/autoencoder.py): the KL posterior, vector quantisation (nearest code,
straight-through, commitment, EMA, dead-code restart, statistics), the GAN terms, the metrics, training to a stated
PSNR on MNIST, and bad configs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffuse.nets.autoencoder import (
    Autoencoder,
    AutoencoderConfig,
    DiagonalGaussian,
    PatchDiscriminator,
    VectorQuantizer,
    adaptive_weight,
    autoencoder_loss,
    check_config,
    codebook_usage,
    discriminator_loss,
    hinge_d_loss,
    hinge_g_loss,
    latent_scale_factor,
    nearest_code,
    perplexity,
    psnr,
)


def tiny(**kw) -> AutoencoderConfig:
    """f = 4 (three levels), c = 2, 16-wide at most: ~60k parameters."""
    base = dict(latent_channels=2, channels=[8, 16, 16], num_res_blocks=1, norm_groups=4, codebook_size=16,
                disc_channels=8, disc_layers=2)
    return AutoencoderConfig(**{**base, **kw})


def images(b=4, s=16, seed=0) -> torch.Tensor:
    return torch.rand(b, 1, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- the KL posterior -----------------------------------------------------------------------------------------------
def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64) * 2
    q = DiagonalGaussian(moments)
    mean, logvar = moments.chunk(2, dim=1)
    ref = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert q.kl().shape == (3,)
    torch.testing.assert_close(q.kl(), ref, atol=1e-6, rtol=0)
    assert torch.equal(q.mode(), mean)


def test_log_variance_is_clamped_as_in_ldm():
    moments = torch.tensor([0.0, 0.0, 50.0, -80.0], dtype=torch.float64).view(1, 4, 1, 1)  # mu = (0, 0), logvar = (50, -80)
    q = DiagonalGaussian(moments)
    assert q.logvar.flatten().tolist() == [20.0, -30.0]
    torch.testing.assert_close(q.std.flatten(), torch.tensor([math.exp(10), math.exp(-15)], dtype=torch.float64))


def test_sample_has_the_posterior_moments_and_is_reparameterised():
    n, mu, var = 200_000, 0.7, 0.25
    moments = torch.tensor([mu, math.log(var)], dtype=torch.float64).view(1, 2, 1, 1).repeat(n, 1, 1, 1).requires_grad_()
    q = DiagonalGaussian(moments)
    z = q.sample(torch.Generator().manual_seed(0)).flatten()
    se = math.sqrt(var / n)
    assert abs(z.mean().item() - mu) < 4 * se                              # Monte Carlo: 4 standard errors
    assert abs(z.var().item() - var) < 4 * var * math.sqrt(2 / n)
    assert torch.equal(z, DiagonalGaussian(moments).sample(torch.Generator().manual_seed(0)).flatten())
    z.sum().backward()                                                     # dz/dmu = 1, dz/dlogvar = (z - mu) / 2
    torch.testing.assert_close(moments.grad[:, 0].flatten(), torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(moments.grad[:, 1].flatten(), (z.detach() - mu) / 2)


# --- vector quantisation ----------------------------------------------------------------------------------------
def quantizer(K=5, c=3, **kw) -> VectorQuantizer:
    vq = VectorQuantizer(tiny(kind="vq", codebook_size=K, latent_channels=c, **kw))
    vq.codebook.data = torch.randn(K, c, generator=torch.Generator().manual_seed(1))
    return vq


def test_quantised_vectors_are_the_nearest_codes():
    vq = quantizer().eval()
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    q = vq(z)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                d = [((z[b, :, i, j] - e) ** 2).sum().item() for e in vq.codebook]
                k = min(range(5), key=d.__getitem__)
                assert q.indices[b, i, j] == k
                torch.testing.assert_close(q.z_q[b, :, i, j], vq.codebook[k])  # z + (e - z): e up to rounding


def test_straight_through_gradient_is_the_identity():
    vq = quantizer().eval()
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), requires_grad=True)
    w = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    (vq(z).z_q * w).sum().backward()
    assert torch.equal(z.grad, w)


def test_commitment_and_codebook_losses_by_hand():
    vq = quantizer(commitment_beta=0.25, codebook_update="loss").eval()
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    q = vq(z)
    e = vq.codebook.detach()[q.indices].permute(0, 3, 1, 2)            # (B, c, h, w) the chosen codes
    by_hand = torch.stack([((z[b] - e[b]) ** 2).sum() for b in range(2)])
    torch.testing.assert_close(q.commitment, 0.25 * by_hand)
    torch.testing.assert_close(q.codebook, by_hand)
    q.codebook.sum().backward()                                          # d/de_k sum ||z - e_k||^2 = 2 sum (e_k - z)
    flat, idx = z.permute(0, 2, 3, 1).reshape(-1, 3), q.indices.flatten()
    grad = torch.stack([2 * (vq.codebook.detach()[k] - flat[idx == k]).sum(0) for k in range(5)])
    torch.testing.assert_close(vq.codebook.grad, grad)
    assert quantizer(codebook_update="ema").eval()(z).codebook.abs().sum() == 0  # the EMA replaces the codebook loss


def test_ema_update_equals_the_formula_by_hand():
    vq = VectorQuantizer(tiny(kind="vq", codebook_size=3, latent_channels=2, ema_decay=0.9, dead_code_threshold=0.0))
    e0 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-3.0, 3.0]])
    vq.codebook.copy_(e0)
    vq.embed_sum.copy_(e0)                                               # m_i = e_i with N_i = 1 (the initial state)
    z = torch.tensor([[0.1, -0.1], [0.9, 1.2], [1.1, 0.7], [0.2, 0.3]]).t().reshape(1, 2, 1, 4)  # codes 0, 1, 1, 0
    q = vq.train()(z)
    assert q.indices.flatten().tolist() == [0, 1, 1, 0]
    n = torch.tensor([2.0, 2.0, 0.0])
    sums = torch.tensor([[0.3, 0.2], [2.0, 1.9], [0.0, 0.0]])
    N = 0.9 * 1.0 + 0.1 * n                                              # N_i <- gamma N_i + (1 - gamma) n_i
    m = 0.9 * e0 + 0.1 * sums                                            # m_i <- gamma m_i + (1 - gamma) sum_j z_ij
    eps, total = 1e-5, N.sum()
    N_smooth = (N + eps) / (total + 3 * eps) * total                     # Laplace smoothing
    torch.testing.assert_close(vq.cluster_size, N)
    torch.testing.assert_close(vq.embed_sum, m)
    torch.testing.assert_close(vq.codebook, m / N_smooth[:, None])
    torch.testing.assert_close(q.counts, n)


def test_a_dead_code_is_restarted_at_an_encoder_output_of_the_batch():
    vq = VectorQuantizer(tiny(kind="vq", codebook_size=4, latent_channels=2, dead_code_threshold=1.0))
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]))  # code 3: never the nearest
    vq.embed_sum.copy_(vq.codebook)
    z = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.0, 1.1], [0.2, 0.1], [1.0, 0.2], [0.1, 0.8]]).t().reshape(1, 2, 2, 3)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    before = vq.codebook.clone()
    vq.eval()(z)                                                         # eval mode and decode never move the codebook
    vq.train()(z, update=False)
    assert torch.equal(vq.codebook, before)
    vq.train()(z, generator=torch.Generator().manual_seed(0))
    assert (vq.codebook[3] == flat).all(1).any()                          # one of the batch's encoder outputs
    assert vq.cluster_size[3] == 1.0 and torch.equal(vq.embed_sum[3], vq.codebook[3])
    assert (vq.cluster_size[:3] >= 1.0).all()                            # the used codes were not restarted
    assert not (vq.codebook[:3, None] == flat[None]).all(-1).any()


def test_perplexity_and_usage():
    K = 8
    assert perplexity(torch.full((K,), 5.0)).item() == pytest.approx(K)   # uniform: exp(log K) = K
    assert perplexity(torch.tensor([0.0, 0, 7, 0])).item() == pytest.approx(1.0)
    assert perplexity(torch.tensor([1.0, 1, 2])).item() == pytest.approx(math.exp(1.5 * math.log(2)))
    assert codebook_usage(torch.tensor([3.0, 0, 1, 0])).item() == 0.5
    assert codebook_usage(torch.tensor([3.0, 0, 1, 0]) + torch.tensor([0.0, 0, 0, 2])).item() == 0.75  # accumulated


# --- the GAN terms ----------------------------------------------------------------------------------------------
def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 4, generator=g, requires_grad=True)               # a linear "decoder": x~ = W h
    h, y, v = torch.randn(4, generator=g), torch.randn(3, generator=g), torch.randn(3, generator=g)
    x_rec = W @ h
    rec, gan = ((x_rec - y) ** 2).sum(), -(v * x_rec).sum()
    g_rec = 2 * torch.outer(W.detach() @ h - y, h)                       # d rec / dW by hand
    g_gan = -torch.outer(v, h)                                           # d gan / dW by hand
    lam = adaptive_weight(rec, gan, W)
    torch.testing.assert_close(lam, g_rec.norm() / (g_gan.norm() + 1e-4))
    assert not lam.requires_grad
    assert adaptive_weight(rec, 0.0 * gan, W).item() == 1e4               # clamped when the GAN gradient vanishes


def test_autoencoder_loss_uses_the_adaptive_weight_of_the_decoders_last_layer():
    torch.manual_seed(0)
    cfg = tiny(disc_start=0, disc_weight=0.5)
    model, disc = Autoencoder(cfg, 1), PatchDiscriminator(cfg, 1)
    x = images()
    out = model(x, generator=torch.Generator().manual_seed(0))
    terms = autoencoder_loss(model, x, out, step=0, disc=disc)
    last = model.decoder.last_layer.weight
    g_rec, = torch.autograd.grad(terms["rec"], last, retain_graph=True)
    g_gan, = torch.autograd.grad(terms["gan"], last, retain_graph=True)
    torch.testing.assert_close(terms["adaptive_weight"], g_rec.norm() / (g_gan.norm() + 1e-4))
    total = terms["rec"] + cfg.kl_weight * terms["kl"] + 0.5 * terms["adaptive_weight"] * terms["gan"]
    torch.testing.assert_close(terms["loss"], total)


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.3, 1.0])
    d = 0.5 * ((0.0 + 0.5 + 2.0) / 3 + (0.0 + 1.3 + 2.0) / 3)          # relu(1 - real), relu(1 + fake)
    assert hinge_d_loss(real, fake).item() == pytest.approx(d)
    assert hinge_g_loss(fake).item() == pytest.approx(-(-2.0 + 0.3 + 1.0) / 3)


def test_the_gan_terms_are_zero_before_disc_start():
    torch.manual_seed(0)
    cfg = tiny(disc_start=5, disc_weight=0.5)
    model, disc = Autoencoder(cfg, 1), PatchDiscriminator(cfg, 1)
    x = images()
    out = model(x)                                                       # generator None: the mode, deterministic
    before = autoencoder_loss(model, x, out, step=4, disc=disc)
    assert before["gan"] == 0 and before["adaptive_weight"] == 0
    torch.testing.assert_close(before["loss"], before["rec"] + cfg.kl_weight * before["kl"])
    after = autoencoder_loss(model, x, out, step=5, disc=disc)
    assert after["gan"] != 0 and after["adaptive_weight"] > 0
    d_before = discriminator_loss(disc, x, out.reconstruction, step=4)
    d_before["loss"].backward()
    assert d_before["loss"] == 0 and all((p.grad == 0).all() for p in disc.parameters())
    d_after = discriminator_loss(disc, x, out.reconstruction, step=5)
    torch.testing.assert_close(d_after["loss"], hinge_d_loss(disc(x), disc(out.reconstruction)))


def test_patch_discriminator_gives_one_logit_per_patch_independent_of_the_batch():
    disc = PatchDiscriminator(tiny(disc_layers=2), 1)
    x = images(b=3, s=24)
    logits = disc(x)
    assert logits.shape == (3, 1, 24 // 4 - 2, 24 // 4 - 2)
    torch.testing.assert_close(disc(x[:1]), logits[:1])                  # GroupNorm, not BatchNorm
    with pytest.raises(ValueError, match="disc_layers = 2"):
        disc(images(s=8))


def test_one_optimisation_step_moves_every_network():
    torch.manual_seed(0)
    cfg = tiny(kind="vq", disc_start=0)
    model, disc = Autoencoder(cfg, 1), PatchDiscriminator(cfg, 1)
    opt, opt_d = torch.optim.Adam(model.parameters(), lr=1e-3), torch.optim.Adam(disc.parameters(), lr=1e-3)
    x, g = images(), torch.Generator().manual_seed(0)
    w0, d0, book0 = model.encoder[0].weight.clone(), disc.net[0].weight.clone(), model.quantizer.codebook.clone()

    out = model(x, generator=g)
    ae = autoencoder_loss(model, x, out, step=0, disc=disc)
    opt.zero_grad(); ae["loss"].backward(); opt.step()
    d = discriminator_loss(disc, x, out.reconstruction, step=0)
    opt_d.zero_grad(); d["loss"].backward(); opt_d.step()

    assert all(torch.isfinite(v).all() for v in {**ae, **d}.values())
    assert ae["gan"] != 0 and d["loss"] > 0
    assert not torch.equal(model.encoder[0].weight, w0) and not torch.equal(disc.net[0].weight, d0)
    assert not torch.equal(model.quantizer.codebook, book0)               # the EMA moved the codebook


# --- the autoencoder's interface -----------------------------------------------------------------------------------
def test_encode_decode_and_latent_shape():
    torch.manual_seed(0)
    kl, vq = Autoencoder(tiny(kind="kl"), 1), Autoencoder(tiny(kind="vq"), 1)
    x = images()
    assert kl.latent_shape(16, 1) == (2, 4, 4) and kl.encoder(x).shape == (4, 4, 4, 4) and vq.encoder(x).shape == (4, 2, 4, 4)
    z = kl.encode(x)
    assert torch.equal(z, kl.posterior(x).mean)                          # no generator: the mode
    z1, z2 = (kl.encode(x, torch.Generator().manual_seed(s)) for s in (1, 1))
    assert torch.equal(z1, z2) and not torch.equal(z1, z)
    assert kl.decode(z).shape == x.shape
    vq.train()
    book = vq.quantizer.codebook.clone()
    z = vq.encode(x)                                                     # before quantisation
    q = vq.quantizer(z, update=False)
    torch.testing.assert_close(vq.decode(z), vq.decoder(q.z_q))          # decode quantises first...
    assert torch.equal(vq.quantizer.codebook, book)                      # ...without moving the codebook
    with pytest.raises(ValueError, match="1-channel"):
        kl.latent_shape(16, 3)
    with pytest.raises(ValueError, match="multiple of the downsampling factor f = 4"):
        kl.latent_shape(18, 1)


# --- metrics ------------------------------------------------------------------------------------------------------
def test_psnr_by_hand():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), -0.5)])
    p = psnr(x, y)                                                       # 10 log10(2^2 / MSE)
    torch.testing.assert_close(p, torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.25)], dtype=torch.float64))
    assert p[0].item() == pytest.approx(26.0206, abs=1e-4)
    assert psnr(x, x).isinf().all()
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, y[:1])


def test_latent_scale_factor_gives_unit_variance():
    z = 3.0 * torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(0)) + 1.0
    s = latent_scale_factor(z)
    assert s == pytest.approx(1 / 3, rel=0.05)
    assert (z * s).double().std(correction=0).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="non-constant"):
        latent_scale_factor(torch.ones(8, 2))


# --- training on MNIST --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist16():
    """512 training and 64 held-out MNIST digits at 16x16 in [-1, 1]."""
    from diffuse.data import DataConfig, load_dataset

    x = load_dataset(DataConfig(source="mnist", image_size=16)).images[:576].float() / 127.5 - 1
    return x[:512], x[512:]


def train(cfg: AutoencoderConfig, data: torch.Tensor, steps: int) -> Autoencoder:
    """Adam at 2e-3 on batches of 32, no GAN: the reconstruction (and KL or VQ) terms only."""
    torch.manual_seed(0)
    model = Autoencoder(cfg, 1)
    opt, g = torch.optim.Adam(model.parameters(), lr=2e-3), torch.Generator().manual_seed(0)
    for step in range(steps):
        x = data[torch.randint(0, len(data), (32,), generator=g)]
        loss = autoencoder_loss(model, x, model(x, generator=g), step)["loss"]
        opt.zero_grad(); loss.backward(); opt.step()
    return model.eval()


def test_kl_autoencoder_reconstructs_held_out_digits(mnist16):
    """f = 4, c = 2 (4x4x2 latents for 16x16 digits), 200 steps: ~23 dB on the held-out digits (threshold 20)."""
    train_x, test_x = mnist16
    model = train(tiny(kind="kl", disc_weight=0.0), train_x, steps=200)
    with torch.no_grad():
        assert psnr(test_x, model.decode(model.encode(test_x))).mean() > 20.0


def test_vq_autoencoder_reconstructs_and_uses_its_codebook(mnist16):
    """f = 4, c = 2, K = 64 codes with dead-code restart, 250 steps: ~22 dB held out (threshold 19), all 64 codes in use
    over the training digits, perplexity ~44 (thresholds 90% and 24; without restarts: 42% and 13, at 19.7 dB)."""
    train_x, test_x = mnist16
    model = train(tiny(kind="vq", codebook_size=64, disc_weight=0.0, dead_code_threshold=1.0), train_x, steps=250)
    with torch.no_grad():
        assert psnr(test_x, model.decode(model.encode(test_x))).mean() > 19.0
        counts = sum(model.quantizer(model.encode(x)).counts for x in train_x.split(64))  # accumulated over batches
    assert codebook_usage(counts) > 0.9
    assert perplexity(counts) > 24


# --- bad configs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("kind", "ae"), ("codebook_update", "sgd"), ("rec_loss", "l3"), ("channels", []), ("channels[1]", 0),
    ("norm_groups", 5), ("latent_channels", 0), ("num_res_blocks", 1.5), ("kl_weight", float("nan")),
    ("kl_weight", -1.0), ("codebook_size", 1), ("commitment_beta", float("inf")), ("ema_decay", 1.0),
    ("ema_decay", 0.0), ("dead_code_threshold", -1.0), ("disc_weight", True), ("disc_start", -1),
    ("disc_channels", 0), ("disc_layers", 0),
])
def test_bad_config_values_name_the_field(field, value):
    cfg = tiny()
    if field == "channels[1]":
        cfg.channels = [8, 0]
    else:
        setattr(cfg, field, value)
    with pytest.raises(ValueError, match=rf"autoencoder\.{field.replace('[', '.').replace(']', '.')}"):
        check_config(cfg)
    with pytest.raises(ValueError, match="autoencoder"):
        Autoencoder(cfg, 1)


def test_nearest_code_is_exact_under_bf16_autocast():
    # the distance expansion in bf16 loses the small cross term; the assignment is computed in fp32 regardless
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(4096, 4, generator=g), torch.randn(256, 4, generator=g) * 0.5
    want = torch.cdist(z.double(), codebook.double()).argmin(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_code(z, codebook)
        bf16 = (z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.t() + codebook.pow(2).sum(1)[None]).argmin(1)
    assert torch.equal(got, want)
    assert (bf16 != want).any()  # what the expansion would have assigned in bf16: the case is a real one
