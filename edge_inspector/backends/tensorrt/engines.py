"""TensorRT engines for a bundle: how they are named, which one a device takes, and how one is built.

Why this lives on the device side rather than in `export/`: an engine is only valid for one GPU model,
compute capability and TensorRT version, so a device that finds no matching engine (new JetPack, new board)
must be able to build its own on first start, without torch or the training code. `edge-export tensorrt`
is a thin command line over the same `build_engine`, so both paths produce identical engines.

The naming and selection functions are pure (no TensorRT import) so they are tested on every machine.
TensorRT and CUDA (cuda-python) are imported lazily, only inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from edge_inspector.core.atomic import write_atomic
from edge_inspector.core.bundle import Bundle
from edge_inspector.core.errors import BackendError, ConfigError
from edge_inspector.backends.base import BackendRuntimeError

log = logging.getLogger(__name__)

ENGINE_DIR = "engines"
TIMING_CACHE = f"{ENGINE_DIR}/timing.cache"
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")
PRECISIONS = ("fp32", "fp16", "int8")
# Default preference when several engines match: fp16 is as fast as int8 on most Jetson workloads of this
# size and needs no calibration data, fp32 is the exact fallback; int8 is taken only if it is all there is.
PREFERENCE = ("fp16", "fp32", "int8")
DEFAULT_MAX_BATCH = 8
# Layers whose name contains one of these stay in fp32 in fp16/int8 engines. The squared Mahalanobis
# distance sums ~100 products whose magnitude easily exceeds fp16's 65504 on defective parts, which would
# saturate the anomaly map exactly where it matters. Matrix multiplies and reductions are kept in fp32
# whatever their name (see `_keep_fp32`). The memory bank's nearest-neighbour search (`/bank/...`) ranks
# squared distances that differ in their last digits: fp16 would pick the wrong neighbour.
FP32_LAYER_MARKERS = ("mahalanobis", "/bank/")

_ENGINE_RE = re.compile(
    r"^(?P<gpu>[a-z0-9-]+)_sm(?P<sm>\d+)_trt(?P<trt>[0-9][0-9.]*)_(?P<precision>fp32|fp16|int8)\.engine$")


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
    """fp16 where the GPU has fast fp16 (Maxwell Jetson sm53, sm60, sm62 and Volta+); fp32 on sm61 consumer Pascal."""
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


# --------------------------------------------------------------------------------------------- options

@dataclass
class CalibrationSource:
    """Good images for INT8 calibration, already in the graph's input format: uint8 (batch, H, W, 3) BGR."""

    batch_size: int
    batches: Callable[[], Iterator[np.ndarray]]
    cache_path: Path | None = None  # reused when present: calibrating again gives the same scales


@dataclass
class BuildOptions:
    precision: str = "fp16"
    max_batch: int = DEFAULT_MAX_BATCH
    opt_batch: int = 1
    workspace_mb: int = 1024
    calibration: CalibrationSource | None = None
    fp32_layer_markers: tuple[str, ...] = FP32_LAYER_MARKERS

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} unknown (expected one of {', '.join(PRECISIONS)})")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"--opt-batch must be between 1 and --max-batch ({self.max_batch}), "
                              f"got {self.opt_batch}")
        if self.workspace_mb < 16:
            raise ConfigError(f"--workspace must be >= 16 MB, got {self.workspace_mb}")


@dataclass
class BuildResult:
    rel_path: str
    seconds: float
    engine: bytes = field(repr=False)
    saved: bool  # False when the bundle folder is read-only: the engine lives for this process only


# --------------------------------------------------------------------------------------------- CUDA

def import_cudart():
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python >= 12.6) or the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # type: ignore[no-redef]
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

    Pinned (page-locked) host memory lets cudaMemcpyAsync overlap with other work and is what makes the
    copies truly asynchronous; allocating once keeps the hot path free of allocations.
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype):
        cudart = import_cudart()
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.device = 0
        self._host_ptr = 0
        self._host_ptr = int(cuda_call(cudart.cudaMallocHost(self.nbytes), "cudaMallocHost"))
        raw = (ctypes.c_byte * self.nbytes).from_address(self._host_ptr)
        self.host = np.frombuffer(raw, dtype=self.dtype).reshape(self.shape)
        self.device = int(cuda_call(cudart.cudaMalloc(self.nbytes), "cudaMalloc"))

    def bytes_for(self, batch: int) -> int:
        return self.nbytes // self.shape[0] * batch

    def free(self) -> None:
        cudart = import_cudart()
        if self.device:
            cudart.cudaFree(self.device)
            self.device = 0
        if self._host_ptr:
            self.host = None
            cudart.cudaFreeHost(self._host_ptr)
            self._host_ptr = 0


