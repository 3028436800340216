"""This project's PaDiM beside anomalib's, fitted and timed in one run (run on demand; prints, asserts nothing).

    python benchmarks/peer_compare.py [--category ../shared/data/mvtec/bottle] [--threads 2]
        [--peer-venv ../peer-venv] [--resnet18-weights FILE]

anomalib needs torchvision, which does not fit this project's venv, so the script makes its own venv the
first time (`--peer-venv`, default ../peer-venv beside the repository) with exact pins (PINS below):

    python -m venv ../peer-venv
    ../peer-venv/bin/pip install torch==2.13.0 torchvision==0.28.0 anomalib==2.7.0 openvino==2026.4.1 \
        onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2

That is PyPI's torch, the CUDA build (about 4 GB with its nvidia-* wheels; 6 minutes here at ~45 MB/s): PyPI's
torchvision 0.28.0 links libc10_cuda.so and does not load beside the CPU-only torch 2.13.0+cpu wheel
(tried: "operator torchvision::nms does not exist"), and PyTorch's CPU index was not reachable here. It runs
on the CPU all the same.

Both sides are fitted with their defaults on the category's train/good (anomalib: PaDiM, ResNet18, layers
1-3, d=100, its MVTecAD datamodule; this project: `edge-export fit --model padim`), each in a fresh process
whose wall time and peak RSS are reported. Then one process (in the peer venv, which has ONNX Runtime and
OpenVINO) times every graph on the category's test images, per image at batch 1, PNG decode and resize
included, `--threads` threads: this project's bundle under ONNX Runtime, anomalib's ONNX under ONNX Runtime
and its OpenVINO IR under OpenVINO; the graphs are timed in turns, block by block, and the best block
median is kept, so all see the same machine load. It prints each, and the ratio to the fastest peer.

ImageNet weights: anomalib downloads ResNet18 weights from the Hugging Face hub, which a machine without
internet cannot reach; pass `--resnet18-weights` (a torchvision state_dict) to load them instead. Without
weights anomalib's model is fitted on a randomly initialised ResNet18: its timings and size are still
right (same graph), its accuracy is not, and the script prints n/a for it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANOMALIB = "anomalib==2.7.0"
PINS = ("torch==2.13.0", "torchvision==0.28.0", ANOMALIB, "openvino==2026.4.1", "onnx==1.23.2", "onnxruntime==1.32.0",
        "onnxscript==0.7.2")


def ensure_peer_venv(venv: Path) -> Path:
    """The peer venv's python, creating the venv with the pins above when it is missing."""
    python = venv / "bin" / "python"
    if python.exists():
        check_torchvision(python)
        return python
    print(f"creating {venv} ({', '.join(PINS)}); this downloads anomalib and its dependencies", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *PINS], check=True)
    check_torchvision(python)
    return python


