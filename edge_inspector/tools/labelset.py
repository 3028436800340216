"""`edge-inspector labels export ARCHIVE_DIR OUT_DIR`: the operators' labels as a data set the workstation reads.

The output is the MVTec AD layout that tools/labels.py (and so `replay` and `edge-export fit --validation`)
already recognise, plus a labels CSV for `--labels`, plus a manifest of how each part was judged:

    OUT/test/good/<stem>.png              parts labelled good (false rejects among them, or sampled passes)
    OUT/test/<defect type>/<stem>.png     parts labelled defect ("defect" when no type was given)
    OUT/ground_truth/<type>/<stem>_mask.png   the operator's box as a mask, when one was drawn
    OUT/labels.csv                        path,label,mask,defect_type (paths relative to OUT)
    OUT/manifest.json                     per part: bundle id and sha256, threshold, score, verdict, label, who, when

Why the manifest: scores from another model id are not comparable with a new bundle's, so the fit must be
able to tell which model judged each part (it may still use the images). After a successful export the
journal gets an `exported` record, and the archive may evict those parts again.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import click
import cv2
import numpy as np

from edge_inspector.core.atomic import write_atomic
from edge_inspector.core.errors import DataError
from edge_inspector.core.labelstore import DEFECT_TYPE, STEM, LabelBook

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg")
EXPORTED_IDS_PER_RECORD = 1000  # keeps each journal line far under core/labelstore.MAX_RECORD_BYTES


def archived_image(archive: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = archive / (stem + suffix)
        if path.is_file():
            return path
    return None


def read_header(archive: Path, stem: str) -> dict[str, Any]:
    try:
        header = json.loads((archive / f"{stem}.json").read_text())
    except (OSError, ValueError):
        return {}
    return header if isinstance(header, dict) else {}


def box_mask(shape: tuple[int, int], box: list[int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    x, y, w, h = box
    mask[max(0, y):y + h, max(0, x):x + w] = 255
    return mask


def export_labels(archive: Path, out: Path, mark_exported: bool = True) -> dict[str, Any]:
    """Write OUT (see the module docstring); returns the manifest. DataError when there is nothing to export."""
    archive, out = Path(archive), Path(out)
    if not archive.is_dir():
        raise DataError(f"{archive}: not an archive folder")
    book = LabelBook(archive)
    labelled = book.state().labelled()
    if not labelled:
        raise DataError(f"{book.path}: no labels to export (label parts in the live view first)")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not empty (export into a new folder)")
    rows: list[list[str]] = []
    parts: list[dict[str, Any]] = []
    missing: list[str] = []
    for stem, label in sorted(labelled.items()):
        image = archived_image(archive, stem) if STEM.match(stem) else None
        if image is None:
            missing.append(stem)
            continue
        parts.append(_export_one(archive, out, stem, label, image, rows))
    if not parts:
        raise DataError(f"{archive}: none of the {len(labelled)} labelled parts has its image any more")
    if missing:
        log.warning("%s: %d labelled parts have no image in the archive and are left out (first: %s)", archive,
                    len(missing), ", ".join(missing[:3]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "mask", "defect_type"])
    writer.writerows(rows)
    write_atomic(out / "labels.csv", buffer.getvalue())
    models = Counter(str(p["model_id"]) for p in parts)
    if len(models) > 1:
        log.warning("labels come from %d model ids (%s): their scores and thresholds are not comparable; the "
                    "images are", len(models), ", ".join(f"{m} x{n}" for m, n in models.most_common()))
    manifest = {"format": "edge-inspector labels 1", "archive": str(archive.resolve()), "parts": parts,
                "counts": dict(Counter(p["defect_type"] or p["label"] for p in parts)), "models": dict(models),
                "missing": missing}
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    if mark_exported:
        ids = [p["label_id"] for p in parts]
        for start in range(0, len(ids), EXPORTED_IDS_PER_RECORD):
            book.exported(ids[start:start + EXPORTED_IDS_PER_RECORD], str(out.resolve()), {"tool": "labels export"})
    return manifest


def _export_one(archive: Path, out: Path, stem: str, label: dict[str, Any], image: Path,
                rows: list[list[str]]) -> dict[str, Any]:
    header = read_header(archive, stem)
    defect = label.get("label") == "defect"
    kind = str(label.get("defect_type") or "defect") if defect else "good"
    if defect and (kind == "good" or not DEFECT_TYPE.match(kind)):  # a hand-edited journal: never a path
        kind = "defect"
    target = out / "test" / kind / image.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, target)
    mask_rel = ""
    box = label.get("box")
    if defect and box:
        frame = cv2.imread(str(target), cv2.IMREAD_UNCHANGED)
        if frame is not None:
            mask_path = out / "ground_truth" / kind / f"{image.stem}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(mask_path), box_mask(frame.shape[:2], box))
            mask_rel = mask_path.relative_to(out).as_posix()
    rel = target.relative_to(out).as_posix()
    rows.append([rel, "defect" if defect else "good", mask_rel, kind])
    model: dict[str, Any] = header["model"] if isinstance(header.get("model"), dict) else {}
    return {"path": rel, "stem": stem, "label": label.get("label"), "defect_type": kind if defect else None,
            "box": box, "mask": mask_rel or None, "label_id": label.get("id"), "labelled_by": label.get("by"),
            "labelled_at": label.get("time_iso"), "verdict": header.get("verdict"), "score": header.get("score"),
            "threshold": header.get("threshold"), "model_id": model.get("id"), "model_sha256": model.get("sha256"),
            "archived": header.get("archived")}


def judged_by(folder: Path) -> dict[str, int] | None:
    """Model id -> parts, from an export's manifest.json; None when `folder` is not an export (or unreadable)."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != "edge-inspector labels 1":
        return None
    models = manifest.get("models")
    return {str(k): int(v) for k, v in models.items() if isinstance(v, int)} if isinstance(models, dict) else None


@click.group("labels")
def labels_group() -> None:
    """The operators' labels of archived parts (written by the live view's labelling)."""


@labels_group.command("export")
@click.argument("archive_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--keep-protected", is_flag=True,
              help="Do not mark the parts exported: the archive keeps protecting them from eviction.")
def export_command(archive_dir: Path, out_dir: Path, keep_protected: bool) -> None:
    """Write the labelled parts of ARCHIVE_DIR as an MVTec-style folder with labels.csv and manifest.json."""
    manifest = export_labels(archive_dir, out_dir, mark_exported=not keep_protected)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(manifest["counts"].items()))
    click.echo(f"exported {len(manifest['parts'])} labelled parts to {out_dir} ({counts}); "
               f"replay with: edge-inspector replay {out_dir} --labels {out_dir / 'labels.csv'} --bundle BUNDLE")
