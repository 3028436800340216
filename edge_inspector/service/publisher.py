"""Results and health out over ZeroMQ PUB; control in over a REP socket.

Results: one multipart message per processed frame, `[b"inspection.<camera_id>", header_json, heatmap]`
(docs/wire-format.md documents every header field; `schema_version` changes only when a field's meaning
does). Health: `[b"health.<camera_id>", json]` every `health_interval_s` and at once when the camera
connects or is lost. PUB never blocks the line: each subscriber gets a send queue capped at `sndhwm`
messages, past which ZeroMQ drops *for that subscriber only*, so a stalled HMI costs itself messages,
not the service memory.

The PUB side is an XPUB socket (PUB plus subscription notices), so the service can optionally hold capture
until a first subscriber is attached (`wait_for_subscriber_s`): with plain PUB the results published
before a subscriber's connection completes are lost, which matters for demos, tests and finite replays.

Every JSON message is encoded with `allow_nan=False` semantics: a value that is not finite becomes null
(and is logged), never the `Infinity`/`NaN` tokens that strict JSON parsers (Node.js, .NET, PLC gateways)
reject. The control socket is reachable by any local process, so it is built to survive anything it is
sent (see ControlServer).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import threading
import time
from collections import deque
from typing import Any, Callable

import cv2
import numpy as np
import zmq

from edge_inspector.service.config import PublishConfig
from edge_inspector.core.errors import ConfigError, InspectorError
from edge_inspector.service.pipeline import LATENCY_KEYS, Result

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Heatmaps are smooth: one fixed SUB filter + run-length zlib encodes ~5x faster than OpenCV's default
# adaptive filtering, at about the same size (measured on a 1280x1024 map: 20 vs 104 ms, 205 vs 227 kB).
PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.10 lets us pick the filter
    PNG_FAST += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]
RESULT_TOPIC = "inspection"
HEALTH_TOPIC = "health"
# Control requests are a few hundred bytes; ZeroMQ itself drops a peer that sends a bigger message, before
# it is buffered (without a cap, a 100 MB request was accepted and cost 336 MB of RSS).
MAX_CONTROL_MESSAGE = 64 * 1024
MAX_SUBSCRIPTION_MESSAGE = 1024  # XPUB receives only subscription notices: a flag byte and a topic


def dumps_strict(payload: Any) -> bytes:
    """JSON that every strict parser accepts: non-finite floats become null (never `Infinity`/`NaN`)."""
    try:
        return json.dumps(payload, allow_nan=False).encode()
    except ValueError:
        log.warning("non-finite number in an outgoing message; sent as null")
        return json.dumps(_finite(payload), allow_nan=False).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _round(value: float | None, digits: int = 6) -> float | None:
    if value is None:
        return None
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def heatmap_to_u8(heatmap: np.ndarray, threshold: float, full_scale: float) -> np.ndarray:
    """Raw-score heatmap -> uint8 where 255 is `full_scale` x threshold (so threshold = 255 / full_scale)."""
    scale = 255.0 / (threshold * full_scale)
    # One saturating pass (anomaly maps are >= 0, so the absolute value changes nothing).
    return cv2.convertScaleAbs(heatmap, alpha=scale)


def heatmap_size(frame_shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """(width, height) of the published heatmap: the frame's, times publish.heatmap_scale."""
    height, width = frame_shape[:2]
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_heatmap(result: Result, mode: str, full_scale: float, jpeg_quality: int, scale: float = 1.0) -> bytes:
    """The message's third part: 8-bit PNG heatmap, JPEG overlay on the frame, or nothing."""
    if mode == "none" or result.heatmap is None or result.decision is None:
        return b""
    heat8 = heatmap_to_u8(result.heatmap, result.decision.threshold, full_scale)
    frame = result.frame.image
    if scale < 1.0:
        size = heatmap_size(frame.shape, scale)
        heat8 = cv2.resize(heat8, size, interpolation=cv2.INTER_AREA)
        frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA) if mode != "png" else frame
    if mode == "png":
        ok, data = cv2.imencode(".png", heat8, PNG_FAST)
    else:
        overlay = cv2.addWeighted(frame, 0.6, cv2.applyColorMap(heat8, cv2.COLORMAP_JET), 0.4, 0)
        ok, data = cv2.imencode(".jpg", overlay, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        raise RuntimeError(f"could not encode the {mode} heatmap")
    return data.tobytes()


def _iso(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="milliseconds")


def result_header(result: Result, camera_id: str, heatmap_mode: str, full_scale: float,
                  min_defect_area: int, heatmap_scale: float = 1.0) -> dict[str, Any]:
    """The JSON header of a result message (docs/wire-format.md, schema_version 1)."""
    frame = result.frame
    decision = result.decision
    height, width = frame.image.shape[:2] if frame.image is not None else (0, 0)
    has_heatmap = heatmap_mode != "none" and result.heatmap is not None and decision is not None
    heat_width, heat_height = heatmap_size(frame.image.shape, heatmap_scale) if has_heatmap else (0, 0)
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "inspection",
        "sequence": result.sequence,
        "frame_index": frame.index,
        "camera_id": camera_id,
        "capture_time": round(frame.capture_time, 6),
        "capture_time_iso": _iso(frame.capture_time),
        "verdict": result.verdict,
        "score": _round(decision.score) if decision else None,
        "normalised_score": _round(decision.normalised_score) if decision else None,
        "threshold": _round(decision.threshold) if decision else None,
        "min_defect_area": min_defect_area,
        "tile_scores": [_round(s) for s in decision.tile_scores] if decision else [],
        "tile_boxes": [list(box) for box in result.tile_boxes],
        "defects": [box.to_dict() for box in decision.boxes] if decision else [],
        "largest_defect_area": decision.largest_area if decision else 0,
        "frame": {"width": width, "height": height},
        "heatmap": {"format": heatmap_mode if has_heatmap else "none", "width": heat_width, "height": heat_height,
                    "full_scale": full_scale},
        "latency_ms": {k: round(result.timings.get(k, 0.0), 3) for k in LATENCY_KEYS},
        "model": {"id": result.model_id, "sha256": result.model_sha256},
        "error": result.error,
        "source_file": frame.source_file,
    }


