"""Trigger modes: latency from an external trigger to the published verdict, and presence mode's cost per frame.

    python benchmarks/trigger_bench.py                 # ~2 min after the bundle fit (cached in --work)
    python benchmarks/trigger_bench.py --triggers 100 --grid 1

* triggered latency: the service (camera.trigger external) on an MJPG 1280x1024 video replayed at --fps as
  a free-running camera, ONNX Runtime on --threads threads, batch 1 (one frame, its --grid x --grid tiles);
  a client sends `trigger` on the control socket (one REQ socket, kept open) every --interval seconds and a
  subscriber in this process takes the result: time from just before the send to the result received,
  p50/p99. It includes waiting for the next camera frame (up to 1/fps), decode, inference and PNG encode.
* presence cost: PresenceGate (service/triggers.py) alone on the decoded 1280x1024 frames and on 320x128
  ones, milliseconds per frame (what it adds to the capture thread).

Uses service_bench's cached bundle and video (the package's PaDiM defaults at 256x256).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from service_bench import ensure_bundle, ensure_video, free_port, pct  # noqa: E402

from edge_inspector.service.app import Service  # noqa: E402
from edge_inspector.service.config import parse_config  # noqa: E402
from edge_inspector.service.sources import Frame  # noqa: E402
from edge_inspector.service.triggers import PresenceGate, PresenceSettings  # noqa: E402
from edge_inspector.tools.subscriber import Subscriber  # noqa: E402


def triggered_latency(bundle: Path, video: Path, grid: int, threads: int, fps: float, count: int,
                      interval: float) -> tuple[list[float], dict[str, list[float]]]:
    results_at, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    config = parse_config({
        "camera": {"id": "bench", "source": str(video), "fps": fps, "loop": True, "trigger": "external"},
        "tiling": {"rows": grid, "cols": grid},
        "model": {"bundle": str(bundle), "backend": "onnxruntime", "threads": threads},
        "publish": {"endpoint": results_at, "control_endpoint": control, "wait_for_subscriber_s": 30.0}})
    service = Service(config)
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False})
    latencies: list[float] = []
    parts: dict[str, list[float]] = {"wait for the frame": [], "inference": [], "total in the service": []}
    with Subscriber(results_at, ("inspection.",)) as subscriber:
        runner.start()
        while service.camera is None or service.camera.state != "connected":
            time.sleep(0.05)
        time.sleep(1.0)
        request = zmq.Context.instance().socket(zmq.REQ)
        request.setsockopt(zmq.LINGER, 0)
        request.connect(control)
        try:
            for i in range(count):
                sent = time.perf_counter()
                request.send(json.dumps({"command": "trigger", "part_id": f"B-{i}"}).encode())
                reply = json.loads(request.recv())
                assert reply["ok"], reply
                message = subscriber.receive(30)
                assert message is not None and message.header["part_id"] == f"B-{i}", "result missing"
                latencies.append((time.perf_counter() - sent) * 1000.0)
                header = message.header
                parts["wait for the frame"].append((header["capture_time"] - header["trigger_time"]) * 1000.0)
                parts["inference"].append(header["latency_ms"]["inference"])
                parts["total in the service"].append(header["latency_ms"]["total"])
                time.sleep(max(0.0, interval - (time.perf_counter() - sent)))
        finally:
            request.close(0)
            service.stop()
            runner.join(30)
    return latencies, parts


def presence_cost(frames: list[np.ndarray], repeats: int) -> float:
    """Median milliseconds per frame of the presence gate on these frames (ROI: the middle third)."""
    height, width = frames[0].shape[:2]
    settings = PresenceSettings(roi=(width // 3, 0, width // 3, height), threshold=25.0, min_area=0.05,
                                frames_on=2, frames_off=2, max_s=10.0, background_frames=5)
    gate = PresenceGate(settings, "bench")
    stream = (Frame(image=frames[i % len(frames)], index=i, capture_time=0.0, capture_mono=time.monotonic(),
                    capture_ms=0.0) for i in range(5 + repeats))
    times: list[float] = []
    for frame in stream:
        started = time.perf_counter()
        gate._look(frame)
        times.append((time.perf_counter() - started) * 1000.0)
    return float(np.median(times[5:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edge-inspector-bench")
    parser.add_argument("--grid", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fps", type=float, default=30.0, help="the camera's frame rate")
    parser.add_argument("--triggers", type=int, default=40)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between triggers")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = ensure_bundle(args.work, args.grid)
    video = ensure_video(args.work)
    capture = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    small = [cv2.resize(frame, (320, 128), interpolation=cv2.INTER_AREA) for frame in frames]
    print(f"presence gate, ms per frame (median of 200): 1280x1024 {presence_cost(frames, 200):.2f}, "
          f"320x128 {presence_cost(small, 200):.2f}", flush=True)
    latencies, parts = triggered_latency(bundle, video, args.grid, args.threads, args.fps, args.triggers, args.interval)
    print(f"trigger -> verdict received ({args.triggers} triggers, {args.grid}x{args.grid} tiles of 256x256, batch 1, "
          f"{args.threads} ONNX Runtime threads, camera at {args.fps:g} fps): p50 {pct(latencies, 50):.1f} ms, "
          f"p99 {pct(latencies, 99):.1f} ms, max {max(latencies):.1f} ms")
    print("  of which (p50): " + ", ".join(f"{name} {pct(values, 50):.1f} ms" for name, values in parts.items()))


if __name__ == "__main__":
    main()
