"""One small interface for every output beside ZeroMQ, and the thread and bounded queue each one runs behind.

Why a queue and a thread per output: the publish thread sends ZeroMQ results on the line's clock; a broker
across the plant network may stall for seconds (TCP retransmits, a broker restart, a full session queue),
and an OPC UA client may hold the server's lock. Handing an output a message is an append to a bounded
deque, so no output can slow the ZeroMQ results or another output. When an output falls behind, the
*oldest* waiting message is dropped (a PLC wants the newest verdict) and counted in health, and the first
drop of a streak is logged.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)


@dataclass
class Totals:
    """Counts of results handed to the fan-out, taken before any output queue: exact even when an output
    drops messages (the OPC UA PartsTotal/FailsTotal)."""

    results: int = 0
    fails: int = 0


@dataclass
class Message:
    kind: Literal["result", "health"]
    payload: dict[str, Any]  # the ZeroMQ result header or health payload, the same JSON-ready dict
    totals: Totals = field(default_factory=Totals)


class Output(Protocol):
    """An output module. `open` runs at start (a bad endpoint or key fails the start, as ZeroMQ's bind does);
    `send` runs on the output's own thread, one message at a time, and may block or raise; `close` after
    the last message."""

    name: str

    def open(self) -> None: ...

    def send(self, message: Message) -> None: ...

    def ready(self) -> bool:
        """False while the output cannot deliver (broker away): messages wait in the queue meanwhile."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """The output's own state for health (connected, endpoint, ...)."""
        ...

    def close(self) -> None: ...


class QueuedOutput:
    """Runs one Output on its own thread behind a bounded drop-oldest queue; counts sent, dropped, failed."""

    def __init__(self, output: Output, queue_size: int):
        self.output = output
        self.queue: collections.deque[Message] = collections.deque()
        self.queue_size = queue_size
        self.sent = 0
        self.dropped = 0
        self.errors = 0
        self.last_error = ""
        self._dropping = False
        self._wake = threading.Condition()
        self._closing = False
        self.thread = threading.Thread(target=self._run, name=f"edge-output-{output.name}", daemon=True)

    @property
    def name(self) -> str:
        return self.output.name

    def start(self) -> None:
        self.output.open()
        self.thread.start()

    def submit(self, message: Message) -> None:
        """Called from the publish thread: never blocks beyond a lock held for an append."""
        with self._wake:
            if len(self.queue) >= self.queue_size:
                self.queue.popleft()
                self.dropped += 1
                if not self._dropping:
                    log.warning("output %s is behind (%s): dropping the oldest of %d waiting messages (%d dropped "
                                "so far; counted in health outputs.%s.dropped)", self.name,
                                "ready" if self.output.ready() else "not connected", self.queue_size, self.dropped,
                                self.name)
                self._dropping = True
            self.queue.append(message)
            self._wake.notify()

    def _next(self) -> Message | None:
        with self._wake:
            while not self.queue or not self.output.ready():
                if self._closing:
                    return None
                self._wake.wait(0.1)
            return self.queue.popleft()

    def _run(self) -> None:
        while True:
            message = self._next()
            if message is None:
                return
            try:
                self.output.send(message)
                self.sent += 1
                self._dropping = False
            except Exception as err:  # an output's failure is counted and logged, never the line's problem
                self.errors += 1
                text = f"{type(err).__name__}: {err}".splitlines()[0]
                if text != self.last_error or self.errors % 100 == 1:
                    log.warning("output %s: could not send a %s message: %s (%d failed so far)", self.name,
                                message.kind, text, self.errors)
                self.last_error = text

    def snapshot(self) -> dict[str, Any]:
        state = {"queued": len(self.queue), "queue_size": self.queue_size, "sent": self.sent,
                 "dropped": self.dropped, "errors": self.errors, "last_error": self.last_error}
        try:
            state.update(self.output.snapshot())
        except Exception as err:  # health must be built even when an output's state cannot be read
            state["state_error"] = str(err)
        return state

    def close(self, drain_s: float = 2.0) -> None:
        """Deliver what is queued if the output can within drain_s, then close it; what is left is counted."""
        deadline = time.monotonic() + drain_s
        while self.queue and self.output.ready() and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.02)
        with self._wake:
            self._closing = True
            left = len(self.queue)
            self.queue.clear()
            self._wake.notify()
        if left:
            self.dropped += left
            log.warning("output %s: %d message(s) not delivered at stop (counted as dropped)", self.name, left)
        if self.thread.ident is not None:  # not started when its open() failed
            self.thread.join(drain_s)
        try:
            self.output.close()
        except Exception:
            log.exception("output %s: error while closing", self.name)
