"""From model outputs to a verdict: threshold, minimum defect area, defect boxes.

The threshold is on the model's raw score scale (the bundle's, or an override from config or the control
socket). A frame fails when any tile's score is over the threshold and, when `min_defect_area` is set, some
connected over-threshold region of the stitched heatmap is larger than that many pixels: a single hot pixel
from sensor noise then does not stop the line, while a real scratch still does. Boxes come from the same
connected regions, so what the HMI draws is exactly what the decision saw.

With a review band (`review_threshold`, the bundle's `threshold.review.value` or the config's
`decision.review_threshold`), a frame that does not fail but scores over the review threshold gets the third
verdict `review`: the uncertain parts a person should look at (a PLC sends them to a manual lane). A frame
scoring at or under it passes. Without one the verdicts are pass and fail, as before the band existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from edge_inspector.core.errors import ConfigError


@dataclass(frozen=True)
class DecisionParams:
    """Immutable so the control thread can swap it in with one assignment while inference reads it."""

    threshold: float
    min_defect_area: int = 0
    max_boxes: int = 20
    review_threshold: float | None = None  # pass at or under it, review between it and `threshold` (None: no band)

    def __post_init__(self):
        validate_threshold(self.threshold)
        if self.min_defect_area < 0:
            raise ConfigError(f"min_defect_area must be >= 0, got {self.min_defect_area}")
        if self.review_threshold is not None:
            check_review_threshold(self.review_threshold, self.threshold)


def check_review_threshold(value: object, threshold: float, what: str = "review_threshold") -> float:
    """The review band's pass threshold: a finite number > 0 below the fail threshold (at or above it the band
    would be empty, or would pass parts that fail)."""
    value = _positive(value, what)
    if not value < threshold:
        raise ConfigError(f"{what}: {value:.6g} must be below the threshold {threshold:.6g} (parts scoring "
                          "between the two get the verdict review)")
    return value


def resolve_review(configured: float | str | None, bundle_review: float | None, threshold: float,
                   where: str = "decision.review_threshold") -> float | None:
    """The review band's pass threshold a line runs with: the config's (`off`: no band), else the bundle's.

    A band must sit below the threshold in use; when a moved threshold (config or control socket) falls to or
    under the bundle's pass threshold the band is not silently dropped or stretched: this refuses, naming what
    to set, since which parts a person sees is the line's decision, not a side effect.
    """
    if configured == "off":
        return None
    if configured is not None:
        return check_review_threshold(configured, threshold, where)
    if bundle_review is None:
        return None
    if not bundle_review < threshold:
        raise ConfigError(f"threshold {threshold:.6g} is at or under the bundle's review band (pass at or under "
                          f"{bundle_review:.6g}): also set {where} (a number below the threshold, or off)")
    return float(bundle_review)


def _positive(value: object, what: str) -> float:
    try:
        return validate_threshold(value)
    except ConfigError:
        raise ConfigError(f"{what}: expected a finite number > 0, got {value!r}") from None


# A threshold beyond this multiple of the worst good part's score passes almost anything the model can see.
MAX_THRESHOLD_FACTOR = 4.0


def threshold_range(bundle_threshold: float, good_p50: float | None, good_max: float | None,
                    low: float | None = None, high: float | None = None) -> tuple[float, float]:
    """The thresholds a running line may be moved to, from the bundle's out-of-sample good-part scores.

    Below the median good score more than half of the good parts would fail; above MAX_THRESHOLD_FACTOR
    times the highest good score (or the bundle threshold, if higher) inspection is all but switched off.
    Without score statistics the range is the bundle threshold / 4 .. x 4. `low`/`high` (config:
    decision.threshold_min/max) replace either end: the config file is root's, the control socket is not.
    """
    reference = max(bundle_threshold, good_max or 0.0)
    derived_low = min(good_p50, bundle_threshold) if good_p50 is not None and good_p50 > 0 else \
        bundle_threshold / MAX_THRESHOLD_FACTOR
    lowest = low if low is not None else derived_low
    highest = high if high is not None else reference * MAX_THRESHOLD_FACTOR
    return float(lowest), float(max(highest, lowest))


def check_in_range(value: float, bounds: tuple[float, float], what: str = "threshold") -> float:
    low, high = bounds
    if not low <= value <= high:
        raise ConfigError(f"{what}: {value:.6g} is outside the allowed range [{low:.6g}, {high:.6g}] (set by "
                          "the bundle's good-part scores or decision.threshold_min/max in the config)")
    return value


def validate_threshold(value: object) -> float:
    """A threshold must be a finite number > 0 (a zero or NaN threshold would fail or pass everything)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ConfigError(f"threshold: expected a finite number > 0, got {value!r}")
    return float(value)


