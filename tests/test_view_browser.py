"""The live view in a real headless Chromium (Debian's package, driven by Playwright) against a live service.

Skips when Playwright or Chromium is absent (`.ci/run` installs both). The screenshots are kept under
$EDGE_INSPECTOR_ARTIFACTS (default: test-artifacts/ in the repo root) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_view import LiveService, running

from edge_inspector.core.wire import send_control
from edge_inspector.tools.view.server import ViewServer
from service_helpers import REPO

CHROMIUM = os.environ.get("EDGE_INSPECTOR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
try:
    from playwright import sync_api
except ImportError:  # absent, or installed without a working greenlet build
    pytest.skip("Playwright is not installed (pip install playwright)", allow_module_level=True)
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def artifacts() -> Path:
    folder = Path(os.environ.get("EDGE_INSPECTOR_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(tmp_path):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, timeout=60_000)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 860})
            page = context.new_page()
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.on("console", lambda message: errors.append(message.text)  # what the CSP blocked, if anything
                    if "Content Security Policy" in message.text else None)
            page.errors = errors
            yield page
        finally:
            browser.close()


def wait(page, expression: str, **options):
    """wait_for_function on an expression, as a function: the page's Content-Security-Policy forbids eval."""
    return page.wait_for_function(f"() => ({expression})", **options)


PARTS = "parseInt(document.querySelector('[data-counter=\"parts\"]').textContent)"
RED_PIXELS = """canvas => {
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let red = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i] > 200 && data[i + 2] < 80) red++;
  return red;
}"""


def test_operator_page_in_chromium(bundle, tmp_path, page):  # noqa: F811 (the imported fixture)
    service = LiveService(bundle, tmp_path, publish={"health_interval_s": 0.5})
    view = ViewServer([service.endpoint], [service.control], listen="127.0.0.1:0", silent_after_s=3.0)
    with running(service, view):
        page.goto(view.url)
        tile = page.locator('.tile[data-camera="line9"]')
        verdict = page.wait_for_function("""() => {
            const v = document.querySelector('.tile .verdict');
            return v && v.textContent === 'FAIL' && v.className; }""").json_value()
        assert "verdict-fail" in verdict  # the large verdict, in the fail colour
        wait(page, "document.querySelectorAll('.fail-thumb').length >= 2")
        assert page.locator("#link").inner_text() == "LIVE"
        parts = int(tile.locator('[data-counter="parts"]').inner_text())
        fails = int(tile.locator('[data-counter="fails"]').inner_text())
        assert parts >= 2 and 1 <= fails <= parts
        wait(page, f"{PARTS} > {parts}")  # the counters move with the parts

        # Click the newest failed part: the picture shows it, with its heatmap in colour and its defect boxes.
        item_id = tile.locator(".fail-thumb").first.get_attribute("data-item-id")
        tile.locator(f'.fail-thumb[data-item-id="{item_id}"]').click()  # new fails keep arriving in front
        wait(page, f"document.querySelector('canvas.overlay').dataset.itemId === '{item_id}'")
        canvas = tile.locator("canvas.overlay")
        size = canvas.evaluate("c => [c.width, c.height, c.dataset.format]")
        assert size == [128, 64, "png"]  # the PNG as sent (auto: half the 256x128 frame here), scaled by CSS
        assert canvas.evaluate(RED_PIXELS) > 20  # JET-coloured over-threshold heat where the defect is
        assert tile.locator("svg .defect-box").count() >= 1
        assert tile.locator(".review-banner").is_visible()
        assert "Reviewing fail" in tile.locator(".review-text").inner_text()
        page.screenshot(path=str(artifacts() / "view-fail.png"), full_page=True)

        # Threshold what-if: the histogram preview says what a candidate would do before it is applied.
        tile.locator("details summary").click()
        current = send_control(service.control, {"command": "status"})
        high = min(current["threshold"] * 3, 0.99 * (current.get("threshold_range") or [0, float("inf")])[1])
        tile.locator("input.candidate").fill(f"{high:.6g}")
        preview = tile.locator(".preview").inner_text()
        assert preview.startswith(f"With {high:.4f}: ") and "of the last" in preview
        assert tile.locator("canvas.histogram").evaluate(
            "c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v > 0)")
        tile.locator("button.apply").click()
        wait(page, "!document.querySelector('button.apply').disabled && "
                               "document.querySelector('.control-message').textContent.length > 12")
        assert tile.locator(".control-message").inner_text().startswith("threshold now")
        assert send_control(service.control, {"command": "status"})["threshold"] == pytest.approx(float(f"{high:.6g}"))
        tile.locator("button.back-live").click()
        assert not tile.locator(".review-banner").is_visible()
        assert not tile.locator(".key-row").is_visible()  # no --token-file: no key to ask for
        page.screenshot(path=str(artifacts() / "view-control.png"), full_page=True)

        # The service goes away: the page says so (and greys the tile); it comes back: the page recovers alone.
        parts_before = int(tile.locator('[data-counter="parts"]').inner_text())
        service.stop()
        wait(page, "document.querySelector('#link').textContent.startsWith('DISCONNECTED')",
                               timeout=20_000)
        assert tile.evaluate("t => t.classList.contains('stale')")
        assert tile.locator(".stale-note").is_visible()  # an old PASS is never taken for a live one
        page.screenshot(path=str(artifacts() / "view-disconnected.png"), full_page=True)
        service.start()
        wait(page, "document.querySelector('#link').textContent === 'LIVE'", timeout=60_000)
        # A new service run counts from zero again, and the page follows it rather than adding the runs up.
        wait(page, f"{PARTS} < {parts_before}")
        assert not tile.evaluate("t => t.classList.contains('stale')")
    assert page.errors == []  # no JavaScript error on the way
