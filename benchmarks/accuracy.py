"""The accuracy yardstick: fit every model kind on every category and replay its test set (run on demand).

    nice python benchmarks/accuracy.py                       # all categories under ../shared/data, all kinds
    python benchmarks/accuracy.py --categories fryum --kinds patchcore --set bank_fraction=0.02

For each (category, kind): the fit runs in a fresh process (so its peak RSS is its own), the bundle is
replayed over the category's test set with the product's own code (`edge_inspector.tools.replay.replay_folder`,
ONNX Runtime, 2 threads), and one table row is printed: image AUROC, pixel AUROC, AUPRO@0.3, false-reject
and escape rates at the bundle's own threshold, the escape rate at the thresholds that give 1% and 5% false
rejects on the test's good images, fit time, peak RSS of the fit, and ms per image at batch 1 (bare ONNX
Runtime session, 2 threads, median of 30). Every change is judged on the whole table, not one number.
Asserts nothing; `--json FILE` keeps the rows.

    nice python benchmarks/accuracy.py --labelled-half --kinds patchcore --labelled-counts all,10,25

`--labelled-half` (issue 31): each category's test images are split in two halves by a fixed hash of their
path (sha1 of `test/<type>/<name>`, even = calibration, odd = judged; good and defective images alike). The
bundle is fitted on train/good as always, once without labels and once per `--labelled-counts` entry with the
calibration half's good images and that many of its defects (the first by the same hash; `all` = every one)
given to `edge-export fit --labelled`. Every row is judged on the judged half only, at the bundle's own
threshold (nothing is placed on the judged half); the cross-validated rates the fit printed are shown beside.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data"
KINDS = ("padim", "patchcore", "ae")


@dataclass
class Row:
    category: str
    kind: str
    settings: str
    image_auroc: float | None = None
    pixel_auroc: float | None = None
    aupro: float | None = None
    false_reject: float | None = None  # at the bundle threshold
    escape: float | None = None  # at the bundle threshold
    escape_at_frr1: float | None = None
    escape_at_frr5: float | None = None
    certified: bool | None = None
    fit_s: float | None = None
    peak_rss_mb: float | None = None
    ms_per_image: float | None = None
    error: str = ""
    labelled: str = ""  # --labelled-half: "none" or how many calibration-half defects were labelled
    judged: str = ""  # --labelled-half: the judged half's counts ("good 10, defective 24")
    false_rejects: int | None = None  # counts behind false_reject / escape (judged half)
    escapes: int | None = None
    cv_false_reject: float | None = None  # what the fit's cross-validation said (bundle.yaml labelled:)
    cv_escape: float | None = None


def find_categories(data: Path) -> dict[str, Path]:
    """category name -> folder holding train/good and test/ (MVTec layout, as ../shared/data keeps them)."""
    found = {}
    for train in sorted(data.glob("*/*/train/good")):
        category = train.parent.parent
        found[category.name] = category
    return found


def _parse_value(text: str) -> Any:
    if "," in text:  # layers=expand3,expand5,expand8 -> a tuple
        return tuple(_parse_value(part) for part in text.split(",") if part)
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def _fit_job(kind: str, train: str, out: str, settings: dict[str, Any], threads: int,
             labelled_csv: str | None = None, target_escape: float | None = None) -> dict[str, float]:
    """Runs in a fresh process: fit one bundle; report wall time and this process's peak RSS."""
    import torch

    from export.supervised.fit import LabelledSet

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="  %(name)s: %(message)s")
    started = time.perf_counter()
    labelled = None if labelled_csv is None else LabelledSet(csv=Path(labelled_csv), target_escape=target_escape)
    if kind == "padim":
        from export.padim.fit import PadimOptions, fit_padim

        fit_padim(train, out, PadimOptions(**settings), labelled=labelled)
    elif kind == "patchcore":
        from export.patchcore import PatchcoreOptions, fit_patchcore

        fit_patchcore(train, out, PatchcoreOptions(**settings), labelled=labelled)
    elif kind == "ae":
        if labelled is not None:
            raise ValueError("--labelled-half: the autoencoder kind has no supervised part yet")
        from export.autoencoder.config import TrainConfig
        from export.autoencoder.training import train_autoencoder

        train_autoencoder(TrainConfig(train_folder=Path(train), **settings), "ae", out)
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - started
    return {"fit_s": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def fit_in_child(kind: str, train: Path, out: Path, settings: dict[str, Any], threads: int,
                 labelled_csv: Path | None = None, target_escape: float | None = None) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_fit_job, (kind, str(train), str(out), settings, threads,
                                     None if labelled_csv is None else str(labelled_csv), target_escape))


