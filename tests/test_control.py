"""The control socket of a real running service survives anything a local process sends it.

Real sockets on loopback, the real Service on a looping video with the session's real PaDiM bundle. After
every hostile request the service must still answer `status`, its control thread must be alive and the
systemd-facing health must be clean.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zmq

from edge_inspector.core.errors import ConfigError
from edge_inspector.core.wire import MAX_CONTROL_MESSAGE, send_control
from edge_inspector.service.app import Service
from edge_inspector.service.config import parse_config
from edge_inspector.service.control import parse_request
from edge_inspector.tools.control import build_request
from edge_inspector.tools.subscriber import Subscriber
from service_helpers import (
    LANES,
    REPO,
    conveyor_frames,
    endpoint,
    fitted_bundle,
    subprocess_env,
    write_video,
)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """One service for the whole module: started once, stopped at the end, nothing left running."""
    base = tmp_path_factory.getbasetemp()
    bundle = fitted_bundle(base)
    frames, _ = conveyor_frames(np.random.default_rng(31), 4, [False, True] * 2)
    video = write_video(tmp_path_factory.mktemp("control") / "line.avi", frames)
    data = {"camera": {"id": "ctl", "source": str(video), "fps": 5.0, "loop": True},
            "tiling": {"rows": 1, "cols": LANES},
            "model": {"bundle": str(bundle.path), "backend": "onnxruntime", "threads": 1},
            "publish": {"endpoint": endpoint(), "control_endpoint": endpoint(), "health_interval_s": 0.5}}
    service = Service(parse_config(data))
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False}, daemon=True)
    runner.start()
    assert service.ready.wait(60), "service did not start"
    yield service, data["publish"]["control_endpoint"], data["publish"]["endpoint"], bundle
    service.stop()
    runner.join(30)
    assert not runner.is_alive()


def still_answers(service, address: str) -> None:
    status = send_control(address, "status", timeout_s=10)
    assert status["ok"] and status["camera_id"] == "ctl"
    assert service.control.thread.is_alive()
    assert not any("control" in p for p in service.problems())


def dealer(address: str) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 5000)
    socket.connect(address)
    return socket


def test_multi_frame_and_envelope_less_requests_get_error_replies(running):
    service, address, _, _ = running
    with zmq.Context.instance().socket(zmq.REQ) as req:  # the 2-frame request that used to kill the thread
        req.setsockopt(zmq.RCVTIMEO, 5000)
        req.connect(address)
        req.send_multipart([b"status", b"extra"])
        assert json.loads(req.recv()) == {"ok": False, "error": "request must be one frame, got 2"}
    with dealer(address) as raw:
        raw.send(b"status")  # no empty delimiter: answered all the same
        assert json.loads(raw.recv())["ok"] is True
        raw.send_multipart([b""] * 5)
        assert json.loads(raw.recv_multipart()[-1])["ok"] is False
        raw.send_multipart([b"", b""])  # an empty request
        assert json.loads(raw.recv_multipart()[-1])["error"] == "empty request"
    still_answers(service, address)


@pytest.mark.parametrize("payload, expected", [
    (b"[" * 30000, "nested too deeply"),
    (b'{"command": "status", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}", "nested too deeply"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"[1, 2, 3]", '"command" string'),
    (b"42", "unknown command '42'"),
    (b'{"command": 7}', '"command" string'),
    (b'"status"', None),  # a JSON string holding the bare words
    (b"launch " + b"x" * 50000, "unknown command 'launch'"),
    (b'{"command": "' + b"z" * 60000 + b'"}', "unknown command 'zzzz"),
    (b'{"command": "set_threshold", "value": 1e400}', "finite number"),
    (b'{"command": "set_threshold", "value": NaN}', "finite number"),
    (b"set_threshold Infinity", "finite number"),
    (b'{"command": "set_threshold", "value": {"a": [1]}}', "finite number"),
    (b'{"command": "set_threshold", "value": true}', "finite number"),
    (b'{"command": "reload", "bundle": ["a"]}', "folder path string"),
    (b'{"command": "reload", "bundle": "/nonexistent/bundle"}', "bundle folder not found"),
])
def test_malformed_requests_get_one_line_errors(running, payload, expected):
    service, address, _, bundle = running
    with zmq.Context.instance().socket(zmq.REQ) as req:
        req.setsockopt(zmq.RCVTIMEO, 10000)
        req.connect(address)
        req.send(payload)
        reply = json.loads(req.recv())
    if expected is None:
        assert reply["ok"] is True
    else:
        assert reply["ok"] is False and expected in reply["error"] and "\n" not in reply["error"]
        assert len(reply["error"]) < 400  # a 60 kB command name is not echoed back whole
    assert service.inspector.params.threshold == bundle.threshold  # nothing above moved the threshold
    still_answers(service, address)


def test_oversized_messages_are_refused_by_zeromq(running):
    service, address, _, _ = running
    with dealer(address) as raw:
        raw.setsockopt(zmq.RCVTIMEO, 1000)
        raw.send_multipart([b"", b"{" + b" " * (MAX_CONTROL_MESSAGE + 10) + b"}"])
        with pytest.raises(zmq.Again):  # ZeroMQ drops the connection: no reply, nothing buffered
            raw.recv()
    still_answers(service, address)


def test_random_fuzz_then_status_still_answers(running):
    service, address, _, bundle = running
    rng = np.random.default_rng(2024)
    words = [b"status", b"stats", b"set_threshold", b"reload", b"{", b"}", b"[", b'"command"', b":", b"\x00",
             b"\xc3\x28", b"-1e309", b"null", b" "]
    answered = 0
    with dealer(address) as raw:
        for _ in range(150):
            frames = []
            for _ in range(int(rng.integers(0, 4))):
                if rng.random() < 0.5:
                    frames.append(rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes())
                else:
                    picks = rng.integers(0, len(words), int(rng.integers(1, 40)))
                    frames.append(b"".join(words[int(i)] for i in picks))
            raw.send_multipart([b"", *frames] if frames else [b""])
            reply = json.loads(raw.recv_multipart()[-1])
            assert set(reply) >= {"ok"} and (reply["ok"] or reply["error"])
            answered += 1
    assert answered == 150
    assert service.inspector.params.threshold == bundle.threshold
    still_answers(service, address)


def test_control_cli_commands(running):
    import subprocess
    import sys

    service, address, _, bundle = running

    def control(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edge_inspector.cli", "control", address, *args],
                              capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=120)

    done = control("status")
    assert done.returncode == 0 and json.loads(done.stdout)["camera_id"] == "ctl"
    low, high = json.loads(done.stdout)["threshold_range"]
    assert json.loads(control("stats").stdout)["stats"]["processed"] >= 0
    done = control("set-threshold", "5e-324")
    assert done.returncode == 2
    assert done.stderr.startswith("error: threshold: 4.94066e-324 is outside the allowed range")
    done = control("set-threshold", repr(bundle.threshold))
    assert done.returncode == 0 and json.loads(done.stdout)["threshold"] == bundle.threshold
    done = control("reload", str(bundle.path))
    assert done.returncode == 0 and json.loads(done.stdout)["model_id"] == bundle.model_id
    done = control("set-threshold")
    assert done.returncode == 2 and done.stderr.strip().startswith("error: control set-threshold: give")
    done = subprocess.run([sys.executable, "-m", "edge_inspector.cli", "control", endpoint(), "status", "--timeout",
                           "0.5"], capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=60)
    assert done.returncode == 1 and "no reply" in done.stderr
    still_answers(service, address)


def test_send_control_takes_the_bare_words(running):
    service, address, _, bundle = running
    reply = send_control(address, f"set_threshold {bundle.threshold * 1.01}")
    assert reply["ok"] and reply["threshold"] == pytest.approx(bundle.threshold * 1.01)
    assert send_control(address, f"set-threshold {bundle.threshold}")["ok"]


def test_every_published_header_is_strict_json(running):
    """Node.js rejected `Infinity`; a strict parser must accept every result and health message."""
    service, address, pub, bundle = running

    def strict(text: bytes):
        return json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))

    with Subscriber(pub) as subscriber:
        seen = {"inspection": 0, "health": 0}
        deadline = time.monotonic() + 30
        while min(seen.values()) < 2 and time.monotonic() < deadline:
            parts = subscriber.socket.recv_multipart() if subscriber.socket.poll(500) else None
            if parts:
                header = strict(parts[1])
                seen[header["type"]] += 1
                if header["type"] == "inspection":
                    assert set(header["latency_ms"]) == {"capture", "queue", "tiling", "inference", "decision",
                                                          "encode", "total"}
                    assert header["latency_ms"]["total"] >= header["latency_ms"]["capture"]
        assert min(seen.values()) >= 2


def test_parse_request_and_cli_request_building():
    assert parse_request(b"  reload /opt/b  ") == {"command": "reload", "value": "/opt/b"}
    assert parse_request(b"set-threshold 4") == {"command": "set_threshold", "value": "4"}
    assert build_request("set-threshold", "4.5") == {"command": "set_threshold", "value": 4.5}
    assert build_request("reload", None) == {"command": "reload"}
    with pytest.raises(ConfigError, match="unknown command"):
        build_request("shutdown", None)
    with pytest.raises(ConfigError, match="expected a number"):
        build_request("set-threshold", "high")
