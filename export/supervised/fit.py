"""`edge-export fit --labelled`: labelled good and defective images train the supervised part of the graph
and set its operating point by cross-validation.

What the fitters hand over (`TrainingInputs`): the good training images' out-of-sample anomaly scores and
classifier inputs (computed from their k-fold maps, so their anomaly statistics look like a new good part's,
not like an image the model was fitted on). The labelled images are scored by the final anomaly model, which
never saw them. All those images together train the classifier; k stratified folds score each one by a
classifier fitted without it, and the threshold comes from those cross-validated combined scores:

- the false-reject target (`--target-frr`) by the conformal rule on the good images' scores (training good
  and labelled good), and
- the escape target (`--target-escape`), when given: the threshold is lowered to it if the false-reject
  threshold lets more than that share of the cross-validated defects pass (then the false-reject target is
  missed, and the report says so).

The printed and recorded rates are those cross-validated ones, with exact 95% intervals and their counts. The
classifier shipped in the graph is then fitted on all images. Fewer than 2 labelled defects train no supervised
part (cross-validation needs one defect out and one in); with none the threshold is today's and the escape
rate is unknown.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from torch import nn

from edge_inspector.core.bundle import LabelledInfo, ThresholdInfo
from edge_inspector.core.errors import DataError
from edge_inspector.core.images import read_image, resize_to
from edge_inspector.core.progress import progress
from edge_inspector.tools.labels import LabeledImage, discover_labels
from export.padim.features import FastEmbedding
from export.supervised.classifier import (
    PENALTY,
    content_groups,
    cross_validated_scores,
    fit_classifier,
    pixel_digest,
    stratified_folds,
)
from export.supervised.intervals import clopper_pearson, format_rate
from export.supervised.model import CombinedModel, SupervisedHead, SupervisedInputs, anomaly_parts
from export.threshold import conformal_threshold, threshold_for_escape, tradeoff_table

log = logging.getLogger(__name__)

MIN_DEFECTS = 2  # cross-validation needs a defect held out and one to train on


@dataclass
class LabelledSet:
    """Where the labelled images are (a MVTec AD / VisA folder, or a `path,label[,mask]` CSV) and the targets."""

    folder: Path | None = None
    csv: Path | None = None
    target_escape: float | None = None
    folds: int = 5

    def items(self) -> list[LabeledImage]:
        if self.folder is None and self.csv is None:
            raise DataError("--labelled FOLDER or --labelled-csv FILE is needed")
        folder = self.folder if self.folder is not None else Path(str(self.csv)).parent
        found = discover_labels(folder, self.csv)
        if not found:
            raise DataError(f"{self.csv or self.folder}: no labelled images found (expected MVTec AD / VisA "
                            "layout, or a CSV of path,label[,mask])")
        return found

    @property
    def source(self) -> str:
        return str(Path(self.csv if self.csv is not None else self.folder).resolve())  # type: ignore[arg-type]


@dataclass
class TrainingInputs:
    """The good training images' out-of-sample anomaly scores (n,) and classifier inputs (n, F)."""

    scores: np.ndarray
    inputs: np.ndarray


class InputCollector:
    """Collects the good training images' classifier inputs while the fitter scores them out of sample: pass it
    as the k-fold scoring's sink (frames, embedding (n, P, D), low-resolution maps (n, 1, h, w))."""

    def __init__(self, frames: int, grid: tuple[int, int]):
        self.inputs: np.ndarray | None = None
        self.seen = np.zeros(frames, dtype=bool)
        self.make = SupervisedInputs(int(grid[0]) * int(grid[1]))

    @torch.no_grad()
    def __call__(self, frames: list[int], emb: torch.Tensor, low: torch.Tensor) -> None:
        values = self.make(emb.float(), low.float()).numpy().astype(np.float64)
        if self.inputs is None:
            self.inputs = np.zeros((self.seen.size, values.shape[1]))
        self.inputs[frames] = values
        self.seen[frames] = True

    def result(self, scores: np.ndarray) -> TrainingInputs:
        if self.inputs is None or not self.seen.all() or not np.isfinite(scores).all():
            raise DataError("--labelled needs out-of-sample scores of every good training image (at least 2 "
                            "images and 2 folds)")
        return TrainingInputs(np.asarray(scores, dtype=np.float64), self.inputs)


def supervised_collector(frames: int, grid: tuple[int, int]) -> InputCollector:
    return InputCollector(frames, grid)


def check_untiled(tiles: int, roi: object, tile_size: object) -> None:
    """The supervised part scores whole frames; tiled bundles are not supported yet (one line says so)."""
    if tiles != 1 or roi is not None or tile_size is not None:
        raise DataError("--labelled works on whole frames for now: leave out --rows/--cols/--tile-size/--roi")


@dataclass
class Scored:
    """Labelled images scored by the final anomaly model."""

    items: list[LabeledImage]
    scores: np.ndarray
    inputs: np.ndarray
    digests: list[str]


