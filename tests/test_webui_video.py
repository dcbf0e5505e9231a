"""The page's Video tab in a real browser: a GIF uploaded to a tiny masked-conditioning video run, predict pressed, and
what comes back (the GIF shown and its contact sheet, the command line, the files in the job's folder) holds the given
frames exactly. Headless Chromium through Selenium, with tests/test_webui.py's helpers (they skip without Chromium,
naming `apt-get install chromium chromium-driver`)."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import test_webui
from diffuse.data.video import read_video
from diffuse.visualize import contact_sheet, save_video
from test_cli_video import FRAMES, SIDE, train_tiny
from test_webui import browser_test, open_tab, serve, text_of, toasts, wait

browser = test_webui.browser  # the headless Chromium fixture


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    """A tiny masked-conditioning video run: 4 frames of 16x16 moving digits, 2 training steps."""
    return train_tiny(tmp_path_factory.mktemp("webui_video") / "run")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A 6-frame 16x16 grayscale GIF: a bright square moving right over a dark gradient."""
    x = torch.linspace(-1, 0, SIDE)[None, None, :].expand(6, SIDE, SIDE).clone()[None]
    for f in range(6):
        x[0, f, 5:9, 2 + f:6 + f] = 1
    path = tmp_path_factory.mktemp("webui_clip") / "square.gif"
    save_video(x, path)
    return path


@browser_test
def test_the_video_tab_predicts_an_uploaded_gif(browser, video_run, clip):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app, url = serve([video_run])
    try:
        browser.get(url)
        open_tab(browser, "Video")
        browser.find_element(By.CSS_SELECTOR, "#v-upload input[type=file]").send_keys(str(clip))
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f"#v-upload td.filename[aria-label='{clip.name}']"),
             "the uploaded GIF")
        given = browser.find_element(By.CSS_SELECTOR, "#v-given textarea, #v-given input")
        given.send_keys("0,1", Keys.TAB)
        steps = browser.find_element(By.CSS_SELECTOR, "#v-steps input")
        steps.send_keys(Keys.CONTROL, "a")
        steps.send_keys("2", Keys.TAB)
        browser.find_element(By.ID, "v-go").click()
        wait(browser, lambda d: "edit predict" in text_of(d, "v-command"), "the predicted video", timeout=300)
        command = text_of(browser, "v-command")
        assert "--given 0,1" in command and "--video input.gif" in command and "--steps 2" in command
        assert "frames 0,1 given" in text_of(browser, "v-status") and "Error" not in toasts(browser)
        for elem_id in ("v-gif", "v-sheet"):  # the video and its contact sheet are shown
            wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img"), f"the image in #{elem_id}")
        folder = sorted(app.webui.folder.glob("video_*"))[-1]
        argv = shlex.split(command.split("   #")[0])
        assert argv[argv.index("--out") + 1] == "edited.gif"
        outputs = int(argv[argv.index("--n") + 1])  # the page's default number of outputs
        edited, uploaded = read_video(folder / "edited.gif")[..., 0], read_video(clip)[..., 0]  # grayscale
        assert np.array_equal(read_video(folder / "input.gif"), read_video(clip))  # the upload, as the command reads it
        assert edited.shape == (FRAMES, SIDE + 4, outputs * (SIDE + 2) + 2)  # the outputs side by side, 2 px apart
        for k in range(outputs):
            video = edited[:, 2:2 + SIDE, 2 + k * (SIDE + 2):2 + k * (SIDE + 2) + SIDE]
            assert np.array_equal(video[:2], uploaded[:2])  # the given frames, pixel for pixel
            assert not np.array_equal(video[2:], uploaded[2:FRAMES])  # the rest generated
        sheet = Image.open(folder / "edited.png")
        assert sheet.size == contact_sheet(torch.zeros(1 + outputs, 1, FRAMES, SIDE, SIDE)).size  # input row + outputs
        shown = Image.open(folder / "edited_shown.gif")
        assert shown.size[0] > SIDE and getattr(shown, "n_frames", 1) == FRAMES
    finally:
        app.close()
