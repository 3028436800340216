"""`edge-inspector view`: the operator's web page, served by the standard library beside the service.

One process: a feed thread fills the `Hub` from ZeroMQ; `ThreadingHTTPServer` serves the page, its static
assets (shipped in the package: no build step, no CDN), the pictures, a JSON snapshot, and one Server-Sent
Events stream per browser. Each stream is written by its own request thread from a bounded queue with a
socket send timeout and a fixed send buffer, so a stalled browser is cut off after `client_timeout_s` and
never holds up the feed, the service or the other browsers.

Routes: `/` the page, `/static/<file>`, `/events` (SSE), `/api/state` (snapshot), `/api/view` (the view's
own counters), `/image/<camera>/<id>` (the PNG heatmap or JPEG overlay exactly as published),
`/frame/<camera>/<id>` (the judged frame, JPEG, from the service's frame message),
`/api/control/<camera>/status|threshold|reload` (only with `--control`; POST with JSON);
with `--archive DIR`: `/api/archive?state=all|waiting|labelled` (archived parts and their labels),
`/archive/<stem>/frame|heatmap` (an archived part's pictures), POST `/api/labels` (label or undo, with the
operator key exactly as a threshold POST; labelling.py).

Every connection is admitted by `guard.Connections` before it gets a thread, and every request passes
`ViewHandler._door` (Host, Origin) before any route runs; a POST's body is read only after the route, the
operator key and its Content-Length (at most MAX_BODY) were checked. Why: guard.py.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import mimetypes
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from edge_inspector.core.errors import ConfigError
from edge_inspector.tools.view.control import ControlLink
from edge_inspector.tools.view.feed import Feed
from edge_inspector.tools.view.guard import (
    MAX_HEADER_BYTES,
    SECURITY_HEADERS,
    Connections,
    HeaderBudget,
    HostPolicy,
    split_host,
)
from edge_inspector.tools.view.hub import Hub, encode_event
from edge_inspector.tools.view.labelling import ArchiveLabels, LabelError, key_fingerprint

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
SSE_SNDBUF = 64 * 1024  # fixed kernel send buffer per browser (autotuning would let a stalled one hold MBs)
PING_EVERY_S = 2.0  # the page reconnects when it hears nothing for a few of these
MAX_BODY = 4 * 1024  # the largest real body is a reload with a folder path: well under 1 KiB


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` or `[v6]:PORT` -> (host, port); ConfigError naming --listen otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen: expected HOST:PORT such as 127.0.0.1:8080, got {value!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str | None) -> str | None:
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as err:
        raise ConfigError(f"--token-file {path}: cannot read it ({err.strerror})") from None
    if len(token) < 8:
        raise ConfigError(f"--token-file {path}: expected a secret of at least 8 characters on its first line")
    return token.splitlines()[0]


class ViewHTTPServer(ThreadingHTTPServer):
    """Admission (`Connections.admit`) before a connection gets a thread; deadlines reaped every poll."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], hub: Hub, control: ControlLink | None, token: str | None,
                 client_timeout_s: float, sse_sndbuf: int = SSE_SNDBUF, allow_hosts: tuple[str, ...] = (),
                 connections: Connections | None = None):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.hub = hub
        self.control = control
        self.token = token
        self.client_timeout_s = client_timeout_s
        self.sse_sndbuf = sse_sndbuf
        self.stopping = threading.Event()
        self.connections = connections or Connections()
        self.labels: ArchiveLabels | None = None  # set by ViewServer with --archive
        self.labels_refused = 0
        self._refusals_logged = (0.0, 0)  # (when, count then)
        super().__init__(address, ViewHandler)
        self.hosts = HostPolicy(address[0], int(self.server_address[1]), allow_hosts)

    def refused_label(self, peer: str) -> None:
        """Count a label write without the key; one warning a minute at most, with the count since the last:
        anyone who can reach the page could otherwise flood the system log with them."""
        self.labels_refused += 1
        now = time.monotonic()
        when, count = self._refusals_logged
        if now - when >= 60.0:
            self._refusals_logged = (now, self.labels_refused)
            log.warning("label write(s) refused, operator key missing or wrong: %d since the last report "
                        "(latest from %s)", self.labels_refused - count, peer)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.connections.admit(request, str(client_address[0])):
            return True
        try:  # no thread, no read: a short answer the kernel takes at once, then close
            request.send(REFUSED, socket.MSG_DONTWAIT)
        except OSError:
            pass
        return False

    def shutdown_request(self, request: Any) -> None:
        self.connections.release(request)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        self.connections.reap()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client went away mid-answer: one line, not a traceback
            log.info("connection from %s ended: %s", client_address[0], error)
        else:
            log.exception("request from %s failed", client_address[0])


