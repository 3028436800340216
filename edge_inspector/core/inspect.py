"""One path from a frame to a verdict: tile, infer, stitch, decide.

The service's inference thread, `edge-inspector replay` and `edge-export fit --validation` all judge
images through `Inspector.inspect`, so one image gets one verdict everywhere (replay once ignored
`min_defect_area` and disagreed with the line on exactly the images an engineer asks about). An
`Inspection` carries every parameter it was decided with (model, threshold, min_defect_area), so a result
header never mixes the parameters of two moments.

Settings change under a lock and only between two frames: `set_threshold` and `swap` (reload) both
replace the current settings, so a threshold set right after a reload applies to the new model instead of
being overwritten when the reload takes effect. A frame in progress keeps the settings it started with.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from edge_inspector.core.bundle import Bundle
from edge_inspector.core.decision import Decision, DecisionParams, decide
from edge_inspector.core.errors import BundleError, InspectorError
from edge_inspector.core.tiling import Box, Tiler

MapScale = float | Literal["auto"]  # "auto": the detail the model's map holds (Tiler.detail_scale)

if TYPE_CHECKING:  # backends build on core; core only needs the interface's name for its type hints
    from edge_inspector.backends.base import Backend, InferenceResult

log = logging.getLogger(__name__)


class ModelOutputError(InspectorError):
    """The backend answered outside the bundle contract: a map or score that is not finite, or of the wrong
    shape or type. Never decided on: NaN compares false with every threshold, so a NaN score once gave
    `verdict: pass` (score null, health ok) on a defect image."""


PROBE_GREY = 128  # the probe's pixel value: a plain mid-grey part, which any fitted model scores finitely


def check_output(output: InferenceResult, tiles: int, input_size: tuple[int, int]) -> None:
    """Raise ModelOutputError unless `output` is what the contract promises for `tiles` tiles: maps float
    (tiles, H, W) at the bundle's input size, scores (tiles,), every value finite.

    Runs on every frame, so finiteness is one float64 sum per output (a sum is finite exactly when every
    float32 term is: float64 cannot overflow on them); only a bad sum pays for finding the tile. Measured
    0.23 ms for 4 tiles of 256x256 on the loaded 2-core VM.
    """
    maps, scores = np.asarray(output.anomaly_maps), np.asarray(output.scores)
    height, width = input_size
    if maps.shape != (tiles, height, width):
        raise ModelOutputError(f"anomaly_map has shape {list(maps.shape)}, expected [{tiles}, {height}, {width}] "
                               "(tiles, the bundle's input height and width)")
    if scores.shape != (tiles,):
        raise ModelOutputError(f"score has shape {list(scores.shape)}, expected [{tiles}] (one per tile)")
    for name, values in (("score", scores), ("anomaly_map", maps)):
        if values.dtype.kind != "f":
            raise ModelOutputError(f"{name} is {values.dtype}, expected float32")
        if not np.isfinite(np.sum(values, dtype=np.float64)):
            bad = [i for i in range(tiles) if not np.isfinite(values[i]).all()]
            raise ModelOutputError(f"{name} not finite (NaN or infinity) on tile(s) {bad}")


def probe_backend(backend: Backend, bundle: Bundle, tiles: int) -> None:
    """At load and reload: one batch of mid-grey tiles through the new backend, checked against the
    contract (check_output), so a graph whose map has another rank or size, or that answers NaN, is
    refused before it judges a part; doubles as the warm-up inference."""
    probe = np.full((tiles, *bundle.input_size, 3), PROBE_GREY, np.uint8)
    try:
        check_output(backend.infer(probe), tiles, bundle.input_size)
    except ModelOutputError as err:
        raise BundleError(f"{bundle.onnx_path}: refused: on a mid-grey {bundle.input_size[1]}x"
                          f"{bundle.input_size[0]} probe, {err}") from None


@dataclass(frozen=True)
class Model:
    """A loaded bundle with its backend and the tiler that cuts frames for it; swapped as one object."""

    bundle: Bundle
    backend: Backend
    tiler: Tiler
    _one_at_a_time: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def infer(self, batch: np.ndarray) -> InferenceResult:
        """The backend's answer for a tile batch; a backend that is not thread-safe is entered by one thread
        at a time (several inference workers then overlap only the steps around it)."""
        if self.backend.thread_safe:
            return self.backend.infer(batch)
        with self._one_at_a_time:
            return self.backend.infer(batch)

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    @property
    def sha256(self) -> str:
        return self.bundle.sha256


@dataclass(frozen=True)
class Tiles:
    """A frame's model inputs cut ahead of inference (`Inspector.prepare`), with the tiler that cut them."""

    tiles: np.ndarray  # uint8 (T, h, w, 3)
    tiler: Tiler
    ms: float  # time the cut took (reported as the frame's tiling latency)


