"""Progress bars for long CLI work that switch themselves off when the output is not a terminal.

Under systemd (journald) or in CI logs a tqdm bar writes one carriage-return line per update, which buries
the log. `disable=None` is tqdm's own "only on a TTY" switch; every bar in the project goes through here so
none forgets it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm[T]:
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    kwargs.setdefault("disable", None)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def is_interactive() -> bool:
    """True when progress bars are shown; when they are not, long loops log one line per step instead."""
    return sys.stderr.isatty()
