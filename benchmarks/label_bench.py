"""What labelling costs on this machine: a durable label write, the view's archive listing, an export.

    nice python benchmarks/label_bench.py [--entries 1000] [--labels 200] [--folder /path/on/the/card]

Writes a synthetic archive of `--entries` real entries (PNG frame, heatmap, JSON header, written by the
service's own `Archive`) into a temporary folder (or `--folder`, to measure the device's own SD card or
eMMC: the fsync per label is the cost that matters there), then prints: ms per label write (one
O_APPEND write + fsync, median and p95), ms for the view's `/api/archive` listing cold (every header read)
and warm (cached), and seconds for `labels export` of the labelled parts. Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_inspector.core.decision import DecisionParams, decide
from edge_inspector.core.labelstore import LabelBook
from edge_inspector.service.archive import Archive
from edge_inspector.service.config import ArchiveConfig
from edge_inspector.service.pipeline import Result
from edge_inspector.service.sources import Frame
from edge_inspector.tools.labelset import export_labels
from edge_inspector.tools.view.labelling import ArchiveLabels


def fill(folder: Path, entries: int) -> list[str]:
    archive = Archive(folder, ArchiveConfig(enabled=True, folder=str(folder), max_files=entries + 10,
                                            max_megabytes=10000.0))
    rng = np.random.default_rng(0)
    for sequence in range(entries):
        image = rng.integers(0, 255, (128, 256, 3), dtype=np.uint8)
        heat = rng.random((32, 64), dtype=np.float32) * 2
        decision = decide(np.array([float(heat.max())]), heat, DecisionParams(threshold=1.0))
        frame = Frame(image=image, index=sequence, capture_time=1_700_000_000.0 + sequence,
                      capture_mono=time.monotonic(), capture_ms=1.0)
        result = Result(sequence=sequence, frame=frame, verdict=decision.verdict, model_id="m", model_sha256="s",
                        decision=decision, heatmap=heat)
        while not archive.submit(result, {"camera_id": "cam0", "sequence": sequence, "verdict": decision.verdict,
                                          "score": decision.score, "threshold": 1.0}):
            time.sleep(0.005)  # the writer is behind: wait, this is a benchmark, not the line
    archive.close(60)
    return sorted(p.name[:-5] for p in folder.glob("*.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--labels", type=int, default=200)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        folder = Path(tmp) / "archive"
        stems = fill(folder, args.entries)
        book = LabelBook(folder)
        times = []
        for i, stem in enumerate(stems[: args.labels]):
            start = time.perf_counter()
            book.label(stem, "defect" if i % 3 else "good", {"address": "bench"}, box=[1, 1, 10, 10])
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        print(f"label write (O_APPEND + fsync), {len(times)} labels: median {statistics.median(times):.2f} ms, "
              f"p95 {times[int(0.95 * (len(times) - 1))]:.2f} ms")
        view = ArchiveLabels(folder)
        for name in ("cold", "warm"):
            start = time.perf_counter()
            listing = view.listing("all")
            print(f"/api/archive listing of {listing['total']} entries ({len(listing['entries'])} returned), "
                  f"{name}: {(time.perf_counter() - start) * 1000:.1f} ms")
        start = time.perf_counter()
        manifest = export_labels(folder, Path(tmp) / "export")
        print(f"labels export of {len(manifest['parts'])} parts: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
