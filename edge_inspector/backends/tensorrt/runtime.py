"""TensorRT backend: the bundle's engine for this GPU, run asynchronously on one CUDA stream.

Importing this module never imports TensorRT or CUDA, so `backend auto` can ask `unavailable_reason()` on
any machine, and the batch-split rules below are tested everywhere; the heavy imports happen when a
backend is actually created.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edge_inspector.backends.base import Backend, InferenceResult
from edge_inspector.backends.tensorrt.build import ensure_engine, frame_group
from edge_inspector.backends.tensorrt.cuda import (
    HostDeviceBuffer,
    cuda_call,
    cuda_device_count,
    import_cudart,
    import_tensorrt,
    probe_device,
    trt_logger,
)
from edge_inspector.backends.tensorrt.engines import INPUT_NAME, OUTPUT_NAMES, parse_engine_filename, unrecorded_engines
from edge_inspector.core.bundle import Bundle
from edge_inspector.core.errors import BackendError

log = logging.getLogger(__name__)


def unavailable_reason() -> str | None:
    """None when TensorRT and a CUDA GPU are usable here; otherwise why not, in a few words. Never raises."""
    try:
        import_tensorrt()
    except Exception as err:  # a broken install can raise anything (OSError for a missing libnvinfer, ...)
        return f"the tensorrt Python module is not importable ({_first_line(err)})"
    try:
        import_cudart()
    except Exception as err:
        return f"cuda-python is not importable ({_first_line(err)}; pip install cuda-python)"
    try:
        count = cuda_device_count()
    except Exception as err:
        return f"no usable CUDA GPU ({_first_line(err)})"
    if count < 1:
        return "no CUDA GPU is visible"
    return None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ------------------------------------------------------------------------------------------- batch split


def check_profile(min_batch: int, max_batch: int, group: int, where: str = "engine") -> None:
    """Refuse, in one line, an engine profile that cannot run whole frames of a per-tile bundle.

    A per-tile graph pairs image i with statistics set i mod K, so every call must carry whole frames of K
    tiles: the profile's max must be a multiple of K (else the last frame of a full batch would be split)
    and its min at most K.
    """
    if max_batch % group or min_batch > group:
        raise BackendError(f"{where}: optimisation profile batch {min_batch}..{max_batch} cannot run whole frames "
                           f"of {group} tiles (max must be a multiple of {group}); rebuild it with "
                           f"edge-export tensorrt (default --tiles {group})")


def split_batches(count: int, max_batch: int, group: int = 1) -> list[tuple[int, int]]:
    """(start, stop) of the calls that run `count` images: whole groups, at most `max_batch`, sizes balanced.

    Balanced (12 with max 8 -> 6 + 6, not 8 + 4) so consecutive calls keep one input shape and TensorRT's
    context is not reshaped between them. `max_batch` must be a multiple of `group` (see check_profile).
    """
    if count % group:
        raise BackendError(f"a batch of {count} images is not whole frames of {group} tiles (per-tile bundle)")
    if max_batch < group or max_batch % group:
        raise BackendError(f"max batch {max_batch} is not a multiple of the frame's {group} tiles")
    units, per_call = count // group, max_batch // group
    calls = -(-units // per_call) if units else 0
    bounds, start = [], 0
    for i in range(calls):
        size = (units // calls + (1 if i < units % calls else 0)) * group
        bounds.append((start, start + size))
        start += size
    return bounds


# ------------------------------------------------------------------------------------------- backend


class TensorRTBackend(Backend):
    """Runs the engine matching this GPU; builds it on first start when the bundle has none.

    `tiles`: the images one frame makes (None: the bundle's tiling); only used when an engine is built here.
    """

    name = "tensorrt"

    def __init__(self, bundle: Bundle, precision: str | None = None, tiles: int | None = None):
        self._buffers: list[HostDeviceBuffer] = []
        self._stream: Any = None
        reason = unavailable_reason()
        if reason:
            raise BackendError(f"backend tensorrt unavailable: {reason}")
        self.input_size = bundle.input_size
        self.group = frame_group(bundle)
        for stray in unrecorded_engines(bundle):
            log.warning("ignoring %s: not recorded in bundle.yaml (rebuild it with edge-export tensorrt)", stray)
        trt = import_tensorrt()
        self.engine_path, data = ensure_engine(bundle, probe_device(), precision, tiles)
        spec = parse_engine_filename(self.engine_path.rpartition("/")[2])
        self.precision = spec.precision if spec else "unknown"
        self._runtime = trt.Runtime(trt_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise BackendError(f"{bundle.path / self.engine_path}: TensorRT {trt.__version__} cannot deserialise "
                               "this engine (other TensorRT build or GPU); delete it and restart to rebuild")
        self._context = self._engine.create_execution_context()
        self._check_io(trt, bundle)
        low, _, high = (int(shape[0]) for shape in self._engine.get_tensor_profile_shape(INPUT_NAME, 0))
        check_profile(low, high, self.group, str(bundle.path / self.engine_path))
        self.max_batch = high
        try:
            self._allocate()
        except BackendError:
            self.close()
            raise
        self._batch = 0
        log.info("TensorRT engine %s loaded (%s, batch up to %d)", self.engine_path, self.precision, self.max_batch)

    def _check_io(self, trt, bundle: Bundle) -> None:
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {n: engine.get_tensor_mode(n) for n in names}
        inputs = [n for n in names if modes[n] == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
        expected = {INPUT_NAME: trt.DataType.UINT8, OUTPUT_NAMES[0]: trt.DataType.FLOAT,
                    OUTPUT_NAMES[1]: trt.DataType.FLOAT}
        if inputs != [INPUT_NAME] or set(outputs) != set(OUTPUT_NAMES) or any(
                engine.get_tensor_dtype(n) != dtype for n, dtype in expected.items()):
            raise BackendError(f"{bundle.path / self.engine_path}: engine I/O {names} does not match the bundle "
                               "contract (image uint8 -> anomaly_map, score float32)")

    def _allocate(self) -> None:
        """Device and pinned host buffers for the profile's largest batch, bound to the context once."""
        cudart = import_cudart()
        height, width = self.input_size
        self._stream = cuda_call(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._input = HostDeviceBuffer((self.max_batch, height, width, 3), np.uint8)
        self._maps = HostDeviceBuffer((self.max_batch, height, width), np.float32)
        self._scores = HostDeviceBuffer((self.max_batch,), np.float32)
        self._buffers = [self._input, self._maps, self._scores]
        for name, buffer in zip((INPUT_NAME, *OUTPUT_NAMES), self._buffers):
            if not self._context.set_tensor_address(name, buffer.device):
                raise BackendError(f"TensorRT refused the device address of tensor {name!r}")

    def infer(self, images: np.ndarray) -> InferenceResult:
        height, width = self.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (height, width, 3):
            raise BackendError(f"input must be uint8 (N, {height}, {width}, 3), got {images.dtype} {images.shape}")
        if len(images) == 0:
            return InferenceResult(np.empty((0, height, width), np.float32), np.empty((0,), np.float32))
        parts = [self._run(images[start:stop]) for start, stop in split_batches(len(images), self.max_batch,
                                                                               self.group)]
        if len(parts) == 1:
            return parts[0]
        return InferenceResult(anomaly_maps=np.concatenate([p.anomaly_maps for p in parts]),
                               scores=np.concatenate([p.scores for p in parts]))

    def _run(self, images: np.ndarray) -> InferenceResult:
        cudart = import_cudart()
        n = len(images)
        if n != self._batch:
            if not self._context.set_input_shape(INPUT_NAME, tuple(images.shape)):
                raise BackendError(f"TensorRT rejected batch {n} (engine profile allows up to {self.max_batch})")
            self._batch = n
        np.copyto(self._input.host[:n], images)
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(cudart.cudaMemcpyAsync(self._input.device, self._input.host.ctypes.data,
                                         self._input.bytes_for(n), to_device, self._stream), "cudaMemcpyAsync")
        if not self._context.execute_async_v3(int(self._stream)):
            raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT errors above)")
        for out in (self._maps, self._scores):
            cuda_call(cudart.cudaMemcpyAsync(out.host.ctypes.data, out.device, out.bytes_for(n), to_host,
                                             self._stream), "cudaMemcpyAsync")
        cuda_call(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        # Copies: the pinned buffers are overwritten by the next call.
        return InferenceResult(anomaly_maps=self._maps.host[:n].copy(), scores=self._scores.host[:n].copy())

    def close(self) -> None:
        for buffer in self._buffers:
            buffer.free()
        self._buffers = []
        if self._stream is not None:
            import_cudart().cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = None
        self._engine = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    def describe(self) -> str:
        return f"tensorrt ({self.engine_path}, {self.precision}, batch up to {self.max_batch})"
