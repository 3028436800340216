"""Threshold from labelled defect images: the F1-optimal operating point, recorded beside the conformal one,
and what the decision threshold costs in escaped defects.

Runs the exported bundle itself (ONNX Runtime, same tiling as the service), so the F1 threshold is measured
on exactly what the device will compute, for any model kind.

The default threshold is still set from good parts alone (a false-reject rate the line can live with); the
labelled defects then say what it costs: the escape rate at that threshold and a table of false-reject rate
against escape rate, printed and recorded in bundle.yaml. `--threshold-rule escape --target-escape R` picks
instead, among the thresholds that let at most R of the validation defects pass, the one with the fewest false
rejects and at those the fewest escapes (operating_point.best_for_escape).

What the bundle then claims follows the rule actually used: the conformal rule's note states its false-reject
guarantee; a threshold chosen on the labelled images (f1_optimal, escape_rate) is `certified: false`, records
its rates with their counts as `in_sample: true`, and its note says plainly that no false-reject rate is
guaranteed (measured on fryum's dev half before this: an escape-rule threshold rejecting 3 of 26 good parts
still said "P(false reject) <= 0.005"; and on the other half the same threshold passed 33% of the defects
against a 10% target, so in-sample figures are no promise).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import click
import numpy as np

from edge_inspector.backends import create_backend
from edge_inspector.core.bundle import Bundle, write_meta
from edge_inspector.core.errors import DataError
from edge_inspector.tools.labels import discover_labels
from edge_inspector.tools.metrics import EvaluationReport
from edge_inspector.tools.replay import replay_folder
from export.threshold import (
    LOUD_ESCAPE_RATE,
    apply_f1_rule,
    best_for_escape,
    counted,
    format_tradeoff,
    operating_point,
    record_rates,
    review_band,
    tradeoff_table,
)

log = logging.getLogger(__name__)


def calibrate_with_defects(bundle: Bundle, folder: Path, labels_csv: Path | None = None,
                           use_f1: bool = False, target_escape: float | None = None,
                           review_rate: float | None = None) -> Bundle:
    """Score a labelled folder (good and defective), record the F1-optimal threshold and the operating curve,
    optionally decide with the F1-optimal threshold or the one meeting `target_escape`, and with `review_rate`
    add a review band chosen from the good parts' out-of-sample scores, these labelled good ones included."""
    good, defects, report = score_labelled(bundle, folder, labels_csv)
    log.info("validation on %d labelled images: image AUROC %s, F1-optimal threshold %.6g (F1 %.3f)",
             report.num_images, report.image_auroc, report.f1_optimal_threshold, report.f1_optimal.f1)
    info = apply_f1_rule(bundle.meta.threshold, report.f1_optimal_threshold, use_f1)
    if target_escape is not None:
        info.value = best_for_escape(good, defects, target_escape).threshold
        info.rule = "escape_rate"
        info.target_escape_rate = float(target_escape)
        info.certified = False
    record_operating_point(bundle, good, defects)
    if review_rate is not None:
        return apply_review_band(bundle, review_rate, good, defects)
    write_meta(bundle.path, bundle.meta)
    return Bundle.load(bundle.path)


def apply_review_band(bundle: Bundle, rate: float, labelled_good: np.ndarray | None = None,
                      labelled_defects: np.ndarray | None = None) -> Bundle:
    """Record the review band for `rate` (fit --review-rate) in bundle.yaml, print what it does, reload."""
    info = bundle.meta.threshold
    good_scores = bundle.good_scores()
    if not good_scores:
        raise DataError(f"{bundle.path}: the bundle records no out-of-sample good scores to choose a review band "
                        "from (fit it again with this version)")
    training = bundle.meta.training
    info.review = review_band(np.asarray(good_scores), float(info.value), rate, folds=max(training.folds, 2),
                              seed=training.seed, labelled_good=labelled_good, labelled_defects=labelled_defects,
                              fail_in_sample=info.in_sample)
    if info.review is not None:
        click.echo(info.review.note)
    else:
        click.echo(f"WARNING: no review band at {rate:g}: too few good images (see the log); the bundle decides "
                   "pass/fail only", err=True)
    write_meta(bundle.path, bundle.meta)
    return Bundle.load(bundle.path)


def score_labelled(bundle: Bundle, folder: Path, labels_csv: Path | None = None
                   ) -> tuple[np.ndarray, np.ndarray, EvaluationReport]:
    """The good and the defective scores of a labelled folder, from the exported bundle itself (ONNX Runtime)."""
    items = discover_labels(folder, labels_csv)
    if items is None:
        raise DataError(f"{folder}: no labels found (expected MVTec AD / VisA layout or a labels CSV)")
    _warn_other_models(bundle, folder)
    summary = replay_folder(folder, bundle, create_backend(bundle, "onnxruntime"), labels_csv=labels_csv)
    report = summary.report
    if report is None or report.num_good == 0 or report.num_defective == 0:
        raise DataError(f"{folder}: the F1-optimal threshold needs both good and defective labelled images")
    labels = {str(item.path): item.label for item in items}
    scored = [(row.score, labels[row.path]) for row in summary.rows if row.score is not None]
    good = np.array([s for s, y in scored if y == 0])
    defects = np.array([s for s, y in scored if y == 1])
    return good, defects, report


def _warn_other_models(bundle: Bundle, folder: Path) -> None:
    """Labels exported from a line (`edge-inspector labels export`) name the model that judged each part: its
    scores and threshold are not comparable with this bundle's, so say so; the images are scored anew."""
    from edge_inspector.tools.labelset import judged_by

    models = judged_by(folder)
    others = {m: n for m, n in (models or {}).items() if m != bundle.model_id}
    if others:
        log.warning("%s: %s of these labelled parts were judged on the line by another model (%s); their line "
                    "scores and thresholds are not comparable with %s's, so only the images and labels are used",
                    folder, sum(others.values()), ", ".join(f"{m} x{n}" for m, n in others.items()),
                    bundle.model_id)


def record_operating_point(bundle: Bundle, good: np.ndarray, defects: np.ndarray) -> None:
    """Print and record the escape rate at the decision threshold (with its counts, and whether it is
    in-sample) and the trade-off table; one loud line when the threshold lets more than half of the known
    defects through."""
    info = bundle.meta.threshold
    chosen = operating_point(good, defects, info.value)
    curve = tradeoff_table(good, defects)
    record_rates(info, chosen)
    info.operating_curve = [dataclasses.asdict(point) for point in curve]
    basis = ("in-sample: the threshold was chosen on these images, so new parts will do worse"
             if info.in_sample else "these images were not used to choose it")
    click.echo(f"on {good.size} good and {defects.size} defective validation images the threshold "
               f"{info.value:.6g} ({info.rule}) rejects {counted(chosen.false_rejects, chosen.good_count)} good "
               f"parts and lets {counted(chosen.escapes, chosen.defect_count)} defects pass ({basis}); the "
               "trade-off on these images:")
    click.echo(format_tradeoff(curve, chosen))
    if chosen.escape_rate > LOUD_ESCAPE_RATE:
        message = (f"WARNING: this threshold lets {100 * chosen.escape_rate:.0f}% of the validation defects "
                   f"PASS ({chosen.escapes} of {defects.size}): see the table above, "
                   f"or pick one with --threshold-rule escape --target-escape RATE")
        log.warning(message)
        click.echo(message, err=True)
