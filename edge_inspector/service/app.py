"""The edge service: config -> model -> camera -> pipeline -> ZeroMQ, supervised for systemd.

Start-up order is chosen so systemd's READY=1 means "this service can judge parts": sockets are bound
first (a port clash fails in the first second, exit 2), then the bundle is loaded, verified, checked
against the tiling grid and warmed up with one inference, then READY. The camera is *not* awaited: a
camera that is unplugged at boot is reported in STATUS= and in health messages while the service waits
for it, since a service stuck in "activating" would hide the problem from the line's monitoring.

The main thread supervises: WATCHDOG=1 only while every stage is alive and responsive, exit 1 if a stage
crashed (systemd restarts it), and on SIGTERM: stop capturing, drain what was captured, close, exit 0.

Exit codes mean what the unit assumes: 2 (`RestartPreventExitStatus=2`) only for a config or bundle the
user must fix (unreadable ones included); 1 for everything a restart may clear (a crashed stage, a GPU out
of memory, a failed engine build). Worst case from a real stage hang to a restart by systemd:
`pipeline.stall_timeout_s` (the hang is noticed) + `WatchdogSec` (the last ping ages out) + `RestartSec`,
20 + 30 + 3 = 53 s with the shipped defaults.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
import zmq

from edge_inspector.backends import Backend, BackendRuntimeError, create_backend
from edge_inspector.core.bundle import Bundle
from edge_inspector.core.decision import (
    DecisionParams,
    check_in_range,
    check_review_threshold,
    resolve_review,
    threshold_range,
    validate_threshold,
)
from edge_inspector.core.errors import ConfigError
from edge_inspector.core.inspect import Inspector, Model, probe_backend
from edge_inspector.core.signing import TrustPolicy
from edge_inspector.core.systemd import Notifier, extending_start
from edge_inspector.core.tiling import Tiler
from edge_inspector.service.archive import Archive
from edge_inspector.service.config import (
    ServiceConfig,
    bundle_root,
    config_to_dict,
    load_config,
    trust_policy,
)
from edge_inspector.service.control import ControlServer
from edge_inspector.service.outputs.fanout import OutputFanOut
from edge_inspector.service.pipeline import InferenceEngine, Pipeline, Stats
from edge_inspector.service.probes import ProbeReport, probe_config
from edge_inspector.service.publisher import Publisher
from edge_inspector.service.sources import Camera, create_source
from edge_inspector.service.triggers import (
    PartCounter,
    PartMerger,
    PresenceGate,
    PresenceSettings,
    TriggerGate,
    counter_file,
    parse_trigger,
)

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 8.0  # systemd's default stop timeout is 90 s; we aim to be done in a few


def check_tiling(config: ServiceConfig, bundle: Bundle) -> None:
    """A per-tile bundle only works with its own grid; a shared one works with any, but say so."""
    trained = bundle.meta.tiling
    rows, cols = config.tiling.rows, config.tiling.cols
    if (trained.rows, trained.cols) == (rows, cols):
        return
    if trained.mode == "per_tile":
        raise config.error("tiling", f"grid {rows}x{cols} does not match the bundle {bundle.path}, fit per tile "
                           f"on a {trained.rows}x{trained.cols} grid (set tiling.rows/cols to match or refit)")
    seen = (str(bundle.path), bundle.meta_sha256, rows, cols)
    if seen in _TILING_WARNED:  # once per bundle and grid: a reload of the same bundle says nothing new
        return
    _TILING_WARNED.add(seen)
    log.warning("tiling %dx%d differs from the %dx%d grid bundle %s was fit on; its shared statistics still "
                "apply, but tiles now show parts at another scale than in training", rows, cols, trained.rows,
                trained.cols, bundle.path)


_TILING_WARNED: set[tuple[str, str, int, int]] = set()


def checked_tiler(config: ServiceConfig, bundle: Bundle) -> Tiler:
    """The config's tiling, checked against the grid the bundle was fit on."""
    check_tiling(config, bundle)
    tiling = config.tiling
    return Tiler(tiling.rows, tiling.cols, bundle.input_size, tile_size=tiling.tile_size, stride=tiling.stride,
                 roi=tiling.roi)