def cuda_device_count() -> int:
    cudart = import_cudart()
    return int(cuda_call(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount"))


def import_tensorrt():
    import tensorrt

    return tensorrt


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


# --------------------------------------------------------------------------------------------- build

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


@contextlib.contextmanager
def bundle_lock(bundle: Bundle):
    """Serialise engine builds on one bundle: two camera services starting together must not both write
    the same engine and race on bundle.yaml (that would leave a sha256 mismatch and a bundle that won't load)."""
    folder = bundle.path / ENGINE_DIR
    try:
        folder.mkdir(exist_ok=True)
        handle = open(folder / ".build.lock", "a+")
    except OSError:
        yield False  # read-only bundle: nothing will be written, so nothing to serialise
        return
    import fcntl

    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _keep_fp32(trt, layer, markers: tuple[str, ...]) -> bool:
    if layer.type in (trt.LayerType.MATRIX_MULTIPLY, trt.LayerType.REDUCE):
        return True
    return any(marker in layer.name for marker in markers)


def _pin_fp32_layers(trt, network, markers: tuple[str, ...]) -> int:
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if not _keep_fp32(trt, layer, markers):
            continue
        # Only float layers take a precision; shape/index layers (INT32/INT64/BOOL outputs) must be left alone.
        float_types = (trt.DataType.FLOAT, trt.DataType.HALF)
        if any(layer.get_output(o).dtype not in float_types for o in range(layer.num_outputs)):
            continue
        layer.precision = trt.DataType.FLOAT
        for o in range(layer.num_outputs):
            layer.set_output_type(o, trt.DataType.FLOAT)
        pinned += 1
    return pinned


def _make_calibrator(trt, source: CalibrationSource, input_shape: tuple[int, int, int]):
    """An entropy calibrator (IInt8EntropyCalibrator2) fed uint8 batches exactly as the graph takes them."""
    cudart = import_cudart()

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.buffer = HostDeviceBuffer((source.batch_size, *input_shape), np.uint8)
            self.iterator = source.batches()
            self.count = 0

        def get_batch_size(self):
            return source.batch_size

        def get_batch(self, names):
            batch = next(self.iterator, None)
            if batch is None:
                log.info("calibrated on %d batches of %d", self.count, source.batch_size)
                return None
            np.copyto(self.buffer.host, batch)
            cuda_call(cudart.cudaMemcpy(self.buffer.device, self.buffer.host.ctypes.data, self.buffer.nbytes,
                                        cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy")
            self.count += 1
            return [self.buffer.device]

        def read_calibration_cache(self):
            path = source.cache_path
            if path is not None and path.is_file():
                log.info("reusing INT8 calibration cache %s", path)
                return path.read_bytes()
            return None

        def write_calibration_cache(self, cache):
            if source.cache_path is not None:
                with contextlib.suppress(OSError):
                    source.cache_path.write_bytes(bytes(cache))

    return _Calibrator()


def _parse(trt, builder, logger, onnx_path: Path):
    major = int(str(trt.__version__).split(".")[0])
    flags = 0
    if major < 10:  # explicit batch is the only mode from TensorRT 10 on; the flag is gone in 11
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so model.onnx.data (external weights) is found beside the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        for error in errors:
            log.error("TensorRT ONNX parser: %s", error)
        first = errors[0].splitlines()[0] if errors else "unknown parser error"
        raise BackendError(f"{onnx_path}: TensorRT cannot parse the graph ({first})")
    return network, parser


def _check_network_io(trt, network, onnx_path: Path, size: tuple[int, int]) -> None:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].dtype != trt.DataType.UINT8:
        got = ", ".join(f"{t.name}:{t.dtype}" for t in inputs)
        raise BackendError(f"{onnx_path}: expected one input 'image' of type uint8, got {got}")
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if tuple(outputs[:2]) != OUTPUT_NAMES:
        raise BackendError(f"{onnx_path}: outputs are {outputs}, expected {list(OUTPUT_NAMES)}")
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or tuple(shape[1:]) != (size[0], size[1], 3):
        raise BackendError(f"{onnx_path}: input shape {shape} does not match bundle input_size {list(size)}")


def _load_timing_cache(config, path: Path):
    data = b""
    if path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, False):
        log.info("timing cache %s is from another GPU or TensorRT version: starting a fresh one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    elif data:
        log.info("reusing timing cache %s (%d kB)", path, len(data) // 1024)


def _set_precision(trt, config, network, options: BuildOptions, size: tuple[int, int], builder) -> None:
    if options.precision == "fp32":
        return
    if not hasattr(trt.BuilderFlag, "FP16"):
        raise BackendError(f"TensorRT {trt.__version__} has no fp16/int8 builder flags (removed in TensorRT 11): "
                           "build fp32 here, or use TensorRT 10")
    config.set_flag(trt.BuilderFlag.FP16)
    if options.precision == "int8":
        source = options.calibration
        if source is None:
            raise ConfigError("int8 needs calibration images (edge-export tensorrt --int8 --calib DIR)")
        config.set_flag(trt.BuilderFlag.INT8)
        shape = (source.batch_size, size[0], size[1], 3)
        calib_profile = builder.create_optimization_profile()
        calib_profile.set_shape(INPUT_NAME, shape, shape, shape)
        config.set_calibration_profile(calib_profile)
        config.int8_calibrator = _make_calibrator(trt, source, (size[0], size[1], 3))
    pinned = _pin_fp32_layers(trt, network, options.fp32_layer_markers)
    config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    if pinned == 0:
        log.warning("no layer kept in fp32 (no MatMul/Reduce layer, no layer named %s): large values may "
                    "saturate in %s", " or ".join(options.fp32_layer_markers), options.precision)
    else:
        log.info("%d distance layers kept in fp32 inside the %s engine", pinned, options.precision)


def build_serialized(bundle: Bundle, options: BuildOptions) -> bytes:
    """Parse the bundle's ONNX and build a serialized engine; the timing cache in the bundle is reused/updated."""
    options.validate()
    trt = import_tensorrt()
    logger = trt_logger(trt)
    size = bundle.input_size
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, bundle.onnx_path)
    _check_network_io(trt, network, bundle.onnx_path, size)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, size[0], size[1], 3), (options.opt_batch, size[0], size[1], 3),
                      (options.max_batch, size[0], size[1], 3))
    config.add_optimization_profile(profile)
    cache_path = bundle.path / TIMING_CACHE
    _load_timing_cache(config, cache_path)
    _set_precision(trt, config, network, options, size, builder)

    log.info("building %s TensorRT engine for %s (batch 1/%d/%d, workspace %d MB)", options.precision,
             bundle.onnx_path, options.opt_batch, options.max_batch, options.workspace_mb)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        # The graph parsed and checked, so this is the builder itself (most often out of GPU memory on a
        # busy Jetson): worth a restart, unlike a graph TensorRT cannot parse.
        raise BackendRuntimeError(f"{bundle.onnx_path}: TensorRT engine build failed (see the TensorRT errors "
                                  "above)")
    with contextlib.suppress(OSError):
        _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _write_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, data)


