"""The receiving end: a reusable client for result/health messages and `edge-inspector subscribe ENDPOINT`.

Whoever wires up a PLC or HMI starts from here: it shows exactly what arrives on the wire, one line per
frame, and the `Subscriber` class is the smallest correct client (subscribe, receive with a timeout,
decode the heatmap).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import cv2
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from edge_inspector.core.errors import ConfigError
from edge_inspector.core.wire import HEALTH_TOPIC, RESULT_TOPIC, subscription, topic_text

QUIET_HINT_S = 5.0  # after this long with nothing received, `subscribe` says what the likely causes are


@dataclass
class Message:
    topic: str  # without the wire's NUL terminator: `inspection.line1`
    header: dict[str, Any]
    heatmap: bytes = b""

    @property
    def is_result(self) -> bool:
        return self.header.get("type") == "inspection"

    def heatmap_image(self) -> np.ndarray | None:
        """Decode the third part: uint8 HxW for png, HxWx3 BGR for jpeg_overlay, None when absent."""
        if not self.heatmap:
            return None
        flag = cv2.IMREAD_GRAYSCALE if self.header.get("heatmap", {}).get("format") == "png" else cv2.IMREAD_COLOR
        return cv2.imdecode(np.frombuffer(self.heatmap, np.uint8), flag)


def connectable(endpoint: str) -> str:
    """A bind address like tcp://*:5556 names no host to connect to; use loopback for it."""
    return endpoint.replace("://*:", "://127.0.0.1:").replace("://0.0.0.0:", "://127.0.0.1:")


def camera_topics(camera: str | None = None, health: bool = True) -> tuple[bytes, ...]:
    """Subscriptions for one camera's results (and health), exactly that camera, or every camera's (None)."""
    return (subscription(RESULT_TOPIC, camera),) + ((subscription(HEALTH_TOPIC, camera),) if health else ())


@dataclass
class ConnectionWatch:
    """What a client socket's ZeroMQ monitor saw: whether anything accepted the TCP connection and how the
    ZMTP handshake ended. Without it a client is blind: ZeroMQ retries a connect forever, and a CURVE
    server drops a client with the wrong mechanism or key without a word (both looked exactly like "no
    messages yet"). Measured on loopback with libzmq 4.3.5: nothing bound gives only CONNECT_RETRIED; a
    NULL client at a CURVE server gives HANDSHAKE_FAILED_PROTOCOL (mechanism mismatch) within a few ms; a
    CURVE client with a key the server refuses gives HANDSHAKE_FAILED_NO_DETAIL or _AUTH."""

    socket: zmq.Socket
    has_keys: bool
    connected: bool = False
    handshake_ok: bool = False
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.monitor = self.socket.get_monitor_socket()

    def drain(self) -> None:
        """Read every event the monitor holds (non-blocking)."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self.connected = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshake_ok = True
            elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self.failures.append("protocol")
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.failures.append("auth")

    def wait(self, seconds: float) -> None:
        """Collect events for up to `seconds`, returning early once the handshake has an outcome."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (self.handshake_ok or self.failures):
            self.monitor.poll(50)
            self.drain()

    def diagnosis(self, endpoint: str, role: str) -> str:
        """The likely cause in one line; `role` is "publish.endpoint" or "publish.control_endpoint"."""
        self.drain()
        if self.handshake_ok:
            return f"connected to {endpoint}: the ZeroMQ handshake succeeded"
        if "protocol" in self.failures:
            if self.has_keys:
                return (f"{endpoint} refused the CURVE handshake: the service does not use CURVE, or this is "
                        f"not its {role} (drop --server-key/--client-key, or check the endpoint)")
            return (f"{endpoint} requires CURVE (or is not the service's {role}): give --server-key "
                    "SERVICE.key and --client-key CLIENT.key_secret (edge-inspector keys, docs/service.md)")
        if "auth" in self.failures:
            return (f"{endpoint} refused this CURVE key: --server-key is not the service's public key, or "
                    "this client's public key is not in the service's security.*_clients folder")
        if self.connected:
            return (f"{endpoint} accepts connections but completed no ZeroMQ handshake with this client: is it "
                    f"the service's {role}?")
        return (f"nothing accepts connections at {endpoint}: the service is not running, or binds another "
                f"host/port (check {role} in its config; `systemctl status edge-inspector@NAME`)")

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(0)


