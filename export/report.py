"""The picture after a fit: `BUNDLE/report/contact_sheet.png`, drawn with OpenCV.

Numbers alone do not tell a line engineer whether the model learned the part: a sheet does at a glance.
Row by row it shows the training images that score highest out of sample (a defective part or an odd
capture among the "good" ones raises the threshold for every part after it), each as image | heatmap on the
image; and, when labelled images were given (`fit --validation`), the worst cases at the bundle's threshold
as image | heatmap | ground-truth mask: the defects that score lowest (the escapes first) and the good
parts that score highest (the false rejects first).

Heatmaps come from the bundle itself, run by ONNX Runtime through the same Inspector the service uses, so
they are what the device will compute. For training images that is the final model, which saw them: their
maps run lower than the out-of-sample scores in the captions, which are the figures the threshold was chosen
from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge_inspector.backends import create_backend
from edge_inspector.core.bundle import Bundle
from edge_inspector.core.decision import DecisionParams
from edge_inspector.core.errors import InspectorError
from edge_inspector.core.images import read_image
from edge_inspector.core.inspect import Inspector, Model, bundle_tiler
from edge_inspector.core.render import overlay_image
from edge_inspector.tools.labels import discover_labels
from export.threshold import TrainingScores

log = logging.getLogger(__name__)

REPORT_FOLDER = "report"
SHEET_NAME = "contact_sheet.png"
PANEL = 192  # px: each picture's height on the sheet (a 256 px model input stays legible, 6 rows fit a screen)
TRAINING_ROWS = 6
DEFECT_ROWS = 4
GOOD_ROWS = 2
WHITE, GREY, DARK = (255, 255, 255), (200, 200, 200), (32, 32, 32)


@dataclass
class Case:
    """One row of the sheet: a picture, its caption and, for labelled images, the ground-truth mask."""

    path: Path
    caption: str
    mask: Path | None = None
    label: int | None = None  # 0 good, 1 defective; None for training images (no third panel)


def sheet_path(bundle_path: Path) -> Path:
    return Path(bundle_path) / REPORT_FOLDER / SHEET_NAME


def write_contact_sheet(bundle: Bundle, training: TrainingScores | None, validation: Path | None = None,
                        labels_csv: Path | None = None) -> Path:
    """Draw the sheet into BUNDLE/report/ and return its path."""
    inspector = Inspector(Model(bundle, create_backend(bundle, "onnxruntime"), bundle_tiler(bundle)),
                          DecisionParams(threshold=bundle.threshold))
    try:
        sections = []
        if training is not None:
            cells = [case_cell(inspector, case) for case in training_cases(training, bundle.threshold)]
            sections.append((f"training images scoring highest out of sample (of {len(training.paths)}), image | "
                             "heatmap of the final model: are these really good parts?", grid(cells, 3)))
        if validation is not None:
            cells = [case_cell(inspector, case) for case in worst_labelled_cases(inspector, validation, labels_csv)]
            if cells:
                sections.append(("labelled images, worst first at the bundle's threshold: image | heatmap | "
                                 "ground-truth mask", grid(cells, 2)))
    finally:
        inspector.close()
    width = max([body.shape[1] for _, body in sections] + [3 * PANEL])
    rows = [text_block(title(bundle), width, WHITE, 0.55)]
    for heading, body in sections:
        rows += [text_block(heading, width, (120, 220, 255)), pad_to_width(body, width)]
    sheet = np.vstack(rows)
    out = sheet_path(bundle.path)
    out.parent.mkdir(exist_ok=True)
    if not cv2.imwrite(str(out), sheet):
        raise InspectorError(f"{out}: cannot write the contact sheet")
    out.chmod(0o644)
    out.parent.chmod(0o755)
    return out


def training_cases(training: TrainingScores, threshold: float) -> list[Case]:
    order = np.argsort(training.scores)[::-1][:TRAINING_ROWS]
    median = float(np.median(training.scores))
    return [Case(training.paths[i], f"#{rank + 1} {training.paths[i].name}: out-of-sample score "
                 f"{training.scores[i]:.4g} = {training.scores[i] / threshold:.2f}x threshold (median "
                 f"{median:.4g})") for rank, i in enumerate(order)]


def worst_labelled_cases(inspector: Inspector, folder: Path, labels_csv: Path | None) -> list[Case]:
    """The lowest-scoring defects and the highest-scoring good parts, each as a multiple of the threshold."""
    items = discover_labels(folder, labels_csv) or []
    threshold = inspector.params.threshold
    scored = []
    for item in items:
        try:
            scored.append((inspector.inspect(read_image(item.path)).score / threshold, item))
        except InspectorError as err:
            log.warning("contact sheet: %s skipped (%s)", item.path, err)
    defects = sorted((s, item) for s, item in scored if item.label == 1)[:DEFECT_ROWS]
    good = sorted(((s, item) for s, item in scored if item.label == 0), reverse=True)[:GOOD_ROWS]

    def caption(ratio: float, item) -> str:
        verdict = "FAIL" if ratio > 1 else "PASS"
        wrong = (item.label == 1) == (verdict == "PASS")
        what = ("ESCAPE" if item.label else "FALSE REJECT") if wrong else ("caught" if item.label else "passed")
        return f"{item.defect_type}/{item.path.name}: {ratio:.2f}x threshold, {verdict} ({what})"

    return [Case(item.path, caption(ratio, item), item.mask_path, item.label) for ratio, item in defects + good]


def case_cell(inspector: Inspector, case: Case) -> np.ndarray:
    """Caption over image | heatmap on the image (| mask, for labelled images), PANEL px high."""
    image = read_image(case.path)
    inspection = inspector.inspect(image)
    threshold = inspector.params.threshold
    heatmap = cv2.resize(inspection.heatmap, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    panels = [image, overlay_image(image, heatmap, threshold)]
    if case.label is not None:
        panels.append(mask_panel(case.mask, image.shape[:2], "good part" if case.label == 0 else "no mask given"))
    scaled = [scale_to_height(p, PANEL) for p in panels]
    row = scaled[0]
    for panel in scaled[1:]:
        row = np.hstack([row, np.full((PANEL, 4, 3), DARK, np.uint8), panel])
    return np.vstack([text_block(case.caption, row.shape[1], GREY), row])


def grid(cells: list[np.ndarray], columns: int, gap: int = 8) -> np.ndarray:
    """Cells left to right, top to bottom, each padded to the largest cell, `gap` px apart."""
    height, width = max(c.shape[0] for c in cells), max(c.shape[1] for c in cells)
    padded = [np.pad(c, ((height - c.shape[0], 0), (0, width - c.shape[1]), (0, 0)), constant_values=DARK[0])
              for c in cells]
    padded += [np.full_like(padded[0], DARK[0])] * (-len(padded) % columns)
    lines = []
    for start in range(0, len(padded), columns):
        line = padded[start]
        for cell in padded[start + 1:start + columns]:
            line = np.hstack([line, np.full((height, gap, 3), DARK, np.uint8), cell])
        lines += [line, np.full((gap, line.shape[1], 3), DARK, np.uint8)]
    return np.vstack(lines)


def mask_panel(mask_path: Path | None, shape: tuple[int, int], missing: str) -> np.ndarray:
    """The ground-truth mask in white on black; without one, `missing` says why (a good part, no mask file)."""
    panel = np.zeros((*shape, 3), np.uint8)
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) if mask_path else None
    if mask is None:
        cv2.putText(panel, missing, (8, shape[0] // 2), cv2.FONT_HERSHEY_SIMPLEX, max(0.4, shape[0] / 400),
                    GREY, 1, cv2.LINE_AA)
        return panel
    mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    panel[mask > 0] = WHITE
    return panel


def scale_to_height(image: np.ndarray, height: int) -> np.ndarray:
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def text_block(text: str, width: int, colour: tuple[int, int, int], scale: float = 0.42) -> np.ndarray:
    """Dark lines of text wrapped at word boundaries to `width` px (a long file name never widens the sheet)."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (_, height), baseline = cv2.getTextSize("Ag", font, scale, 1)
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and cv2.getTextSize(candidate, font, scale, 1)[0][0] <= width - 8:
            lines[-1] = candidate
        else:
            lines.append(word)
    step = height + baseline + 4
    block = np.full((step * len(lines) + 6, max(width, 1), 3), DARK, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(block, line, (4, height + 4 + i * step), font, scale, colour, 1, cv2.LINE_AA)
    return block


def title(bundle: Bundle) -> str:
    t = bundle.meta.threshold
    certified = "certified" if t.certified else "NOT certified"
    return (f"{bundle.model_id}: threshold {t.value:.4g} ({t.rule}, {certified}), "
            f"{bundle.meta.training.image_count} training images, fit in {bundle.meta.training.fit_seconds:.0f} s")


def pad_to_width(row: np.ndarray, width: int) -> np.ndarray:
    if row.shape[1] >= width:
        return row
    return np.hstack([row, np.full((row.shape[0], width - row.shape[1], 3), DARK, np.uint8)])
