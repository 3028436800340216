"""TensorRT engines of a bundle: their names, which one a device takes, and the state-directory cache.

An engine is only valid for one GPU model, compute capability and TensorRT version, so its file name
carries all three, and a device that finds none matching (new JetPack, new board) builds its own on first
start (`edge_inspector.backends.tensorrt.build`). Everything here is pure (no TensorRT or CUDA import), so
it is tested on every machine.

Precision is a property of the graph an engine is built from, not of builder flags (TensorRT 11 has none):
an `fp32` engine is built from `model.onnx`, an `fp16` engine from `engines/model.fp16.onnx`, the
mixed-precision graph `edge-export tensorrt` writes into the bundle (fp16 network, fp32 distance, explicit
Casts; `export.mixed_precision`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_inspector.core.atomic import write_atomic
from edge_inspector.core.bundle import Bundle
from edge_inspector.core.errors import BackendError, BundleError, ConfigError

log = logging.getLogger(__name__)

ENGINE_DIR = "engines"
TIMING_CACHE = f"{ENGINE_DIR}/timing.cache"
# The mixed-precision graph (fp16 network, fp32 distance, explicit Casts) written by `edge-export tensorrt`.
# Under engines/ like the engines built from it: a TensorRT build input, so recording it leaves the bundle's
# metadata digest (which skips engines/) and hence its identity unchanged.
MIXED_GRAPH = f"{ENGINE_DIR}/model.fp16.onnx"
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")
PRECISIONS = ("fp32", "fp16")
# Preference when both match: the mixed graph is the fast one; fp32 is the exact fallback.
PREFERENCE = ("fp16", "fp32")

_ENGINE_RE = re.compile(
    r"^(?P<gpu>[a-z0-9-]+)_sm(?P<sm>\d+)_trt(?P<trt>[0-9][0-9.]*)_(?P<precision>fp32|fp16)\.engine$")


# --------------------------------------------------------------------------------------------- naming

@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is tied to: TensorRT refuses (or mis-runs) engines built for another of these."""

    gpu_name: str
    compute_capability: tuple[int, int]
    trt_version: str

    @property
    def gpu_slug(self) -> str:
        return gpu_slug(self.gpu_name)

    @property
    def sm(self) -> str:
        return f"{self.compute_capability[0]}{self.compute_capability[1]}"


@dataclass(frozen=True)
class EngineSpec:
    gpu: str
    sm: str
    trt_version: str
    precision: str

    @property
    def filename(self) -> str:
        return f"{self.gpu}_sm{self.sm}_trt{self.trt_version}_{self.precision}.engine"

    def matches(self, device: DeviceInfo) -> bool:
        return (self.gpu, self.sm, self.trt_version) == (device.gpu_slug, device.sm, device.trt_version)


