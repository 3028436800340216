"""capture -> infer -> publish: threads joined by bounded queues.

Why separate threads: a camera delivers frames on its own clock, the model takes as long as it takes, and a
network send or PNG encode should not steal time from either. Only inference, stitching and the decision
run on the inference thread: decoding and cutting the tiles run on the capture thread, the heatmap's 8-bit
conversion and PNG encoding on the publish thread, each beside the inference of another frame. That hides
them where inference leaves a core free (a GPU; on the 2-core VM, ONNX Runtime on 1 thread: service within
10-12% of bare inference at 2x2 and 4x4 tiles). With ONNX Runtime on every core they slow inference by
about what they cost instead (benchmarks/service_bench.py; the README has the figures).
Why several inference workers (`model.workers`): on a CPU, ONNX Runtime spreads one small batch over its
threads with waits in between; two frames judged at once, each on one thread, keep the cores busier (2-core
VM, 2x2 tiles, bare: 26-29.5 vs 24.5-25.5 frames/s), at the cost of each frame taking longer. Workers share
the frame queue and hand results back in the order frames were taken (queues.InOrder).
Why bounded queues: a line runs for months, so nothing may grow without limit. When the model falls behind
a live camera the *oldest* waiting frame is dropped (the freshest frame wins: a verdict on a part that left
the camera a second ago is worth less than one on the part under it now) and every drop is counted. For
replayed media (`when_behind: wait`) capture waits instead, so no frame is lost.

Every frame that reaches inference yields exactly one Result - pass, fail, or error with the reason - with
a sequence number one above the last one's, and every Result reaches the sink in that order; nothing is
lost silently.
Stop drains: capture stops first, then every frame already captured is inferred and published.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edge_inspector.core.decision import Decision
from edge_inspector.core.images import is_shortage, shown
from edge_inspector.core.inspect import Inspector, MapScale, ModelOutputError
from edge_inspector.service.queues import FrameQueue, InOrder, QueueClosed
from edge_inspector.service.sources import Camera, Frame
from edge_inspector.service.triggers import PresenceGate, TriggerGate

log = logging.getLogger(__name__)

# np.percentile (the health snapshot's latency figures) reaches np.unique, which imports numpy.ma on first use;
# under a descriptor shortage that import fails with EMFILE (seen in CI: 300 idle connections at a 256-fd
# limit took the capture stage down through a camera event's snapshot). Done once here, at start.
np.percentile(np.zeros(2), 50)

# Every result's latency_ms carries all of these (docs/wire-format.md); stages a frame never reached are 0.
LATENCY_KEYS = ("capture", "queue", "tiling", "inference", "decision", "encode", "total")
# A frame whose model output was refused (ModelOutputError) keeps health not-ok for this long, and until a
# later frame is judged: a single NaN frame is then seen in at least one health message (5 s apart).
OUTPUT_PROBLEM_HOLD_S = 60.0
# The supervisor ticks every 0.1 s; a gap this long means the whole process was paused (SIGSTOP, swapped
# out, a stalled disk under the logger), not that one stage hung.
PAUSE_GAP_S = 2.0


@dataclass
class Result:
    sequence: int
    frame: Frame
    verdict: str  # pass | review | fail | error
    model_id: str
    model_sha256: str
    decision: Decision | None = None
    heatmap: np.ndarray | None = None  # float32, raw score scale, heatmap_scale x the frame's size
    heatmap_scale: float = 1.0  # the scale the map was stitched at, so published at (publish.heatmap_scale)
    tile_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds
    min_defect_area: int = 0  # as decided (the decision's own); for an error result, the setting at the time

    @property
    def threshold(self) -> float | None:
        return self.decision.threshold if self.decision else None


class Stats:
    """Counters and recent latencies. Each counter has one writer thread; readers take a snapshot."""

    WINDOW = 2048

    def __init__(self):
        self.started = time.monotonic()
        self.captured = 0
        self.dropped = 0
        self.processed = 0
        self.passes = 0
        self.fails = 0
        self.reviews = 0  # verdict review: the uncertain parts sent to a person (review band)
        self.errors = 0
        self.published = 0
        self.publish_errors = 0
        self.latency_ms: collections.deque = collections.deque(maxlen=self.WINDOW)
        self.inference_ms: collections.deque = collections.deque(maxlen=self.WINDOW)
        self.done_times: collections.deque = collections.deque(maxlen=self.WINDOW)
        self.last_sequence = 0

    def record_published(self, result: Result) -> None:
        self.published += 1
        self.done_times.append(time.monotonic())
        if "total" in result.timings:
            self.latency_ms.append(result.timings["total"])
        if "inference" in result.timings:
            self.inference_ms.append(result.timings["inference"])

    def fps(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        times = [t for t in list(self.done_times) if t >= now - window_s]
        if len(times) < 2:
            return 0.0
        span = max(now - times[0], times[-1] - times[0], 1e-6)
        return (len(times) - 1) / span

    def snapshot(self) -> dict[str, Any]:
        latency = np.array(list(self.latency_ms), np.float64)
        inference = np.array(list(self.inference_ms), np.float64)

        def pct(values: np.ndarray, q: float) -> float | None:
            return round(float(np.percentile(values, q)), 2) if values.size else None

        return {"uptime_s": round(time.monotonic() - self.started, 1), "fps": round(self.fps(), 2),
                "captured": self.captured, "dropped": self.dropped, "processed": self.processed,
                "passes": self.passes, "fails": self.fails, "reviews": self.reviews, "errors": self.errors,
                "published": self.published,
                "publish_errors": self.publish_errors, "last_sequence": self.last_sequence,
                "latency_ms": {"p50": pct(latency, 50), "p99": pct(latency, 99)},
                "inference_ms": {"p50": pct(inference, 50), "p99": pct(inference, 99)}}


class InferenceEngine:
    """The inference stage's work: number each frame and judge it through the Inspector (core/inspect.py).

    Exactly one Result per frame: a frame the source could not deliver, or one whose judging raised,
    becomes verdict 'error' carrying the reason, never a silent gap.
    """

    def __init__(self, inspector: Inspector, map_scale: MapScale = 1.0, picture_of_frame: bool = False):
        self.inspector = inspector
        self.map_scale = map_scale  # publish.heatmap_scale: maps are stitched at the size they are sent
        self.picture_of_frame = picture_of_frame  # publish.heatmap jpeg_overlay: the frame is in the picture
        self.sequence = 0
        self.refused_outputs = 0  # frames whose model output broke the contract (NaN, wrong shape): errors
        self._last_refused: tuple[float, str] | None = None  # (monotonic time, reason)
        self._judged_since_refused = False
        self._lock = threading.Lock()  # several inference workers share the engine

    def problems(self) -> list[str]:
        """Health problems of the judging itself: a model output refused lately (see OUTPUT_PROBLEM_HOLD_S).

        Kept out of the pipeline's stage problems on purpose: those withhold the systemd watchdog, and a
        restart cannot make a model answer finitely (the start-up probe would pass it again)."""
        with self._lock:
            last, judged = self._last_refused, self._judged_since_refused
        if last is None:
            return []
        age = time.monotonic() - last[0]
        if judged and age > OUTPUT_PROBLEM_HOLD_S:
            return []
        return [f"model output refused on {self.refused_outputs} frame(s), last {age:.0f} s ago: {last[1]}"]

    def _note_output(self, refused: str | None) -> None:
        with self._lock:
            if refused is None:
                self._judged_since_refused = self._last_refused is not None
                return
            self.refused_outputs += 1
            self._last_refused = (time.monotonic(), refused)
            self._judged_since_refused = False

    def process(self, frame: Frame, sequence: int | None = None) -> Result:
        """Judge one frame. `sequence`: its number on the wire, given by the pipeline when several workers
        judge frames at once (the order frames were taken); None: the next of this engine's own count."""
        if sequence is None:
            self.sequence += 1
            sequence = self.sequence
        tiles, frame.tiles = frame.tiles, None  # the model inputs are not kept with the result
        model, params = self.inspector.settings()
        result = Result(sequence=sequence, frame=frame, verdict="error", model_id=model.model_id,
                        model_sha256=model.sha256, min_defect_area=params.min_defect_area)
        timings = result.timings
        timings.update(dict.fromkeys(LATENCY_KEYS, 0.0))
        timings["capture"] = frame.capture_ms
        timings["queue"] = (time.monotonic() - frame.capture_mono) * 1000.0
        if frame.error is not None or frame.image is None:  # the source could not deliver this one
            result.error = frame.error or "no image"
            return result
        try:
            inspection = self.inspector.inspect(frame.image, self.map_scale, tiles, self.picture_of_frame)
        except ModelOutputError as err:  # an error result, never a pass, and health says why
            result.error = f"model output refused: {err}"
            self._note_output(str(err))
            return result
        except MemoryError:  # an error result; the next frame may find the memory again
            result.error = "out of memory judging this frame"
            self._note_output("out of memory judging a frame")
            return result
        except Exception as err:  # any failure must still produce a result, never a silent gap
            result.error = f"{type(err).__name__}: {err}".splitlines()[0]
            return result
        self._note_output(None)
        timings.update(inspection.timings)
        result.verdict = inspection.verdict
        result.decision = inspection.decision
        result.heatmap, result.heatmap_scale = inspection.heatmap, inspection.map_scale
        result.tile_boxes = inspection.tile_boxes
        result.model_id, result.model_sha256 = inspection.model_id, inspection.model_sha256
        result.min_defect_area = inspection.decision.min_defect_area
        return result

    def prepare(self, frame: Frame) -> None:
        """Cut the frame's tiles ahead of inference (called by the capture stage; see Pipeline._capture)."""
        if frame.image is not None and frame.error is None:
            frame.tiles = self.inspector.prepare(frame.image)


