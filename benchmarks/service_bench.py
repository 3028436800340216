"""End-to-end speed and memory of the edge service, beside bare bundle inference on the same tile batch.

    python benchmarks/service_bench.py --minutes 0                 # ~4 min: 2x2 and 4x4 grids (and two fits)
    python benchmarks/service_bench.py --heatmap-scale 1 --minutes 0   # full-size heatmaps (default: auto)
    python benchmarks/service_bench.py --minutes 10                # adds the 10-minute RSS-flatness run
    python benchmarks/service_bench.py --threads 1 --workers 2 --minutes 0   # two frames at once, 1 thread each

For 1280x1024 frames (an MJPG video, decoded by OpenCV like a camera stream, one part in four with a
defect) tiled 2x2 and 4x4, each tile resized to the bundle's 256x256 input, ONNX Runtime on 2 CPU threads:

* bare inference: `backend.infer` on the frame's tile batch, nothing else, one frame after the other;
* throughput: the whole service (decode -> tile -> infer -> stitch -> decide -> PNG -> ZeroMQ) in lossless
  mode, as fast as it goes, results counted by a ZeroMQ subscriber in this process;
* pipeline overhead: what the whole service costs on top of bare inference, from the two rates:
  (bare frames/s / service frames/s) - 1. Decoding, tiling and PNG encoding run on their own threads beside
  inference, so they cost only what they take from it;
* latency: the service fed at ~70% of that throughput (a camera the model keeps up with), capture ->
  message received by the subscriber, p50/p99;
* per-stage milliseconds from the result headers' latency_ms (the paced run), and each step timed alone on
  one thread (what the steps cost the CPU, overlapped or not);
* RSS of this process sampled while the service runs for --minutes.

One PaDiM bundle per grid (PaDiM's defaults, fit on 8 generated parts at that grid) is fit in a child
process (torch stays out of this process, so RSS is the device's) and cached in --work.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_inspector.backends import create_backend  # noqa: E402
from edge_inspector.core.bundle import Bundle  # noqa: E402
from edge_inspector.core.inspect import MapScale  # noqa: E402
from edge_inspector.core.tiling import Tiler  # noqa: E402
from edge_inspector.service.app import Service  # noqa: E402
from edge_inspector.service.config import parse_config  # noqa: E402
from edge_inspector.tools.subscriber import Subscriber  # noqa: E402
from export.synthetic import make_part  # noqa: E402

FRAME = (1024, 1280)  # height, width
INPUT = (256, 256)

FIT_SCRIPT = """
import sys, cv2, numpy as np
from pathlib import Path
from export.synthetic import make_part
from export.padim.fit import PadimOptions, fit_padim
train, out, grid = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
train.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(8):
    cv2.imwrite(str(train / f"{i:02d}.png"), make_part(rng, (1024, 1280))[0])