def _record(bundle: Bundle, rel: str) -> None:
    """Add the engine to bundle.yaml, re-reading it first so entries written by another process survive."""
    fresh = Bundle.load(bundle.path, verify=False)
    fresh.add_file(rel)
    bundle.meta.files[rel] = fresh.meta.files[rel]


def _build_and_save(bundle: Bundle, options: BuildOptions, device: DeviceInfo, writable: bool) -> BuildResult:
    """Build and store the engine; the caller holds `bundle_lock` (flock locks do not nest, even in one process)."""
    rel = f"{ENGINE_DIR}/{engine_filename(device, options.precision)}"
    start = time.monotonic()
    engine = build_serialized(bundle, options)
    seconds = time.monotonic() - start
    saved = False
    if writable:
        try:
            _write_atomic(bundle.path / rel, engine)
            _record(bundle, rel)
            saved = True
        except OSError as err:
            log.warning("could not save %s in the bundle (%s): the engine is used but rebuilt next start", rel, err)
    return BuildResult(rel_path=rel, seconds=seconds, engine=engine, saved=saved)


def build_engine(bundle: Bundle, options: BuildOptions, device: DeviceInfo | None = None) -> BuildResult:
    """Build, write to engines/<gpu>_sm<cc>_trt<version>_<precision>.engine and record it in bundle.yaml."""
    options.validate()
    device = device or probe_device()
    with bundle_lock(bundle) as writable:
        return _build_and_save(bundle, options, device, writable)


