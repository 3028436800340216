"""`edge-inspector replay`: score an image folder offline with a bundle, and evaluate it when labels exist.

This is how an engineer checks a bundle before it goes on the line: the same graph and backend as the
service, the same tiling for tiled bundles, every image accounted for (unreadable files become error rows,
never silent gaps), and when the folder has MVTec AD / VisA layout or a labels CSV, the numbers that
matter: AUROC, AUPRO and the confusion matrix at the bundle's own threshold.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import cv2
import numpy as np

from edge_inspector.backends import BACKEND_KINDS, Backend, create_backend
from edge_inspector.core.bundle import Bundle
from edge_inspector.core.decision import DecisionParams, resolve_review
from edge_inspector.core.errors import DataError, InspectorError
from edge_inspector.core.images import list_images, list_non_images, read_image, read_mask, shown
from edge_inspector.core.inspect import Inspector, Model, bundle_tiler
from edge_inspector.core.progress import progress
from edge_inspector.core.render import overlay_image
from edge_inspector.tools.labels import LabeledImage, discover_labels
from edge_inspector.tools.metrics import EvaluationReport, evaluate

log = logging.getLogger(__name__)

EVAL_MAP_MAX_SIDE = 256  # maps kept for pixel metrics are downsized to this: memory stays bounded


@dataclass
class ReplayRow:
    path: str
    score: float | None
    normalised_score: float | None
    verdict: str  # pass | review | fail | error
    latency_ms: float | None
    error: str = ""


@dataclass
class ReplaySummary:
    rows: list[ReplayRow] = field(default_factory=list)
    report: EvaluationReport | None = None
    skipped_files: int = 0  # files under the folder that are not images (counted, never silently dropped)
    unlisted_images: int = 0  # with --labels: images under the folder that the CSV does not list

    @property
    def counts(self) -> dict[str, int]:
        out = {"pass": 0, "review": 0, "fail": 0, "error": 0}
        for row in self.rows:
            out[row.verdict] += 1
        return out


def _eval_size(shape: tuple[int, ...]) -> tuple[int, int]:
    h, w = shape[:2]
    scale = min(1.0, EVAL_MAP_MAX_SIDE / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def replay_folder(folder: Path, bundle: Bundle, backend: Backend, overlays: Path | None = None,
                  labels_csv: Path | None = None, params: DecisionParams | None = None) -> ReplaySummary:
    """Score every image under folder; evaluate when labels are found. Errors become rows, not exceptions.

    Each image is judged by the same Inspector the service uses (core/inspect.py), on the grid the bundle
    was fit on, with `params` (default: the bundle's threshold, no minimum defect area).
    """
    labelled = discover_labels(folder, labels_csv)
    items: list[LabeledImage] | None = labelled
    paths = [item.path for item in labelled] if labelled is not None else list_images(folder)
    if not paths:
        raise DataError(f"{folder}: no images (png, jpg, bmp, tiff) found")
    params = params or DecisionParams(threshold=bundle.threshold, review_threshold=bundle.review_threshold)
    inspector = Inspector(Model(bundle, backend, bundle_tiler(bundle)), params)
    summary = ReplaySummary(skipped_files=len(list_non_images(folder)))
    if summary.skipped_files:
        log.warning("%s: %d files are not images (png, jpg, jpeg, bmp, tif, tiff) and are skipped", folder,
                    summary.skipped_files)
    if labels_csv is not None:
        summary.unlisted_images = _count_unlisted(folder, paths, labels_csv)
    kept_maps, kept_items, kept_scores = [], [], []
    for index, path in enumerate(progress(paths, desc="replay", unit="img")):
        started = time.perf_counter()
        try:
            image = read_image(path)  # the service's bounded reader: regular files, pixel and size caps
            inspection = inspector.inspect(image)
        except (InspectorError, cv2.error, MemoryError) as err:  # one line for this file; replay goes on
            text = str(err).strip().splitlines()[-1] if isinstance(err, cv2.error) else str(err)
            message = shown(text or f"{path}: {type(err).__name__}")
            log.warning("error row: %s", message)
            summary.rows.append(ReplayRow(str(path), None, None, "error", None, message))
            continue
        latency = (time.perf_counter() - started) * 1000.0
        decision, heatmap = inspection.decision, inspection.heatmap
        summary.rows.append(ReplayRow(str(path), decision.score, decision.normalised_score, decision.verdict,
                                      latency))
        if overlays is not None:
            _write_overlay(overlays, folder, path, overlay_image(image, heatmap, decision.threshold, decision.score,
                                                                decision.verdict, label=_overlay_label(folder, path)))
        if items is not None:
            size = _eval_size(heatmap.shape)
            kept_maps.append(cv2.resize(heatmap, (size[1], size[0]), interpolation=cv2.INTER_AREA))
            kept_items.append(items[index])
            kept_scores.append(decision.score)
    if kept_items:
        summary.report = _evaluate(kept_items, kept_scores, kept_maps, params.threshold, params.review_threshold)
    return summary


def _count_unlisted(folder: Path, listed: list[Path], labels_csv: Path) -> int:
    """Images under the replay folder that the labels CSV does not name: likely a path typo, so say so."""
    named = {path.resolve() for path in listed}
    unlisted = [path for path in list_images(folder) if path.resolve() not in named]
    if unlisted:
        log.warning("%s: %d images under %s are not listed in %s and are not scored (first: %s)", labels_csv,
                    len(unlisted), folder, labels_csv, unlisted[0])
    return len(unlisted)


def _evaluate(items: list[LabeledImage], scores: list[float], maps: list[np.ndarray],
              threshold: float, review_threshold: float | None = None) -> EvaluationReport:
    masks: list[np.ndarray | None] = []
    for item, heatmap in zip(items, maps):
        if item.mask_path is not None:
            masks.append(read_mask(item.mask_path, heatmap.shape))
        elif item.label == 0:
            masks.append(np.zeros(heatmap.shape, bool))
        else:
            masks.append(None)
    has_masks = any(m is not None and m.any() for m in masks)
    return evaluate(np.asarray(scores), np.asarray([i.label for i in items]), threshold,
                    maps=maps if has_masks else None, masks=masks if has_masks else None,
                    defect_types=[i.defect_type for i in items], review_threshold=review_threshold)


def _overlay_label(folder: Path, path: Path) -> str:
    """The file an overlay shows, relative to the replayed folder (`broken_large/000.png`), control characters
    escaped: the banner names the image, so an overlay copied into a report still says what it is."""
    try:
        rel = path.relative_to(folder)
    except ValueError:
        rel = Path(path.name)
    return shown(rel.as_posix())


def _write_overlay(overlays: Path, folder: Path, path: Path, image: np.ndarray) -> None:
    try:
        rel = path.relative_to(folder)
    except ValueError:
        rel = Path(path.name)
    target = overlays / rel.with_suffix(".jpg")
    target.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(target), image)


def write_results(path: Path, rows: list[ReplayRow]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score", "normalised_score", "verdict", "latency_ms", "error"])
        for r in rows:
            writer.writerow([r.path, _num(r.score), _num(r.normalised_score), r.verdict, _num(r.latency_ms, 2),
                             r.error])


def _area(params: DecisionParams) -> str:
    band = f", review over {params.review_threshold:.6g}" if params.review_threshold is not None else ""
    return band + (f", min defect area {params.min_defect_area} px" if params.min_defect_area else "")


def _review_option(text: str | None) -> float | str | None:
    """--review-threshold: a number, `off`, or absent (the bundle's band)."""
    if text is None or text.strip().lower() == "off":
        return None if text is None else "off"
    try:
        return float(text)
    except ValueError:
        raise DataError(f"--review-threshold: expected a number > 0 or off, got {text!r}") from None


def _num(value: float | None, digits: int = 6) -> str:
    return "" if value is None else f"{value:.{digits}g}" if digits > 2 else f"{value:.{digits}f}"


@click.command("replay")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path), help="Model bundle folder.")
@click.option("--out", "results", type=click.Path(path_type=Path), default=None,
              help="Results CSV (default: <folder name>-results.csv in the current folder).")
