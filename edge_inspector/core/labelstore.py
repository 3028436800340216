"""The operators' labels of archived parts: an append-only journal, `labels.jsonl`, beside the archive.

Why a journal and not a file rewritten atomically: a label is a few hundred bytes, and an archive is labelled
one part at a time for years; rewriting a growing file per click would cost more with every label and keep
only the latest state, where the process engineer wants every change traceable (who, when, and what was
undone). Each record is one JSON line written by a single `write` on an `O_APPEND` descriptor, then
`fsync`ed before the writer says "saved": a crash or power cut can only leave the last line torn (no
newline, or half a JSON object), and a reader ignores a torn last line. So the file is never lost, and the
only label that can be lost is the one being written, which was never acknowledged.

Records (docs/labelling.md describes every field):

- `{"op": "label", "id", "stem", "label": "good"|"defect", "defect_type", "box": [x, y, w, h] | null,
  "by", "time", "time_iso"}`: the part archived as `<stem>.*` is good or defective.
- `{"op": "undo", "id", "stem", "undoes": <label id>, "by", "time", "time_iso"}`: that label is withdrawn
  (the stem's previous label, if any, holds again). An undo is a new record; no line is ever edited.
- `{"op": "exported", "id", "labels": [label ids], "to", "by", "time", "time_iso"}`: written by
  `edge-inspector labels export`; the archive may evict those parts again (until then it keeps them).

The service (archive eviction), the view (writes) and the export tool (reads, then marks) all use this
module; core imports nothing else of edge_inspector, so all three may.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_inspector.core.atomic import fsync_dir

log = logging.getLogger(__name__)

LABELS_FILE = "labels.jsonl"
LABELS = ("good", "defect")
MAX_RECORD_BYTES = 64 * 1024  # a label is ~300 bytes; an export record lists ids (~15 bytes each)
# Archive stems are `<time>Z_<camera>_<sequence>_<verdict>`; nothing else may name a file to read or label.
STEM = re.compile(r"^[0-9]{8}T[0-9]{6}\.[0-9]{3}Z_[A-Za-z0-9._-]{1,64}_[0-9]{8}_[a-z]{1,16}$")
DEFECT_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")


def now_fields() -> dict[str, Any]:
    stamp = time.time()
    iso = _dt.datetime.fromtimestamp(stamp, _dt.timezone.utc).isoformat(timespec="milliseconds")
    return {"time": round(stamp, 3), "time_iso": iso.replace("+00:00", "Z")}


def new_id() -> str:
    """Unique without coordination between the view and the export tool (two processes may write)."""
    return f"{time.time_ns():x}-{secrets.token_hex(3)}"


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record durably (returns only once it is on disk). OSError when the disk refuses.

    A torn last line left by a crash is closed with a newline first, so this record never merges with it.
    """
    line = json.dumps(record, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    if len(line) > MAX_RECORD_BYTES:
        raise ValueError(f"label record of {len(line)} bytes (max {MAX_RECORD_BYTES})")
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as reader:
                reader.seek(size - 1)
                if reader.read(1) != b"\n":
                    line = b"\n" + line
        written = os.write(fd, line)
        if written != len(line):  # a full disk mid-write: the line is torn, and readers ignore it
            raise OSError(28, f"{path}: wrote {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(records, lines skipped). A missing file is no records; an unreadable or torn line is skipped:
    the last one silently-ish (a write cut short), any other with a warning naming its line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    lines = data.split(b"\n")
    records: list[dict[str, Any]] = []
    skipped = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        last = number == len(lines)  # no newline after it: written when the power went
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or "op" not in record:
                raise ValueError("not a label record")
        except ValueError as err:
            skipped += 1
            if last:
                log.info("%s: ignoring the torn last line %d (a write cut short)", path, number)
            else:
                log.warning("%s:%d: skipped, not a label record (%s)", path, number, err)
            continue
        records.append(record)
    return records, skipped


@dataclass
class LabelState:
    """The journal folded: each stem's label history (undone ones removed) and what was exported."""

    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    exported: set[str] = field(default_factory=set)  # label ids
    records: int = 0
    skipped: int = 0

    def current(self, stem: str) -> dict[str, Any] | None:
        stack = self.history.get(stem)
        return stack[-1] if stack else None

    def labelled(self) -> dict[str, dict[str, Any]]:
        return {stem: stack[-1] for stem, stack in self.history.items() if stack}

    def protected(self) -> set[str]:
        """Stems whose current label was not exported yet: the archive keeps them."""
        return {stem for stem, label in self.labelled().items() if label["id"] not in self.exported}


def fold(records: Iterable[dict[str, Any]]) -> LabelState:
    state = LabelState()
    for record in records:
        state.records += 1
        op = record.get("op")
        stem = record.get("stem")
        if op == "label" and isinstance(stem, str):
            state.history.setdefault(stem, []).append(record)
        elif op == "undo" and isinstance(stem, str):
            stack = state.history.get(stem, [])
            state.history[stem] = [r for r in stack if r.get("id") != record.get("undoes")]
        elif op == "exported":
            state.exported.update(str(i) for i in record.get("labels", []))
    return state


def load(folder: Path) -> LabelState:
    records, skipped = read_records(Path(folder) / LABELS_FILE)
    state = fold(records)
    state.skipped = skipped
    return state


class LabelBook:
    """The journal of one archive folder, read again only when the file changed (another process, e.g.
    the export tool, appends too); appends are serialised within this process."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LABELS_FILE
        self.lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._state = LabelState()

    def state(self) -> LabelState:
        with self.lock:
            return self._refresh()

    def _refresh(self) -> LabelState:
        try:
            info = os.stat(self.path)
            key = (info.st_size, info.st_mtime_ns)
        except FileNotFoundError:
            key = (0, 0)
        if key != self._seen:
            self._state = load(self.folder)
            self._seen = key
        return self._state

    def label(self, stem: str, label: str, by: dict[str, Any], defect_type: str | None = None,
              box: list[int] | None = None) -> dict[str, Any]:
        record = {"op": "label", "v": 1, "id": new_id(), "stem": stem, "label": label,
                  "defect_type": defect_type if label == "defect" else None,
                  "box": box if label == "defect" else None, "by": by, **now_fields()}
        return self._append(record)

    def undo(self, stem: str, by: dict[str, Any]) -> dict[str, Any] | None:
        """Withdraw the stem's current label; None when it has none."""
        with self.lock:
            current = self._refresh().current(stem)
            if current is None:
                return None
            record = {"op": "undo", "v": 1, "id": new_id(), "stem": stem, "undoes": current["id"], "by": by,
                      **now_fields()}
            return self._append_locked(record)

    def exported(self, label_ids: list[str], to: str, by: dict[str, Any]) -> dict[str, Any]:
        return self._append({"op": "exported", "v": 1, "id": new_id(), "labels": label_ids, "to": to, "by": by,
                             **now_fields()})

    def _append(self, record: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            return self._append_locked(record)

    def _append_locked(self, record: dict[str, Any]) -> dict[str, Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        append_record(self.path, record)
        self._seen = None  # read back on next use: the fold is the one source of truth
        return record