fit_padim(train, out, PadimOptions(input_size=(256, 256), folds=2, rows=grid, cols=grid))
"""


def map_scale(text: str) -> MapScale:
    """--heatmap-scale: "auto" or a number (the service's config checks the range)."""
    return "auto" if text == "auto" else float(text)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stale(folder: Path) -> bool:
    """A cached bundle written by another bundle format (refit, so the figures are today's code's)."""
    import yaml

    from edge_inspector.core.bundle import FORMAT_VERSION

    return yaml.safe_load((folder / "bundle.yaml").read_text()).get("format_version") != FORMAT_VERSION


def ensure_bundle(work: Path, grid: int) -> Path:
    """A PaDiM bundle with the package's default options, fit on the grid it will be run at."""
    folder = work / f"bundle-padim-{grid}x{grid}-256"
    if not (folder / "bundle.yaml").is_file() or stale(folder):
        print(f"fitting a PaDiM bundle (default options, 256x256, {grid}x{grid} tiles) into {folder} ...", flush=True)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        subprocess.run([sys.executable, "-c", FIT_SCRIPT, str(work / "train"), str(folder), str(grid)], check=True,
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return folder


def describe_bundle(bundle: Bundle) -> str:
    meta = bundle.meta
    params = meta.model_params or {}
    return (f"{meta.model_kind} {bundle.model_id}: {meta.backbone}, d={meta.feature_dim}, "
            f"{params.get('projection', '?')} projection, stride {params.get('grid_stride', '?')}")


def ensure_video(work: Path, frames: int = 16) -> Path:
    path = work / f"line-{FRAME[1]}x{FRAME[0]}.avi"
    if not path.is_file():
        rng = np.random.default_rng(1)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (FRAME[1], FRAME[0]))
        for i in range(frames):
            writer.write(make_part(rng, FRAME, defect="spot" if i % 4 == 3 else None)[0])
        writer.release()
    return path


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else float("nan")


def bare_inference(bundle: Bundle, grid: int, frame: np.ndarray, threads: int, seconds: float,
                   workers: int = 1) -> tuple[list[float], float]:
    """ms of each `backend.infer` call on the frame's tile batch, and frames/s: with one worker, 1000 / the
    median call; with several (model.workers), that many threads calling one backend at once, calls / s."""
    backend = create_backend(bundle, "onnxruntime", threads)
    tiles = Tiler(grid, grid, bundle.input_size).split(frame)
    backend.infer(tiles)
    times: list[float] = []
    end = time.monotonic() + seconds

    def calls() -> None:
        while time.monotonic() < end or len(times) < 5:
            start = time.perf_counter()
            backend.infer(tiles)
            times.append((time.perf_counter() - start) * 1000)

    began = time.monotonic()
    threads_ = [threading.Thread(target=calls) for _ in range(workers)]
    for thread in threads_:
        thread.start()
    for thread in threads_:
        thread.join()
    elapsed = time.monotonic() - began
    backend.close()
    return times, (1000 / pct(times, 50) if workers == 1 else len(times) / elapsed)


def isolated_overhead(bundle_path: Path, video: Path, grid: int, threads: int, heatmap_scale: MapScale = "auto",
                      frames: int = 12) -> dict[str, float]:
    """Each pipeline step timed one after the other on one thread (no stage competing with inference)."""
    from edge_inspector.core.decision import DecisionParams
    from edge_inspector.core.inspect import Inspector
    from edge_inspector.service.app import load_model
    from edge_inspector.service.config import PublishConfig
    from edge_inspector.service.pipeline import InferenceEngine
    from edge_inspector.service.publisher import Publisher
    from edge_inspector.service.sources import Frame

    config = parse_config({"tiling": {"rows": grid, "cols": grid},
                           "model": {"bundle": str(bundle_path), "backend": "onnxruntime", "threads": threads}})
    model = load_model(config)
    engine = InferenceEngine(Inspector(model, DecisionParams(threshold=model.bundle.threshold)), heatmap_scale)
    publisher = Publisher(PublishConfig(endpoint=f"tcp://127.0.0.1:{free_port()}", control_endpoint=None),
                          "bench", health=dict)
    times: dict[str, list[float]] = {k: [] for k in ("decode", "tiling", "inference", "decision", "publish")}
    with Subscriber(publisher.endpoint, ("inspection.",)) as subscriber:
        capture = cv2.VideoCapture(str(video))
        for i in range(frames + 1):
            start = time.perf_counter()
            ok, image = capture.read()
            if not ok:
                capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, image = capture.read()
            read_ms = (time.perf_counter() - start) * 1000
            result = engine.process(Frame(image, i, time.time(), time.monotonic(), read_ms))
            start = time.perf_counter()
            publisher.send(result)  # heatmap PNG + JSON header + ZeroMQ send
            publish_ms = (time.perf_counter() - start) * 1000
            subscriber.receive(5.0)
            if i == 0:
                continue  # warm-up
            times["decode"].append(read_ms)
            times["publish"].append(publish_ms)
            for key in ("tiling", "inference", "decision"):
                times[key].append(result.timings[key])
        capture.release()
    publisher.close()
    model.backend.close()
    return {k: float(np.median(v)) for k, v in times.items()}


def run_service(bundle: Path, video: Path, grid: int, threads: int, seconds: float, fps: float | None,
                rss_every: float = 0.0, heatmap_scale: MapScale = "auto", workers: int = 1) -> dict:
    """Run the service in-process on the looping video; collect headers and arrival times over ZeroMQ."""
    data = {"camera": {"id": "bench", "source": str(video), "loop": True, "fps": fps},
            "tiling": {"rows": grid, "cols": grid},
            "model": {"bundle": str(bundle), "backend": "onnxruntime", "threads": threads, "workers": workers},
            "pipeline": {"when_behind": "wait" if fps is None else "drop", "queue_size": 2},
            "publish": {"endpoint": f"tcp://127.0.0.1:{free_port()}", "control_endpoint": None,
                        "health_interval_s": 5.0, "wait_for_subscriber_s": 30.0, "heatmap_scale": heatmap_scale},
            "logging": {"level": "WARNING"}}
    service = Service(parse_config(data))
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False}, daemon=True)
    headers, arrivals, rss = [], [], []
    with Subscriber(data["publish"]["endpoint"], ("inspection.",)) as subscriber:
        runner.start()
        first = None
        next_rss = 0.0
        while True:
            message = subscriber.receive(1.0)
            now = time.time()
            if message is None:
                continue
            if first is None:  # measure from the first result: start-up and warm-up are excluded
                first = time.monotonic()
            headers.append(message.header)
            arrivals.append(now)
            elapsed = time.monotonic() - first
            if rss_every and elapsed >= next_rss:
                rss.append((elapsed, rss_mb()))
                next_rss += rss_every
            if elapsed >= seconds:
                break
        span = time.monotonic() - first
        service.stop()
        runner.join(30)
    latency = [(a - h["capture_time"]) * 1000 for a, h in zip(arrivals, headers)]
    stages = {k: [h["latency_ms"].get(k, 0.0) for h in headers] for k in
              ("capture", "queue", "tiling", "inference", "decision", "encode", "total")}
    verdicts = {v: sum(h["verdict"] == v for h in headers) for v in ("pass", "fail", "error")}
    return {"fps": (len(headers) - 1) / span if span > 0 else 0.0, "count": len(headers), "latency": latency,
            "stages": stages, "dropped": service.stats.dropped, "rss": rss, "verdicts": verdicts}


