"""Threshold from labelled defect images: the F1-optimal operating point, recorded beside the conformal one.

Runs the exported bundle itself (ONNX Runtime, same tiling as the service), so the F1 threshold is measured
on exactly what the device will compute, for any model kind.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_inspector.backends import create_backend
from edge_inspector.bundle import Bundle, write_meta
from edge_inspector.errors import DataError
from edge_inspector.evaluate import discover_labels
from edge_inspector.replay import replay_folder

from .threshold import apply_f1_rule

log = logging.getLogger(__name__)


def calibrate_with_defects(bundle: Bundle, folder: Path, labels_csv: Path | None = None,
                           use_f1: bool = False) -> Bundle:
    """Score a labelled folder (good and defective), record the F1-optimal threshold, optionally adopt it."""
    if discover_labels(folder, labels_csv) is None:
        raise DataError(f"{folder}: no labels found (expected MVTec AD / VisA layout or a labels CSV)")
    summary = replay_folder(folder, bundle, create_backend(bundle, "onnxruntime"), labels_csv=labels_csv)
    report = summary.report
    if report is None or report.num_good == 0 or report.num_defective == 0:
        raise DataError(f"{folder}: the F1-optimal threshold needs both good and defective labelled images")
    log.info("validation on %d labelled images: image AUROC %s, F1-optimal threshold %.6g (F1 %.3f)",
             report.num_images, report.image_auroc, report.f1_optimal_threshold, report.f1_optimal.f1)
    apply_f1_rule(bundle.meta.threshold, report.f1_optimal_threshold, use_f1)
    write_meta(bundle.path, bundle.meta)
    return Bundle.load(bundle.path)
