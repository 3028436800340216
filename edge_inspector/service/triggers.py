"""`camera.trigger: external`: one result per trigger (per part), not one per frame.

A photo-eye or the PLC says "a part is under the camera now" by sending a trigger (the control socket's
`trigger` command, docs/wire-format.md); the next frame captured at or after the trigger's time plus its
`delay_ms` is that part's image. Frames between triggers are read (the camera keeps streaming, so the frame
taken after a trigger is fresh, not one that waited in a driver buffer) but not judged: they are counted as
`frames_skipped`. Every trigger ends in exactly one result carrying its part id:

- a frame in time: the part's frame goes down the pipeline like any frame (pass, review, fail, error);
- no frame within `camera.trigger_timeout_ms` (camera lost, frozen, stopped): an `error` result for that part;
- the trigger queue full (triggers faster than frames): an `error` result for the refused trigger, counted.

Why the camera is read on a thread of its own here: a trigger must time out on time even while the camera
is blocked in a read (up to camera.read_timeout_s) or waiting to reconnect (backoff up to reconnect_max_s).
The capture stage then only waits for "a claimed frame or a trigger's deadline", so it alone puts parts
into the frame queue, in order, and the pipeline's one-producer design is unchanged.

Why parts are served in arrival order (first in, first out, each frame at most one part): a conveyor's
parts pass the camera in the order their photo-eye saw them; with one fixed delay, FIFO is that order.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_inspector.core.atomic import write_atomic
from edge_inspector.core.errors import ConfigError
from edge_inspector.service.sources import Frame

log = logging.getLogger(__name__)

# Part ids travel to PLCs, HMIs, archives and logs: a strict charset and length keep them one safe token
# in every one of those (no spaces, quotes, slashes, control characters).
PART_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
PART_ID_RULE = "1-64 characters of A-Z a-z 0-9 . _ : - (starting with a letter or digit)"
MAX_DELAY_MS = 60_000
TRIGGER_FIELDS = frozenset({"command", "part_id", "delay_ms", "value", "_peer"})
# Error results of refused triggers waiting for the capture stage (it waits on inference when inference is
# behind); past this a refused trigger is refused in the reply only, and counted, so a flood of triggers
# cannot grow memory without limit while inference is stuck (the watchdog reports that stall).
MAX_REFUSED_WAITING = 1024


@dataclass
class Trigger:
    part_id: str
    received_time: float  # wall clock, for the result header
    due: float  # monotonic: the first frame captured at or after this is the part's
    deadline: float  # monotonic: no frame by then is an error result


def parse_trigger(request: dict[str, Any]) -> tuple[str | None, int]:
    """(part_id or None for "assign one", delay_ms) of a `trigger` request; ConfigError (one line) otherwise."""
    unknown = sorted(str(key)[:40] for key in request if key not in TRIGGER_FIELDS)
    if unknown:
        raise ConfigError(f"trigger: unknown field(s) {', '.join(map(repr, unknown))} (expected part_id, delay_ms)")
    part_id = request.get("part_id", request.get("value"))
    if part_id is not None:
        if not isinstance(part_id, str) or not PART_ID.fullmatch(part_id):
            shown = repr(part_id)[:40]
            raise ConfigError(f"trigger: part_id {shown} is not {PART_ID_RULE}")
    delay = request.get("delay_ms", 0)
    if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay <= MAX_DELAY_MS:
        raise ConfigError(f"trigger: delay_ms must be an integer 0-{MAX_DELAY_MS}, got {repr(delay)[:40]}")
    return part_id, delay


class TriggerGate:
    """Pairs triggers with frames; see the module docstring. Thread-safe: triggers come from the control
    thread, frames from the reader thread, and the capture stage takes parts."""

    def __init__(self, timeout_ms: int, max_pending: int, camera_id: str, counter: PartCounter | None = None):
        self.counter = counter or PartCounter()  # ids the service assigns (a trigger without part_id)
        self.timeout_s = timeout_ms / 1000.0
        self.max_pending = max_pending
        self.camera_id = camera_id
        self.pending: collections.deque[Trigger] = collections.deque()
        self.ready: collections.deque[Frame] = collections.deque()  # parts for the capture stage, in order
        self.cond = threading.Condition()
        self.received = 0
        self.timeouts = 0
        self.overflows = 0  # refused: the queue was full (each an error result while MAX_REFUSED_WAITING allows)
        self.frames_skipped = 0
        self.ended = False

    # -- triggers (control thread) ---------------------------------------------------------------------------

    def trigger(self, part_id: str | None, delay_ms: int) -> dict[str, Any]:
        """Queue one trigger; the reply's fields. ConfigError when refused (the queue is full)."""
        now = time.monotonic()
        with self.cond:
            if part_id is None:
                part_id = self.counter.take()
            self.received += 1
            waiting = len(self.pending) + sum(1 for frame in self.ready if frame.error is None)
            if self.ended or waiting >= self.max_pending:
                self.overflows += 1
                reason = ("the stream has ended" if self.ended else
                          f"trigger queue full ({waiting} part(s) waiting for a frame or inference)")
                if len(self.ready) < MAX_REFUSED_WAITING:
                    self.ready.append(self._error_frame(part_id, time.time(), f"trigger refused: {reason}"))
                    self.cond.notify_all()
                log.warning("camera %s: trigger for part %s refused: %s (%d refused so far)", self.camera_id,
                            part_id, reason, self.overflows)
                raise ConfigError(f"trigger: part {part_id} refused: {reason}")
            due = now + delay_ms / 1000.0
            self.pending.append(Trigger(part_id, time.time(), due, due + self.timeout_s))
            self.cond.notify_all()
        return {"part_id": part_id, "queued": waiting + 1}

    # -- frames (reader thread) ------------------------------------------------------------------------------

    def offer(self, frame: Frame) -> None:
        """A frame from the camera: the oldest due trigger's part image, or skipped."""
        with self.cond:
            head = self.pending[0] if self.pending else None
            if head is None or frame.capture_mono < head.due:
                self.frames_skipped += 1
                return
            self.pending.popleft()
            frame.part_id = head.part_id
            frame.trigger_time = head.received_time
            self.ready.append(frame)
            self.cond.notify_all()

    def end(self) -> None:
        """The camera's stream is over (finite file, or stopping): every waiting trigger gets its error now."""
        with self.cond:
            self._end_locked()

    def _end_locked(self) -> None:
        self.ended = True
        while self.pending:
            trigger = self.pending.popleft()
            self.timeouts += 1
            self.ready.append(self._error_frame(trigger.part_id, trigger.received_time,
                                                "no frame for this trigger: the stream ended or the service stopped"))
        self.cond.notify_all()

    # -- parts (capture stage) -------------------------------------------------------------------------------

    def parts(self, frames: Iterator[Frame], stop: threading.Event, beat: Callable[[], None]) -> Iterator[Frame]:
        """The part frames, in order: claimed frames and the error frames of triggers that got none.

        `frames` (the camera's) is read on a helper thread that offers each frame to the gate."""
        reader = threading.Thread(target=self._read, args=(frames,), name="edge-trigger-reader", daemon=True)
        reader.start()
        while True:
            beat()
            with self.cond:
                if stop.is_set() and not self.ended:  # stopping: waiting triggers get their errors now
                    self._end_locked()
                self._expire(time.monotonic())
                if not self.ready:
                    if self.ended:
                        return
                    self.cond.wait(self._wait_s())
                    continue
                frame = self.ready.popleft()
            yield frame

    def _read(self, frames: Iterator[Frame]) -> None:
        try:
            for frame in frames:
                self.offer(frame)
        except Exception:  # the capture stage must still end, and every trigger still get its result
            log.exception("camera %s: trigger reader failed", self.camera_id)
        finally:
            self.end()

    def _wait_s(self) -> float:
        if not self.pending:
            return 0.2
        nearest = min(trigger.deadline for trigger in self.pending)
        return min(0.2, max(0.001, nearest - time.monotonic()))

    def _expire(self, now: float) -> None:
        """Triggers past their deadline become error results (called with the lock held)."""
        late = [trigger for trigger in self.pending if trigger.deadline <= now]
        for trigger in late:
            self.pending.remove(trigger)
            self.timeouts += 1
            log.warning("camera %s: no frame for part %s within %.0f ms of its trigger (%d timeouts so far)",
                        self.camera_id, trigger.part_id, self.timeout_s * 1000, self.timeouts)
            self.ready.append(self._error_frame(
                trigger.part_id, trigger.received_time,
                f"no frame within {self.timeout_s * 1000:.0f} ms of the trigger (camera.trigger_timeout_ms)"))

    @staticmethod
    def _error_frame(part_id: str, trigger_time: float, reason: str) -> Frame:
        now = time.monotonic()
        return Frame(image=None, index=-1, capture_time=time.time(), capture_mono=now, capture_ms=0.0,
                     error=reason, part_id=part_id, trigger_time=trigger_time)

    def snapshot(self) -> dict[str, int]:
        with self.cond:
            return {"received": self.received, "pending": len(self.pending), "timeouts": self.timeouts,
                    "refused": self.overflows, "frames_skipped": self.frames_skipped}


