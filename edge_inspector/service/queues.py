"""Bounded queues between the pipeline's threads: a line runs for months, so nothing may grow without limit.

Several inference workers take frames from one FrameQueue and hand results to one `InOrder`, which gives them
to the publisher in the order the frames were taken: a PLC sees sequence numbers rise one by one, whichever
worker finished first.

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
        self.taken = 0  # items handed out so far: the next one's ticket (see take)
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
        taken = self.take(timeout)
        return None if taken is None else taken[1]

    def take(self, timeout: float) -> tuple[int, Any] | None:
        """(ticket, next item): tickets count 0, 1, 2, ... in the order items leave, with no gaps, so
        consumers on several threads can put their results back in that order (InOrder). None on timeout;
        QueueClosed once closed and empty."""
        with self.cond:
            if not self.items and not self.closed:
                self.cond.wait(timeout)
            if self.items:
                item = self.items.popleft()
                ticket = self.taken
                self.taken += 1
                self.cond.notify_all()
                return ticket, item
            if self.closed:
                raise QueueClosed
            return None

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def __len__(self) -> int:
        return len(self.items)


class InOrder:
    """Items put by ticket (0, 1, 2, ... from FrameQueue.take), given out strictly in ticket order.

    Bounded without dropping: a producer whose ticket is `maxsize` or more ahead of the next one out waits
    (the publisher is behind). `close()` is called once by each producer as it finishes; when the last has,
    what is left goes out in ticket order, skipping any ticket that never came (a producer that died: the
    watchdog reports it), then QueueClosed.
    """

    def __init__(self, maxsize: int, producers: int = 1):
        self.items: dict[int, Any] = {}
        self.maxsize = maxsize
        self.next = 0
        self.open_producers = producers
        self.cond = threading.Condition()

    def put(self, ticket: int, item: Any, beat: Callable[[], None] | None = None) -> None:
        with self.cond:
            while ticket - self.next >= self.maxsize:
                self.cond.wait(0.2)
                if beat:
                    beat()
            self.items[ticket] = item
            self.cond.notify_all()

    def get(self, timeout: float) -> Any | None:
        """The item with the next ticket, None on timeout; QueueClosed once every producer closed and all
        items are out."""
        with self.cond:
            if self.next not in self.items and self.open_producers > 0:
                self.cond.wait(timeout)
            if self.next not in self.items and self.open_producers == 0 and self.items:
                self.next = min(self.items)  # a ticket that never came: skip it rather than wait forever
            if self.next in self.items:
                item = self.items.pop(self.next)
                self.next += 1
                self.cond.notify_all()
                return item
            if self.open_producers == 0:
                raise QueueClosed
            return None

    def close(self) -> None:
        """One producer has finished."""
        with self.cond:
            self.open_producers = max(0, self.open_producers - 1)
            self.cond.notify_all()
