"""Verdicts: threshold on tile scores, minimum defect area, defect boxes from the thresholded heatmap."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from edge_inspector.core.decision import DecisionParams, decide, defect_regions, validate_threshold
from edge_inspector.core.errors import ConfigError


def heatmap_with(*rects, size=(100, 120), value=5.0) -> np.ndarray:
    heat = np.full(size, 0.5, np.float32)
    for x, y, w, h in rects:
        heat[y:y + h, x:x + w] = value
    return heat


def test_pass_below_threshold_and_fail_above():
    heat = heatmap_with()
    ok = decide(np.array([0.5, 0.9]), heat, DecisionParams(threshold=1.0))
    assert ok.verdict == "pass" and ok.score == pytest.approx(0.9) and ok.normalised_score == pytest.approx(0.9)
    assert ok.boxes == [] and ok.tile_scores == pytest.approx([0.5, 0.9])
    heat = heatmap_with((10, 20, 8, 6))
    bad = decide(np.array([0.5, 5.0]), heat, DecisionParams(threshold=2.0))
    assert bad.verdict == "fail" and bad.normalised_score == pytest.approx(2.5)


def test_boxes_are_the_over_threshold_regions_largest_first():
    heat = heatmap_with((10, 20, 8, 6), (60, 50, 20, 10))
    heat[55, 70] = 9.0
    boxes, largest = defect_regions(heat, 1.0, max_boxes=10)
    assert [(b.x, b.y, b.width, b.height, b.area) for b in boxes] == [(60, 50, 20, 10, 200), (10, 20, 8, 6, 48)]
    assert largest == 200
    assert boxes[0].peak == pytest.approx(9.0) and boxes[1].peak == pytest.approx(5.0)


def test_each_peak_is_its_own_regions_even_inside_another_regions_box():
    """A hot spot inside a ring (not touching it) lies within the ring's box: the ring's peak is the ring's."""
    heat = np.full((60, 60), 0.5, np.float32)
    heat[10:50, 10:50] = 3.0
    heat[14:46, 14:46] = 0.5  # a ring 4 px wide
    heat[25:35, 25:35] = 7.0  # a separate blob in the hole, hotter than the ring
    heat[12, 30] = 4.0  # the ring's own hottest pixel
    boxes, largest = defect_regions(heat, 1.0, max_boxes=10)
    assert [(b.x, b.y, b.width, b.height) for b in boxes] == [(10, 10, 40, 40), (25, 25, 10, 10)]
    assert boxes[0].peak == pytest.approx(4.0) and boxes[1].peak == pytest.approx(7.0)
    assert largest == 40 * 40 - 32 * 32


def test_regions_match_a_plain_8_connected_labelling_of_random_maps():
    """The faster labelling algorithm must find the same regions, in the same order, as OpenCV's plain call."""
    rng = np.random.default_rng(5)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(20, 200, 2))
        heat = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), float(rng.uniform(0.5, 4)))
        threshold = float(np.quantile(heat, rng.uniform(0.3, 0.95)))
        boxes, largest = defect_regions(heat, threshold, max_boxes=1000)
        _, labels, stats, _ = cv2.connectedComponentsWithStats((heat > threshold).astype(np.uint8), connectivity=8)
        areas = stats[1:, cv2.CC_STAT_AREA]
        order = np.argsort(-areas, kind="stable")
        expected = [tuple(int(v) for v in stats[i + 1, :5]) for i in order]
        assert [(b.x, b.y, b.width, b.height, b.area) for b in boxes] == expected
        assert largest == int(areas.max())
        for box, i in zip(boxes, order):
            assert box.peak * threshold == pytest.approx(float(heat[labels == i + 1].max()), rel=1e-6)


def test_min_defect_area_ignores_specks_but_not_real_defects():
    params = DecisionParams(threshold=1.0, min_defect_area=30)
    speck = decide(np.array([5.0]), heatmap_with((10, 10, 3, 3)), params)
    assert speck.verdict == "pass" and speck.largest_area == 9 and len(speck.boxes) == 1
    scratch = decide(np.array([5.0]), heatmap_with((10, 10, 30, 2)), params)
    assert scratch.verdict == "fail" and scratch.largest_area == 60
    # Many specks together are still specks: the area rule is per connected region.
    specks = decide(np.array([5.0]), heatmap_with(*[(5 + 10 * i, 5, 2, 2) for i in range(10)]), params)
    assert specks.verdict == "pass" and len(specks.boxes) == 10


def test_max_boxes_caps_the_list():
    heat = heatmap_with(*[(5 + 10 * i, 5, 2, 2 + i) for i in range(10)])
    result = decide(np.array([5.0]), heat, DecisionParams(threshold=1.0, max_boxes=3))
    assert len(result.boxes) == 3 and [b.height for b in result.boxes] == [11, 10, 9]


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, True, "1.0", None])
def test_invalid_thresholds_are_refused(bad):
    with pytest.raises(ConfigError, match="threshold"):
        validate_threshold(bad)


def test_params_validate_on_creation():
    with pytest.raises(ConfigError):
        DecisionParams(threshold=0.0)
    with pytest.raises(ConfigError, match="min_defect_area"):
        DecisionParams(threshold=1.0, min_defect_area=-1)