# -- camera.trigger: presence ---------------------------------------------------------------------------------

PRESENCE_WIDTH = 320  # frames are looked at this wide at most: presence needs blobs, not detail


@dataclass
class PresenceSettings:
    roi: tuple[int, int, int, int] | None  # [x, y, width, height] in frame pixels; None: the whole frame
    threshold: float  # grey levels a pixel must differ from the empty belt (after flicker correction)
    min_area: float  # share of the ROI's pixels that must differ for "a part is in view"
    frames_on: int  # consecutive frames in view before a part counts as entered
    frames_off: int  # consecutive frames empty before it counts as gone
    max_s: float  # a part in view longer (stopped on the belt) is judged then, and counted once
    background_frames: int  # the empty-belt reference: the median of the stream's first frames
    judge: str = "best_placed"  # best_placed: one frame per part; worst: up to max_frames, the worst kept
    max_frames: int = 8


class PresenceGate:
    """Finds parts in a region of interest and hands one frame per part to the pipeline: the best-placed
    one (the part's centre nearest the ROI's centre), when the part has left.

    How a part is seen: each frame (shrunk to PRESENCE_WIDTH) is compared with an empty-belt reference, the
    median of the stream's first `background_frames` frames (start the line empty), updated slowly while the
    ROI is empty. Lighting flicker moves the whole frame's grey level: the frame's median difference to the
    reference is subtracted first, so flicker is not a part (parts must cover under half the frame). A part
    enters after `frames_on` frames in view and leaves after `frames_off` empty ones, so one noisy frame
    neither makes nor splits a part; two parts close together are two parts when the ROI is empty between
    them for `frames_off` frames (make the ROI narrower than the gap between parts). A part that stops on
    the belt is judged once after `max_s` and not again until the ROI has been empty.

    Only the best-placed frame so far is held (one frame of memory); the others are counted as skipped.
    """

    def __init__(self, settings: PresenceSettings, camera_id: str, counter: PartCounter | None = None):
        self.counter = counter or PartCounter()
        self.settings = settings
        self.camera_id = camera_id
        self.background: np.ndarray | None = None
        self._warmup: list[np.ndarray] = []
        self.parts_found = 0
        self.forced_out = 0  # parts judged after max_s in view (stopped on the belt)
        self.frames_skipped = 0
        self.in_view = False
        self._on = 0
        self._off = 0
        self._held = False  # the current part was already judged (max_s): wait for the ROI to empty
        self._best: tuple[float, Frame] | None = None  # the frame held: best placed, or (worst) the latest
        self._part_id = ""
        self._part_frames = 0  # worst: frames of the current part sent to be judged
        self._entered = 0.0
        self._entered_wall = 0.0
        self._full_width = PRESENCE_WIDTH  # the last frame's width before shrinking (the ROI is in its pixels)

    def parts(self, frames: Iterator[Frame], stop: threading.Event, beat: Callable[[], None]) -> Iterator[Frame]:
        for frame in frames:
            beat()
            yield from self._look(frame)
        if self._best is not None:  # the stream ended (or stopping) with a part in view: judge it still
            yield self._close()

    def _look(self, frame: Frame) -> list[Frame]:
        """The frames to judge now: a part's that has just left (or stayed max_s), or (worst) one of its frames."""
        if frame.image is None:  # an unreadable frame is not a part; while one is in view it is just skipped
            self.frames_skipped += 1
            return []
        grey = self._small_grey(frame.image)
        if self.background is None:
            self._warmup.append(grey)
            self.frames_skipped += 1
            if len(self._warmup) >= self.settings.background_frames:
                self.background = np.median(np.stack(self._warmup), axis=0).astype(np.float32)
                self._warmup = []
            return []
        seen, placement = self._measure(grey)
        return self._step(frame, seen, placement)

    def _small_grey(self, image: np.ndarray) -> np.ndarray:
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        self._full_width = grey.shape[1]
        scale = min(1.0, PRESENCE_WIDTH / grey.shape[1])
        if scale < 1.0:
            grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        return grey.astype(np.float32)

    def _roi(self, shape: tuple[int, ...], full_width: int) -> tuple[slice, slice]:
        roi = self.settings.roi
        if roi is None:
            return slice(None), slice(None)
        scale = shape[1] / full_width
        x, y, w, h = (round(v * scale) for v in roi)
        return slice(y, y + max(1, h)), slice(x, x + max(1, w))

    def _measure(self, grey: np.ndarray) -> tuple[bool, float]:
        """(a part is in view, how far its centre is from the ROI's centre as a share of the ROI)."""
        assert self.background is not None
        if grey.shape != self.background.shape:  # the camera changed resolution: start the reference over
            self.background = None
            return False, 1.0
        difference = grey - self.background
        difference -= float(np.median(difference))  # flicker: the whole frame brighter or darker
        rows, cols = self._roi(grey.shape, self._full_width)
        mask = np.abs(difference[rows, cols]) > self.settings.threshold
        area = float(mask.mean()) if mask.size else 0.0
        if area < self.settings.min_area:
            if not self.in_view:  # empty belt: follow slow changes (daylight, dust)
                self.background += 0.05 * (grey - self.background)
            return False, 1.0
        ys, xs = np.nonzero(mask)
        height, width = mask.shape
        distance = float(np.hypot((xs.mean() - width / 2) / width, (ys.mean() - height / 2) / height))
        return True, distance

    def _step(self, frame: Frame, seen: bool, placement: float) -> list[Frame]:
        settings = self.settings
        if seen:
            self._on += 1
            self._off = 0
            if not self.in_view and self._on >= settings.frames_on:
                self.in_view, self._part_frames = True, 0
                self._entered, self._entered_wall = time.monotonic(), time.time()
                self._part_id = self.counter.take()
            if self.in_view and not self._held:
                out = self._keep(frame, placement)
                if time.monotonic() - self._entered >= settings.max_s:
                    self.forced_out += 1
                    self._held = True
                    log.warning("camera %s: a part has been in view for %.0f s (stopped on the belt?): judged "
                                "now, counted once", self.camera_id, settings.max_s)
                    return [*out, self._close()]
                return out
            self.frames_skipped += 1
            return []
        self._on = 0
        self.frames_skipped += 1
        if self.in_view:
            self._off += 1
            if self._off >= settings.frames_off:
                self.in_view, self._held = False, False
                if self._best is not None:
                    return [self._close()]
        return []

    def _keep(self, frame: Frame, placement: float) -> list[Frame]:
        """Best-placed: hold the frame if better placed than the one held. Worst: every frame (up to
        max_frames) is judged; the one held goes out marked "more", this one is held (the last one held goes
        out marked "last" when the part leaves, so the merge after inference knows the part is complete)."""
        if self.settings.judge == "best_placed":
            if self._best is None or placement < self._best[0]:
                if self._best is not None:
                    self.frames_skipped += 1
                self._best = (placement, frame)
            else:
                self.frames_skipped += 1
            return []
        if self._part_frames >= self.settings.max_frames:
            self.frames_skipped += 1
            return []
        self._part_frames += 1
        held, self._best = self._best, (placement, frame)
        if held is None:
            return []
        return [self._mark(held[1], "more")]

    def _mark(self, frame: Frame, step: str) -> Frame:
        frame.part_id = self._part_id
        frame.trigger_time = self._entered_wall
        frame.part_step = step if self.settings.judge == "worst" else None
        return frame

    def _close(self) -> Frame:
        assert self._best is not None
        frame = self._best[1]
        self._best = None
        self.parts_found += 1
        return self._mark(frame, "last")

    def snapshot(self) -> dict[str, Any]:
        return {"parts": self.parts_found, "in_view": self.in_view, "stopped_parts": self.forced_out,
                "frames_skipped": self.frames_skipped, "background_ready": self.background is not None}


