"""The web page of ``dalle2-rt serve`` in a real headless browser: Debian's Chromium driven by Playwright.

Type a prompt, pick n, seed and steps, click, wait for the images; they must decode in the browser and be the
API's images pixel for pixel. Then the same for an edit sweep scrubbed by its slider and an interpolation
strip (the API's frames, pixel for pixel, from the images the page uploaded). Skipped (with the reason) where
Chromium or Playwright's Python package is missing; ``make test-browser`` installs both (no browser download:
Playwright drives the system Chromium).
"""
from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = os.environ.get("DALLE2_RT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("fastapi") is None:
        return "the serve extra is not installed (pip install 'dalle2-rt[serve]')"
    if not Path(CHROMIUM).exists():
        return f"Chromium not found ({CHROMIUM}); `make test-browser` installs it (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (make test-browser installs it)"
    return None


if _missing():  # make test-browser (CI) sets DALLE2_RT_REQUIRE_BROWSER: there a missing piece fails, never skips
    if os.environ.get("DALLE2_RT_REQUIRE_BROWSER"):
        pytest.fail(_missing(), pytrace=False)
    pytest.skip(_missing(), allow_module_level=True)

from PIL import Image  # noqa: E402
from playwright import sync_api  # noqa: E402

from dalle2_rt.runtime.pipeline import Pipeline  # noqa: E402
from dalle2_rt.serve.service import Limits, Service  # noqa: E402
from tests.test_serve import LocalServer, decode  # noqa: E402

# --no-first-run … --disable-sync: without them Chromium reaches out to Google's services at start, which a
# closed network refuses (and which a test has no business doing)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tiny_engines):
    srv = LocalServer(Service(Pipeline.load(tiny_engines, threads=1), Limits(batch_window_s=0.005)))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page()
            tab.set_default_timeout(60_000)
            yield tab
        finally:
            browser.close()


ACTIONS = ["go", "edit-go", "interp-go"]  # the page's buttons that send a request
OPERATION = {"op_seed": "3", "op_decoder_steps": "2", "op_refine": "0"}  # the page's fields: edits, interpolations
API_OPERATION = {"seed": "3", "decoder_steps": "2", "refine": "0"}  # the same as form fields of the API
PROMPT = "a red circle on the left"


def _log_status(page):
    """Log every status line shown, in order, with the request buttons disabled at that moment, inside the page.

    Not by reading #status when the observer's callback runs: that is batched and asynchronous, and by then a
    short stage's line ("sr0 1/1") may already be replaced by the next one. Each mutation record instead holds the
    text node it added; the page sets textContent, which puts in a fresh node each time, so that node's text is
    the line as it was shown. The buttons are read in the callback, a microtask after the line was set: still
    before a reply can arrive for "sending…", after the request's cleanup for the last line."""
    page.evaluate("""(actions) => {
        const status = document.getElementById('status');
        window.statusLog = [];
        window.logStatus = (records) => {
            const disabled = actions.filter((id) => document.getElementById(id).disabled);
            for (const r of records) {
                for (const node of r.addedNodes) window.statusLog.push([node.textContent, disabled]);
            }
        };
        window.statusObserver = new MutationObserver(window.logStatus);
        window.statusObserver.observe(status, {childList: true});
    }""", ACTIONS)


def _status_log(page) -> list[tuple[str, list[str]]]:
    """The lines logged since ``_log_status``: (text, the request buttons then disabled)."""
    return [tuple(e) for e in page.evaluate("""() => { window.logStatus(window.statusObserver.takeRecords());
        window.statusObserver.disconnect(); return window.statusLog; }""")]


def _wait_status(page, start: str):
    page.wait_for_function("(start) => document.getElementById('status').textContent.startsWith(start)", arg=start)


def _png_bytes(src: str) -> bytes:
    """The PNG file a data: URL holds."""
    assert src.startswith("data:image/png;base64,"), src[:40]
    return base64.b64decode(src.split(",", 1)[1])


def _pixels(src: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(_png_bytes(src))))


def _generate(page, server, n: int):
    """The page's own form: ``n`` images of PROMPT, seed 7, tiny steps; then the operations' tiny settings."""
    page.goto(server.url + "/")
    page.fill("#prompt", PROMPT)
    for field, value in {"n": str(n), "seed": "7", "prior_steps": "2", "decoder_steps": "2", "sr_steps": "1"}.items():
        page.fill(f"#{field}", value)
    page.click("#go")
    _wait_status(page, "done")
    assert page.locator("#images img.result").count() == n
    for field, value in OPERATION.items():
        page.fill(f"#{field}", value)


