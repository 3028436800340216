"""Ground truth on disk: MVTec AD and VisA layouts, or a labels CSV, turned into labelled images.

Every way a label can be wrong is one line naming the file and the row (an unknown word, a missing image,
a mask of another size); VisA's class-index masks (1..7) count as defects; a VisA category folder keeps
only the test images its split_csv lists.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_inspector.core.errors import DataError
from edge_inspector.core.images import IMAGE_EXTENSIONS, list_images

log = logging.getLogger(__name__)

GOOD = "good"
GOOD_WORDS = frozenset({"0", "good", "ok", "pass", "normal"})
DEFECT_WORDS = frozenset({"1", "defect", "defective", "ng", "fail", "anomaly", "bad"})
LABEL_WORDS_HELP = (f"{'/'.join(sorted(GOOD_WORDS))} (good) or {'/'.join(sorted(DEFECT_WORDS))} (defective), "
                    "any case")


# --------------------------------------------------------------------------------------------------
# Labels on disk
# --------------------------------------------------------------------------------------------------

@dataclass
class LabeledImage:
    """One test image with its ground truth, as found on disk."""

    path: Path
    label: int  # 0 good, 1 defective
    defect_type: str  # "good" or the defect folder name
    mask_path: Path | None  # ground-truth mask; None for good images or when absent


def discover_labels(folder: Path, labels_csv: Path | None = None) -> list[LabeledImage] | None:
    """Ground truth for the images of a replay folder, or None when it carries no labels we recognise.

    A labels CSV wins when given; otherwise the MVTec AD layout (category or its `test` folder) and the
    VisA layout (category or its `Data` folder) are recognised, because those are what benchmark users and
    most factory datasets derived from them look like. None lets replay still score an unlabelled folder.
    """
    folder = Path(folder)
    if labels_csv is not None:
        return read_labels_csv(Path(labels_csv))
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    for finder in (_find_mvtec, _find_visa):
        found = finder(folder)
        if found is not None:
            if not found:
                raise DataError(f"{folder}: labelled layout recognised but it holds no images")
            return found
    return None


def _find_mvtec(folder: Path) -> list[LabeledImage] | None:
    """MVTec AD: test/<defect>/<name>.png with masks in ground_truth/<defect>/<name>_mask.png."""
    if (folder / "test").is_dir():
        test_dir = folder / "test"
    elif (folder / GOOD).is_dir():
        test_dir = folder
    else:
        return None
    truth_dir = test_dir.parent / "ground_truth"
    items: list[LabeledImage] = []
    for sub in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        label = 0 if sub.name == GOOD else 1
        for path in list_images(sub, recursive=False):
            mask = _find_file(truth_dir / sub.name, (f"{path.stem}_mask", path.stem)) if label else None
            items.append(LabeledImage(path, label, sub.name, mask))
    return items


def _find_visa(folder: Path) -> list[LabeledImage] | None:
    """VisA: Data/Images/{Normal,Anomaly}/*.JPG with masks in Data/Masks/Anomaly/<stem>.png."""
    data_dir = folder / "Data" if (folder / "Data" / "Images").is_dir() else folder
    images_dir = data_dir / "Images"
    if not ((images_dir / "Normal").is_dir() or (images_dir / "Anomaly").is_dir()):
        return None
    items: list[LabeledImage] = []
    for sub_name, label, defect_type in (("Normal", 0, GOOD), ("Anomaly", 1, "anomaly")):
        sub = images_dir / sub_name
        if not sub.is_dir():
            continue
        for path in list_images(sub, recursive=False):
            mask = _find_file(data_dir / "Masks" / "Anomaly", (path.stem,)) if label else None
            items.append(LabeledImage(path, label, defect_type, mask))
    return _visa_test_split(data_dir.parent, items)


def _visa_test_split(category: Path, items: list[LabeledImage]) -> list[LabeledImage]:
    """Keep VisA's test images only. A VisA category's Images/Normal holds the training images too; the
    split lives in `split_csv/1cls.csv` beside the categories. Counting training images as test images
    inflates every metric, so without that file we say so loudly."""
    split_csv = category.parent / "split_csv" / "1cls.csv"
    if not split_csv.is_file():
        log.warning("%s: VisA layout without %s: every image under Data/Images is counted as a test image, "
                    "including any the bundle was trained on", category, split_csv)
        return items
    test: set[Path] = set()
    with open(split_csv, newline="", encoding="utf-8-sig") as handle:
        for row in csv.DictReader(handle):
            if row.get("object") == category.name and row.get("split", "").strip().lower() == "test":
                test.add((category.parent / row.get("image", "")).resolve())
    kept = [item for item in items if item.path.resolve() in test]
    log.info("%s: VisA split %s keeps %d test images of %d", category, split_csv, len(kept), len(items))
    return kept


def _find_file(folder: Path, stems: Sequence[str]) -> Path | None:
    """First existing image file named <stem><ext> for the given stems (masks come as .png, sometimes not)."""
    if not folder.is_dir():
        return None
    for stem in stems:
        for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
            candidate = folder / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
    return None


def parse_label(text: str) -> int | None:
    """0/1 from the words people write in label columns; None when it is none of them."""
    word = text.strip().lower()
    if word in GOOD_WORDS:
        return 0
    if word in DEFECT_WORDS:
        return 1
    return None


def read_labels_csv(csv_path: Path) -> list[LabeledImage]:
    """Read `path,label[,mask[,defect_type]]` rows; paths are relative to the CSV's folder or absolute.

    A header row is optional (recognised by a first cell `path`); with a header the columns may come in any
    order. Every row is checked now, so a typo fails before minutes of inference rather than after.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: labels CSV not found")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        rows = [(number, row) for number, row in enumerate(csv.reader(handle), start=1)
                if row and any(cell.strip() for cell in row) and not row[0].lstrip().startswith("#")]
    columns = {"path": 0, "label": 1, "mask": 2, "defect_type": 3}
    if rows and "path" in (cell.strip().lower() for cell in rows[0][1]):
        header = [cell.strip().lower() for cell in rows[0][1]]
        if "label" not in header:
            raise DataError(f"{csv_path}:{rows[0][0]}: header has no 'label' column (expected path,label[,mask])")
        columns = {name: header.index(name) for name in columns if name in header}
        rows = rows[1:]
    listed = [_labels_csv_row(csv_path, number, row, columns) for number, row in rows]
    if not listed:
        raise DataError(f"{csv_path}: labels CSV has no rows (expected path,label[,mask])")
    items = [item for item in listed if item.path.is_file()]
    missing = [item.path for item in listed if not item.path.is_file()]
    log.info("%s: %d labelled images; relative paths resolve against the CSV's folder %s", csv_path, len(listed),
             csv_path.parent.resolve())
    if missing:
        log.warning("%s: %d listed images not found, left out of the evaluation (first: %s)", csv_path,
                    len(missing), ", ".join(str(p) for p in missing[:3]))
    if not items:
        raise DataError(f"{csv_path}: none of the {len(listed)} listed images exist (relative paths resolve "
                        f"against {csv_path.parent.resolve()})")
    return items


def _labels_csv_row(csv_path: Path, number: int, row: list[str], columns: dict[str, int]) -> LabeledImage:
    where = f"{csv_path}:{number}"

    def cell(name: str) -> str:
        index = columns.get(name)
        return row[index].strip() if index is not None and index < len(row) else ""

    if not cell("path") or not cell("label"):
        raise DataError(f"{where}: expected 'path,label[,mask]', got {','.join(row)!r}")
    label = parse_label(cell("label"))
    if label is None:
        raise DataError(f"{where}: label {cell('label')!r} is not one of {LABEL_WORDS_HELP}")
    path = _resolve(csv_path.parent, cell("path"))
    mask = _resolve(csv_path.parent, cell("mask")) if cell("mask") else None
    if mask is not None and not mask.is_file():
        raise DataError(f"{where}: mask {mask} does not exist")
    defect_type = cell("defect_type") or (GOOD if label == 0 else "defect")
    return LabeledImage(path, label, defect_type, mask)


def _resolve(base: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path