@torch.no_grad()
def score_labelled(model: Any, items: list[LabeledImage], input_size: tuple[int, int],
                   batch_size: int) -> Scored:
    """Anomaly score and classifier inputs of each readable labelled image (resized as the service does);
    an unreadable file is logged and left out."""
    embedding = FastEmbedding(model.features, input_size)
    make_inputs = None
    kept: list[LabeledImage] = []
    scores: list[np.ndarray] = []
    inputs: list[np.ndarray] = []
    digests: list[str] = []
    for start in progress(range(0, len(items), batch_size), desc="fit: labelled images", unit="batch", leave=False):
        batch, chunk = [], []
        for item in items[start:start + batch_size]:
            try:
                image = resize_to(read_image(item.path), input_size)
            except (DataError, OSError) as err:
                log.warning("%s: left out of the labelled images (%s)", item.path, err)
                continue
            batch.append(image)
            chunk.append(item)
        if not batch:
            continue
        emb = embedding(np.stack(batch))
        low = anomaly_parts(model, emb)
        make_inputs = make_inputs or SupervisedInputs(int(emb.shape[1]))
        scores.append(model.head(low)[1].numpy())
        inputs.append(make_inputs(emb, low).numpy())
        digests.extend(pixel_digest(image) for image in batch)
        kept.extend(chunk)
    if not kept:
        raise DataError("none of the labelled images could be read")
    return Scored(kept, np.concatenate(scores).astype(np.float64), np.concatenate(inputs).astype(np.float64),
                  digests)


@dataclass
class Attached:
    """What the fitter ships: the graph's module, the threshold and the labelled section of bundle.yaml, and the
    cross-validated good scores (the bundle's score_stats)."""

    model: nn.Module
    threshold: ThresholdInfo
    info: LabelledInfo
    good_scores: np.ndarray


def attach_supervised(model: nn.Module, training: TrainingInputs, labelled: LabelledSet, input_size: tuple[int, int],
                      target_frr: float, seed: int, batch_size: int, threshold: ThresholdInfo) -> Attached:
    """Score the labelled images, train and cross-validate the supervised part, set the operating point."""
    scored = score_labelled(model, labelled.items(), input_size, batch_size)
    labels = np.array([0] * training.scores.size + [item.label for item in scored.items], dtype=np.int64)
    anomaly = np.concatenate([training.scores, scored.scores])
    inputs = np.concatenate([training.inputs, scored.inputs])
    groups = content_groups([f"train:{i}" for i in range(training.scores.size)] + scored.digests)
    defects = int(labels.sum())
    centre, spread = float(training.scores.mean()), max(float(training.scores.std()), 1e-6)
    if defects == 0:
        return _good_only(model, scored, threshold, labelled)
    folds = max(2, min(labelled.folds, defects))
    fold_of = stratified_folds(labels, groups, folds, seed)
    supervised = defects >= MIN_DEFECTS
    cv = cross_validated_scores(inputs, labels, anomaly, fold_of, centre, spread) if supervised else anomaly
    final_model = model
    if supervised:
        final = fit_classifier(inputs, labels)
        weight, bias = final.folded(centre, spread)
        head = SupervisedHead(torch.from_numpy(weight), bias)
        final_model = CombinedModel(model, head, _positions(model, input_size)).eval()
    chosen = _operating_point(cv, labels, target_frr, labelled.target_escape)
    alone = _operating_point(anomaly, labels, target_frr, labelled.target_escape)
    info = _record(chosen, cv, labels, scored, labelled, folds, supervised, training.scores.size, alone, anomaly)
    _report(info, chosen)
    return Attached(final_model, chosen, info, cv[labels == 0])


