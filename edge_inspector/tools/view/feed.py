"""The view's side of the result stream: one `Subscriber` per service, on a thread, with link supervision.

The page must say "disconnected" when the service is gone and recover by itself. Three signals, fastest
first: a socket monitor reports the TCP connection closing (service stopped or crashed: at once); ZeroMQ
heartbeats (ZMTP PING/PONG, answered by any libzmq >= 4.2 peer without configuration) close a connection
whose peer stopped answering, e.g. a pulled cable (within `HEARTBEAT_TIMEOUT_MS`); and a silence timeout
covers the rest (connected but no message, not even the health message sent every
`publish.health_interval_s`). ZeroMQ reconnects on its own; the first message after that marks the link
live again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from edge_inspector.tools.subscriber import Subscriber
from edge_inspector.tools.view.hub import Hub

log = logging.getLogger(__name__)

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
RECONNECT_MAX_MS = 2000  # retry a lost service at least every 2 s (libzmq's default backs off further)


@dataclass
class Link:
    endpoint: str
    tcp_up: bool | None = None  # None: no monitor event yet
    last_message: float | None = None  # monotonic
    disconnects: int = 0

    def status(self, now: float, silent_after_s: float) -> tuple[bool, str]:
        if self.tcp_up is False:
            return False, f"lost connection to {self.endpoint} (service stopped or unreachable; retrying)"
        if self.last_message is None:
            return False, f"waiting for the first message from {self.endpoint}"
        silent = now - self.last_message
        if silent > silent_after_s:
            return False, f"disconnected: no message from {self.endpoint} for over {silent_after_s:g} s"
        return True, "live"


def feed_context() -> zmq.Context:
    """A context whose sockets heartbeat and reconnect quickly (pyzmq applies these to every new socket)."""
    context = zmq.Context()
    context.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    context.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    context.setsockopt(zmq.RECONNECT_IVL, 200)
    context.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
    return context


class Feed:
    """Receives results and health from every `--connect` endpoint into the hub, on one thread."""

    def __init__(self, endpoints: list[str], hub: Hub, silent_after_s: float = 12.0, rcvhwm: int = 100,
                 context: zmq.Context | None = None, keys: Any | None = None):
        """`keys`: an `edge_inspector.core.keys.ClientKeys` when the services run with CURVE."""
        self.hub = hub
        self.silent_after_s = silent_after_s
        self.context = context or feed_context()
        self._own_context = context is None
        # RCVHWM bounds what waits here if this thread falls behind; past it the service's PUB drops for
        # the view only (its per-subscriber send queue), never slowing the line.
        # `frame.` asks the services for the judged frames too (sent only while someone subscribes to them):
        # the page shows the part under its heatmap, not a heatmap alone.
        self.subscribers = [Subscriber(endpoint, ("inspection.", "health.", "frame."), context=self.context,
                                       rcvhwm=rcvhwm, keys=keys)
                            for endpoint in endpoints]
        self.links = [Link(endpoint) for endpoint in endpoints]
        self.monitors = [s.socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
                         for s in self.subscribers]
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="view-feed", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(5)

    def _run(self) -> None:
        poller = zmq.Poller()
        for subscriber, monitor in zip(self.subscribers, self.monitors):
            poller.register(subscriber.socket, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                ready = dict(poller.poll(250))
                for subscriber, monitor, link in zip(self.subscribers, self.monitors, self.links):
                    if monitor in ready:
                        self._on_monitor(monitor, link)
                    if subscriber.socket in ready:
                        self._drain(subscriber, link)
                self._publish_link()
                self.hub.flush_waiting()
        except Exception:  # a bug here must show on the page, not silently freeze it
            log.exception("view feed stopped")
            self.hub.set_link({"connected": False, "detail": "view feed crashed (see the view's log)",
                               "endpoints": []})
        finally:
            self._close()

    def _on_monitor(self, monitor: zmq.Socket, link: Link) -> None:
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                link.tcp_up = True
                log.info("connected to %s", link.endpoint)
            elif event == zmq.EVENT_DISCONNECTED:
                link.tcp_up = False
                link.disconnects += 1
                log.warning("disconnected from %s; reconnecting", link.endpoint)

    def _drain(self, subscriber: Subscriber, link: Link, batch: int = 200) -> None:
        for _ in range(batch):  # bounded, so one busy service cannot starve the others' links
            try:
                message = subscriber.receive(0)
            except ValueError as err:  # malformed JSON header
                self.hub.bad_messages += 1
                log.warning("%s: unreadable message header (%s); skipped", link.endpoint, err)
                continue
            if message is None:
                return
            link.last_message = time.monotonic()
            link.tcp_up = True
            header = message.header
            if not isinstance(header, dict):
                self.hub.bad_messages += 1
                continue
            if message.is_result:
                self.hub.add_result(header, message.heatmap, link.endpoint)
            elif header.get("type") == "frame":
                self.hub.add_frame(header, message.heatmap)  # the third part holds the frame's JPEG here
            elif header.get("type") == "health":
                self.hub.add_health(header, link.endpoint)

    def link_state(self) -> dict[str, Any]:
        now = time.monotonic()
        endpoints: list[dict[str, Any]] = []
        for link in self.links:
            ok, detail = link.status(now, self.silent_after_s)
            age = None if link.last_message is None else round(now - link.last_message, 1)
            endpoints.append({"endpoint": link.endpoint, "connected": ok, "detail": detail,
                              "last_message_age_s": age, "disconnects": link.disconnects})
        problems = [str(e["detail"]) for e in endpoints if not e["connected"]]
        return {"connected": not problems, "detail": "; ".join(problems) or "live", "endpoints": endpoints}

    def _publish_link(self) -> None:
        self.hub.set_link(self.link_state())

    def _close(self) -> None:
        for subscriber in self.subscribers:
            try:
                subscriber.socket.disable_monitor()
            except zmq.ZMQError:
                pass
            subscriber.close()
        for monitor in self.monitors:
            monitor.close(0)
        if self._own_context:
            self.context.term()