TABLE_HEAD = ("| grid | bare inference of the tile batch | service throughput | pipeline overhead | latency p50 / p99 "
              "(capture -> subscriber) | steps alone: decode / tiling / stitch+decision / publish (% of inference) "
              "| load |\n|---|---|---|---|---|---|---|")


def report_grid(bundle_path: Path, video: Path, grid: int, threads: int, seconds: float,
                heatmap_scale: MapScale = "auto", workers: int = 1) -> str:
    """Print one grid's figures; return its README table row."""
    bundle = Bundle.load(bundle_path)
    capture = cv2.VideoCapture(str(video))
    frame = capture.read()[1]
    capture.release()
    load = os.getloadavg()[0]
    # Bare inference right before and right after the throughput run, pooled: on a shared VM one block alone
    # moved by 25% between runs (38.0 vs 49.5 ms at 2x2) and with it the overhead figure.
    before, before_fps = bare_inference(bundle, grid, frame, threads, seconds / 4, workers)
    throughput = run_service(bundle_path, video, grid, threads, seconds, fps=None, heatmap_scale=heatmap_scale,
                             workers=workers)
    after, after_fps = bare_inference(bundle, grid, frame, threads, seconds / 4, workers)
    bare = before + after
    paced_fps = max(0.2, 0.7 * throughput["fps"])
    paced = run_service(bundle_path, video, grid, threads, seconds, fps=paced_fps, heatmap_scale=heatmap_scale,
                        workers=workers)
    stages = {k: float(np.mean(v)) for k, v in paced["stages"].items()}
    alone = isolated_overhead(bundle_path, video, grid, threads, heatmap_scale)
    steps = alone["decode"] + alone["tiling"] + alone["decision"] + alone["publish"]
    bare_fps = 1000 / pct(bare, 50) if workers == 1 else (before_fps + after_fps) / 2
    one_stream = ""
    if workers > 1:  # the other way to use the cores: one worker on all of them
        cores = os.cpu_count() or 1
        single = bare_inference(bundle, grid, frame, cores, seconds / 4)[1]
        one_stream = (f"; one worker on {cores} threads, bare: {single:.2f} frames/s (overhead against "
                      f"{100 * (single / throughput['fps'] - 1):.1f}%)")
    overhead = 100 * (bare_fps / throughput["fps"] - 1) if throughput["fps"] > 0 else float("nan")
    verdicts = paced["verdicts"]
    print(f"\n== 1280x1024 frames, {grid}x{grid} tiles -> {grid * grid} x 256x256, ONNX Runtime {threads} threads "
          f"x {workers} worker(s), "
          f"heatmap_scale {heatmap_scale}; load average {load:.1f} -> {os.getloadavg()[0]:.1f} ==")
    print(f"bundle: {describe_bundle(bundle)}")
    print(f"bare inference, {grid * grid}-tile batch : p50 {pct(bare, 50):7.1f} ms  p99 {pct(bare, 99):7.1f} ms  "
          f"-> {bare_fps:5.2f} frames/s (medians before / after the service run: {pct(before, 50):.1f} / "
          f"{pct(after, 50):.1f} ms; frames/s before / after {before_fps:.2f} / {after_fps:.2f}{one_stream})")
    print(f"service throughput (lossless)   : {throughput['fps']:5.2f} frames/s, {throughput['count']} results")
    print(f"pipeline overhead               : {overhead:.1f}% (bare frames/s / service frames/s - 1)")
    print(f"service latency at {paced_fps:4.2f} fps     : p50 {pct(paced['latency'], 50):7.1f} ms  "
          f"p99 {pct(paced['latency'], 99):7.1f} ms  (capture -> received by subscriber), "
          f"{paced['dropped']} dropped, verdicts {verdicts}")
    print("per-frame stage means (paced run, wall time beside inference): "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items()))
    print("each step alone, one thread (medians): " + ", ".join(f"{k} {v:.1f} ms" for k, v in alone.items()))
    print(f"CPU cost of the steps around inference: decode + tiling + stitch/decision + PNG/JSON/ZeroMQ publish = "
          f"{steps:.1f} ms = {100 * steps / alone['inference']:.1f}% of inference (decode, tiling and publish "
          f"overlap inference in the service)")
    return (f"| {grid}x{grid} | {pct(bare, 50):.1f} ms ({bare_fps:.1f} frames/s) | {throughput['fps']:.2f} frames/s "
            f"| {overhead:.1f}% | {pct(paced['latency'], 50):.1f} / {pct(paced['latency'], 99):.1f} ms at "
            f"{paced_fps:.1f} fps | {alone['decode']:.1f} / {alone['tiling']:.1f} / {alone['decision']:.1f} / "
            f"{alone['publish']:.1f} ms ({100 * steps / alone['inference']:.0f}%) | {load:.1f} |")


