"""`diffuse serve` with diffusion autoencoders (Preechakul et al. 2022): the Autoencode tab and a latent DDIM's Sample tab.

The tab is offered for a diffusion autoencoder run and not for a plain one; its requests (reconstruct, manipulate along
an attribute or a label classifier's class, interpolate) draw the pixels of the `diffuse edit` request for the same
inputs, and the command line it shows draws them too; bad amounts and a missing second image get the command line's
messages naming the tab's widgets; a latent DDIM samples on the Sample tab as `diffuse sample PRIOR` does. The browser
tests drive the tab and the Sample tab in headless Chromium (tests/test_webui.py's helpers). Every run is tiny: 8x8
digits, a 4-dimensional code, 2 training steps, 5 encode and 5 render steps.
"""

from __future__ import annotations

import shlex
import time

import numpy as np
import pytest
import torch
from PIL import Image

import test_webui
from diffuse.app import cli
from diffuse.app.requests import EditRequest, SampleRequest, execute, resolve
from diffuse.app.webui import (ALL_CLASSES, AUTOENCODE_LABELS, Models, attribute_classes, attribute_runs,
                               autoencode_request, build_app, error_message, job_upload, page_request)
from diffuse.visualize import save_grid
from test_webui import TINY, browser_test, open_tab, pixels, sample, serve, set_value, text_of, toasts, wait

browser = test_webui.browser  # the headless Chromium fixture
DAE = ["data.source=digits", "data.image_size=8", "model.channels=8", "model.channel_mult=[1,2]",
       "model.attention_resolutions=[4]", "model.norm_groups=4", "model.semantic_dim=4", "train.batch_size=16",
       "train.steps=2", "train.warmup_steps=1", "train.checkpoint_every=2", "train.time_limit=0", "sample.steps=5",
       "sample.n=4"]
FAST = dict(encode_steps=5, steps=5)  # inversion and rendering steps of every edit here


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """A tiny diffusion autoencoder, a thickness and a label classifier of its codes and its latent DDIM; and a plain
    denoiser."""
    base = tmp_path_factory.mktemp("webui_diffae")
    out = {k: str(base / k) for k in ("dae", "thick", "label", "prior", "plain")}
    assert cli.main(["train", "configs/diffae_digits.toml", *sets(DAE), "--out", out["dae"]]) == 0
    codes = [f"semantic.run={out['dae']}", "train.steps=4"]
    assert cli.main(["train", "configs/diffae_thickness.toml", *sets(codes), "--out", out["thick"]]) == 0
    assert cli.main(["train", "configs/diffae_thickness.toml", *sets(codes + ["semantic.target=label"]),
                     "--out", out["label"]]) == 0
    assert cli.main(["train", "configs/diffae_prior.toml", *sets(codes + ["semantic.hidden=16", "semantic.layers=3",
                                                                          "sample.steps=5"]), "--out", out["prior"]]) == 0
    assert cli.main(["train", "configs/mnist_cond.toml", *sets(TINY), "--out", out["plain"]]) == 0
    return out


@pytest.fixture(scope="module")
def models(runs) -> Models:
    return Models([runs["dae"], runs["thick"], runs["label"], runs["prior"]], "cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[str, str]:
    """Two 8x8 grayscale images: checks and their negative."""
    folder = tmp_path_factory.mktemp("inputs")
    checks = np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8))
    Image.fromarray(checks).save(folder / "a.png")
    Image.fromarray(255 - checks).save(folder / "b.png")
    return str(folder / "a.png"), str(folder / "b.png")


def tab(models: Models, mode: str, image=None, to=None, attribute=None, cls=None, amount=0.3, n=3, encode_steps=5,
        steps=5, seed=1, ema=True, device=None) -> EditRequest:
    """The Autoencode tab's request of its widgets for the served diffusion autoencoder."""
    run = models.autoencoders[0]
    return autoencode_request(models, run, mode, image, to, attribute, cls, amount, n, encode_steps, steps, seed, ema,
                              device=device)


