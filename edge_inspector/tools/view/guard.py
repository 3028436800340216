"""The view's door: which Host and Origin it answers, how many connections it holds, and for how long.

Why each piece (attacks of issue 29, each reproduced on the view before these checks existed):

* `HostPolicy`: a web page on another site can point its own DNS name at the view's address (DNS
  rebinding); the browser then treats the view as that site and lets the page read the config and post a
  threshold (it moved 20 -> 23). The attacker controls the *name*, never the address, so the view answers
  only Host values that are its own: the bound address (any IP literal when bound to a wildcard address),
  `localhost` on loopback, this machine's host name on a network bind, and names given with
  `--allow-host`. Every other Host gets 421 before anything is read or done.
* `Connections`: 400 half-sent requests held 410 threads and 418 file descriptors with no timeout, and
  16 held `/events` streams locked every other browser out. Each connection now has a deadline while its
  request line, headers or body are being read (`header_timeout_s`, `body_timeout_s`), at most
  `max_total` connections are held and at most `max_per_client` from one address; when a limit is
  reached the oldest connection that has not yet sent a whole request is cut to make room (a real browser
  sends its headers in milliseconds; a slowloris client never does), and only when none is idle is the
  newcomer refused.
* `HeaderBudget`: the standard library reads up to 100 header lines of 64 KiB each (6.4 MB per
  connection); the budget stops a request's line and headers at `MAX_HEADER_BYTES`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024  # request line + headers; a browser's are under 2 KiB
LOG_EVERY_S = 10.0

# On every response, errors included. The page loads only its own script and style sheet, pictures from its
# own routes (decoded into canvases), and opens only its own event stream: nothing else may run or load.
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)


def split_host(value: str) -> tuple[str, int | None] | None:
    """`name`, `name:port`, `1.2.3.4:port`, `[v6]:port` -> (lower-case host, port or None); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else ""
    elif value.count(":") > 1:  # a bare IPv6 literal is not a valid Host
        return None
    else:
        host, _, port_text = value.partition(":")
    if not host or (port_text and (not port_text.isdigit() or int(port_text) > 65535)):
        return None
    if any(c in host for c in "/\\@ \t?#"):
        return None
    return host, int(port_text) if port_text else None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class HostPolicy:
    """The Host (and Origin) values this view answers to; see the module docstring for why."""

    def __init__(self, bound_host: str, port: int, allow: list[str] | tuple[str, ...] = ()):
        self.port = port
        host = bound_host.strip("[]").lower()
        self.any_ip = host in ("", "0.0.0.0", "::")
        self.names: set[str] = {"localhost"} if self.any_ip or self._loopback(host) else set()
        if host and not self.any_ip:
            self.names.add(host)
        if not self._loopback(host):  # on a network, the panel may use the machine's own name
            name = socket.gethostname().lower()
            self.names.update({name, f"{name}.local"})
        self.extra: dict[str, int | None] = {}  # --allow-host NAME (any port) or NAME:PORT
        for entry in allow:
            parsed = split_host(entry)
            if parsed is None:
                raise ValueError(f"--allow-host {entry!r}: expected NAME or NAME:PORT")
            self.extra[parsed[0]] = parsed[1]

    @staticmethod
    def _loopback(host: str) -> bool:
        try:
            return host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def host_ok(self, value: str | None) -> bool:
        parsed = split_host(value) if value else None
        if parsed is None:
            return False
        host, port = parsed
        if host in self.extra:
            wanted = self.extra[host]
            return wanted is None or (port or 80) == wanted
        if (port or 80) != self.port:
            return False
        return host in self.names or (self.any_ip and is_ip_literal(host))

    def origin_ok(self, origin: str) -> bool:
        """An `Origin` header: http(s)://HOST[:PORT] with a HOST this view answers to; `null` never."""
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query:
            return False
        netloc = parts.netloc
        if parts.scheme == "https" and parts.port is None:
            netloc += ":443"
        return self.host_ok(netloc)

    def describe(self) -> str:
        names = sorted(self.names) + (["any IP address"] if self.any_ip else [])
        listed = [f"{n}:{self.port}" for n in names] + [n if p is None else f"{n}:{p}" for n, p in self.extra.items()]
        return ", ".join(listed)


