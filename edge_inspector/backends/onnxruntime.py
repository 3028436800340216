"""ONNX Runtime backend: the CPU path everywhere, and the CUDA provider where TensorRT is absent."""

from __future__ import annotations

import logging

import numpy as np

from edge_inspector.backends.base import Backend, InferenceResult
from edge_inspector.core.bundle import MODEL_FILE, Bundle
from edge_inspector.core.errors import BackendError, BundleError

log = logging.getLogger(__name__)


EXTERNAL_DATA = MODEL_FILE + ".data"  # export.onnx_export writes constants over 1.8 GB beside the graph


def _session(ort, bundle: Bundle, options, providers: list[str]):
    """A session on the verified bytes of model.onnx (Bundle.read_verified), never on a path an attacker could
    swap between the check and the load. A graph with external data must be read from files: then from a
    private verified copy (0700 folder of this user), removed once the session holds the weights."""
    if EXTERNAL_DATA not in bundle.meta.files:
        return ort.InferenceSession(bundle.read_verified(MODEL_FILE), options, providers=providers)
    with bundle.verified_copy((MODEL_FILE, EXTERNAL_DATA)) as folder:
        return ort.InferenceSession(str(folder / MODEL_FILE), options, providers=providers)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    thread_safe = True  # InferenceSession.run may be called from several threads at once (ORT's documented contract)

    def __init__(self, bundle: Bundle, threads: int | None = None, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as err:  # pragma: no cover - onnxruntime is a hard dependency
            raise BackendError(f"onnxruntime is not installed ({err})") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = ort.get_available_providers()
        providers = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or [
            "CPUExecutionProvider"]
        try:
            self.session = _session(ort, bundle, options, providers)
        except BundleError:
            raise
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise BackendError(f"{bundle.onnx_path}: ONNX Runtime cannot load the model "
                               f"({str(err).splitlines()[0]})") from None
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if self.output_names[:2] != ["anomaly_map", "score"]:
            raise BackendError(f"{bundle.onnx_path}: outputs are {self.output_names}, expected "
                               "[anomaly_map, score]")
        self.name = "onnxruntime-cuda" if self.providers[0] == "CUDAExecutionProvider" else "onnxruntime-cpu"
        self.runs_on_cpu_cores = self.providers[0] == "CPUExecutionProvider"

    def infer(self, images: np.ndarray) -> InferenceResult:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise BackendError(f"input must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        maps, scores = self.session.run(self.output_names[:2], {self.input_name: images})
        return InferenceResult(anomaly_maps=maps, scores=scores)

    def describe(self) -> str:
        return f"{self.name} (providers: {', '.join(self.providers)})"
