"""Evaluation metrics against hand-computed answers and brute-force references, and label discovery on disk."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_inspector.core.errors import DataError, InspectorError
from edge_inspector.core.images import read_mask
from edge_inspector.tools.labels import LabeledImage, discover_labels
from edge_inspector.tools.metrics import (
    Confusion,
    EvaluationReport,
    aupro,
    confusion_at,
    evaluate,
    f1_optimal_threshold,
    image_auroc,
    pixel_auroc,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ---------------------------------------------------------------- brute-force references (tiny inputs only)

def brute_auroc(scores, labels) -> float:
    """Every (defective, good) pair: 1 when the defective one scores higher, 0.5 on a tie."""
    pos = np.asarray(scores)[np.asarray(labels) == 1]
    neg = np.asarray(scores)[np.asarray(labels) == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def flood_regions(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected regions by breadth-first search, independent of OpenCV."""
    seen = np.zeros_like(mask, bool)
    regions = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        queue, region = deque([(y, x)]), []
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            region.append((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        regions.append(region)
    return regions


def brute_aupro(maps, masks, limit=0.3) -> float:
    """PRO/FPR at every distinct score (MVTec's exact curve), trapezoid to `limit`, interpolated there."""
    region_values = [np.array([m[p] for p in region]) for m, k in zip(maps, masks) for region in flood_regions(k)]
    negatives = maps[~masks]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1].tolist() + [-np.inf]:
        fpr = float((negatives > t).mean())
        pro = float(np.mean([(values > t).mean() for values in region_values]))
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def two_blob_masks(n=4, size=24) -> np.ndarray:
    """Defective images with two separate blobs of different sizes; the first image is good."""
    masks = np.zeros((n, size, size), bool)
    for i in range(1, n):
        masks[i, 2:4, 2:4 + 2 * i] = True  # even widths: column parity halves each region
        masks[i, 10:18, 8:20] = True
    return masks


# ---------------------------------------------------------------- image AUROC

def test_image_auroc_perfect_inverted_and_ties():
    labels = np.array([0, 0, 0, 1, 1])
    assert image_auroc(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), labels) == 1.0
    assert image_auroc(np.array([0.8, 0.9, 0.7, 0.1, 0.2]), labels) == 0.0
    assert image_auroc(np.full(5, 0.4), labels) == 0.5
    # one tied pair out of six, the rest won: (5 + 0.5) / 6
    assert image_auroc(np.array([0.1, 0.2, 0.5, 0.5, 0.9]), labels) == pytest.approx(5.5 / 6)


def test_image_auroc_matches_pair_counting_on_random_data():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 20, 300).astype(np.float64)  # many ties on purpose
    labels = (rng.random(300) < 0.3).astype(int)
    scores[labels == 1] += rng.integers(0, 5, labels.sum())
    expected = brute_auroc(scores, labels)
    assert 0.55 < expected < 0.95
    assert image_auroc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_image_auroc_needs_both_classes():
    with pytest.raises(DataError, match="both good and defective"):
        image_auroc(np.array([0.1, 0.2]), np.array([0, 0]))


# ---------------------------------------------------------------- pixel AUROC

def test_pixel_auroc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(2)
    masks = two_blob_masks(3, 12)
    maps = (rng.integers(0, 8, masks.shape) + 3 * masks * rng.integers(0, 2, masks.shape)).astype(np.float32)
    expected = brute_auroc(maps.ravel(), masks.ravel().astype(int))
    assert 0.5 < expected < 1.0
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_perfect_and_inverted():
    masks = two_blob_masks()
    assert pixel_auroc(masks.astype(np.float32), masks) == 1.0
    assert pixel_auroc(1.0 - masks.astype(np.float32), masks) == 0.0


def test_pixel_auroc_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same"):
        pixel_auroc(np.zeros((2, 8, 8), np.float32), np.zeros((2, 8, 9), bool))


# ---------------------------------------------------------------- AUPRO

def test_aupro_map_equal_to_mask_is_one_and_inverted_is_zero():
    masks = two_blob_masks()
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
    assert aupro(1.0 - masks.astype(np.float32), masks) == pytest.approx(0.0)