class HeaderBudget:
    """Stands in for a handler's `rfile` while the request line and headers are read (at most `limit`
    bytes); the body is read from `raw`, counted against Content-Length instead."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.left = MAX_HEADER_BYTES
        self.exceeded = False

    def reset(self, limit: int = MAX_HEADER_BYTES) -> None:
        self.left = limit
        self.exceeded = False

    def readline(self, size: int = -1) -> bytes:
        if self.left <= 0:
            self.exceeded = True
            return b""
        want = self.left if size is None or size < 0 else min(size, self.left)
        line = self.raw.readline(want)
        self.left -= len(line)
        if len(line) == want and not line.endswith(b"\n"):
            self.exceeded = True
        return line

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)

    def close(self) -> None:
        self.raw.close()


@dataclass
class Connection:
    sock: socket.socket
    peer: str
    opened: float
    phase: str = "headers"  # headers | body (evictable, with a deadline) | busy | stream
    deadline: float | None = None
    cut: bool = False  # shut down by the table (timeout or eviction): whatever it sent is not acted on

    @property
    def idle(self) -> bool:
        return self.phase in ("headers", "body")


class Connections:
    """Every open HTTP connection, its phase and deadline. `admit` runs on the accept thread, `reap` on the
    serve loop (every poll interval), `expect` on the connection's own thread."""

    def __init__(self, max_total: int = 64, max_per_client: int = 16, header_timeout_s: float = 10.0,
                 body_timeout_s: float = 10.0):
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.lock = threading.Lock()
        self.open: dict[socket.socket, Connection] = {}
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0
        self._logged = (0.0, 0, 0, 0)  # (when, refused, evicted, timed_out) at the last summary line

    def _summary(self, now: float, peer: str) -> None:
        """One warning per LOG_EVERY_S at most, with the counts since the last one: an attacker opening
        thousands of connections must not flood the journal as well. Called with the lock held."""
        when, refused, evicted, timed_out = self._logged
        if now - when < LOG_EVERY_S:
            return
        self._logged = (now, self.refused, self.evicted, self.timed_out)
        log.warning("HTTP connections: %d open (max %d, %d per client); since the last report %d refused, "
                    "%d idle ones cut for newcomers, %d timed out (latest from %s)", len(self.open),
                    self.max_total, self.max_per_client, self.refused - refused, self.evicted - evicted,
                    self.timed_out - timed_out, peer)

    def admit(self, sock: socket.socket, peer: str) -> bool:
        now = time.monotonic()
        with self.lock:
            same = [c for c in self.open.values() if c.peer == peer]
            crowd = same if len(same) >= self.max_per_client else (
                list(self.open.values()) if len(self.open) >= self.max_total else None)
            if crowd is not None:
                idle = [c for c in crowd if c.idle]
                if not idle:
                    self.refused += 1
                    self._summary(now, peer)
                    return False
                victim = min(idle, key=lambda c: c.opened)
                self._cut(victim)
                self.evicted += 1
                self._summary(now, peer)
            self.open[sock] = Connection(sock, peer, now, deadline=now + self.header_timeout_s)
            return True

    def expect(self, sock: socket.socket, phase: str) -> Connection | None:
        """The connection enters `phase`; headers/body get a fresh deadline, busy/stream none."""
        timeout = {"headers": self.header_timeout_s, "body": self.body_timeout_s}.get(phase)
        with self.lock:
            entry = self.open.get(sock)
            if entry is not None and not entry.cut:
                entry.phase = phase
                entry.deadline = None if timeout is None else time.monotonic() + timeout
            return entry

    def is_cut(self, sock: socket.socket) -> bool:
        with self.lock:
            entry = self.open.get(sock)
            return entry is None or entry.cut

    def release(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.pop(sock, None)

    def reap(self) -> None:
        now = time.monotonic()
        with self.lock:
            late = [c for c in self.open.values() if c.deadline is not None and c.deadline < now and not c.cut]
            for entry in late:
                self._cut(entry)
                self.timed_out += 1
                log.debug("timed out a connection from %s (%s not complete)", entry.peer, entry.phase)
            if late:
                self._summary(now, late[-1].peer)

    def _cut(self, entry: Connection) -> None:
        """Wakes the connection's thread (its read returns end-of-file) and forgets the connection; the
        thread may still answer (400 for a body cut short) and then closes the socket. With the lock held."""
        entry.cut = True
        self.open.pop(entry.sock, None)
        try:
            entry.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def stats(self) -> dict[str, Any]:
        with self.lock:
            phases: dict[str, int] = {}
            for entry in self.open.values():
                phases[entry.phase] = phases.get(entry.phase, 0) + 1
            return {"open": len(self.open), "phases": phases, "max": self.max_total,
                    "max_per_client": self.max_per_client, "refused": self.refused, "evicted": self.evicted,
                    "timed_out": self.timed_out}