def report_rss(bundle_path: Path, video: Path, threads: int, minutes: float) -> None:
    seconds = minutes * 60
    probe = run_service(bundle_path, video, 2, threads, min(10.0, seconds / 4), fps=None)
    run = run_service(bundle_path, video, 2, threads, seconds, fps=max(0.2, 0.8 * probe["fps"]),
                      rss_every=max(2.0, seconds / 30))
    samples = run["rss"]
    print(f"\n== RSS over {minutes:g} min (2x2, {run['count']} frames at {run['fps']:.2f} fps) ==")
    print("t (s) : RSS (MB)  " + "  ".join(f"{t:.0f}:{m:.0f}" for t, m in samples))
    settled = [m for t, m in samples if t >= 0.2 * seconds] or [m for _, m in samples]
    growth = 100 * (settled[-1] - settled[0]) / settled[0]
    print(f"RSS after warm-up {settled[0]:.1f} MB -> end {settled[-1]:.1f} MB: {growth:+.2f}% "
          f"(max {max(settled):.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edge-inspector-bench",
                        help="cache folder for the bundle and video")
    parser.add_argument("--bundle", type=Path, default=None, help="use this bundle instead of fitting one")
    parser.add_argument("--grids", default="2,4", help="comma-separated n for n x n tile grids")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="model.workers: frames judged at once")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per run")
    parser.add_argument("--minutes", type=float, default=0.5, help="length of the RSS run (0: skip)")
    parser.add_argument("--heatmap-scale", type=map_scale, default="auto", help="publish.heatmap_scale: 0.05-1 or auto")
    parser.add_argument("--rss-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    grids = [int(g) for g in args.grids.split(",")]
    video = ensure_video(args.work)
    if args.rss_only:
        report_rss(args.bundle or ensure_bundle(args.work, 2), video, args.threads, args.minutes)
        return
    bundles = {grid: args.bundle or ensure_bundle(args.work, grid) for grid in grids}
    print(f"video {video}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    rows = [report_grid(bundles[grid], video, grid, args.threads, args.seconds, args.heatmap_scale, args.workers)
            for grid in grids]
    print(f"\nheatmap_scale {args.heatmap_scale}, ONNX Runtime {args.threads} threads x {args.workers} worker(s):"
          f"\n{TABLE_HEAD}")
    print("\n".join(rows))
    if args.minutes > 0:  # a fresh process, so the RSS is one service's, not this run's leftovers
        subprocess.run([sys.executable, __file__, "--rss-only", "--work", str(args.work), "--bundle",
                        str(bundles.get(2) or ensure_bundle(args.work, 2)), "--threads", str(args.threads),
                        "--minutes", str(args.minutes)], check=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} (figures scale with it on a shared machine)")


if __name__ == "__main__":
    main()
