"""The web page of ``dalle2-rt serve`` in a real headless browser: Debian's Chromium driven by Playwright.

Type a prompt, pick n, seed and steps, click, wait for the images; they must decode in the browser and be the
API's images pixel for pixel. Skipped (with the reason) where Chromium or Playwright's Python package is
missing; ``make test-browser`` installs both (no browser download: Playwright drives the system Chromium).
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


def test_page_makes_the_api_s_images(server, page):
    page.goto(server.url + "/")
    page.fill("#prompt", "a red circle on the left")
    for field, value in {"n": "3", "seed": "7", "prior_steps": "2", "decoder_steps": "2", "sr_steps": "1"}.items():
        page.fill(f"#{field}", value)
    # every status line shown, in order, logged inside the page. Not by reading #status when the observer's
    # callback runs: that is batched and asynchronous, and by then a short stage's line ("sr0 1/1") may already be
    # replaced by the next one. Each mutation record instead holds the text node it added; the page sets
    # textContent, which puts in a fresh node each time, so that node's text is the line as it was shown.
    page.evaluate("""() => {
        const status = document.getElementById('status');
        window.statusLog = [];
        window.logStatus = (records) => {
            for (const r of records) for (const node of r.addedNodes) window.statusLog.push(node.textContent);
        };
        window.statusObserver = new MutationObserver(window.logStatus);
        window.statusObserver.observe(status, {childList: true});
    }""")
    page.click("#go")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
    statuses = page.evaluate("""() => { window.logStatus(window.statusObserver.takeRecords());  // any not yet delivered
        window.statusObserver.disconnect(); return window.statusLog; }""")
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
