"""What the live view knows, and the bounded fan-out of it to browsers.

`Hub` holds, per camera, the latest result, a few recent ones (so a browser can still fetch the picture of
the result it was just told about), the last N failed parts with their pictures, recent scores for the
threshold histogram, and the latest health message. Every change becomes one pre-serialised SSE event that
is put on each browser's `ClientQueue` without ever blocking: a queue that is full is emptied and marked
for a resync (the browser's writer then sends one fresh snapshot instead of the backlog). So a stalled
browser costs a bounded amount of memory and no time on the receive thread, and the other browsers and the
service never wait for it.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

IMAGE_TYPES = {"png": "image/png", "jpeg_overlay": "image/jpeg"}


def encode_event(name: str, data: Any) -> bytes:
    """One Server-Sent Event; JSON never contains a raw newline, so `data:` is a single line."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


FRAME_WAIT_S = 0.5  # how long a result waits for its frame message before it is shown without one


@dataclass
class Item:
    """One received result. `id` is the view's own (unique across view restarts: it starts at the clock in
    ms), so image URLs never collide when the service restarts and its `sequence` starts again at 1.
    `frame`: the JPEG of the judged frame from the service's `frame.<camera>` message, when it came."""

    id: int
    header: dict[str, Any]
    image: bytes
    received: float
    frame: bytes = b""

    @property
    def content_type(self) -> str:
        fmt = (self.header.get("heatmap") or {}).get("format", "none")
        return IMAGE_TYPES.get(fmt, "") if self.image else ""

    def to_json(self, camera_id: str, now: float | None = None) -> dict[str, Any]:
        image = f"/image/{camera_id}/{self.id}" if self.content_type else None
        frame = f"/frame/{camera_id}/{self.id}" if self.frame else None
        age = None if now is None else round(max(0.0, now - self.received), 1)
        return {"id": self.id, "header": self.header, "image": image, "frame": frame, "age_s": age}


@dataclass
class CameraState:
    """One camera as seen from the result stream (results and health share the camera id)."""

    camera_id: str
    keep_fails: int
    keep_scores: int
    keep_recent: int = 8
    latest: Item | None = None
    health: dict[str, Any] | None = None
    health_epoch: int = 0
    epoch: int = 0  # +1 each time the service restarted (its sequence went backwards)
    last_sequence: int = 0
    results_seen: int = 0
    endpoint: str = ""  # the --connect endpoint this camera's messages come from
    frames_seen: int = 0
    waiting: Item | None = None  # a result held back (at most FRAME_WAIT_S) until its frame arrives
    fails: deque = field(init=False)
    recent: deque = field(init=False)
    scores: deque = field(init=False)
    verdicts: deque = field(init=False)

    def __post_init__(self) -> None:
        self.fails = deque(maxlen=self.keep_fails)
        self.recent = deque(maxlen=self.keep_recent)
        self.scores = deque(maxlen=self.keep_scores)  # (score, verdict) for the threshold histogram
        # (epoch, sequence, verdict): enough to count the results newer than the last health message.
        self.verdicts = deque(maxlen=4096)

    def add_result(self, item: Item) -> None:
        sequence = int(item.header.get("sequence") or 0)
        if sequence <= self.last_sequence:
            self.epoch += 1
        self.last_sequence = sequence
        self.results_seen += 1
        verdict = item.header.get("verdict")
        self.latest = item
        self.recent.append(item)
        if verdict == "fail":
            self.fails.append(item)
        score = item.header.get("score")
        if score is not None:
            self.scores.append((score, verdict))
        self.verdicts.append((self.epoch, sequence, verdict))

    def add_health(self, health: dict[str, Any]) -> None:
        last = int(health.get("last_sequence") or 0)
        previous = self.health or {}
        restarted = last < self.last_sequence and health.get("uptime_s", 0) < previous.get("uptime_s", float("inf"))
        if restarted:
            self.epoch += 1
            self.last_sequence = last
        self.health = health
        self.health_epoch = self.epoch

    def item(self, item_id: int) -> Item | None:
        for item in itertools.chain(reversed(self.recent), reversed(self.fails)):
            if item.id == item_id:
                return item
        return None

    def counters(self) -> dict[str, Any]:
        """Totals from the last health message plus the results that arrived after it (so the counters move
        with every part, not every `health_interval_s`)."""
        health = self.health if self.health_epoch == self.epoch else None
        after = int(health.get("last_sequence") or 0) if health else 0
        extra = {"pass": 0, "review": 0, "fail": 0, "error": 0}
        for epoch, sequence, verdict in reversed(self.verdicts):
            if epoch != self.epoch or sequence <= after:
                break
            extra[verdict] = extra.get(verdict, 0) + 1
        health = health or {}
        latency = health.get("latency_ms") or {}
        return {
            "parts": int(health.get("processed", 0)) + sum(extra.values()),
            "fails": int(health.get("fails", 0)) + extra["fail"],
            "reviews": int(health.get("reviews", 0)) + extra["review"],
            "errors": int(health.get("errors", 0)) + extra["error"],
            "dropped": health.get("dropped"),
            "fps": health.get("fps"),
            "latency_p50": latency.get("p50"),
            "latency_p99": latency.get("p99"),
        }

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "camera_id": self.camera_id,
            "latest": self.latest.to_json(self.camera_id, now) if self.latest else None,
            "health": self.health,
            "counters": self.counters(),
            "fails": [item.to_json(self.camera_id, now) for item in self.fails],
            "scores": [list(entry) for entry in self.scores],
            "results_seen": self.results_seen,
            "endpoint": self.endpoint,
        }


