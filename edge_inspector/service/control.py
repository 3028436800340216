"""The control socket: JSON commands answered on their own thread; nothing a client sends can stop it.

Any local process can reach this socket (CURVE keys are optional), so it is built to survive anything it is
sent: wrong frame counts, oversized or non-UTF-8 messages, deep nesting, unknown commands, handler bugs.
Slow commands (`reload`: read, verify and warm up a bundle) run on a thread of their own and are answered
when done, so the socket keeps answering `status` meanwhile, and a SIGTERM during a reload still closes it
(a reload on this thread once held the socket silent for 42 s and kept the process from exiting).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import zmq

from edge_inspector.core.errors import InspectorError
from edge_inspector.core.wire import MAX_CONTROL_MESSAGE, bind_or_refuse, dumps_strict

log = logging.getLogger(__name__)


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
                 context: zmq.Context | None = None, curve: Any | None = None, slow: tuple[str, ...] = ()):
        self.handlers = handlers
        self.slow = frozenset(slow)  # commands run off this thread, one at a time each, answered when done
        self._running: dict[str, threading.Thread] = {}
        self._finished: queue.SimpleQueue[tuple[list[Any], dict[str, Any]]] = queue.SimpleQueue()
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_MESSAGE)
        self.socket.setsockopt(zmq.RCVHWM, 100)
        self.socket.setsockopt(zmq.SNDHWM, 100)
        if curve is not None:
            from edge_inspector.core.keys import CONTROL_DOMAIN

            curve.apply(self.socket, CONTROL_DOMAIN)
        self.endpoint = bind_or_refuse(self.socket, endpoint, "publish.control_endpoint")
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
                    if poller.poll(20 if self._running else 200):
                        self._serve_one()
                    self._send_finished()
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
            got = len(frames) - len(envelope)
            reply: dict[str, Any] = {"ok": False, "error": f"request must be one frame, got {got}"}
        else:
            request = self.parse(body.bytes, peer_of(frames[0]))
            if "command" in request and request["command"] in self.slow:
                started = self._start_slow(envelope, request)
                if started is None:
                    return  # answered by _send_finished when it is done
                reply = started
            else:
                reply = request if "command" not in request else self.call(request)
            self.refused += int(not reply.get("ok"))
        self._send(envelope, reply)

    def _send(self, envelope: list[Any], reply: dict[str, Any]) -> None:
        try:
            self.socket.send_multipart([*envelope, dumps_strict(reply)], zmq.NOBLOCK)
        except zmq.Again:
            log.debug("control reply dropped: the client is not reading")

    def _start_slow(self, envelope: list[Any], request: dict[str, Any]) -> dict[str, Any] | None:
        """Run a slow command on its own thread (None), or the refusal when one of its kind is running."""
        name = request["command"]
        running = self._running.get(name)
        if running is not None and running.is_alive():
            return {"ok": False, "error": f"a {name} is already running; try again when it has answered"}

        def work() -> None:
            reply = self.call(request)
            self._finished.put((envelope, reply))

        thread = threading.Thread(target=work, name=f"edge-control-{name}", daemon=True)
        self._running[name] = thread
        thread.start()
        return None

    def _send_finished(self) -> None:
        while True:
            try:
                envelope, reply = self._finished.get_nowait()
            except queue.Empty:
                break
            self.refused += int(not reply.get("ok"))
            self._send(envelope, reply)
        for name in [n for n, t in self._running.items() if not t.is_alive()]:
            del self._running[name]

    def handle(self, raw: bytes, peer: str = "") -> dict[str, Any]:
        """The reply to one request, computed on the calling thread (slow commands included)."""
        request = self.parse(raw, peer)
        return request if "command" not in request else self.call(request)

    def parse(self, raw: bytes, peer: str = "") -> dict[str, Any]:
        """The request with `_peer` set, or an error reply (no `command` key) for a malformed one."""
        try:
            request = parse_request(raw)
        except ValueError as err:
            return {"ok": False, "error": str(err)}
        request["_peer"] = peer  # set here, after parsing: a client cannot claim another origin
        name = request["command"]
        if name not in self.handlers:
            shown = name if len(name) <= 40 else name[:37] + "..."
            return {"ok": False, "error": f"unknown command {shown!r} (expected one of {', '.join(self.handlers)})"}
        return request

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run a parsed request's handler; any failure is a one-line error reply."""
        name = request["command"]
        handler = self.handlers[name]
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