@dataclass
class DefectBox:
    x: int
    y: int
    width: int
    height: int
    area: int  # over-threshold pixels in this region
    peak: float  # highest normalised score inside (1.0 = threshold)

    def to_dict(self) -> dict:
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height, "area": self.area,
                "peak": round(self.peak, 4)}


@dataclass
class Decision:
    verdict: str  # "pass" | "review" | "fail"
    score: float  # max tile score (raw)
    normalised_score: float  # score / threshold
    threshold: float
    tile_scores: list[float]
    boxes: list[DefectBox] = field(default_factory=list)
    largest_area: int = 0
    min_defect_area: int = 0  # the parameter this verdict was decided with (the header reports it)
    review_threshold: float | None = None  # the review band's pass threshold it was decided with (None: no band)


def defect_regions(heatmap: np.ndarray, threshold: float, max_boxes: int) -> tuple[list[DefectBox], int]:
    """Connected over-threshold regions (8-connectivity), largest first; also the largest region's area."""
    mask = (heatmap > threshold).view(np.uint8)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return [], 0
    cols = np.flatnonzero(mask.any(axis=0))
    # Label only the bounding crop of the over-threshold pixels: defects are small, and labelling a whole
    # 5-megapixel frame would cost more than the rest of the decision.
    y0, x0 = int(rows[0]), int(cols[0])
    crop = np.ascontiguousarray(mask[y0:rows[-1] + 1, x0:cols[-1] + 1])
    heat = heatmap[y0:rows[-1] + 1, x0:cols[-1] + 1]
    # Grana's block-based labelling (BBDT) gives the same labels and stats as OpenCV's default (Spaghetti here)
    # in less time: measured 2026-11-24, one OpenCV thread, 2-core VM, medians of 40: a 1280x1024 mask half over
    # the threshold 7.4 vs 11.2 ms, all over 10.0 vs 11.1 ms, one 400x500 blob 0.7 vs 1.5 ms (identical output on
    # 300 random masks; tests/test_decision.py).
    _, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(crop, 8, cv2.CV_32S, cv2.CCL_GRANA)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas, kind="stable")
    boxes = []
    for i in order[:max_boxes]:
        x, y, w, h, area = (int(v) for v in stats[i + 1, :5])
        peak = _region_peak(heat[y:y + h, x:x + w], labels[y:y + h, x:x + w], int(i) + 1)
        boxes.append(DefectBox(x + x0, y + y0, w, h, area, peak / threshold))
    return boxes, int(areas.max())


def _region_peak(heat: np.ndarray, labels: np.ndarray, label: int) -> float:
    """Highest heat inside one labelled region, looking only at its bounding box.

    Only the boxes reported need a peak (at most max_boxes), and a box holds its region: this reads those
    boxes instead of gathering every over-threshold pixel of the frame (np.maximum.at over all regions cost
    11 ms on a 1280x1024 map 90% over the threshold; this 1-2 ms, 2-core VM).
    """
    mask = (labels == label).view(np.uint8)
    return float(cv2.minMaxLoc(heat, mask)[1])


def decide(tile_scores: np.ndarray, heatmap: np.ndarray, params: DecisionParams) -> Decision:
    """Verdict for one frame from its tile scores and stitched heatmap (both on the raw score scale)."""
    scores = np.asarray(tile_scores, np.float64).ravel()
    score = float(scores.max()) if scores.size else 0.0
    over = bool(score > params.threshold)
    boxes: list[DefectBox] = []
    largest = 0
    if over:  # the stitched map never exceeds the highest tile score, so below it there is nothing to find
        boxes, largest = defect_regions(heatmap, params.threshold, params.max_boxes)
    fail = over and (params.min_defect_area == 0 or largest > params.min_defect_area)
    return Decision(verdict=verdict_for(score, fail, params.review_threshold), score=score,
                    normalised_score=score / params.threshold, threshold=params.threshold,
                    tile_scores=[float(s) for s in scores], boxes=boxes, largest_area=largest,
                    min_defect_area=params.min_defect_area, review_threshold=params.review_threshold)


def verdict_for(score: float, fail: bool, review_threshold: float | None) -> str:
    """fail, else review when over the band's pass threshold, else pass. An over-threshold frame whose regions
    are all under min_defect_area is uncertain too: review when there is a band, pass otherwise (as before)."""
    if fail:
        return "fail"
    if review_threshold is not None and score > review_threshold:
        return "review"
    return "pass"