def load_model(config: ServiceConfig, bundle_path: Path | None = None, trust: TrustPolicy | None = None,
               within: Path | None = None) -> Model:
    """Load, verify, check and warm up a bundle; the first real frame then runs at full speed.

    trust: the signature rule (security.trusted_keys); within: the folder the bundle must lie under."""
    bundle = Bundle.load(bundle_path or config.bundle_path, trust=trust, within=within)
    if trust is not None and bundle.signature is not None:
        log.info("bundle %s: signed by key %s", bundle.path, bundle.signature.key_id)
    elif trust is not None:
        log.warning("bundle %s is unsigned (taken: security.require_signed_bundles is off)", bundle.path)
    tiler = checked_tiler(config, bundle)
    bundle_range(config, bundle)  # a config threshold outside the new bundle's range is refused up front
    started = time.monotonic()

    def warm_up(backend: Backend) -> None:  # the probe: outputs checked against the contract (core/inspect.py)
        probe_backend(backend, bundle, tiler.tiles)

    backend = create_backend(bundle, config.model.backend, config.model.threads, warm_up=warm_up,
                             tiles=tiler.tiles)
    bundle.release()  # verified bytes no backend took (a TensorRT engine ran instead of model.onnx)
    log.info("model %s loaded (%s, threshold %.4g), start and warm-up inference of %d tile(s) took %.0f ms",
             bundle.model_id, backend.describe(), bundle.threshold, tiler.tiles,
             (time.monotonic() - started) * 1000)
    return Model(bundle=bundle, backend=backend, tiler=tiler)


def oversubscribed(workers: int, threads: int | None, cores: int) -> str | None:
    """Why several CPU inference workers would fight over the cores, or None. Each worker's ONNX Runtime
    session uses `threads` threads (null: one per core), so workers x threads above the cores only adds
    switching (measured gain on 2 cores came from 2 workers x 1 thread)."""
    if workers <= 1:
        return None
    per_worker = threads or cores
    if workers * per_worker <= cores:
        return None
    return (f"model.workers {workers} x model.threads {threads if threads else f'null (= {cores})'} asks for "
            f"{workers * per_worker} inference threads on {cores} cores; set model.threads to "
            f"{max(1, cores // workers)}")


def bundle_range(config: ServiceConfig, bundle: Bundle) -> tuple[float, float]:
    """The thresholds allowed with this bundle; a config threshold outside it is a ConfigError."""
    stats = bundle.meta.score_stats
    decision = config.decision
    bounds = threshold_range(bundle.threshold, stats.p50 if stats else None, stats.max if stats else None,
                             decision.threshold_min, decision.threshold_max)
    try:
        if decision.threshold is not None:
            check_in_range(decision.threshold, bounds, "decision.threshold")
        resolve_review(decision.review_threshold, bundle.review_threshold, decision.threshold or bundle.threshold)
    except ConfigError as err:
        raise ConfigError(f"{config.path}: {err} with bundle {bundle.path}") from None
    return bounds


