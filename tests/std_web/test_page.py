"""The page in a real browser: Debian's chromium driven by playwright (never a browser of playwright's own),
against a real pipeline. A failing test leaves a screenshot under its tmp_path."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import pytest

from tests.conftest import skip_or_fail

pytestmark = pytest.mark.broker

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 20_000


@pytest.fixture
def browser_page(tmp_path: Path, request: pytest.FixtureRequest):
    """A chromium page; on a failure of the test its screenshot is kept as tmp_path/failure.png."""
    if not os.access(CHROMIUM, os.X_OK):
        skip_or_fail(f"no {CHROMIUM}: apt-get install chromium (make test installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("the playwright package is missing: pip install -e '.[test]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        console: list[str] = []
        page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda exc: console.append(f"page error: {exc}"))
        try:
            yield page
        finally:
            if getattr(request.node, "failed_call", True):  # set by the hook in conftest.py
                page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                (tmp_path / "console.txt").write_text("\n".join(console))
            browser.close()


def test_page_shows_the_live_image_runs_a_write_to_its_end_and_shows_a_refusal(web_pipeline, browser_page):
    from playwright.sync_api import expect

    web = web_pipeline()
    web.pipe.simulate("--rate", "20", "--n-images", "forever")
    page = browser_page
    page.goto(web.http.base + "/")

    canvas = page.get_by_label("live image", exact=True)
    page.wait_for_function("() => document.getElementById('live-canvas').dataset.imageId !== undefined")
    first = canvas.get_attribute("data-image-id")
    page.wait_for_function(f"() => document.getElementById('live-canvas').dataset.imageId !== '{first}'")
    expect(page.get_by_label("live image info")).to_contain_text("image ")
    expect(page.get_by_label(f"service std_assembler")).to_contain_text("up")

    target = web.out / "from-page.h5"
    page.get_by_label("Output file").fill(str(target))
    page.get_by_label("Number of images").fill("10")
    page.get_by_label("Run id").fill("42")
    page.get_by_role("button", name="Start write").click()
    expect(page.get_by_label("write result")).to_contain_text("request")
    page.wait_for_function("() => { const bar = document.getElementById('write-progress');"
                           " return bar.max === 10 && bar.value === 10 && bar.dataset.state === 'FINISHED'; }")
    expect(page.get_by_label("progress text")).to_have_text("10 / 10")
    expect(page.get_by_role("table", name="last requests")).to_contain_text(str(target))
    with h5py.File(target, "r") as f:
        assert f["/entry/data/data"].shape[0] == 10

    refused = "/var/tmp/std-daq-not-allowed/x.h5"
    page.get_by_label("Output file").fill(refused)
    page.get_by_role("button", name="Start write").click()
    expect(page.get_by_label("write result")).to_contain_text("refused")
    expect(page.get_by_role("alert", name="errors")).to_contain_text(refused)
    expect(page.get_by_role("alert", name="errors")).to_be_visible()
