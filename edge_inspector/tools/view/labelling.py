"""Labelling archived parts from the live view (`edge-inspector view --archive DIR`).

The view reads the service's archive folder (frames, heatmaps, JSON headers) and writes operator labels to
the journal beside it (core/labelstore.py). Only names matching the archive's own stem pattern are ever
turned into paths, and only for files that exist in that one folder: a request cannot name anything else.
Writes pass the same door and the same operator-key check as the threshold POST (server.py); who wrote
each label (client address, and a fingerprint of the key, never the key) goes into the record and the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from edge_inspector.core.labelstore import DEFECT_TYPE, LABELS, STEM, LabelBook

log = logging.getLogger(__name__)

LIST_LIMIT = 500  # entries per /api/archive answer (the archive's default cap is 1000)
HEADER_BYTES = 256 * 1024  # an archived header is ~2 KB; anything larger is not ours


class LabelError(ValueError):
    """A label request the view refuses: one line for the client (HTTP 400/404)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def key_fingerprint(token: str | None) -> str | None:
    return None if token is None else "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


class ArchiveLabels:
    """One archive folder, its entries and its label journal, as the view's routes see them."""

    def __init__(self, folder: Path, defect_types: tuple[str, ...] = ()):
        self.folder = Path(folder)
        for kind in defect_types:
            if kind == "good" or not DEFECT_TYPE.match(kind):
                raise ValueError(f"--defect-type {kind!r}: expected a short name of letters, digits, - and _ "
                                 "(not 'good')")
        self.defect_types = tuple(dict.fromkeys(defect_types))
        self.book = LabelBook(self.folder)
        self._headers: dict[str, dict[str, Any]] = {}  # stem -> summary; entries never change once written

    # -- reading -----------------------------------------------------------------------------------------------

    def stems(self) -> list[str]:
        """Archived entries, newest first (a stem is time-sortable)."""
        try:
            names = [e.name for e in os.scandir(self.folder) if e.name.endswith(".json")]
        except OSError:
            return []
        return sorted((n[:-5] for n in names if STEM.match(n[:-5])), reverse=True)

    def summary(self, stem: str) -> dict[str, Any]:
        cached = self._headers.get(stem)
        if cached is not None:
            return cached
        header: dict[str, Any] = {}
        try:
            with open(self.folder / f"{stem}.json", "rb") as handle:
                data = json.loads(handle.read(HEADER_BYTES))
            header = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            pass
        model: dict[str, Any] = header["model"] if isinstance(header.get("model"), dict) else {}
        frame: dict[str, Any] = header["frame"] if isinstance(header.get("frame"), dict) else {}
        summary = {"stem": stem, "verdict": header.get("verdict"), "score": header.get("score"),
                   "threshold": header.get("threshold"), "camera_id": header.get("camera_id"),
                   "sequence": header.get("sequence"), "capture_time_iso": header.get("capture_time_iso"),
                   "archived": header.get("archived"), "model_id": model.get("id"),
                   "width": frame.get("width"), "height": frame.get("height"),
                   "has_heatmap": (self.folder / f"{stem}.heatmap.png").is_file()}
        if header:
            self._headers[stem] = summary
        return summary

    def listing(self, state: str = "all", limit: int = LIST_LIMIT) -> dict[str, Any]:
        if state not in ("all", "waiting", "labelled"):
            raise LabelError(f"state={state[:20]!r}: expected all, waiting or labelled")
        stems = self.stems()
        for gone in set(self._headers) - set(stems):  # evicted: forget it
            self._headers.pop(gone, None)
        labels = self.book.state().labelled()
        entries = []
        for stem in stems:
            label = labels.get(stem)
            if state == "all" or (state == "labelled") == (label is not None):
                entries.append({**self.summary(stem), "label": label})
            if len(entries) >= limit:
                break
        labelled = sum(1 for s in stems if s in labels)
        return {"folder": str(self.folder), "defect_types": list(self.defect_types), "total": len(stems),
                "labelled": labelled, "waiting": len(stems) - labelled, "entries": entries}

    def file(self, stem: str, kind: str) -> tuple[bytes, str]:
        """(bytes, content type) of an entry's frame or heatmap; LabelError(404) for anything else."""
        if not STEM.match(stem):
            raise LabelError(f"no archived part {stem[:80]!r}", 404)
        candidates = ((".heatmap.png", "image/png"),) if kind == "heatmap" else (
            (".png", "image/png"), (".jpg", "image/jpeg"))
        for suffix, content_type in candidates:
            try:
                return (self.folder / (stem + suffix)).read_bytes(), content_type
            except OSError:
                continue
        raise LabelError(f"no {kind} for archived part {stem!r} (evicted?)", 404)

    # -- writing -----------------------------------------------------------------------------------------------

    def apply(self, body: dict[str, Any], by: dict[str, Any]) -> dict[str, Any]:
        """A POST /api/labels body: {"stem", "label": good|defect, "defect_type"?, "box"?} or {"stem", "undo": true}."""
        stem = body.get("stem")
        if not isinstance(stem, str) or not STEM.match(stem) or not (self.folder / f"{stem}.json").is_file():
            raise LabelError(f"stem: no archived part {str(stem)[:80]!r} in {self.folder}", 404)
        if body.get("undo") is True:
            record = self.book.undo(stem, by)
            if record is None:
                raise LabelError(f"{stem}: has no label to undo")
        else:
            label = body.get("label")
            if label not in LABELS:
                raise LabelError(f"label: expected good or defect, got {str(label)[:40]!r}")
            defect_type = self._defect_type(body.get("defect_type"), label)
            box = self._box(body.get("box"), stem, label)
            record = self.book.label(stem, str(label), by, defect_type, box)
        current = self.book.state().current(stem)
        log.info("label from %s: %s %s -> %s", by.get("address"), record["op"], stem,
                 current["label"] if current else "unlabelled")
        return {"ok": True, "record": record, "label": current}

    def _defect_type(self, value: Any, label: str) -> str | None:
        if value in (None, "") or label != "defect":
            return None
        if not isinstance(value, str) or (self.defect_types and value not in self.defect_types) or (
                not DEFECT_TYPE.match(value) or value == "good"):
            allowed = ", ".join(self.defect_types) or "a short name of letters, digits, - and _"
            raise LabelError(f"defect_type: expected one of {allowed}, got {str(value)[:40]!r}")
        return value

    def _box(self, value: Any, stem: str, label: str) -> list[int] | None:
        if value is None or label != "defect":
            return None
        summary = self.summary(stem)
        width, height = summary.get("width") or 0, summary.get("height") or 0
        if (not isinstance(value, list) or len(value) != 4
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise LabelError("box: expected [x, y, width, height] in whole frame pixels")
        x, y, w, h = value
        if x < 0 or y < 0 or w < 1 or h < 1 or (width and x + w > width) or (height and y + h > height):
            raise LabelError(f"box: {value} is not inside the {width}x{height} frame")
        return value
