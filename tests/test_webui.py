"""`diffuse serve`: the web UI's plans reproduce the command line exactly, and the page works in a real browser.

The browser tests drive headless Chromium with Selenium against the app served on 127.0.0.1 with a tiny trained
run: the page loads (and asks nothing of the internet), a sample is drawn and shown with its command line, a mask is
drawn with the mouse and inpainted, a job is cancelled and frees the device, and a bad upload shows a message while
the server goes on serving. Without Chromium they skip, naming `apt-get install chromium chromium-driver`; with
DIFFUSE_REQUIRE_BROWSER=1 (CI) they fail instead.

    python tests/test_webui.py RUN [--out docs/screenshots]     (the README's screenshots of the Sample and Edit tabs)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.app import cli
from diffuse.app.requests import EditRequest, RequestError, SampleRequest, execute, resolve
from diffuse.visualize import save_grid
from diffuse.app.webui import (ALL_CLASSES, INSTALL, Models, build_app, edit_fields, editor_files, editor_value,
                           error_message, page_request, read_upload, run_summary)

REQUIRE_BROWSER = os.environ.get("DIFFUSE_REQUIRE_BROWSER") == "1"
BROWSER_INSTALL = "apt-get install chromium chromium-driver"
TINY = ["data.source=digits", "data.image_size=8", "model.channels=8", "model.channel_mult=[1,2]",
        "model.attention_resolutions=[4]", "model.norm_groups=4", "train.batch_size=16", "train.steps=4",
        "train.warmup_steps=2", "train.log_every=2", "train.checkpoint_every=2", "train.sample_every=2",
        "train.ema_snapshot_every=2", "train.time_limit=0", "sample.steps=5", "sample.n=8"]
WAIT = 60  # seconds any one thing on the page may take on a busy 2-core machine


def browser_test(test):
    """The four browser tests take about 40 s together on 2 CPU cores (slow); Gradio's own deprecation warnings from
    its server threads (pandas) are not theirs."""
    return pytest.mark.slow(pytest.mark.filterwarnings("ignore::Warning:gradio")(test))


def unavailable(what: str, install: str):
    """Skip, naming the install command; fail instead where the browser tests must run (DIFFUSE_REQUIRE_BROWSER=1)."""
    message = f"{what}; install it with `{install}`"
    if REQUIRE_BROWSER:
        pytest.fail(f"{message} (DIFFUSE_REQUIRE_BROWSER=1 requires the browser tests to run)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny class-conditional run (digits at 8x8, 4 steps), with sample grids over training."""
    out = tmp_path_factory.mktemp("webui") / "run"
    sets = [a for item in TINY for a in ("--set", item)]
    assert cli.main(["train", "configs/mnist_cond.toml", *sets, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def models(run):
    return Models([str(run)], "cpu")


@pytest.fixture(scope="module")
def model(models, run):
    return models.get(str(run))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


WIDGETS = ("sampler", "steps", "spacing", "guidance", "label", "seed", "n", "ema", "prompt", "negative")


def page(cls, models: Models, run: str, device: str | None = None, **change):
    """The request the page makes of its widgets for a served run: each at the run's default (as the page shows it on
    choosing the run), `change`d; fields that are no sampling widget go to the edit (task, image, mask, strength ...)."""
    s = models.opened[run].cfg.sample
    w = dict(sampler=s.sampler, steps=s.steps, spacing=s.spacing, guidance=s.guidance, label=ALL_CLASSES, seed=0,
             n=16 if cls is SampleRequest else 8, ema=True, prompt="", negative="") | change
    return page_request(cls, models.opened[run], run, *(w.pop(k) for k in WIDGETS), device=device, **w)


def draw(models: Models, req):
    """What the page draws for a request: resolved against the served run, run on its kept weights."""
    return execute(resolve(req, models.run(req.run)), load=models.load)


# --- the page's requests reproduce the command line ------------------------------------------------------------------
@pytest.mark.parametrize("change", [dict(n=6, sampler="ddim", steps=4, label="3", seed=5, guidance=2.0),
                                    dict(n=5, seed=7, ema=False)])
def test_the_sample_command_draws_the_same_pixels(run, models, tmp_path, change):
    req = page(SampleRequest, models, str(run), **change)
    plan = resolve(req, models.run(str(run)))
    save_grid(execute(plan, load=models.load).x, tmp_path / "ui.png")
    argv = shlex.split(plan.command("samples.png"))
    assert argv[:3] == ["diffuse", "sample", str(run)] and argv[-2:] == ["--out", "samples.png"]
    assert ("--label" in argv) == ("label" in change) and ("--no-ema" in argv) == (change.get("ema") is False)
    argv[-1] = str(tmp_path / "cli.png")
    cli.parser().parse_args(argv[1:])  # every flag is one the CLI takes
    assert cli.main(argv[1:]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "cli.png"), pixels(tmp_path / "ui.png"))


def test_the_edit_command_makes_the_same_outputs(run, models, tmp_path):
    digit = Image.fromarray(np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8)))  # 8x8 checks
    value, size = editor_value(digit)
    layer = Image.new("RGBA", value["background"].size)
    layer.paste((255, 255, 255, 255), (0, 0, 100, 60))  # a stroke over the top left, on the scaled-up image
    value["layers"] = [layer]
    image, mask = editor_files(value, size, tmp_path, strokes=False)
    np.testing.assert_array_equal(pixels(image), np.asarray(digit))  # the image back at its own size, exactly
    drawn = pixels(mask) > 0
    assert drawn[:2, :4].all() and drawn.sum() == 2 * 4  # every pixel the stroke touches, and no other
    req = page(EditRequest, models, str(run), n=3, seed=2, sampler="ddim", steps=4, task="inpaint", image=image,
               **edit_fields("inpaint", 0.75, 2, 0.0, 1, 10, mask))
    plan = resolve(req, models.run(str(run)))
    result = execute(plan, load=models.load)
    x = result.x
    assert x.shape == (3, 1, 8, 8) and len(result.before) == 1
    np.testing.assert_array_equal(x[:, :, ~torch.from_numpy(drawn)].numpy(),  # the kept pixels are the image's
                                  plan.image.expand(3, -1, -1, -1)[:, :, ~torch.from_numpy(drawn)].numpy())
    save_grid(x, tmp_path / "ui.png")
    argv = plan.argv() + ["--out", str(tmp_path / "cli.png")]
    assert argv[:3] == ["edit", "inpaint", str(run)] and cli.main(argv) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "cli.png"), pixels(tmp_path / "ui.png"))


