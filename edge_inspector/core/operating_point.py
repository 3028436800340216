"""The operating point: what a threshold costs in escapes, when labelled defects are known.

Shared by the workstation (`edge-export fit --validation`, which records it in bundle.yaml) and the device's
offline tools (`edge-inspector replay`, which prints it for a labelled folder): pure numpy, one definition, so
the two never disagree on what "1% false rejects" means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_inspector.core.errors import DataError

TRADEOFF_FALSE_REJECT_RATES = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
LOUD_ESCAPE_RATE = 0.5  # a threshold that lets more than this share of known defects pass is called out


@dataclass
class OperatingPoint:
    """One threshold and what it does on labelled images (a part fails when score > threshold), with the counts
    the rates come from (a rate without its count hides whether it rests on 3 images or 300)."""

    threshold: float
    false_reject_rate: float  # share of good images rejected
    escape_rate: float  # share of defective images passed
    false_rejects: int = 0  # good images over the threshold
    good_count: int = 0
    escapes: int = 0  # defective images at or under the threshold
    defect_count: int = 0


def rate_above(scores: np.ndarray, threshold: float) -> float:
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.count_nonzero(scores > threshold)) / scores.size if scores.size else 0.0


def operating_point(good: np.ndarray, defects: np.ndarray, threshold: float) -> OperatingPoint:
    good = np.asarray(good, dtype=np.float64).reshape(-1)
    defects = np.asarray(defects, dtype=np.float64).reshape(-1)
    rejected = int(np.count_nonzero(good > threshold))
    escaped = int(np.count_nonzero(defects <= threshold))
    return OperatingPoint(float(threshold), rejected / good.size if good.size else 0.0,
                          escaped / defects.size if defects.size else 0.0,
                          rejected, int(good.size), escaped, int(defects.size))


def threshold_for_false_reject(good: np.ndarray, rate: float) -> float:
    """Lowest threshold (one of the good scores) that rejects at most `rate` of these good images."""
    scores = np.sort(np.asarray(good, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("no good scores")
    allowed = math.floor(rate * scores.size + 1e-9)
    return float(scores[max(scores.size - 1 - allowed, 0)])


def highest_threshold_for_escape(defects: np.ndarray, rate: float) -> float:
    """Highest threshold that lets at most `rate` of these defective images pass (score <= threshold passes)."""
    scores = np.sort(np.asarray(defects, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("no defect scores")
    allowed = math.floor(rate * scores.size + 1e-9)
    if allowed >= scores.size:
        return float(scores[-1])
    return float(np.nextafter(scores[allowed], -np.inf))


def best_for_escape(good: np.ndarray, defects: np.ndarray, rate: float) -> OperatingPoint:
    """The best trade among the thresholds that let at most `rate` of these defects pass: the lowest
    false-reject rate, and at that false-reject rate the fewest escapes.

    Every threshold up to `highest_threshold_for_escape` meets the target, and the highest one rejects the
    fewest good parts; but it may sit well above the highest good part it passes, letting defects scoring in
    between pass for nothing. Measured on fryum's dev half (patchcore, 26 good / 49 defective) at a 20% target:
    the highest threshold 8.439 rejects 3.8% of good parts and passes 18.4% of defects; 8.207, the highest good
    score under it, rejects the same 3.8% and passes 12.2% (this rule: 8.223, 1 of 26 rejected, 6 of 49
    passed; at a 10% target 8.090, 3 of 26 and 3 of 49, against 8.161's 3 of 26 and 4 of 49). So the threshold
    drops to the gap just above that
    good score and sits midway in it (between the good score and the next defect score above it), like the
    F1-optimal threshold: the counts on these images are those at the good score, and neither neighbour is on
    the edge. With no good score under the target's limit every such threshold rejects every good part; the
    one just under the lowest defect score then passes the fewest defects.
    """
    good = np.asarray(good, dtype=np.float64).reshape(-1)
    defects = np.sort(np.asarray(defects, dtype=np.float64).reshape(-1))
    limit = highest_threshold_for_escape(defects, rate)
    under = good[good <= limit]
    if under.size:
        anchor = float(under.max())
        above = defects[defects > anchor]
        upper = min(float(above[0]), limit) if above.size else limit
        value = anchor if upper <= anchor else (anchor + upper) / 2.0
        value = min(max(value, anchor), limit)
    else:
        value = float(np.nextafter(defects[0], -np.inf))
        if not value > 0:  # a threshold must stay positive (bundle contract): keep the target's limit
            value = limit
    return operating_point(good, defects, value)


def threshold_for_escape(defects: np.ndarray, rate: float, good: np.ndarray | None = None) -> float:
    """Threshold meeting an escape-rate target: the best trade (`best_for_escape`) when good scores are given,
    else the highest threshold that keeps to the target."""
    if good is None or np.asarray(good).size == 0:
        return highest_threshold_for_escape(defects, rate)
    return best_for_escape(good, defects, rate).threshold


def tradeoff_table(good: np.ndarray, defects: np.ndarray,
                   false_reject_rates: tuple[float, ...] = TRADEOFF_FALSE_REJECT_RATES) -> list[OperatingPoint]:
    """False-reject rate vs escape rate at the thresholds that reach each false-reject rate on these images."""
    return [operating_point(good, defects, threshold_for_false_reject(good, rate)) for rate in false_reject_rates]


def format_tradeoff(points: list[OperatingPoint], chosen: OperatingPoint | None = None) -> str:
    """One row per distinct threshold, the chosen one first and marked.

    Several false-reject targets often land on the same threshold (on fryum's 26 test good images, 0, 0.5, 1
    and 2% all allow no rejection): printed once, since four identical rows read like four different choices.
    """
    lines = [f"{'threshold':>12}{'false reject':>14}{'escape':>9}"]
    shown: set[float] = set()
    for point in ([chosen] if chosen else []) + points:
        if point.threshold in shown:
            continue
        shown.add(point.threshold)
        mark = "  <- bundle threshold" if point is chosen else ""
        lines.append(f"{point.threshold:>12.6g}{100 * point.false_reject_rate:>13.1f}%"
                     f"{100 * point.escape_rate:>8.1f}%{mark}")
    return "\n".join(lines)


@dataclass
class Confusion:
    """Counts and rates at one threshold, in the terms a line uses: false rejects and escapes.

    Rates whose denominator is empty (e.g. recall with no defective images) are reported as 0.0 so the
    report stays JSON-ready; the counts show when that happened.
    """

    tp: int
    fp: int
    tn: int
    fn: int
    precision: float
    recall: float
    f1: float
    accuracy: float
    false_reject_rate: float  # good parts judged defective
    escape_rate: float  # defective parts judged good

    @classmethod
    def from_counts(cls, tp: int, fp: int, tn: int, fn: int) -> Confusion:
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, tp + fn)
        f1 = _ratio(2 * precision * recall, precision + recall)
        return cls(int(tp), int(fp), int(tn), int(fn), precision, recall, f1,
                   _ratio(tp + tn, tp + fp + tn + fn), _ratio(fp, fp + tn), _ratio(fn, fn + tp))


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0


def confusion_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> Confusion:
    """Confusion when an image is judged defective for score > threshold (the runtime's rule)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = as_labels(labels, scores.size)
    flagged = scores > threshold
    tp = int(np.count_nonzero(flagged & labels))
    fp = int(np.count_nonzero(flagged & ~labels))
    fn = int(np.count_nonzero(~flagged & labels))
    tn = int(np.count_nonzero(~flagged & ~labels))
    return Confusion.from_counts(tp, fp, tn, fn)


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, Confusion]:
    """Threshold with the best F1, placed midway between adjacent distinct scores.

    It shows what the data could support next to the bundle's own threshold (which is set from good
    images only). Candidates are every gap between distinct scores plus one below the lowest score; among
    equal F1 the highest threshold (fewest false rejects) is returned.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = as_labels(labels, scores.size)
    if scores.size == 0:
        raise DataError("F1-optimal threshold needs at least one scored image")
    values = np.unique(scores)  # ascending
    step = values[1] - values[0] if values.size > 1 else 1.0
    candidates = np.concatenate([[values[0] - step / 2.0], (values[:-1] + values[1:]) / 2.0])  # ascending
    sorted_pos = np.sort(scores[labels])
    sorted_neg = np.sort(scores[~labels])
    tp = sorted_pos.size - np.searchsorted(sorted_pos, candidates, side="right")
    fp = sorted_neg.size - np.searchsorted(sorted_neg, candidates, side="right")
    fn = sorted_pos.size - tp
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2.0 * tp, denominator, out=np.zeros(candidates.size), where=denominator > 0)
    best = int(np.flatnonzero(f1 == f1.max())[-1])  # candidates ascend: last is the highest threshold
    threshold = float(candidates[best])
    return threshold, confusion_at(scores, labels, threshold)


def as_labels(labels: np.ndarray, size: int) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.size != size:
        raise ValueError(f"{labels.size} labels for {size} scores")
    return labels.astype(bool)


# ------------------------------------------------------------------------------------------- the review band

@dataclass
class BandChoice:
    """A review band's pass threshold and what it does to the good scores it was chosen from."""

    pass_threshold: float | None  # None: these scores cannot support a band at the rate (too few, or none fits)
    good_count: int
    in_band: int  # good scores in (pass_threshold, fail_threshold]
    guaranteed: bool  # the split-conformal bound holds: P(new good part in band) <= rate
    images_needed: int  # good scores a band at this rate needs at all


def band_pass_threshold(good: np.ndarray, fail_threshold: float, rate: float) -> BandChoice:
    """The lowest pass threshold that sends at most `rate` of new good parts to review.

    With n out-of-sample good scores s_(1) <= ... <= s_(n), j of them at or under the fail threshold, and
    m = floor(rate * (n + 1)): a new good part exchangeable with them lands in (s_(k), fail] with probability at
    most (j + 1 - k) / (n + 1), so k = j + 1 - m keeps it <= rate (split conformal, as the fail threshold's own
    rule; it holds when the fail threshold does not depend on these scores or is their conformal quantile).
    With m = 0 (n < 1 / rate - 1) no band can be promised: none is made. The pass threshold is one of the
    scores (a part scoring exactly it passes), always below the fail threshold.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"review rate must be in (0, 1), got {rate}")
    scores = np.sort(np.asarray(good, dtype=np.float64).reshape(-1))
    n = int(scores.size)
    needed = int(math.ceil(1.0 / rate - 1.0 - 1e-9))
    under = int(np.count_nonzero(scores <= fail_threshold))
    allowed = int(math.floor(rate * (n + 1) + 1e-9))
    k = under + 1 - allowed
    if n == 0 or allowed == 0 or under == 0:
        return BandChoice(None, n, 0, False, needed)
    value = float(scores[max(k, 1) - 1])
    if not (0.0 < value < fail_threshold):
        return BandChoice(None, n, 0, False, needed)
    in_band = int(np.count_nonzero((scores > value) & (scores <= fail_threshold)))
    return BandChoice(value, n, in_band, True, needed)


def cross_validated_band(good: np.ndarray, fail_threshold: float, rate: float, folds: np.ndarray
                         ) -> tuple[int, np.ndarray]:
    """Good parts in the review band when each fold's band is chosen from the other folds only: the count and,
    per score, the pass threshold it was judged with (NaN: no band for its fold, so it passes or fails).

    `folds[i]` is score i's fold. No score ever takes part in choosing the band it is judged by, so the count
    is an out-of-sample estimate of the band's review rate (the conformal bound says what to expect; this says
    what happened on parts the band never saw).
    """
    good = np.asarray(good, dtype=np.float64).reshape(-1)
    folds = np.asarray(folds).reshape(-1)
    used = np.full(good.size, np.nan)
    for fold in np.unique(folds):
        held = folds == fold
        choice = band_pass_threshold(good[~held], fail_threshold, rate)
        if choice.pass_threshold is not None:
            used[held] = choice.pass_threshold
    with np.errstate(invalid="ignore"):
        in_band = (good > used) & (good <= fail_threshold)
    return int(np.count_nonzero(in_band)), used


@dataclass
class BandOutcome:
    """What a pass/review/fail band does on labelled images, in the terms a line uses."""

    good_count: int
    good_passed: int
    good_review: int
    good_failed: int  # false rejects among the auto-failed parts
    defect_count: int
    defects_passed: int  # escapes among the auto-passed parts
    defects_review: int
    defects_failed: int

    @property
    def auto_passed(self) -> int:
        return self.good_passed + self.defects_passed

    @property
    def auto_failed(self) -> int:
        return self.good_failed + self.defects_failed

    @property
    def review(self) -> int:
        return self.good_review + self.defects_review


def band_outcome(good: np.ndarray, defects: np.ndarray, pass_threshold: float | None,
                 fail_threshold: float) -> BandOutcome:
    """Counts of good and defective scores passed (<= pass), in review (between) and failed (> fail); with no
    band (None) the pass threshold is the fail threshold and nothing goes to review."""
    low = fail_threshold if pass_threshold is None else pass_threshold
    good = np.asarray(good, dtype=np.float64).reshape(-1)
    defects = np.asarray(defects, dtype=np.float64).reshape(-1)

    def split(scores: np.ndarray) -> tuple[int, int, int]:
        passed = int(np.count_nonzero(scores <= low))
        failed = int(np.count_nonzero(scores > fail_threshold))
        return passed, int(scores.size) - passed - failed, failed

    gp, gr, gf = split(good)
    dp, dr, df = split(defects)
    return BandOutcome(int(good.size), gp, gr, gf, int(defects.size), dp, dr, df)
