"""Resource exhaustion degrades, never kills: a service under a lowered descriptor limit, flooded with idle
TCP connections on its control or results port, keeps running, reports the shortage in health, drops the
idle connections itself (ZeroMQ handshake timeout) and recovers while the attacker still holds them.
The full-size attack (1,100 connections, 1024 fds) is benchmarks/hardening_bench.py's."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import yaml

from edge_inspector.core.wire import HANDSHAKE_MS
from edge_inspector.tools.subscriber import Subscriber
from service_helpers import REPO, config_data, conveyor_frames, subprocess_env

FD_LIMIT = 256
CONNECTIONS = 300


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _flood(endpoint: str, count: int) -> list[socket.socket]:
    host, port = endpoint.split("//")[1].rsplit(":", 1)
    held = []
    for _ in range(count):
        connection = socket.create_connection((host, int(port)), timeout=5)
        held.append(connection)
    return held


def _dropped_by_the_service(connection: socket.socket) -> bool:
    """True when the service closed this connection (its ZMTP greeting bytes come first, then EOF)."""
    connection.settimeout(0.01)
    try:
        while chunk := connection.recv(4096):
            del chunk
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:  # reset by the service
        return True
    return True


@pytest.mark.slow
@pytest.mark.parametrize("port", ["control_endpoint", "endpoint"])
def test_idle_connections_past_the_fd_limit_degrade_and_recover(bundle, tmp_path, port):
    folder = tmp_path / "in"
    folder.mkdir()
    frames, _ = conveyor_frames(np.random.default_rng(3), 3, [False] * 3)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i}.png"), frame)
    data = config_data(str(folder), bundle.path, camera={"loop": True, "fps": 10.0},
                       publish={"wait_for_subscriber_s": 30.0})
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump(data))
    subscriber = Subscriber(data["publish"]["endpoint"])
    process = subprocess.Popen([sys.executable, "-m", "edge_inspector.cli", "run", str(config)],
                               env=subprocess_env(), cwd=REPO, preexec_fn=_limited, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    held: list[socket.socket] = []
    try:
        first = subscriber.receive(60)
        assert first is not None, "the service did not start"
        held = _flood(data["publish"][port], CONNECTIONS)
        flood_at = time.monotonic()
        short, recovered_results, recovered_health = False, 0, False
        deadline = flood_at + HANDSHAKE_MS / 1000 + 30
        while time.monotonic() < deadline and not (recovered_results >= 3 and recovered_health):
            if process.poll() is not None:
                pytest.fail(f"the service died (exit {process.returncode}):\n{process.communicate()[0][-3000:]}")
            message = subscriber.receive(0.5)
            if message is None:
                continue
            header = message.header
            problems = " ".join(header.get("problems") or [])
            short = short or "Too many open files" in problems or "Too many open files" in (header.get("error") or "")
            if short and time.monotonic() - flood_at > HANDSHAKE_MS / 1000:  # idle peers dropped by then
                if message.is_result and header["verdict"] in ("pass", "fail"):
                    recovered_results += 1
                recovered_health = recovered_health or (header.get("type") == "health" and header["ok"])
        assert short, "the shortage never showed in a result or in health"
        assert recovered_results >= 3 and recovered_health, "no recovery while the connections were held"
        assert process.poll() is None
        assert sum(_dropped_by_the_service(c) for c in held) >= CONNECTIONS - FD_LIMIT // 2
    finally:
        for connection in held:
            connection.close()
        subscriber.close()
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.slow
def test_a_memory_shortage_degrades_and_recovers(bundle, tmp_path):
    """The running service's address space is capped (prlimit RLIMIT_AS) just above what it uses, then a
    5000x5000 image arrives: its frames are error results, health names the shortage, the small parts are
    still judged, and once the cap is lifted everything is judged again; exit 0."""
    folder = tmp_path / "in"
    folder.mkdir()
    frames, _ = conveyor_frames(np.random.default_rng(4), 3, [False] * 3)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i}.png"), frame)
    data = config_data(str(folder), bundle.path, camera={"loop": True, "fps": 10.0},
                       publish={"wait_for_subscriber_s": 30.0})
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump(data))
    subscriber = Subscriber(data["publish"]["endpoint"])
    process = subprocess.Popen([sys.executable, "-m", "edge_inspector.cli", "run", str(config)],
                               env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)

    def headers(seconds: float) -> list[dict]:
        got, end = [], time.monotonic() + seconds
        while time.monotonic() < end and process.poll() is None:
            message = subscriber.receive(0.3)
            if message is not None:
                got.append(message.header)
        return got

    try:
        assert subscriber.receive(60) is not None, "the service did not start"
        with open(f"/proc/{process.pid}/status") as status:
            size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
        cv2.imwrite(str(folder / "1big.png"), np.zeros((5000, 5000, 3), np.uint8))  # 75 MB decoded
        resource.prlimit(process.pid, resource.RLIMIT_AS, (size + (64 << 20), resource.RLIM_INFINITY))
        limited = headers(8)
        resource.prlimit(process.pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        (folder / "1big.png").unlink()
        lifted = headers(14)
        assert process.poll() is None, "the service died"
    finally:
        subscriber.close()
        process.terminate()
        output = process.communicate(timeout=30)[0]
    results = [h for h in limited if h["type"] == "inspection"]
    assert any("Insufficient memory" in (h["error"] or "") for h in results)
    assert sum(h["verdict"] in ("pass", "fail") for h in results) >= 5  # the small parts still judged
    assert any(not h["ok"] and any("short of resources" in p for p in h["problems"])
               for h in limited + lifted if h["type"] == "health")
    assert sum(h["type"] == "inspection" and h["verdict"] in ("pass", "fail") for h in lifted[-20:]) >= 5
    assert any(h["type"] == "health" and h["ok"] for h in lifted[-10:])
    assert process.returncode == 0, output[-3000:]
