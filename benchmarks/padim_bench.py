"""PaDiM speed, size, memory and the accuracy trade-off on this machine (run on demand; prints, asserts nothing).

    python benchmarks/padim_bench.py --bundle BUNDLE_DIR [--bundle OTHER ...] [--threads 2]
    python benchmarks/padim_bench.py --fit ../shared/data/mvtec/bottle/train/good [--repeat-folder 4]
    nice python benchmarks/padim_bench.py --tradeoff [--categories bottle,fryum]     # about 15 min on 2 cores

--bundle: per-image latency of each bundle's whole graph under ONNX Runtime at batch 1 and 8, beside the
same feature extractor alone (a graph that stops at the embedding), so the cost of the Mahalanobis step and
the head is visible; several bundles are timed in one run, so their ratio is measured on the same machine
under the same load. Latency is the best of several block medians (40 runs a block, 0.3 s pause between
blocks so other sessions' spinning threads go idle): on a shared 2-core VM single medians swung 2-3x with
other people's jobs, the best block median did not.

--fit: wall time and peak RSS of a whole `edge-export fit --model padim` in a fresh process (/usr/bin/time
when present), on the folder and on the same images repeated N times (symlinks), to show the peak does
not grow with the number of images.

--tradeoff: embedding (projection, d), statistics grid and epsilon against accuracy, latency, model size
and fit time: each setting is fitted and replayed with the yardstick's code (benchmarks/accuracy.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# (label, PadimOptions overrides): the old default first, then one lever at a time, then the new default.
TRADEOFF = (
    ("subset d=100 stride 4 (old default)", {"projection": "subset", "feature_dim": 100, "grid_stride": 4}),
    ("subset d=100 stride 8", {"projection": "subset", "feature_dim": 100, "grid_stride": 8}),
    ("orthogonal d=64 stride 8", {"projection": "orthogonal", "feature_dim": 64}),
    ("whitened d=100 stride 8", {"projection": "whitened", "feature_dim": 100}),
    ("whitened d=64 stride 4", {"projection": "whitened", "feature_dim": 64, "grid_stride": 4}),
    ("whitened d=48 stride 8", {"projection": "whitened", "feature_dim": 48}),
    ("whitened d=32 stride 8", {"projection": "whitened", "feature_dim": 32}),
    ("whitened d=64 stride 8 eps 0.1", {"projection": "whitened", "feature_dim": 64, "epsilon": 0.1}),
    ("whitened d=64 stride 8 (default)", {}),
)


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def best_block_ms(run, blocks: int = 5, per_block: int = 40) -> float:
    """Best median of `blocks` blocks of `per_block` calls, in ms (see the module docstring for why)."""
    medians = []
    for _ in range(blocks):
        time.sleep(0.3)
        for _ in range(3):
            run()
        times = []
        for _ in range(per_block):
            started = time.perf_counter()
            run()
            times.append((time.perf_counter() - started) * 1000.0)
        medians.append(statistics.median(times))
    return min(medians)


def features_only(bundle, folder: Path) -> Path:
    """The bundle's feature extractor alone with the same shapes (backbone, taps, projection size, grid)."""
    import torch

    from export.padim.features import PadimFeatures, semi_orthogonal
    from export.padim.fit import PadimOptions

    meta = bundle.meta
    params = meta.model_params
    projection = params.get("projection", "subset")
    options = PadimOptions(backbone=meta.backbone, input_size=tuple(meta.input_size), layers=tuple(meta.layers),
                           feature_dim=meta.feature_dim if projection == "subset" else None,
                           seed=meta.training.seed, projection="subset")
    module = PadimFeatures(options, int(params.get("grid_stride", 4))).eval()
    if projection != "subset":  # same cost as the fitted projection: a (C, d) map of all channels
        module.project(semi_orthogonal(module.channels, meta.feature_dim, 0))
    path = folder / "features.onnx"
    dummy = torch.zeros((1, *options.input_size, 3), dtype=torch.uint8)
    torch.onnx.export(module, (dummy,), str(path), input_names=["image"], output_names=["embedding"],
                      dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    return path


def bench_bundles(bundle_dirs: list[Path], threads: int) -> dict[Path, float]:
    """Print latency rows per bundle; return batch-1 ms per bundle."""
    from edge_inspector.core.bundle import Bundle

    rng = np.random.default_rng(0)
    batch1 = {}
    print(f"{'bundle':<34}{'graph':<15}{'batch':>6}{'ms/batch':>10}{'ms/image':>10}{'MB':>7}{'start s':>9}")
    for bundle_dir in bundle_dirs:
        bundle = Bundle.load(bundle_dir)
        h, w = bundle.input_size
        size_mb = sum(p.stat().st_size for p in Path(bundle_dir).iterdir() if p.is_file()) / 1e6
        started = time.perf_counter()
        full = session(bundle.onnx_path, threads)
        start_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            features = session(features_only(bundle, Path(tmp)), threads)
            for batch_size in (1, 8):
                batch = rng.integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8)
                for name, sess in (("features only", features), ("whole bundle", full)):
                    ms = best_block_ms(lambda s=sess, b=batch: s.run(None, {"image": b}), per_block=40 // batch_size)
                    if name == "whole bundle" and batch_size == 1:
                        batch1[bundle_dir] = ms
                    print(f"{Path(bundle_dir).name[:33]:<34}{name:<15}{batch_size:>6}{ms:>10.2f}"
                          f"{ms / batch_size:>10.2f}{size_mb:>7.0f}{start_s:>9.2f}", flush=True)
    if len(bundle_dirs) > 1:
        first = bundle_dirs[0]
        for other in bundle_dirs[1:]:
            print(f"batch 1: {Path(first).name} / {Path(other).name} = {batch1[first] / batch1[other]:.2f}x")
    print(f"threads {threads}; load {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
    return batch1


def repeated_folder(folder: Path, times: int, tmp: Path) -> Path:
    """The folder's images `times` times over (symlinks), for the flat-memory check."""
    out = tmp / f"x{times}"
    out.mkdir()
    for r in range(times):
        for path in sorted(folder.iterdir()):
            if path.is_file():
                (out / f"r{r}_{path.name}").symlink_to(path.resolve())
    return out


def bench_fit(folder: Path, repeat: int) -> None:
    """Whole-process fits through the CLI: wall time and peak RSS at 1x and `repeat`x the images."""
    exporter = shutil.which("edge-export") or str(Path(sys.executable).parent / "edge-export")
    with tempfile.TemporaryDirectory() as tmp:
        folders = [folder] + ([repeated_folder(folder, repeat, Path(tmp))] if repeat > 1 else [])
        for source in folders:
            images = sum(1 for p in source.iterdir() if p.is_file())
            out = Path(tmp) / f"bundle-{images}"
            command = [exporter, "fit", str(source), "--out", str(out), "--model", "padim"]
            started = time.perf_counter()
            if Path("/usr/bin/time").exists():
                done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
                rss = next((int(line.split()[-1]) / 1024 for line in done.stderr.splitlines()
                            if "Maximum resident set size" in line), float("nan"))
            else:
                done = subprocess.run(command, capture_output=True, text=True)
                rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            seconds = time.perf_counter() - started
            if done.returncode:
                print(done.stderr[-2000:])
                raise SystemExit(f"fit failed on {source}")
            print(f"fit {images} images: {seconds:.1f} s wall, peak RSS {rss:.0f} MB "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)


def bench_tradeoff(data: Path, categories: list[str], threads: int) -> None:
    """Fit and replay every TRADEOFF setting on each category; print one table."""
    import accuracy

    found = accuracy.find_categories(data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="padim-tradeoff-") as tmp:
        for label, settings in TRADEOFF:
            cells = {}
            for category in categories:
                out = Path(tmp) / f"{category}-{len(rows)}"
                row = accuracy.Row(category, "padim", label)
                print(f"== {category}: {label}", flush=True)
                row.fit_s, row.peak_rss_mb = accuracy.fit_in_child(
                    "padim", found[category] / "train" / "good", out, settings, threads).values()
                accuracy.evaluate_bundle(row, found[category], out, threads)
                cells[category] = (row, sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 1e6)
            latency = bench_quiet_latency(Path(tmp) / f"{categories[0]}-{len(rows)}", threads)
            rows.append((label, cells, latency))
    head = "| setting | " + " | ".join(f"{c} image / pixel AUROC / AUPRO | {c} fit s" for c in categories)
    print()
    print(head + " | model MB | ms/image b1 |")
    print("|" + "---|" * (head.count("|") + 2))
    for label, cells, latency in rows:
        parts = [f"{r.image_auroc:.3f} / {r.pixel_auroc:.3f} / {r.aupro:.3f} | {r.fit_s:.0f}"
                 for r, _ in cells.values()]
        size = next(iter(cells.values()))[1]
        print(f"| {label} | " + " | ".join(parts) + f" | {size:.0f} | {latency:.1f} |")
    print(f"\nmachine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; ONNX Runtime {threads} threads; "
          "latency: best of 5 block medians, batch 1, 256 px")


def bench_quiet_latency(bundle_dir: Path, threads: int) -> float:
    from edge_inspector.core.bundle import Bundle

    bundle = Bundle.load(bundle_dir)
    sess = session(bundle.onnx_path, threads)
    batch = np.random.default_rng(0).integers(0, 256, (1, *bundle.input_size, 3), dtype=np.uint8)
    return best_block_ms(lambda: sess.run(None, {"image": batch}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, action="append", default=[])
    parser.add_argument("--fit", type=Path, help="time whole CLI fits on this folder of good images")
    parser.add_argument("--repeat-folder", type=int, default=4, help="with --fit: also fit on N copies")
    parser.add_argument("--tradeoff", action="store_true", help="fit + replay each setting in TRADEOFF")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--categories", default="bottle,fryum")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (args.fit or args.bundle or args.tradeoff):
        parser.error("give --bundle, --fit and/or --tradeoff")
    if args.fit:
        bench_fit(args.fit, args.repeat_folder)
    if args.bundle:
        bench_bundles(args.bundle, args.threads)
    if args.tradeoff:
        bench_tradeoff(args.data, [c for c in args.categories.split(",") if c], args.threads)


if __name__ == "__main__":
    main()