def draw(models: Models, req):
    """What the page draws for a request: resolved against the served run, run on its kept weights."""
    return execute(resolve(req, models.run(req.run)), load=models.load)


def said(models: Models, req: EditRequest) -> str:
    """The page's message for a request: the command line's, each flag named by the tab's widget."""
    with pytest.raises(ValueError) as e:
        resolve(req, models.run(req.run))
    return error_message(e.value, AUTOENCODE_LABELS)


# --- the tab is offered for a diffusion autoencoder, and what it offers ---------------------------------------------------
def test_the_tab_is_offered_for_a_diffusion_autoencoder_and_not_for_a_plain_run(runs):
    pytest.importorskip("gradio")

    def shown(app) -> dict:
        return {c.elem_id: c for c in app.blocks.values() if getattr(c, "elem_id", None)}

    plain = shown(build_app([runs["plain"]], device="cpu"))
    assert "tab-autoencode" not in plain and {"tab-sample", "tab-edit"} <= set(plain)
    assert "invert" not in [value for _, value in plain["e-task"].choices]  # the Edit tab leaves `edit invert` out
    app = build_app([runs["plain"], runs["dae"], runs["thick"], runs["label"], runs["prior"]], device="cpu")
    both = shown(app)
    assert {"tab-sample", "tab-edit", "tab-autoencode", "tab-runs"} <= set(both)
    served = app.webui.models
    assert (served.runs, served.editors, served.autoencoders) == ([runs["plain"], runs["prior"]], [runs["plain"]],
                                                                  [runs["dae"]])
    assert [v for _, v in both["s-run"].choices] == served.runs  # the latent DDIM samples on the Sample tab
    assert [v for _, v in both["a-mode"].choices] == ["reconstruct", "manipulate", "interpolate"]
    assert both["a-amount"].minimum == -1 and both["a-amount"].maximum == 1 and both["a-amount"].value == 0.3
    assert both["a-steps"].value == 5  # the run's [sample] steps
    only = shown(build_app([runs["dae"]], device="cpu"))  # a diffusion autoencoder alone: nothing to sample or edit
    assert "tab-autoencode" in only and "tab-sample" not in only and "tab-edit" not in only


def test_the_attributes_are_the_classifiers_of_the_runs_codes(runs, models):
    assert attribute_runs(models, runs["dae"]) == [runs["thick"], runs["label"]]
    assert attribute_classes(models, runs["label"]) == list(range(10)) and attribute_classes(models, runs["thick"]) == []
    with pytest.raises(ValueError, match="is a classifier of a diffusion autoencoder's codes, with nothing to sample"):
        models.get(runs["thick"])