class Service:
    """One camera's inspection service."""

    def __init__(self, config: ServiceConfig, notifier: Notifier | None = None):
        self.config = config
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self.stats = Stats()
        self.context: zmq.Context | None = None
        self.publisher: Publisher | None = None
        self.control: ControlServer | None = None
        self.pipeline: Pipeline | None = None
        self.inspector: Inspector | None = None
        self.camera: Camera | None = None
        self.archive: Archive | None = None
        self.outputs: OutputFanOut | None = None  # ZeroMQ first, then MQTT / OPC UA (service/outputs/)
        self.curve: Any = None  # keys.CurveServer when security.curve_secret_key is set
        self.ready = threading.Event()
        self.threshold_source = "bundle"
        self.threshold_bounds: tuple[float, float] = (0.0, float("inf"))
        self.trust: TrustPolicy | None = None  # security.trusted_keys, read once at start
        self._reload_lock = threading.Lock()
        camera = config.camera  # camera.trigger external: parts come from triggers (service/triggers.py)
        counter = PartCounter(counter_file(config.resolve(camera.part_counter_file) if camera.part_counter_file
                                           else None, os.environ.get("STATE_DIRECTORY", "").split(":")[0],
                                           camera.id)) if camera.trigger != "free_run" else None
        self.trigger = (TriggerGate(camera.trigger_timeout_ms, camera.trigger_queue, camera.id, counter)
                        if camera.trigger == "external" else None)
        self.presence = PresenceGate(PresenceSettings(
            camera.presence_roi, camera.presence_threshold, camera.presence_min_area, camera.presence_frames_on,
            camera.presence_frames_off, camera.presence_max_s, camera.presence_background_frames,
            camera.presence_judge, camera.presence_max_frames), camera.id, counter) if (
            camera.trigger == "presence") else None
        self.merger: PartMerger | None = None  # presence_judge worst

    # -- start-up ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind, load, warm up and start the threads; afterwards the service is READY."""
        config = self.config
        self.context = zmq.Context()
        try:
            self._start(config)
        except BaseException:
            if self.archive:
                self.archive.close()
            self._close_sockets()
            raise

    def _start_curve(self, config: ServiceConfig) -> None:
        security = config.security
        if not security.curve_secret_key:
            return
        from edge_inspector.core.keys import CurveServer

        assert self.context is not None  # created by start() before anything binds
        self.curve = CurveServer(self.context, config.resolve(security.curve_secret_key),
                                 config.resolve(security.result_clients) if security.result_clients else None,
                                 config.resolve(security.control_clients) if security.control_clients else None)

    def _start(self, config: ServiceConfig) -> None:
        source = create_source(config.camera)  # config-level problems (kind, GStreamer) before any binding
        self.archive = (Archive(config.archive_path, config.archive, config.publish.heatmap_full_scale)
                        if config.archive.enabled else None)
        self._start_curve(config)
        self.publisher = Publisher(config.publish, config.camera.id, self.health, archive=self.archive,
                                   context=self.context, curve=self.curve)
        self.outputs = OutputFanOut.build(config, self.publisher,  # binds/connects like the sockets: first
                                          trigger=self.trigger.trigger if self.trigger else None)
        if config.publish.control_endpoint:
            self.control = ControlServer(config.publish.control_endpoint, self._handlers(), context=self.context,
                                         curve=self.curve, slow=("reload",))
        self.trust = trust_policy(config)
        if self.trust is not None:
            log.info("bundles: %s", self.trust.describe())
        with extending_start(self.notifier, "loading the model (a TensorRT engine build takes minutes)"):
            model = load_model(config, trust=self.trust)
        if config.model.workers > 1 and not model.backend.thread_safe:
            log.warning("model.workers %d: %s is not thread-safe, so frames enter it one at a time (the workers "
                        "overlap only the steps around inference)", config.model.workers, model.backend.describe())
        crowded = oversubscribed(config.model.workers, config.model.threads, os.cpu_count() or 1)
        if crowded and model.backend.runs_on_cpu_cores:
            log.warning(crowded)
        self.threshold_bounds = bundle_range(config, model.bundle)
        self.threshold_source = "config" if config.decision.threshold is not None else "bundle"
        self.inspector = Inspector(model, self._decision_params(model.bundle))
        self.camera = Camera(source, config.camera, on_event=self._on_camera_event)
        when_behind = config.pipeline.when_behind
        if when_behind == "auto":
            unpaced_media = source.kind in ("file", "folder") and not config.camera.fps
            parts_only = self.trigger or self.presence  # each frame that reaches the queue is a part
            when_behind = "wait" if unpaced_media or parts_only else "drop"
        engine = InferenceEngine(self.inspector, config.publish.heatmap_scale,
                                 picture_of_frame=config.publish.heatmap == "jpeg_overlay")
        sink: Any = self.outputs
        if self.presence is not None and config.camera.presence_judge == "worst":
            sink = self.merger = PartMerger(self.outputs, self.stats)  # one result per part, its worst frame
        self.pipeline = Pipeline(self.camera, engine, sink, queue_size=config.pipeline.queue_size,
                                 drop_when_behind=when_behind == "drop",
                                 stall_timeout_s=config.pipeline.stall_timeout_s, stats=self.stats,
                                 workers=config.model.workers, trigger=self.trigger or self.presence)
        if config.publish.wait_for_subscriber_s > 0:
            self.pipeline.gate.clear()
        log.info("camera %s: %s; %s; when behind: %s; %d inference worker(s); results on %s%s%s",
                 config.camera.id, source.describe(), model.tiler.describe(), when_behind, config.model.workers,
                 self.publisher.endpoint,
                 f", control on {self.control.endpoint}" if self.control else "",
                 "" if self.curve else " (no CURVE: anyone who reaches these endpoints is served)")
        if self.control:  # first: the pipeline's first health message must not find it "not running"
            self.control.start()
        self.pipeline.start()
        self.outputs.open_inputs()  # MQTT triggers, like the control socket's, once frames flow
        self.ready.set()
        self.notifier.ready(self.status_line())

    def _decision_params(self, bundle: Bundle, threshold: float | None = None) -> DecisionParams:
        decision = self.config.decision
        value = threshold or decision.threshold or bundle.threshold
        return DecisionParams(threshold=value, min_defect_area=decision.min_defect_area, max_boxes=decision.max_boxes,
                              review_threshold=resolve_review(decision.review_threshold, bundle.review_threshold,
                                                              value))

    # -- supervision -------------------------------------------------------------------------------------------

    def run(self, install_signals: bool = True) -> int:
        """Start, supervise until SIGTERM/SIGINT (or a finite source ends), drain and stop. Returns the exit code."""
        if install_signals:
            signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
            signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        self.start()
        code = self.supervise()
        self.shutdown()
        return code

    def supervise(self) -> int:
        assert self.pipeline is not None and self.publisher is not None
        ping_every = self.notifier.ping_interval_s
        next_ping = time.monotonic()
        next_status = time.monotonic() + 2.0
        hold_until = time.monotonic() + self.config.publish.wait_for_subscriber_s
        withheld = False
        while not self.stop_event.wait(0.1):
            self.pipeline.tick()
            now = time.monotonic()
            if not self.pipeline.gate.is_set() and (self.publisher.subscribed.is_set() or now >= hold_until):
                self.pipeline.gate.set()
            problems = self.problems()
            if any(stage.error for stage in self.pipeline.stages):  # checked first: a crash also ends the stream
                log.critical("stopping: %s", "; ".join(problems))
                self.notifier.status(f"failed: {'; '.join(problems)}")
                return 1
            if self.pipeline.finished.is_set():
                log.info("stream ended after %d frame(s); stopping", self.stats.processed)
                break
            if ping_every and now >= next_ping:
                if not problems:
                    self.notifier.watchdog()
                    next_ping = now + ping_every
                elif not withheld:  # logged once per streak; the ping goes out on the first tick it clears
                    log.error("withholding watchdog: %s", "; ".join(problems))
                withheld = bool(problems)
            if now >= next_status:
                self.notifier.status(self.status_line())
                next_status = now + 2.0
        return 0

    def problems(self) -> list[str]:
        problems = self.pipeline.problems() if self.pipeline else []  # not started yet: starting is no problem
        control = self.control
        if control and control.thread.ident is not None and not control.thread.is_alive() and (
                not control.stop_event.is_set()):
            problems.append("control socket thread is not running")
        return problems

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self) -> None:
        """Stop capturing, publish every frame already captured, close sockets."""
        self.notifier.stopping("stopping: finishing frames in flight")
        if self.pipeline:
            self.pipeline.stop()
            if not self.pipeline.join(DRAIN_TIMEOUT_S):
                log.error("pipeline did not drain within %.0f s", DRAIN_TIMEOUT_S)
            log.info("stopped: %d captured, %d processed (%d fail, %d error), %d published, %d dropped",
                     self.stats.captured, self.stats.processed, self.stats.fails, self.stats.errors,
                     self.stats.published, self.stats.dropped)
        if self.archive:
            self.archive.close()
        self._close_sockets()
        if self.inspector:
            self.inspector.close()
        self.notifier.close()

    def _close_sockets(self) -> None:
        """Close what start opened. The final `stopped` health message is the publish thread's own last
        send (Publisher.finish), so nothing is published after it."""
        if self.outputs:
            self.outputs.close()
        if self.control:
            self.control.stop()
        publish_alive = self.pipeline is not None and self.pipeline.stages[2].thread.is_alive()
        if self.publisher and not publish_alive:  # the socket belongs to the publish thread while it runs
            self.publisher.close()
        if self.curve is not None:
            self.curve.close()
            self.curve = None
        if self.context:
            self.context.term() if not publish_alive else self.context.destroy(linger=0)
            self.context = None

    # -- reporting ---------------------------------------------------------------------------------------------

    def _on_camera_event(self, kind: str, message: str) -> None:
        """Called on the capture thread: nothing here may take capture down. Building the snapshot can fail
        under the very shortage the event reports (an import or a file the build needs, seen in CI under 300
        idle connections at a 256-descriptor limit): the event is then reported from the publish thread."""
        if self.publisher:
            try:
                snapshot: dict[str, Any] | None = self.health()
            except Exception as err:  # noqa: BLE001 (logged, and health is still requested)
                log.warning("camera %s: health snapshot failed (%s); health follows from the publish thread",
                            kind, err)
                snapshot = None
            self.publisher.request_health(snapshot)
        if self.ready.is_set():
            self.notifier.status(self.status_line())

    def status_line(self) -> str:
        camera = self.camera
        if camera is None:
            return "starting"
        stats = self.stats
        counts = (f"{stats.fps():.1f} fps, {stats.processed} frames, {stats.fails} fail, {stats.errors} error, "
                  f"{stats.dropped} dropped, {camera.reconnects} reconnects")
        if camera.state == "waiting":
            return f"{self.config.camera.id}: waiting for camera ({camera.last_error}); {counts}"
        if self.pipeline is not None and not self.pipeline.gate.is_set():
            return f"{self.config.camera.id}: waiting for a subscriber"
        return f"{self.config.camera.id}: {camera.state}; {counts}"

    def health(self) -> dict[str, Any]:
        """Payload of health.<camera_id> (docs/wire-format.md)."""
        stats = self.stats.snapshot()
        camera = self.camera.snapshot() if self.camera else {}
        problems = self.problems() + (self.pipeline.degraded() if self.pipeline else [])
        model = self.inspector.model if self.inspector else None
        return {
            "state": camera.get("state", "starting"),
            "ok": not problems,
            "problems": problems,
            "fps": stats["fps"],
            "captured": stats["captured"],
            "processed": stats["processed"],
            "dropped": stats["dropped"],
            "fails": stats["fails"],
            "reviews": stats["reviews"],
            "errors": stats["errors"],
            "reconnects": camera.get("reconnects", 0),
            "disconnects": camera.get("disconnects", 0),
            "last_error": camera.get("last_error", ""),
            "latency_ms": stats["latency_ms"],
            "inference_ms": stats["inference_ms"],
            "last_sequence": stats["last_sequence"],
            "uptime_s": stats["uptime_s"],
            "model": {"id": model.model_id, "sha256": model.sha256, "meta_sha256": model.bundle.meta_sha256}
            if model else None,
            "threshold": self.inspector.params.threshold if self.inspector else None,
            "review_threshold": self.inspector.params.review_threshold if self.inspector else None,
            "threshold_source": self.threshold_source,
            "threshold_certified": self._threshold_certified(),
            "unreadable_images": camera.get("unreadable_images", 0),
            "archive": self.archive.snapshot() if self.archive else None,
            "trigger": self.config.camera.trigger,
            "frames_skipped": self.trigger.frames_skipped if self.trigger else (
                self.presence.frames_skipped if self.presence else 0),
            "triggers": self.trigger.snapshot() if self.trigger else None,
            "presence": {**self.presence.snapshot(), "frames_judged": self.merger.frames_judged if self.merger else
                         self.presence.parts_found} if self.presence else None,
            "outputs": self.outputs.snapshot() if self.outputs else {},
        }

    # -- control socket ------------------------------------------------------------------------------------------

    def _handlers(self):
        return {"status": self._cmd_status, "stats": self._cmd_stats, "set_threshold": self._cmd_set_threshold,
                "reload": self._cmd_reload, "trigger": self._cmd_trigger}

    def _cmd_trigger(self, request: dict[str, Any]) -> dict[str, Any]:
        """One part at the camera: the next frame (after delay_ms) is its image (camera.trigger external)."""
        if self.trigger is None:
            raise ConfigError(f"trigger: camera.trigger is {self.config.camera.trigger}, not external (every frame "
                              "is judged)")
        part_id, delay_ms = parse_trigger(request)
        return self.trigger.trigger(part_id, delay_ms)

    def _running(self) -> tuple[Inspector, Camera]:
        """The inspector and camera the control commands act on (both exist before control starts)."""
        if self.inspector is None or self.camera is None:
            raise ConfigError("the service is still starting; try again in a moment")
        return self.inspector, self.camera

    def _cmd_status(self, _request: dict[str, Any]) -> dict[str, Any]:
        inspector, camera = self._running()
        model, params = inspector.settings()
        problems = self.problems() + (self.pipeline.degraded() if self.pipeline else [])
        return {"camera_id": self.config.camera.id, "status": self.status_line(), "problems": problems,
                "camera": camera.snapshot(), "model": {"id": model.model_id, "sha256": model.sha256,
                                                            "path": str(model.bundle.path),
                                                            "backend": model.backend.describe()},
                "threshold": params.threshold, "bundle_threshold": model.bundle.threshold,
                "threshold_range": list(self.threshold_bounds), "threshold_source": self.threshold_source,
                "threshold_certified": self._threshold_certified(),
                "review_threshold": params.review_threshold, "bundle_review_threshold": model.bundle.review_threshold,
                "min_defect_area": params.min_defect_area, "tiling": model.tiler.describe(),
                "config": {"path": self.config.path, **config_to_dict(self.config)}}

    def _cmd_stats(self, _request: dict[str, Any]) -> dict[str, Any]:
        _, camera = self._running()
        return {"stats": self.stats.snapshot(), "camera": camera.snapshot(),
                "archive": self.archive.snapshot() if self.archive else None,
                "triggers": self.trigger.snapshot() if self.trigger else None}

    def _cmd_set_threshold(self, request: dict[str, Any]) -> dict[str, Any]:
        """Move the threshold within the allowed range; every change is logged and announced in health."""
        inspector, _ = self._running()
        value = request.get("value")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise ConfigError(f"threshold: expected a finite number > 0, got {shown}")
        value = check_in_range(validate_threshold(value), self.threshold_bounds)
        previous, review = inspector.params.threshold, self._review_for(request, value, inspector.params)
        inspector.set_thresholds(value, review)
        self.threshold_source = f"control socket ({request.get('_peer') or 'unknown peer'})"
        # WARNING, not INFO: a moved threshold changes verdicts, so it must stand out in the journal.
        log.warning("threshold changed: %.6g -> %.6g by the %s (bundle %s, allowed %.6g..%.6g)", previous, value,
                    self.threshold_source, inspector.model.model_id, *self.threshold_bounds)
        if self.publisher:
            self.publisher.request_health()  # subscribers see the new threshold at once, not 5 s later
        return {"threshold": value, "previous": previous, "threshold_range": list(self.threshold_bounds),
                "review_threshold": review}

    def _threshold_certified(self) -> bool:
        """True only while the bundle's own threshold is in use and it is a certified conformal one: a threshold
        chosen on labelled images, or moved by config or the control socket, guarantees no false-reject rate."""
        inspector = self.inspector
        return bool(inspector is not None and self.threshold_source == "bundle"
                    and inspector.model.bundle.meta.threshold.guarantees_false_reject_rate
                    and inspector.params.threshold == inspector.model.bundle.threshold)

    @staticmethod
    def _review_for(request: dict[str, Any], threshold: float, params: DecisionParams) -> float | None:
        """set_threshold and the review band: `review_threshold` in the request sets the band's pass threshold
        too (null or "off": no band); without it the band keeps its pass threshold, and a threshold at or under
        it is refused (the band is never dropped or moved as a side effect)."""
        if "review_threshold" not in request:
            current = params.review_threshold
            if current is not None and not current < threshold:
                raise ConfigError(f"threshold: {threshold:.6g} is at or under the review band's pass threshold "
                                  f"{current:.6g}: send review_threshold too (a number below the threshold, or null "
                                  "to turn the band off)")
            return current
        review = request["review_threshold"]
        if review is None or review == "off":
            return None
        if isinstance(review, str):
            try:
                review = float(review)
            except ValueError:
                pass
        if isinstance(review, bool) or not isinstance(review, (int, float)):
            raise ConfigError(f"review_threshold: expected a finite number > 0 or null, got {str(review)[:40]!r}")
        return check_review_threshold(review, threshold)

    def _cmd_reload(self, request: dict[str, Any]) -> dict[str, Any]:
        """Load a bundle (default: the configured folder again) and swap it in between two frames.

        Runs on its own thread (ControlServer `slow`). A folder named in the request resolves against the
        config file's folder (never the working directory) and must lie under security.bundle_root; the
        bundle must pass the signature rule the service started with."""
        path = request.get("bundle", request.get("value"))
        if path is not None and not isinstance(path, str):
            raise ConfigError(f"reload: bundle must be a folder path string, got {type(path).__name__}")
        inspector, _ = self._running()
        with self._reload_lock:
            chosen = self.config.resolve(path).absolute() if path else None
            model = load_model(self.config, chosen, trust=self.trust,
                               within=bundle_root(self.config) if chosen is not None else None)
            if self.stop_event.is_set():  # stopping meanwhile: the old model finishes the frames in flight
                model.backend.close()
                raise ConfigError("reload: the service is stopping")
            return self._swap(inspector, model, request)

    def _swap(self, inspector: Inspector, model: Model, request: dict[str, Any]) -> dict[str, Any]:
        previous = inspector.model.model_id
        bounds = bundle_range(self.config, model.bundle)
        kept, threshold_note = self._threshold_after_reload(inspector.params.threshold, bounds)
        params = self._decision_params(model.bundle, kept)
        self.threshold_bounds = bounds
        if kept is None:
            self.threshold_source = "config" if self.config.decision.threshold is not None else "bundle"
        inspector.swap(model, params)
        log.warning("reload by the control socket (%s): %s -> %s (threshold %.6g: %s)", request.get("_peer") or
                    "unknown", previous, model.model_id, params.threshold, threshold_note)
        if self.publisher:
            self.publisher.request_health()
        return {"model_id": model.model_id, "previous": previous, "threshold": params.threshold,
                "signed_by": model.bundle.signature.key_id if model.bundle.signature else None,
                "threshold_source": self.threshold_source, "threshold_note": threshold_note}

    def _threshold_after_reload(self, current: float, bounds: tuple[float, float]) -> tuple[float | None, str]:
        """An operator's threshold (set by set_threshold) survives a reload only inside the new bundle's range:
        outside it the value means nothing for the new model's scores. Returns (value to keep or None, why)."""
        fallback = "decision.threshold from the config" if self.config.decision.threshold else "the bundle's own"
        if not self.threshold_source.startswith("control socket"):
            return None, f"{fallback} threshold"
        low, high = bounds
        if low <= current <= high:
            return current, (f"kept the threshold set by the {self.threshold_source}, inside the new bundle's range "
                             f"{low:.6g}..{high:.6g}")
        return None, (f"the threshold {current:.6g} set by the {self.threshold_source} is outside the new bundle's "
                      f"range {low:.6g}..{high:.6g}, so {fallback} threshold applies")


