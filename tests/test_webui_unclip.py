"""The page's unCLIP tab (app/webui.py): a pipeline folder (FOLDER/unclip.toml) served beside its runs; the tab's
widgets make the requests `diffuse sample PIPE --prompt ...` and `diffuse edit variations|interpolate|textdiff PIPE ...`
make, so its pixels are the command's; and (slow) in headless Chromium, a prompt gives images and an uploaded image
its variations. Tiny runs from tests/test_unclip_pipeline.py; the browser helpers of tests/test_webui.py (they skip
without Chromium, naming `apt-get install chromium chromium-driver`)."""

from __future__ import annotations

import shlex

import numpy as np
import pytest
import torch
from PIL import Image

import test_webui
from test_unclip_pipeline import PROMPT, edit_args, sample_args, train_pipeline
from test_webui import browser_test, open_tab, serve, text_of, toasts, wait

browser = test_webui.browser  # the headless Chromium fixture


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return train_pipeline(tmp_path_factory.mktemp("webui_unclip"))


@pytest.fixture(scope="module")
def models(root):
    pytest.importorskip("gradio")
    from diffuse.app.webui import Models

    return Models([str(root / "pipe"), str(root / "decoder")], "cpu")


def test_a_pipeline_folder_is_served_on_the_unclip_tab_with_its_runs(root, models):
    from diffuse.app.webui import unclip_modes

    pipe, decoder = str(root / "pipe"), str(root / "decoder")
    assert models.unclips == [pipe, decoder]  # the folder, and the decoder served by itself
    assert decoder not in models.runs and decoder not in models.editors  # not offered on Sample / Edit, which refuse it
    assert set(models.all) == {str(root / "pipe" / "prior"), decoder}  # the Runs tab: each run once
    assert unclip_modes(models, pipe) == ["prompt", "variations", "interpolate", "textdiff"]
    assert unclip_modes(models, decoder) == ["variations", "interpolate", "textdiff"]  # no prior: no prompt
    assert models.unclip_decoder(pipe) == decoder
    with pytest.raises(ValueError, match="not one of the unCLIP pipelines"):
        models.unclip_run(str(root / "clip"))


def test_the_tab_asks_what_the_command_line_asks_and_draws_its_pixels(root, models, tmp_path):
    from diffuse.app.requests import execute, resolve
    from diffuse.app.webui import unclip_request

    pipe, image, other = str(root / "pipe"), str(root / "a.png"), str(root / "b.png")
    req = unclip_request(models, pipe, "prompt", PROMPT, None, None, "", "", 0.5, 2, 1.0, 0.5, 2, 3, 4, True)
    assert req == sample_args([pipe, "--prompt", PROMPT, "--n", "2", "--guidance", "1.0", "--prior-guidance", "0.5",
                               "--best-of", "2", "--steps", "3", "--seed", "4"])
    page = execute(resolve(req), load=models.load)  # the page's loader: its kept weights
    assert torch.equal(page.x, execute(resolve(req)).x)
    blank = unclip_request(models, pipe, "prompt", PROMPT, None, None, "", "", 0.5, 2, None, None, None, 3, 4, True)
    assert blank.prior_guidance is None and blank.best_of is None  # empty boxes: the folder's defaults
    cases = [("variations", (image, None, "", ""), ["--n", "2", "--guidance", "1.0"]),
             ("interpolate", (image, other, "", ""), ["--to", other, "--n", "2", "--guidance", "1.0"]),
             ("textdiff", (image, None, "a red circle", "a blue circle"),
              ["--from", "a red circle", "--to", "a blue circle", "--theta", "0.5", "--n", "2"])]
    for mode, (a, b, old, new), flags in cases:
        req = unclip_request(models, pipe, mode, "", a, b, old, new, 0.5, 2, 1.0, 0.5, 2, 3, 4, True)
        assert req == edit_args([mode, pipe, "--image", image, *flags, "--steps", "3", "--seed", "4"]), mode
    from diffuse.app.requests import RequestError
    with pytest.raises(RequestError) as e:  # an empty prompt box: the command line's message, named by the widget
        resolve(unclip_request(models, pipe, "prompt", "", None, None, "", "", 0.5, 2, 1.0, None, None, 3, 4, True))
    from diffuse.app.webui import UNCLIP_LABELS, error_message
    assert e.value.field == "prompt" and "the prompt" in error_message(e.value, UNCLIP_LABELS)
    with pytest.raises(RequestError) as e:
        resolve(unclip_request(models, pipe, "prompt", PROMPT, None, None, "", "", 0.5, 2, 1.0, None, 0, 3, 4, True))
    assert e.value.field == "best_of" and "best of k" in error_message(e.value, UNCLIP_LABELS)


@browser_test
@pytest.mark.slow
def test_the_unclip_tab_draws_a_prompt_and_the_variations_of_an_upload(browser, root):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app, url = serve([str(root / "pipe")])
    try:
        browser.get(url)
        open_tab(browser, "unCLIP")
        prompt = browser.find_element(By.CSS_SELECTOR, "#u-prompt textarea, #u-prompt input")
        prompt.send_keys(PROMPT, Keys.TAB)
        steps = browser.find_element(By.CSS_SELECTOR, "#u-steps input")
        steps.send_keys(Keys.CONTROL, "a")
        steps.send_keys("2", Keys.TAB)
        browser.find_element(By.ID, "u-go").click()
        wait(browser, lambda d: "diffuse sample" in text_of(d, "u-command"), "the prompt's images", timeout=300)
        command = text_of(browser, "u-command")
        argv = shlex.split(command)
        assert argv[2] == str(root / "pipe") and argv[argv.index("--prompt") + 1] == PROMPT and "--steps" in argv
        assert "Error" not in toasts(browser)
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#u-output img"), "the images shown")
        folder = sorted(app.webui.folder.glob("unclip_*"))[-1]
        n = int(argv[argv.index("--n") + 1])
        from diffuse.app.requests import execute, resolve
        want = execute(resolve(sample_args(argv[2:argv.index("--out")]))).x  # the command's pixels
        from diffuse.visualize import save_grid
        save_grid(want, folder / "want.png")
        assert np.array_equal(np.asarray(Image.open(folder / "prompt.png")), np.asarray(Image.open(folder / "want.png")))
        assert n == 4

        browser.find_element(By.XPATH, "//*[@id='u-mode']//label[contains(., 'variations')]").click()
        upload = wait(browser, lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "#u-image input[type=file]")],
                      "the image upload box", errors=False)[0]
        upload.send_keys(str(root / "a.png"))
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#u-image td.filename[aria-label='a.png']"),
             "the uploaded image")
        browser.find_element(By.ID, "u-go").click()
        wait(browser, lambda d: "edit variations" in text_of(d, "u-command"), "the variations", timeout=300)
        assert "--image input.png" in text_of(browser, "u-command") and "Error" not in toasts(browser)
        assert "4 variations of input.png" in text_of(browser, "u-status")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#u-figure img"), "the before/after figure")
        folder = sorted(app.webui.folder.glob("unclip_*"))[-1]
        argv = shlex.split(text_of(browser, "u-command").split("   #")[0])
        argv[argv.index("--image") + 1] = str(folder / "input.png")  # the upload, as the job kept it
        want = execute(resolve(edit_args(argv[2:argv.index("--out")]))).x  # the command's pixels
        assert len(want) == 4 and torch.isfinite(want).all()
        save_grid(want, folder / "want.png")
        assert np.array_equal(np.asarray(Image.open(folder / "variations.png")), np.asarray(Image.open(folder / "want.png")))
        assert (folder / "variations_before_after.png").is_file()
    finally:
        app.close()