SEVERITY = {"pass": 0, "review": 1, "fail": 2, "error": 3}


class PartMerger:
    """presence_judge worst: the results of one part's frames become one result, the worst of them.

    Worst means the most severe verdict (error > fail > review > pass: a frame that could not be judged
    makes the part "do not ship unchecked"), then the highest score. It sits between the pipeline's publish
    stage and the real sink (publish thread only), renumbers what it forwards (sequence 1, 2, ... per part,
    no gaps, as the wire format promises) and counts parts in the stats; the inference stage leaves frames
    marked `part_step` uncounted (Pipeline._count). Only the worst result so far is held per part.
    """

    def __init__(self, sink: Any, stats: Any):
        self.sink = sink
        self.stats = stats
        self.sequence = 0
        self.frames_judged = 0
        self._worst: Any = None

    def send(self, result: Any) -> None:
        step = result.frame.part_step
        if step is None:  # not a part's frame (counted by the pipeline already): passed on as it is
            self.sink.send(result)
            return
        self.frames_judged += 1
        if self._worst is None or self._rank(result) > self._rank(self._worst):
            self._worst = result
        if step == "last":
            worst, self._worst = self._worst, None
            self._forward(worst)

    @staticmethod
    def _rank(result: Any) -> tuple[int, float]:
        score = result.decision.score if result.decision is not None else float("inf")
        return SEVERITY.get(result.verdict, 3), score if np.isfinite(score) else float("inf")

    def _forward(self, result: Any) -> None:
        self.sequence += 1
        result.sequence = self.sequence
        stats = self.stats
        stats.processed += 1
        stats.last_sequence = self.sequence
        counter = {"pass": "passes", "fail": "fails", "review": "reviews"}.get(result.verdict, "errors")
        setattr(stats, counter, getattr(stats, counter) + 1)
        if result.verdict == "error":
            log.warning("part %s: %s", result.frame.part_id, result.error)
        self.sink.send(result)

    def idle(self) -> None:
        self.sink.idle()

    def finish(self) -> None:
        if self._worst is not None:  # a part cut short at stop: its worst frame so far is its result
            worst, self._worst = self._worst, None
            self._forward(worst)
        finish = getattr(self.sink, "finish", None)
        if finish is not None:
            finish()