class ResultSink(Protocol):
    """Where results go (the ZeroMQ publisher in the service). Called only from the publish thread."""

    def send(self, result: Result) -> None: ...

    def idle(self) -> None:
        """Called at least every 0.2 s: time-based work such as health messages."""


class Stage:
    """A pipeline thread with a heartbeat, so the watchdog can tell 'alive and responsive' from 'stuck'."""

    def __init__(self, name: str, target: Callable[[Stage], None]):
        self.name = name
        self.last_beat = time.monotonic()
        self.error: str | None = None
        self.finished = False
        self._target = target
        self.thread = threading.Thread(target=self._run, name=f"edge-{name}", daemon=True)

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def _run(self) -> None:
        try:
            self._target(self)
            self.finished = True
        except BaseException as err:  # a crashed stage must be visible to the watchdog and the log
            self.error = f"{type(err).__name__}: {err}"
            log.exception("pipeline stage %s crashed", self.name)

    def problem(self, stall_s: float, resumed_at: float = 0.0) -> str | None:
        """Why this stage is unhealthy, or None. A stage gets a full stall_s after a process-wide pause
        ended at `resumed_at`: it could not have beaten while everything was stopped."""
        if self.error:
            return f"{self.name} crashed ({self.error})"
        if self.finished or self.thread.ident is None:  # done, or not started yet (stages start one by one)
            return None
        if not self.thread.is_alive():
            return f"{self.name} is not running"
        age = time.monotonic() - max(self.last_beat, resumed_at)
        if age > stall_s:
            return f"{self.name} unresponsive for {age:.1f} s"
        return None


