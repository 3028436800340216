"""Inference backends behind one interface, and the `auto` choice between them.

`auto` prefers TensorRT (module and GPU present), then ONNX Runtime's CUDA provider, then ONNX Runtime
on the CPU, and logs which it took and why, so a slow line can be explained from the log alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from edge_inspector.backends.base import Backend, BackendRuntimeError, InferenceResult
from edge_inspector.core.bundle import Bundle
from edge_inspector.core.errors import BackendError

log = logging.getLogger(__name__)

BACKEND_KINDS = ("auto", "onnxruntime", "tensorrt")

__all__ = ["Backend", "BackendRuntimeError", "InferenceResult", "BACKEND_KINDS", "create_backend"]


def _tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT can be used here, else why not (imports stay inside the TensorRT backend)."""
    try:
        from edge_inspector.backends.tensorrt import runtime as trt_backend
    except ImportError as err:
        return f"TensorRT backend unavailable ({err})"
    return trt_backend.unavailable_reason()


def _started(backend: Backend, warm_up: Callable[[Backend], None] | None) -> Backend:
    """Run the warm-up on a new backend; a failure closes it before the error goes on."""
    if warm_up is not None:
        try:
            warm_up(backend)
        except BaseException:
            backend.close()
            raise
    return backend


def _tensorrt(bundle: Bundle, warm_up: Callable[[Backend], None] | None, tensorrt_factory,
              tiles: int | None) -> Backend:
    if tensorrt_factory is None:
        from edge_inspector.backends.tensorrt.runtime import TensorRTBackend

        # The engine's profile is sized for the tiles of one frame (the service's grid, not the bundle's).
        return _started(TensorRTBackend(bundle, tiles=tiles), warm_up)
    return _started(tensorrt_factory(bundle), warm_up)


def create_backend(bundle: Bundle, kind: str = "auto", threads: int | None = None,
                   warm_up: Callable[[Backend], None] | None = None,
                   tensorrt_factory: Callable[[Bundle], Backend] | None = None,
                   tiles: int | None = None) -> Backend:
    """Create the backend named by `kind` for `bundle`, started with `warm_up` (e.g. one inference).

    With `auto`, a TensorRT start that fails for any reason (engine build out of GPU memory, an engine
    TensorRT cannot load, a failed CUDA call in the warm-up) falls back to ONNX Runtime and logs why: a
    line keeps inspecting, slower, instead of not at all. An explicit `tensorrt` never falls back.
    `tensorrt_factory` replaces the TensorRT backend class (tests without a GPU). `tiles`: tiles per frame,
    which a first-start TensorRT build sizes its optimisation profile for (default: the bundle's grid).
    """
    from edge_inspector.backends.onnxruntime import OnnxRuntimeBackend

    if kind not in BACKEND_KINDS:
        raise BackendError(f"backend {kind!r} unknown (expected one of {', '.join(BACKEND_KINDS)})")
    if kind == "onnxruntime":
        backend = _started(OnnxRuntimeBackend(bundle, threads=threads), warm_up)
    elif kind == "tensorrt":
        reason = _tensorrt_unavailable_reason() if tensorrt_factory is None else None
        if reason:
            raise BackendError(f"backend tensorrt requested but {reason}")
        backend = _tensorrt(bundle, warm_up, tensorrt_factory, tiles)
    else:
        reason = _tensorrt_unavailable_reason() if tensorrt_factory is None else None
        if reason is None:
            try:
                backend = _tensorrt(bundle, warm_up, tensorrt_factory, tiles)
                log.info("backend auto: chose %s (TensorRT and a GPU are present)", backend.describe())
                return backend
            except Exception as err:
                text = str(err).strip().splitlines()
                reason = f"TensorRT failed to start ({type(err).__name__}: {text[0] if text else ''})"
                log.error("backend auto: %s; falling back to ONNX Runtime", reason)
        backend = _started(OnnxRuntimeBackend(bundle, threads=threads,
                                              providers=["CUDAExecutionProvider", "CPUExecutionProvider"]), warm_up)
        log.info("backend auto: chose %s because %s", backend.describe(), reason)
        return backend
    log.info("backend: %s", backend.describe())
    return backend
