"""`diffuse edit invert|reconstruct|manipulate|interpolate` and `diffuse sample PRIOR` as a user meets them: what each
writes, the printed command read back to the same request and pixels, the edit's algebra seen through the command
(amount 0 is the reconstruction, the classifier's logit rises linearly with the amount), and every bad input refused
naming its flag and the fix, with nothing written."""

from __future__ import annotations

import dataclasses
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from diffuse.app.cli import main, parser
from diffuse.app.requests import EditRequest, RequestError, SampleRequest, execute, resolve
from diffuse.checkpoint import load_checkpoint
from diffuse.tasks import semantic

from test_cli import TINY, _sets

DIFFAE = [*TINY, "model.semantic_dim=6"]  # the diffusion autoencoder on sklearn's 8x8 digits
SECOND = ["train.steps=4"]  # the classifiers and the latent DDIM, on its codes
CODED = ["--encode-steps", "8", "--steps", "8"]


def train(config: str, out, sets) -> str:
    assert main(["train", config, *_sets(sets), "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """dae (a diffusion autoencoder) with its thickness classifier cls, its ten-class label classifier lab and its latent
    DDIM prior; cond (a class-conditional denoiser); dae_b, a copy of dae trained 2 steps further, with cls_b trained on
    its codes at step 4 (before those 2 steps)."""
    base = tmp_path_factory.mktemp("diffae")
    r = {"dae": train("configs/diffae_digits.toml", base / "dae", DIFFAE)}
    on = f"semantic.run={r['dae']}"
    r["cls"] = train("configs/diffae_thickness.toml", base / "cls", [on, *SECOND])
    r["lab"] = train("configs/diffae_thickness.toml", base / "lab", [on, "semantic.target=label", *SECOND])
    r["prior"] = train("configs/diffae_prior.toml", base / "prior", [on, *SECOND, "semantic.hidden=16", "sample.steps=5"])
    r["cond"] = train("configs/mnist_cond_vp.toml", base / "cond", TINY)
    shutil.copytree(r["dae"], base / "dae_b")
    r["dae_b"] = str(base / "dae_b")
    r["cls_b"] = train("configs/diffae_thickness.toml", base / "cls_b", [f"semantic.run={r['dae_b']}", *SECOND])
    assert main(["train", str(base / "dae_b" / "config.toml"), "--set", "train.steps=6", "--out", r["dae_b"]]) == 0
    return r


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """a.png, b.png: two 8x8 digits; big.png 12x16 and rgb.png colour; junk.png not an image."""
    folder = tmp_path_factory.mktemp("images")
    digits = load_digits().images
    for name, k in (("a", 0), ("b", 1)):
        Image.fromarray(np.rint(digits[k] * 255 / 16).astype(np.uint8), "L").save(folder / f"{name}.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 12), dtype=np.uint8), "L").save(folder / "big.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(folder / "rgb.png")
    (folder / "junk.png").write_bytes(b"not an image")
    return {name: str(folder / f"{name}.png") for name in ("a", "b", "big", "rgb", "junk")} | {
        "missing": str(folder / "missing.png")}


def from_argv(argv: list[str]):
    args = parser().parse_args([*argv, "--out", "x.png"])
    return (EditRequest if args.command == "edit" else SampleRequest).from_args(args)


def written(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def unit(x: torch.Tensor) -> np.ndarray:
    """An edit's output in [-1, 1] as the .npy the command writes."""
    return ((x.cpu() + 1) / 2).clamp(0, 1).numpy()


# --- invert --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which, extra", [("cond", ["--label", "0"]), ("dae", [])])
def test_invert_writes_x_T_its_reconstruction_and_the_figure(runs, images, tmp_path, capsys, which, extra):
    out = tmp_path / "x.safetensors"
    argv = ["edit", "invert", runs[which], "--image", images["a"], "--reconstruct", "--encode-steps", "20", "--steps",
            "20", *extra]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    err = float(re.search(r"mean \|error\| (\S+) in \[-1, 1\]", printed).group(1))
    assert math.isfinite(err) and 0 <= err < 1, printed
    assert written(tmp_path) == ["x.png", "x.safetensors", "x_before_after.png"]
    x_T = load_file(out)["x_T"]
    assert x_T.shape == (1, 1, 8, 8) and torch.isfinite(x_T).all() and float(x_T.std()) > 0.1
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["encode_steps"] == "20" and meta["refine"] == "0" and meta["image"] == images["a"]
    assert meta["step"] == "4" and meta["run"].endswith(which) and meta["spacing"]
    assert Image.open(tmp_path / "x.png").size == (8, 8)  # the one rendering, at the model's size
    assert Image.open(tmp_path / "x_before_after.png").size == ((2 * (8 + 2) + 2) * 4, (8 + 2 + 2) * 4)  # input, output
    # the request read back from its command draws the same x_T
    req = EditRequest(runs[which], task="invert", image=images["a"], reconstruct=True, encode_steps=20, steps=20,
                      label=0 if extra else None)
    plan = resolve(req)
    # the plan's request says the DDIM it renders with, and one output (the request's default n is 8)
    assert plan.request == dataclasses.replace(req, n=1, sampler="ddim", eta=0.0, mixed_precision="no")
    assert from_argv(plan.argv()) == plan.request and resolve(from_argv(argv)).request == plan.request
    torch.testing.assert_close(execute(plan).x_T, x_T, rtol=0, atol=0)


def test_inverting_a_diffae_run_renders_what_reconstruct_renders(runs, images, tmp_path):
    """--reconstruct of invert and the first output of reconstruct are the same DDIM from the same (z_sem, x_T)."""
    assert main(["edit", "invert", runs["dae"], "--image", images["a"], "--reconstruct", *CODED,
                 "--out", str(tmp_path / "x.safetensors")]) == 0
    assert main(["edit", "reconstruct", runs["dae"], "--image", images["a"], "--n", "1", *CODED,
                 "--out", str(tmp_path / "r.npy")]) == 0
    png = np.asarray(Image.open(tmp_path / "x.png")).astype(int)
    rec = np.round(np.load(tmp_path / "r.npy")[0, 0] * 255).astype(int)
    assert np.abs(png - rec).max() <= 1


def test_invert_refuses_an_out_that_is_not_safetensors_and_a_missing_label(runs, images, tmp_path, capsys):
    for out in ("x.png", "x.npy", "x"):
        assert main(["edit", "invert", runs["dae"], "--image", images["a"], "--out", str(tmp_path / out)]) == 2
        assert "NAME.safetensors" in capsys.readouterr().err
    assert main(["edit", "invert", runs["cond"], "--image", images["a"], "--reconstruct",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert re.search(r"class-conditional: .*--label K", capsys.readouterr().err)
    assert written(tmp_path) == []


# --- reconstruct, manipulate, interpolate ----------------------------------------------------------------------------
def requests(runs, images):
    return {"reconstruct": EditRequest(runs["dae"], task="reconstruct", image=images["a"], n=3, encode_steps=8, steps=8,
                                       seed=2),
            "manipulate": EditRequest(runs["dae"], task="manipulate", image=images["a"], attribute=runs["cls"],
                                      amount=-0.25, n=3, encode_steps=8, steps=8),
            "manipulate_label": EditRequest(runs["dae"], task="manipulate", image=images["a"], attribute=runs["lab"] + ":3",
                                            amount=0.5, n=2, encode_steps=8, steps=6, refine=1),
            "interpolate": EditRequest(runs["dae"], task="interpolate", image=images["a"], to=images["b"], n=4,
                                       encode_steps=8, steps=8)}


@pytest.mark.parametrize("name", ["reconstruct", "manipulate", "manipulate_label", "interpolate"])
def test_each_edit_writes_n_images_and_its_command_draws_the_same_pixels(runs, images, tmp_path, name):
    req = requests(runs, images)[name]
    plan = resolve(req)
    assert plan.request == dataclasses.replace(req, sampler="ddim", eta=0.0, mixed_precision="no")  # DDIM in float32, said
    assert from_argv(plan.argv()) == plan.request, plan.argv()
    assert resolve(from_argv(plan.argv())).request == plan.request
    result = execute(plan)
    assert result.x.shape == (req.n, 1, 8, 8) and torch.isfinite(result.x).all()
    assert len(result.before) == (2 if req.task == "interpolate" else 1)
    assert main([*plan.argv(), "--out", str(tmp_path / "o.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), unit(result.x))
    assert main([*plan.argv(), "--out", str(tmp_path / "o.png")]) == 0
    cols = math.ceil(math.sqrt(req.n))  # n of 2..4: 2 columns, 1 or 2 rows (2-px gaps)
    assert Image.open(tmp_path / "o.png").size == (2 + cols * 10, 2 + math.ceil(req.n / cols) * 10)
    shown = len(result.before) + req.n  # the input(s), then the n outputs, in one row, 4x
    assert Image.open(tmp_path / "o_before_after.png").size == ((shown * (8 + 2) + 2) * 4, (8 + 2 + 2) * 4)
    if req.task != "manipulate":  # a reconstruction's variations and an interpolation's frames differ
        assert float((result.x[1:] - result.x[:1]).abs().amax()) > 1e-3


@pytest.fixture
def decoded(monkeypatch):
    """The (codes, x_T) of every semantic.decode call the edits make."""
    calls = []
    decode = semantic.decode

    def record(den, z, x_T=None, **kw):
        calls.append((z.detach().cpu().clone(), None if x_T is None else x_T.detach().cpu().clone()))
        return decode(den, z, x_T, **kw)

    monkeypatch.setattr(semantic, "decode", record)
    return calls


def test_an_amount_of_zero_is_the_reconstruction_for_every_output(runs, images, decoded):
    rec = execute(resolve(EditRequest(runs["dae"], task="reconstruct", image=images["a"], n=1, encode_steps=8, steps=8)))
    (z, x_T), = decoded
    for attribute in (runs["cls"], runs["lab"] + ":7"):
        decoded.clear()
        out = execute(resolve(EditRequest(runs["dae"], task="manipulate", image=images["a"], attribute=attribute,
                                          amount=0.0, n=4, encode_steps=8, steps=8)))
        (codes, noises), = decoded
        torch.testing.assert_close(codes, z.expand(4, -1))  # the same code
        torch.testing.assert_close(noises, x_T.expand(4, -1, -1, -1))  # the same x_T
        torch.testing.assert_close(out.x, rec.x.expand(4, -1, -1, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("which, row, amount", [("cls", None, 0.6), ("cls", None, -0.4), ("lab", 3, 0.5)])
def test_the_classifiers_logit_rises_linearly_along_the_strip(runs, images, decoded, which, row, amount):
    """Along manipulate's n outputs (amounts 0 .. s), the classifier's logit of the edited code rises by
    s_k sqrt(d) |w| (Preechakul et al. 2022, sec. 4.2), the same step each output; the pixels move with it."""
    path, n = runs[which], 5
    attribute = path if row is None else f"{path}:{row}"
    out = execute(resolve(EditRequest(runs["dae"], task="manipulate", image=images["a"], attribute=attribute,
                                      amount=amount, n=n, encode_steps=8, steps=8)))
    (codes, _), = decoded
    c = load_checkpoint(path)
    row = row or 0
    weights, bias = c.tensors["model"]["weight"].double(), c.tensors["model"]["bias"].double()
    if len(weights) > 1:  # class k of a softmax classifier: w_k - mean_j w_j, and the logit less the logits' mean
        weights, bias = weights - weights.mean(0), bias - bias.mean()
    w, b = weights[row], bias[row]
    mean, std = torch.tensor(c.state["mean"]).double(), torch.tensor(c.state["std"]).double()
    logits = ((codes.double() - mean) / std) @ w + b
    steps = torch.linspace(0, amount, n, dtype=torch.float64) * math.sqrt(codes.shape[1]) * w.norm()
    torch.testing.assert_close(logits - logits[0], steps, atol=1e-4, rtol=1e-4)
    diffs = logits.diff()
    assert (diffs > 0).all() if amount > 0 else (diffs < 0).all()
    # the same through the edit itself: edit_code of the amount-0 code
    torch.testing.assert_close(codes[-1], semantic.edit_code(codes[:1], w.float(), amount, mean.float(), std.float())[0],
                               atol=1e-5, rtol=1e-5)
    assert float((out.x[-1] - out.x[0]).abs().amax()) > 1e-6  # a 4-step network barely reads z_sem, but it does


def test_interpolation_ends_at_the_two_reconstructions(runs, images):
    frames = execute(resolve(EditRequest(runs["dae"], task="interpolate", image=images["a"], to=images["b"], n=3,
                                         encode_steps=8, steps=8))).x
    for k, image in ((0, "a"), (-1, "b")):
        rec = execute(resolve(EditRequest(runs["dae"], task="reconstruct", image=images[image], n=1, encode_steps=8,
                                          steps=8))).x
        torch.testing.assert_close(frames[k], rec[0], atol=1e-5, rtol=0)


# --- bad input ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amount, why", [("nan", "'nan' is not a finite number"), ("inf", "'inf' is not a finite number"),
                                         ("-inf", "'-inf' is not a finite number"), ("abc", "'abc' is not a number"),
                                         ("11", "must be <= 10")])
def test_a_bad_amount_fails_when_parsed(runs, images, tmp_path, capsys, amount, why):
    with pytest.raises(SystemExit):
        main(["edit", "manipulate", runs["dae"], "--image", images["a"], "--attribute", runs["cls"], f"--amount={amount}",
              "--out", str(tmp_path / "o.png")])
    assert f"argument --amount: {why}" in capsys.readouterr().err
    assert written(tmp_path) == []


@pytest.mark.parametrize("amount", [float("nan"), float("inf"), "0.3x", None, 10.5])
def test_a_bad_amount_is_refused_by_the_request_layer(runs, images, amount):
    with pytest.raises(RequestError, match="--amount") as e:
        resolve(EditRequest(runs["dae"], task="manipulate", image=images["a"], attribute=runs["cls"], amount=amount))
    assert e.value.field == "amount"


def bad_cases():
    """name -> (argv after `diffuse edit`, a pattern of the error); {X} is a run, {img:X} an image, OUT the output."""
    manip = ["manipulate", "{dae}", "--image", "{img:a}", "--amount", "0.3"]
    return {
        "attribute_denoiser": ([*manip, "--attribute", "{cond}"],
                               r"--attribute \S+ is a denoiser run, not a classifier of codes; train one with `diffuse "
                               r"train configs/diffae_thickness.toml --set semantic.run="),
        "attribute_prior": ([*manip, "--attribute", "{prior}"], r"--attribute \S+ is a diffae_prior run, not a classifier"),
        "attribute_missing": ([*manip, "--attribute", "{img:missing}"], r"not a run folder"),
        "label_without_class": ([*manip, "--attribute", "{lab}"],
                                r"--attribute \S+ is a classifier of 10 classes: .*--attribute \S+:K with K in 0\.\.9"),
        "label_class_out_of_range": ([*manip, "--attribute", "{lab}:10"], r"--attribute \S+:K with K in 0\.\.9"),
        "label_class_not_a_number": ([*manip, "--attribute", "{lab}:x"], r"--attribute \S+:K with K in 0\.\.9"),
        "attribute_given_a_class": ([*manip, "--attribute", "{cls}:3"],
                                    r"the one direction of 'thickness' .*; leave ':3' out"),
        "classifier_of_another_run": (["manipulate", "{dae_b}", "--image", "{img:a}", "--amount", "0.3", "--attribute",
                                       "{cls}"], r"trained on the codes of \S+dae at step 4, not of \S+dae_b at step 6: "
                                                 r".*train it again on this run \(--set semantic.run="),
        "classifier_of_another_step": (["manipulate", "{dae_b}", "--image", "{img:a}", "--amount", "0.3", "--attribute",
                                        "{cls_b}"], r"trained on the codes of \S+dae_b at step 4, not of \S+dae_b at step 6"),
        "reconstruct_denoiser": (["reconstruct", "{cond}", "--image", "{img:a}"],
                                 r"edit reconstruct needs a diffusion autoencoder .*; `diffuse edit invert` inverts any"),
        "manipulate_denoiser": (["manipulate", "{cond}", "--image", "{img:a}", "--amount", "0.3", "--attribute", "{cls}"],
                                r"edit manipulate needs a diffusion autoencoder \(model.kind = 'diffae'"),
        "interpolate_denoiser": (["interpolate", "{cond}", "--image", "{img:a}", "--to", "{img:b}"],
                                 r"edit interpolate needs a diffusion autoencoder"),
        "reconstruct_prior": (["reconstruct", "{prior}", "--image", "{img:a}"],
                              r"needs a diffusion autoencoder .*; \S+ is a diffae_prior run"),
        "invert_prior": (["invert", "{prior}", "--image", "{img:a}"],
                         r"edit invert needs a model of images .*; \S+ is a diffae_prior run"),
        "invert_code_classifier": (["invert", "{cls}", "--image", "{img:a}"],
                                   r"edit invert needs a model of images .*; \S+ is a diffae_classifier run"),
        "sdedit_diffae": (["sdedit", "{dae}", "--image", "{img:a}", "--strength", "0.5"],
                          r"is a diffusion autoencoder; its edits are invert, reconstruct, manipulate, interpolate"),
        "guidance": (["reconstruct", "{dae}", "--image", "{img:a}", "--guidance", "2"],
                     r"--guidance does nothing here: inversion runs the model unguided .*; leave it out"),
        "guidance_invert": (["invert", "{cond}", "--image", "{img:a}", "--label", "1", "--guidance", "2"],
                            r"--guidance does nothing here"),
        "sampler": ([*manip, "--attribute", "{cls}", "--sampler", "heun"],
                    r"renders x_T back with deterministic DDIM .*: leave --sampler and --eta out, or pass --sampler ddim"),
        "sampler_ddpm": (["interpolate", "{dae}", "--image", "{img:a}", "--to", "{img:b}", "--sampler", "ddpm"],
                         r"leave --sampler and --eta out, or pass --sampler ddim --eta 0"),
        "sampler_ancestral": (["invert", "{cond}", "--image", "{img:a}", "--label", "1", "--sampler", "euler-ancestral"],
                              r"leave --sampler and --eta out"),
        "eta": (["reconstruct", "{dae}", "--image", "{img:a}", "--eta", "0.5"], r"leave --sampler and --eta out"),
        "noisy_classifier": ([*manip, "--attribute", "{cls}", "--classifier", "{cls}"],
                             r"--classifier does nothing here: .*; the edit's direction is --attribute"),
        "label_on_diffae": ([*manip, "--attribute", "{lab}", "--label", "3"],
                            r"--label does nothing here: \S+ is not class-conditional; .*--attribute RUN:K"),
        "image_missing": (["reconstruct", "{dae}", "--image", "{img:missing}"], r"image \S+missing.png does not exist"),
        "image_junk": (["manipulate", "{dae}", "--image", "{img:junk}", "--amount", "0.3", "--attribute", "{cls}"],
                       r"image \S+junk.png is not a readable image .*; give a PNG or JPEG file"),
        "image_junk_invert": (["invert", "{dae}", "--image", "{img:junk}"], r"is not a readable image"),
        "to_missing": (["interpolate", "{dae}", "--image", "{img:a}", "--to", "{img:missing}"], r"missing.png does not exist"),
        "to_junk": (["interpolate", "{dae}", "--image", "{img:a}", "--to", "{img:junk}"], r"junk.png is not a readable image"),
        "out_suffix": (["reconstruct", "{dae}", "--image", "{img:a}", "--out", "{tmp}/o.safetensors"],
                       r"--out must end in .png .* or .npy"),
    }


@pytest.mark.parametrize("case", list(bad_cases()))
def test_bad_inputs_are_named_and_nothing_is_written(runs, images, tmp_path, capsys, case):
    argv, pattern = bad_cases()[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    fill = lambda a: re.sub(r"\{(\w+)(?::(\w+))?\}", lambda m: images[m.group(2)] if m.group(1) == "img" else  # noqa: E731
                            str(out_dir) if m.group(1) == "tmp" else runs[m.group(1)], a)
    argv = [fill(a) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out_dir / ("o.safetensors" if argv[0] == "invert" else "o.png"))]
    assert main(["edit", *argv, *(CODED if argv[0] != "sdedit" else [])]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, " ".join(err.split())), err
    assert written(out_dir) == []


def test_request_errors_name_their_field(runs, images):
    """The page's messages come from the same checks: each RequestError names the field at fault."""
    base = dict(task="manipulate", image=images["a"], amount=0.3, encode_steps=8, steps=8)
    for req, field in ((EditRequest(runs["dae"], attribute=runs["cond"], **base), "attribute"),
                       (EditRequest(runs["dae"], attribute=runs["lab"] + ":12", **base), "attribute"),
                       (EditRequest(runs["dae_b"], attribute=runs["cls"], **base), "attribute"),
                       (EditRequest(runs["cond"], attribute=runs["cls"], **base), "run"),
                       (EditRequest(runs["dae"], attribute=runs["cls"], sampler="ddpm", **base), "sampler"),
                       (EditRequest(runs["dae"], attribute=runs["cls"], eta=1.0, **base), "eta"),
                       (EditRequest(runs["dae"], attribute=runs["cls"], guidance=3.0, **base), "guidance"),
                       (EditRequest(runs["dae"], task="interpolate", image=images["a"], to=images["junk"]), "to"),
                       (EditRequest(runs["dae"], task="reconstruct", image=images["junk"]), "image"),
                       (SampleRequest(runs["dae"]), "run"),
                       (SampleRequest(runs["prior"], label=1), "label"),
                       (SampleRequest(runs["prior"], prompt="a seven"), "prompt")):
        with pytest.raises(RequestError) as e:
            resolve(req)
        assert e.value.field == field, (req, str(e.value))


def test_an_image_of_another_size_or_colour_is_fitted_with_a_note(runs, images, tmp_path):
    with pytest.warns(UserWarning, match=r"big.png: resized from 12x16 to the model's 8x8 \(scaled and centre-cropped\)"):
        assert main(["edit", "reconstruct", runs["dae"], "--image", images["big"], "--n", "2", *CODED,
                     "--out", str(tmp_path / "o.npy")]) == 0
    assert np.load(tmp_path / "o.npy").shape == (2, 1, 8, 8)
    with pytest.warns(UserWarning, match=r"rgb.png: converted from RGB colour to grayscale \(the model has 1 channel\)"):
        assert main(["edit", "interpolate", runs["dae"], "--image", images["a"], "--to", images["rgb"], "--n", "2", *CODED,
                     "--out", str(tmp_path / "i.npy")]) == 0
    assert np.load(tmp_path / "i.npy").shape == (2, 1, 8, 8)
    with pytest.warns(UserWarning, match="resized from 12x16"):
        assert main(["edit", "invert", runs["dae"], "--image", images["big"], *CODED,
                     "--out", str(tmp_path / "x.safetensors")]) == 0
    assert load_file(tmp_path / "x.safetensors")["x_T"].shape == (1, 1, 8, 8)


# --- sample ------------------------------------------------------------------------------------------------------------
def test_sampling_a_diffae_run_is_refused_naming_the_latent_ddim(runs, tmp_path, capsys):
    assert main(["sample", runs["dae"], "--n", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "sample its latent DDIM" in err and "configs/diffae_prior.toml" in err and "diffuse edit reconstruct" in err
    assert written(tmp_path) == []


def test_sampling_the_prior_draws_decoded_images(runs, tmp_path, capsys):
    prior = runs["prior"]
    assert main(["sample", prior, "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size == (2 + 2 * (8 + 2),) * 2  # 4 images of 8x8: a 2x2 grid
    # the prior's 5 steps and the decoder's 5, one chunk
    assert "wrote 4 samples to" in capsys.readouterr().out
    for name in ("a.npy", "b.npy"):
        assert main(["sample", prior, "--n", "4", "--seed", "3", "--out", str(tmp_path / name)]) == 0
    assert "(10 denoiser calls)" in capsys.readouterr().out
    a = np.load(tmp_path / "a.npy")
    assert a.shape == (4, 1, 8, 8) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, np.load(tmp_path / "b.npy"))  # same seed, same pixels
    assert len({a[k].tobytes() for k in range(4)}) == 4
    assert main(["sample", prior, "--n", "4", "--seed", "4", "--out", str(tmp_path / "c.npy")]) == 0
    assert not np.array_equal(a, np.load(tmp_path / "c.npy"))
    req = SampleRequest(prior, n=4, seed=3, batch_size=3)  # two chunks, each its own seed
    plan = resolve(req)
    assert from_argv(plan.argv()) == req
    result = execute(plan)
    assert result.x.shape == (4, 1, 8, 8) and result.calls == 2 * (5 + 5)
    assert main([*plan.argv(), "--out", str(tmp_path / "d.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), unit(result.x))


@pytest.mark.parametrize("flags, name", [(["--label", "1"], "--label"), (["--prompt", "a seven"], "--prompt"),
                                         (["--guidance", "2"], "--guidance")])
def test_the_prior_refuses_conditions(runs, tmp_path, capsys, flags, name):
    assert main(["sample", runs["prior"], "--n", "4", *flags, "--out", str(tmp_path / "s.png")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{name} does nothing here: a diffusion autoencoder's latent DDIM draws unconditional codes; leave it out" in err
    assert written(tmp_path) == []