@pytest.mark.parametrize("task,own,flags", [
    ("ilvr", dict(factor=2, t_stop=0.5), ["--factor", "2", "--t-stop", "0.5"]),
    ("inpaint", dict(jumps=2, length=3), ["--repaint-jumps", "2", "--repaint-length", "3"]),
])
def test_ilvr_t_stop_and_the_repaint_jump_length_reach_the_page(run, models, tmp_path, task, own, flags):
    """The page's ILVR had no t_stop and its RePaint no jump length; both are widgets now, and the command says them."""
    Image.fromarray(np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8))).save(tmp_path / "in.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    widgets = dict(strength=0.75, factor=2, t_stop=0.0, jumps=1, length=10) | own
    req = page(EditRequest, models, str(run), n=2, steps=4, task=task, image=str(tmp_path / "in.png"),
               **edit_fields(task, **widgets, mask=str(tmp_path / "mask.png")))
    plan = resolve(req, models.run(str(run)))
    argv = plan.argv()
    assert all(argv[argv.index(f) + 1] == v for f, v in zip(flags[::2], flags[1::2]))
    save_grid(execute(plan, load=models.load).x, tmp_path / "ui.png")
    assert cli.main(argv + ["--out", str(tmp_path / "cli.png")]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "cli.png"), pixels(tmp_path / "ui.png"))


def test_a_trained_task_run_edits_as_the_command_line_does(tmp_path):
    sets = ["data.source=digits", "data.image_size=8", "model.channels=8", "model.channel_mult=[1,2]",
            "model.attention_resolutions=[4]", "model.norm_groups=4", "train.batch_size=8", "train.steps=2",
            "train.warmup_steps=1", "train.checkpoint_every=2", "train.time_limit=0", "sample.steps=3"]
    run = str(tmp_path / "sr")
    assert cli.main(["train", "configs/sr_digits.toml", *[a for s in sets for a in ("--set", s)], "--out", run]) == 0
    models = Models([run], "cpu")
    assert models.run(run).capabilities.edits == ("superres",)
    with pytest.raises(RequestError, match="is a superres run .* so use `diffuse edit superres"):  # the command's words
        resolve(page(SampleRequest, models, run), models.run(run))
    Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16).save(tmp_path / "low.png")
    req = page(EditRequest, models, run, task="superres", image=str(tmp_path / "low.png"), n=2, seed=1)
    plan = resolve(req, models.run(run))
    save_grid(execute(plan, load=models.load).x, tmp_path / "ui.png")
    assert cli.main(plan.argv() + ["--out", str(tmp_path / "cli.png")]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "cli.png"), pixels(tmp_path / "ui.png"))


