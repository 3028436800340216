"""PaDiM bundle speed and memory on this machine (run on demand; prints figures, asserts nothing).

    python benchmarks/padim_bench.py --bundle BUNDLE_DIR [--threads 2] [--repeat 30]
    python benchmarks/padim_bench.py --fit ../shared/data/mvtec/bottle/train/good   # fit time + peak RSS

Reports per-image latency of the whole bundle graph under ONNX Runtime at batch 1 and 8, beside the same
backbone alone (a graph that stops at the embedding), so the cost of the Mahalanobis step is visible.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _time(session, batch: np.ndarray, repeat: int) -> tuple[float, float]:
    name = session.get_inputs()[0].name
    session.run(None, {name: batch})  # warm-up
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        session.run(None, {name: batch})
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times), float(np.percentile(times, 99))


def _backbone_only(bundle, folder: Path) -> Path:
    """Export the bundle's feature extractor alone (same preprocessing, backbone, upsampling, channel subset)."""
    import torch

    from export.padim.fit import PadimFeatures, PadimOptions

    meta = bundle.meta
    options = PadimOptions(backbone=meta.backbone, input_size=tuple(meta.input_size), feature_dim=meta.feature_dim,
                           seed=meta.training.seed, layers=tuple(meta.layers))
    module = PadimFeatures(options).eval()
    path = folder / "backbone.onnx"
    dummy = torch.zeros((1, *options.input_size, 3), dtype=torch.uint8)
    torch.onnx.export(module, (dummy,), str(path), input_names=["image"], output_names=["embedding"],
                      dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    return path


def bench_bundle(bundle_dir: Path, threads: int, repeat: int) -> None:
    from edge_inspector.core.bundle import Bundle

    bundle = Bundle.load(bundle_dir)
    h, w = bundle.input_size
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    full = _session(bundle.onnx_path, threads)
    size_mb = bundle.onnx_path.stat().st_size / 1e6
    print(f"session start: {time.perf_counter() - started:.2f} s ({size_mb:.0f} MB graph)")
    with tempfile.TemporaryDirectory() as tmp:
        backbone = _session(_backbone_only(bundle, Path(tmp)), threads)
        print(f"{'graph':<14}{'batch':>6}{'ms/batch p50':>14}{'ms/image':>10}{'p99 ms':>9}")
        for batch_size in (1, 8):
            batch = rng.integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8)
            rows = {}
            for name, session in (("backbone only", backbone), ("whole bundle", full)):
                p50, p99 = _time(session, batch, repeat)
                rows[name] = p50
                print(f"{name:<14}{batch_size:>6}{p50:>14.2f}{p50 / batch_size:>10.2f}{p99:>9.2f}")
            print(f"{'':<14}{'':>6}  whole / backbone = {rows['whole bundle'] / rows['backbone only']:.2f}x")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def bench_fit(folder: Path, feature_dim: int) -> None:
    import torch

    from export.padim.fit import PadimOptions, fit_padim

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        bundle = fit_padim(folder, Path(tmp) / "bundle", PadimOptions(feature_dim=feature_dim or None))
        elapsed = time.perf_counter() - started
        print(f"fit: {bundle.meta.training.image_count} images, d={bundle.meta.feature_dim}, "
              f"{bundle.meta.training.folds} folds: {elapsed:.1f} s, "
              f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--fit", type=Path, help="time a default fit on this folder of good images")
    parser.add_argument("--feature-dim", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    if args.fit:
        bench_fit(args.fit, args.feature_dim)
    if args.bundle:
        bench_bundle(args.bundle, args.threads, args.repeat)
    if not (args.fit or args.bundle):
        parser.error("give --bundle and/or --fit")


if __name__ == "__main__":
    main()
