"""app/requests.py: one resolver for the command line and the page. Errors name the request field (the flag on the
command line, a label on the page), every check is made before a model loads, the printed command parses back to the
same request, and executing a plan draws the command's pixels."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse import runs
from diffuse.app.requests import (EditRequest, RequestError, SampleRequest, execute, field_of, flag, resolve,
                                  save_before_after)
from diffuse.app.cli import main, parser
from diffuse.generate import CHUNK

from test_cli import TINY, _sets

LABELS = {"guidance": "the guidance weight", "label": "the class label", "steps": "the steps", "prompt": "the prompt",
          "negative_prompt": "the negative prompt"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny class-conditional run (10 digit classes, trained with label dropout: guidance works)."""
    out = tmp_path_factory.mktemp("requests") / "run"
    assert main(["train", "configs/mnist_cond_vp.toml", *_sets(TINY), "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / "in.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return str(folder / "in.png"), str(folder / "mask.png")


def parse(argv: list[str]):
    return parser().parse_args([*argv, "--out", "x.png"])


def from_argv(argv: list[str]):
    args = parse(argv)
    return (EditRequest if args.command == "edit" else SampleRequest).from_args(args)


# --- the printed command parses back to the same request -------------------------------------------------------------
def random_request(rng: random.Random, run: str, images: tuple[str, str]):
    """A request of random fields: sampling fields for sample and edit, and each edit's own."""
    sampler = rng.choice([None, "ddim", "ddpm", "heun", "dpmpp-2m", "euler-ancestral", "ode-rk45"])
    adaptive = sampler == "ode-rk45"
    fields = dict(
        run=run, sampler=sampler, seed=rng.choice([0, 1, 7, 2**40]),
        steps=None if adaptive else rng.choice([None, 0, 1, 3]),
        spacing=None if adaptive else rng.choice([None, "trailing", "leading", "linspace"]),
        eta=rng.choice([None, 0.0, 0.5, 1.0]) if sampler in ("ddim", "euler-ancestral") else None,
        options=("s_churn=10",) if sampler == "heun" and rng.random() < 0.5 else (),
        label=rng.choice([None, 0, 9]), guidance=rng.choice([None, 0.0, 1.5, 2.25, 1e-3]),
        guidance_interval=rng.choice([None, (), (0.3, 5.0), (0.0, float("inf"))]),
        threshold=rng.choice([None, "static", "none", "dynamic:0.995"]), clip=rng.random() < 0.7,
        mixed_precision=rng.choice([None, "no", "auto"]), ema=rng.random() < 0.7, device=rng.choice([None, "cpu"]))
    if rng.random() < 0.5:
        return SampleRequest(n=rng.choice([1, 5, 64, 200]), batch_size=rng.choice([CHUNK, 2, 7]), **fields)
    task = rng.choice(["sdedit", "inpaint", "ilvr"])
    own = {"sdedit": dict(strength=rng.choice([0.0, 0.3, 0.75, 1.0])),
           "inpaint": dict(mask=images[1], repaint_jumps=rng.choice([1, 2]), repaint_length=rng.choice([10, 3])),
           "ilvr": dict(factor=rng.choice([1, 2, 4]), t_stop=rng.choice([0.0, 0.25]))}[task]
    return EditRequest(task=task, image=images[0], n=rng.choice([1, 3, 8]), mean=rng.random() < 0.3, **own, **fields)


def test_the_printed_command_parses_back_to_the_same_request(run, images):
    """Property: for requests of random fields, from_args(parse(plan.argv())) == request; each resolves first (no
    weights load), so the command is one that runs."""
    rng, resolved = random.Random(0), 0
    for _ in range(120):
        req = random_request(rng, run, images)
        try:
            plan = resolve(req)
        except RequestError:
            continue  # e.g. eta for a sampler without one: a request the command line refuses too
        resolved += 1
        assert from_argv(plan.argv()) == req, plan.argv()
    assert resolved >= 60


@pytest.mark.parametrize("req", [
    SampleRequest("runs/x"),
    SampleRequest("a folder/with spaces", n=3, prompt="-a caption that starts with a dash", negative_prompt="",
                  guidance=4, seed=12, classifier="runs/clf", options=("s_churn=10", "s_noise=1.003")),
    EditRequest("r", task="ilvr", image="-odd.png", factor=4, t_stop=0.5, guidance_interval=()),
    EditRequest("r", task="inpaint", image="in.png", mask="m.png", repaint_jumps=10, repaint_length=3, mean=True),
])
def test_odd_fields_round_trip(req):
    assert from_argv(req.argv()) == req


def test_lists_become_tuples_and_whole_floats_print_as_integers(run):
    req = SampleRequest(run, options=["eta=0.5"], guidance_interval=[0.3, 5], steps=3.0, n=4.0, sampler="ddim")
    assert req.options == ("eta=0.5",) and req.guidance_interval == (0.3, 5)
    plan = resolve(req)
    assert plan.argv()[plan.argv().index("--steps") + 1] == "3" and from_argv(plan.argv()) == req


# --- errors name their field -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,field,message", [
    (dict(label=10), "label", "--label must be a class index in 0..9, got 10"),
    (dict(prompt="a seven"), "prompt", "--prompt and --negative-prompt need a text-conditional run"),
    (dict(sampler="dpmpp-2m", eta=0.3), "eta", "--eta: sampler dpmpp-2m takes no eta"),
    (dict(options=("foo=1",)), "options", "--opt 'foo=1': sampler"),
    (dict(threshold="bad"), "threshold", "--threshold 'bad' is not valid"),
    (dict(sampler="ode-rk45", steps=3), "steps", "--steps does nothing here: ode-rk45 chooses its own steps"),
    (dict(sampler="ddim", steps=2000), "steps", "steps must be between 1 and the schedule's T = 1000"),
    (dict(mixed_precision="fp16", device="cpu"), "mixed_precision", "--mixed-precision = 'fp16' needs a CUDA device"),
    (dict(steps=2.5), "steps", "--steps must be a whole number >= 0, got 2.5"),
    (dict(seed=None), "seed", "--seed must be a whole number between 0 and"),
    (dict(guidance=float("nan")), "guidance", "--guidance must be a number >= 0"),
    (dict(sampler="nope"), "sampler", "--sampler 'nope' is not one of ddpm, ddim"),
    (dict(guidance_interval=(5, 1)), "guidance_interval", "--guidance-interval must be LO,HI"),
])
def test_errors_name_the_field(run, change, field, message):
    with pytest.raises(RequestError) as e:
        resolve(SampleRequest(run, **change))
    assert e.value.field == field and message in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)  # the command line prints it as every other error