def test_a_diffusers_model_folder_is_served_as_a_run(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                          norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(tmp_path / "ddpm")
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "ddpm")
    folder = str(tmp_path / "ddpm")
    models = Models([folder], "cpu")
    req = page(SampleRequest, models, folder, n=3, sampler="ddim", steps=4, spacing="trailing", seed=2)
    assert req.guidance is None  # an unconditional model takes no guidance weight, and the command says none
    save_grid(draw(models, req).x, tmp_path / "ui.png")
    assert cli.main(req.argv() + ["--out", str(tmp_path / "cli.png")]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "cli.png"), pixels(tmp_path / "ui.png"))
    info = run_summary(folder, models.run(folder).cfg)
    assert "a diffusers model folder" in info["about"] and "[schedule]" in info["config"] and info["grids"] == []


def test_bad_inputs_give_clear_messages(run, models, model, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    with pytest.raises(ValueError, match="notes.png is not a readable image .*upload a PNG or JPEG"):
        read_upload(str(bad))
    Image.new("L", (8, 8)).save(tmp_path / "image.png")
    Image.new("L", (16, 8), 255).save(tmp_path / "mask.png")
    req = EditRequest(str(run), task="inpaint", image=str(tmp_path / "image.png"), mask=str(tmp_path / "mask.png"))
    with pytest.raises(ValueError, match="is 16x8 but the image .* is 8x8; draw the mask on the image itself"):
        resolve(req, model.run)
    with pytest.raises(ValueError, match="edit superres needs a run trained for it .* has task.kind = 'none'"):
        resolve(EditRequest(str(run), task="superres", image=str(tmp_path / "image.png")), model.run)
    # the command line's messages, each flag named by its widget
    for change, message in [(dict(label=10), "the class label must be a class index in 0..9, got 10"),
                            (dict(sampler="nope"), "the sampler 'nope' is not one of ddpm, ddim"),
                            (dict(steps=2.5), "the steps must be a whole number >= 0, got 2.5"),
                            (dict(seed=None), "the seed must be a whole number between 0 and"),
                            (dict(n=65), "the number of images is at most 64 on this page")]:
        with pytest.raises(RequestError) as e:
            resolve(page(SampleRequest, models, str(run), **change), model.run)
        assert error_message(e.value).startswith(message), error_message(e.value)


@pytest.fixture(scope="module")
def text_ldm(tmp_path_factory):
    """A tiny text-to-image latent-diffusion run: a KL autoencoder of 16x16 shapes (f = 4: 2 x 4 x 4 latents) and a
    flow model with the byte-level text encoder on its latents, 2 steps each."""
    folder = tmp_path_factory.mktemp("text_ldm")
    shapes = ["data.source=shapes", "data.crops=32", "data.image_size=16", "data.channels=3", "train.batch_size=8",
              "train.steps=2", "train.warmup_steps=0", "train.log_every=1000", "train.sample_every=0",
              "train.checkpoint_every=1000", "train.time_limit=0"]
    ae = ["model.kind=autoencoder", "autoencoder.channels=[8, 8, 16]", "autoencoder.latent_channels=2",
          "autoencoder.num_res_blocks=1", "autoencoder.norm_groups=4", "autoencoder.disc_weight=0"]
    assert cli.main(["train", "configs/ae_shapes.toml", *[a for s in shapes + ae for a in ("--set", s)],
                     "--out", str(folder / "ae")]) == 0
    ldm = [f"latent.autoencoder={folder / 'ae'}", "model.text_encoder=chars", "model.channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1",
           "model.norm_groups=4", "model.attention_resolutions=[]", "model.context_dim=16",
           "model.cross_attention_resolutions=[4]", "sample.steps=3"]
    assert cli.main(["train", "configs/ldm_shapes.toml", *[a for s in shapes + ldm for a in ("--set", s)],
                     "--out", str(folder / "ldm")]) == 0
    return str(folder / "ldm")


def test_a_latent_text_run_samples_and_edits_as_the_command_line_does(text_ldm, tmp_path):
    models = Models([text_ldm], "cpu")
    model = models.get(text_ldm)
    assert model.loaded.space.latent and model.loaded.space.shape == (2, 4, 4)
    req = page(SampleRequest, models, text_ldm, n=3, seed=4, prompt="a red circle above a blue square",
               negative="a green square")
    plan = resolve(req, models.run(text_ldm))
    assert plan.shape == (2, 4, 4)
    argv = shlex.split(plan.command("samples.png"))
    assert argv[argv.index("--prompt") + 1] == req.prompt and argv[argv.index("--negative-prompt") + 1] == req.negative_prompt
    x = execute(plan, load=models.load).x
    assert x.shape == (3, 3, 16, 16)  # decoded
    save_grid(x, tmp_path / "ui.png")
    assert cli.main(plan.argv() + ["--out", str(tmp_path / "cli.png")]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "cli.png"), pixels(tmp_path / "ui.png"))
    # the prompt matters: another caption (or none as the negative) draws other pixels from the same seed
    other = page(SampleRequest, models, text_ldm, n=3, seed=4, prompt="three small white triangles")
    assert not torch.equal(draw(models, other).x, x)

    Image.fromarray((np.indices((16, 16)).sum(0) * 8).astype(np.uint8)).convert("RGB").save(tmp_path / "in.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 6:] = 255  # generate the right part: only the left 4x4-pixel cells are wholly kept
    Image.fromarray(mask).save(tmp_path / "mask.png")
    req = page(EditRequest, models, text_ldm, task="inpaint", image=str(tmp_path / "in.png"), n=2, seed=1,
               prompt="a small red square", **edit_fields("inpaint", 0.75, 2, 0.0, 1, 10, str(tmp_path / "mask.png")))
    plan = resolve(req, models.run(text_ldm))
    x = execute(plan, load=models.load).x
    keep = torch.from_numpy(mask == 0)
    np.testing.assert_array_equal(x[..., keep].numpy(), plan.image.expand(2, -1, -1, -1)[..., keep].numpy())  # exactly kept
    save_grid(x, tmp_path / "ui_edit.png")
    argv = plan.argv() + ["--out", str(tmp_path / "cli_edit.png")]
    assert "--prompt" in argv and cli.main(argv) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "cli_edit.png"), pixels(tmp_path / "ui_edit.png"))