def has_weak_precision_flags() -> bool:
    """TensorRT 11 removed BuilderFlag.FP16/INT8 (strong typing only): there, engines follow the ONNX types."""
    return hasattr(import_tensorrt().BuilderFlag, "FP16")


def _read_verified(bundle: Bundle, rel: str) -> bytes:
    data = (bundle.path / rel).read_bytes()
    if hashlib.sha256(data).hexdigest() != bundle.meta.files[rel]:
        raise BackendError(f"{bundle.path / rel}: sha256 mismatch (engine altered or truncated since the "
                           "bundle was loaded)")
    return data


def engine_cache_dir(bundle: Bundle, environ: dict[str, str] | None = None) -> Path | None:
    """Where the service keeps engines it built itself when the bundle folder is read-only.

    Under the unit, `ProtectSystem=strict` makes /opt (and so the bundle) read-only; systemd passes the
    unit's `StateDirectory=` as $STATE_DIRECTORY (/var/lib/edge-inspector), which stays writable. One
    sub-folder per model.onnx sha256, so an engine is never used with another graph.
    """
    state = (os.environ if environ is None else environ).get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state) / "engines" / bundle.sha256[:16] if state else None


def read_cached_engine(folder: Path, device: DeviceInfo, precision: str | None) -> tuple[str, bytes] | None:
    """(path, bytes) of a cached engine for this device whose sha256 sidecar matches; None otherwise."""
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
        recorded = Path(str(path) + ".sha256").read_text().strip()
    except OSError as err:
        log.warning("ignoring cached engine %s (%s); building a new one", path, err)
        return None
    if hashlib.sha256(data).hexdigest() != recorded:
        log.warning("ignoring cached engine %s: sha256 mismatch (truncated or altered); building a new one", path)
        return None
    return str(path), data


def save_cached_engine(folder: Path, filename: str, data: bytes) -> Path:
    """Store an engine and its sha256 sidecar (engine first: a sidecar never vouches for a partial file)."""
    path = folder / filename
    _write_atomic(path, data)
    _write_atomic(Path(str(path) + ".sha256"), hashlib.sha256(data).hexdigest().encode())
    return path


def ensure_engine(bundle: Bundle, device: DeviceInfo, precision: str | None,
                  max_batch: int = DEFAULT_MAX_BATCH) -> tuple[str, bytes]:
    """The matching engine's (path, bytes), building one first when the bundle has none for this device.

    Order: an engine recorded in the bundle, one cached in the state directory, else build (minutes: the
    service keeps systemd's start timeout extended meanwhile) and save it in the bundle when writable,
    else in the state directory.
    """
    chosen = select_engine(bundle.meta.files, device, precision)
    if chosen is not None:
        return chosen, _read_verified(bundle, chosen)
    cache = engine_cache_dir(bundle)
    cached = read_cached_engine(cache, device, precision) if cache is not None else None
    if cached is not None:
        log.info("using TensorRT engine %s built earlier by this service", cached[0])
        return cached
    with bundle_lock(bundle) as writable:
        # Another service on this device may have built it while we waited for the lock.
        with contextlib.suppress(Exception):
            bundle.meta.files.update(Bundle.load(bundle.path, verify=False).meta.files)
        chosen = select_engine(bundle.meta.files, device, precision)
        if chosen is not None:
            return chosen, _read_verified(bundle, chosen)
        if precision is None:
            precision = default_precision(device.compute_capability)
            if precision != "fp32" and not has_weak_precision_flags():
                precision = "fp32"
        tiles = bundle.meta.tiling.tiles
        options = BuildOptions(precision=precision, max_batch=max(max_batch, tiles), opt_batch=tiles)
        log.warning("no TensorRT engine in %s for %s (sm%s, TensorRT %s): building a %s engine now, this "
                    "takes minutes", bundle.path, device.gpu_name, device.sm, device.trt_version, precision)
        result = _build_and_save(bundle, options, device, writable)
    if not result.saved and cache is not None:
        try:
            path = save_cached_engine(cache, result.rel_path.rpartition("/")[2], result.engine)
            log.warning("built %s in %.1f s; the bundle folder is read-only, saved in %s", result.rel_path,
                        result.seconds, path)
            return str(path), result.engine
        except OSError as err:
            log.warning("could not save the engine in %s (%s)", cache, err)
    log.warning("built %s in %.1f s%s", result.rel_path, result.seconds,
                "" if result.saved else " (not saved: bundle folder is read-only and no state directory)")
    return result.rel_path, result.engine
