"""Choosing the decision threshold from out-of-sample scores of good parts.

The line engineer states the false-reject rate the line can live with (e.g. 0.5% of good parts rejected).
With n out-of-sample good scores s_(1) <= ... <= s_(n), split-conformal prediction says that for a new good
part, exchangeable with the ones seen, P(score > s_(k)) <= alpha when k = ceil((n + 1)(1 - alpha)).
That needs k <= n, i.e. n >= (1 - alpha) / alpha good images: 199 for 0.5%, 99 for 1%.
With fewer we cannot certify the rate; we then use the largest score seen (the best the data can support,
a guaranteed rate of at most 1 / (n + 1)) and say how many images certification would take.

The out-of-sample scores come from k-fold fits (each good image scored by a model that never saw it); those
fold models saw less data than the final one, so their scores run slightly high and the threshold errs on the
side of fewer false rejects.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_inspector.core.bundle import ScoreStats, ThresholdInfo

# The operating point lives with the contract (the device's replay prints it too); re-exported for callers here.
from edge_inspector.core.operating_point import (  # noqa: F401
    LOUD_ESCAPE_RATE,
    TRADEOFF_FALSE_REJECT_RATES,
    OperatingPoint,
    format_tradeoff,
    operating_point,
    rate_above,
    threshold_for_escape,
    threshold_for_false_reject,
    tradeoff_table,
)

log = logging.getLogger(__name__)


def fold_ids(count: int, folds: int, seed: int) -> np.ndarray:
    """Fold of each image for the out-of-sample scores: a seeded permutation dealt round-robin, so fold sizes
    differ by at most one. One rule for every model kind (PaDiM, patchcore, autoencoder)."""
    order = np.random.default_rng(seed).permutation(count)
    ids = np.empty(count, dtype=np.int64)
    ids[order] = np.arange(count) % folds
    return ids


def images_needed(alpha: float) -> int:
    """Smallest n for which the conformal quantile at rate alpha exists."""
    return int(math.ceil((1.0 - alpha) / alpha - 1e-9))


def conformal_threshold(good_scores: np.ndarray, alpha: float) -> ThresholdInfo:
    """Threshold certifying a false-reject rate <= alpha for new good parts (when n allows)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"target false-reject rate must be in (0, 1), got {alpha}")
    scores = np.sort(np.asarray(good_scores, dtype=np.float64))
    n = scores.size
    if n == 0:
        raise ValueError("no out-of-sample good scores to choose a threshold from")
    k = int(math.ceil((n + 1) * (1.0 - alpha)))
    needed = images_needed(alpha)
    if k <= n:
        value = float(scores[k - 1])
        note = (f"conformal quantile: score rank {k} of {n} out-of-sample good scores; P(false reject) <= "
                f"{alpha:g} for new good parts like the training ones")
        certified = True
    else:
        value = float(scores[-1])
        note = (f"NOT certified: {n} good images cannot certify a {alpha:g} false-reject rate (needs >= {needed});"
                f" using the largest out-of-sample good score, which certifies <= {1.0 / (n + 1):.3g}")
        certified = False
    # A strictly-greater-than rule must not reject the worst good part seen; nudge up by one float step.
    value = float(np.nextafter(np.float32(value), np.float32(np.inf)))
    return ThresholdInfo(value=value, rule="conformal_false_reject_rate", target_false_reject_rate=alpha,
                         certified=certified, images_needed=needed, conformal_value=value, note=note)


def score_stats(scores: np.ndarray) -> ScoreStats:
    s = np.asarray(scores, dtype=np.float64)
    return ScoreStats(count=int(s.size), mean=float(s.mean()), std=float(s.std()), min=float(s.min()),
                      max=float(s.max()), p50=float(np.percentile(s, 50)), p95=float(np.percentile(s, 95)),
                      p99=float(np.percentile(s, 99)))


def apply_f1_rule(info: ThresholdInfo, f1_value: float, use_f1: bool) -> ThresholdInfo:
    """Record the F1-optimal threshold (from labelled defects) and make it the decision value if asked."""
    info.f1_optimal_value = float(f1_value)
    if use_f1:
        info.value = float(f1_value)
        info.rule = "f1_optimal"
        info.note += "; decision uses the F1-optimal threshold on the labelled validation images instead"
    return info


@dataclass
class TrainingScores:
    """One fit's out-of-sample good scores, as report_outliers saw them (for the fit summary and report)."""

    paths: list[Path]
    scores: np.ndarray
    threshold: float

    def highest(self, count: int = 3) -> list[tuple[Path, float]]:
        order = np.argsort(self.scores)[::-1][:count]
        return [(self.paths[i], float(self.scores[i])) for i in order]


_collectors: list[list[TrainingScores]] = []


@contextmanager
def collect_training_scores() -> Iterator[list[TrainingScores]]:
    """Within the block, every report_outliers call also appends its scores to the yielded list: how the fit
    command gets them for its summary and contact sheet without widening every kind's fit function."""
    collected: list[TrainingScores] = []
    _collectors.append(collected)
    try:
        yield collected
    finally:
        _collectors.remove(collected)