# -- CLI ---------------------------------------------------------------------------------------------------------


def config_argument(argument: str | None, option: str | None) -> str:
    """`FILE` or `--config FILE`: both commands take both forms (the docs use either)."""
    if argument and option and argument != option:
        raise ConfigError(f"two configs given ({argument} and --config {option}); give one")
    if not (argument or option):
        raise ConfigError("no config given (FILE or --config FILE)")
    return argument or option  # type: ignore[return-value]


@click.command("run")
@click.argument("config_file", metavar="[FILE]", required=False)
@click.option("--config", "config_path", help="Service config YAML (see configs/); the same as FILE.")
def run_command(config_file: str | None, config_path: str | None) -> None:
    """Run the inspection service on one camera (systemd-aware; SIGTERM drains and exits 0).

    Exit status: 0 after SIGTERM or the end of a finite source; 2 for a config or bundle to fix (systemd
    does not restart); 1 for anything a restart may clear (crashed stage, GPU out of memory).
    """
    config = load_config(config_argument(config_file, config_path))
    root = logging.getLogger()
    if root.level > logging.DEBUG:  # -v on the command line wins over the config
        root.setLevel(config.logging.level)
    try:
        code = Service(config).run()
    except BackendRuntimeError as err:
        log.critical("cannot start the model, a restart may help: %s", err)
        click.echo(f"error: {err} (restartable)", err=True)
        code = 1
    sys.exit(code)


