"""How good is a bundle on labelled images: image AUROC, pixel AUROC, AUPRO and the confusion at a threshold.

`edge-inspector replay` runs a bundle over a folder; when that folder carries labels (MVTec AD or VisA
layout, or a labels CSV) the numbers here tell a vision engineer whether the model separates good from bad
parts (AUROC), whether it points at the right place (pixel AUROC, AUPRO) and what the line would see at
the bundle's threshold: how many good parts get rejected and how many bad ones escape.

Everything is numpy on whole arrays: pixel metrics sort the good-pixel scores once and count with
`searchsorted`/`bincount`, so 83 images of 256x256 take well under a second and about two extra copies of
the maps' good pixels in memory, never a pairwise or per-pixel Python loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from edge_inspector.core.errors import DataError
from edge_inspector.core.operating_point import (
    LOUD_ESCAPE_RATE,
    Confusion,
    OperatingPoint,
    as_labels,
    band_outcome,
    confusion_at,
    f1_optimal_threshold,
    format_tradeoff,
    tradeoff_table,
)
from edge_inspector.tools.labels import GOOD

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Image-level metrics
# --------------------------------------------------------------------------------------------------

def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a defective image scores above a good one, ties counting half (Mann-Whitney U)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = as_labels(labels, scores.size)
    _require_both(int(labels.sum()), int((~labels).sum()), "image AUROC", "images")
    return _auroc_from_sorted(np.sort(scores[~labels]), scores[labels])


def _require_both(positives: int, negatives: int, metric: str, what: str) -> None:
    if positives == 0 or negatives == 0:
        raise DataError(f"{metric} needs both good and defective {what} "
                        f"(got {negatives} good, {positives} defective)")


def _auroc_from_sorted(negatives_sorted: np.ndarray, positives: np.ndarray) -> float:
    """AUROC by counting, for each positive, the negatives below it and those tied with it.

    Only the negatives are sorted; positives are looked up in chunks so memory stays bounded even when
    defects cover a large share of the pixels.
    """
    below = 0
    tied = 0
    for start in range(0, positives.size, 1 << 20):
        chunk = positives[start:start + (1 << 20)]
        left = np.searchsorted(negatives_sorted, chunk, side="left")
        right = np.searchsorted(negatives_sorted, chunk, side="right")
        below += int(left.sum())
        tied += int((right - left).sum())
    return (below + 0.5 * tied) / (float(positives.size) * float(negatives_sorted.size))


# --------------------------------------------------------------------------------------------------
# Pixel-level metrics
# --------------------------------------------------------------------------------------------------

def _check_pixels(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps)
    masks = np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape or maps.ndim not in (2, 3):
        raise ValueError(f"anomaly maps {maps.shape} and masks {masks.shape} must have the same (N,H,W) shape")
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float32)
    return maps, masks


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """AUROC over all pixels: defect pixels (mask True) against every other pixel of every image."""
    maps, masks = _check_pixels(maps, masks)
    negatives = np.sort(maps[~masks])
    positives = maps[masks]
    _require_both(positives.size, negatives.size, "pixel AUROC", "pixels")
    return _auroc_from_sorted(negatives, positives)


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, num_thresholds: int = 200) -> float:
    """Area under the per-region-overlap curve up to fpr_limit, divided by fpr_limit (MVTec AD's AUPRO).

    Unlike pixel AUROC every defect region weighs the same, so a missed small scratch costs as much as a
    missed large stain. Thresholds are taken at quantiles of the good-pixel scores spaced evenly in FPR
    over [0, fpr_limit] (where the area is measured) rather than evenly in score, which would spend most
    of them on FPRs above the limit.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    maps, masks = _check_pixels(maps, masks)
    negatives = np.sort(maps[~masks])
    values, regions, sizes = _region_pixels(maps, masks)
    _require_both(sizes.size, negatives.size, "AUPRO", "pixels (defect regions)")
    thresholds = _pro_thresholds(negatives, fpr_limit, max(int(num_thresholds), 2))
    fpr = (negatives.size - np.searchsorted(negatives, thresholds, side="right")) / negatives.size
    pro = _per_region_overlap(values, regions, sizes, thresholds)
    return _partial_area(fpr[::-1], pro[::-1], fpr_limit) / fpr_limit


def _region_pixels(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score and global region id of every defect pixel, and each region's pixel count (8-connected, as MVTec).

    Only defect pixels are kept, so memory follows the defect area, not the image count.
    """
    values: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    offset = 0
    for anomaly_map, mask in zip(maps, masks):  # one cv2 call per image
        if not mask.any():
            continue
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        values.append(anomaly_map[mask])
        ids.append(labels[mask].astype(np.int64) - 1 + offset)
        offset += count - 1
    if not offset:
        return np.zeros(0, maps.dtype), np.zeros(0, np.int64), np.zeros(0, np.int64)
    region = np.concatenate(ids)
    return np.concatenate(values), region, np.bincount(region, minlength=offset)


def _pro_thresholds(negatives_sorted: np.ndarray, fpr_limit: float, count: int) -> np.ndarray:
    """Ascending thresholds whose FPRs run from 0 to at least fpr_limit, so the limit can be interpolated."""
    n = negatives_sorted.size
    above = np.round(np.linspace(0.0, fpr_limit, count) * n).astype(np.int64)  # good pixels above each
    picked = negatives_sorted[np.clip(n - 1 - above, 0, n - 1)]
    # one step below the lowest pick: every good pixel >= it now counts, so FPR >= fpr_limit there.
    lowest = np.nextafter(picked.min(), -np.inf, dtype=negatives_sorted.dtype)
    return np.unique(np.concatenate([picked, [lowest]]).astype(negatives_sorted.dtype))


def _per_region_overlap(values: np.ndarray, region: np.ndarray, sizes: np.ndarray,
                        thresholds: np.ndarray) -> np.ndarray:
    """Mean over regions of the share of each region's pixels above each threshold.

    Each defect pixel is binned by how many thresholds lie below it; a 2-D bincount (region x bin) and a
    reverse cumulative sum then give every region's overlap at every threshold without a pixel loop.
    """
    bins = thresholds.size + 1
    below = np.searchsorted(thresholds, values, side="left")  # thresholds strictly below the pixel
    counts = np.bincount(region * bins + below, minlength=sizes.size * bins)
    counts = counts.reshape(sizes.size, bins)
    # pixel above threshold k  <=>  below > k: sum bins k+1..end.
    above = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]
    return (above / sizes[:, None]).mean(axis=0)


def _partial_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit]; x ascending, y interpolated at the limit."""
    inside = x <= limit
    xs, ys = x[inside], y[inside]
    if xs.size < x.size and xs[-1] < limit:
        after = int(np.argmax(~inside))
        x0, x1, y0, y1 = x[after - 1], x[after], y[after - 1], y[after]
        xs = np.append(xs, limit)
        ys = np.append(ys, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


# --------------------------------------------------------------------------------------------------
# The report replay prints and saves
# --------------------------------------------------------------------------------------------------

@dataclass
class ReviewReport:
    """The review band on labelled images: what the line's three verdicts do (scores only, like the confusion).

    Shares "among" a verdict are of the parts given that verdict, the figures a line lives with: of the parts
    shipped unchecked, how many were defective; of those scrapped, how many were good; and how much of the flow a
    person has to look at.
    """

    review_threshold: float
    auto_passed: int  # parts at or under the review threshold
    escapes_among_auto_passed: int  # of those, defective
    escape_rate_among_auto_passed: float
    auto_failed: int  # parts over the threshold
    false_rejects_among_auto_failed: int  # of those, good
    false_reject_rate_among_auto_failed: float
    review: int  # parts between the two
    review_rate: float  # of all parts
    good_review_rate: float  # of good parts: what the band costs in a person's time
    defects_auto_passed_rate: float  # of defective parts: the escapes left with the band
    defects_review_rate: float  # of defective parts: the ones a person now catches


@dataclass
class EvaluationReport:
    """All numbers replay shows for a labelled folder; scores and thresholds in the same (raw) units."""

    num_images: int
    num_good: int
    num_defective: int
    image_auroc: float | None  # None when only one class is present
    pixel_auroc: float | None  # None when no masks
    aupro: float | None  # None when no masks
    aupro_fpr_limit: float
    threshold: float
    confusion: Confusion  # at the bundle threshold
    f1_optimal_threshold: float
    f1_optimal: Confusion
    counts: dict[str, int] = field(default_factory=dict)  # images per defect type ("good" included)
    flagged: dict[str, int] = field(default_factory=dict)  # judged defective at the threshold, per type
    per_defect_recall: dict[str, float] = field(default_factory=dict)  # defect types only
    mean_score: dict[str, float] = field(default_factory=dict)
    pixel_images: int = 0  # images that entered the pixel metrics
    # False-reject vs escape rate at the thresholds that reach 0, 0.5, 1, 2, 5, 10, 20% false rejects on
    # these good images: what another threshold would cost (empty without both good and defective images).
    tradeoff: list[OperatingPoint] = field(default_factory=list)
    review: ReviewReport | None = None  # with a review band (the bundle's or replay --review-threshold)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (python floats/ints, nested dicts)."""
        return _plain(asdict(self))

    def format_table(self) -> str:
        """Terminal summary: headline metrics, the two operating points, then one row per defect type."""
        lines = [f"images           {self.num_images} ({self.num_good} good, {self.num_defective} defective)",
                 f"image AUROC      {_fmt(self.image_auroc)}",
                 f"pixel AUROC      {_fmt(self.pixel_auroc)}"
                 + (f"   ({self.pixel_images} images with masks)" if self.pixel_auroc is not None else ""),
                 f"{f'AUPRO@{self.aupro_fpr_limit:g}':<17}{_fmt(self.aupro)}",
                 "",
                 f"{'operating point':<18}{'threshold':>12}{'precision':>11}{'recall':>9}{'F1':>8}"
                 f"{'false reject':>14}{'escape':>9}{'good rejected':>15}{'defects passed':>16}"]
        for name, threshold, c in (("bundle threshold", self.threshold, self.confusion),
                                   ("F1-optimal", self.f1_optimal_threshold, self.f1_optimal)):
            # The confusion matrix in the line's words: fp of fp+tn good parts rejected, fn of fn+tp defects passed.
            lines.append(f"{name:<18}{threshold:>12.6g}{c.precision:>11.3f}{c.recall:>9.3f}{c.f1:>8.3f}"
                         f"{_pct(c.false_reject_rate):>14}{_pct(c.escape_rate):>9}"
                         f"{f'{c.fp}/{c.fp + c.tn}':>15}{f'{c.fn}/{c.fn + c.tp}':>16}")
        if self.tradeoff:
            lines += ["", "trade-off on these images (a part fails when its score is over the threshold):",
                      format_tradeoff(self.tradeoff, operating_point_of(self.confusion, self.threshold))]
        if self.num_defective and self.confusion.escape_rate > LOUD_ESCAPE_RATE:
            lines += ["", f"WARNING: the bundle threshold lets {_pct(self.confusion.escape_rate)} of these "
                          "defective parts pass; choose a threshold from the trade-off above"]
        if self.review is not None:
            lines += ["", self.review_lines()]
        lines += ["", f"{'defect type':<18}{'images':>8}{'flagged':>9}{'recall':>9}{'mean score':>12}"]
        for name, count in self.counts.items():
            recall = "-" if name == GOOD else _pct(self.per_defect_recall.get(name, 0.0))
            lines.append(f"{name:<18}{count:>8}{self.flagged.get(name, 0):>9}{recall:>9}"
                         f"{self.mean_score.get(name, float('nan')):>12.6g}")
        return "\n".join(lines)


    def review_lines(self) -> str:
        r = self.review
        assert r is not None
        return "\n".join([
            f"review band (pass at or under {r.review_threshold:.6g}, fail over {self.threshold:.6g}):",
            f"  auto-passed  {r.auto_passed:>6}   escapes among them {r.escapes_among_auto_passed} "
            f"({_pct(r.escape_rate_among_auto_passed)}); {_pct(r.defects_auto_passed_rate)} of the defects",
            f"  review       {r.review:>6}   {_pct(r.review_rate)} of all parts; {_pct(r.good_review_rate)} of good "
            f"parts, {_pct(r.defects_review_rate)} of defects",
            f"  auto-failed  {r.auto_failed:>6}   false rejects among them {r.false_rejects_among_auto_failed} "
            f"({_pct(r.false_reject_rate_among_auto_failed)})"])


def review_report(scores: np.ndarray, labels: np.ndarray, review_threshold: float,
                  threshold: float) -> ReviewReport:
    """The review band's three-way outcome on labelled scores (core.operating_point.band_outcome)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = as_labels(labels, scores.size)
    o = band_outcome(scores[~labels], scores[labels], review_threshold, threshold)
    return ReviewReport(
        review_threshold=float(review_threshold), auto_passed=o.auto_passed,
        escapes_among_auto_passed=o.defects_passed,
        escape_rate_among_auto_passed=_share(o.defects_passed, o.auto_passed), auto_failed=o.auto_failed,
        false_rejects_among_auto_failed=o.good_failed,
        false_reject_rate_among_auto_failed=_share(o.good_failed, o.auto_failed), review=o.review,
        review_rate=_share(o.review, scores.size), good_review_rate=_share(o.good_review, o.good_count),
        defects_auto_passed_rate=_share(o.defects_passed, o.defect_count),
        defects_review_rate=_share(o.defects_review, o.defect_count))


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _pct(value: float) -> str:
    return f"{100.0 * value:.1f}%"


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


MapsLike = np.ndarray | Sequence[np.ndarray]
MasksLike = np.ndarray | Sequence[np.ndarray | None]


def evaluate(scores: np.ndarray, labels: np.ndarray, threshold: float, maps: MapsLike | None = None,
             masks: MasksLike | None = None, defect_types: Sequence[str] | None = None,
             fpr_limit: float = 0.3, review_threshold: float | None = None) -> EvaluationReport:
    """Every metric for one replay run; metrics the data cannot support come back as None, not errors.

    `masks` may be an (N,H,W) bool array or a per-image list where None means "no mask": good images
    without a mask count as all-good pixels, defective images without one are left out of the pixel
    metrics (counting their defect as good pixels would punish a correct heatmap).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = as_labels(labels, scores.size)
    if scores.size == 0:
        raise DataError("nothing to evaluate: no scored images")
    types = list(defect_types) if defect_types is not None else [GOOD if not y else "defect" for y in labels]
    if len(types) != scores.size:
        raise ValueError(f"{len(types)} defect types for {scores.size} scores")
    both = bool(labels.any() and (~labels).any())
    best_threshold, best = f1_optimal_threshold(scores, labels)
    pixel_maps, pixel_masks = _pixel_inputs(maps, masks, labels)
    pixel_value = aupro_value = None
    if pixel_maps is not None and pixel_masks is not None and pixel_masks.any() and (~pixel_masks).any():
        pixel_value, aupro_value = pixel_auroc(pixel_maps, pixel_masks), aupro(pixel_maps, pixel_masks, fpr_limit)
    report = EvaluationReport(
        num_images=int(scores.size), num_good=int((~labels).sum()), num_defective=int(labels.sum()),
        image_auroc=image_auroc(scores, labels) if both else None,
        pixel_auroc=pixel_value, aupro=aupro_value,
        aupro_fpr_limit=float(fpr_limit), threshold=float(threshold),
        confusion=confusion_at(scores, labels, threshold), f1_optimal_threshold=best_threshold, f1_optimal=best,
        pixel_images=0 if pixel_masks is None else int(pixel_masks.shape[0]))
    _fill_per_type(report, scores, labels, np.asarray(types, dtype=object), threshold)
    if both:
        report.tradeoff = tradeoff_table(scores[~labels], scores[labels])
    if review_threshold is not None:
        report.review = review_report(scores, labels, review_threshold, threshold)
    return report


def operating_point_of(confusion: Confusion, threshold: float) -> OperatingPoint:
    return OperatingPoint(float(threshold), confusion.false_reject_rate, confusion.escape_rate)


def _pixel_inputs(maps: MapsLike | None, masks: MasksLike | None,
                  labels: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Maps and masks of the images usable for pixel metrics, stacked; (None, None) when there are none."""
    if maps is None or masks is None:
        return None, None
    if isinstance(masks, np.ndarray) and isinstance(maps, np.ndarray):
        if len(maps) != labels.size or len(masks) != labels.size:
            raise ValueError(f"{len(maps)} maps and {len(masks)} masks for {labels.size} images")
        return maps, masks.astype(bool, copy=False)
    if len(maps) != labels.size or len(masks) != labels.size:
        raise ValueError(f"{len(maps)} maps and {len(masks)} masks for {labels.size} images")
    keep = [i for i, (mask, bad) in enumerate(zip(masks, labels)) if mask is not None or not bad]
    if not keep:
        return None, None
    stacked_maps = np.stack([np.asarray(maps[i]) for i in keep])
    stacked_masks = np.stack([np.zeros(stacked_maps.shape[1:], bool) if masks[i] is None
                              else np.asarray(masks[i], dtype=bool) for i in keep])
    return stacked_maps, stacked_masks


def _fill_per_type(report: EvaluationReport, scores: np.ndarray, labels: np.ndarray, types: np.ndarray,
                   threshold: float) -> None:
    flagged = scores > threshold
    names = sorted(set(types.tolist()), key=lambda name: (name != GOOD, name))  # "good" first
    for name in names:
        chosen = types == name
        report.counts[name] = int(chosen.sum())
        report.flagged[name] = int(np.count_nonzero(flagged & chosen))
        report.mean_score[name] = float(scores[chosen].mean())
        if labels[chosen].all():
            report.per_defect_recall[name] = report.flagged[name] / report.counts[name]