def half_of(category: Path, path: Path) -> int:
    """0 (calibration) or 1 (judged): sha1 of the image's path under the category, even or odd."""
    name = path.resolve().relative_to(category.resolve()).as_posix()
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 2


def split_halves(category: Path) -> tuple[list, list]:
    """The category's labelled test images split by `half_of`: (calibration, judged), each in hash order."""
    from edge_inspector.tools.labels import discover_labels

    items = discover_labels(category)
    if items is None:
        raise RuntimeError(f"{category}: no labelled test images found")
    def digest(item: Any) -> str:
        return hashlib.sha1(item.path.resolve().relative_to(category.resolve()).as_posix().encode()).hexdigest()

    ordered = sorted(items, key=digest)
    halves = [half_of(category, item.path) for item in ordered]
    return ([i for i, h in zip(ordered, halves) if h == 0], [i for i, h in zip(ordered, halves) if h == 1])


def labelled_subset(items: list, defects: int | None) -> list:
    """Every good image of the half and its first `defects` defective ones (None: all)."""
    bad = [i for i in items if i.label == 1]
    return [i for i in items if i.label == 0] + (bad if defects is None else bad[:defects])


def write_labels_csv(items: list, path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "mask", "defect_type"])
        for item in items:
            writer.writerow([str(item.path.resolve()), item.label, "" if item.mask_path is None
                             else str(item.mask_path.resolve()), item.defect_type])
    return path


def latency_ms(bundle, image: np.ndarray, threads: int, repeat: int = 30) -> float:
    """Median ms of one batch-1 inference of the bundle's graph (ONNX Runtime, `threads` intra-op threads);
    for per-tile bundles, of one frame's tiles."""
    import onnxruntime as ort

    from edge_inspector.core.images import resize_to

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(bundle.onnx_path), options, providers=["CPUExecutionProvider"])
    # Per-tile statistics need a whole frame's tiles in one batch (N a multiple of K): time one frame then.
    tiling = bundle.meta.tiling
    tiles = tiling.rows * tiling.cols if tiling.mode == "per_tile" else 1
    batch = np.repeat(resize_to(image, bundle.input_size)[None], tiles, axis=0)
    session.run(None, {"image": batch})
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        session.run(None, {"image": batch})
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def evaluate_bundle(row: Row, category: Path, bundle_dir: Path, threads: int, labels_csv: Path | None = None) -> None:
    """Replay the test set (or the images `labels_csv` lists) with the product's replay code and fill the
    accuracy columns."""
    from edge_inspector.backends import create_backend
    from edge_inspector.core.bundle import Bundle
    from edge_inspector.core.images import read_image
    from edge_inspector.tools.labels import discover_labels
    from edge_inspector.tools.replay import replay_folder
    from export.threshold import operating_point, threshold_for_false_reject

    bundle = Bundle.load(bundle_dir)
    summary = replay_folder(category, bundle, create_backend(bundle, "onnxruntime", threads=threads),
                            labels_csv=labels_csv)
    report = summary.report
    items = discover_labels(category, labels_csv)
    if report is None or items is None:
        raise RuntimeError(f"{category}: no labelled test images found")
    labels = {str(item.path): item.label for item in items}
    scored = [(r.score, labels[r.path]) for r in summary.rows if r.score is not None]
    good = np.array([s for s, y in scored if y == 0])
    bad = np.array([s for s, y in scored if y == 1])
    row.image_auroc, row.pixel_auroc, row.aupro = report.image_auroc, report.pixel_auroc, report.aupro
    row.false_reject, row.escape = report.confusion.false_reject_rate, report.confusion.escape_rate
    row.escape_at_frr1 = operating_point(good, bad, threshold_for_false_reject(good, 0.01)).escape_rate
    row.escape_at_frr5 = operating_point(good, bad, threshold_for_false_reject(good, 0.05)).escape_rate
    row.certified = bool(bundle.meta.threshold.certified)
    row.false_rejects, row.escapes = int(np.count_nonzero(good > bundle.threshold)), int(np.count_nonzero(
        bad <= bundle.threshold))
    row.judged = f"good {good.size}, defective {bad.size}"
    if bundle.meta.labelled is not None:
        row.cv_false_reject = bundle.meta.labelled.cv_false_reject_rate
        row.cv_escape = bundle.meta.labelled.cv_escape_rate
    row.ms_per_image = latency_ms(bundle, read_image(Path(summary.rows[0].path)), threads)


