"""Keep failed frames (frame image, 8-bit heatmap, JSON header) in a folder for review, capped by count and size.

Writing runs on its own thread behind a small bounded queue: a slow SD card or a full disk must never slow
the line, so when the writer falls behind, frames are skipped and counted, and when the disk is full the
error is logged (once per streak, not per frame) and the service carries on. Each entry's files share one
time-sortable stem (`20250101T120000.123Z_cam0_00000042_fail`), so "oldest first" is simply name order,
also across restarts.

Passed parts are kept too, when asked (`archive.pass_sample`: 1 in N; `archive.pass_margin`: every pass
scoring above that fraction of the threshold), because an escape can only be found among parts that passed;
each entry's JSON says why it was kept (`archived`: verdict, margin or sample). Parts an operator labelled
(core/labelstore.py's journal beside the entries) are kept out of eviction until `edge-inspector labels
export` marked them exported: a label without its image is worth nothing to the next fit.
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
import logging
import os
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

from edge_inspector.core.atomic import write_atomic
from edge_inspector.core.images import shown
from edge_inspector.core.labelstore import LabelBook
from edge_inspector.core.render import heatmap_to_u8
from edge_inspector.service.config import ArchiveConfig
from edge_inspector.service.pipeline import Result

log = logging.getLogger(__name__)

_SUFFIXES = (".json", ".heatmap.png", ".png", ".jpg")
# core/atomic.py's temporary name, `.<name>.<pid>.tmp`: one left behind is a write cut short (SIGKILL, power
# cut); a 12 MB one once survived every restart, outside the caps.
_TEMPORARY = re.compile(r"^\.(.+)\.\d+\.tmp$")


def _is_temporary(name: str) -> bool:
    match = _TEMPORARY.match(name)
    return bool(match and _stem_of(match.group(1)))


def _stem_of(name: str) -> str | None:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


@dataclass
class ArchiveStats:
    saved: int = 0
    skipped: int = 0  # writer behind: not archived
    errors: int = 0  # write failures (disk full, permissions)
    removed: int = 0  # evicted to respect the caps
    stale_removed: int = 0  # temporary files of interrupted writes, removed at start
    entries: int = 0
    bytes: int = 0
    reviews: int = 0  # of `saved`, verdict review (the review band's parts, kept for the person judging them)
    passes: int = 0  # of `saved`, passed parts kept by pass_sample / pass_margin
    protected: int = 0  # entries labelled and not yet exported: never evicted


class Archive:
    """Bounded on-disk archive of frames. `submit` never blocks; writes happen on the archive thread."""

    QUEUE_SIZE = 8

    def __init__(self, folder: Path, config: ArchiveConfig, heatmap_full_scale: float = 2.0):
        self.folder = Path(folder)
        self.config = config
        self.verdicts = set(config.verdicts)
        self.full_scale = heatmap_full_scale
        self.max_bytes = int(config.max_megabytes * 1024 * 1024)
        self.stats = ArchiveStats()
        self.entries: collections.OrderedDict[str, int] = collections.OrderedDict()  # stem -> bytes, oldest first
        self.queue: queue.Queue = queue.Queue(self.QUEUE_SIZE)
        self._failing = False
        self.stray_bytes = 0  # stale temporary files that could not be removed: still counted in the size cap
        self.labels = LabelBook(self.folder)
        self._passes_seen = 0
        self._over_cap_warned = False
        self._scan()
        self.thread = threading.Thread(target=self._run, name="edge-archive", daemon=True)
        self.thread.start()

    def _scan(self) -> None:
        """Pick up entries from earlier runs so the caps hold across restarts."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            sizes: dict[str, int] = collections.defaultdict(int)
            for entry in os.scandir(self.folder):
                if not entry.is_file(follow_symlinks=False):
                    continue
                if _is_temporary(entry.name):  # nothing writes here before this archive: it is stale
                    self._remove_stale(entry)
                    continue
                stem = _stem_of(entry.name)
                if stem:
                    sizes[stem] += entry.stat(follow_symlinks=False).st_size
        except OSError as err:
            self._report(err)
            return
        for stem in sorted(sizes):
            self.entries[stem] = sizes[stem]
        self._sync_stats()

    def _remove_stale(self, entry: os.DirEntry) -> None:
        size = entry.stat(follow_symlinks=False).st_size
        try:
            os.unlink(entry.path)
        except OSError as err:
            self.stray_bytes += size
            log.warning("archive: cannot remove the stale temporary file %s (%s); its %.1f MB count against "
                        "archive.max_megabytes", shown(entry.name), err.strerror,
                        size / 1048576)
            return
        self.stats.stale_removed += 1
        log.info("archive: removed %s (%.1f MB), left by a write cut short", shown(entry.name), size / 1048576)

    def _reason(self, result: Result) -> str | None:
        """Why this result is kept (verdict, margin, sample), or None. Runs on the publish thread: cheap."""
        if result.verdict in self.verdicts:
            return "verdict"
        if result.verdict != "pass":
            return None
        self._passes_seen += 1
        decision = result.decision
        margin = self.config.pass_margin
        if margin is not None and decision is not None and decision.score > margin * decision.threshold:
            return "margin"
        if self.config.pass_sample and self._passes_seen % self.config.pass_sample == 0:
            return "sample"
        return None

    def submit(self, result: Result, header: dict[str, Any]) -> bool:
        """Queue a result for archiving if it is kept; False when not kept or the writer is behind."""
        reason = self._reason(result)
        if reason is None:
            return False
        try:
            self.queue.put_nowait((result, {**header, "archived": reason}))
            return True
        except queue.Full:
            self.stats.skipped += 1
            return False

    def close(self, timeout: float = 3.0) -> None:
        """Write what is queued (up to timeout), then stop the thread."""
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            try:
                self._write(*item)
            except OSError as err:
                self._report(err)
            except Exception:  # never let one odd frame end archiving for the rest of the shift
                self.stats.errors += 1
                log.exception("archive: unexpected error")

    def _write(self, result: Result, header: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.fromtimestamp(result.frame.capture_time, _dt.timezone.utc)
        stem = (f"{stamp.strftime('%Y%m%dT%H%M%S')}.{stamp.microsecond // 1000:03d}Z_"
                f"{header.get('camera_id', 'cam')}_{result.sequence:08d}_{result.verdict}")
        blobs: list[tuple[str, bytes]] = []
        ext = ".jpg" if self.config.image_format == "jpg" else ".png"
        if result.frame.image is not None:  # error results from unreadable files have no frame to keep
            ok, image = cv2.imencode(ext, result.frame.image)
            if ok:
                blobs.append((stem + ext, image.tobytes()))
        if result.heatmap is not None and result.decision is not None:
            heat8 = heatmap_to_u8(result.heatmap, result.decision.threshold, self.full_scale)
            ok, heat = cv2.imencode(".png", heat8, [cv2.IMWRITE_PNG_COMPRESSION, 3])
            if ok:
                blobs.append((stem + ".heatmap.png", heat.tobytes()))
        blobs.append((stem + ".json", json.dumps(header, indent=1).encode()))
        written: list[Path] = []
        try:
            for name, data in blobs:
                path = self.folder / name
                written.append(path)
                write_atomic(path, data)
        except OSError:
            for path in written:  # no half entries: a partial write is removed before reporting
                path.unlink(missing_ok=True)
            raise
        self.entries[stem] = sum(len(data) for _, data in blobs)
        self.stats.saved += 1
        self.stats.reviews += result.verdict == "review"
        self.stats.passes += result.verdict == "pass"
        if self._failing:
            log.info("archive: writing to %s again", self.folder)
            self._failing = False
        self._evict()
        self._sync_stats()

    def _evict(self) -> None:
        """Oldest first, skipping labelled parts not yet exported. The caps still hold (a full SD card stops
        more than the archive): when labelled parts fill them, new parts go as soon as written, said once
        per streak, until an export lets the labelled ones go."""
        total = sum(self.entries.values()) + self.stray_bytes
        if len(self.entries) <= self.config.max_files and total <= self.max_bytes:
            self._over_cap_warned = False
            return
        protected = self._protected()
        for stem in list(self.entries):
            if len(self.entries) <= self.config.max_files and total <= self.max_bytes:
                break
            if stem in protected:
                continue
            size = self.entries.pop(stem)
            for suffix in _SUFFIXES:
                (self.folder / (stem + suffix)).unlink(missing_ok=True)
            total -= size
            self.stats.removed += 1
        crowded = all(stem in protected for stem in self.entries)
        if crowded and not self._over_cap_warned:
            log.warning("archive: its caps are filled by %d labelled parts that wait for `edge-inspector labels "
                        "export %s`; new parts are removed as soon as written until then", len(self.entries),
                        self.folder)
        self._over_cap_warned = crowded

    def _protected(self) -> set[str]:
        try:
            return self.labels.state().protected()
        except OSError as err:  # an unreadable journal: keep every entry rather than guess
            log.warning("archive: cannot read %s (%s): nothing is evicted until it can be read",
                        self.labels.path, err)
            return set(self.entries)

    def _sync_stats(self) -> None:
        self.stats.entries = len(self.entries)
        try:
            self.stats.protected = len(self.labels.state().protected() & set(self.entries))
        except OSError:
            pass
        self.stats.bytes = sum(self.entries.values()) + self.stray_bytes

    def _report(self, err: OSError) -> None:
        self.stats.errors += 1
        if not self._failing:
            log.error("archive: cannot write to %s (%s); frames are not archived until this clears",
                      self.folder, err)
            self._failing = True

    def snapshot(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "saved": self.stats.saved, "reviews": self.stats.reviews,
                "passes": self.stats.passes, "protected": self.stats.protected,
                "skipped": self.stats.skipped, "errors": self.stats.errors, "removed": self.stats.removed,
                "stale_removed": self.stats.stale_removed, "entries": self.stats.entries,
                "megabytes": round(self.stats.bytes / 1048576, 2), "failing": self._failing}