def report_outliers(paths: Sequence[str | Path], oos: np.ndarray, threshold: float, count: int = 3) -> None:
    """Name the training images (`paths`, in the order of `oos`) that score highest out of sample: a defective
    part among the "good" ones or an odd capture there raises the threshold for every part after it, so the
    engineer should look. Shared by every model kind.

    When one image alone sets the threshold far above the rest (`threshold_set_alone`), say so as a WARNING: a
    part of another product dropped into the good folder (tried: 30 bottle images and one magnetic tile) set a
    bottle threshold of 19.1 against a median of 5.6 and the next image's 7.8, so any defect scoring under 19
    would pass, and an INFO line naming it was easy to miss.
    """
    files = [Path(p) for p in paths]
    oos = np.asarray(oos, dtype=np.float64)
    for collected in _collectors:
        collected.append(TrainingScores(files, oos.copy(), float(threshold)))
    names = [p.name for p in files]
    order = np.argsort(oos)[::-1][:count]
    listing = ", ".join(f"{names[i]} ({oos[i]:.4g})" for i in order)
    log.info("highest out-of-sample training scores (check these are really good parts): %s; "
             "median %.4g, threshold %.4g", listing, float(np.median(oos)), threshold)
    if np.count_nonzero(oos <= threshold) < MIN_IMAGES_FOR_OUTLIER_CHECK:
        log.warning("%d training images are too few to tell an odd one from the rest (the outlier check needs "
                    "at least %d); look at the highest-scoring ones above yourself", oos.size,
                    MIN_IMAGES_FOR_OUTLIER_CHECK)
        return
    lone = lone_score(oos, threshold)
    if lone is not None and lone.p_value < OUTLIER_P_VALUE:
        log.warning("one training image sets the threshold: %s scores %.4g, %.3g above the next image (%.4g), "
                    "%.0f times the typical step between the top training scores (good parts lead by that much "
                    "by chance in under %g of fits); look at it: if it is not a good part, remove it and fit "
                    "again (with it, defects scoring up to %.4g pass)", names[lone.index],
                    float(oos[lone.index]), float(oos[lone.index]) - lone.next_score, lone.next_score,
                    lone.gap_in_spacings, OUTLIER_P_VALUE, threshold)


MIN_IMAGES_FOR_OUTLIER_CHECK = 10  # below this the top of the scores is too few numbers to call one odd
# docs/fit.md's table: quiet on 9 of 10 real default fits (the 10th names bottle's 132.png, which has a visible
# mark and raises patchcore's threshold from 8.47 to 10.81), 3 firings in 7508 random halves of the data sets
# without such images (0.04%), and fires on a foreign image among 25-31 (p 1.1e-4).
OUTLIER_P_VALUE = 1e-3


@dataclass
class LoneScore:
    """The image whose score set the threshold, and how unusual its lead over the next image is."""

    index: int
    next_score: float
    gap_in_spacings: float  # its lead over the next image, in units of the tail's typical (scaled) spacing
    p_value: float  # how often an exponential tail of good scores gives a lead this large by chance


def tail_spacings(descending: np.ndarray) -> np.ndarray:
    """Normalised spacings i * (s_(i) - s_(i+1)) of the top scores, the highest first (Renyi: for any tail that
    falls off exponentially, these are independent and identically exponentially distributed). The top tenth,
at least 10: with 5 a noise image among 24 generated washers led the rest by 18 spacings but p was 1.1e-3;
with 10 it is 1.1e-4, and 30 bottle images plus one magnetic tile give 1.1e-4 (6.1e-3 with 5)."""
    m = min(descending.size - 1, max(10, descending.size // 10))
    return np.arange(1, m + 1) * (descending[:m] - descending[1:m + 1])


def lone_score(oos: np.ndarray, threshold: float) -> LoneScore | None:
    """The lead of the image that set the threshold over the next one, against the tail's own spacings.

    Why not "twice as far above the median as the next image" (the rule until 2026-12): how far the top of
    a few hundred good scores lies above the median depends on the tail's shape, not on an odd image: it
    fired on patchcore's bottle fit (132.png 10.81, next 8.47, median 8.17) and, on 3 images, about a "next
    image" that was the median. Here the lead D1 = s_(1) - s_(2) is compared with the mean of the next
    normalised spacings of the top ~10% (at least 10): for an exponential tail D1 / mean is F(2, 2(m-1))
    distributed, so P(lead >= t x mean) = (1 + t / (m-1)) ** -(m-1) exactly; tails lighter than exponential
    (Gaussian) fire less often. Only scores at or under the threshold count: the image that set it is the
    highest of them.
    """
    oos = np.asarray(oos, dtype=np.float64)
    within = np.flatnonzero(oos <= threshold)  # the threshold sits one float step above the score that set it
    if within.size < MIN_IMAGES_FOR_OUTLIER_CHECK:
        return None
    order = within[np.argsort(oos[within])[::-1]]
    descending = oos[order]
    spacings = tail_spacings(descending)
    typical = float(spacings[1:].mean())
    lead = float(spacings[0])
    if typical <= 0.0:  # tied scores: nothing to compare the lead with
        return None
    m = spacings.size
    ratio = lead / typical
    return LoneScore(index=int(order[0]), next_score=float(descending[1]), gap_in_spacings=ratio,
                     p_value=float((1.0 + ratio / (m - 1)) ** -(m - 1)))


def threshold_set_alone(oos: np.ndarray, threshold: float, p_value: float = OUTLIER_P_VALUE) -> int | None:
    """The index of the image whose score set the threshold when its lead over the next image is too large
    for an ordinary tail of good scores (`lone_score`'s p-value under `p_value`); None otherwise, and None
    below MIN_IMAGES_FOR_OUTLIER_CHECK images (the fit then says so once)."""
    lone = lone_score(oos, threshold)
    return lone.index if lone is not None and lone.p_value < p_value else None