# --- the tab's requests draw the command line's pixels ---------------------------------------------------------------
CASES = {  # mode, the tab's widgets, the `diffuse edit` request's fields for the same inputs
    "reconstruct": ("reconstruct", dict(n=3), dict(n=3)),
    "attribute": ("manipulate", dict(attribute="thick", cls="4", amount=-0.6, n=3),  # a hidden class is not asked
                  dict(attribute="thick", amount=-0.6, n=3)),
    "class": ("manipulate", dict(attribute="label", cls="7", amount=0.3, n=2), dict(attribute="label:7", amount=0.3, n=2)),
    "interpolate": ("interpolate", dict(to="b", n=4), dict(to="b", n=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_tab_draws_the_pixels_of_the_command_line(runs, models, images, tmp_path, case):
    mode, widgets, fields = CASES[case]
    named = lambda v: {"b": images[1], "thick": runs["thick"], "label": runs["label"],  # noqa: E731
                       "label:7": f"{runs['label']}:7"}.get(v, v)
    req = tab(models, mode, image=images[0], **{k: named(v) for k, v in widgets.items()})
    plan = resolve(req, models.run(req.run))
    result = execute(plan, load=models.load)
    cli_req = EditRequest(runs["dae"], task=mode, image=images[0], seed=1, **FAST,
                          **{k: named(v) for k, v in fields.items()})
    want = execute(resolve(cli_req))
    assert torch.equal(result.x, want.x) and result.x.shape == (fields["n"], 1, 8, 8)
    assert len(result.before) == (2 if mode == "interpolate" else 1)
    argv = shlex.split(plan.command(str(tmp_path / "cli.png")))
    assert argv[:4] == ["diffuse", "edit", mode, runs["dae"]] and "--encode-steps" in argv
    save_grid(result.x, tmp_path / "ui.png")
    assert cli.main(argv[1:]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "cli.png"), pixels(tmp_path / "ui.png"))


def test_bad_amounts_and_a_missing_second_image_give_clear_messages(runs, models, images, tmp_path):
    image, thick = images[0], runs["thick"]
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    with pytest.raises(ValueError, match="notes.png is not a readable image .*upload a PNG or JPEG"):
        job_upload(str(bad), tmp_path, "input")  # said before the job starts, naming the uploaded file
    assert job_upload(image, tmp_path, "input") == (str(tmp_path / "input.png"), "")  # byte for byte: the command's input
    assert (tmp_path / "input.png").read_bytes() == open(image, "rb").read()
    assert said(models, tab(models, "manipulate", image, attribute=thick, amount=float("nan"))) == \
        "the amount must be a number between -10 and 10, got nan"
    assert said(models, tab(models, "manipulate", image, attribute=thick, amount=50)) == \
        "the amount must be a number between -10 and 10, got 50"
    assert said(models, tab(models, "interpolate", image)) == \
        "edit interpolate needs the second image, the image to interpolate towards"
    assert said(models, tab(models, "interpolate", image, to=images[1], n=1)).startswith(
        "the number of images must be at least 2 for edit interpolate")
    assert said(models, tab(models, "reconstruct", None)) == "edit reconstruct needs the image, the image file to edit"
    assert said(models, tab(models, "reconstruct", image, encode_steps=None)) == \
        "the encode steps must be a whole number >= 1, got None"
    assert said(models, tab(models, "manipulate", image, attribute=runs["label"], cls=None)).startswith(
        f"the attribute {runs['label']} is a classifier of 10 classes: name the class to move towards")
    alone = Models([runs["dae"]], "cpu")  # no classifier of its codes served
    with pytest.raises(ValueError, match=r"no attribute to move along: serve a classifier of .*diffuse serve"):
        tab(alone, "manipulate", image)


# --- a latent DDIM on the Sample tab ---------------------------------------------------------------------------------
def prior_request(models: Models, prior: str, **change) -> SampleRequest:
    """The Sample tab's request for a latent DDIM: its widgets at its autoencoder's [sample] settings (the decoder's,
    which they set), `change`d."""
    s = models.decoders[prior].cfg.sample
    w = dict(sampler=s.sampler, steps=s.steps, spacing=s.spacing, guidance=s.guidance, label=ALL_CLASSES, seed=0,
             n=4, ema=True, prompt="", negative="") | change
    return page_request(SampleRequest, models.opened[prior], prior, *(w.pop(k) for k in test_webui.WIDGETS), **w)


def test_a_latent_ddim_samples_on_the_sample_tab_as_the_command_line_does(runs, models, tmp_path):
    req = prior_request(models, runs["prior"], seed=3, n=3)
    assert req.guidance is None and req.label is None  # it takes neither
    plan = resolve(req, models.run(runs["prior"]))
    x = execute(plan, load=models.load).x
    assert x.shape == (3, 1, 8, 8)
    save_grid(x, tmp_path / "ui.png")
    assert cli.main(plan.argv() + ["--out", str(tmp_path / "cli.png")]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "cli.png"), pixels(tmp_path / "ui.png"))
    alone = Models([runs["prior"]], "cpu")  # its autoencoder not served: loaded once, beside it
    torch.testing.assert_close(execute(resolve(req, alone.run(runs["prior"])), load=alone.load).x, x, rtol=0, atol=0)


# --- the tab in a real browser -------------------------------------------------------------------------------------
def choose(d, elem_id: str, text: str) -> None:
    """Click the radio button of a Radio by its text."""
    from selenium.webdriver.common.by import By

    wait(d, lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, f"#{elem_id} label") if e.text.strip() == text],
         f"{text} on {elem_id}")[0].click()