class PartCounter:
    """The ids the service gives parts (triggers without part_id, presence parts): 1, 2, 3, ... per camera,
    never repeated across restarts when a file keeps them (camera.part_counter_file).

    Why blocks: a write per part (fsync'd, atomic) would cost the line a disk write per part and wear an
    SD card; instead the file holds the first id the *next* run may use, BLOCK ids ahead. A restart (even
    after SIGKILL or power loss) starts there: ids stay increasing and unique, with a gap of at most BLOCK.
    A file that cannot be written is logged and counting goes on (ids may then repeat after a restart).
    """

    BLOCK = 1000
    MAX = 10**15

    def __init__(self, path: Path | None = None):
        self.path = path
        self.next = 1
        self.reserved_until = 0
        self.write_errors = 0
        if path is not None and path.exists():
            self.next = self._read(path)
        self._reserve()

    @staticmethod
    def _read(path: Path) -> int:
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the part counter ({err})") from None
        if not text.isdigit() or not 1 <= int(text) <= PartCounter.MAX:
            raise ConfigError(f"{path}: expected the next part id, an integer 1-{PartCounter.MAX}, got {text[:40]!r} "
                              "(remove the file to start at 1, or write a number above the last id used)")
        return int(text)

    def take(self) -> str:
        if self.next >= self.reserved_until:
            self._reserve()
        value = self.next
        self.next += 1
        return str(value)

    def _reserve(self) -> None:
        self.reserved_until = self.next + self.BLOCK
        if self.path is None:
            return
        try:
            write_atomic(self.path, f"{self.reserved_until}\n")
        except OSError as err:
            self.write_errors += 1
            log.error("part counter %s: cannot write (%s); part ids may repeat after a restart", self.path, err)


def counter_file(configured: Path | str | None, state_directory: str, camera_id: str) -> Path | None:
    """Where the part counter lives: the configured file, else systemd's StateDirectory (a file named after
    the camera id, its unsafe characters replaced and a digest added so two ids cannot share it), else None."""
    if configured:
        return Path(configured)
    if not state_directory:
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", camera_id)[:64]
    digest = hashlib.sha256(camera_id.encode()).hexdigest()[:8]
    return Path(state_directory) / "parts" / f"{safe}-{digest}"