class Publisher:
    """The pipeline's result sink: encodes, sends, archives, and sends health messages on time.

    All socket use happens on the publish thread (ZeroMQ sockets are not thread-safe); other threads only
    set flags (`request_health`).
    """

    def __init__(self, config: PublishConfig, camera_id: str, health: Callable[[], dict[str, Any]],
                 min_defect_area: Callable[[], int] = lambda: 0, archive: Any | None = None,
                 context: zmq.Context | None = None, curve: Any | None = None):
        self.config = config
        self.camera_id = camera_id
        self.health = health
        self.min_defect_area = min_defect_area
        self.archive = archive
        self.context = context or zmq.Context.instance()
        self.result_topic = f"{RESULT_TOPIC}.{camera_id}".encode()
        self.health_topic = f"{HEALTH_TOPIC}.{camera_id}".encode()
        self.socket = self.context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.SNDHWM, config.sndhwm)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_MESSAGE)
        if curve is not None:
            from edge_inspector.core.keys import RESULTS_DOMAIN

            curve.apply(self.socket, RESULTS_DOMAIN)
        try:
            self.socket.bind(config.endpoint)
        except zmq.ZMQError as err:
            self.socket.close(0)
            raise ConfigError(f"publish.endpoint: cannot bind {config.endpoint} ({err})") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.subscribed = threading.Event()
        self._health_due = 0.0
        self._health_requested = threading.Event()
        self._pending_health: deque[dict[str, Any]] = deque(maxlen=16)
        self.health_sent = 0

    def request_health(self, snapshot: dict[str, Any] | None = None) -> None:
        """Ask for a health message on the next idle tick (thread-safe).

        An event passes the health snapshot taken when it happened: a camera loss and the reconnect right
        after it are then both reported as they were, not as whatever state the publish thread finds later.
        """
        if snapshot is not None:
            self._pending_health.append(snapshot)  # bounded deque: a storm of events cannot grow memory
        self._health_requested.set()

    def _poll_subscriptions(self) -> None:
        while True:
            try:
                message = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if message[:1] == b"\x01" and not self.subscribed.is_set():
                log.info("first subscriber attached to %s", self.endpoint)
                self.subscribed.set()

    def idle(self) -> None:
        self._poll_subscriptions()
        now = time.monotonic()
        if now >= self._health_due or self._health_requested.is_set():
            self._health_requested.clear()
            self._health_due = now + self.config.health_interval_s
            if not self._pending_health:
                self.send_health()
            while self._pending_health:
                self.send_health(self._pending_health.popleft())

    def send_health(self, snapshot: dict[str, Any] | None = None) -> None:
        payload = {"schema_version": SCHEMA_VERSION, "type": "health", "camera_id": self.camera_id,
                   "time": round(time.time(), 3)}
        payload.update(snapshot if snapshot is not None else self.health())
        self.socket.send_multipart([self.health_topic, dumps_strict(payload)])
        self.health_sent += 1

    def finish(self) -> None:
        """The run's last message (called by the publish thread after the last result): state `stopped`."""
        self._pending_health.clear()
        snapshot = self.health()
        snapshot["state"] = "stopped"
        self.send_health(snapshot)

    def send(self, result: Result) -> None:
        start = time.monotonic()
        try:
            heatmap = encode_heatmap(result, self.config.heatmap, self.config.heatmap_full_scale,
                                     self.config.jpeg_quality, self.config.heatmap_scale)
        except Exception as err:  # the verdict still goes out; the missing picture is explained in the header
            heatmap = b""
            result.error = result.error or f"heatmap encoding failed: {err}"
            result.heatmap = None
        done = time.monotonic()
        result.timings["encode"] = (done - start) * 1000.0
        # capture_mono is taken when the read returned: add the read itself, so total covers it too.
        result.timings["total"] = (done - result.frame.capture_mono) * 1000.0 + result.frame.capture_ms
        header = result_header(result, self.camera_id, self.config.heatmap if heatmap else "none",
                               self.config.heatmap_full_scale, self.min_defect_area(), self.config.heatmap_scale)
        self.socket.send_multipart([self.result_topic, dumps_strict(header), heatmap], copy=False)
        if self.archive is not None:
            self.archive.submit(result, header)

    def close(self) -> None:
        self.socket.close(linger=1000)


