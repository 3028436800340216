"""Shared pieces for the edge-service tests: free ports, real MJPG videos, one real fitted PaDiM bundle.

The bundle is fitted once per test session (cached under pytest's session temp folder) on good frames
decoded from an MJPG recording plus lossless ones, so it knows both capture paths the tests use (videos
and PNG folders). Frames are two 128-px lanes side by side, tiled 1x2, each tile shrunk to 64x64: small
enough to fit in seconds on two cores, big enough that every defect kind clearly fails.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from edge_inspector.core.bundle import Bundle
from export.synthetic import make_part

REPO = Path(__file__).resolve().parent.parent
PART = 128
LANES = 2
INPUT_SIZE = (128, 128)
_fit_lock = threading.Lock()


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A free loopback port not handed out before in this test run.

    The kernel may give the port it just freed to the next bind, so two calls in a row could return the
    same port (it happened once: a service config got the same endpoint for results and control and was
    rightly refused); remembering what was given rules that out.
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def conveyor_frames(rng: np.random.Generator, count: int,
                    defects: list[bool] | float) -> tuple[list[np.ndarray], list[bool]]:
    """`count` frames of LANES parts; `defects` is a per-frame list or a per-part probability."""
    frames, truth = [], []
    kinds = ("scratch", "spot", "missing")
    for i in range(count):
        if isinstance(defects, list):
            lane_defect = [None] * LANES
            if defects[i]:
                lane_defect[i % LANES] = kinds[i % 3]
        else:
            lane_defect = [kinds[int(rng.integers(3))] if rng.random() < defects else None for _ in range(LANES)]
        frames.append(np.hstack([make_part(rng, PART, defect=k)[0] for k in lane_defect]))
        truth.append(any(lane_defect))
    return frames, truth


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened(), "OpenCV cannot write MJPG"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def read_video(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def fitted_bundle(base: Path) -> Bundle:
    """The session's real PaDiM bundle (fit on first use, then loaded from the cache folder)."""
    folder = base / "padim-1x2"
    with _fit_lock:
        if (folder / "bundle.yaml").is_file():
            return Bundle.load(folder)
        from export.padim.fit import PadimOptions, fit_padim

        rng = np.random.default_rng(1234)
        frames, _ = conveyor_frames(rng, 10, [False] * 10)
        train = base / "padim-train" / "good"
        train.mkdir(parents=True, exist_ok=True)
        video = write_video(base / "padim-train" / "good.avi", frames)
        for i, frame in enumerate(read_video(video)):
            cv2.imwrite(str(train / f"{i:03d}.png"), frame)
        # Tests feed both decoded video and lossless PNG frames: train on both, as a line engineer would
        # train on footage from the same capture path the service sees.
        for i, frame in enumerate(conveyor_frames(rng, 10, [False] * 10)[0]):
            cv2.imwrite(str(train / f"raw{i:03d}.png"), frame)
        options = PadimOptions(input_size=INPUT_SIZE, feature_dim=50, seed=0, folds=2, rows=1, cols=LANES,
                               tile_mode="shared")
        return fit_padim(train, folder, options)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    env.pop("WATCHDOG_PID", None)
    env.update(extra)
    return env


class FlakyVideoServer:
    """Serves a video file over HTTP like an IP camera, cutting the first `cut` connections half-way.

    A real network stream that dies mid-stream: OpenCV's FFmpeg backend reads it over a real socket and
    sees the connection close early, exactly as when a camera's cable is pulled.
    """

    def __init__(self, video: Path, cut: int = 1):
        import http.server
        import socketserver

        data = video.read_bytes()
        server = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                server.requests += 1
                body = data[: len(data) // 2] if server.requests <= cut else data
                self.send_response(200)
                self.send_header("Content-Type", "video/x-msvideo")
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{video.name}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FlakyVideoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


UNPRIVILEGED_UID = 65534  # nobody


def shared_folder(prefix: str) -> Path:
    """A fresh folder any user can traverse (pytest's tmp_path is private to the user running the tests)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    folder.chmod(0o755)
    return folder


_DROP_PRIVILEGES = """
import os, sys
import cv2, numpy, onnxruntime, yaml, zmq, click  # imported while the interpreter's folders are readable
import edge_inspector.cli, edge_inspector.service.app, edge_inspector.backends.onnxruntime
if os.geteuid() == 0:
    os.setgroups([])
    os.setresgid({uid}, {uid}, {uid})
    os.setresuid({uid}, {uid}, {uid})
"""


def unprivileged_run(code: str, *args: str, timeout: float = 120):
    """Run Python code as a user without root's permission bypass, so file modes are really enforced.

    Root reads a mode-000 file without complaint, but the service runs as an unprivileged user. When the
    tests run as root, the child imports what it needs first (the interpreter may live in root's private
    home) and then drops to `nobody` for good before running `code`; otherwise it runs as the current user.
    """
    import subprocess

    script = _DROP_PRIVILEGES.format(uid=UNPRIVILEGED_UID) + code
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), cwd="/tmp")


CLI_CODE = "sys.argv[0] = 'edge-inspector'; edge_inspector.cli.main()"


def copy_world_readable(source: Path, target: Path) -> Path:
    """Copy a folder tree with folders 0755 and files 0644 (what an installed bundle looks like)."""
    import shutil

    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def config_data(source: str, bundle_path: Path, **sections) -> dict:
    data = {
        "camera": {"id": "line9", "source": source, "reconnect_initial_s": 0.1, "reconnect_max_s": 0.5},
        "tiling": {"rows": 1, "cols": LANES},
        "model": {"bundle": str(bundle_path), "backend": "onnxruntime", "threads": 2},
        "publish": {"endpoint": endpoint(), "control_endpoint": endpoint(), "health_interval_s": 0.3},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class NotifyListener:
    """The systemd side of sd_notify: a unix datagram socket that records every notification."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="sdn", dir="/tmp")  # unix socket paths must stay short
        self.path = os.path.join(self.folder, "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                data = self.socket.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def seen(self, key: str) -> list[dict[str, str]]:
        return [m for m in self.messages if key in m]

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.socket.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class SilentCamera:
    """A network camera that accepts the connection and then never answers: a hung driver, in effect."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/stream.avi"
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.held.append(connection)

    def close(self):
        self.server.close()
        for connection in self.held:
            connection.close()


def systemd_exposure(unit_file: Path, instance: str, folder: Path) -> float:
    """`systemd-analyze security --offline` of a unit file under an instance name (as systemctl sees it);
    skips the calling test where this systemd-analyze has no offline mode."""
    import pytest

    unit = folder / instance
    unit.write_text(unit_file.read_text())
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                          text=True, timeout=120)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout + done.stderr)
    if match is None and "offline" in done.stderr:
        pytest.skip("this systemd-analyze has no --offline mode")
    assert match is not None, done.stdout[-2000:] + done.stderr[-2000:]
    return float(match.group(1))