def _positions(model: Any, input_size: tuple[int, int]) -> int:
    stride = int(model.features.grid_stride)
    return (input_size[0] // stride) * (input_size[1] // stride)


def _operating_point(scores: np.ndarray, labels: np.ndarray, target_frr: float, target_escape: float | None
                     ) -> ThresholdInfo:
    """Conformal false-reject threshold on the good scores, lowered to meet the escape target when it must be."""
    good, bad = scores[labels == 0], scores[labels == 1]
    info = conformal_threshold(good, target_frr)
    info.rule = "cross_validated_false_reject_rate"
    info.note = ("cross-validated: " + info.note.replace("out-of-sample good scores", "cross-validated good "
                                                         "scores (training and labelled good images)"))
    if target_escape is not None and bad.size:
        info.target_escape_rate = float(target_escape)
        lower = threshold_for_escape(bad, target_escape)
        if lower < info.value:
            info.value = max(float(lower), float(np.finfo(np.float32).tiny))
            info.rule = "cross_validated_escape_rate"
            info.certified = False
            info.note += (f"; lowered to let <= {target_escape:g} of the {bad.size} cross-validated defects pass, "
                          f"so the false-reject target {target_frr:g} is NOT met")
    info.validation_false_reject_rate = float(np.count_nonzero(good > info.value)) / max(1, good.size)
    info.validation_escape_rate = (float(np.count_nonzero(bad <= info.value)) / bad.size) if bad.size else None
    if bad.size:
        info.operating_curve = [dataclasses.asdict(p) for p in tradeoff_table(good, bad)]
    return info


def _record(chosen: ThresholdInfo, cv: np.ndarray, labels: np.ndarray, scored: Scored, labelled: LabelledSet,
            folds: int, supervised: bool, training_count: int, alone: ThresholdInfo, anomaly: np.ndarray
            ) -> LabelledInfo:
    good, bad = cv[labels == 0], cv[labels == 1]
    rejects, escapes = int(np.count_nonzero(good > chosen.value)), int(np.count_nonzero(bad <= chosen.value))
    types = [item.defect_type for item in scored.items if item.label == 1]
    passed = bad <= chosen.value
    frr_low, frr_high = clopper_pearson(rejects, good.size)
    esc_low, esc_high = clopper_pearson(escapes, bad.size)
    alone_escapes = int(np.count_nonzero(anomaly[labels == 1] <= alone.value))
    return LabelledInfo(
        source=labelled.source, supervised=supervised, folds=folds, penalty=PENALTY,
        training_good_images=training_count, labelled_good_images=int(sum(1 for i in scored.items if i.label == 0)),
        labelled_defect_images=int(bad.size),
        cv_good_images=int(good.size), cv_false_rejects=rejects, cv_false_reject_rate=rejects / max(1, good.size),
        cv_false_reject_ci=[frr_low, frr_high],
        cv_defect_images=int(bad.size), cv_escapes=escapes, cv_escape_rate=escapes / max(1, bad.size),
        cv_escape_ci=[esc_low, esc_high],
        defect_types=dict(Counter(types)),
        escapes_by_type=dict(Counter(t for t, p in zip(types, passed) if p)),
        anomaly_only_threshold=float(alone.value), anomaly_only_escapes=alone_escapes,
        anomaly_only_false_rejects=int(np.count_nonzero(anomaly[labels == 0] > alone.value)))


def _report(info: LabelledInfo, chosen: ThresholdInfo) -> None:
    part = "anomaly + supervised" if info.supervised else "anomaly score only (fewer than 2 labelled defects)"
    click.echo(f"labelled images: {info.labelled_good_images} good, {info.labelled_defect_images} defective "
               f"({', '.join(f'{k} {v}' for k, v in sorted(info.defect_types.items()))}); "
               f"{info.training_good_images} training good images scored out of sample; {info.folds} folds")
    click.echo(f"cross-validated at threshold {chosen.value:.6g} ({part}):")
    click.echo(f"  false rejects {format_rate(info.cv_false_rejects, info.cv_good_images)}")
    click.echo(f"  escapes       {format_rate(info.cv_escapes, info.cv_defect_images)}")
    if info.supervised and info.anomaly_only_false_rejects is not None and info.anomaly_only_escapes is not None:
        click.echo(f"  the anomaly score alone, same images and rule: false rejects "
                   f"{format_rate(info.anomaly_only_false_rejects, info.cv_good_images)}, escapes "
                   f"{format_rate(info.anomaly_only_escapes, info.cv_defect_images)}")
    if info.escapes_by_type:
        click.echo("  escapes by defect type: " + ", ".join(
            f"{k} {v} of {info.defect_types[k]}" for k, v in sorted(info.escapes_by_type.items())))


def _good_only(model: nn.Module, scored: Scored, threshold: ThresholdInfo, labelled: LabelledSet) -> Attached:
    """No labelled defects: today's model and threshold; the labelled good images say what it rejects."""
    good = scored.scores
    rejects = int(np.count_nonzero(good > threshold.value))
    low, high = clopper_pearson(rejects, good.size)
    threshold.validation_false_reject_rate = rejects / max(1, good.size)
    info = LabelledInfo(source=labelled.source, supervised=False, folds=0, penalty=PENALTY, training_good_images=0,
                        labelled_good_images=int(good.size), labelled_defect_images=0, cv_good_images=int(good.size),
                        cv_false_rejects=rejects, cv_false_reject_rate=rejects / max(1, good.size),
                        cv_false_reject_ci=[low, high], cv_defect_images=0, cv_escapes=0, cv_escape_rate=None,
                        cv_escape_ci=None, note="no labelled defects: the escape rate is unknown")
    click.echo(f"labelled images: {good.size} good, no defects: the threshold is set from good parts alone and "
               f"the ESCAPE RATE IS UNKNOWN; false rejects on the labelled good images "
               f"{format_rate(rejects, int(good.size))}")
    return Attached(model, threshold, info, np.array([]))