def test_latent_and_text_runs_give_clear_messages(text_ldm, run, model, tmp_path):
    models = Models([text_ldm], "cpu")
    ldm = models.run(text_ldm)

    def said(req, run) -> str:  # what the page says of a request: the command line's message, flags named by widget
        with pytest.raises(RequestError) as e:
            resolve(req, run)
        return error_message(e.value)

    assert said(page(SampleRequest, models, text_ldm, prompt=""), ldm) == (  # an empty prompt box is no prompt
        f'{text_ldm} is a text-conditional run: say what to draw with the prompt, e.g. the prompt "a red circle"')
    assert said(page(SampleRequest, models, text_ldm, prompt="a red circle", negative="a square", guidance=0), ldm) == (
        "the negative prompt replaces the empty caption of classifier-free guidance, so it needs a guidance weight: "
        "pass the guidance weight W (e.g. 4)")
    assert said(SampleRequest(str(run), prompt="a seven"), model.run) == (
        f"the prompt and the negative prompt need a text-conditional run (model.text_encoder); {run} takes no captions; "
        "--clip CLIPRUN --clip-scale S guides it towards the prompt (it is class-conditional: use the class label)")
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    req = page(EditRequest, models, text_ldm, task="ilvr", image=str(tmp_path / "in.png"), prompt="a red circle", n=2,
               **edit_fields("ilvr", 0.75, 2, 0.0, 1, 10, None))
    assert re.match(r"ILVR factor 2: .* multiple of its downsampling f = 4 .*\(e.g. 4, 8, 16\)", said(req, ldm))
    result = draw(models, dataclasses.replace(req, factor=8))  # 2 latent cells: accepted, the outputs decoded images
    assert result.x.shape == (2, 3, 16, 16) and len(result.before) == 1


