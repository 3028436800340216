"""sd_notify spoken directly over $NOTIFY_SOCKET (a unix datagram socket), so no libsystemd binding is needed.

The protocol is one datagram of newline-separated `KEY=VALUE` lines per notification. An address starting
with `@` is in the abstract namespace (leading NUL byte). `WATCHDOG_USEC` (and optionally `WATCHDOG_PID`)
tell the service how often systemd expects `WATCHDOG=1`; we ping at half that period, and only while
every pipeline stage is alive and responsive, so a deadlocked stage gets the service restarted.
Outside systemd (no NOTIFY_SOCKET) every call is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
import socket

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

    @property
    def ping_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1 (half the configured period), or None when no watchdog is set."""
        return self.watchdog_s / 2.0 if self.watchdog_s else None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


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
