"""sd_notify spoken directly over $NOTIFY_SOCKET (a unix datagram socket), so no libsystemd binding is needed.

The protocol is one datagram of newline-separated `KEY=VALUE` lines per notification. An address starting
with `@` is in the abstract namespace (leading NUL byte). `WATCHDOG_USEC` (and optionally `WATCHDOG_PID`)
tell the service how often systemd expects `WATCHDOG=1`; we ping at half that period, and only while
every pipeline stage is alive and responsive, so a deadlocked stage gets the service restarted.
Outside systemd (no NOTIFY_SOCKET) every call is a cheap no-op.

A start that takes longer than the unit's start timeout (90 s by default; building a TensorRT engine on a
Jetson takes minutes) is kept alive with `EXTEND_TIMEOUT_USEC` (`extending_start`), bounded so that a start
that hangs for good is still killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + address[1:]) if address.startswith("@") else address
        self.watchdog_s = _watchdog_seconds(env)
        # Created up front: the capture thread (camera events) and the main thread both send STATUS=.
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) if self.address else None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str | int) -> bool:
        """Send e.g. notify(READY=1, STATUS="...") ; True when a datagram was sent."""
        if self._socket is None:
            return False
        lines = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            self._socket.sendto(lines.encode(), self.address)
            return True
        except OSError as err:
            if not self._warned:  # log once: a missing notify socket must not flood the journal
                log.warning("sd_notify to %r failed: %s", self.address, err)
                self._warned = True
            return False

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float, status: str | None = None) -> bool:
        """Ask systemd for `seconds` more before the start (or stop) times out."""
        fields: dict[str, str | int] = {"EXTEND_TIMEOUT_USEC": int(seconds * 1e6)}
        if status:
            fields["STATUS"] = status
        return self.notify(**fields)

    @property
    def ping_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1 (half the configured period), or None when no watchdog is set."""
        return self.watchdog_s / 2.0 if self.watchdog_s else None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


EXTEND_STEP_S = 30.0  # each notification buys this much; re-sent every third of it
EXTEND_LIMIT_S = 1800.0  # a start still busy after 30 min is considered hung: systemd may then time it out


@contextlib.contextmanager
def extending_start(notifier: Notifier, what: str, step_s: float = EXTEND_STEP_S,
                    limit_s: float = EXTEND_LIMIT_S) -> Iterator[None]:
    """Keep systemd's start timeout from expiring while the body runs (sends EXTEND_TIMEOUT_USEC).

    A thread re-sends the extension every step_s/3 with a STATUS line saying what is going on and for how
    long, so `systemctl status` shows "building TensorRT engine (140 s)" instead of a unit stuck in
    activating. After limit_s it stops extending and logs why.
    """
    if not notifier.enabled:
        yield
        return
    done = threading.Event()
    started = time.monotonic()

    def keep_extending() -> None:
        while not done.is_set():
            elapsed = time.monotonic() - started
            if elapsed >= limit_s:
                log.error("%s still running after %.0f s: no longer extending the start timeout", what, elapsed)
                return
            notifier.extend_timeout(step_s, f"starting: {what} ({elapsed:.0f} s)")
            done.wait(step_s / 3.0)

    thread = threading.Thread(target=keep_extending, name="edge-start-timeout", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(2.0)


def _one_line(value: str | int) -> str:
    return str(value).replace("\n", " ")


def _watchdog_seconds(env) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # the watchdog is meant for another process (e.g. our parent shell)
    return int(usec) / 1e6