def test_aupro_half_of_each_region_at_zero_fpr():
    # Half of every region lights up before any good pixel; the rest shares the good pixels' score
    # distribution, so PRO(fpr) = 0.5 + 0.5 * fpr and the normalised area to 0.3 is (0.15 + 0.0225) / 0.3.
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 64, 64), bool)
    masks[1:, 4:12, 4:20] = True  # regions big enough for their score histograms to follow the good pixels'
    masks[1:, 30:60, 10:50] = True
    maps = rng.random(masks.shape).astype(np.float32) * 0.5
    covered = masks & (np.arange(64)[None, None, :] % 2 == 0)
    maps[covered] = 1.0
    expected = (0.15 + 0.5 * 0.3 ** 2 / 2) / 0.3
    assert aupro(maps, masks) == pytest.approx(expected, abs=0.01)
    # the same with every other pixel tied at 0: the tie is a straight line from (0, 0.5) to (1, 1).
    tied = covered.astype(np.float32)
    assert aupro(tied, masks) == pytest.approx(expected, abs=1e-6)


def test_aupro_weighs_regions_not_pixels():
    # small region fully found, large region scored below every good pixel: PRO is 0.5 all the way,
    # while a pixel-weighted overlap would be close to 0.
    rng = np.random.default_rng(4)
    masks = two_blob_masks(4, 32)
    maps = rng.uniform(0.2, 0.8, masks.shape).astype(np.float32)
    small = masks.copy()
    small[:, 10:, :] = False
    maps[small] = 1.0
    maps[masks & ~small] = 0.0
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-6)


def test_aupro_matches_exact_curve_on_random_maps():
    rng = np.random.default_rng(5)
    masks = two_blob_masks(5, 20)
    maps = cv2.GaussianBlur((rng.normal(size=(5, 20 * 20)).reshape(5, 20, 20) + 1.5 * masks).astype(np.float32),
                            (3, 3), 0)
    maps = np.stack([cv2.GaussianBlur(m, (3, 3), 0) for m in maps])
    expected = brute_aupro(maps, masks)
    assert 0.2 < expected < 0.95
    assert aupro(maps, masks) == pytest.approx(expected, abs=0.01)
    assert aupro(maps, masks, num_thresholds=5000) == pytest.approx(expected, abs=2e-3)
    assert aupro(maps, masks, fpr_limit=0.05) == pytest.approx(brute_aupro(maps, masks, 0.05), abs=0.02)


def test_aupro_needs_regions():
    with pytest.raises(DataError):
        aupro(np.zeros((2, 8, 8), np.float32), np.zeros((2, 8, 8), bool))


# ---------------------------------------------------------------- confusion and F1

def test_confusion_by_hand():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.5])
    labels = np.array([0, 0, 1, 1, 1])
    c = confusion_at(scores, labels, 0.5)  # 0.5 itself is not above the threshold
    assert (c.tp, c.fp, c.tn, c.fn) == (1, 0, 2, 2)
    assert c.precision == 1.0
    assert c.recall == pytest.approx(1 / 3)
    assert c.f1 == pytest.approx(0.5)
    assert c.accuracy == pytest.approx(3 / 5)
    assert c.false_reject_rate == 0.0
    assert c.escape_rate == pytest.approx(2 / 3)
    c = confusion_at(scores, labels, 0.2)
    assert (c.tp, c.fp, c.tn, c.fn) == (3, 1, 1, 0)
    assert c.false_reject_rate == pytest.approx(0.5)
    assert c.escape_rate == 0.0