def default_settings(kind: str, epochs: int | None) -> dict[str, Any]:
    if kind == "ae" and epochs is not None:
        return {"epochs": epochs}
    return {}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[Row]) -> str:
    head = ("| category | kind | settings | image AUROC | pixel AUROC | AUPRO | false reject @bundle | "
            "escape @bundle | escape @1% FR | escape @5% FR | fit s | fit peak RSS MB | ms/image b1 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.category} | {r.kind} | {r.settings} | error: {r.error} |")
            continue
        cert = "" if r.certified else " (not certified)"
        lines.append(f"| {r.category} | {r.kind} | {r.settings} | {_num(r.image_auroc)} | {_num(r.pixel_auroc)} | "
                     f"{_num(r.aupro)} | {_pct(r.false_reject)}{cert} | {_pct(r.escape)} | {_pct(r.escape_at_frr1)} | "
                     f"{_pct(r.escape_at_frr5)} | {_num(r.fit_s, 0)} | {_num(r.peak_rss_mb, 0)} | "
                     f"{_num(r.ms_per_image, 1)} |")
    return "\n".join(lines)


def _rate_ci(count: int | None, rate: float | None, n: int) -> str:
    from export.supervised.intervals import clopper_pearson

    if count is None or rate is None or n == 0:
        return "-"
    low, high = clopper_pearson(count, n)
    return f"{100 * rate:.1f}% ({count}/{n}; {100 * low:.0f}-{100 * high:.0f}%)"


def format_labelled_table(rows: list[Row]) -> str:
    """--labelled-half: judged-half rates at the bundle's own threshold (exact 95% intervals), CV beside."""
    head = ("| category | kind | labelled (calibration half) | false reject @bundle, judged | escape @bundle, judged | "
            "CV false reject | CV escape | image AUROC judged | fit s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.category} | {r.kind} | {r.labelled} | error: {r.error} |")
            continue
        good, bad = (int(part.split()[-1]) for part in r.judged.split(", "))
        lines.append(f"| {r.category} | {r.kind} | {r.labelled} | {_rate_ci(r.false_rejects, r.false_reject, good)} | "
                     f"{_rate_ci(r.escapes, r.escape, bad)} | {_pct(r.cv_false_reject)} | {_pct(r.cv_escape)} | "
                     f"{_num(r.image_auroc)} | {_num(r.fit_s, 0)} |")
    return "\n".join(lines)


