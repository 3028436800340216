"""`edge-export demo`: the whole loop on a generated conveyor, no camera and no download needed.

1. Record: a "camera" films two lanes of washers passing under it, one pair per frame, about a quarter of
   the parts defective (scratch, spot or missing chunk); the generator's ground truth is kept. A second,
   all-good recording stands for the footage a line engineer would collect to train on.
2. Fit: PaDiM on the good recording's frames, tiled exactly as the service will tile them (1 x 2: one
   tile per lane).
3. Serve: the real service (`edge-inspector run --config demo.yaml`, a subprocess) plays the video as its
   camera and publishes over ZeroMQ; this process subscribes and prints PASS/FAIL as results arrive.
4. Summary: frames, fails, the fails the generator expected, and how often the two agree.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import cv2
import numpy as np
import yaml

import edge_inspector
from edge_inspector.tools.subscriber import Subscriber, format_health, format_result
from export.synthetic import DEFECT_KINDS, make_part

PART_SIZE = 160  # pixels per lane; also the model input size, so tiles are not rescaled
LANES = 2


@dataclass
class Recording:
    path: Path
    defective: list[bool]  # per frame: does any part in it have a defect
    kinds: list[list[str]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def record(path: Path, frames: int, fps: float, defect_rate: float, rng: np.random.Generator) -> Recording:
    """Write an MJPG video of `frames` frames, LANES parts side by side per frame."""
    width, height = PART_SIZE * LANES, PART_SIZE
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise click.ClickException(f"{path}: OpenCV cannot write MJPG video here")
    defective, kinds = [], []
    for _ in range(frames):
        parts, frame_kinds = [], []
        for _lane in range(LANES):
            kind = str(rng.choice(DEFECT_KINDS)) if rng.random() < defect_rate else None
            parts.append(make_part(rng, PART_SIZE, defect=kind)[0])
            if kind:
                frame_kinds.append(kind)
        writer.write(np.hstack(parts))
        defective.append(bool(frame_kinds))
        kinds.append(frame_kinds)
    writer.release()
    return Recording(path, defective, kinds)


def extract_frames(video: Path, folder: Path) -> int:
    """Decode a recording into PNGs: training sees the same MJPG artefacts as the live stream."""
    folder.mkdir(parents=True, exist_ok=True)
    capture = cv2.VideoCapture(str(video))
    count = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        cv2.imwrite(str(folder / f"{count:04d}.png"), frame)
        count += 1
    capture.release()
    return count


def write_config(out: Path, video: Path, bundle: Path, fps: float) -> tuple[Path, str]:
    """Write out/demo.yaml. Paths in a service config resolve relative to the config file, so they are
    written relative to `out` (the config's own folder): the demo folder can be moved or copied as a whole."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = {
        "camera": {"id": "demo", "source": _relative_to(video, out), "kind": "file", "fps": fps},
        "tiling": {"rows": 1, "cols": LANES},
        "model": {"bundle": _relative_to(bundle, out), "backend": "onnxruntime", "threads": 2},
        "decision": {"min_defect_area": 0},
        "pipeline": {"queue_size": 4},
        "publish": {"endpoint": endpoint, "control_endpoint": f"tcp://127.0.0.1:{free_port()}",
                    "heatmap": "png", "health_interval_s": 2.0, "wait_for_subscriber_s": 30.0},
        "archive": {"enabled": True, "folder": "archive", "max_files": 200},
        "logging": {"level": "INFO"},
    }
    path = out / "demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, endpoint


def _relative_to(path: Path, folder: Path) -> str:
    """`path` as the config file in `folder` must name it (config paths resolve relative to the config)."""
    return os.path.relpath(Path(path).resolve(), Path(folder).resolve())


def service_error_line(log_path: Path) -> str:
    """The service's own explanation of why it stopped: its `error:` line, else its last log line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as err:
        return f"(cannot read {log_path}: {err.strerror})"
    errors = [line for line in lines if line.startswith("error:") or " ERROR " in line or "Error" in line]
    return (errors or lines or ["(the service printed nothing)"])[-1]


def serve_and_watch(config: Path, endpoint: str, out: Path, timeout_s: float) -> tuple[dict[int, dict], dict, int]:
    """Run the service as a subprocess; print results as they arrive. Returns results by frame, last health, rc."""
    env = dict(os.environ)
    repo = str(Path(edge_inspector.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    results: dict[int, dict] = {}
    health: dict = {}
    with open(out / "service.log", "w") as log_file, Subscriber(endpoint) as subscriber:
        process = subprocess.Popen([sys.executable, "-m", "edge_inspector.cli", "run", "--config", str(config)],
                                   stdout=log_file, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                message = subscriber.receive(0.5)
                if message is None:
                    if process.poll() is not None:
                        break
                    continue
                if message.is_result:
                    results[message.header["frame_index"]] = message.header
                    click.echo(format_result(message.header))
                else:
                    health = message.header
                    click.echo(format_health(message.header))
        finally:
            if process.poll() is None:
                process.terminate()
            rc = process.wait(15)
    return results, health, rc


def replay_check(line: Recording, out: Path, bundle) -> None:
    """Score the decoded conveyor frames offline against the generator's labels and print the metrics."""
    from edge_inspector.backends import create_backend
    from edge_inspector.tools.replay import replay_folder, write_results

    frames = out / "replay" / "frames"
    count = extract_frames(line.path, frames)
    labels = out / "replay" / "labels.csv"
    rows = ["path,label"] + [f"frames/{i:04d}.png,{int(line.defective[i])}" for i in range(count)]
    labels.write_text("\n".join(rows) + "\n")
    summary = replay_folder(frames, bundle, create_backend(bundle, "onnxruntime"), labels_csv=labels)
    write_results(out / "replay" / "results.csv", summary.rows)
    if summary.report is not None:
        click.echo("      " + summary.report.format_table().replace("\n", "\n      "))


