"""Labelling in the live view, in a real headless Chromium: the operator marks a false reject good and an
escape found among the sampled passes as a defect with a box, slips and undoes, and every click lands in the
archive's label journal. Skips like tests/test_view_browser.py when Playwright or Chromium is absent; the
screenshot is kept under $EDGE_INSPECTOR_ARTIFACTS (default: test-artifacts/).
"""

from __future__ import annotations

import json

from test_labelloop import TOKEN, archive_from_service
from test_view_browser import artifacts, page, wait  # noqa: F401 (page: the Chromium fixture)

from edge_inspector.core.labelstore import LABELS_FILE, LabelBook, read_records
from edge_inspector.tools.view.server import ViewServer

MESSAGE = "document.querySelector('#labelling .label-message')"


def saved(tab) -> None:
    """Wait until the page answers a label click, and check it says saved."""
    wait(tab, f"{MESSAGE}.classList.contains('good') || {MESSAGE}.classList.contains('bad')")
    assert "saved:" in tab.inner_text("#labelling .label-message"), tab.inner_text("#labelling .label-message")


def test_label_two_parts_and_undo_one_in_chromium(bundle, tmp_path, page):  # noqa: F811
    folder = archive_from_service(bundle, tmp_path)
    verdicts = {p.name[:-5]: json.loads(p.read_text())["verdict"] for p in folder.glob("*.json")}
    view = ViewServer(["tcp://127.0.0.1:1"], listen="127.0.0.1:0", token=TOKEN, archive=folder,
                      defect_types=("scratch", "spot"))
    view.start()
    try:
        page.set_viewport_size({"width": 1366, "height": 900})
        page.goto(view.url)
        page.wait_for_selector("#labelling:not([hidden])")
        wait(page, f"document.querySelectorAll('#labelling .label-item').length === {len(verdicts)}")
        assert f"{len(verdicts)} waiting" in page.inner_text("#labelling .label-counts")

        page.click("#labelling .label-item.verdict-fail")
        page.click("#labelling .mark-good")  # no key yet: refused, and the page says so
        wait(page, f"{MESSAGE}.classList.contains('bad')")
        assert "operator key missing or wrong" in page.inner_text("#labelling .label-message")
        assert not (folder / LABELS_FILE).exists()

        page.fill("#labelling .label-key", TOKEN)
        page.click("#labelling .mark-good")  # the false reject
        saved(page)
        wait(page, f"document.querySelectorAll('#labelling .label-item').length === {len(verdicts) - 1}")

        page.click("#labelling .label-item.verdict-pass")  # an escape among the sampled passes
        frame = page.query_selector("#labelling .label-frame").bounding_box()
        page.mouse.move(frame["x"] + frame["width"] * 0.2, frame["y"] + frame["height"] * 0.3)
        page.mouse.down()
        page.mouse.move(frame["x"] + frame["width"] * 0.5, frame["y"] + frame["height"] * 0.7, steps=5)
        page.mouse.up()
        assert page.inner_text("#labelling .box-text").startswith("box ")
        drawn = page.query_selector("#labelling .label-box rect").bounding_box()
        assert drawn and drawn["width"] > frame["width"] * 0.25 and drawn["height"] > frame["height"] * 0.35
        page.select_option("#labelling .defect-type", "scratch")
        page.check("#labelling .show-heat")  # the archived heatmap over the frame
        wait(page, "(() => { const h = document.querySelector('#labelling .label-heat');"
                   " return !h.hidden && h.complete && h.naturalWidth > 0; })()")
        page.evaluate(f"{MESSAGE}.className = 'label-message'")
        page.click("#labelling .mark-defect")
        saved(page)
        page.evaluate(f"{MESSAGE}.className = 'label-message'")
        page.click("#labelling .undo")  # a slip: undone, then marked again
        saved(page)
        assert "waiting" in page.inner_text("#labelling .label-message")
        page.evaluate(f"{MESSAGE}.className = 'label-message'")
        page.click("#labelling .mark-defect")
        saved(page)
        page.click("#labelling .label-filter button[data-state='labelled']")
        wait(page, "document.querySelectorAll('#labelling .label-item').length === 2")
        page.screenshot(path=str(artifacts() / "view-labelling.png"), full_page=True)
        assert not page.errors, page.errors
    finally:
        view.stop()

    records, skipped = read_records(folder / LABELS_FILE)
    assert [r["op"] for r in records] == ["label", "label", "undo", "label"] and skipped == 0
    labelled = LabelBook(folder).state().labelled()
    kinds = {verdicts[stem]: (label["label"], label["defect_type"]) for stem, label in labelled.items()}
    assert kinds == {"fail": ("good", None), "pass": ("defect", "scratch")}
    box = next(label["box"] for label in labelled.values() if label["label"] == "defect")
    x, y, w, h = box
    assert w > 10 and h > 10 and x > 0 and y > 0  # drawn in frame pixels (the frame is 256x128)