def test_the_page_names_fields_by_its_labels(run):
    with pytest.raises(RequestError) as e:
        resolve(SampleRequest(run, label=10))
    assert e.value.named(LABELS) == "the class label must be a class index in 0..9, got 10"
    with pytest.raises(RequestError) as e:
        resolve(SampleRequest(run, prompt="a seven"))
    assert e.value.named(LABELS).startswith("the prompt and the negative prompt need a text-conditional run")
    assert e.value.named(LABELS).endswith("(it is class-conditional: use the class label)")
    assert [flag(f) for f in ("guidance", "ema", "options")] == ["--guidance", "--no-ema", "--opt"]
    assert flag("image", "ilvr") == "--reference" and field_of("--reference") == "image" and field_of("--no-ema") == "ema"


def test_edit_errors_name_the_field(run, images, tmp_path):
    image, mask = images
    cases = [(EditRequest(run, task="superres", image=image), "task", "edit superres needs a run trained for it"),
             (EditRequest(run, task="ilvr", image=image, factor=3), "factor", "the ILVR factor N = 3 must be >= 1 and divide"),
             (EditRequest(run, task="inpaint", image=image, mask=mask, strength=0.5), "strength",
              "--strength does nothing here: only edit sdedit takes it"),
             (EditRequest(run, task="sdedit", image=image), "strength", "edit sdedit needs --strength"),
             (EditRequest(run, task="inpaint", image=image), "mask", "edit inpaint needs --mask"),
             (EditRequest(run, task="ilvr", image="", factor=2), "image", "edit ilvr needs --reference"),
             (EditRequest(run, task="sdedit", image=image, strength=0.5, batch_size=4), "batch_size",
              "--batch-size does nothing here"),
             (EditRequest(run, task="paint", image=image), "task", "unknown edit 'paint'")]
    Image.new("L", (16, 8), 255).save(tmp_path / "wide.png")
    cases.append((EditRequest(run, task="inpaint", image=image, mask=str(tmp_path / "wide.png")), "mask",
                  "is 16x8 but the image"))
    for req, field, message in cases:
        with pytest.raises(RequestError) as e:
            resolve(req)
        assert e.value.field == field and message in str(e.value), (req, str(e.value))
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a missing file stays an OSError
        resolve(EditRequest(run, task="sdedit", image=str(tmp_path / "none.png"), strength=0.5))