def gpu_slug(name: str) -> str:
    """'NVIDIA GeForce RTX 3060 Ti' -> 'nvidia-geforce-rtx-3060-ti': safe in file names, stable across drivers."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")
    return slug or "unknown-gpu"


def engine_filename(device: DeviceInfo, precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} unknown (expected one of {', '.join(PRECISIONS)})")
    return EngineSpec(device.gpu_slug, device.sm, device.trt_version, precision).filename


def parse_engine_filename(name: str) -> EngineSpec | None:
    """The spec encoded in an engine file name, or None for files that are not engines of ours."""
    match = _ENGINE_RE.match(name)
    if match is None:
        return None
    return EngineSpec(match["gpu"], match["sm"], match["trt"], match["precision"])


def select_engine(recorded: Iterable[str], device: DeviceInfo, precision: str | None = None) -> str | None:
    """Pick the engine (bundle-relative path) to run on `device` among the files recorded in bundle.yaml.

    Only recorded files are candidates: they are the ones `Bundle.load` sha256-verified, so a half-copied
    or foreign engine is never deserialised. `precision` forces one precision; None takes PREFERENCE order.
    """
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} unknown (expected one of {', '.join(PRECISIONS)})")
    found: dict[str, str] = {}
    for rel in recorded:
        folder, _, name = rel.rpartition("/")
        spec = parse_engine_filename(name)
        if folder == ENGINE_DIR and spec is not None and spec.matches(device):
            found[spec.precision] = rel
    for wanted in ([precision] if precision else PREFERENCE):
        if wanted in found:
            return found[wanted]
    return None


def unrecorded_engines(bundle: Bundle) -> list[Path]:
    """Engine files lying in the bundle but absent from bundle.yaml (copied in by hand): never used."""
    folder = bundle.path / ENGINE_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.engine")
                  if f"{ENGINE_DIR}/{p.name}" not in bundle.meta.files)


def default_precision(compute_capability: tuple[int, int]) -> str:
    """fp16 where the GPU has fast fp16 (Maxwell Jetson sm53, sm60, sm62 and Volta+); fp32 on sm61 consumer Pascal.

    (TensorRT 11 dropped `platform_has_fast_fp16`, so the rule is ours, from NVIDIA's throughput tables.)
    """
    major, minor = compute_capability
    if (major, minor) in ((5, 3), (6, 0), (6, 2)) or major >= 7:
        return "fp16"
    return "fp32"


def max_relative_difference(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |actual - reference| / max |reference|: the parity measure used by tests and benchmarks.

    Normalising by the output's scale rather than per element keeps near-zero pixels of a good part from
    turning tiny absolute differences into huge relative ones.
    """
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    scale = max(float(np.abs(reference).max(initial=0.0)), 1e-12)
    return float(np.abs(actual - reference).max(initial=0.0) / scale)


def graph_for(bundle: Bundle, precision: str) -> Path:
    """The ONNX graph an engine of `precision` is built from; fp16 needs the recorded mixed graph."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} unknown (expected one of {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return bundle.onnx_path
    if MIXED_GRAPH not in bundle.meta.files:
        raise BackendError(f"{bundle.path}: no {MIXED_GRAPH} recorded in bundle.yaml; write it on the workstation "
                           f"with `edge-export tensorrt {bundle.path} --graph-only` (or build fp32)")
    return bundle.path / MIXED_GRAPH


def read_verified(bundle: Bundle, rel: str) -> bytes:
    """An engine recorded in bundle.yaml, refused if it changed since the bundle was loaded: the bytes
    deserialised are the bytes hashed (Bundle.read_verified: no link followed, a plain file only)."""
    try:
        return bundle.read_verified(rel)
    except BundleError as err:
        raise BackendError(f"{err} (engine changed since the bundle was loaded?)") from None


def engine_cache_dir(bundle: Bundle, environ: dict[str, str] | None = None) -> Path | None:
    """Where the service keeps engines it built itself when the bundle folder is read-only.

    Under the unit, `ProtectSystem=strict` makes /opt (and so the bundle) read-only; systemd passes the
    unit's `StateDirectory=` as $STATE_DIRECTORY (/var/lib/edge-inspector), which stays writable. One
    sub-folder per model.onnx sha256, so an engine is never used with another graph.
    """
    state = (os.environ if environ is None else environ).get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state) / "engines" / bundle.sha256[:16] if state else None


def read_cached_engine(folder: Path, device: DeviceInfo, precision: str | None,
                       graph_sha256: str | None = None) -> tuple[str, bytes] | None:
    """(path, bytes) of a cached engine for this device whose sha256 sidecar matches; None otherwise.

    `graph_sha256`: when given, an engine whose sidecar names another source graph is ignored (the mixed
    graph was written again since).
    """
    try:
        names = sorted(p.name for p in folder.glob("*.engine"))
    except OSError:
        return None
    chosen = select_engine([f"{ENGINE_DIR}/{name}" for name in names], device, precision)
    if chosen is None:
        return None
    path = folder / chosen.rpartition("/")[2]
    try:
        data = path.read_bytes()
        recorded = Path(str(path) + ".sha256").read_text().split()
    except OSError as err:
        log.warning("ignoring cached engine %s (%s); building a new one", path, err)
        return None
    if not recorded or hashlib.sha256(data).hexdigest() != recorded[0]:
        log.warning("ignoring cached engine %s: sha256 mismatch (truncated or altered); building a new one", path)
        return None
    if graph_sha256 is not None and recorded[1:2] != [graph_sha256]:
        log.warning("ignoring cached engine %s: built from another graph; building a new one", path)
        return None
    return str(path), data


def save_cached_engine(folder: Path, filename: str, data: bytes, graph_sha256: str | None = None) -> Path:
    """Store an engine and its sidecar: the engine's sha256, then that of the graph it was built from.

    Engine first: a sidecar never vouches for a partial file.
    """
    path = folder / filename
    write_atomic(path, data)
    sidecar = hashlib.sha256(data).hexdigest() + (f" {graph_sha256}" if graph_sha256 else "")
    write_atomic(Path(str(path) + ".sha256"), sidecar.encode())
    return path
