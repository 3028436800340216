"""Progress for long CLI work: a tqdm bar on a terminal, plain lines everywhere else.

Under systemd (journald), in CI logs or piped into `tee`, a tqdm bar writes one carriage-return line per
update, which buries the log; switched off instead (tqdm's `disable=None`), a piped `fit` printed nothing for
minutes (a patchcore fit on magnetic_tile: about 2 min on 2 cores) and looked hung. So off a terminal each
loop that runs longer than `LINE_EVERY_S` prints `desc: 40/209 img (19%), 12 s, about 50 s left` at most once
per `LINE_EVERY_S`, and a last line when it ends; loops shorter than that print nothing. Every loop in the
project goes through here so none forgets it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")

LINE_EVERY_S = 10.0


def progress(iterable: Iterable[T] | None = None, line_every_s: float | None = None, **kwargs: Any) -> tqdm[T]:
    """A tqdm bar on stderr when stderr is a terminal, else a `PlainProgress` that prints plain lines."""
    kwargs.setdefault("file", sys.stderr)
    if not is_interactive():
        return PlainProgress(iterable, LINE_EVERY_S if line_every_s is None else line_every_s, **kwargs)
    kwargs.setdefault("disable", None)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


class PlainProgress(tqdm):
    """A disabled tqdm (so callers' set_postfix/update/close keep working) that prints throttled plain lines."""

    def __init__(self, iterable: Iterable[Any] | None, line_every_s: float, **kwargs: Any):
        self.line_every_s = line_every_s
        self.out = kwargs.pop("file", sys.stderr)
        self.label = kwargs.get("desc") or "working"
        self.unit_name = kwargs.get("unit", "it")
        self.started = time.monotonic()
        self.last_line = self.started
        self.printed = False
        self.steps = int(kwargs.get("initial", 0) or 0)
        total = kwargs.get("total")
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.expected: int | None = None if total is None else int(total)
        for key in ("disable", "dynamic_ncols", "mininterval", "leave"):
            kwargs.pop(key, None)
        super().__init__(iterable, disable=True, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.step(1)
        self.finish()

    def update(self, n: float | None = 1) -> bool | None:
        self.step(int(n or 0))
        return None

    def step(self, count: int) -> None:
        self.steps += count
        now = time.monotonic()
        if now - self.last_line >= self.line_every_s and self.steps != self.expected:  # the end has its own line
            self.emit(self.status(now))
            self.last_line = now

    def status(self, now: float) -> str:
        elapsed = now - self.started
        if not self.expected:
            return f"{self.label}: {self.steps} {self.unit_name}, {elapsed:.0f} s"
        line = (f"{self.label}: {self.steps}/{self.expected} {self.unit_name} "
                f"({100 * self.steps / self.expected:.0f}%), {elapsed:.0f} s")
        if 0 < self.steps < self.expected:
            line += f", about {elapsed / self.steps * (self.expected - self.steps):.0f} s left"
        return line

    def finish(self) -> None:
        """One closing line, only for a loop that already printed (short loops stay silent)."""
        if self.printed:
            self.emit(f"{self.label}: done, {self.steps} {self.unit_name} in {time.monotonic() - self.started:.0f} s")
            self.printed = False

    def emit(self, line: str) -> None:
        print(line, file=self.out, flush=True)
        self.printed = True

    def close(self) -> None:
        self.finish()
        super().close()


def is_interactive() -> bool:
    """True when progress bars are shown; when they are not, loops print plain lines instead."""
    return sys.stderr.isatty()
