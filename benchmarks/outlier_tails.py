"""Out-of-sample good scores of one default fit per data set and model kind, for calibrating the outlier rule.

    nice -n 10 python benchmarks/outlier_tails.py OUT_DIR [--sets bottle,fryum] [--kinds padim,patchcore]

Writes OUT_DIR/<set>-<kind>.json (paths, scores, threshold, fit seconds) once per pair (an existing file is
kept, so a run can be resumed), then prints, for each pair, what `export.threshold.threshold_set_alone`
says about it. The scores are exactly those the fit's threshold is chosen from (collect_training_scores), so
a rule can be tried on them offline instead of refitting.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = next((p for p in (REPO.parent / "shared" / "data", REPO.parents[1] / "shared" / "data") if p.is_dir()),
            REPO.parent / "shared" / "data")  # beside the project (tests use this) or beside its worktrees
SETS = {"bottle": DATA / "mvtec/bottle/train/good", "fryum": DATA / "visa/fryum/train/good",
        "magnetic_tile": DATA / "mtd/magnetic_tile/train/good", "elpv_mono": DATA / "elpv/mono/train/good",
        "aitex_fabric03": DATA / "aitex/fabric03/train/good"}


def fit_once(kind: str, train: Path) -> tuple[dict, float]:
    from export.threshold import collect_training_scores

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, collect_training_scores() as collected:
        if kind == "padim":
            from export.padim.fit import fit_padim

            fit_padim(train, Path(out) / "b")
        else:
            from export.patchcore import fit_patchcore

            fit_patchcore(train, Path(out) / "b")
    scores = collected[-1]
    return {"paths": [str(p) for p in scores.paths], "scores": scores.scores.tolist(),
            "threshold": scores.threshold}, time.perf_counter() - started


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--sets", default=",".join(SETS))
@click.option("--kinds", default="padim,patchcore")
def main(out_dir: Path, sets: str, kinds: str) -> None:
    from export.threshold import threshold_set_alone

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in sets.split(","):
        for kind in kinds.split(","):
            path = out_dir / f"{name}-{kind}.json"
            if not path.is_file():
                if not SETS[name].is_dir():
                    print(f"{name}: {SETS[name]} missing, skipped")
                    continue
                record, seconds = fit_once(kind, SETS[name])
                record["fit_seconds"] = round(seconds, 1)
                path.write_text(json.dumps(record))
            record = json.loads(path.read_text())
            scores = np.asarray(record["scores"])
            lone = threshold_set_alone(scores, record["threshold"])
            top = np.sort(scores)[::-1][:3]
            verdict = "quiet" if lone is None else f"WARN {Path(record['paths'][lone]).name}"
            print(f"{name:15s} {kind:9s} n={scores.size:4d} median {np.median(scores):.4g} top {top.round(4)} "
                  f"fit {record['fit_seconds']} s -> {verdict}", flush=True)


if __name__ == "__main__":
    main()
