"""GPU check: TensorRT fp32/fp16 parity with ONNX Runtime, verdicts on a test set, and latency per batch.

Run on a machine with TensorRT (10.3+ or 11), cuda-python and an NVIDIA GPU (a Jetson or a workstation):

    python benchmarks/gpu_check.py [--bundle DIR] [--data ../shared/data/mvtec/bottle] [--kind padim|patchcore]

Without --bundle it fits a bundle of --kind on DATA/train/good (needs torch; synthetic parts when DATA is
absent). The fp16 engine is built from the mixed-precision graph (engines/model.fp16.onnx, written here when
missing; needs onnx). Engines are built into a copy of the bundle unless --in-place. Prints one table and
exits 1 when a parity limit is broken, 2 when TensorRT is unusable here. `--skip-tensorrt` runs the ONNX
Runtime rows only, the mixed graph included (the CPU-measurable half of the fp16 parity).

Limits (also in docs/jetson.md), max |diff| / max |ORT fp32| on maps and scores: fp32 engine <= 1e-3; fp16
engine and the mixed graph under ONNX Runtime <= 2e-2; no verdict (score > threshold) may differ except for
images within 2 % of the threshold.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_inspector.backends import create_backend  # noqa: E402
from edge_inspector.backends.base import Backend, InferenceResult  # noqa: E402
from edge_inspector.backends.tensorrt.engines import MIXED_GRAPH, max_relative_difference  # noqa: E402
from edge_inspector.core.bundle import Bundle  # noqa: E402
from edge_inspector.core.images import list_images, read_image, resize_to  # noqa: E402

log = logging.getLogger("gpu_check")
LIMITS = {"fp32": 1e-3, "fp16": 2e-2}
BORDERLINE = 0.02  # verdicts of images this close to the threshold (relative) may flip in fp16


@dataclass
class Row:
    backend: str
    precision: str
    batch: int
    ms_per_batch: float
    ms_per_image: float
    map_rel_diff: float | None = None
    score_rel_diff: float | None = None
    verdict_flips: int | None = None
    borderline_flips: int | None = None


def load_test_set(data: Path | None, bundle: Bundle) -> tuple[np.ndarray, np.ndarray, str]:
    """(images uint8 NHWC, is_defect bool, description): DATA/test when present, else synthetic parts.

    Tiled bundles get each frame's tiles in order, as the service feeds them (labels repeated per tile).
    """
    size = bundle.input_size
    tiler = bundle.meta.tiling.tiler(size)
    if data is not None and (data / "test").is_dir():
        paths = list_images(data / "test")
        frames = [read_image(p) for p in paths]
        labels = np.array([p.parent.name != "good" for p in paths])
        described = f"{data / 'test'} ({len(paths)} images)"
    else:
        from export.synthetic import make_part

        rng = np.random.default_rng(0)
        kinds = [None, "scratch", None, "spot", None, "missing"] * 6
        frames = [make_part(rng, size, defect=k)[0] for k in kinds]
        labels = np.array([k is not None for k in kinds])
        described = f"synthetic parts ({len(kinds)} images)"
    if tiler is None:
        return np.stack([resize_to(f, size) for f in frames]), labels, described
    tiles = [tiler.split(f) for f in frames]
    return np.concatenate(tiles), np.repeat(labels, [len(t) for t in tiles]), described + ", tiled"


def prepare_bundle(args, workdir: Path) -> Bundle:
    if args.bundle is not None:
        if args.in_place:
            return Bundle.load(args.bundle)
        copy = workdir / "bundle"
        # Everything, recorded engines included (bundle.yaml must still verify); builds below replace them.
        shutil.copytree(args.bundle, copy, ignore=shutil.ignore_patterns("*.lock"))
        return Bundle.load(copy)
    train = args.data / "train" / "good" if args.data is not None else None
    if train is None or not train.is_dir():
        from export.synthetic import write_dataset

        train = write_dataset(workdir / "data", train=30, test_good=1, test_per_defect=1) / "train" / "good"
    log.info("fitting %s on %s", args.kind, train)
    if args.kind == "patchcore":
        from export.patchcore import PatchcoreOptions, fit_patchcore

        return fit_patchcore(train, workdir / "bundle", PatchcoreOptions())
    from export.padim.fit import PadimOptions, fit_padim

    return fit_padim(train, workdir / "bundle", PadimOptions())


class MixedGraphBackend(Backend):
    """ONNX Runtime (CPU) on the bundle's mixed-precision graph: what the fp16 engine computes, without a GPU."""

    name = "onnxruntime-cpu"

    def __init__(self, path: Path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def infer(self, images: np.ndarray) -> InferenceResult:
        maps, scores = self.session.run(["anomaly_map", "score"], {"image": images})
        return InferenceResult(maps, scores)


def run_all(backend: Backend, images: np.ndarray, batch: int) -> InferenceResult:
    parts = [backend.infer(images[i:i + batch]) for i in range(0, len(images), batch)]
    return InferenceResult(np.concatenate([p.anomaly_maps for p in parts]), np.concatenate([p.scores for p in parts]))


def time_batch(backend: Backend, images: np.ndarray, batch: int, budget_s: float) -> float:
    """Median ms per call of `batch` images, after warm-up; stops at the time budget (min 5 calls)."""
    chunk = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
    for _ in range(3):
        backend.infer(chunk)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        backend.infer(chunk)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)