@click.option("--overlays", type=click.Path(path_type=Path), default=None, help="Write heatmap overlays here.")
@click.option("--labels", "labels_csv", type=click.Path(path_type=Path), default=None,
              help="CSV with path,label[,mask] rows; relative paths resolve against the CSV's own folder; labels "
                   "0/good/ok/pass/normal or 1/defect/defective/ng/fail/anomaly/bad (otherwise the MVTec AD / "
                   "VisA layout is detected).")
@click.option("--metrics", "metrics_file", type=click.Path(path_type=Path), default=None,
              help="Also write the metrics as JSON.")
@click.option("--backend", type=click.Choice(BACKEND_KINDS), default="onnxruntime", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Inference threads (CPU).")
@click.option("--threshold", type=float, default=None,
              help="Decide with this threshold instead of the bundle's (as the line's decision.threshold).")
@click.option("--review-threshold", default=None,
              help="The review band's pass threshold (as the line's decision.review_threshold), or off; default "
                   "the bundle's band, if it has one.")
@click.option("--min-defect-area", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fail only when an over-threshold region exceeds this many pixels (the line's "
                   "decision.min_defect_area): replay then gives the verdicts that line would.")
def replay_command(folder: Path, bundle_dir: Path, results: Path | None, overlays: Path | None,
                   labels_csv: Path | None, metrics_file: Path | None, backend: str, threads: int | None,
                   threshold: float | None, min_defect_area: int, review_threshold: str | None = None) -> None:
    """Score every image under FOLDER with a bundle; evaluate it when labels exist."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    bundle = Bundle.load(bundle_dir)
    value = threshold if threshold is not None else bundle.threshold
    params = DecisionParams(threshold=value, min_defect_area=min_defect_area,
                            review_threshold=resolve_review(_review_option(review_threshold), bundle.review_threshold,
                                                            value, "--review-threshold"))
    runtime = create_backend(bundle, backend, threads=threads)
    summary = replay_folder(folder, bundle, runtime, overlays, labels_csv, params=params)
    results = results or Path(f"{folder.resolve().name}-results.csv")
    write_results(results, summary.rows)
    counts = summary.counts
    skipped = f", {summary.skipped_files} non-image files skipped" if summary.skipped_files else ""
    unlisted = f", {summary.unlisted_images} images not in --labels" if summary.unlisted_images else ""
    reviewed = f", {counts['review']} review" if params.review_threshold is not None else ""
    click.echo(f"{len(summary.rows)} images: {counts['pass']} pass{reviewed}, {counts['fail']} fail, "
               f"{counts['error']} error"
               f"{skipped}{unlisted}  (threshold {params.threshold:.6g}{_area(params)}, model {bundle.model_id})"
               f" -> {results}")
    if overlays is not None:
        click.echo(f"overlays in {overlays}/ at each image's own resolution (banner: verdict, score / threshold, "
                   "file name; white outline: over threshold)")
    if counts["pass"] + counts["review"] + counts["fail"] == 0:
        raise DataError(f"{folder}: none of the {len(summary.rows)} images could be scored; see the error column "
                        f"of {results}")
    if summary.report is not None:
        click.echo(summary.report.format_table())
        if metrics_file is not None:
            metrics_file.parent.mkdir(parents=True, exist_ok=True)
            metrics_file.write_text(json.dumps(summary.report.to_dict(), indent=2))
    elif metrics_file is not None:
        log.warning("no labels found under %s: metrics file not written", folder)