def test_f1_optimal_threshold_by_hand():
    # sorted: 0.1 good, 0.35 bad, 0.4 good, 0.8 bad -> best is flagging above 0.225 (tp 2, fp 1, F1 0.8)
    threshold, c = f1_optimal_threshold(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert threshold == pytest.approx(0.225)
    assert (c.tp, c.fp, c.tn, c.fn) == (2, 1, 1, 0)
    assert c.f1 == pytest.approx(0.8)
    threshold, c = f1_optimal_threshold(np.array([1.0, 2.0, 3.0, 5.0]), np.array([0, 0, 1, 1]))
    assert threshold == pytest.approx(2.5)
    assert c.f1 == 1.0


def test_f1_optimal_threshold_beats_every_other_threshold():
    rng = np.random.default_rng(6)
    labels = (rng.random(200) < 0.4).astype(int)
    scores = np.round(rng.normal(size=200) + labels, 1)  # ties included
    threshold, best = f1_optimal_threshold(scores, labels)
    trial = np.concatenate([np.unique(scores) - 1e-9, np.unique(scores) + 1e-9])
    assert best.f1 >= max(confusion_at(scores, labels, t).f1 for t in trial) - 1e-12
    assert isinstance(best, Confusion) and best == confusion_at(scores, labels, threshold)
    assert not np.any(scores == threshold)  # a midpoint, never on a score


def test_f1_optimal_when_all_defective_flags_everything():
    threshold, c = f1_optimal_threshold(np.array([0.3, 0.3, 0.9]), np.array([1, 1, 1]))
    assert threshold < 0.3
    assert (c.tp, c.fn, c.f1) == (3, 0, 1.0)


# ---------------------------------------------------------------- evaluate / report

def test_evaluate_report_values_table_and_json():
    rng = np.random.default_rng(7)
    masks = two_blob_masks(6, 32)
    labels = np.array([0, 1, 1, 1, 1, 1, 0, 0])
    masks = np.concatenate([masks, np.zeros((2, 32, 32), bool)])
    maps = (rng.random(masks.shape) + masks).astype(np.float32)
    scores = maps.reshape(8, -1).max(axis=1)
    types = ["good", "scratch", "scratch", "spot", "spot", "spot", "good", "good"]
    report = evaluate(scores, labels, threshold=float(np.sort(scores)[2]), maps=maps, masks=masks, defect_types=types)
    assert isinstance(report, EvaluationReport)
    assert report.image_auroc == pytest.approx(brute_auroc(scores, labels))
    assert report.pixel_auroc == pytest.approx(pixel_auroc(maps, masks))
    assert report.aupro == pytest.approx(aupro(maps, masks))
    assert report.confusion == confusion_at(scores, labels, report.threshold)
    assert report.counts == {"good": 3, "scratch": 2, "spot": 3}
    assert set(report.per_defect_recall) == {"scratch", "spot"}
    spot = [i for i, t in enumerate(types) if t == "spot"]
    assert report.per_defect_recall["spot"] == pytest.approx(np.mean(scores[spot] > report.threshold))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["confusion"]["tp"] == report.confusion.tp
    assert data["counts"]["spot"] == 3
    table = report.format_table()
    for text in ("image AUROC", "pixel AUROC", "AUPRO", "scratch", "spot", "false reject", "escape"):
        assert text in table


def test_evaluate_without_masks_or_one_class_gives_none_not_errors():
    report = evaluate(np.array([0.1, 0.2, 0.3]), np.array([0, 0, 0]), threshold=0.25)
    assert report.image_auroc is None and report.pixel_auroc is None and report.aupro is None
    assert report.confusion.fp == 1 and report.confusion.false_reject_rate == pytest.approx(1 / 3)
    assert "n/a" in report.format_table()
    json.dumps(report.to_dict())


def test_evaluate_leaves_defective_images_without_mask_out_of_pixel_metrics():
    rng = np.random.default_rng(8)
    masks = two_blob_masks(4, 16)
    maps = (rng.random(masks.shape) + masks).astype(np.float32)
    labels = np.array([0, 1, 1, 1])
    per_image = [None, masks[1], None, masks[3]]  # image 2 is defective but has no mask
    report = evaluate(maps.reshape(4, -1).max(1), labels, 1.0, maps=list(maps), masks=per_image)
    keep = [0, 1, 3]
    assert report.pixel_images == 3
    assert report.pixel_auroc == pytest.approx(pixel_auroc(maps[keep], masks[keep]))
    assert report.aupro == pytest.approx(aupro(maps[keep], masks[keep]))


# ---------------------------------------------------------------- discover_labels

def write_png(path: Path, value: int | np.ndarray = 128, size: int = 16) -> Path:
    """A real PNG on disk: a flat grey image, or the given uint8 array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = value if isinstance(value, np.ndarray) else np.full((size, size), value, np.uint8)
    assert cv2.imwrite(str(path), image)
    return path


def make_mvtec(root: Path) -> Path:
    category = root / "widget"
    for i in range(3):
        write_png(category / "train" / "good" / f"{i:03d}.png")
        write_png(category / "test" / "good" / f"{i:03d}.png")
    for i in range(2):
        write_png(category / "test" / "crack" / f"{i:03d}.png")
        write_png(category / "ground_truth" / "crack" / f"{i:03d}_mask.png", 255)
        write_png(category / "test" / "stain" / f"{i:03d}.png")  # no ground truth for this defect
    return category


def test_discover_mvtec_category_and_test_folder(tmp_path):
    category = make_mvtec(tmp_path)
    for folder in (category, category / "test"):
        items = discover_labels(folder)
        assert len(items) == 7
        by_type = {t: [i for i in items if i.defect_type == t] for t in ("good", "crack", "stain")}
        assert [len(v) for v in by_type.values()] == [3, 2, 2]
        assert all(i.label == 0 and i.mask_path is None for i in by_type["good"])
        assert all(i.label == 1 for i in by_type["crack"] + by_type["stain"])
        assert [i.mask_path.name for i in by_type["crack"]] == ["000_mask.png", "001_mask.png"]
        assert all(i.mask_path is None for i in by_type["stain"])
        assert all(i.path.parent.parent.name == "test" for i in items)  # never the train images


def test_discover_visa_category_and_data_folder(tmp_path):
    data = tmp_path / "candle" / "Data"
    for i in range(3):
        write_png(data / "Images" / "Normal" / f"{i:04d}.JPG")
    for i in range(2):
        write_png(data / "Images" / "Anomaly" / f"{i:03d}.JPG")
    write_png(data / "Masks" / "Anomaly" / "000.png", 255)
    for folder in (tmp_path / "candle", data):
        items = discover_labels(folder)
        assert [i.label for i in items] == [0, 0, 0, 1, 1]
        assert items[3].mask_path == data / "Masks" / "Anomaly" / "000.png"
        assert items[4].mask_path is None
        assert {i.defect_type for i in items} == {"good", "anomaly"}


def test_discover_labels_csv(tmp_path):
    images = tmp_path / "shots"
    a = write_png(images / "a.png")
    b = write_png(images / "b.png")
    c = write_png(tmp_path / "elsewhere" / "c.png")
    mask = write_png(tmp_path / "masks" / "b.png", 255)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"path,label,mask\nshots/a.png,ok\nshots/b.png,NG,masks/b.png\n{c},fail,\n")
    items = discover_labels(images, labels_csv=csv_path)
    assert [i.path for i in items] == [a, b, c]
    assert [i.label for i in items] == [0, 1, 1]
    assert [i.mask_path for i in items] == [None, mask, None]
    assert [i.defect_type for i in items] == ["good", "defect", "defect"]
    # without a header: positional path,label
    csv_path.write_text("shots/a.png,0\nshots/b.png,1\n")
    assert [(i.path, i.label) for i in discover_labels(images, csv_path)] == [(a, 0), (b, 1)]


@pytest.mark.parametrize("row, message", [
    ("shots/a.png,maybe", "label 'maybe'"),
    ("shots/a.png", "expected 'path,label"),
    ("shots/a.png,defect,masks/none.png", "mask"),
])
def test_bad_labels_csv_row_names_file_and_line(tmp_path, row, message):
    write_png(tmp_path / "shots" / "a.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"path,label,mask\nshots/a.png,good\n{row}\n")
    with pytest.raises(DataError) as err:
        discover_labels(tmp_path, labels_csv=csv_path)
    text = str(err.value)
    assert f"{csv_path}:3" in text and message in text and "\n" not in text
    assert isinstance(err.value, InspectorError)


def test_labels_csv_with_missing_images_warns_and_refuses_when_none_exist(tmp_path, caplog):
    """A listed image that is not there is left out with a warning naming it; if none exist, one clear error."""
    write_png(tmp_path / "shots" / "a.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\nshots/a.png,good\nshots/missing.png,good\n")
    items = discover_labels(tmp_path, labels_csv=csv_path)
    assert [i.path.name for i in items] == ["a.png"]
    assert "1 listed images not found" in caplog.text and "missing.png" in caplog.text
    csv_path.write_text("path,label\nshots/missing.png,good\n")
    with pytest.raises(DataError, match="none of the 1 listed images exist"):
        discover_labels(tmp_path, labels_csv=csv_path)


def test_discover_labels_returns_none_for_plain_folder(tmp_path):
    write_png(tmp_path / "frame_000.png")
    write_png(tmp_path / "batch" / "frame_001.png")
    assert discover_labels(tmp_path) is None


def test_discovered_labels_feed_evaluate_end_to_end(tmp_path):
    """Masks written to disk, found by discover_labels and read back give perfect pixel metrics."""
    category = tmp_path / "disc"
    rng = np.random.default_rng(9)
    for i in range(3):
        write_png(category / "test" / "good" / f"{i:03d}.png", size=32)
    for i in range(3):
        mask = np.zeros((32, 32), np.uint8)
        cv2.circle(mask, (int(rng.integers(8, 24)), int(rng.integers(8, 24))), 4, 255, -1)
        write_png(category / "test" / "dent" / f"{i:03d}.png", size=32)
        write_png(category / "ground_truth" / "dent" / f"{i:03d}_mask.png", mask)
    items = discover_labels(category)
    masks = [read_mask(i.mask_path, (32, 32)) if i.mask_path else None for i in items]
    maps = [np.zeros((32, 32), np.float32) if m is None else m.astype(np.float32) for m in masks]
    scores = np.array([m.max() for m in maps])
    report = evaluate(scores, [i.label for i in items], 0.5, maps, masks, [i.defect_type for i in items])
    assert report.counts == {"good": 3, "dent": 3}
    assert report.image_auroc == 1.0 and report.pixel_auroc == 1.0 and report.aupro == pytest.approx(1.0)
    assert report.per_defect_recall == {"dent": 1.0}


@pytest.mark.mvtec
@pytest.mark.skipif(not (SHARED_DATA / "mvtec" / "bottle").is_dir(), reason="../shared/data/mvtec/bottle absent")
def test_discover_mvtec_bottle():
    items = discover_labels(SHARED_DATA / "mvtec" / "bottle")
    assert len(items) == 83
    assert sum(i.mask_path is not None for i in items) == 63
    assert sum(i.label == 0 for i in items) == 20
    assert all(i.mask_path.is_file() for i in items if i.mask_path is not None)
    assert all(isinstance(i, LabeledImage) for i in items)


# ---------------------------------------------------------------- the review band in replay's metrics

def test_review_report_counts_by_hand():
    """pass <= 2.0 < review <= 4.0 < fail: escapes among the auto-passed, false rejects among the auto-failed."""
    scores = np.array([1.0, 1.5, 3.0, 4.5, 5.0, 1.8, 2.5, 3.5, 6.0, 7.0])
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    report = evaluate(scores, labels, threshold=4.0, review_threshold=2.0)
    r = report.review
    assert r is not None and (r.auto_passed, r.escapes_among_auto_passed) == (3, 1)  # 1.0, 1.5 good; 1.8 defect
    assert (r.auto_failed, r.false_rejects_among_auto_failed) == (4, 2)  # 4.5, 5.0 good; 6.0, 7.0 defects
    assert r.review == 3 and r.review_rate == pytest.approx(0.3)
    assert r.good_review_rate == pytest.approx(0.2) and r.defects_review_rate == pytest.approx(0.4)
    assert r.escape_rate_among_auto_passed == pytest.approx(1 / 3)
    assert r.false_reject_rate_among_auto_failed == pytest.approx(0.5)
    assert report.to_dict()["review"]["escapes_among_auto_passed"] == 1
    assert "review band (pass at or under 2" in report.format_table()
    assert evaluate(scores, labels, threshold=4.0).review is None and "review band" not in \
        evaluate(scores, labels, threshold=4.0).format_table()


def test_operating_point_counts_agree_with_the_confusion_replay_reports():
    from edge_inspector.core.operating_point import operating_point

    rng = np.random.default_rng(12)
    scores = np.round(rng.normal(size=80), 1)
    labels = (rng.random(80) < 0.4).astype(int)
    for t in (-0.5, 0.0, 0.3, 1.1):
        c = confusion_at(scores, labels, t)
        p = operating_point(scores[labels == 0], scores[labels == 1], t)
        assert (p.false_rejects, p.good_count, p.escapes, p.defect_count) == (c.fp, c.fp + c.tn, c.fn, c.fn + c.tp)
        assert p.false_reject_rate == pytest.approx(c.false_reject_rate)
        assert p.escape_rate == pytest.approx(c.escape_rate)