def bundle_tiler(bundle: Bundle) -> Tiler:
    """The grid the bundle was fit on (one whole-frame tile for untiled bundles), for offline judging."""
    return bundle.meta.tiling.tiler(bundle.input_size) or Tiler(1, 1, bundle.input_size)


@dataclass
class Inspection:
    """One frame judged: the decision (with its parameters), the stitched map and where the tiles were."""

    decision: Decision
    heatmap: np.ndarray  # float32 at `map_scale` x the frame's size, raw score scale
    tile_boxes: list[Box]
    model_id: str
    model_sha256: str
    timings: dict[str, float] = field(default_factory=dict)  # tiling, inference, decision (ms)
    map_scale: float = 1.0

    @property
    def verdict(self) -> str:
        return self.decision.verdict

    @property
    def score(self) -> float:
        return self.decision.score


class Inspector:
    """Judges frames with the current model and decision parameters; settings change between frames only."""

    def __init__(self, model: Model, params: DecisionParams):
        self._model = model
        self._params = params
        self._lock = threading.Lock()
        self._retired: list[Backend] = []  # replaced backends, closed by a judging thread once none is busy
        self._busy = 0  # frames being judged now (the service may run several inference workers)

    @property
    def model(self) -> Model:
        return self._model

    @property
    def params(self) -> DecisionParams:
        return self._params

    def settings(self) -> tuple[Model, DecisionParams]:
        """The model and parameters the next frame will be judged with (one consistent pair)."""
        with self._lock:
            return self._model, self._params

    def set_threshold(self, threshold: float) -> DecisionParams:
        """Move the threshold of the current settings (a pending reload's included); returns the new ones."""
        with self._lock:
            self._params = dataclasses.replace(self._params, threshold=threshold)
            return self._params

    def set_thresholds(self, threshold: float, review_threshold: float | None) -> DecisionParams:
        """Move the threshold and the review band's pass threshold together (None: no band) in one step."""
        with self._lock:
            self._params = dataclasses.replace(self._params, threshold=threshold, review_threshold=review_threshold)
            return self._params

    def swap(self, model: Model, params: DecisionParams) -> None:
        """Install a new model with its parameters; the frame being judged finishes with the old one."""
        with self._lock:
            old = self._model
            self._model, self._params = model, params
            if old.backend is not model.backend:
                self._retired.append(old.backend)
        log.info("model swapped: %s -> %s", old.model_id, model.model_id)

    def prepare(self, image: np.ndarray) -> Tiles | None:
        """Cut a frame into the current model's tiles ahead of `inspect`, on another thread than inference.

        The service's capture stage calls this, so resizing the tiles (`resize_to`; for a 1280x1024 frame on
        the 2-core VM 2-3.5 ms at 2x2 tiles, 8-10 ms at 4x4) runs beside the previous frame's inference
        instead of before this one's.
        The tiles are the very ones `inspect` would cut itself (same Tiler, same call), so verdicts do not
        depend on which thread cut them. None when the frame cannot be cut: `inspect` then cuts it again and
        reports the error as that frame's result.
        """
        tiler = self.model.tiler
        start = time.monotonic()
        try:
            tiles = tiler.split(image)
        except Exception:  # the same error is raised again, and reported, on the inference thread
            return None
        return Tiles(tiles, tiler, (time.monotonic() - start) * 1000.0)

    def inspect(self, image: np.ndarray, map_scale: MapScale = 1.0, tiles: Tiles | None = None,
                picture_of_frame: bool = False) -> Inspection:
        """Tile, infer, stitch and decide one uint8 BGR frame. Errors propagate to the caller.

        The returned map is stitched at `map_scale` of the frame's size (the service passes the published
        heatmap's scale; "auto" is the model's own detail, resolved per frame since a reload can change the
        grid; `Inspection.map_scale` says which scale was used). The decision always sees the
        full-resolution map, so defect areas and boxes are in frame pixels whatever the scale; below the
        threshold it never looks at the map, so on a line where most parts pass, the full-size map is
        stitched only for the few that do not. `tiles` from `prepare` are used when they were cut by the
        current model's tiler (a reload in between cuts them again). `picture_of_frame`: the map is sent
        blended on the frame (jpeg_overlay), whose detail the map's blur does not limit, so "auto" keeps one
        pixel per model-input pixel there.
        """
        model, params = self._begin()
        try:
            return self._inspect(model, params, image, map_scale, tiles, picture_of_frame)
        finally:
            with self._lock:
                self._busy -= 1

    def _inspect(self, model: Model, params: DecisionParams, image: np.ndarray, map_scale: MapScale,
                 tiles: Tiles | None, picture_of_frame: bool) -> Inspection:
        t0 = time.monotonic()
        if tiles is not None and tiles.tiler is model.tiler:
            batch, tiling_ms = tiles.tiles, tiles.ms
        else:
            batch = model.tiler.split(image)
            tiling_ms = (time.monotonic() - t0) * 1000.0
        t1 = time.monotonic()
        output = model.infer(batch)
        check_output(output, len(batch), model.bundle.input_size)  # never decide on NaN or a misshapen map
        t2 = time.monotonic()
        blur = 0.0 if picture_of_frame else model.bundle.meta.map_blur_sigma
        scale = model.tiler.detail_scale(image.shape, blur) if map_scale == "auto" else float(map_scale)
        heatmap = model.tiler.stitch(output.anomaly_maps, image.shape, scale)
        over = output.scores.size > 0 and float(np.max(output.scores)) > params.threshold
        full = model.tiler.stitch(output.anomaly_maps, image.shape) if over and scale != 1.0 else heatmap
        decision = decide(output.scores, full, params)
        t3 = time.monotonic()
        return Inspection(decision=decision, heatmap=heatmap, tile_boxes=model.tiler.boxes(image.shape),
                          model_id=model.model_id, model_sha256=model.sha256,
                          timings={"tiling": tiling_ms, "inference": (t2 - t1) * 1000.0,
                                   "decision": (t3 - t2) * 1000.0}, map_scale=scale)

    def _begin(self) -> tuple[Model, DecisionParams]:
        """Count this frame as busy and take its settings, in one step; close replaced backends if no frame
        is being judged (a frame that started before a swap may still be using the old backend)."""
        with self._lock:
            retired = self._take_retired() if self._busy == 0 else []
            self._busy += 1
            model, params = self._model, self._params
        _close_all(retired)
        return model, params

    def _take_retired(self) -> list[Backend]:
        """The replaced backends, handed over for closing (the caller holds the lock)."""
        retired, self._retired = self._retired, []
        return retired

    def close(self) -> None:
        """At shutdown (no frame is being judged any more): close the replaced backends and the current one."""
        with self._lock:
            retired = self._take_retired()
        _close_all([*retired, self._model.backend])


def _close_all(backends: list[Backend]) -> None:
    for backend in backends:
        backend.close()