def test_page_makes_the_api_s_images(server, page):
    page.goto(server.url + "/")
    page.fill("#prompt", "a red circle on the left")
    for field, value in {"n": "3", "seed": "7", "prior_steps": "2", "decoder_steps": "2", "sr_steps": "1"}.items():
        page.fill(f"#{field}", value)
    _log_status(page)
    page.click("#go")
    _wait_status(page, "done")
    statuses = [text for text, _ in _status_log(page)]
    images = page.locator("#images img.result")
    assert images.count() == 3
    # decoded by the browser itself: natural size is the engine's output size
    sizes = page.eval_on_selector_all("#images img.result", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")
    assert sizes == [[32, 32]] * 3
    assert page.eval_on_selector("#bar", "e => e.value") == 1
    assert statuses[0] == "sending…" and statuses[-1] == "done: seed 7", statuses  # the log is complete
    assert any(s.startswith("decoder ") for s in statuses) and any(s.startswith("sr0 ") for s in statuses), statuses

    api = server.client.post("/v1/images", json={"prompt": "a red circle on the left", "n": 3, "seed": 7,
                                                 "prior_steps": 2, "decoder_steps": 2, "sr_steps": 1}).json()["data"]
    for k, item in enumerate(api):
        src = images.nth(k).get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        shown = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert np.array_equal(np.asarray(shown), np.asarray(decode(item)))
        assert images.nth(k).get_attribute("alt") == f"a red circle on the left (seed 7, image {k})"


def test_page_shows_a_user_mistake_in_one_line(server, page):
    page.goto(server.url + "/")
    page.fill("#prompt", "   ")  # passes the form's `required`, not the service
    page.fill("#n", "2")
    page.click("#go")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('error')")
    assert page.inner_text("#status") == "error 400: the prompt is empty"
    assert page.locator("#images img").count() == 0
    assert page.is_enabled("#go")


def test_page_edit_sweep_is_the_api_s_and_its_slider_scrubs_it(server, page):
    _generate(page, server, n=1)
    page.locator("#images figure").nth(0).locator("button.edit").click()
    assert page.input_value("#edit-from") == page.input_value("#edit-to") == PROMPT  # the image's own prompt
    page.fill("#edit-to", "a red star on the left")
    _log_status(page)
    page.click("#edit-go")
    _wait_status(page, "done: 5 edit frames")
    log = _status_log(page)
    assert log[0] == ("sending…", ACTIONS) and log[-1] == ("done: 5 edit frames, seed 3", []), log

    frames = page.locator("#edit-frames img")
    assert frames.count() == 5  # the sweep field's 0 0.2 0.35 0.5 0.75, the slider's 0.35 among them
    srcs = [frames.nth(k).get_attribute("src") for k in range(5)]
    assert [frames.nth(k).get_attribute("title") for k in range(5)] == ["θ 0", "θ 0.2", "θ 0.35", "θ 0.5", "θ 0.75"]
    upload = _png_bytes(page.locator("#images img.result").nth(0).get_attribute("src"))
    api = server.client.post("/v1/edits", files={"image": ("seed7-0.png", upload, "image/png")},
                             data={"source": PROMPT, "target": "a red star on the left",
                                   "amount": ["0", "0.2", "0.35", "0.5", "0.75"], **API_OPERATION})
    assert api.status_code == 200, api.text
    for src, item in zip(srcs, api.json()["data"], strict=True):
        assert np.array_equal(_pixels(src), np.asarray(decode(item)))
    assert len(set(srcs)) == 5  # so the frame shown names its θ (each PNG differs, if only in its θ text chunk)

    def shown():
        current = page.eval_on_selector_all("#edit-frames img", "els => els.map(e => e.classList.contains('current'))")
        return page.get_attribute("#edit-frame", "src"), page.inner_text("#edit-caption"), current.index(True)

    assert shown() == (srcs[2], "θ 0.35", 2)  # the slider's default
    for theta, k, label in [("0.75", 4, "θ 0.75"), ("0.6", 3, "θ 0.5"), ("0.05", 0, "θ 0"), ("1", 4, "θ 0.75")]:
        page.fill("#edit-theta", theta)  # sets the range's value and fires its input event
        assert shown() == (srcs[k], label, k), theta  # the frame nearest the slider's θ
        assert page.inner_text("#edit-theta-value") == f"{float(theta):.2f}"
    frames.nth(1).click()  # a frame of the row moves the slider to it
    assert shown() == (srcs[1], "θ 0.2", 1) and page.input_value("#edit-theta") == "0.2"


def test_page_interpolates_two_prompts_into_a_strip(server, page):
    page.goto(server.url + "/")
    for field, value in OPERATION.items():
        page.fill(f"#{field}", value)
    page.fill("#interp-a", "a red circle on the left")
    page.fill("#interp-b", "a blue square on the right")
    page.fill("#frames", "4")
    page.click("#interp-go")
    _wait_status(page, "done: 4 interpolation frames")
    assert page.inner_text("#status") == "done: 4 interpolation frames, seed 3"
    assert page.locator("#interp-strip figcaption").all_inner_texts() == ["θ 0", "θ 0.33", "θ 0.67", "θ 1"]
    shown = page.eval_on_selector_all("#interp-strip img", "els => els.map(e => e.src)")
    api = server.client.post("/v1/interpolations", data={"prompt_a": "a red circle on the left", "frames": "4",
                                                         "prompt_b": "a blue square on the right", **API_OPERATION})
    assert api.status_code == 200, api.text
    for src, item in zip(shown, api.json()["data"], strict=True):
        assert np.array_equal(_pixels(src), np.asarray(decode(item)))


def test_page_interpolates_two_of_its_images(server, page):
    _generate(page, server, n=2)
    figures = page.locator("#images figure")
    figures.nth(0).locator("button.end-a").click()
    figures.nth(1).locator("button.end-b").click()
    assert page.is_visible("#interp-a-image") and page.is_visible("#interp-b-image")
    page.fill("#frames", "3")
    page.click("#interp-go")
    _wait_status(page, "done: 3 interpolation frames")
    assert page.locator("#interp-strip figcaption").all_inner_texts() == ["θ 0", "θ 0.5", "θ 1"]
    shown = page.eval_on_selector_all("#interp-strip img", "els => els.map(e => e.src)")
    ends = [_png_bytes(figures.nth(k).locator("img.result").get_attribute("src")) for k in range(2)]
    api = server.client.post("/v1/interpolations", files={"image_a": ("seed7-0.png", ends[0], "image/png"),
                                                          "image_b": ("seed7-1.png", ends[1], "image/png")},
                             data={"frames": "3", **API_OPERATION})
    assert api.status_code == 200, api.text
    for src, item in zip(shown, api.json()["data"], strict=True):
        assert np.array_equal(_pixels(src), np.asarray(decode(item)))


def test_page_shows_an_operation_mistake_in_one_line_and_recovers(server, page):
    page.goto(server.url + "/")
    for field, value in OPERATION.items():
        page.fill(f"#{field}", value)
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), (200, 30, 30)).save(buf, format="PNG")
    page.set_input_files("#edit-file", files=[{"name": "red.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
    page.fill("#edit-from", "a red background")
    page.fill("#edit-to", "   ")  # blank: the API refuses it
    page.click("#edit-go")
    _wait_status(page, "error")
    assert page.inner_text("#status") == "error 400: the prompt is empty"
    assert page.get_attribute("#status", "class") == "error"
    assert page.locator("#edit-frames img").count() == 0 and not page.is_visible("#edit-view")
    assert all(page.is_enabled(f"#{b}") for b in ACTIONS)

    page.fill("#interp-a", "a red circle")  # end b has neither a prompt nor an image: the page says so itself
    page.click("#interp-go")
    assert page.inner_text("#status") == 'error: end b needs a prompt, or an image ("end b" under one)'

    page.fill("#edit-to", "a blue background")  # the same upload, fixed: one frame at the slider's θ
    page.fill("#edit-sweep", "")
    page.fill("#edit-theta", "0.5")
    page.click("#edit-go")
    _wait_status(page, "done: 1 edit frame")
    assert page.get_attribute("#status", "class") == ""
    assert page.locator("#edit-frames img").get_attribute("title") == "θ 0.5"
    assert page.is_visible("#edit-frame")
