"""The one interface every inference runtime implements.

The bundle's graph already does everything from uint8 pixels to answer, so a backend is only "feed a
uint8 BGR batch, return the two outputs". That keeps ONNX Runtime, TensorRT and the torch reference
interchangeable and directly comparable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


class BackendRuntimeError(RuntimeError):
    """A runtime failed for a reason a restart may clear (GPU out of memory, a failed CUDA call or engine
    build). Deliberately not an InspectorError: the service exits 1 and systemd restarts it, where a
    BackendError (a bundle or setup the user must fix) exits 2 and is not retried."""


@dataclass
class InferenceResult:
    anomaly_maps: np.ndarray  # float32 (N, H, W)
    scores: np.ndarray  # float32 (N,)


class Backend(ABC):
    """Runs a bundle's graph. Implementations are not required to be thread-safe: those that are say so with
    `thread_safe`, and the service's inference workers (model.workers) then call `infer` at once; the others
    are called one frame at a time (`core.inspect.Model.infer`)."""

    name: str = "abstract"
    thread_safe: bool = False
    # True when `infer` computes on the CPU's cores with its own thread pool (model.threads), so several
    # workers' pools can crowd the cores (service.app.oversubscribed); False for GPU runtimes.
    runs_on_cpu_cores: bool = False

    @abstractmethod
    def infer(self, images: np.ndarray) -> InferenceResult:
        """images: uint8 (N, H, W, 3) BGR at the bundle's input size."""

    def close(self) -> None:  # noqa: B027 (optional hook: most backends have nothing to release)
        """Release runtime resources (GPU buffers, sessions)."""

    def describe(self) -> str:
        return self.name