class Pipeline:
    """Owns the stage threads (capture, one or more inference workers, publish) and the queues between them."""

    def __init__(self, camera: Camera, engine: InferenceEngine, sink: ResultSink, queue_size: int = 2,
                 drop_when_behind: bool = True, stall_timeout_s: float = 10.0, stats: Stats | None = None,
                 workers: int = 1, trigger: TriggerGate | PresenceGate | None = None):
        self.camera = camera
        self.trigger = trigger  # camera.trigger external/presence: one frame per part is judged
        self.engine = engine
        self.sink = sink
        self.stats = stats or Stats()
        self.stall_timeout_s = stall_timeout_s
        self.frames = FrameQueue(queue_size, drop_oldest=drop_when_behind)
        # Results are never dropped; this bound only makes inference wait if publishing ever stalls. With
        # several workers they leave in the order the frames were taken (sequence numbers rise one by one).
        self.results = InOrder(max(4, queue_size * 2, 2 * workers), producers=workers)
        self._counting = threading.Lock()  # workers update the shared stats
        self.stop_capture = threading.Event()
        self.gate = threading.Event()  # capture starts when set (see publish.wait_for_subscriber_s)
        self.gate.set()
        self.finished = threading.Event()
        inference = [Stage("inference" if workers == 1 else f"inference-{i + 1}", self._infer)
                     for i in range(workers)]
        self.stages = [Stage("capture", self._capture), *inference, Stage("publish", self._publish)]
        self.last_tick: float | None = None  # None: no supervisor ticks (pause detection off)
        self.resumed_at = 0.0

    def tick(self) -> None:
        """Called by the supervising thread every ~0.1 s; a long gap means the whole process was paused."""
        now = time.monotonic()
        if self.last_tick is not None and now - self.last_tick > PAUSE_GAP_S:
            log.warning("the process was paused for %.1f s (SIGSTOP, swapping or a stalled disk); stage "
                        "heartbeats are judged from now on", now - self.last_tick)
            self.resumed_at = now
        self.last_tick = now

    def start(self) -> None:
        for stage in self.stages:
            stage.thread.start()

    def stop(self) -> None:
        """Stop capturing; frames already captured are still inferred and published (see join)."""
        self.stop_capture.set()
        self.gate.set()

    def join(self, timeout: float) -> bool:
        """Wait for the drain; True when every stage has finished.

        A capture stuck inside a blocking camera read (up to camera.read_timeout_s) is cut loose after a
        third of the timeout, so frames already captured are still inferred and published in time.
        """
        deadline = time.monotonic() + timeout
        capture = self.stages[0].thread
        capture.join(timeout / 3.0)
        if capture.is_alive():
            log.warning("capture still blocked in a read; finishing the frames already captured without it")
            self.frames.close()
        for stage in self.stages[1:]:
            stage.thread.join(max(0.0, deadline - time.monotonic()))
        return not any(stage.thread.is_alive() for stage in self.stages[1:])

    def problems(self) -> list[str]:
        """Why the pipeline is not healthy (empty list: every stage alive and responsive).

        Health messages are built on the publish thread, which may run right after a process-wide pause
        before the supervisor has ticked: while the last tick is older than PAUSE_GAP_S, stage ages are
        measured from now, so a pause is never reported as a stall. A supervisor that stays silent for the
        whole stall timeout is reported itself (and it no longer feeds the systemd watchdog anyway).
        """
        now = time.monotonic()
        silent = 0.0 if self.last_tick is None else now - self.last_tick
        resumed_at = now if silent > PAUSE_GAP_S else self.resumed_at
        problems = [p for p in (stage.problem(self.stall_timeout_s, resumed_at) for stage in self.stages) if p]
        if silent > self.stall_timeout_s and self._supervisor_stays_silent():
            problems.append(f"supervisor unresponsive for {silent:.1f} s")
        return problems

    def degraded(self) -> list[str]:
        """Problems that make health not-ok without withholding the systemd watchdog (a restart mends
        neither): model outputs refused or memory lacking on the inference stage, descriptors or memory
        lacking on capture. Each stage goes on meanwhile, giving error results, and the problem clears."""
        return [*self.engine.problems(), *self.camera.problems()]

    def _supervisor_stays_silent(self, grace_s: float = 0.5) -> bool:
        """After a whole-process pause (SIGSTOP) the thread asking may run before the supervisor's next
        0.1 s tick: the silence is the pause, not a hang. Give the supervisor a few ticks to show it is alive
        (seen in CI: one health message right after SIGCONT said "supervisor unresponsive for 2.5 s")."""
        last = self.last_tick
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if self.last_tick != last:
                return False
            time.sleep(0.02)
        return self.last_tick == last

    # -- stages ---------------------------------------------------------------------------------------------

    def _capture(self, stage: Stage) -> None:
        try:
            while not self.gate.is_set():
                stage.beat()
                self.gate.wait(0.2)
            frames: Iterator[Frame] = self.camera.frames(self.stop_capture, stage.beat)
            if self.trigger is not None:
                frames = self.trigger.parts(frames, self.stop_capture, stage.beat)
            dropped = 0
            for frame in frames:
                self.stats.captured += 1
                if self._cut_ahead(dropped):
                    self.engine.prepare(frame)
                dropped = self.frames.put(frame, self.stop_capture, stage.beat)
                if dropped:
                    self.stats.dropped += dropped
                    log.debug("inference behind: dropped %d frame(s), %d in total", dropped, self.stats.dropped)
                stage.beat()
        finally:
            self.frames.close()

    def _cut_ahead(self, dropped_before: int) -> bool:
        """Whether the capture stage should cut this frame's tiles now, beside the running inference.

        Lossless (wait): always, every frame is inferred. Live (drop oldest): only while the model keeps up,
        that is no frame waits and the previous one was queued without a drop. A camera outpacing the model
        makes drops, and the frames it sends then are mostly dropped in turn: cutting them would only take
        CPU from inference (with "queue empty" alone, 6 of 7 frames cut ahead in such a run were dropped).
        The inference stage cuts any frame that arrives without tiles itself.
        """
        return not self.frames.drop_oldest or (dropped_before == 0 and len(self.frames) == 0)

    def _infer(self, stage: Stage) -> None:
        """One inference worker (model.workers of them share the frame queue)."""
        last_error: str | None = None
        try:
            while True:
                stage.beat()
                try:
                    taken = self.frames.take(0.2)
                except QueueClosed:
                    return
                if taken is None:
                    continue
                ticket, frame = taken
                result = self.engine.process(frame, sequence=ticket + 1)
                stage.beat()
                last_error = self._count(result, last_error)
                self.results.put(ticket, result, stage.beat)
        finally:
            self.results.close()

    def _count(self, result: Result, last_error: str | None) -> str | None:
        """Add a result to the stats; log error results (a bad ROI fails every frame: each new reason, then
        every 100th repeat). Returns the error last logged by this worker."""
        if result.frame.part_step is not None:  # one frame of several of a part: counted per part when merged
            return last_error
        with self._counting:
            stats = self.stats
            stats.processed += 1
            stats.last_sequence = max(stats.last_sequence, result.sequence)
            if result.verdict == "fail":
                stats.fails += 1
            elif result.verdict == "pass":
                stats.passes += 1
            elif result.verdict == "review":
                stats.reviews += 1
            else:
                stats.errors += 1
                if result.error != last_error or stats.errors % 100 == 1:
                    # escaped: the error may name a file whose name holds a newline and a forged log line
                    log.warning("frame %d (sequence %d): %s (%d error results so far)", result.frame.index,
                                result.sequence, shown(result.error or ""), stats.errors)
                return result.error
        return last_error

    def _publish(self, stage: Stage) -> None:
        try:
            while True:
                stage.beat()
                self._idle()
                try:
                    result = self.results.get(0.2)
                except QueueClosed:
                    return
                if result is None:
                    continue
                try:
                    self.sink.send(result)
                    if result.frame.part_step != "more":  # a part's earlier frames are merged, not sent
                        self.stats.record_published(result)
                except Exception:  # keep publishing later results; this one is logged with its sequence
                    self.stats.publish_errors += 1
                    log.exception("could not publish result sequence %d", result.sequence)
        finally:
            self._finish()

    def _idle(self) -> None:
        """The sink's timed work (health). A shortage or I/O failure there (EMFILE, ENOMEM, a ZeroMQ error
        carrying one) is counted and logged, never the end of publishing; anything else is a bug and
        crashes the stage, for the watchdog to see."""
        try:
            self.sink.idle()
        except Exception as err:
            if not (isinstance(err, OSError) or is_shortage(err)):
                raise
            self.stats.publish_errors += 1
            if self.stats.publish_errors % 100 == 1:
                log.warning("publishing health failed (%s: %s); %d publish errors so far", type(err).__name__, err,
                            self.stats.publish_errors)

    def _finish(self) -> None:
        finish = getattr(self.sink, "finish", None)
        if finish is not None:
            try:
                finish()  # the run's last message, from the thread that owns the socket
            except Exception:
                log.exception("could not send the final message")
        self.finished.set()
