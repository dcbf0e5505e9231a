"""`diffuse serve` as a page that can be shared: its limits, its login and its end.

An upload's pixels are counted on its header before it is decoded (a PNG over the limit is refused without decoding, a
JPEG over it is decoded at a reduced scale) and it is reduced to a working size near the model's; the queue of jobs is
bounded, in total and per client, each with a message naming its flag; a host beyond this machine needs a login
(--auth, --auth-file, $DIFFUSE_AUTH) and a request without it is refused; SIGTERM removes the jobs' folder as Ctrl+C
does. The browser tests drive headless Chromium (tests/test_webui.py's helpers).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import test_webui
from diffuse.app import cli
from diffuse.app.webui import (AUTH_ENV, DeviceQueue, Limits, build_app, check_exposure, is_loopback, job_upload, launch,
                               page_url, read_auth, read_upload, run_summary)
from test_webui import browser_test, open_tab, sample, set_value, text_of, toasts, wait

browser = test_webui.browser  # the headless Chromium fixture
run = test_webui.run  # the tiny class-conditional run (8x8 digits)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- uploads: counted before they are decoded, reduced to a working size ---------------------------------------------
def test_an_upload_over_the_pixel_limit_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    Image.new("L", (2000, 1000)).save(tmp_path / "wide.png")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("the image was decoded"))
    with pytest.raises(ValueError) as e:
        read_upload(str(tmp_path / "wide.png"), side=8, limit=1_000_000)
    assert str(e.value) == ("wide.png is 2000x1000 = 2,000,000 pixels, more than the 1,000,000 this page reads (diffuse "
                            "serve --max-upload-pixels); upload a smaller copy (the model works at 8x8 pixels)")


@pytest.mark.filterwarnings("ignore:.*a reduced decode:UserWarning")
def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_uploads_are_reduced_to_the_working_size(tmp_path):
    gradient = np.tile(np.linspace(0, 255, 2000).astype(np.uint8), (1000, 1))  # 2000 x 1000, dark to light
    Image.fromarray(gradient).save(tmp_path / "photo.jpg", quality=95)
    img = read_upload(str(tmp_path / "photo.jpg"), side=8, limit=1_000_000)  # 1/8 scale: 250 x 125, then 16 x 8
    assert img.size == (16, 8) and img.info["reduced_from"] == (2000, 1000)
    values = np.asarray(img, dtype=float)[4]
    assert values[0] < 40 and values[-1] > 215 and (np.diff(values) > 0).all()  # the gradient, scaled down
    small = Image.fromarray(gradient[:8, :8])
    small.save(tmp_path / "small.png")
    assert read_upload(str(tmp_path / "small.png"), side=8).info.get("reduced_from") is None  # already small: kept
    # a job keeps the reduced copy, the file its command line reads; a small upload byte for byte
    path, note = job_upload(str(tmp_path / "photo.jpg"), tmp_path, "input", side=8, limit=1_000_000)
    assert Path(path).name == "input.png" and Image.open(path).size == (16, 8)
    assert note == "photo.jpg: 2000x1000 reduced on upload to 16x8 (the model's size is near the shorter side)"
    path, note = job_upload(str(tmp_path / "small.png"), tmp_path, "to", side=8)
    assert Path(path).read_bytes() == (tmp_path / "small.png").read_bytes() and note == ""


# --- the queue: bounded, in total and per client ----------------------------------------------------------------------
def test_the_device_queue_is_bounded_per_client_and_in_total_and_keeps_the_order():
    lock = threading.Lock()
    q = DeviceQueue(lock, size=3, per_client=2)
    a1, a2 = q.enter("10.0.0.1"), q.enter("10.0.0.1")
    with pytest.raises(ValueError, match=r"^you have 2 jobs running or waiting on this server, the most one client may "
                                         r"have \(diffuse serve --jobs-per-client 2\); wait for one to finish, or cancel"):
        q.enter("10.0.0.1")
    b1 = q.enter("10.0.0.2")
    with pytest.raises(ValueError, match=r"^the server is busy: 3 jobs are running or waiting, the most it holds "
                                         r"\(diffuse serve --queue-size 3\); try again when one has finished"):
        q.enter("10.0.0.3")
    assert [q.ahead(t) for t in (a1, a2, b1)] == [0, 1, 2]
    assert not q.take(a2, timeout=0.1) and q.take(a1, timeout=0.1) and lock.locked()  # first in line takes the device
    assert not q.take(a2, timeout=0.1)  # its turn, but the device is still busy
    q.leave(a1)
    lock.release()
    assert q.take(a2, timeout=1.0)
    q.leave(a2)
    lock.release()
    assert q.ahead(b1) == 0 and q.enter("10.0.0.1") is not None  # the client's jobs ended: it may queue again
    with pytest.raises(ValueError, match="--queue-size must be a number >= 1, got 0"):
        Limits(queue=0)


# --- the login ---------------------------------------------------------------------------------------------------------
def test_a_host_beyond_this_machine_needs_a_login(run, tmp_path, monkeypatch, capsys):
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "localhost", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org"))
    monkeypatch.delenv(AUTH_ENV, raising=False)
    assert cli.main(["serve", str(run), "--host", "0.0.0.0"]) == 2  # refused before any run loads
    err = capsys.readouterr().err
    assert err.startswith("diffuse serve: error: --host 0.0.0.0 makes the page reachable from other machines, so it "
                          "needs a login: pass --auth-file FILE") and f"{AUTH_ENV}=USER:PASSWORD" in err
    check_exposure("127.0.0.1", None)  # this machine only: no login needed
    (tmp_path / "login").write_text("ada:pass:with:colons\n")
    assert read_auth(auth_file=str(tmp_path / "login")) == ("ada", "pass:with:colons")
    monkeypatch.setenv(AUTH_ENV, "bob:secret")
    assert read_auth() == ("bob", "secret") and read_auth("cy:pw") == ("cy", "pw")  # the flag wins
    for bad, message in [(dict(auth="ada"), "--auth must be USER:PASSWORD .* got no password"),
                         (dict(auth=":pw"), "--auth must be USER:PASSWORD .* got no user"),
                         (dict(auth_file=str(tmp_path / "none")), "--auth-file .*none cannot be read .* first line")]:
        with pytest.raises(ValueError, match=message):
            read_auth(**bad)
    url, where = page_url("0.0.0.0", 7860)
    assert url == f"http://{socket.gethostname()}:7860" and where == ("listening on every interface (on this machine: "
                                                                      "http://127.0.0.1:7860)")
    assert page_url("::1", 80)[0] == "http://[::1]:80"


def test_a_request_without_the_login_is_refused(run):
    app = build_app([str(run)], device="cpu")
    port = free_port()
    url = launch(app, port=port, auth=("ada", "correct-horse"))
    try:
        job_file = app.webui.job_folder("probe") / "secret.png"
        job_file.write_bytes(b"not for strangers")
        for path, data in (("/config", None), (f"/gradio_api/file={job_file}", None), ("/gradio_api/info", None),
                           ("/gradio_api/queue/join", b"{}"), ("/gradio_api/upload", b"")):
            with pytest.raises(urllib.error.HTTPError) as e:  # every route, the files and the queue's included
                urllib.request.urlopen(urllib.request.Request(f"{url}{path}", data=data), timeout=30)
            assert e.value.code == 401, path
        def login(password):
            data = urllib.parse.urlencode({"username": "ada", "password": password}).encode()
            return urllib.request.urlopen(urllib.request.Request(f"{url}/login", data=data), timeout=30)

        with pytest.raises(urllib.error.HTTPError) as e:
            login("wrong")
        assert e.value.code in (400, 401)
        cookies = login("correct-horse").headers.get_all("set-cookie")
        cookie = "; ".join(c.split(";")[0] for c in cookies)
        config = urllib.request.urlopen(urllib.request.Request(f"{url}/config", headers={"Cookie": cookie}), timeout=30)
        assert config.status == 200 and b"s-go" in config.read()
    finally:
        app.close()


# --- the end: SIGTERM as Ctrl+C ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_removes_the_job_folder(run, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    env.pop(AUTH_ENV, None)
    server = subprocess.Popen([sys.executable, "-m", "diffuse", "serve", str(run), "--port", str(free_port()),
                               "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "serving" not in line and time.monotonic() < deadline and server.poll() is None:
            line = server.stdout.readline()
        assert re.match(r"serving .* on http://127.0.0.1:\d+ \(this machine only; cpu\); Ctrl\+C stops", line), line
        folders = list(tmp_path.glob("diffuse-webui-*"))
        assert len(folders) == 1 and folders[0].is_dir()
        (folders[0] / "sample_0001").mkdir()  # a job's files
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert "stopping; the jobs' files are removed" in server.stdout.read()
        assert not folders[0].exists()
    finally:
        if server.poll() is None:
            server.kill()


# --- in a real browser ------------------------------------------------------------------------------------------------
@browser_test
def test_the_page_asks_for_the_login_and_refuses_a_wrong_one(browser, run):
    from selenium.webdriver.common.by import By

    app = build_app([str(run)], device="cpu")
    url = launch(app, port=free_port(), auth=("ada", "correct-horse"))
    try:
        browser.delete_all_cookies()
        browser.get(url)
        fields = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=password]"), "the login form",
                      errors=False)
        assert not browser.find_elements(By.ID, "s-go")  # nothing of the page before the login
        user = browser.find_elements(By.CSS_SELECTOR, "input[type=text], input:not([type])")[0]

        def log_in(password: str) -> None:
            for field, text in ((user, "ada"), (fields[0], password)):
                field.clear()
                field.send_keys(text)
            next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip().lower() == "login").click()

        log_in("wrong")
        wait(browser, lambda d: "incorrect" in d.page_source.lower(), "the refusal", errors=False)
        assert not browser.find_elements(By.ID, "s-go")
        log_in("correct-horse")
        wait(browser, lambda d: d.find_elements(By.ID, "s-go"), "the page after the login")
        assert "--seed 2 " in sample(browser, seed=2)
    finally:
        app.close()
        browser.delete_all_cookies()


@browser_test
def test_the_page_says_each_limit(browser, run, tmp_path):
    from selenium.webdriver.common.by import By

    app = build_app([str(run)], device="cpu", limits=Limits(upload_mb=1, upload_pixels=1_000_000, per_client=1))
    url = launch(app, port=free_port())

    def upload(path: Path) -> None:  # (the box is emptied after each upload, for the next file)
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#e-upload input[type=file]"), "the upload box",
             errors=False)[0].send_keys(str(path))

    try:
        browser.get(url)
        open_tab(browser, "Edit")
        Image.new("L", (2000, 1000)).save(tmp_path / "wide.png")  # 2 million pixels, 8 KB
        upload(tmp_path / "wide.png")
        wait(browser, lambda d: "wide.png is 2000x1000 = 2,000,000 pixels" in toasts(d), "the pixel limit's message",
             errors=False)
        assert "--max-upload-pixels" in toasts(browser)
        test_webui.close_messages(browser)
        big = tmp_path / "big.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), np.uint8)).save(big)  # 1.4 MB of noise
        assert big.stat().st_size > 2**20
        upload(big)
        wait(browser, lambda d: re.search(r"exceed the maximum allowed size of 1(\.0)? MB", toasts(d), re.I),
             "the file size limit's message (Gradio's)", errors=False)
        assert "at most 1 MB and 1 million pixels" in browser.find_element(By.ID, "e-upload").text  # said beforehand
        test_webui.close_messages(browser)
        Image.fromarray(np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((8, 8), np.uint8))).resize((900, 900)).save(
            tmp_path / "digit.png")  # within the limits, larger than the model: reduced on upload
        upload(tmp_path / "digit.png")
        wait(browser, lambda d: "digit.png: 900x900 reduced on upload to 8x8" in text_of(d, "e-status"),
             "the reduced upload", errors=False)
        # one client, one job: a second while the first runs is refused, naming the flag
        open_tab(browser, "Sample")
        set_value(browser, "s-steps", 1000)
        set_value(browser, "s-n", 64)
        browser.find_element(By.ID, "s-go").click()
        wait(browser, lambda d: "step" in text_of(d, "s-status"), "the first steps")
        open_tab(browser, "Edit")
        [e for e in browser.find_elements(By.CSS_SELECTOR, "#e-task label") if e.text.strip() == "ilvr"][0].click()
        browser.find_element(By.ID, "e-go").click()  # ILVR: no mask needed, so the request reaches the queue
        wait(browser, lambda d: "the most one client may have (diffuse serve --jobs-per-client 1)" in toasts(d),
             "the per-client limit's message", errors=False)
        open_tab(browser, "Sample")
        browser.find_element(By.ID, "s-cancel").click()
        wait(browser, lambda d: "cancelled" in text_of(d, "s-status"), "the cancellation", errors=False)
        wait(browser, lambda d: not app.webui.device_lock.locked() and len(app.webui.queue) == 0, "the queue to empty",
             timeout=15, errors=False)
    finally:
        app.close()


def test_the_runs_tab_reads_a_posthoc_ema_folder_s_parent_and_says_why_a_box_is_empty(run, tmp_path):
    info = run_summary(str(run), test_webui.Models([str(run)], "cpu").run(str(run)).cfg)
    assert info["loss"] is not None and info["grids"] and info["loss_why"] == info["grids_why"] == ""
    ema = tmp_path / "ema_010"
    assert cli.main(["ema", str(run), "--sigma-rel", "0.1", "--out", str(ema)]) == 0
    cfg = test_webui.Models([str(ema)], "cpu").run(str(ema)).cfg
    info = run_summary(str(ema), cfg)
    assert f"the post-hoc EMA of {run} with sigma_rel = 0.1" in info["about"] and "last logged: step 4" in info["about"]
    assert info["loss"] is not None and [c for _, c in info["grids"]] == ["step 2", "step 4"]  # its parent's
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.toml").write_text((run / "config.toml").read_text())
    info = run_summary(str(bare), cfg)
    assert info["loss"] is None and info["loss_why"].startswith("none yet: ") and "train.log_every" in info["loss_why"]
    assert info["grids_why"] == f"none: {bare / 'samples'} holds no step_*.png (train.sample_every = 2: 0 draws none)"