def check_torchvision(python: Path) -> None:
    """Stop with the fix when the venv's torch and torchvision builds do not match.

    Seen on 2026-11-24: pip took torch 2.13.0+cpu from a local wheel folder (`find-links` in pip.conf) beside
    PyPI's CUDA torchvision, and anomalib failed much later with "operator torchvision::nms does not exist".
    """
    probe = subprocess.run([str(python), "-c", "import torchvision.ops"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"{python.parent.parent}: torchvision does not load beside this torch ({last}); install "
                         f"PyPI's torch there, bypassing local wheel folders: env -u PIP_FIND_LINKS "
                         f"PIP_CONFIG_FILE=/dev/null {python.parent / 'pip'} install torch==2.13.0")


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run a command; (wall seconds, peak RSS MB of it and its children, stdout)."""
    started = time.perf_counter()
    wrapped = ["/usr/bin/time", "-v", *command] if Path("/usr/bin/time").exists() else command
    done = subprocess.run(wrapped, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(command[:4])} ...")
    rss = next((int(line.split()[-1]) / 1024 for line in done.stderr.splitlines()
                if "Maximum resident set size" in line), float("nan"))
    return seconds, rss, done.stdout


def fit_ours(category: Path, out: Path, threads: int) -> dict:
    exporter = str(Path(sys.executable).parent / "edge-export")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    seconds, rss, _ = timed([exporter, "fit", str(category / "train" / "good"), "--out", str(out), "--model",
                             "padim"], env)
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    import accuracy

    row = accuracy.Row(category.name, "padim", "default")
    accuracy.evaluate_bundle(row, category, out, threads)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 1e6
    return {"fit_s": seconds, "rss_mb": rss, "image_auroc": row.image_auroc, "pixel_auroc": row.pixel_auroc,
            "size_mb": size, "onnx": str(out / "model.onnx")}


# ---------------------------------------------------------------------------------------------------------
# The parts below run inside the peer venv (anomalib, OpenVINO); they never import this project.
# ---------------------------------------------------------------------------------------------------------

def peer_fit(category: Path, out: Path, threads: int, weights: str | None) -> None:
    """anomalib 2.7 default PaDiM: fit, test (accuracy), export ONNX and OpenVINO. Prints one JSON line."""
    import torch
    from anomalib.data import MVTecAD
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from anomalib.models import Padim

    torch.set_num_threads(threads)
    started = time.perf_counter()
    datamodule = MVTecAD(root=str(category.parent), category=category.name, train_batch_size=32,
                         eval_batch_size=32, num_workers=0)
    model = Padim(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False, n_features=100)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        missing = model.model.feature_extractor.feature_extractor.load_state_dict(state, strict=False)
        print(f"weights loaded; unused keys: {len(missing.unexpected_keys)}", file=sys.stderr)
    engine = Engine(max_epochs=1, accelerator="cpu", devices=1, logger=False, default_root_dir=str(out))
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - started
    results = engine.test(model=model, datamodule=datamodule)[0]
    onnx_path = engine.export(model=model, export_type=ExportType.ONNX, export_root=str(out / "onnx"))
    ov_path = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=str(out / "openvino"))
    print(json.dumps({"fit_s_in_process": fit_seconds, "image_auroc": results.get("image_AUROC"),
                      "pixel_auroc": results.get("pixel_AUROC"), "onnx": str(onnx_path), "openvino": str(ov_path),
                      "pretrained": bool(weights)}))


def peer_time(category: Path, ours: str, anomalib_onnx: str, anomalib_ov: str, threads: int) -> None:
    """Per-image batch-1 latency incl. PNG decode + resize, graphs in turns; prints one JSON line."""
    import statistics

    import cv2
    import numpy as np
    import onnxruntime as ort
    import openvino as ov

    paths = sorted((category / "test").rglob("*.png"))[:20]
    raw = [np.fromfile(str(p), np.uint8) for p in paths]

    def ort_session(path: str):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    ours_session = ort_session(ours)
    peer_session = ort_session(anomalib_onnx)
    compiled = ov.Core().compile_model(anomalib_ov, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                             "PERFORMANCE_HINT": "LATENCY"})
    peer_input = peer_session.get_inputs()[0]
    size = tuple(int(s) if isinstance(s, int) else 256 for s in peer_input.shape[2:])

    def ours_call(data: np.ndarray) -> None:
        image = cv2.resize(cv2.imdecode(data, cv2.IMREAD_COLOR), (256, 256), interpolation=cv2.INTER_AREA)
        ours_session.run(None, {"image": image[None]})

    def peer_tensor(data: np.ndarray) -> np.ndarray:
        image = cv2.resize(cv2.imdecode(data, cv2.IMREAD_COLOR), (size[1], size[0]), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255.0

    def peer_ort_call(data: np.ndarray) -> None:
        peer_session.run(None, {peer_input.name: peer_tensor(data)})

    def peer_ov_call(data: np.ndarray) -> None:
        compiled(peer_tensor(data))

    calls = {"this project (ONNX Runtime)": ours_call, "anomalib (ONNX Runtime)": peer_ort_call,
             "anomalib (OpenVINO)": peer_ov_call}
    best = {name: float("inf") for name in calls}
    for _ in range(5):
        for name, call in calls.items():
            time.sleep(0.3)
            for data in raw[:3]:
                call(data)
            times = []
            for data in raw:
                started = time.perf_counter()
                call(data)
                times.append((time.perf_counter() - started) * 1000.0)
            best[name] = min(best[name], statistics.median(times))
    print(json.dumps({"ms": best, "load": os.getloadavg()[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", type=Path, default=REPO.parent / "shared" / "data" / "mvtec" / "bottle")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer-venv", type=Path, default=REPO.parent / "peer-venv")
    parser.add_argument("--resnet18-weights", default=None, help="torchvision ResNet18 state_dict for anomalib")
    parser.add_argument("--worker", choices=["fit", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--graphs", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "fit":
        return peer_fit(args.category, args.out, args.threads, args.resnet18_weights)
    if args.worker == "time":
        return peer_time(args.category, *args.graphs, args.threads)

    python = ensure_peer_venv(args.peer_venv)
    with tempfile.TemporaryDirectory(prefix="peer-compare-") as tmp:
        ours = fit_ours(args.category, Path(tmp) / "ours", args.threads)
        command = [str(python), __file__, "--worker", "fit", "--category", str(args.category), "--out",
                   str(Path(tmp) / "anomalib"), "--threads", str(args.threads)]
        if args.resnet18_weights:
            command += ["--resnet18-weights", args.resnet18_weights]
        peer_s, peer_rss, out = timed(command, dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        peer = json.loads(out.strip().splitlines()[-1])
        _, _, out = timed([str(python), __file__, "--worker", "time", "--category", str(args.category),
                           "--threads", str(args.threads), "--graphs", ours["onnx"], peer["onnx"], peer["openvino"]])
        timing = json.loads(out.strip().splitlines()[-1])
        peer_size = sum(p.stat().st_size for p in Path(peer["openvino"]).parent.rglob("*") if p.is_file()) / 1e6
    ms = timing["ms"]
    fastest_peer = min(v for k, v in ms.items() if k.startswith("anomalib"))
    accuracy = (lambda v: "n/a" if v is None or not peer["pretrained"] else f"{v:.3f}")
    print(f"\n{args.category.name}, batch 1, {args.threads} threads, per image incl. PNG decode + resize "
          f"(load {timing['load']:.2f}, {os.cpu_count()} CPUs)")
    print("| | ms/image | fit s | fit process s (peak RSS MB) | model MB | image AUROC | pixel AUROC |")
    print("|---|---|---|---|---|---|---|")
    print(f"| this project, ONNX Runtime | {ms['this project (ONNX Runtime)']:.1f} | {ours['fit_s']:.1f} | "
          f"{ours['fit_s']:.1f} ({ours['rss_mb']:.0f}) | {ours['size_mb']:.0f} | {ours['image_auroc']:.3f} | "
          f"{ours['pixel_auroc']:.3f} |")
    for name, runtime in (("anomalib (ONNX Runtime)", "ONNX Runtime"), ("anomalib (OpenVINO)", "OpenVINO")):
        print(f"| {ANOMALIB}, {runtime} | {ms[name]:.1f} | {peer['fit_s_in_process']:.1f} | {peer_s:.1f} "
              f"({peer_rss:.0f}) | {peer_size:.0f} | {accuracy(peer['image_auroc'])} | "
              f"{accuracy(peer['pixel_auroc'])} |")
    print("fit s: this project's whole `edge-export fit` (fit, k-fold threshold, export, ONNX check); anomalib's "
          "engine.fit in its process; fit process: anomalib's also tests and exports ONNX and OpenVINO")
    print(f"fastest peer / this project = {fastest_peer / ms['this project (ONNX Runtime)']:.2f}x")


if __name__ == "__main__":
    main()