@click.command("demo")
@click.option("--out", "out_dir", default="demo-output", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the video, training frames, bundle, config, archive and log.")
@click.option("--frames", default=60, show_default=True, type=click.IntRange(5, 100000), help="Frames to inspect.")
@click.option("--train-frames", default=30, show_default=True, type=click.IntRange(4, 100000),
              help="Good frames to fit on.")
@click.option("--fps", default=8.0, show_default=True, type=click.FloatRange(0.5, 120), help="Camera frame rate.")
@click.option("--defect-rate", default=0.25, show_default=True, type=click.FloatRange(0, 1),
              help="Probability that a part is defective.")
@click.option("--seed", default=0, show_default=True, type=int)
def demo_command(out_dir: str, frames: int, train_frames: int, fps: float, defect_rate: float, seed: int) -> None:
    """Generate a conveyor video, fit a model on good frames, run the service on it and watch the results."""
    from export.padim.fit import PadimOptions, fit_padim

    started = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    click.echo(f"[1/5] recording {train_frames} good frames and a {frames}-frame conveyor video into {out}/")
    good = record(out / "good_footage.avi", train_frames, fps, 0.0, rng)
    line = record(out / "conveyor.avi", frames, fps, defect_rate, rng)
    (out / "ground_truth.json").write_text(json.dumps(
        {"video": line.path.name, "frames": [{"index": i, "defective": d, "defects": k}
                                             for i, (d, k) in enumerate(zip(line.defective, line.kinds))]}, indent=1))
    extract_frames(good.path, out / "train" / "good")

    click.echo("[2/5] fitting PaDiM on the good frames (1x2 tiles, shared statistics)")
    options = PadimOptions(input_size=(PART_SIZE, PART_SIZE), feature_dim=50, seed=seed, folds=3,
                           rows=1, cols=LANES, tile_mode="shared")
    bundle = fit_padim(out / "train" / "good", out / "bundle", options)
    click.echo(f"      bundle {bundle.model_id}, threshold {bundle.threshold:.4g} ({bundle.meta.threshold.rule})")

    click.echo("[3/5] offline check: replaying the conveyor frames with their labels (edge-inspector replay)")
    replay_check(line, out, bundle)

    config, endpoint = write_config(out, line.path, out / "bundle", fps)
    click.echo(f"[4/5] starting the service (edge-inspector run --config {config}); results from {endpoint}:")
    results, health, rc = serve_and_watch(config, endpoint, out, timeout_s=max(120.0, 4 * frames / fps))

    if rc != 0 or not results:
        # A summary of zeros would hide the cause: show the service's own words and fail loudly.
        click.echo("[5/5] FAILED: the service " + (f"exited with code {rc}" if rc != 0 else "published no results"),
                   err=True)
        click.echo(f"      service says: {service_error_line(out / 'service.log')}", err=True)
        click.echo(f"      full log: {out / 'service.log'}", err=True)
        raise SystemExit(1)
    print_summary(line, results, health, frames)
    click.echo(f"      service exit code {rc}; log {out / 'service.log'}; failed frames in {out / 'archive'}")
    click.echo(f"      took {time.monotonic() - started:.0f} s")


def print_summary(line: Recording, results: dict[int, dict], health: dict, frames: int) -> None:
    """Compare the verdicts the subscriber received with the generator's ground truth."""
    expected = sum(line.defective)
    fails = sum(1 for h in results.values() if h["verdict"] == "fail")
    errors = sum(1 for h in results.values() if h["verdict"] == "error")
    agree = sum(1 for i, h in results.items() if (h["verdict"] == "fail") == line.defective[i])
    missed = sum(1 for i, h in results.items() if line.defective[i] and h["verdict"] != "fail")
    false_rejects = sum(1 for i, h in results.items() if not line.defective[i] and h["verdict"] == "fail")
    click.echo("[5/5] summary")
    click.echo(f"      frames in video   {frames}")
    click.echo(f"      results received  {len(results)} (dropped by the service: {health.get('dropped', 'n/a')})")
    click.echo(f"      fails             {fails} (expected {sum(line.defective[i] for i in results)} among "
               f"those frames, {expected} in the whole video)")
    click.echo(f"      missed defects    {missed}, false rejects {false_rejects}, errors {errors}")
    click.echo(f"      agreement         {agree}/{len(results)} = {100.0 * agree / len(results):.1f}%")
