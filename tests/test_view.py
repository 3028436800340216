"""Operator live view over HTTP and Server-Sent Events, against a real service on loopback.

The service is the real one (real PaDiM bundle, a looping MJPG "camera" whose frames alternate good and
defective parts), the view is the real server, and the browsers here are plain HTTP clients reading the
event stream (tests/test_view_browser.py drives a real Chromium).
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest

from edge_inspector.core.wire import send_control
from edge_inspector.service.app import Service
from edge_inspector.service.config import parse_config
from edge_inspector.tools.view.hub import CameraState, Hub, Item
from edge_inspector.tools.view.server import ViewServer
from service_helpers import (
    LANES,
    PART,
    REPO,
    config_data,
    conveyor_frames,
    subprocess_env,
    wait_for,
    write_video,
)


class LiveService:
    """A real service in this process on a looping video of alternating good/defective frames; restartable
    on the same endpoints (as systemd restarts it)."""

    def __init__(self, bundle, folder: Path, fps: float = 10.0, **sections):
        frames, _ = conveyor_frames(np.random.default_rng(31), 8, [False, True] * 4)
        video = write_video(folder / "line.avi", frames)
        publish = {"wait_for_subscriber_s": 30.0, **sections.pop("publish", {})}
        self.data = config_data(str(video), bundle.path, camera={"fps": fps, "loop": True}, publish=publish,
                                **sections)
        self.endpoint = self.data["publish"]["endpoint"]
        self.control = self.data["publish"]["control_endpoint"]
        self.service: Service | None = None
        self.runner: threading.Thread | None = None

    def start(self) -> LiveService:
        self.service = Service(parse_config(self.data))
        self.runner = threading.Thread(target=self.service.run, kwargs={"install_signals": False}, daemon=True)
        self.runner.start()
        wait_for(self.service.ready.is_set, 60, "the service to be ready")
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.runner.join(30)
            assert not self.runner.is_alive()
            self.service = None


@contextmanager
def running(service: LiveService, view: ViewServer):
    view.start()
    try:
        service.start()
        yield service, view
    finally:
        service.stop()
        view.stop()


class EventStream:
    """A browser's /events connection read on a thread: every (event, data) in arrival order."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        self.connection.request("GET", "/events")
        self.response = self.connection.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("Content-Type") == "text/event-stream"
        self.events: list[tuple[str, dict]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        name = ""
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    self.events.append((name, json.loads(line[6:])))
        except (OSError, ValueError):
            pass

    def of(self, name: str) -> list[dict]:
        return [data for event, data in list(self.events) if event == name]

    def results(self, verdict: str | None = None) -> list[dict]:
        items = [d["item"] for d in self.of("result")]
        return [i for i in items if verdict is None or i["header"]["verdict"] == verdict]

    def close(self) -> None:
        self.connection.close()
        self.thread.join(5)


def get(url: str, path: str, method: str = "GET", body: bytes | None = None,
        headers: dict | None = None) -> tuple[int, dict, bytes]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def post(url: str, path: str, data: dict, **headers: str) -> tuple[int, dict]:
    status, _, body = get(url, path, "POST", json.dumps(data).encode(),
                          {"Content-Type": "application/json", **headers})
    return status, json.loads(body)


def test_page_events_pictures_and_counters(bundle, tmp_path):
    service = LiveService(bundle, tmp_path)
    view = ViewServer([service.endpoint], listen="127.0.0.1:0", silent_after_s=5.0)
    with running(service, view):
        stream = EventStream(view.url)
        try:
            wait_for(lambda: len(stream.results("fail")) >= 2 and len(stream.of("health")) >= 2, 60,
                     "fails and health on the event stream")
        finally:
            stream.close()
        assert stream.events[0][0] == "snapshot"  # a browser starts from the whole state, then follows it
        state = json.loads(get(view.url, "/api/state")[2])
        status, headers, page = get(view.url, "/")
        not_found = get(view.url, "/static/..%2F__init__.py")[0], get(view.url, "/image/line9/1")[0]
        script = get(view.url, "/static/view.js")
        refused = post(view.url, "/api/control/line9/threshold", {"value": 1.0})
        camera = next(c for c in state["cameras"] if c["camera_id"] == "line9")
        kept = camera["fails"][-1]
        code, headers_png, png = get(view.url, kept["image"])

    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"/static/view.js" in page
    assert script[0] == 200 and "javascript" in script[1]["Content-Type"] and b"EventSource" in script[2]
    assert not_found == (404, 404)
    assert refused[0] == 403 and "read-only" in refused[1]["error"]  # no --control: nothing can be changed

    sequences = [item["header"]["sequence"] for item in stream.results()]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    fail = stream.results("fail")[0]
    assert fail["header"]["camera_id"] == "line9" and fail["header"]["defects"]

    assert state["link"]["connected"] is True
    assert camera["fails"] and all(f["header"]["verdict"] == "fail" for f in camera["fails"])
    counters = camera["counters"]
    assert counters["parts"] >= camera["results_seen"] >= 1 and counters["fails"] >= len(camera["fails"])
    assert counters["latency_p50"] is not None and counters["fps"] is not None
    assert len(camera["scores"]) == camera["results_seen"]
    # The failed part's picture is still served (the strip keeps them), exactly as published: a PNG heatmap.
    assert code == 200 and headers_png["Content-Type"] == "image/png" and "immutable" in headers_png["Cache-Control"]
    heat = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    header = kept["header"]
    assert heat.shape == (header["heatmap"]["height"], header["heatmap"]["width"])  # auto: half the frame here
    assert heat.shape == (PART // 2, PART * LANES // 2) and header["frame"]["width"] == PART * LANES
    box, k = header["defects"][0], heat.shape[1] / header["frame"]["width"]  # boxes are in frame pixels
    inside = heat[int(box["y"] * k):int((box["y"] + box["height"]) * k) + 1,
                  int(box["x"] * k):int((box["x"] + box["width"]) * k) + 1]
    assert inside.max() > 127  # over the threshold (127.5 at full_scale 2) where the defect box is


def test_threshold_and_reload_through_the_view(bundle, tmp_path):
    service = LiveService(bundle, tmp_path)
    token_file = tmp_path / "operator.key"
    token_file.write_text("night-shift-key\n")
    from edge_inspector.tools.view.server import read_token

    view = ViewServer([service.endpoint], [service.control], listen="127.0.0.1:0", token=read_token(str(token_file)))
    auth = {"Authorization": "Bearer night-shift-key"}
    with running(service, view):
        stream = EventStream(view.url)
        try:
            wait_for(lambda: stream.results(), 60, "a first result")
            assert stream.of("snapshot")[0]["control"] == {"enabled": True, "auth": "token"}
            no_key = post(view.url, "/api/control/line9/threshold", {"value": 5.0})
            wrong_key = post(view.url, "/api/control/line9/threshold", {"value": 5.0},
                             Authorization="Bearer guess-guess")
            form = get(view.url, "/api/control/line9/threshold", "POST", b"value=5",
                       {"Content-Type": "application/x-www-form-urlencoded", **auth})
            cross_site = post(view.url, "/api/control/line9/threshold", {"value": 5.0}, Origin="http://evil.example",
                              **auth)
            bad_value = post(view.url, "/api/control/line9/threshold", {"value": "high"}, **auth)
            unknown = post(view.url, "/api/control/line7/threshold", {"value": 5.0}, **auth)
            before = send_control(service.control, {"command": "status"})
            # As high as the service allows (it may bound thresholds to a range around the bundle's).
            target = min(before["threshold"] * 1000, (before.get("threshold_range") or [0, float("inf")])[1])
            raised = post(view.url, "/api/control/line9/threshold", {"value": target}, **auth)
            after = send_control(service.control, {"command": "status"})["threshold"]
            applied_from = send_control(service.control, {"command": "stats"})["stats"]["last_sequence"] + 1
            wait_for(lambda: any(i["header"]["sequence"] > applied_from for i in stream.results()), 30,
                     "results judged with the new threshold")
            newer = [i["header"] for i in stream.results() if i["header"]["sequence"] > applied_from]
            reloaded = post(view.url, "/api/control/line9/reload", {}, **auth)
            missing = post(view.url, "/api/control/line9/reload", {"bundle": str(tmp_path / "nope")}, **auth)
            status = get(view.url, "/api/control/line9/status", headers=auth)
        finally:
            stream.close()

    assert no_key[0] == wrong_key[0] == 401
    assert form[0] == 415 and cross_site[0] == 403
    assert bad_value[0] == 400 and "finite number" in bad_value[1]["error"]
    assert unknown[0] == 502 and "line7" in unknown[1]["error"]
    assert raised[0] == 200 and raised[1]["threshold"] == pytest.approx(target) and target > before["threshold"]
    assert after == pytest.approx(target)  # the service itself took it
    assert newer and all(h["threshold"] == pytest.approx(after) for h in newer)
    assert all(h["verdict"] == "pass" for h in newer if h["score"] <= after)
    assert reloaded[0] == 200 and reloaded[1]["threshold"] == pytest.approx(bundle.threshold)  # back to the bundle's
    assert missing[0] == 400 and "not found" in missing[1]["error"]
    assert status[0] == 200 and json.loads(status[2])["camera_id"] == "line9"


def test_stalled_browser_costs_only_itself(bundle, tmp_path):
    """A browser that stops reading is cut off; the other browser keeps every event, in order, meanwhile."""
    service = LiveService(bundle, tmp_path, fps=15.0)
    view = ViewServer([service.endpoint], listen="127.0.0.1:0", client_buffer=8, client_timeout_s=2.0,
                      sse_sndbuf=4096)
    with running(service, view):
        host, port = urlsplit(view.url).hostname, urlsplit(view.url).port
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((host, port))
        stalled.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads a byte
        healthy = EventStream(view.url)
        try:
            wait_for(lambda: len(view.hub.stats()["clients"]) == 2, 10, "both browsers attached")
            wait_for(lambda: len(view.hub.stats()["clients"]) == 1, 60, "the stalled browser to be cut off")
            dropped = view.hub.stats()["dropped_by_closed_clients"]
            count = len(healthy.results())
            wait_for(lambda: len(healthy.results()) >= count + 10, 30, "more results for the healthy browser")
        finally:
            healthy.close()
            stalled.close()
    assert dropped > 0  # the stalled browser's queue overflowed (bounded), instead of growing
    assert [name for name, _ in healthy.events].count("snapshot") == 1  # the healthy one never needed a resync
    sequences = [item["header"]["sequence"] for item in healthy.results()]
    first = sequences[0]
    assert sequences == list(range(first, first + len(sequences)))  # every result, none skipped


def test_service_restart_shows_disconnected_then_recovers(bundle, tmp_path):
    service = LiveService(bundle, tmp_path, publish={"health_interval_s": 0.3})
    view = ViewServer([service.endpoint], listen="127.0.0.1:0", silent_after_s=3.0)
    with running(service, view):
        stream = EventStream(view.url)
        try:
            wait_for(lambda: len(stream.results()) >= 3, 60, "results")
            service.stop()
            wait_for(lambda: stream.of("link") and not stream.of("link")[-1]["connected"], 15,
                     "the link to be reported down")
            down = stream.of("link")[-1]
            before = len(stream.results())
            service.start()
            wait_for(lambda: stream.of("link")[-1]["connected"] and len(stream.results()) > before + 2, 60,
                     "the link to come back with new results")
            state = view.hub.snapshot()
        finally:
            stream.close()
    assert "lost connection" in down["detail"] or "no message" in down["detail"]
    restarted = [i["header"]["sequence"] for i in stream.results()[before:]]
    assert restarted[0] <= 2  # a new service run: sequences start again, and the view follows them
    camera = state["cameras"][0]
    assert camera["counters"]["parts"] <= camera["results_seen"]  # counters are the new run's, not summed


def test_bounded_fan_out_and_resync():
    """The hub's per-browser queue: a reader keeps everything, a non-reader costs at most its capacity."""
    hub = Hub(keep_fails=3, client_buffer=4)
    reader, _ = hub.attach("reader")
    sleeper, _ = hub.attach("sleeper")
    got = []
    for sequence in range(1, 101):
        verdict = "fail" if sequence % 10 == 0 else "pass"
        hub.add_result({"camera_id": "c", "sequence": sequence, "verdict": verdict, "score": float(sequence),
                        "heatmap": {"format": "png"}}, b"\x89PNG")
        got += reader.take(0)[0]
    assert len(got) == 100 and b'"sequence":100' in got[-1]
    assert len(sleeper.events) <= 4 and sleeper.dropped >= 96
    _events, resync = sleeper.take(0)
    assert resync
    snapshot = json.loads(hub.resync(sleeper).split(b"data: ", 1)[1])
    camera = snapshot["cameras"][0]
    assert camera["latest"]["header"]["sequence"] == 100
    assert [f["header"]["sequence"] for f in camera["fails"]] == [80, 90, 100]  # last 3 kept, pictures too
    assert hub.image("c", camera["fails"][0]["id"]) is not None
    hub.add_health({"camera_id": "d", "type": "health", "state": "waiting", "last_sequence": 0})
    assert [c["camera_id"] for c in hub.snapshot()["cameras"]] == ["c", "d"]  # one tile per camera id


def test_counters_follow_health_then_results_and_restarts():
    state = CameraState("c", keep_fails=4, keep_scores=10)

    def result(sequence: int, verdict: str) -> None:
        state.add_result(Item(sequence, {"sequence": sequence, "verdict": verdict, "score": 1.0}, b"", 0.0))

    for sequence in range(1, 11):
        result(sequence, "fail" if sequence <= 3 else "pass")
    state.add_health({"last_sequence": 10, "processed": 10, "fails": 3, "errors": 0, "dropped": 2,
                      "uptime_s": 9.0, "fps": 1.0, "latency_ms": {"p50": 5.0, "p99": 9.0}})
    result(11, "fail")
    result(12, "error")
    counters = state.counters()
    assert (counters["parts"], counters["fails"], counters["errors"], counters["dropped"]) == (12, 4, 1, 2)
    result(1, "pass")  # the service restarted: the old run's health no longer counts
    assert state.counters()["parts"] == 1 and state.counters()["fails"] == 0
    assert len(state.scores) == 10  # bounded


def test_cli_errors_are_one_line(tmp_path):
    cases = [
        (["--connect", "tcp://127.0.0.1:1", "--listen", "8080"], "error: --listen: expected HOST:PORT"),
        (["--connect", "tcp://127.0.0.1:1", "--token-file", str(tmp_path / "none")],
         f"error: --token-file {tmp_path / 'none'}: cannot read it"),
        (["--connect", "tcp://127.0.0.1:1", "--control", "tcp://127.0.0.1:2", "--listen", "0.0.0.0:0"],
         "error: --listen 0.0.0.0:0: a view with --control on a non-loopback address needs --token-file"),
    ]
    for args, expected in cases:
        done = subprocess.run([sys.executable, "-m", "edge_inspector.cli", "view", *args], check=False,
                              capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().startswith(expected) and len(done.stderr.strip().splitlines()) == 1
