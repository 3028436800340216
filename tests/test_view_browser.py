"""The live view in a real headless Chromium (Debian's package, driven by Playwright) against a live service.

Skips when Playwright or Chromium is absent (`.ci/run` installs both). The screenshots are kept under
$EDGE_INSPECTOR_ARTIFACTS (default: test-artifacts/ in the repo root) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_view import LiveService

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
            context = browser.new_context(viewport={"width": 1366, "height": 768})
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


BLUE_SHARE = """canvas => {  // share of pixels in JET's low blues: a heatmap with no part in it is nearly all
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let blue = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i + 2] > 110 && data[i] < 60 && data[i + 1] < 60) blue++;
  return blue / (data.length / 4);
}"""
SCREEN = {"width": 1366, "height": 768}  # the smallest operator panel the page is laid out for


def test_operator_page_in_chromium(bundle, tmp_path, page):  # noqa: F811 (the imported fixture)
    service = LiveService(bundle, tmp_path, publish={"health_interval_s": 0.5})
    view = ViewServer([service.endpoint], [service.control], listen="127.0.0.1:0", silent_after_s=3.0)
    page.set_viewport_size(SCREEN)
    view.start()
    try:
        # Before any result: a clear note naming the endpoint, never a black picture.
        page.goto(view.url)
        empty = page.locator("#empty")
        wait(page, f"document.querySelector('#empty').textContent.includes('{service.endpoint}')")
        assert empty.is_visible() and empty.inner_text().startswith("Waiting for the first result from tcp://")
        assert page.locator("canvas.overlay").count() == 0
        page.screenshot(path=str(artifacts() / "view-waiting.png"))
        service.start()
        _operator_checks(page, service, view)
    finally:
        service.stop()
        view.stop()
    assert page.errors == []  # no JavaScript error and nothing the Content-Security-Policy blocked


def _operator_checks(page, service, view) -> None:
    """From the first fail to a threshold change and a service restart, as an operator would see them."""
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
    # The frame (256x128, from the service's frame message) with the PNG heatmap (half that size,
    # `auto` scale) coloured over it: the part is there, and the heat is red where the defect is.
    assert size == [256, 128, "png+frame"]
    assert canvas.evaluate(BLUE_SHARE) < 0.2
    assert canvas.evaluate(RED_PIXELS) > 20
    shown = canvas.bounding_box()
    assert shown["width"] > 2 * 256 * 0.9  # scaled up to the column, not left at 256 px
    assert tile.locator("svg .defect-box").count() >= 1
    assert tile.locator(".review-banner").is_visible()
    assert "Reviewing fail" in tile.locator(".review-text").inner_text()
    caption = tile.locator(".caption").inner_text()
    assert "part time 20" in caption and "defect" in caption
    assert "threshold" in tile.locator(".score-text").inner_text()
    # At 1366x768 the failed-parts strip is on screen, below the picture, without scrolling.
    for box in (tile.locator(".fail-strip").bounding_box(), tile.locator(".fail-thumb").first.bounding_box()):
        assert box["y"] >= 0 and box["y"] + box["height"] <= SCREEN["height"], box
    assert page.evaluate("() => document.scrollingElement.scrollTop") == 0
    page.screenshot(path=str(artifacts() / "view.png"))  # docs/img/view.png is a copy of this one
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


def test_a_camera_sized_frame_keeps_the_strip_on_a_1366x768_screen(page):
    """A 1280x1024 camera (5:4, taller than the test line's 2:1 frames): the picture shrinks to leave the
    failed-parts strip on screen. Results go into the real hub as the feed would put them (header, PNG
    heatmap, then the frame message), encoded as the service encodes them; no service is needed for layout."""
    import cv2
    import numpy as np

    from export.synthetic import make_part

    view = ViewServer(["tcp://127.0.0.1:9"], listen="127.0.0.1:0")
    page.set_viewport_size(SCREEN)
    view.start()
    try:
        page.goto(view.url)
        rng = np.random.default_rng(5)
        for sequence in (1, 2, 3):
            part, mask = make_part(rng, (1024, 1280), defect="spot")
            heat = cv2.resize((mask * 230).astype(np.uint8), (320, 256), interpolation=cv2.INTER_AREA)
            ys, xs = np.nonzero(mask)
            box = {"x": int(xs.min()), "y": int(ys.min()), "width": int(np.ptp(xs)) + 1,
                   "height": int(np.ptp(ys)) + 1, "area": int(mask.sum()), "peak": 1.8}
            header = {"type": "inspection", "camera_id": "cam", "sequence": sequence, "verdict": "fail",
                      "score": 9.0, "normalised_score": 1.8, "threshold": 5.0, "defects": [box],
                      "largest_defect_area": box["area"], "frame": {"width": 1280, "height": 1024},
                      "heatmap": {"format": "png", "width": 320, "height": 256, "full_scale": 2.0},
                      "capture_time_iso": "2026-12-07T23:00:00.000+00:00", "tile_boxes": [[0, 0, 1280, 1024]]}
            view.hub.add_result(header, cv2.imencode(".png", heat)[1].tobytes())
            view.hub.add_frame({"type": "frame", "camera_id": "cam", "sequence": sequence},
                               cv2.imencode(".jpg", part)[1].tobytes())
        tile = page.locator('.tile[data-camera="cam"]')
        wait(page, "document.querySelectorAll('.fail-thumb').length === 3")
        wait(page, "document.querySelector('canvas.overlay').dataset.sequence === '3'")
        size = tile.locator("canvas.overlay").evaluate("c => [c.width, c.height, c.dataset.format]")
        picture = tile.locator(".frame-box").bounding_box()
        strip = tile.locator(".fail-strip").bounding_box()
        page.screenshot(path=str(artifacts() / "view-1280x1024.png"))
    finally:
        view.stop()
    assert size == [1280, 1024, "png+frame"]  # the camera's own resolution, the heatmap over it
    assert picture["height"] >= 0.45 * SCREEN["height"]  # still the largest thing on the screen
    assert 0 <= strip["y"] and strip["y"] + strip["height"] <= SCREEN["height"], strip
    assert page.errors == []