_REFUSED_BODY = '{"ok": false, "error": "too many connections; try again shortly"}'
REFUSED = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
           + "".join(f"{k}: {v}\r\n" for k, v in SECURITY_HEADERS)
           + f"Content-Length: {len(_REFUSED_BODY)}\r\n\r\n{_REFUSED_BODY}").encode()


class Refusal(Exception):
    """A request refused before any of its body was read: status and one line for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ViewHandler(BaseHTTPRequestHandler):
    server: ViewHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "edge-inspector-view"
    rfile: Any  # a HeaderBudget over the socket's reader (see setup)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- the door: every request passes here before any route runs -----------------------------------------

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.connections.header_timeout_s)  # each blocking read and write
        self.rfile = HeaderBudget(self.rfile)

    def handle_one_request(self) -> None:
        self.server.connections.expect(self.connection, "headers")
        self.rfile.reset()
        super().handle_one_request()

    def handle_expect_100(self) -> bool:
        return True  # "100 Continue" only after the checks (see _body): never invite a body before them

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.server.connections.is_cut(self.connection):  # timed out or cut mid-headers: act on nothing
            self.close_connection = True
            return False
        if self.rfile.exceeded:
            self.close_connection = True
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                            f"request line and headers over {MAX_HEADER_BYTES} bytes")
            return False
        self.server.connections.expect(self.connection, "busy")
        return True

    def _door(self) -> None:
        """Host, Origin and fetch-site checks, for every route: raises Refusal."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1:
            raise Refusal(HTTPStatus.BAD_REQUEST, "expected exactly one Host header")
        if not self.server.hosts.host_ok(hosts[0]):
            raise Refusal(HTTPStatus.MISDIRECTED_REQUEST,
                          f"this view answers only to {self.server.hosts.describe()} (Host {hosts[0][:80]!r} "
                          "refused; add names with --allow-host)")
        origin = self.headers.get("Origin")
        if origin is not None and not self.server.hosts.origin_ok(origin):
            raise Refusal(HTTPStatus.FORBIDDEN, f"cross-origin request from {origin[:80]!r} refused")
        site, mode = self.headers.get("Sec-Fetch-Site"), self.headers.get("Sec-Fetch-Mode")
        if site in ("cross-site", "same-site") and mode != "navigate":
            raise Refusal(HTTPStatus.FORBIDDEN, f"{site} request refused (only the view's own page may ask)")
        if self.command != "POST" and (self.headers.get("Content-Length") not in (None, "0")
                                       or self.headers.get("Transfer-Encoding")):
            self.close_connection = True  # an unread body must never be taken for the next request

    def _guarded(self, route: Any) -> None:
        try:
            self._door()
            route()
        except Refusal as refusal:
            self._error(refusal.status, str(refusal))

    # -- plumbing ----------------------------------------------------------------------------------------------

    def end_headers(self) -> None:
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        super().end_headers()

    def _send(self, status: int, body: bytes, content_type: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"ok": False, "error": message}, status)

    def do_HEAD(self) -> None:
        self._guarded(self._get)

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self.close_connection = True  # until its body is read whole, nothing after it on the socket is trusted
        self._guarded(self._post)

    def _get(self) -> None:
        path = urlsplit(self.path).path
        parts = [unquote(p) for p in path.split("/")[1:]]
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if parts[0] == "static" and len(parts) == 2:
            return self._static(parts[1])
        if path == "/events":
            return self._events()
        if path == "/api/state":
            return self._json(self.server.hub.snapshot())
        if path == "/api/view":
            return self._json({**self.server.hub.stats(), "connections": self.server.connections.stats()})
        if parts[0] in ("image", "frame") and len(parts) == 3:
            return self._image(parts[1], parts[2], frame=parts[0] == "frame")
        if parts[:2] == ["api", "control"] and len(parts) == 4 and parts[3] == "status":
            self._allowed_to_control()
            return self._control(parts[2], "status", {})
        if path == "/api/archive" or (parts[0] == "archive" and len(parts) == 3):
            return self._archive(parts)
        self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def _archive(self, parts: list[str]) -> None:
        labels = self._labels()
        try:
            if parts[0] == "archive":
                if parts[2] not in ("frame", "heatmap"):
                    raise LabelError(f"no such picture: {parts[2][:20]!r} (frame or heatmap)", 404)
                data, content_type = labels.file(parts[1], parts[2])
                return self._send(200, data, content_type, cache="private, max-age=3600")
            query = parse_qs(urlsplit(self.path).query)
            self._json(labels.listing(query.get("state", ["all"])[0]))
        except LabelError as err:
            self._error(err.status, str(err))

    def _labels(self) -> ArchiveLabels:
        if self.server.labels is None:
            raise Refusal(HTTPStatus.NOT_FOUND, "no archive: start the view with --archive DIR to label parts")
        return self.server.labels

    def _post_label(self) -> None:
        labels = self._labels()
        if not self._authorised():
            self.server.refused_label(self.address_string())
            raise Refusal(HTTPStatus.UNAUTHORIZED, "operator key missing or wrong")
        if self.headers.get_content_type() != "application/json":
            raise Refusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "expected Content-Type: application/json")
        body = self._body()
        by = {"address": self.address_string(), "key": key_fingerprint(self.server.token)}
        try:
            self._json(labels.apply(body, by))
        except LabelError as err:
            self._error(err.status, str(err))
        except OSError as err:  # the disk refused: the operator must know the label was not kept
            log.error("label from %s not saved: %s", by["address"], err)
            self._error(HTTPStatus.INSUFFICIENT_STORAGE, f"label not saved: {err}")

    def _post(self) -> None:
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
        if parts == ["api", "labels"]:
            return self._post_label()
        if parts[:2] != ["api", "control"] or len(parts) != 4 or parts[3] not in ("threshold", "reload"):
            raise Refusal(HTTPStatus.NOT_FOUND, f"no such action: {self.path[:120]}")
        self._allowed_to_control()
        if self.headers.get_content_type() != "application/json":  # also blocks cross-site form posts
            raise Refusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "expected Content-Type: application/json")
        self._control(parts[2], parts[3], self._body())

    def _allowed_to_control(self) -> None:
        control = self.server.control
        if control is None or not control.enabled:
            raise Refusal(HTTPStatus.FORBIDDEN, "read-only view: start it with --control to change settings")
        if not self._authorised():
            raise Refusal(HTTPStatus.UNAUTHORIZED, "operator key missing or wrong")

    def _body(self) -> dict[str, Any]:
        """The JSON body, read only after every check passed, and only up to MAX_BODY bytes."""
        if self.headers.get("Transfer-Encoding"):
            raise Refusal(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted: send Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise Refusal(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        if len(lengths) != 1 or not lengths[0].strip().isdigit():
            raise Refusal(HTTPStatus.BAD_REQUEST, "expected one Content-Length, a number of bytes")
        length = int(lengths[0])
        if length > MAX_BODY:
            raise Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY} bytes")
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        self.server.connections.expect(self.connection, "body")
        raw = self.rfile.read(length) if length else b""
        if len(raw) != length or self.server.connections.is_cut(self.connection):
            raise Refusal(HTTPStatus.BAD_REQUEST, f"request body shorter than its Content-Length ({length})")
        self.server.connections.expect(self.connection, "busy")
        self.close_connection = False
        try:
            body = json.loads(raw or b"{}")
        except ValueError as err:
            raise Refusal(HTTPStatus.BAD_REQUEST, f"request body is not valid JSON ({err})") from None
        if not isinstance(body, dict):
            raise Refusal(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
        return body

    # -- pages and pictures ------------------------------------------------------------------------------------

    def _static(self, name: str) -> None:
        path = (STATIC / name).resolve()
        if path.parent != STATIC or not path.is_file():
            return self._error(HTTPStatus.NOT_FOUND, f"no such file: {name}")
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        self._send(200, path.read_bytes(), content_type, cache="no-cache")

    def _image(self, camera_id: str, item_id: str, frame: bool = False) -> None:
        item = self.server.hub.image(camera_id, int(item_id)) if item_id.isdigit() else None
        data, content_type = (item.frame, "image/jpeg") if frame and item else (
            (item.image, item.content_type) if item else (b"", ""))
        if not data or not content_type:
            what = "frame" if frame else "picture"
            return self._error(HTTPStatus.NOT_FOUND, f"no {what} {item_id} for camera {camera_id!r} (too old?)")
        # Ids are never reused (they start at the clock), so a picture can be cached for good.
        self._send(200, data, content_type, cache="private, max-age=86400, immutable")

    # -- live stream -------------------------------------------------------------------------------------------

    def _events(self) -> None:
        hub = self.server.hub
        attached = hub.attach(self.address_string())
        if attached is None:
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE,
                               f"too many browsers (max {hub.max_clients}, each from a different address)")
        client, snapshot = attached
        self.close_connection = True
        self.server.connections.expect(self.connection, "stream")
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.server.sse_sndbuf)
            self.connection.settimeout(self.server.client_timeout_s)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            self.wfile.write(b"retry: 2000\n\n" + snapshot)
            while not client.closed and not self.server.stopping.is_set():
                events, resync = client.take(PING_EVERY_S)
                if resync:
                    events = [hub.resync(client)] + client.take(0)[0]
                if not events:
                    events = [encode_event("ping", hub.link)]
                self.wfile.write(b"".join(events))
                client.sent += len(events)
            if client.replaced:
                log.info("browser %s: stream closed for a newer one from the same client", client.peer)
        except (TimeoutError, OSError) as err:  # browser gone, or stalled past client_timeout_s
            log.info("browser %s detached (%s); %d event(s) dropped for it", client.peer, err or "closed",
                     client.dropped)
        finally:
            hub.detach(client)

    # -- control -----------------------------------------------------------------------------------------------

    def _authorised(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())

    def _control(self, camera_id: str, action: str, body: dict[str, Any]) -> None:
        control = self.server.control
        assert control is not None  # _allowed_to_control ran
        if action == "status":
            reply = control.status(camera_id)
        elif action == "threshold":
            reply = control.set_threshold(camera_id, body.get("value"))
        else:
            reply = control.reload(camera_id, body.get("bundle"))
        if action != "status":
            log.info("%s from %s for camera %s: %s -> %s", action, self.address_string(), camera_id,
                     json.dumps(body), json.dumps(reply)[:300])
        self._json(reply, reply_status(reply))