class ControlServer:
    """The control socket: JSON commands answered on their own thread; nothing a client sends can stop it.

    Request: `{"command": "status"}` or the bare words (`status`, `set_threshold 12.5`, `reload /path`).
    Reply: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.

    A ROUTER socket rather than REP: REP cannot answer a request that is not exactly one frame after its
    envelope (a 2-frame request made the reply raise and killed the thread) and silently drops messages
    without the empty delimiter. ROUTER sees every message with its sender's identity, so every request -
    whatever its frames, size, encoding or nesting - gets one error reply and the loop goes on. REQ clients
    are unaffected. Messages over MAX_CONTROL_MESSAGE are refused by ZeroMQ itself (ZMQ_MAXMSGSIZE).
    """

    MAX_FRAMES = 8  # envelope (identity, delimiter) + one request frame; more is malformed

    def __init__(self, endpoint: str, handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]],
                 context: zmq.Context | None = None, curve: Any | None = None):
        self.handlers = handlers
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_MESSAGE)
        self.socket.setsockopt(zmq.RCVHWM, 100)
        self.socket.setsockopt(zmq.SNDHWM, 100)
        if curve is not None:
            from edge_inspector.core.keys import CONTROL_DOMAIN

            curve.apply(self.socket, CONTROL_DOMAIN)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError as err:
            self.socket.close(0)
            raise ConfigError(f"publish.control_endpoint: cannot bind {endpoint} ({err})") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stop_event = threading.Event()
        self.requests = 0
        self.refused = 0  # malformed requests answered with an error
        self.thread = threading.Thread(target=self._serve, name="edge-control", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                try:
                    if poller.poll(200):
                        self._serve_one()
                except zmq.ContextTerminated:
                    return
                except Exception:  # never leave the loop for a request's sake: log and take the next one
                    log.exception("control socket: unexpected error (request dropped)")
        finally:
            self.socket.close(0)

    def _serve_one(self) -> None:
        try:
            frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        self.requests += 1
        envelope, body = split_envelope(frames)
        if body is None:
            self.refused += 1
            reply: dict[str, Any] = {"ok": False, "error": f"request must be one frame, got {len(frames) - len(envelope)}"}
        else:
            reply = self.handle(body.bytes, peer_of(frames[0]))
            self.refused += int(not reply.get("ok"))
        try:
            self.socket.send_multipart([*envelope, dumps_strict(reply)], zmq.NOBLOCK)
        except zmq.Again:
            log.debug("control reply dropped: the client is not reading")

    def handle(self, raw: bytes, peer: str = "") -> dict[str, Any]:
        try:
            request = parse_request(raw)
        except ValueError as err:
            return {"ok": False, "error": str(err)}
        request["_peer"] = peer  # set here, after parsing: a client cannot claim another origin
        name = request["command"]
        handler = self.handlers.get(name)
        if handler is None:
            shown = name if len(name) <= 40 else name[:37] + "..."
            return {"ok": False, "error": f"unknown command {shown!r} (expected one of {', '.join(self.handlers)})"}
        try:
            reply = handler(request)
        except InspectorError as err:
            return {"ok": False, "error": str(err)}
        except Exception as err:  # a bug in a handler must not kill the control thread
            log.exception("control command %s failed", name)
            return {"ok": False, "error": f"{type(err).__name__}: {err}".splitlines()[0]}
        return {"ok": True, **reply}

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(2.0)
        elif self.thread.ident is None:  # never started (start-up failed later on): the socket is ours to close
            self.socket.close(0)


def split_envelope(frames: list[zmq.Frame]) -> tuple[list[Any], zmq.Frame | None]:
    """(reply envelope, request frame) of a ROUTER message; request None when it is not exactly one frame.

    REQ clients send `[identity, b"", request]`, DEALER clients may omit the empty delimiter. Whatever
    comes, the envelope is what routes the (error) reply back to the sender.
    """
    identity = frames[0]
    if len(frames) >= 2 and len(frames[1]) == 0:
        envelope, body = [identity, b""], frames[2:]
    else:
        envelope, body = [identity], frames[1:]
    if len(body) != 1 or len(frames) > ControlServer.MAX_FRAMES:
        return envelope, None
    return envelope, body[0]


def peer_of(frame: zmq.Frame) -> str:
    """Who sent a request, for the log: the CURVE key when authenticated, and the peer's address."""
    parts = []
    for prop, label in (("User-Id", "key"), ("Peer-Address", "from")):
        try:
            value = frame.get(prop)
        except (zmq.ZMQError, UnicodeDecodeError):
            continue
        if value and value != "anonymous":
            parts.append(f"{label} {value}")
    return ", ".join(parts) or "local (ipc/inproc)"


def parse_request(raw: bytes) -> dict[str, Any]:
    """A request as a dict with a `command` string; ValueError (the reply's one line) for anything else."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("request is not UTF-8 text") from None
    if text.startswith(("{", "[", '"')):
        try:
            request = json.loads(text)
        except RecursionError:
            raise ValueError("request is nested too deeply") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"request is not valid JSON ({err})") from None
        if isinstance(request, str):
            text = request.strip()  # a JSON string holding the bare words
        elif not isinstance(request, dict) or not isinstance(request.get("command"), str):
            raise ValueError('request must be a JSON object with a "command" string')
        else:
            request["command"] = request["command"].replace("-", "_")
            return request
    parts = text.split(None, 1)
    if not parts:
        raise ValueError("empty request")
    request = {"command": parts[0].replace("-", "_")}
    if len(parts) > 1:
        request["value"] = parts[1].strip()
    return request


def send_control(endpoint: str, request: dict[str, Any] | str, timeout_s: float = 5.0,
                 context: zmq.Context | None = None, keys: Any | None = None) -> dict[str, Any]:
    """Client side of the control socket: a dict is sent as JSON, a string as the bare words.

    `keys`: an `edge_inspector.core.keys.ClientKeys` when the service runs with CURVE.
    """
    context = context or zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    socket.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    if keys is not None:
        keys.apply(socket)
    try:
        socket.connect(endpoint)
        socket.send(request.encode() if isinstance(request, str) else json.dumps(request).encode())
        return json.loads(socket.recv())
    except zmq.Again:
        raise TimeoutError(f"no reply from {endpoint} within {timeout_s} s") from None
    finally:
        socket.close(0)