@browser_test
def test_the_page_manipulates_and_interpolates_as_the_command_line_does(browser, runs, images):
    from selenium.webdriver.common.by import By

    app, url = serve([runs["dae"], runs["thick"], runs["label"], runs["prior"]])
    try:
        browser.get(url)
        open_tab(browser, "Autoencode")
        browser.find_element(By.CSS_SELECTOR, "#a-image input[type=file]").send_keys(images[0])
        wait(browser, lambda d: "a.png, as" in text_of(d, "a-status"), "the input shown")
        choose(browser, "a-mode", "manipulate")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#a-amount input"), "the amount slider")
        for elem_id, value in (("a-encode-steps", 5), ("a-steps", 5), ("a-seed", 2)):
            set_value(browser, elem_id, value)
        browser.find_element(By.ID, "a-go").click()
        wait(browser, lambda d: "diffuse edit manipulate" in text_of(d, "a-command"), "the manipulation", timeout=120)
        command = text_of(browser, "a-command")
        want = EditRequest(runs["dae"], task="manipulate", image="input.png", attribute=runs["thick"], amount=0.3, n=4,
                           seed=2, sampler="ddim", eta=0.0, mixed_precision="no", device="cpu", **FAST)
        assert command == shlex.join(["diffuse", *want.argv(), "--out", "manipulate.png"]) + \
            "   # with the downloaded input.png"
        assert browser.find_elements(By.CSS_SELECTOR, "#a-strip img") and "at amounts 0, 0.1, 0.2, 0.3" in \
            text_of(browser, "a-status")
        folder = sorted(app.webui.folder.glob("autoencode_*"))[-1]
        again = execute(resolve(EditRequest(runs["dae"], task="manipulate", image=images[0], attribute=runs["thick"],
                                            amount=0.3, n=4, seed=2, **FAST)))
        np.testing.assert_array_equal(pixels(folder / "manipulate.png"), pixels(save_grid(again.x, folder / "again.png")))
        # interpolate without the second image: the message names the widget; with it, the frames
        choose(browser, "a-mode", "interpolate")
        browser.find_element(By.ID, "a-go").click()
        wait(browser, lambda d: "needs the second image" in toasts(d), "the message about the second image",
             errors=False)
        browser.find_element(By.CSS_SELECTOR, "#a-to input[type=file]").send_keys(images[1])
        wait(browser, lambda d: "a.png and b.png, as" in text_of(d, "a-status"), "both inputs shown", errors=False)
        browser.find_element(By.ID, "a-go").click()
        wait(browser, lambda d: "diffuse edit interpolate" in text_of(d, "a-command"), "the interpolation", timeout=120,
             errors=False)
        assert "--image input.png --to to.png" in text_of(browser, "a-command") and "4 frames from input.png to to.png" \
            in text_of(browser, "a-status")
        folder = sorted(app.webui.folder.glob("autoencode_*"))[-1]
        again = execute(resolve(EditRequest(runs["dae"], task="interpolate", image=images[0], to=images[1], n=4, seed=2,
                                            **FAST)))
        np.testing.assert_array_equal(pixels(folder / "interpolate.png"), pixels(save_grid(again.x, folder / "again.png")))
        # the latent DDIM on the Sample tab
        t0 = time.monotonic()
        command = sample(browser, seed=5, errors=False)
        expected = prior_request(app.webui.models, runs["prior"], seed=5, n=16, device="cpu")
        assert command == shlex.join(["diffuse", *expected.argv(), "--out", "samples.png"])
        folder = sorted(app.webui.folder.glob("sample_*"))[-1]
        again = save_grid(draw(app.webui.models, expected).x, folder / "again.png")
        np.testing.assert_array_equal(pixels(folder / "samples.png"), pixels(again))
        print(f"a latent DDIM's 16 samples on the page: {time.monotonic() - t0:.1f} s")
    finally:
        app.close()