def reply_status(reply: dict[str, Any]) -> int:
    """200 for ok; 502 when the service did not answer; 400 when it answered with a refusal."""
    if reply.get("ok"):
        return HTTPStatus.OK
    error = str(reply.get("error"))
    return HTTPStatus.BAD_GATEWAY if "no reply" in error or "no control endpoint" in error else HTTPStatus.BAD_REQUEST


class ViewServer:
    """Feed + hub + HTTP server, started and stopped together."""

    def __init__(self, connect: list[str], control: list[str] | None = None, listen: str = "127.0.0.1:8080",
                 token: str | None = None, keep_fails: int = 24, keep_scores: int = 500,
                 client_buffer: int = 64, max_clients: int = 16, client_timeout_s: float = 20.0,
                 silent_after_s: float = 12.0, sse_sndbuf: int = SSE_SNDBUF, keys: Any | None = None,
                 allow_hosts: tuple[str, ...] | list[str] = (), max_connections: int = 64,
                 max_connections_per_client: int = 16, max_streams_per_client: int = 4,
                 header_timeout_s: float = 10.0, body_timeout_s: float = 10.0, archive: Path | None = None,
                 defect_types: tuple[str, ...] = ()):
        """`max_connections*` and the timeouts: see guard.Connections; `max_streams_per_client`: Hub.attach;
        `archive`: the service's archive folder, to label its parts (labelling.py)."""
        if not connect:
            raise ConfigError("--connect: at least one result endpoint is needed, e.g. tcp://127.0.0.1:5556")
        host, port = parse_listen(listen)
        if control and token is None and not is_loopback(host):
            raise ConfigError(f"--listen {listen}: a view with --control on a non-loopback address needs "
                              "--token-file (anyone on the network could change the threshold)")
        if archive is not None and token is None and not is_loopback(host):
            raise ConfigError(f"--listen {listen}: a view with --archive on a non-loopback address needs "
                              "--token-file (anyone on the network could write labels)")
        try:
            labels = ArchiveLabels(Path(archive), tuple(defect_types)) if archive is not None else None
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.control = ControlLink(control or [], keys=keys)
        self.hub = Hub(keep_fails=keep_fails, keep_scores=keep_scores, client_buffer=client_buffer,
                       max_clients=max_clients, max_per_client=max_streams_per_client,
                       control_info={"enabled": self.control.enabled, "auth": "token" if token else "none"})
        for entry in allow_hosts:
            if split_host(entry) is None:
                raise ConfigError(f"--allow-host {entry!r}: expected NAME or NAME:PORT, e.g. panel-line1.lan:8080")
        connections = Connections(max_connections, max_connections_per_client, header_timeout_s, body_timeout_s)
        self.feed = Feed(connect, self.hub, silent_after_s=silent_after_s, keys=keys)
        try:
            self.http = ViewHTTPServer((host, port), self.hub, self.control, token, client_timeout_s, sse_sndbuf,
                                       tuple(allow_hosts), connections)
        except OSError as err:
            self.feed.stop()
            self.feed._close()
            raise ConfigError(f"--listen {listen}: cannot listen there ({err.strerror})") from None
        self.http.labels = labels
        self.thread = threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="view-http", daemon=True)

    @property
    def url(self) -> str:
        address, port = self.http.server_address[:2]
        host = address.decode() if isinstance(address, bytes) else str(address)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    def start(self) -> None:
        self.feed.start()
        self.thread.start()
        if self.control.enabled:  # learn camera -> control endpoint early; retried on first use if absent
            threading.Thread(target=self.control.discover, name="view-control-discover", daemon=True).start()

    def alive(self) -> bool:
        return self.feed.thread.is_alive() and self.thread.is_alive()

    def stop(self) -> None:
        self.http.stopping.set()
        self.hub.close_all()
        self.http.shutdown()
        self.http.server_close()
        self.feed.stop()
