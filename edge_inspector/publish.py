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

from .config import PublishConfig
from .errors import ConfigError, InspectorError
from .pipeline import Result

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Heatmaps are smooth: one fixed SUB filter + run-length zlib encodes ~5x faster than OpenCV's default
# adaptive filtering, at about the same size (measured on a 1280x1024 map: 20 vs 104 ms, 205 vs 227 kB).
PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.10 lets us pick the filter
    PNG_FAST += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]
RESULT_TOPIC = "inspection"
HEALTH_TOPIC = "health"


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
    height, width = frame.image.shape[:2]
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
        "latency_ms": {k: round(v, 3) for k, v in result.timings.items()},
        "model": {"id": result.model_id, "sha256": result.model_sha256},
        "error": result.error,
    }


class Publisher:
    """The pipeline's result sink: encodes, sends, archives, and sends health messages on time.

    All socket use happens on the publish thread (ZeroMQ sockets are not thread-safe); other threads only
    set flags (`request_health`).
    """

    def __init__(self, config: PublishConfig, camera_id: str, health: Callable[[], dict[str, Any]],
                 min_defect_area: Callable[[], int] = lambda: 0, archive: Any | None = None,
                 context: zmq.Context | None = None):
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
        self.socket.send_multipart([self.health_topic, json.dumps(payload).encode()])
        self.health_sent += 1

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
        result.timings["total"] = (done - result.frame.capture_mono) * 1000.0
        header = result_header(result, self.camera_id, self.config.heatmap if heatmap else "none",
                               self.config.heatmap_full_scale, self.min_defect_area(), self.config.heatmap_scale)
        self.socket.send_multipart([self.result_topic, json.dumps(header).encode(), heatmap], copy=False)
        if self.archive is not None:
            self.archive.submit(result, header)

    def close(self) -> None:
        self.socket.close(linger=1000)


class ControlServer:
    """REP socket answering JSON commands on its own thread; a handler error is a reply, never a crash.

    Request: `{"command": "status"}` (or just the word `status`); `{"command": "set_threshold", "value": 12.5}`.
    Reply: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
    """

    def __init__(self, endpoint: str, handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]],
                 context: zmq.Context | None = None):
        self.handlers = handlers
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError as err:
            self.socket.close(0)
            raise ConfigError(f"publish.control_endpoint: cannot bind {endpoint} ({err})") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="edge-control", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                if not poller.poll(200):
                    continue
                request = self.socket.recv()
                self.socket.send(json.dumps(self.handle(request)).encode())
        finally:
            self.socket.close(0)

    def handle(self, raw: bytes) -> dict[str, Any]:
        try:
            request = parse_request(raw)
        except ValueError as err:
            return {"ok": False, "error": str(err)}
        name = request["command"]
        handler = self.handlers.get(name)
        if handler is None:
            return {"ok": False, "error": f"unknown command {name!r} (expected one of {', '.join(self.handlers)})"}
        try:
            reply = handler(request)
        except InspectorError as err:
            return {"ok": False, "error": str(err)}
        except Exception as err:  # a bug in a handler must not kill the control thread
            log.exception("control command %s failed", name)
            return {"ok": False, "error": f"{type(err).__name__}: {err}"}
        return {"ok": True, **reply}

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(2.0)
        else:  # never started (start-up failed later on): the socket is still ours to close
            self.socket.close(0)


def parse_request(raw: bytes) -> dict[str, Any]:
    text = raw.decode("utf-8", "replace").strip()
    if not text.startswith("{"):
        parts = text.split()
        if not parts:
            raise ValueError("empty request")
        request: dict[str, Any] = {"command": parts[0]}
        if len(parts) > 1:
            request["value"] = parts[1]
        return request
    try:
        request = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"request is not valid JSON ({err})") from None
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise ValueError('request must be a JSON object with a "command" string')
    return request


def send_control(endpoint: str, request: dict[str, Any], timeout_s: float = 5.0,
                 context: zmq.Context | None = None) -> dict[str, Any]:
    """Client side of the control socket (used by tests and scripts)."""
    context = context or zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    try:
        socket.connect(endpoint)
        socket.send(json.dumps(request).encode())
        return json.loads(socket.recv())
    except zmq.Again:
        raise TimeoutError(f"no reply from {endpoint} within {timeout_s} s") from None
    finally:
        socket.close(0)
