"""Inference backends behind one interface, and the `auto` choice between them.

`auto` prefers TensorRT (module and GPU present), then ONNX Runtime's CUDA provider, then ONNX Runtime
on the CPU, and logs which it took and why, so a slow line can be explained from the log alone.
"""

from __future__ import annotations

import logging

from ..bundle import Bundle
from ..errors import BackendError
from .base import Backend, InferenceResult

log = logging.getLogger(__name__)

BACKEND_KINDS = ("auto", "onnxruntime", "tensorrt")

__all__ = ["Backend", "InferenceResult", "BACKEND_KINDS", "create_backend"]


def _tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT can be used here, else why not (imports stay inside the TensorRT backend)."""
    try:
        from . import tensorrt as trt_backend
    except ImportError as err:
        return f"TensorRT backend unavailable ({err})"
    return trt_backend.unavailable_reason()


def create_backend(bundle: Bundle, kind: str = "auto", threads: int | None = None) -> Backend:
    """Create the backend named by `kind` for `bundle`."""
    from .onnxruntime import OnnxRuntimeBackend

    if kind not in BACKEND_KINDS:
        raise BackendError(f"backend {kind!r} unknown (expected one of {', '.join(BACKEND_KINDS)})")
    if kind == "onnxruntime":
        backend = OnnxRuntimeBackend(bundle, threads=threads)
    elif kind == "tensorrt":
        reason = _tensorrt_unavailable_reason()
        if reason:
            raise BackendError(f"backend tensorrt requested but {reason}")
        from .tensorrt import TensorRTBackend

        backend = TensorRTBackend(bundle)
    else:
        reason = _tensorrt_unavailable_reason()
        if reason is None:
            from .tensorrt import TensorRTBackend

            backend = TensorRTBackend(bundle)
            log.info("backend auto: chose %s (TensorRT and a GPU are present)", backend.describe())
            return backend
        backend = OnnxRuntimeBackend(bundle, threads=threads,
                                     providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        log.info("backend auto: chose %s because %s", backend.describe(), reason)
        return backend
    log.info("backend: %s", backend.describe())
    return backend