def test_without_gradio_the_error_names_the_install_command(run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    assert cli.main(["serve", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffuse serve: error: the web UI needs Gradio") and INSTALL in err and "\n" not in err
    monkeypatch.setitem(sys.modules, "gradio", types.SimpleNamespace(__version__="5.50.0"))
    with pytest.raises(ValueError, match=r"needs Gradio 6 or newer, found 5.50.0 .*pip install -U \"gradio>=6\""):
        build_app([str(run)])


def test_the_strength_slider_says_what_it_means(run):
    """The page's SDEdit slider states the strength's one meaning, as `diffuse edit sdedit --help` does."""
    pytest.importorskip("gradio")
    app = build_app([str(run)], device="cpu")
    slider = next(c for c in app.blocks.values() if getattr(c, "elem_id", None) == "e-strength")
    assert "sigma/alpha = s / (1 - s)" in slider.info and slider.value == 0.75
    shown = {getattr(c, "elem_id", None): c for c in app.blocks.values()}
    assert all(shown[f"s-{k}"].info for k in ("sampler", "spacing", "guidance"))  # a one-line hint under each
    assert shown["e-editor"].brush.default_color == "#e03030"  # inpaint: a red region shows on any image
    on_task = next(f.fn for f in app.fns.values() if getattr(f, "name", "") == "on_task")
    assert on_task(str(run), "sdedit")[1].brush.default_color == "#ffffff"  # 1-channel SDEdit: white strokes
    assert on_task(str(run), "ilvr")[1].brush.default_color == "#e03030"


# --- the page in a real browser ------------------------------------------------------------------------------------
def serve(runs: list[str]):
    """The app of `diffuse serve RUN ... --device cpu`, launched on a free port of 127.0.0.1: (app, its URL)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        unavailable("gradio is not installed", 'pip install -e ".[test,ui]"')
    from diffuse.app.webui import launch

    app = build_app(runs, device="cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(app, port=port)
    return app, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(run):
    app, url = serve([str(run)])
    yield app, url
    app.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Selenium, logging its network requests."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed", 'pip install -e ".[test,ui]"')
    chrome = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if chrome is None or driver is None:
        unavailable(f"no headless browser for the web UI tests ({'chromedriver' if chrome else 'chromium'} not found)",
                    BROWSER_INSTALL)
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900",
                "--disable-background-networking", "--disable-component-update"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=options)
    yield d
    d.quit()


def wait(d, condition, what: str, timeout: float = WAIT, errors: bool = True):
    """Wait for condition(d); with `errors`, an error message on the page fails at once, quoting it."""
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d):
        if errors and "Error" in toasts(d):
            raise AssertionError(f"the page shows an error while waiting for {what}: {toasts(d)}")
        return condition(d)

    return WebDriverWait(d, timeout, poll_frequency=0.2).until(check, message=f"waited {timeout} s for {what}")


def text_of(d, elem_id: str) -> str:
    """A textbox's value, or an element's text."""
    from selenium.webdriver.common.by import By

    found = d.find_elements(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    return (found[0].get_attribute("value") if found else d.find_element(By.ID, elem_id).text) or ""


def set_value(d, elem_id: str, value) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = d.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)


def open_tab(d, name: str) -> None:
    from selenium.webdriver.common.by import By

    wait(d, lambda d: [t for t in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == name],
         f"the {name} tab", errors=False)[0].click()


def toasts(d) -> str:
    from selenium.webdriver.common.by import By

    return "\n".join(e.text for e in d.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body'], .toast-body"))


def sample(d, seed: int, errors: bool = True) -> str:
    """Draw samples with this seed on the Sample tab; the command line shown under them."""
    from selenium.webdriver.common.by import By

    open_tab(d, "Sample")
    set_value(d, "s-seed", seed)
    d.find_element(By.ID, "s-go").click()
    wait(d, lambda d: f"--seed {seed} " in text_of(d, "s-command"), f"the samples of seed {seed}", errors=errors)
    assert d.find_elements(By.CSS_SELECTOR, "#s-image img")  # the grid is shown
    return text_of(d, "s-command")


def close_messages(d) -> None:
    from selenium.webdriver.common.by import By

    for button in d.find_elements(By.CSS_SELECTOR, "[data-testid='toast-close']"):
        button.click()


def paint_and_inpaint(d, strokes: list[tuple[int, int, int, int]], tries: int = 3) -> str:
    """Paint strokes (x, y, dx, dy from the canvas centre) on the Edit tab's image with the mouse, inpaint, and return
    the command line shown. Headless Chromium may get the strokes in before the editor has drawn a fresh image, which
    then drops them and the page says nothing is drawn: the strokes are painted again, up to `tries` times."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    for _ in range(tries):
        canvas = d.find_elements(By.CSS_SELECTOR, "#e-editor canvas")[0]
        for x, y, dx, dy in strokes:
            ActionChains(d).move_to_element_with_offset(canvas, x, y).click_and_hold().move_by_offset(dx, dy).release() \
                .perform()
        d.find_element(By.ID, "e-go").click()
        wait(d, lambda d: "diffuse edit inpaint" in text_of(d, "e-command") or "Error" in toasts(d), "the inpainting",
             timeout=300, errors=False)
        if "diffuse edit inpaint" in text_of(d, "e-command"):
            return text_of(d, "e-command")
        assert "nothing is drawn" in toasts(d), f"the page shows an error: {toasts(d)}"
        close_messages(d)
        time.sleep(1.0)
    raise AssertionError(f"the strokes never reached the editor in {tries} tries")


def upload_to_editor(d, upload: Path) -> None:
    """Upload an image file on the Edit tab and wait until the editor holds it."""
    from selenium.webdriver.common.by import By

    open_tab(d, "Edit")
    d.find_element(By.CSS_SELECTOR, "#e-upload input[type=file]").send_keys(str(upload))
    wait(d, lambda d: f"{upload.name}: " in text_of(d, "e-status"), "the image in the editor")
    time.sleep(1.0)  # the editor draws it


@browser_test
def test_the_page_samples_and_shows_the_command(browser, server, model, run):
    app, url = server
    t0 = time.monotonic()
    browser.get(url)
    command = sample(browser, seed=3)
    expected = page(SampleRequest, app.webui.models, str(run), seed=3, device="cpu")  # the widgets at the run's defaults
    assert command == shlex.join(["diffuse", *expected.argv(), "--out", "samples.png"])
    folder = sorted(app.webui.folder.glob("sample_*"))[-1]
    assert (folder / "samples.png").is_file() and (folder / "trajectory.gif").is_file()
    (run / "eval.json").write_text('[{"metric": "fid", "value": 123.25}]')  # an eval added after the page opened
    try:
        open_tab(browser, "Runs")  # read afresh when shown
        wait(browser, lambda d: "123.2" in text_of(d, "r-evals"), "the eval added since the page opened")
    finally:
        (run / "eval.json").unlink()
    wait(browser, lambda d: "class_conditional = true" in d.page_source, "the run's config")
    hosts = {json.loads(e["message"])["message"]["params"]["request"]["url"].split("/")[2]
             for e in browser.get_log("performance") if '"Network.requestWillBeSent"' in e["message"]}
    assert hosts <= {url.split("/")[2], ""}, f"the page asked other hosts: {hosts}"  # "": data: URLs
    print(f"page load and one sample: {time.monotonic() - t0:.1f} s")


@browser_test
def test_a_drawn_mask_is_inpainted(browser, server, run, tmp_path):
    from selenium.webdriver.common.by import By

    app, url = server
    browser.get(url)
    Image.fromarray(np.kron(np.eye(4, dtype=np.uint8) * 255, np.ones((8, 8), np.uint8))).save(tmp_path / "in.png")
    upload_to_editor(browser, tmp_path / "in.png")
    assert "in.png: 32x32 reduced on upload to 8x8" in text_of(browser, "e-status")  # the run's 8x8: its working size
    command = paint_and_inpaint(browser, [(-50, -30, 90, 0), (40, -30, 0, 50)])
    assert browser.find_elements(By.CSS_SELECTOR, "#e-image img") and browser.find_elements(By.CSS_SELECTOR, "#e-figure img")
    assert "--image input.png --mask mask.png" in command
    folder = sorted(app.webui.folder.glob("edit_*"))[-1]
    mask = pixels(folder / "mask.png") > 0
    assert mask.shape == (8, 8) and 0 < mask.mean() < 0.5  # the strokes, on the reduced image's own pixels
    assert pixels(folder / "input.png").shape == (8, 8)


@browser_test
def test_cancel_stops_a_job_and_frees_the_device(browser, server):
    from selenium.webdriver.common.by import By

    app, url = server
    browser.get(url)
    open_tab(browser, "Sample")
    set_value(browser, "s-steps", 1000)  # 1000 steps for 64 images: long enough to cancel
    set_value(browser, "s-n", 64)
    browser.find_element(By.ID, "s-go").click()
    wait(browser, lambda d: "step" in text_of(d, "s-status"), "the first steps")
    browser.find_element(By.ID, "s-cancel").click()
    wait(browser, lambda d: "cancelled" in text_of(d, "s-status"), "the cancellation")
    assert "nothing was saved" in text_of(browser, "s-status") and not re.search(  # a neutral state, no error badge
        r"\bError\b", browser.find_element(By.TAG_NAME, "body").text)
    wait(browser, lambda d: not app.webui.device_lock.locked() and len(app.webui.queue) == 0, "the job's worker to stop",
         timeout=10)
    set_value(browser, "s-steps", 5)
    assert "--steps 5 " in sample(browser, seed=4)  # the device is free for the next job


@browser_test
def test_a_bad_upload_shows_a_message_and_the_server_goes_on(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    app, url = server
    browser.get(url)
    bad = tmp_path / "digit.png"
    bad.write_text("this is a text file, not an image\n")
    open_tab(browser, "Edit")
    browser.find_element(By.CSS_SELECTOR, "#e-upload input[type=file]").send_keys(str(bad))
    wait(browser, lambda d: "digit.png is not a readable image" in toasts(d), "the message about the bad file",
         errors=False)
    assert "upload a PNG or JPEG file" in toasts(browser) and "Traceback" not in browser.page_source
    assert "--seed 11 " in sample(browser, seed=11, errors=False)  # (the message may still be showing)


@browser_test
def test_the_page_draws_a_prompt_with_a_latent_text_run(browser, text_ldm):
    from selenium.webdriver.common.by import By

    app, url = serve([text_ldm])
    try:
        browser.get(url)
        open_tab(browser, "Sample")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#s-prompt textarea, #s-prompt input"), "the prompt box")
        browser.find_element(By.CSS_SELECTOR, "#s-prompt textarea, #s-prompt input").send_keys("a red circle on the left")
        command = sample(browser, seed=6)
        req = page(SampleRequest, app.webui.models, text_ldm, seed=6, prompt="a red circle on the left", device="cpu")
        assert command == shlex.join(["diffuse", *req.argv(), "--out", "samples.png"])
        assert "--prompt 'a red circle on the left'" in command
        folder = sorted(app.webui.folder.glob("sample_*"))[-1]
        again = save_grid(draw(app.webui.models, req).x, folder / "again.png")
        np.testing.assert_array_equal(pixels(folder / "samples.png"), pixels(again))  # the decoded samples of that prompt
    finally:
        app.close()


# --- the README's screenshots ----------------------------------------------------------------------------------------
def screenshots(runs: list[str], out: Path, device: str = "cpu") -> list[Path]:
    """Serve `runs`, draw samples and inpaint a drawn mask in headless Chromium, and save the Sample and Edit tabs
    (1200 x 900) as out/sample_tab.png and out/edit_tab.png."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from diffuse.app.webui import launch

    app = build_app(runs, device=device)
    launch(app, port=7861)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900",
                "--hide-scrollbars"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    out.mkdir(parents=True, exist_ok=True)
    try:
        d.get("http://127.0.0.1:7861")
        sample(d, seed=0)
        d.execute_script("document.querySelector('#s-image').scrollIntoView({block: 'center'})")
        time.sleep(1.0)
        d.save_screenshot(str(out / "sample_tab.png"))
        open_tab(d, "Edit")
        d.find_element(By.CSS_SELECTOR, "#e-use").click()  # the first sample, into the editor
        wait(d, lambda d: "sample #1" in text_of(d, "e-status"), "the sample in the editor")
        time.sleep(1.0)
        paint_and_inpaint(d, [(-60, -10, 120, 0)])
        d.execute_script("document.querySelector('#e-editor').scrollIntoView({block: 'start'})")
        time.sleep(1.0)
        d.save_screenshot(str(out / "edit_tab.png"))
    finally:
        d.quit()
        app.close()
    return [out / "sample_tab.png", out / "edit_tab.png"]


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="screenshots of the web UI's Sample and Edit tabs")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="docs/screenshots")
    a = p.parse_args()
    print("\n".join(str(path) for path in screenshots(a.runs, Path(a.out))))
