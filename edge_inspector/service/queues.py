"""Bounded queues between the pipeline's threads: a line runs for months, so nothing may grow without limit.

Live cameras drop the *oldest* waiting frame when inference falls behind (the freshest frame wins: a
verdict on a part that left the camera a second ago is worth less than one on the part under it now);
replayed media make the producer wait instead, so no frame is lost. Every drop is counted by the caller.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any


class QueueClosed(Exception):
    """The producer has finished and everything queued has been taken."""


class FrameQueue:
    """Bounded FIFO that either drops its oldest item (live) or makes the producer wait (lossless)."""

    def __init__(self, maxsize: int, drop_oldest: bool):
        self.items: collections.deque = collections.deque()
        self.maxsize = maxsize
        self.drop_oldest = drop_oldest
        self.closed = False
        self.cond = threading.Condition()

    def put(self, item: Any, stop: threading.Event | None = None, beat: Callable[[], None] | None = None) -> int:
        """Queue item; return how many items were dropped to make room (0 or 1)."""
        with self.cond:
            if self.closed:
                return 1  # the consumer was cut loose at shutdown; counted like any other drop
            dropped = 0
            while len(self.items) >= self.maxsize:
                if self.drop_oldest:
                    self.items.popleft()
                    dropped += 1
                    continue
                if stop is not None and stop.is_set():
                    break  # stopping: let this last frame in over the bound rather than lose it
                self.cond.wait(0.2)
                if beat:
                    beat()
            self.items.append(item)
            self.cond.notify_all()
            return dropped

    def get(self, timeout: float) -> Any | None:
        """Next item, None on timeout; QueueClosed once closed and empty."""
        with self.cond:
            if not self.items and not self.closed:
                self.cond.wait(timeout)
            if self.items:
                item = self.items.popleft()
                self.cond.notify_all()
                return item
            if self.closed:
                raise QueueClosed
            return None

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def __len__(self) -> int:
        return len(self.items)