def test_every_check_is_made_before_a_model_loads(run, images, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runs, "_load_net", refuse)
    plan = resolve(SampleRequest(run, n=4, label=3, guidance=2.0, steps=2))  # a good request: resolved without weights
    assert plan.generate_kw["labels"].tolist() == [3] * 4 and plan.shape == (1, 8, 8)
    with pytest.raises(AssertionError, match="a model was loaded"):
        execute(plan)
    plan = resolve(EditRequest(run, task="inpaint", image=images[0], mask=images[1], n=2, steps=2))
    assert plan.image.shape == (1, 1, 8, 8) and plan.mask.shape == (1, 1, 8, 8) and plan.trained is None
    with pytest.raises(RequestError, match="--label must be a class index"):
        resolve(SampleRequest(run, label=12))


# --- executing a plan draws the command's pixels -------------------------------------------------------------------------
def test_a_plan_draws_the_pixels_of_its_command(run, images, tmp_path):
    for req in (SampleRequest(run, n=5, batch_size=2, steps=3, label=4, guidance=1.5, seed=3),
                EditRequest(run, task="ilvr", image=images[0], factor=2, t_stop=0.3, n=2, steps=3, seed=1),
                EditRequest(run, task="inpaint", image=images[0], mask=images[1], repaint_jumps=2, repaint_length=2,
                            n=2, steps=4)):
        plan, steps = resolve(req), []
        result = execute(plan, callback=steps.append)
        assert main([*plan.argv(), "--out", str(tmp_path / "cli.npy")]) == 0
        np.testing.assert_array_equal(np.load(tmp_path / "cli.npy"), ((result.x.cpu() + 1) / 2).clamp(0, 1).numpy())
        assert result.calls > 0 and len(steps) >= 3
        if isinstance(req, EditRequest):
            assert len(result.before) == (2 if req.task == "ilvr" else 1)
            save_before_after(result, tmp_path / "fig.png")
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "fig.png")),
                                          np.asarray(Image.open(tmp_path / "cli_before_after.png")))


def test_execute_reports_each_stage(run):
    stages = []
    result = execute(resolve(SampleRequest(run, n=3, steps=2, batch_size=2)), on_stage=lambda p, total: stages.append(total))
    assert stages == [4] and result.x.shape == (3, 1, 8, 8) and result.before == []


# --- cascades: each stage's request made with dataclasses.replace ----------------------------------------------------------
def test_a_cascade_plans_every_stage_before_the_first_draws(run, tmp_path):
    sets = _sets(["data.source=digits", "data.image_size=8", "model.channels=8", "model.channel_mult=[1,2]",
                  "model.attention_resolutions=[4]", "model.norm_groups=4", "train.batch_size=8", "train.steps=2",
                  "train.warmup_steps=1", "train.checkpoint_every=2", "train.time_limit=0", "sample.steps=2"])
    assert main(["train", "configs/cascade_sr.toml", *sets, "--out", str(tmp_path / "sr")]) == 0
    base = tmp_path / "casc" / "base"
    assert main(["train", "configs/cascade_base.toml", *sets, "--set", "data.image_size=4", "--set",
                 "model.attention_resolutions=[2]", "--out", str(base)]) == 0
    (tmp_path / "casc" / "cascade.toml").write_text(f'stages = ["base", "{tmp_path / "sr"}"]\n')
    req = SampleRequest(str(tmp_path / "casc"), n=2, label=5, guidance=1.0, steps=2)
    plan = resolve(req)
    first, second = (p.request for p in plan.stages)
    assert first == dataclasses.replace(req, run=str(base))
    assert second == dataclasses.replace(req, run=str(tmp_path / "sr"), label=None, guidance=None)
    assert plan.stages[0].generate_kw["labels"].tolist() == [5, 5] and plan.stages[1].generate_kw["labels"] is None
    assert plan.argv()[:2] == ["sample", str(tmp_path / "casc")]
    x = execute(plan).x
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(RequestError, match="--steps does nothing here"):  # a stage's checks, before any stage draws
        resolve(dataclasses.replace(req, sampler="ode-rk45"))
