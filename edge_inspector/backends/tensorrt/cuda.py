"""The GPU libraries, imported lazily: TensorRT, cuda-python, pinned buffers and the device probe.

Nothing here is imported at module level, so `backend auto` and the engine-naming code load on machines
without a GPU; each function imports what it needs when it is called.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np

from edge_inspector.backends.base import BackendRuntimeError
from edge_inspector.backends.tensorrt.engines import DeviceInfo

log = logging.getLogger(__name__)


def import_tensorrt():
    import tensorrt

    return tensorrt


def import_cudart():
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python >= 12.6) or the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def cuda_call(result, what: str):
    """Unpack cuda-python's (error, value...) tuples, raising one readable line on failure."""
    cudart = import_cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        text = text.decode() if isinstance(text, bytes) else str(text)
        raise BackendRuntimeError(f"CUDA {what} failed: {getattr(err, 'name', err)} ({text})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class HostDeviceBuffer:
    """One pinned host array and its device twin, allocated once for the largest batch.

    Pinned (page-locked) host memory is what makes cudaMemcpyAsync truly asynchronous; allocating once keeps
    the hot path free of allocations.
    """

    def __init__(self, shape: tuple[int, ...], dtype):
        cudart = import_cudart()
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.device = 0
        self._host_ptr = int(cuda_call(cudart.cudaMallocHost(self.nbytes), "cudaMallocHost"))
        raw = (ctypes.c_byte * self.nbytes).from_address(self._host_ptr)
        self.host: np.ndarray = np.frombuffer(raw, dtype=self.dtype).reshape(self.shape)
        self.device = int(cuda_call(cudart.cudaMalloc(self.nbytes), "cudaMalloc"))

    def bytes_for(self, batch: int) -> int:
        return self.nbytes // self.shape[0] * batch

    def free(self) -> None:
        cudart = import_cudart()
        if self.device:
            cudart.cudaFree(self.device)
            self.device = 0
        if self._host_ptr:
            self.host = np.empty((0,), self.dtype)  # never a view of freed memory
            cudart.cudaFreeHost(self._host_ptr)
            self._host_ptr = 0


def cuda_device_count() -> int:
    cudart = import_cudart()
    return int(cuda_call(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount"))


def probe_device() -> DeviceInfo:
    """The current GPU and TensorRT version, i.e. what an engine built here is tied to."""
    trt = import_tensorrt()
    cudart = import_cudart()
    device = int(cuda_call(cudart.cudaGetDevice(), "cudaGetDevice"))
    props = cuda_call(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return DeviceInfo(str(name), (int(props.major), int(props.minor)), str(trt.__version__))


_LOGGER_CACHE: dict[str, object] = {}


def trt_logger(trt):
    """A TensorRT logger that forwards to Python logging, so builder messages reach journald like ours."""
    if "logger" not in _LOGGER_CACHE:
        trt_log = logging.getLogger("tensorrt")
        levels = {trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
                  trt.ILogger.Severity.ERROR: logging.ERROR,
                  trt.ILogger.Severity.WARNING: logging.WARNING,
                  trt.ILogger.Severity.INFO: logging.DEBUG,
                  trt.ILogger.Severity.VERBOSE: logging.DEBUG}

        class _Forward(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                trt_log.log(levels.get(severity, logging.INFO), "%s", msg)

        _LOGGER_CACHE["logger"] = _Forward()
    return _LOGGER_CACHE["logger"]