def run_labelled_half(args: argparse.Namespace, category: Path, kind: str, settings: dict[str, Any], label: str,
                      bundles: Path, counts: list[int | None]) -> list[Row]:
    """One category and kind: unsupervised, then each labelled count; all judged on the judged half."""
    calibration, judged = split_halves(category)
    judged_csv = write_labels_csv(judged, bundles / f"{category.name}-judged.csv")
    rows = []
    for count in ([] if args.no_unlabelled else [-1]) + counts:  # -1: no labels (today's fit)
        labelled_csv = None
        name = "none"
        if count != -1:
            chosen = labelled_subset(calibration, count)
            defects = sum(1 for i in chosen if i.label == 1)
            name = f"{len(chosen) - defects} good + {defects} defects" + (" (all)" if count is None else "")
            labelled_csv = write_labels_csv(chosen, bundles / f"{category.name}-labelled-{count}.csv")
        row = Row(category.name, kind, label, labelled=name)
        out = bundles / f"{category.name}-{kind}-{'none' if count == -1 else count}"
        print(f"== {category.name} / {kind} ({label}), labelled: {name}", flush=True)
        try:
            row.fit_s, row.peak_rss_mb = fit_in_child(kind, category / "train" / "good", out, settings, args.threads,
                                                      labelled_csv, args.target_escape).values()
            evaluate_bundle(row, category, out, args.threads, judged_csv)
        except Exception as err:  # noqa: BLE001  (one failed cell must not lose the rest of the table)
            row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        rows.append(row)
        print(format_labelled_table([row]).splitlines()[-1], flush=True)
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(asdict(row)) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with <set>/<category>/train/good")
    parser.add_argument("--categories", default="", help="comma list (default: every category found)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    parser.add_argument("--epochs", type=int, default=None, help="autoencoder epochs (default: its config default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="KEY=VALUE option of the fitted kinds (e.g. bank_fraction=0.02); repeatable")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime and torch threads")
    parser.add_argument("--bundles", type=Path, default=None, help="keep bundles here (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="append the rows to this JSON-lines file")
    parser.add_argument("--report", type=Path, default=None,
                        help="only print the table of rows saved earlier with --json (last row per cell wins)")
    parser.add_argument("--labelled-half", action="store_true",
                        help="fit with labelled defects of one half of each test set, judge on the other half")
    parser.add_argument("--labelled-counts", default="all",
                        help="with --labelled-half: comma list of labelled defect counts (all, 10, 25, ...)")
    parser.add_argument("--no-unlabelled", action="store_true",
                        help="with --labelled-half: leave out the fit without labels (already measured)")
    parser.add_argument("--target-escape", type=float, default=None,
                        help="with --labelled-half: the fit's --target-escape")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.report is not None and args.labelled_half:
        print(format_labelled_table([Row(**json.loads(line)) for line in args.report.read_text().splitlines()
                                     if json.loads(line).get("labelled")]))
        return 0
    if args.report is not None:
        saved: dict[tuple[str, str, str], Row] = {}
        for line in args.report.read_text().splitlines():
            row = Row(**json.loads(line))
            saved[(row.category, row.kind, row.settings)] = row
        print(format_table(sorted(saved.values(), key=lambda r: (r.category, KINDS.index(r.kind), r.settings))))
        return 0

    found = find_categories(args.data)
    if not found:
        print(f"error: no <set>/<category>/train/good under {args.data}", file=sys.stderr)
        return 2
    wanted = [c for c in args.categories.split(",") if c] or list(found)
    missing = [c for c in wanted if c not in found]
    if missing:
        print(f"error: categories not found under {args.data}: {', '.join(missing)}", file=sys.stderr)
        return 2
    overrides = dict(item.split("=", 1) for item in args.overrides)
    rows = []
    with tempfile.TemporaryDirectory(prefix="accuracy-") as tmp:
        bundles = args.bundles or Path(tmp)
        for category in wanted:
            for kind in [k for k in args.kinds.split(",") if k]:
                settings = default_settings(kind, args.epochs)
                settings.update({k: _parse_value(v) for k, v in overrides.items() if _accepts(kind, k)})
                label = ", ".join(f"{k}={v}" for k, v in settings.items()) or "default"
                if args.labelled_half:
                    counts = [None if c == "all" else int(c) for c in args.labelled_counts.split(",") if c]
                    rows += run_labelled_half(args, found[category], kind, settings, label, bundles, counts)
                    continue
                row = Row(category, kind, label)
                out = bundles / f"{category}-{kind}"
                print(f"== {category} / {kind} ({label})", flush=True)
                try:
                    row.fit_s, row.peak_rss_mb = fit_in_child(kind, found[category] / "train" / "good", out,
                                                              settings, args.threads).values()
                    evaluate_bundle(row, found[category], out, args.threads)
                except Exception as err:  # noqa: BLE001  (one failed cell must not lose the rest of the table)
                    row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
                if args.json:
                    with open(args.json, "a") as handle:
                        handle.write(json.dumps(asdict(row)) + "\n")
    print()
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; threads {args.threads}")
    print(format_labelled_table(rows) if args.labelled_half else format_table(rows))
    return 0


def _accepts(kind: str, key: str) -> bool:
    """Does this kind's options object have this field (so one --set can target one kind among several)?"""
    from export.autoencoder.config import TrainConfig
    from export.padim.fit import PadimOptions
    from export.patchcore import PatchcoreOptions

    options = {"padim": PadimOptions, "patchcore": PatchcoreOptions}.get(kind, TrainConfig)
    return key in {f.name for f in fields(options)}


if __name__ == "__main__":
    sys.exit(main())
