"""Operator live view over HTTP and Server-Sent Events, against a real service on loopback.

The service is the real one (real PaDiM bundle, a looping MJPG "camera" whose frames alternate good and
defective parts), the view is the real server, and the browsers here are plain HTTP clients reading the
event stream (tests/test_view_browser.py drives a real Chromium).
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
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
    systemd_exposure,
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
        frame_reply = get(view.url, kept["frame"])

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
    # ... and the judged frame itself (the service's frame message, asked for by the view's subscription):
    # every result the browsers were told about came with it, the first one included.
    assert frame_reply[0] == 200 and frame_reply[1]["Content-Type"] == "image/jpeg"
    frame = cv2.imdecode(np.frombuffer(frame_reply[2], np.uint8), cv2.IMREAD_COLOR)
    assert frame.shape == (PART, PART * LANES, 3)
    assert all(item["frame"] for item in stream.results())


def test_frames_are_sent_only_while_someone_asks_for_them(bundle, tmp_path):
    """The service's side of the live view's picture: `frame.<camera>` messages go out only while a
    subscriber holds that topic, right after their result, and stop when it leaves."""
    from edge_inspector.tools.subscriber import Subscriber

    service = LiveService(bundle, tmp_path).start()
    try:
        with Subscriber(service.endpoint, ("inspection.",)) as results:
            wait_for(lambda: results.receive(5) is not None, 30, "results")
            publisher = service.service.publisher
            nobody_asked = set(publisher.frame_subscriptions)
            with Subscriber(service.endpoint, ("inspection.", "frame.")) as view:
                messages = []
                wait_for(lambda: messages.append(view.receive(5)) or
                         sum(1 for m in messages if m and m.header.get("type") == "frame") >= 3, 30, "frames")
                asked = set(publisher.frame_subscriptions)
            wait_for(lambda: not publisher.frame_subscriptions, 15, "the frame subscription to end")
            plain = [results.receive(5) for _ in range(5)]
    finally:
        service.stop()
    assert nobody_asked == set() and asked == {b"frame."}
    messages = [m for m in messages if m is not None]
    first = next(i for i, m in enumerate(messages) if m.is_result)  # joined between a result and its frame?
    frames = [m for m in messages[first:] if m.header.get("type") == "frame"]
    judged = {m.header["sequence"] for m in messages if m.is_result}
    assert frames and all(f.header["sequence"] in judged for f in frames)  # each frame follows its own result
    image = cv2.imdecode(np.frombuffer(frames[0].heatmap, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (frames[0].header["height"], frames[0].header["width"], 3) == (PART, PART * LANES, 3)
    assert all(m is not None and m.is_result for m in plain)  # a results subscriber never sees a frame


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
    # The same bundle again: the operator's threshold lies inside its range, so the reload keeps it and says so.
    assert reloaded[0] == 200 and reloaded[1]["threshold"] == pytest.approx(target)
    assert "kept the threshold set by the control socket" in reloaded[1]["threshold_note"]
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
        stalled.sendall(f"GET /events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())  # and never reads
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


# -- the locked door (issue 29, attacks 10-13): real HTTP on loopback sockets against a running view --------

NOBODY = "tcp://127.0.0.1:9"  # nothing listens there: the view runs, waiting for its first message


def raw(url: str, data: bytes, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    """A socket from `source` (any 127/8 address is a different client on Linux's loopback) that sent `data`."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout, source_address=(source, 0))
    if data:
        sock.sendall(data)
    return sock


def read_reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and whatever body came before the server closed or went quiet (reads no more than that)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 "):
        return 0, {}, data
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    length = int(headers.get("Content-Length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def ask(url: str, request: str, body: bytes = b"", source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    with raw(url, request.encode() + body, source) as sock:
        return read_reply(sock)


def own_host(view: ViewServer) -> str:
    return urlsplit(view.url).netloc


def test_dns_rebinding_is_refused_and_the_own_origin_still_works(bundle, tmp_path):
    """Attack 10: a page on evil.example whose DNS name points at the view. Host and Origin are the
    attacker's; the view must answer neither the threshold nor the config (it moved 20 -> 23 before)."""
    service = LiveService(bundle, tmp_path)
    view = ViewServer([service.endpoint], [service.control], listen="127.0.0.1:0")
    with running(service, view):
        port = urlsplit(view.url).port
        before = send_control(service.control, {"command": "status"})["threshold"]
        evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
        moved = post(view.url, "/api/control/line9/threshold", {"value": before * 1.1}, **evil)
        config = get(view.url, "/api/control/line9/status", headers={"Host": f"evil.example:{port}"})
        state = get(view.url, "/api/state", headers={"Host": f"evil.example:{port}"})
        page = get(view.url, "/", headers={"Host": f"evil.example:{port}"})
        events = ask(view.url, f"GET /events HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n")
        other_port = get(view.url, "/api/state", headers={"Host": f"127.0.0.1:{port + 1}"})
        cross_site = post(view.url, "/api/control/line9/threshold", {"value": before * 1.1},
                          Origin=f"http://evil.example:{port}")
        null_origin = post(view.url, "/api/control/line9/threshold", {"value": before * 1.1}, Origin="null")
        fetch_site = get(view.url, "/api/state", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"})
        untouched = send_control(service.control, {"command": "status"})["threshold"]
        # The page's own origin, by address or by localhost, still works end to end.
        own = post(view.url, "/api/control/line9/threshold", {"value": before * 1.1},
                   Host=f"localhost:{port}", Origin=f"http://localhost:{port}")
        after = send_control(service.control, {"command": "status"})["threshold"]
        navigate = get(view.url, "/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})

    assert moved[0] == 421 and "evil.example" in moved[1]["error"] and "--allow-host" in moved[1]["error"]
    assert config[0] == 421 and b"threshold" not in config[2]
    assert state[0] == page[0] == events[0] == other_port[0] == 421 and b"cameras" not in state[2]
    assert cross_site[0] == null_origin[0] == fetch_site[0] == 403
    assert untouched == pytest.approx(before)
    assert own[0] == 200 and after == pytest.approx(before * 1.1)
    assert navigate[0] == 200  # a link from another site may open the page itself


def test_allowed_hosts_and_wildcard_binds():
    from edge_inspector.tools.view.guard import HostPolicy

    loop = HostPolicy("127.0.0.1", 8080, ["panel.lan", "proxy.lan:443"])
    assert loop.host_ok("127.0.0.1:8080") and loop.host_ok("LOCALHOST:8080") and loop.host_ok("panel.lan:9")
    assert loop.origin_ok("https://proxy.lan") and not loop.origin_ok("http://proxy.lan")
    assert not loop.host_ok("127.0.0.1") and not loop.host_ok("10.0.0.5:8080") and not loop.host_ok("evil:8080")
    assert not loop.host_ok("127.0.0.1:8080@evil") and not loop.host_ok("") and not loop.origin_ok("null")
    wild = HostPolicy("0.0.0.0", 8080)
    assert wild.host_ok("192.168.1.20:8080") and wild.host_ok("[fe80::1]:8080") and not wild.host_ok("evil:8080")
    assert not HostPolicy("192.168.1.20", 8080).host_ok("192.168.1.21:8080")


def test_bodies_are_refused_before_they_are_read(tmp_path):
    """Attack 11: a body is read only after route, key and Content-Length passed (a 250 MB body, or
    Content-Length -1 = read to end of stream, grew the view from 63 to 314 MB before). Every answer
    below comes while the client still holds its body back: had the view started reading, it would wait."""
    view = ViewServer([NOBODY], ["tcp://127.0.0.1:9"], listen="127.0.0.1:0", token="night-shift-key",
                      header_timeout_s=3.0, body_timeout_s=1.0)
    view.start()
    try:
        host = own_host(view)

        def post_head(length: str | None, key: bool = True, extra: str = "") -> str:
            lines = ["POST /api/control/line9/threshold HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
            lines += [f"Content-Length: {length}"] if length is not None else []
            lines += ["Authorization: Bearer night-shift-key"] if key else []
            return "\r\n".join(lines) + extra + "\r\n\r\n"

        no_key = ask(view.url, post_head(str(250 << 20), key=False))
        too_big = ask(view.url, post_head(str(250 << 20)))
        negative = ask(view.url, post_head("-1"))
        missing = ask(view.url, post_head(None))
        chunked = ask(view.url, post_head(None, extra="\r\nTransfer-Encoding: chunked"))
        twice = ask(view.url, post_head("2", extra="\r\nContent-Length: 3"))
        headers_flood = ask(view.url, f"GET / HTTP/1.1\r\nHost: {host}\r\n" + "X-Pad: " + "a" * 20000 + "\r\n\r\n")
        # A body that never comes in full is cut at the body timeout, and is never acted on.
        started = time.monotonic()
        short = ask(view.url, post_head("100"), b'{"value": 1')
        waited = time.monotonic() - started
        pages = [get(view.url, path) for path in ("/", "/static/view.js", "/api/state", "/nope")]
        pages.append(get(view.url, "/", headers={"Host": "evil.example"}))
        pages.append((too_big[0], too_big[1], b""))
    finally:
        view.stop()
    assert no_key[0] == 401 and too_big[0] == 413 and negative[0] == 400
    assert missing[0] == chunked[0] == 411 and twice[0] == 400 and headers_flood[0] == 431
    assert all(reply[1].get("Connection") == "close" for reply in (no_key, too_big, negative, missing))
    assert short[0] == 400 and "shorter than its Content-Length" in json.loads(short[2])["error"]
    assert 0.9 < waited < 4.5  # the body timeout (1 s), not the socket's (5 s)
    for status, headers, _ in pages:  # every response, refusals included
        csp = headers.get("Content-Security-Policy", "")
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, status
        assert headers.get("X-Content-Type-Options") == "nosniff" and headers.get("X-Frame-Options") == "DENY"
        assert headers.get("Referrer-Policy") == "no-referrer"


def open_stream(url: str, source: str) -> tuple[socket.socket, int]:
    sock = raw(url, f"GET /events HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n\r\n".encode(), source)
    status = read_reply(sock)[0]
    return sock, status


def test_one_client_cannot_take_every_event_stream():
    """Attack 12: 16 held /events streams locked the 17th browser out. One address now holds at most
    `max_streams_per_client` (its newest win), and a full view makes room for a client with fewer."""
    view = ViewServer([NOBODY], listen="127.0.0.1:0", max_clients=6, max_streams_per_client=2)
    view.start()
    held: list[socket.socket] = []
    try:
        statuses = []
        for _ in range(10):
            sock, status = open_stream(view.url, "127.0.0.1")
            held.append(sock)
            statuses.append(status)
        wait_for(lambda: len(view.hub.clients) == 2, 10, "the attacker's streams to be cut to 2")
        others = []
        for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3", "127.0.0.4"):
            sock, status = open_stream(view.url, source)
            held.append(sock)
            others.append(status)
        wait_for(lambda: len(view.hub.clients) <= 6, 10, "streams within max_clients")
        peers = [c.peer for c in view.hub.clients]
        wrong_host = ask(view.url, "GET /events HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    finally:
        for sock in held:
            sock.close()
        view.stop()
    assert statuses == [200] * 10  # each new stream from the same client replaced its oldest
    assert others == [200] * 5  # the 7th stream overall (from a 4th client) still got in
    assert peers.count("127.0.0.1") <= 2 and "127.0.0.4" in peers and len(peers) == 6
    assert wrong_host[0] == 421


def test_half_sent_requests_are_bounded_and_time_out():
    """Attack 13 (small): 40 half-sent requests held 40 threads and never timed out. Now one address holds
    at most `max_connections_per_client`, newcomers push out the oldest half-sent ones, and every one of
    them is closed after `header_timeout_s`. The full 400-socket attack: benchmarks/hardening_bench.py."""
    view = ViewServer([NOBODY], listen="127.0.0.1:0", max_connections=24, max_connections_per_client=12,
                      header_timeout_s=1.0, body_timeout_s=1.0)
    view.start()
    threads_before = threading.active_count()
    attackers: list[socket.socket] = []
    try:
        for i in range(40):
            attackers.append(raw(view.url, f"GET /api/state HTTP/1.1\r\nHost: {own_host(view)}\r\nX-{i}: ".encode()))
        time.sleep(0.3)
        held = view.http.connections.stats()["open"]
        threads_held = threading.active_count() - threads_before
        same_client = get(view.url, "/api/state")[0]  # from 127.0.0.1 too: pushes out a half-sent one
        for source in ("127.0.0.3", "127.0.0.4"):  # two more clients: the total stays at max_connections
            attackers += [raw(view.url, f"GET / HTTP/1.1\r\nHost: {own_host(view)}\r\n".encode(), source)
                          for _ in range(10)]
        time.sleep(0.3)
        held_total = view.http.connections.stats()["open"]
        other_client = ask(view.url, f"GET /api/state HTTP/1.1\r\nHost: {own_host(view)}\r\n\r\n", source="127.0.0.2")
        closed = 0
        deadline = time.monotonic() + 15
        for sock in attackers:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                closed += sock.recv(1) == b""
            except (ConnectionResetError, TimeoutError):
                closed += 0
        # A trickle (one header byte every 0.2 s) defeats a per-read timeout; the header deadline still holds.
        trickle = raw(view.url, f"GET /api/state HTTP/1.1\r\nHost: {own_host(view)}\r\n".encode())
        attackers.append(trickle)
        started, cut_after = time.monotonic(), None
        while time.monotonic() - started < 8:
            try:
                trickle.sendall(b"x")
                time.sleep(0.2)
                trickle.setblocking(False)
                if trickle.recv(1) == b"":
                    cut_after = time.monotonic() - started
                    break
            except BlockingIOError:
                pass
            except OSError:
                cut_after = time.monotonic() - started
                break
            finally:
                trickle.setblocking(True)
        stats = view.http.connections.stats()
    finally:
        for sock in attackers:
            sock.close()
        view.stop()
    assert held <= 12 and threads_held <= 12 + 2 and held_total <= 24
    assert same_client == 200 and other_client[0] == 200
    assert closed == 60  # every half-sent request was closed by the view: cut for a newcomer or timed out
    assert stats["evicted"] >= 28 + 20 - (24 - 12)
    assert cut_after is not None and cut_after < 4 and stats["timed_out"] >= 1


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_view_unit_scores_2_or_better(tmp_path):
    unit = REPO / "systemd" / "edge-inspector-view@.service"
    assert systemd_exposure(unit, "edge-inspector-view@line1.service", tmp_path) <= 2.0


def test_both_units_bound_file_descriptors():
    for name in ("edge-inspector-view@.service", "edge-inspector@.service"):
        values = re.findall(r"^LimitNOFILE=(\d+)$", (REPO / "systemd" / name).read_text(), re.MULTILINE)
        assert len(values) == 1 and 64 <= int(values[0]) <= 65536, name
    view_limit = int(re.findall(r"^LimitNOFILE=(\d+)$", (REPO / "systemd" / "edge-inspector-view@.service")
                                .read_text(), re.MULTILINE)[0])
    assert view_limit > 64 + 32  # the default --max-connections plus ZeroMQ and files fit under it
