"""Judged-half rates at the thresholds a labelled bundle's cross-validation put at other false-reject rates.

    python benchmarks/labelled_curve.py --bundles DIR     # the --bundles folder of accuracy.py --labelled-half

`accuracy.py --labelled-half` judges each bundle at its own threshold (the fit's --target-frr, 0.5% by default).
A labelled bundle also records, in bundle.yaml's threshold.operating_curve, the thresholds at which its
cross-validated good scores (calibration half + training good images, never the judged half) reach 0, 0.5, 1,
2, 5, 10 and 20% false rejects. This prints what each of those thresholds does on the judged half, so the
trade-off a line would choose with `--target-frr` is shown without placing any threshold on the judged images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def judged_scores(bundle_dir: Path, judged_csv: Path, threads: int) -> tuple[np.ndarray, np.ndarray]:
    from edge_inspector.backends import create_backend
    from edge_inspector.core.bundle import Bundle
    from edge_inspector.tools.labels import read_labels_csv
    from edge_inspector.tools.replay import replay_folder

    bundle = Bundle.load(bundle_dir)
    items = read_labels_csv(judged_csv)
    summary = replay_folder(judged_csv.parent, bundle, create_backend(bundle, "onnxruntime", threads=threads),
                            labels_csv=judged_csv)
    labels = {str(item.path): item.label for item in items}
    scored = [(r.score, labels[r.path]) for r in summary.rows if r.score is not None]
    return (np.array([s for s, y in scored if y == 0]), np.array([s for s, y in scored if y == 1]))


def _rate(count: int, total: int) -> str:
    from export.supervised.intervals import clopper_pearson

    low, high = clopper_pearson(count, total)
    return f"{100 * count / max(1, total):.1f}% ({count}/{total}; {100 * low:.0f}-{100 * high:.0f}%)"


def main(argv: list[str] | None = None) -> int:
    from edge_inspector.core.bundle import Bundle

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--categories", default="", help="comma list (default: every labelled bundle there)")
    args = parser.parse_args(argv)
    wanted = {c for c in args.categories.split(",") if c}
    print("| bundle | CV false-reject point | threshold | false reject, judged | escape, judged |")
    print("|---|---|---|---|---|")
    for bundle_dir in sorted(p for p in args.bundles.iterdir() if (p / "bundle.yaml").is_file()):
        bundle = Bundle.load(bundle_dir)
        curve = bundle.meta.threshold.operating_curve
        category = bundle_dir.name.split("-")[0]
        if wanted and category not in wanted:
            continue
        judged_csv = args.bundles / f"{category}-judged.csv"
        if bundle.meta.labelled is None or not curve or not judged_csv.is_file():
            continue
        good, bad = judged_scores(bundle_dir, judged_csv, args.threads)
        for point in curve:
            t = float(point["threshold"])
            rejects, escapes = int((good > t).sum()), int((bad <= t).sum())
            print(f"| {bundle_dir.name} | {100 * point['false_reject_rate']:.1f}% (CV escape "
                  f"{100 * point['escape_rate']:.1f}%) | {t:.4g} | {_rate(rejects, good.size)} | "
                  f"{_rate(escapes, bad.size)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