def probe_endpoint(endpoint: str, socket_type: int, keys: Any | None = None, seconds: float = 1.5,
                   role: str = "publish.endpoint", context: zmq.Context | None = None) -> str:
    """Connect a fresh socket of `socket_type` for up to `seconds` and say what the handshake showed."""
    context = context or zmq.Context.instance()
    socket = context.socket(socket_type)
    socket.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.apply(socket)
    watch = ConnectionWatch(socket, keys is not None)
    try:
        socket.connect(connectable(endpoint))
        watch.wait(seconds)
        return watch.diagnosis(endpoint, role)
    finally:
        watch.close()
        socket.close(0)


class Subscriber:
    """SUB socket on a service's PUB endpoint.

    `topics` are ZeroMQ prefixes: `inspection.` takes every camera's results; for one camera use
    `camera_topics("line1")` (the NUL-terminated topic, so `line10` is not received with it). A str topic
    is sent as given: `"inspection.line1"` without the terminator also matches line10, as ZeroMQ does.
    """

    def __init__(self, endpoint: str, topics: tuple[str | bytes, ...] = ("inspection.", "health."),
                 context: zmq.Context | None = None, rcvhwm: int = 1000, keys: Any | None = None,
                 watch: bool = False):
        """`keys`: an `edge_inspector.core.keys.ClientKeys` when the service runs with CURVE. `watch`: keep a
        ConnectionWatch in `self.watch`, attached before connecting so no handshake event is missed."""
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.apply(self.socket)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode() if isinstance(topic, str) else topic)
        self.watch = ConnectionWatch(self.socket, keys is not None) if watch else None
        try:
            self.socket.connect(connectable(endpoint))
        except zmq.ZMQError as err:
            if self.watch:
                self.watch.close()
            self.socket.close(0)
            raise ConfigError(f"endpoint {endpoint!r}: {err} (expected e.g. tcp://127.0.0.1:5556)") from None

    def receive(self, timeout_s: float | None = None) -> Message | None:
        """Next message, or None when nothing arrives within timeout_s (None: wait forever)."""
        if not self.socket.poll(None if timeout_s is None else int(timeout_s * 1000)):
            return None
        parts = self.socket.recv_multipart()
        header = json.loads(parts[1]) if len(parts) > 1 else {}
        return Message(topic=topic_text(parts[0]), header=header, heatmap=parts[2] if len(parts) > 2 else b"")

    def close(self) -> None:
        if self.watch:
            self.watch.close()
        self.socket.close(0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_result(header: dict[str, Any]) -> str:
    """One human line per result, the verdict first so it can be scanned (and grepped) on a terminal."""
    verdict = str(header.get("verdict", "?")).upper()
    line = (f"{verdict:<5} {header.get('camera_id')} #{header.get('sequence')} "
            f"frame {header.get('frame_index')} {header.get('capture_time_iso', '')}")
    if header.get("normalised_score") is not None:
        line += f"  score {header['normalised_score']:.3f}x threshold"
    defects = header.get("defects") or []
    if defects:
        boxes = " ".join(f"[{d['x']},{d['y']} {d['width']}x{d['height']}]" for d in defects[:3])
        line += f"  {len(defects)} defect(s) {boxes}"
    total = (header.get("latency_ms") or {}).get("total")
    if total is not None:
        line += f"  {total:.0f} ms"
    if header.get("error"):
        line += f"  error: {header['error']}"
    return line


def format_health(header: dict[str, Any]) -> str:
    latency = header.get("latency_ms") or {}
    p50, p99 = latency.get("p50"), latency.get("p99")
    lat = f"latency p50 {p50:.0f} ms p99 {p99:.0f} ms" if p50 is not None and p99 is not None else "latency -"
    line = (f"HEALTH {header.get('camera_id')} {header.get('state')}: {header.get('fps', 0):.1f} fps, "
            f"{header.get('processed', 0)} frames, {header.get('dropped', 0)} dropped, "
            f"{header.get('reconnects', 0)} reconnects, {lat}")
    if header.get("problems"):
        line += f"  problems: {'; '.join(header['problems'])}"
    elif header.get("state") == "waiting" and header.get("last_error"):
        line += f"  ({header['last_error']})"
    return line


@click.command("subscribe")
@click.argument("endpoint")
@click.option("--camera", default="", help="Only this camera id (default: all).")
@click.option("--health/--no-health", default=True, help="Also print health messages.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON headers, one per line.")
@click.option("--count", type=int, default=0, help="Exit after this many results (0: run until Ctrl-C).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=0,
              help="Give up (exit 1, saying the likely cause) after this many seconds without a message; 0: wait.")
@click.option("--save-heatmaps", type=click.Path(file_okay=False), default=None,
              help="Write each result's heatmap to this folder as <camera>_<sequence>.png/.jpg.")
@click.option("--server-key", type=click.Path(dir_okay=False), default=None,
              help="CURVE: the service's public key file (NAME.key).")
@click.option("--client-key", type=click.Path(dir_okay=False), default=None,
              help="CURVE: this client's secret key file (NAME.key_secret).")
def subscribe_command(endpoint: str, camera: str, health: bool, as_json: bool, count: int, timeout_s: float,
                      save_heatmaps: str | None, server_key: str | None, client_key: str | None) -> None:
    """Print inspection results (and health) from a running service, e.g. tcp://127.0.0.1:5556."""
    from edge_inspector.core.keys import client_keys_option

    keys = client_keys_option(server_key, client_key)
    topics = camera_topics(camera or None, health)  # one camera: exactly it (`line1` never gets `line10`)
    folder = Path(save_heatmaps) if save_heatmaps else None
    if folder:
        folder.mkdir(parents=True, exist_ok=True)
    received = 0
    with Subscriber(endpoint, topics, keys=keys, watch=True) as subscriber:
        watch = subscriber.watch
        assert watch is not None
        click.echo(f"waiting for {' and '.join(topic_text(t).rstrip('.') for t in topics)} messages from "
                   f"{connectable(endpoint)} (Ctrl-C to stop)", err=True)
        quiet_since, hinted = time.monotonic(), False
        try:
            while not count or received < count:
                message = subscriber.receive(timeout_s=0.5)
                if message is None:
                    quiet = time.monotonic() - quiet_since
                    if timeout_s and quiet >= timeout_s:
                        cause = quiet_hint(watch, connectable(endpoint), camera)
                        click.echo(f"error: nothing received in {timeout_s:g} s; {cause}", err=True)
                        sys.exit(1)
                    if not hinted and quiet >= QUIET_HINT_S:
                        click.echo(f"still waiting: {quiet_hint(watch, connectable(endpoint), camera)}", err=True)
                        hinted = True
                    continue
                quiet_since, hinted = time.monotonic(), True  # once messages flow, a pause is not a fault
                if as_json:
                    click.echo(json.dumps(message.header))
                else:
                    click.echo(format_result(message.header) if message.is_result else format_health(message.header))
                if message.is_result:
                    received += 1
                    if folder and message.heatmap:
                        ext = ".png" if message.header["heatmap"]["format"] == "png" else ".jpg"
                        name = f"{message.header['camera_id']}_{message.header['sequence']:08d}{ext}"
                        (folder / name).write_bytes(message.heatmap)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass


def quiet_hint(watch: ConnectionWatch, endpoint: str, camera: str) -> str:
    """Why nothing arrived after QUIET_HINT_S seconds, as far as the socket can tell."""
    line = watch.diagnosis(endpoint, "publish.endpoint")
    if watch.handshake_ok:
        only = f", or no camera is called {camera!r} (--camera)" if camera else ""
        line = (f"connected to {endpoint} but nothing arrived: the service sends health every "
                f"publish.health_interval_s{only}; is this its publish.endpoint (not control_endpoint)?")
    return line
