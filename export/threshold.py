"""Choosing the decision threshold from out-of-sample scores of good parts.

The line engineer states the false-reject rate the line can live with (e.g. 0.5% of good parts rejected).
With n out-of-sample good scores s_(1) <= ... <= s_(n), split-conformal prediction says that for a new good
part, exchangeable with the ones seen, P(score > s_(k)) <= alpha when k = ceil((n + 1)(1 - alpha)).
That needs k <= n, i.e. n >= (1 - alpha) / alpha good images: 199 for 0.5%, 99 for 1%.
With fewer we cannot certify the rate; we then use the largest score seen (the best the data can support,
a guaranteed rate of at most 1 / (n + 1)) and say how many images certification would take.

The out-of-sample scores come from k-fold fits (each good image scored by a model that never saw it); those
fold models saw less data than the final one, so their scores run slightly high and the threshold errs on the
side of fewer false rejects. They are kept in the bundle (`report/good_scores.json`, hashed like every
file): the review band (`--review-rate`) is chosen from them by the same split-conformal argument
(core.operating_point).

Only this rule guarantees a false-reject rate. A threshold chosen on labelled images (`f1_optimal`,
`escape_rate`) is recorded as `certified: false` with its rates and counts marked `in_sample`, and its note
says so (`record_rates`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_inspector.core.bundle import ReviewBand, ScoreStats, ThresholdInfo

# The operating point lives with the contract (the device's replay prints it too); re-exported for callers here.
from edge_inspector.core.operating_point import (  # noqa: F401
    LOUD_ESCAPE_RATE,
    TRADEOFF_FALSE_REJECT_RATES,
    OperatingPoint,
    band_outcome,
    band_pass_threshold,
    best_for_escape,
    cross_validated_band,
    format_tradeoff,
    highest_threshold_for_escape,
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
                         certified=certified, images_needed=needed, conformal_value=value, note=note,
                         conformal_certified=certified, good_scores=[float(v) for v in scores])


CONFORMAL_RULE = "conformal_false_reject_rate"
# Rules that choose the threshold on labelled images: the rates they report are measured on the images they were
# chosen on (in-sample), and no false-reject rate is guaranteed for new parts.
LABELLED_RULES = ("f1_optimal", "escape_rate")


def record_rates(info: ThresholdInfo, point: OperatingPoint) -> ThresholdInfo:
    """Record what the decision threshold does on labelled images (rates and the counts behind them) and make
    `certified`, `in_sample` and the note say what they rest on: a threshold chosen on these images
    (LABELLED_RULES) is certified for nothing and its rates are in-sample."""
    info.validation_false_reject_rate = point.false_reject_rate
    info.validation_escape_rate = point.escape_rate
    info.validation_good_count, info.validation_false_rejects = point.good_count, point.false_rejects
    info.validation_defect_count, info.validation_escapes = point.defect_count, point.escapes
    if info.rule in LABELLED_RULES:
        info.in_sample = True
        info.certified = False
        info.note = labelled_rule_note(info)
    else:
        info.in_sample = False
        base = info.note.split(HELD_OUT_MARK)[0]  # measured again (a second calibration) replaces, not repeats
        info.note = (f"{base}{HELD_OUT_MARK}{point.good_count} good and {point.defect_count} defective labelled "
                     f"images not used to choose it: rejects {counted(point.false_rejects, point.good_count)} "
                     f"good, passes {counted(point.escapes, point.defect_count)} defects")
    return info


HELD_OUT_MARK = "; measured on "


def counted(part: int, whole: int) -> str:
    """'3 of 26 (11.5%)': a rate with the counts it comes from."""
    return f"{part} of {whole} ({100.0 * part / whole:.1f}%)" if whole else f"{part} of 0"


def labelled_rule_note(info: ThresholdInfo) -> str:
    """The note of a threshold chosen on labelled images: the rule, plainly no guarantee, the in-sample rates."""
    if info.rule == "escape_rate":
        rule = (f"escape-rate rule: the threshold letting at most {info.target_escape_rate:g} of the labelled "
                "defects pass with the fewest false rejects, then the fewest escapes")
    else:
        rule = "F1-optimal threshold on the labelled images"
    unused = ""
    if info.conformal_value is not None and info.target_false_reject_rate is not None:
        unused = (f" (the conformal threshold {info.conformal_value:.6g} for a {info.target_false_reject_rate:g} "
                  f"false-reject rate is {'' if info.conformal_certified else 'not certified and '}not used)")
    parts = [f"{rule}; chosen on labelled images, so NO false-reject rate is guaranteed for new parts{unused}"]
    if info.validation_good_count is not None and info.validation_defect_count is not None:
        parts.append(f"in-sample, on the same images it was chosen on: rejects "
                     f"{counted(info.validation_false_rejects or 0, info.validation_good_count)} good and passes "
                     f"{counted(info.validation_escapes or 0, info.validation_defect_count)} defects; new parts "
                     "will do worse")
    else:
        parts.append("its rates were not measured")
    return "; ".join(parts)


def review_band(good_scores: np.ndarray, fail_threshold: float, rate: float, folds: int = 5, seed: int = 0,
                labelled_good: np.ndarray | None = None, labelled_defects: np.ndarray | None = None,
                fail_in_sample: bool = False) -> ReviewBand | None:
    """The review band for a target review rate of good parts, from out-of-sample good scores (the fit's k-fold
    scores, plus labelled good images scored by the final model, which never trained on them), with its
    cross-validated rate and, given labelled defects, what it does to them. None when these scores cannot
    support a band at this rate (the fit says how many good images it needs).

    Measured on fryum (patchcore defaults, 450 training + 26 dev good, 49 dev defects, 2-core VM): at 5% the band
    passes at or under 8.602 below the threshold 9.805; cross-validated 23 of 476 good parts (4.8%) to review;
    of the dev defects 10 of 49 (20.4%) are auto-passed (42.9% pass without the band), 11 go to review. At 10%:
    8.380, 47 of 476 (9.9%), 8 of 49 defects auto-passed. The 26 dev good parts sent 0 and 1 to review: the
    k-fold models saw less data, so their scores run high and the band errs towards fewer reviews.
    """
    extra = np.asarray([] if labelled_good is None else labelled_good, dtype=np.float64)
    pooled = np.concatenate([np.asarray(good_scores, dtype=np.float64).reshape(-1), extra])
    choice = band_pass_threshold(pooled, fail_threshold, rate)
    if choice.pass_threshold is None:
        log.warning("no review band: %d out-of-sample good scores cannot send at most %g of good parts to review "
                    "(needs >= %d)", choice.good_count, rate, choice.images_needed)
        return None
    cv_count, _ = cross_validated_band(pooled, fail_threshold, rate, fold_ids(pooled.size, folds, seed))
    band = ReviewBand(value=choice.pass_threshold, target_rate=float(rate), good_count=choice.good_count,
                      good_in_band=choice.in_band, cross_validated_in_band=cv_count,
                      cross_validated_rate=cv_count / choice.good_count, guaranteed=choice.guaranteed)
    note = (f"review band: pass at or under {band.value:.6g}, review up to the threshold {fail_threshold:.6g}; at "
            f"most {rate:g} of new good parts go to review (split-conformal on {choice.good_count} out-of-sample "
            f"good scores); cross-validated ({folds} folds, each band chosen without the parts it judges): "
            f"{counted(cv_count, choice.good_count)} good parts to review")
    if labelled_defects is not None and labelled_good is not None:
        outcome = band_outcome(labelled_good, labelled_defects, band.value, fail_threshold)
        band.labelled_defect_count, band.defects_auto_passed = outcome.defect_count, outcome.defects_passed
        band.defects_in_band = outcome.defects_review
        band.labelled_good_count, band.labelled_good_in_band = outcome.good_count, outcome.good_review
        band.labelled_good_failed = outcome.good_failed
        note += (f"; on the labelled images: {counted(outcome.defects_passed, outcome.defect_count)} defects "
                 f"auto-passed, {counted(outcome.defects_review, outcome.defect_count)} to review, "
                 f"{counted(outcome.good_failed, outcome.good_count)} good parts auto-failed"
                 + (" (the fail threshold was chosen on these images: in-sample)" if fail_in_sample else ""))
    band.note = note
    return band


def score_stats(scores: np.ndarray) -> ScoreStats:
    s = np.asarray(scores, dtype=np.float64)
    return ScoreStats(count=int(s.size), mean=float(s.mean()), std=float(s.std()), min=float(s.min()),
                      max=float(s.max()), p50=float(np.percentile(s, 50)), p95=float(np.percentile(s, 95)),
                      p99=float(np.percentile(s, 99)))


def apply_f1_rule(info: ThresholdInfo, f1_value: float, use_f1: bool, good: np.ndarray | None = None,
                  defects: np.ndarray | None = None) -> ThresholdInfo:
    """Record the F1-optimal threshold (from labelled defects) and make it the decision value if asked; then
    the bundle is certified for nothing, and with the scores it was chosen on its in-sample rates are recorded."""
    info.f1_optimal_value = float(f1_value)
    if use_f1:
        info.value = float(f1_value)
        info.rule = "f1_optimal"
        info.certified = False
        if good is not None and defects is not None:
            return record_rates(info, operating_point(good, defects, info.value))
        info.note = labelled_rule_note(info)
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