class ClientQueue:
    """One browser's pending events: bounded; overflow empties it and asks for a resync (never blocks)."""

    def __init__(self, capacity: int, peer: str = ""):
        self.capacity = capacity
        self.peer = peer
        self.events: deque[bytes] = deque()
        self.condition = threading.Condition()
        self.closed = False
        self.resync = False
        self.dropped = 0
        self.sent = 0
        self.replaced = False  # closed to make room for a newer stream (see Hub.attach)

    def put(self, event: bytes) -> None:
        with self.condition:
            if self.closed:
                return
            if len(self.events) >= self.capacity:
                self.dropped += len(self.events) + 1
                self.events.clear()
                self.resync = True
            else:
                self.events.append(event)
            self.condition.notify()

    def take(self, timeout_s: float) -> tuple[list[bytes], bool]:
        """(events to write, whether a snapshot must be sent first); ([], False) after timeout_s idle."""
        with self.condition:
            if not self.events and not self.resync and not self.closed:
                self.condition.wait(timeout_s)
            events, resync = list(self.events), self.resync
            self.events.clear()
            self.resync = False
            return events, resync

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify_all()


class Hub:
    """The view's state and its browsers. All mutation and fan-out happen under one lock, so a browser's
    snapshot and the events queued after it never overlap or leave a gap."""

    def __init__(self, keep_fails: int = 24, keep_scores: int = 500, client_buffer: int = 64,
                 max_clients: int = 16, max_per_client: int = 4, control_info: dict[str, Any] | None = None):
        self.keep_fails = keep_fails
        self.keep_scores = keep_scores
        self.client_buffer = client_buffer
        self.max_clients = max_clients
        self.max_per_client = max_per_client
        self.replaced = 0
        self.control_info = control_info or {"enabled": False, "auth": "none"}
        self.cameras: dict[str, CameraState] = {}
        self.clients: list[ClientQueue] = []
        self.link: dict[str, Any] = {"connected": False, "detail": "starting", "endpoints": []}
        self.lock = threading.Lock()
        self._ids = itertools.count(int(time.time() * 1000))
        self.messages = 0
        self.bad_messages = 0
        self.dropped_by_closed_clients = 0

    # -- from the feed -----------------------------------------------------------------------------------------

    def camera(self, camera_id: str) -> CameraState:
        state = self.cameras.get(camera_id)
        if state is None:
            state = self.cameras[camera_id] = CameraState(camera_id, self.keep_fails, self.keep_scores)
        return state

    def add_result(self, header: dict[str, Any], image: bytes, endpoint: str = "") -> Item:
        """A result. Once a camera's service sends frames, its result is held back until its frame message
        (sent right after it) arrives, at most FRAME_WAIT_S, so a browser gets each part whole: the frame
        with its heatmap, never a heatmap alone that a moment later gets a frame under it."""
        camera_id = str(header.get("camera_id", "?"))
        with self.lock:
            self.messages += 1
            state = self.camera(camera_id)
            state.endpoint = endpoint or state.endpoint
            if state.waiting is not None:  # its frame never came: show it without one
                self._publish_result(state, state.waiting)
            item = Item(next(self._ids), header, image, time.time())
            state.add_result(item)
            # A first result also waits: the service may send frames (it does since frame messages exist).
            if (state.frames_seen or state.results_seen == 1) and header.get("verdict") != "error":
                state.waiting = item
            else:
                self._publish_result(state, item)
        return item

    def add_frame(self, header: dict[str, Any], frame: bytes) -> None:
        """A frame message: its result is the one waiting (or a recent one, if the frame came late)."""
        camera_id = str(header.get("camera_id", "?"))
        sequence = header.get("sequence")
        with self.lock:
            self.messages += 1
            state = self.camera(camera_id)
            state.frames_seen += 1
            waiting = state.waiting
            if waiting is not None and waiting.header.get("sequence") == sequence:
                waiting.frame = frame
                self._publish_result(state, waiting)
                return
            for item in reversed(state.recent):
                if item.header.get("sequence") == sequence and not item.frame:
                    item.frame = frame  # shown with it from now on (strip, review, snapshots)
                    return

    def flush_waiting(self, now: float | None = None) -> None:
        """Results whose frame did not come within FRAME_WAIT_S go out without one (called by the feed)."""
        now = time.time() if now is None else now
        with self.lock:
            for state in self.cameras.values():
                if state.waiting is not None and now - state.waiting.received > FRAME_WAIT_S:
                    self._publish_result(state, state.waiting)

    def _publish_result(self, state: CameraState, item: Item) -> None:
        if state.waiting is item:
            state.waiting = None
        camera_id = state.camera_id
        self._broadcast(encode_event("result", {"camera_id": camera_id, "item": item.to_json(camera_id, item.received),
                                                "counters": state.counters()}))

    def add_health(self, header: dict[str, Any], endpoint: str = "") -> None:
        camera_id = str(header.get("camera_id", "?"))
        with self.lock:
            self.messages += 1
            state = self.camera(camera_id)
            state.endpoint = endpoint or state.endpoint
            state.add_health(header)
            self._broadcast(encode_event("health", {"camera_id": camera_id, "health": header,
                                                    "counters": state.counters()}))

    def set_link(self, link: dict[str, Any]) -> None:
        with self.lock:
            changed = (link["connected"], link["detail"]) != (self.link["connected"], self.link["detail"])
            self.link = link
            if changed:
                self._broadcast(encode_event("link", link))

    def _broadcast(self, event: bytes) -> None:
        for client in self.clients:
            client.put(event)

    # -- for the browsers --------------------------------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        now = time.time()
        return {"cameras": [state.to_json(now) for state in self.cameras.values()], "link": self.link,
                "control": self.control_info, "keep_fails": self.keep_fails, "keep_scores": self.keep_scores,
                "time": now}

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return self._snapshot()

    def attach(self, peer: str) -> tuple[ClientQueue, bytes] | None:
        """A new browser's queue and the snapshot it starts from, or None (every slot held, each by a
        different client).

        One client (address) cannot hold every slot: past `max_per_client` its own oldest stream is closed
        for the new one (a reloaded tab leaves its old stream behind; a client opening streams in a loop
        only replaces its own), and when all `max_clients` are held, the oldest stream of the client with
        the most is closed if it holds more than the newcomer. 16 streams held by one address used to lock
        every other browser out."""
        with self.lock:
            mine = [c for c in self.clients if c.peer == peer]
            victim = None
            if len(mine) >= self.max_per_client:
                victim = mine[0]
            elif len(self.clients) >= self.max_clients:
                counts: dict[str, int] = {}
                for c in self.clients:
                    counts[c.peer] = counts.get(c.peer, 0) + 1
                crowded = max(counts, key=lambda p: counts[p])
                if counts[crowded] <= len(mine) + 1:
                    return None
                victim = next(c for c in self.clients if c.peer == crowded)
            if victim is not None:
                self.clients.remove(victim)
                self.dropped_by_closed_clients += victim.dropped
                self.replaced += 1
                victim.replaced = True
                victim.close()
            client = ClientQueue(self.client_buffer, peer)
            self.clients.append(client)
            return client, encode_event("snapshot", self._snapshot())

    def resync(self, client: ClientQueue) -> bytes:
        """A fresh snapshot for a browser whose queue overflowed; events queued after it follow it."""
        with self.lock:
            with client.condition:
                client.events.clear()
                client.resync = False
            return encode_event("snapshot", self._snapshot())

    def detach(self, client: ClientQueue) -> None:
        client.close()
        with self.lock:
            if client in self.clients:
                self.clients.remove(client)
                self.dropped_by_closed_clients += client.dropped

    def close_all(self) -> None:
        with self.lock:
            clients = list(self.clients)
        for client in clients:
            client.close()

    def image(self, camera_id: str, item_id: int) -> Item | None:
        with self.lock:
            state = self.cameras.get(camera_id)
            return state.item(item_id) if state else None

    def stats(self) -> dict[str, Any]:
        """The view's own health: what it received and how each browser keeps up."""
        with self.lock:
            return {"messages": self.messages, "bad_messages": self.bad_messages, "link": self.link,
                    "cameras": sorted(self.cameras),
                    "clients": [{"peer": c.peer, "queued": len(c.events), "dropped": c.dropped, "sent": c.sent}
                                for c in self.clients],
                    "dropped_by_closed_clients": self.dropped_by_closed_clients, "replaced": self.replaced}

