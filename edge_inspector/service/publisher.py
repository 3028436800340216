"""Results and health out over ZeroMQ PUB (the control socket is service/control.py).

Results: one multipart message per processed frame, `[b"inspection.<camera_id>\0", header_json, heatmap]`
(docs/wire-format.md documents every header field; `schema_version` changes only when a field's meaning
does); the topic's trailing NUL makes a subscription to one camera exact (core/wire.py). Health:
`[b"health.<camera_id>\0", json]` every `health_interval_s` and at once when the camera
connects or is lost. PUB never blocks the line: each subscriber gets a send queue capped at `sndhwm`
messages, past which ZeroMQ drops *for that subscriber only*, so a stalled HMI costs itself messages,
not the service memory.

The PUB side is an XPUB socket (PUB plus subscription notices), so the service can optionally hold capture
until a first subscriber is attached (`wait_for_subscriber_s`): with plain PUB the results published
before a subscriber's connection completes are lost, which matters for demos, tests and finite replays.

Every JSON message is encoded with `allow_nan=False` semantics: a value that is not finite becomes null
(and is logged), never the `Infinity`/`NaN` tokens that strict JSON parsers (Node.js, .NET, PLC gateways)
reject (core/wire.py).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import cv2
import zmq

from edge_inspector.core.render import PNG_FAST, heatmap_size, heatmap_to_u8
from edge_inspector.core.wire import (
    FRAME_TOPIC,
    HEALTH_TOPIC,
    RESULT_TOPIC,
    SCHEMA_VERSION,
    bind_or_refuse,
    dumps_strict,
    topic,
)
from edge_inspector.service.config import PublishConfig
from edge_inspector.service.pipeline import LATENCY_KEYS, Result

log = logging.getLogger(__name__)

MAX_SUBSCRIPTION_MESSAGE = 1024  # XPUB receives only subscription notices: a flag byte and a topic
# Frame messages: enough to see a defect on an operator's screen. A 1280x1024 frame: 8.5 ms to encode at
# quality 85, 78 kB (median of 30 on the loaded 2-core test VM), only while a view subscribes.
FRAME_MAX_SIDE = 1280


def _round(value: float | None, digits: int = 6) -> float | None:
    if value is None:
        return None
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None



def encode_heatmap(result: Result, mode: str, full_scale: float, jpeg_quality: int) -> bytes:
    """The message's third part: 8-bit PNG heatmap, JPEG overlay on the frame, or nothing.

    Sent at the result's `heatmap_scale` (the scale its map was stitched at: publish.heatmap_scale, "auto"
    resolved by the inference stage).
    """
    frame = result.frame.image
    if mode == "none" or result.heatmap is None or result.decision is None or frame is None:
        return b""
    heat8 = heatmap_to_u8(result.heatmap, result.decision.threshold, full_scale)
    scale = result.heatmap_scale
    if scale < 1.0:
        size = heatmap_size(frame.shape, scale)
        if heat8.shape[::-1] != size:  # maps stitched at the published scale already have its size
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


def encode_frame(result: Result, jpeg_quality: int) -> tuple[bytes, int, int]:
    """The frame a result judged as JPEG (longest side at most FRAME_MAX_SIDE), with its width and height."""
    frame = result.frame.image
    if frame is None:
        return b"", 0, 0
    height, width = frame.shape[:2]
    scale = min(1.0, FRAME_MAX_SIDE / max(height, width))
    if scale < 1.0:
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    return (data.tobytes(), width, height) if ok else (b"", 0, 0)


def _iso(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="milliseconds")


def result_header(result: Result, camera_id: str, heatmap_mode: str, full_scale: float) -> dict[str, Any]:
    """The JSON header of a result message (docs/wire-format.md, schema_version 2).

    Threshold and min_defect_area come from the result's own decision, never from the live settings: a
    set_threshold or reload between inference and publishing cannot mix two moments in one header.
    """
    frame = result.frame
    decision = result.decision
    height, width = frame.image.shape[:2] if frame.image is not None else (0, 0)
    has_heatmap = heatmap_mode != "none" and result.heatmap is not None and decision is not None and height > 0
    heat_width, heat_height = heatmap_size((height, width), result.heatmap_scale) if has_heatmap else (0, 0)
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "inspection",
        "sequence": result.sequence,
        "frame_index": frame.index,
        "part_id": frame.part_id if frame.part_id is not None else str(result.sequence),
        "trigger_time": round(frame.trigger_time, 6) if frame.trigger_time is not None else None,
        "camera_id": camera_id,
        "capture_time": round(frame.capture_time, 6),
        "capture_time_iso": _iso(frame.capture_time),
        "verdict": result.verdict,
        "score": _round(decision.score) if decision else None,
        "normalised_score": _round(decision.normalised_score) if decision else None,
        "threshold": _round(decision.threshold) if decision else None,
        "review_threshold": _round(decision.review_threshold) if decision else None,
        "min_defect_area": result.min_defect_area,
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
                 archive: Any | None = None,
                 context: zmq.Context | None = None, curve: Any | None = None):
        self.config = config
        self.camera_id = camera_id
        self.health = health
        self.archive = archive
        self.context = context or zmq.Context.instance()
        self.result_topic = topic(RESULT_TOPIC, camera_id)  # NUL-terminated: exact per camera (core/wire.py)
        self.health_topic = topic(HEALTH_TOPIC, camera_id)
        self.frame_topic = topic(FRAME_TOPIC, camera_id)
        self.frame_subscriptions: set[bytes] = set()  # subscribed topics that name frames (the live view's)
        self.socket = self.context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.SNDHWM, config.sndhwm)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_MESSAGE)
        if curve is not None:
            from edge_inspector.core.keys import RESULTS_DOMAIN

            curve.apply(self.socket, RESULTS_DOMAIN)
        self.endpoint = bind_or_refuse(self.socket, config.endpoint, "publish.endpoint")
        self.subscribed = threading.Event()
        self._health_due = 0.0
        self._health_requested = threading.Event()
        self._pending_health: deque[dict[str, Any]] = deque(maxlen=16)
        self.health_sent = 0
        self.last_header: dict[str, Any] = {}  # the last result header and health payload sent, for the
        self.last_health: dict[str, Any] | None = None  # outputs beside ZeroMQ (service/outputs/fanout.py)

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
            asked = message[1:]
            if asked.startswith(FRAME_TOPIC.encode()) and self.frame_topic.startswith(asked):
                if message[:1] == b"\x01":
                    self.frame_subscriptions.add(asked)
                else:  # XPUB passes an unsubscription once no subscriber holds the topic any more
                    self.frame_subscriptions.discard(asked)

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
        self.last_health = payload
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
                                     self.config.jpeg_quality)
        except Exception as err:  # the verdict still goes out; the missing picture is explained in the header
            heatmap = b""
            result.error = result.error or f"heatmap encoding failed: {err}"
            result.heatmap = None
        done = time.monotonic()
        result.timings["encode"] = (done - start) * 1000.0
        # capture_mono is taken when the read returned: add the read itself, so total covers it too.
        result.timings["total"] = (done - result.frame.capture_mono) * 1000.0 + result.frame.capture_ms
        header = result_header(result, self.camera_id, self.config.heatmap if heatmap else "none",
                               self.config.heatmap_full_scale)
        self.socket.send_multipart([self.result_topic, dumps_strict(header), heatmap], copy=False)
        self.last_header = header
        if self.archive is not None:
            self.archive.submit(result, header)
        self._poll_subscriptions()
        if self.frame_subscriptions:
            self.send_frame(result)

    def send_frame(self, result: Result) -> None:
        """After the result (its latency never includes this): the judged frame, for the live view."""
        try:
            data, width, height = encode_frame(result, self.config.jpeg_quality)
        except Exception as err:  # the result went out already; the view shows its heatmap alone
            log.warning("frame message for #%d not sent: %s", result.sequence, err)
            return
        if data:
            header = {"schema_version": SCHEMA_VERSION, "type": "frame", "camera_id": self.camera_id,
                      "sequence": result.sequence, "format": "jpeg", "width": width, "height": height}
            self.socket.send_multipart([self.frame_topic, dumps_strict(header), data], copy=False)

    def close(self) -> None:
        self.socket.close(linger=1000)
