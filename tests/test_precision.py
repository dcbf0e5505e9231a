"""Mixed-precision sampling (issue 19): the network under bf16 autocast, the sampler in float32. The fast path must
draw the plain path's samples to bf16 tolerance, for every kind of sampler, with guidance and an interval."""

import pytest
import torch

from diffuse.app.cli import main
from diffuse.config import RunConfig, apply_overrides
from diffuse.precision import autocast_dtype
from diffuse.generate import generate
from diffuse.kinds.diffusion import build_denoiser, build_model

TINY = ["data.source=digits", "data.image_size=8", "schedule.kind=flow", "schedule.t_sampling=logit_normal",
        "model.prediction=flow", "model.channels=8", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
        "model.attention_resolutions=[4]", "model.norm_groups=4", "model.dropout=0.0", "model.class_conditional=true",
        "train.steps=3", "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=3",
        "train.sample_every=0", "train.mixed_precision=no", "sample.sampler=dpmpp-2m", "sample.steps=4"]


def tiny_denoiser(seed: int = 0):
    """A small class-conditional U-Net (10 classes and the null label) with random weights, its zero-initialised
    output layers drawn at random too, so that the network, not the sampler's noise, shapes the samples."""
    torch.manual_seed(seed)
    cfg = apply_overrides(RunConfig(), TINY)
    net = build_model(cfg, 10).eval()
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.3)
    return build_denoiser(cfg, net)


@pytest.mark.parametrize("sampler, options", [("dpmpp-2m", {}), ("ddim", {}), ("heun", {"s_churn": 5.0}),
                                              ("euler-ancestral", {}), ("dpmpp-3m", {})])
def test_bf16_sampling_draws_the_fp32_samples_to_tolerance(sampler, options):
    den = tiny_denoiser()
    labels = torch.arange(16) % 10
    kw = dict(sampler=sampler, steps=8, labels=labels, guidance=1.5, guidance_interval=(0.2, 3.0), seed=3, **options)
    plain = generate(den, 16, (1, 8, 8), **kw)
    fast = generate(den, 16, (1, 8, 8), mixed_precision="bf16", **kw)
    assert fast.dtype == plain.dtype == torch.float32  # the samples come back in float32
    diff = (fast - plain).abs()
    assert float(diff.max()) > 0  # autocast did reach the network (bf16 rounds its convolutions)
    assert float(diff.mean()) < 0.01, float(diff.mean())  # pixels in [-1, 1]: 0.5% of the range at most
    assert float(plain.std()) > 0.1  # the network shapes the samples, so the tolerance says something


def test_bf16_network_output_is_read_in_float32():
    """The sampler steps in float32: the prediction made from a bf16 network output is float32, and equals the
    float32 prediction to bf16's precision."""
    den = tiny_denoiser()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    label = torch.arange(4)
    with torch.no_grad():
        plain = den(x, 0.5, label=label)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = den(x, 0.5, label=label)
    assert fast.x0.dtype == fast.eps.dtype == torch.float32
    torch.testing.assert_close(fast.x0, plain.x0, atol=0.05 * float(plain.x0.abs().max()), rtol=0)


def test_autocast_dtype_names_the_setting_and_the_fix():
    assert autocast_dtype("no", "cpu") is None
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match=r"sample\.mixed_precision = 'fp16' needs a CUDA device; use 'bf16' or 'no' on CPU"):
        autocast_dtype("fp16", "cpu", "sample.mixed_precision")
    with pytest.raises(ValueError, match=r"must be one of auto, no, bf16, fp16; got 'half'"):
        autocast_dtype("half", "cpu")
    with pytest.raises(ValueError, match="fp16"):
        generate(tiny_denoiser(), 2, (1, 8, 8), sampler="ddim", steps=2, mixed_precision="fp16")


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns_that_it_is_emulated(monkeypatch, native):
    """bf16 asked for by name still runs (it is exact enough to test with), but on a CPU that emulates it (about 9x
    slower than fp32 for the demo network) the user is told, and told the fix; "auto" stays silent and picks fp32."""
    import warnings

    from diffuse import precision
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert autocast_dtype("bf16", "cpu", "train.mixed_precision") == torch.bfloat16
        assert autocast_dtype("auto", "cpu") == (torch.bfloat16 if native else None)
    messages = [str(w.message) for w in caught]
    if native:
        assert messages == []
    else:
        assert len(messages) == 1
        assert messages[0].startswith("train.mixed_precision = 'bf16' on a CPU without native bf16")
        assert "use 'auto' or 'no'" in messages[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision") / "run"
    args = [a for kv in TINY for a in ("--set", kv)]
    assert main(["train", "configs/mnist.toml", *args, "--out", str(out)]) == 0
    return out


def test_cli_mixed_precision_flag_and_config(run, tmp_path, capsys):
    """`diffuse sample --mixed-precision` picks the network's precision: "no" draws generate's float32 samples
    exactly, "bf16" draws them to tolerance, and fp16 on a CPU is refused before the model loads."""
    import numpy as np

    from diffuse.generate import default_labels
    from diffuse.runs import load_run
    from diffuse.kinds.diffusion import sample_config_kwargs

    cfg, den, num_classes = load_run(run)
    kw = {**sample_config_kwargs(cfg.sample), "mixed_precision": "no"}
    want = generate(den, 6, (1, 8, 8), labels=default_labels(6, num_classes), **kw)
    want = ((want.clamp(-1, 1) + 1) / 2).numpy()
    got = {}
    for mode in ("no", "bf16"):
        out = tmp_path / f"{mode}.npy"
        assert main(["sample", str(run), "--n", "6", "--mixed-precision", mode, "--out", str(out)]) == 0
        got[mode] = np.load(out)
    np.testing.assert_allclose(got["no"], want, atol=1e-6, rtol=0)
    assert 0 < np.abs(got["bf16"] - want).mean() < 0.01
    assert main(["sample", str(run), "--n", "2", "--mixed-precision", "fp16", "--out", str(tmp_path / "x.npy")]) == 2
    assert "--mixed-precision = 'fp16' needs a CUDA device; use 'bf16' or 'no' on CPU" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()