@click.command("check-config")
@click.argument("config_file", metavar="[FILE]", required=False)
@click.option("--config", "config_path", help="The same as FILE.")
@click.option("--skip-bundle", is_flag=True, help="Validate the YAML only, not the model bundle it names.")
@click.option("--no-probe", is_flag=True, help="Do not open the source or bind the ports (service/probes.py).")
def check_config_command(config_file: str | None, config_path: str | None, skip_bundle: bool,
                         no_probe: bool) -> None:
    """Validate a service config (and its bundle), then try its source and ports without starting anything.

    Exit status 2 when the service could not work as configured (a probe's `error:` lines say why)."""
    config_path = config_argument(config_file, config_path)
    config = load_config(config_path)
    source = create_source(config.camera)
    line = f"{config_path}: OK (camera {config.camera.id}: {source.describe()}"
    if not skip_bundle:
        bundle = Bundle.load(config.bundle_path, trust=trust_policy(config))
        tiler = checked_tiler(config, bundle)
        low, high = bundle_range(config, bundle)
        # The graph is run once on a mid-grey probe (CPU): a misshapen or NaN map is refused here too.
        create_backend(bundle, "onnxruntime", threads=1, warm_up=lambda b: probe_backend(b, bundle, tiler.tiles),
                       tiles=tiler.tiles).close()
        threshold = config.decision.threshold or bundle.threshold
        review = resolve_review(config.decision.review_threshold, bundle.review_threshold, threshold)
        line += (f"; {tiler.describe()}; model {bundle.model_id}, threshold {threshold:.6g} "
                 + (f"with a review band over {review:.6g} " if review is not None else "")
                 + f"(allowed {low:.6g}..{high:.6g})")
        if bundle.signature is not None:
            line += f"; signed by key {bundle.signature.key_id}"
    if config.security.curve_secret_key:
        from edge_inspector.core.keys import load_client_keys, load_secret_key

        load_secret_key(config.resolve(config.security.curve_secret_key), "security.curve_secret_key")
        for key in ("result_clients", "control_clients"):
            folder = getattr(config.security, key)
            if folder:
                load_client_keys(config.resolve(folder), f"security.{key}")
        line += "; CURVE on"
    report_probes(config_path, line + ")", None if no_probe else probe_config(config, source))


def report_probes(config_path: str, ok_line: str, report: ProbeReport | None) -> None:
    """The OK line and what each probe found; probe errors go to stderr and exit 2, with no OK line."""
    if report is None:
        click.echo(ok_line)
        return
    if report.errors:
        for line in report.lines():
            click.echo(line)
        for error in report.errors:
            click.echo(f"error: {config_path}: {error}", err=True)
        sys.exit(2)
    click.echo(ok_line)
    for line in report.lines():
        click.echo(line)