def compare(result: InferenceResult, reference: InferenceResult, threshold: float) -> dict:
    ours, theirs = result.scores / threshold, reference.scores / threshold
    flips = (ours > 1.0) != (theirs > 1.0)
    borderline = flips & (np.abs(theirs - 1.0) <= BORDERLINE)
    return {"map_rel_diff": max_relative_difference(result.anomaly_maps, reference.anomaly_maps),
            "score_rel_diff": max_relative_difference(result.scores, reference.scores),
            "verdict_flips": int(flips.sum() - borderline.sum()), "borderline_flips": int(borderline.sum())}


def print_table(rows: list[Row]) -> None:
    header = f"{'backend':<18} {'precision':<9} {'batch':>5} {'ms/batch':>9} {'ms/image':>9} " \
             f"{'map rel diff':>12} {'score rel diff':>14} {'verdict flips':>13}"
    print(header)
    print("-" * len(header))
    fmt = lambda v: "-" if v is None else f"{v:.2e}"  # noqa: E731
    for r in rows:
        flips = "-" if r.verdict_flips is None else f"{r.verdict_flips} (+{r.borderline_flips} borderline)"
        print(f"{r.backend:<18} {r.precision:<9} {r.batch:>5} {r.ms_per_batch:>9.2f} {r.ms_per_image:>9.2f} "
              f"{fmt(r.map_rel_diff):>12} {fmt(r.score_rel_diff):>14} {flips:>13}")


def _tensorrt_candidates(bundle: Bundle, args) -> tuple[Bundle, list[tuple[str, str, Backend]]]:
    from edge_inspector.backends.tensorrt.build import BuildOptions, build_engine
    from edge_inspector.backends.tensorrt.cuda import probe_device
    from edge_inspector.backends.tensorrt.runtime import TensorRTBackend

    device = probe_device()
    built = []
    for precision in args.precisions.split(","):
        result = build_engine(bundle, BuildOptions(precision=precision, tiles=args.tiles), device)
        print(f"built {result.rel_path} (batch {result.profile[0]}..{result.profile[2]}) in {result.seconds:.1f} s "
              f"({len(result.engine) / 1e6:.1f} MB)")
        built.append(precision)
    bundle = Bundle.load(bundle.path)
    return bundle, [("tensorrt", p, TensorRTBackend(bundle, precision=p)) for p in built]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle to check (default: fit one on --data)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec/bottle"),
                        help="MVTec-layout category folder: test/ for verdicts, train/good to fit")
    parser.add_argument("--kind", choices=["padim", "patchcore"], default="padim", help="kind to fit without --bundle")
    parser.add_argument("--tiles", type=int, default=None,
                        help="images per call the engines are built for (default: the bundle's tiles per frame)")
    parser.add_argument("--precisions", default="fp32,fp16", help="engines to build and check")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per backend and batch")
    parser.add_argument("--in-place", action="store_true", help="build engines into --bundle itself")
    parser.add_argument("--skip-tensorrt", action="store_true", help="ONNX Runtime rows only")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if not args.skip_tensorrt:
        from edge_inspector.backends.tensorrt.runtime import unavailable_reason

        reason = unavailable_reason()
        if reason:
            print(f"error: TensorRT check impossible here: {reason}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        workdir = Path(tmp)
        bundle = prepare_bundle(args, workdir)
        from export.commands.tensorrt import ensure_mixed_graph

        ensure_mixed_graph(bundle)
        bundle = Bundle.load(bundle.path)
        images, labels, described = load_test_set(args.data, bundle)
        from edge_inspector.backends.tensorrt.build import frame_group, resolve_tiles

        tiles = resolve_tiles(bundle, args.tiles)
        group = frame_group(bundle)
        batches = sorted({group, tiles})
        print(f"bundle {bundle.path} ({bundle.model_id}), test set: {described}, batches {batches}")

        reference_backend = create_backend(bundle, "onnxruntime")
        reference = run_all(reference_backend, images, tiles)
        accuracy = float(((reference.scores / bundle.threshold > 1.0) == labels).mean())
        print(f"ONNX Runtime verdict accuracy vs labels: {accuracy:.3f}")
        candidates: list[tuple[str, str, Backend]] = [("onnxruntime-cpu", "fp32", reference_backend),
                                                      ("onnxruntime-cpu", "fp16", MixedGraphBackend(
                                                          bundle.path / MIXED_GRAPH))]
        from edge_inspector.backends.onnxruntime import OnnxRuntimeBackend

        cuda = OnnxRuntimeBackend(bundle, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        if cuda.name == "onnxruntime-cuda":
            candidates.append(("onnxruntime-cuda", "fp32", cuda))
        if not args.skip_tensorrt:
            bundle, engines = _tensorrt_candidates(bundle, args)
            candidates.extend(engines)

        rows, failed = [], []
        for name, precision, backend in candidates:
            parity = compare(run_all(backend, images, tiles), reference, bundle.threshold)
            limit = LIMITS.get(precision) if (name == "tensorrt" or precision == "fp16") else None
            if limit is not None and (max(parity["map_rel_diff"], parity["score_rel_diff"]) > limit
                                      or parity["verdict_flips"]):
                failed.append(f"{name} {precision}: {parity} (limit {limit})")
            for batch in batches:
                ms = time_batch(backend, images, batch, args.budget)
                rows.append(Row(name, precision, batch, ms, ms / batch, **parity))
        print()
        print_table(rows)
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
        for backend in (c[2] for c in candidates):
            backend.close()
    for failure in failed:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
