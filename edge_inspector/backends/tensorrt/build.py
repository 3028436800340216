"""Building a strongly typed TensorRT engine from a bundle's ONNX graph, with one optimisation profile.

Why strongly typed: TensorRT 11 builds nothing else (it removed the fp16/int8 builder flags, the precision
constraints and implicit INT8), and on TensorRT 10 the `STRONGLY_TYPED` network flag gives the same
behaviour. Each tensor then has exactly the type the ONNX graph gives it, so an engine computes what ONNX
Runtime computes on the same graph: `model.onnx` gives an fp32 engine, the mixed-precision
`engines/model.fp16.onnx` an fp16 network with the distance in fp32. TF32 (on by default, it rounds fp32
MatMul/Conv inputs to 10-bit mantissas) is switched off so fp32 means fp32.

Why the documented builder API rather than Polygraphy (`NetworkFromOnnxPath`/`CreateConfig`/
`EngineBytesFromNetwork`): the build is a dozen documented calls here; Polygraphy would shorten the parse
and timing-cache parts by about twenty lines but adds a dependency to every device (first-start builds run
there), logs through its own stdout logger rather than Python logging/journald, raises its own exception
type where the service must tell a graph the user must fix (exit 2) from a build a restart may fix (exit 1),
and writes timing caches in place where ours are written atomically.

Why on the device side: an engine is valid for one GPU model and TensorRT version only, so a device must be
able to build its own on first start, without torch or the training code. `edge-export tensorrt` is a thin
command line over `build_engine`, so both paths produce identical engines.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_inspector.backends.base import BackendRuntimeError
from edge_inspector.backends.tensorrt.cuda import import_tensorrt, probe_device, trt_logger
from edge_inspector.backends.tensorrt.engines import (
    ENGINE_DIR,
    INPUT_NAME,
    MIXED_GRAPH,
    OUTPUT_NAMES,
    PRECISIONS,
    PREFERENCE,
    TIMING_CACHE,
    DeviceInfo,
    default_precision,
    engine_cache_dir,
    engine_filename,
    graph_for,
    read_cached_engine,
    read_verified,
    save_cached_engine,
    select_engine,
)
from edge_inspector.core.atomic import write_atomic
from edge_inspector.core.bundle import MODEL_FILE, Bundle
from edge_inspector.core.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- batch sizes


def frame_group(bundle: Bundle) -> int:
    """Images that must travel together: K for a per-tile bundle (K tiles of one frame, in order), else 1."""
    tiling = bundle.meta.tiling
    return tiling.tiles if tiling.mode == "per_tile" else 1


def resolve_tiles(bundle: Bundle, tiles: int | None = None) -> int:
    """The batch one frame makes: `tiles` when given (a shared bundle run on a grid), else the bundle's tiling.

    A per-tile bundle has K = rows x cols tiles baked into its graph, so it can only ever run K, 2K, ...
    images at once: any other figure is refused here, before a build of minutes.
    """
    group = frame_group(bundle)
    if tiles is None:
        return max(bundle.meta.tiling.tiles, group)
    if tiles < 1:
        raise ConfigError(f"--tiles must be >= 1, got {tiles}")
    if tiles % group:
        raise ConfigError(f"--tiles {tiles} is not a multiple of the {group} tiles this per-tile bundle was fitted "
                          f"with ({bundle.meta.tiling.rows}x{bundle.meta.tiling.cols}): use {group} or a multiple")
    return tiles


def profile_batches(tiles: int, group: int) -> tuple[int, int, int]:
    """(min, opt, max) batch of the optimisation profile: tuned for, and capped at, one frame's tiles.

    Capped at one frame because the service runs one frame per call: a larger max only costs build time and
    memory, a smaller one splits every frame (the old default of 8 ran a 12-tile frame as 8 + 4). min is
    the group, so a per-tile engine never accepts a batch that is not whole frames.
    """
    if tiles < 1 or group < 1 or tiles % group:
        raise ConfigError(f"a profile of {tiles} images is not whole groups of {group}")
    return group, tiles, tiles


# ------------------------------------------------------------------------------------------- options


@dataclass
class BuildOptions:
    precision: str = "fp16"  # fp16: build from the mixed graph; fp32: from model.onnx
    tiles: int | None = None  # images per call the profile is built for; None: the bundle's tiles per frame
    workspace_mb: int = 1024

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} unknown (expected one of {', '.join(PRECISIONS)})")
        if self.tiles is not None and self.tiles < 1:
            raise ConfigError(f"--tiles must be >= 1, got {self.tiles}")
        if self.workspace_mb < 16:
            raise ConfigError(f"--workspace must be >= 16 MB, got {self.workspace_mb}")


@dataclass
class BuildResult:
    rel_path: str
    seconds: float
    profile: tuple[int, int, int]
    engine: bytes = field(repr=False)
    saved: bool  # False when the bundle folder is read-only: the engine lives for this process only


# ------------------------------------------------------------------------------------------- TensorRT


def _network_flags(trt) -> int:
    """STRONGLY_TYPED on TensorRT 10 (opt-in there); on 11 every network is strongly typed and the flag, if
    still present, is accepted and ignored. EXPLICIT_BATCH is never set: the only mode since 10, gone in 11."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _parse(trt, builder, logger, onnx_path: Path, graph: bytes | None = None):
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # `graph`: the verified bytes (the engine is built from what was hashed); the path still lets the parser
    # find external weights beside the model. Without bytes (the workstation's own files), parse the file.
    parsed = parser.parse(graph, str(onnx_path)) if graph is not None else parser.parse_from_file(str(onnx_path))
    if not parsed:
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
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    if tuple(o.name for o in outputs[:2]) != OUTPUT_NAMES or any(o.dtype != trt.DataType.FLOAT for o in outputs[:2]):
        got = ", ".join(f"{o.name}:{o.dtype}" for o in outputs)
        raise BackendError(f"{onnx_path}: outputs are {got}, expected anomaly_map and score of type float32")
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or tuple(shape[1:]) != (size[0], size[1], 3):
        raise BackendError(f"{onnx_path}: input shape {shape} does not match bundle input_size {list(size)}")


def _load_timing_cache(config, path: Path) -> None:
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, False):
        log.info("timing cache %s is from another GPU or TensorRT version: starting a fresh one", path)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    elif data:
        log.info("reusing timing cache %s (%d kB)", path, len(data) // 1024)


def _config(trt, builder, options: BuildOptions, size: tuple[int, int], batches: tuple[int, int, int]):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    low, opt, high = ((b, size[0], size[1], 3) for b in batches)
    profile.set_shape(INPUT_NAME, low, opt, high)
    config.add_optimization_profile(profile)
    return config


def build_serialized(onnx_path: Path, size: tuple[int, int], options: BuildOptions, batches: tuple[int, int, int],
                     timing_cache: Path | None = None, graph: bytes | None = None) -> bytes:
    """Parse `onnx_path` (or its verified bytes `graph`) into a strongly typed network and build a serialized
    engine for `batches`."""
    options.validate()
    trt = import_tensorrt()
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path, graph)
    _check_network_io(trt, network, onnx_path, size)
    config = _config(trt, builder, options, size, batches)
    if timing_cache is not None:
        _load_timing_cache(config, timing_cache)
    log.info("building a strongly typed TensorRT %s engine from %s (batch %d/%d/%d, workspace %d MB)",
             trt.__version__, onnx_path, *batches, options.workspace_mb)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        # The graph parsed and checked, so this is the builder itself (most often out of GPU memory on a
        # busy Jetson): worth a restart, unlike a graph TensorRT cannot parse.
        raise BackendRuntimeError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT errors above)")
    if timing_cache is not None:
        with contextlib.suppress(OSError):
            write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


# ------------------------------------------------------------------------------------------- bundle


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


def record_file(bundle: Bundle, rel: str) -> None:
    """Add a file to bundle.yaml, re-reading it first so entries written by another process survive."""
    fresh = Bundle.load(bundle.path, verify=False)
    fresh.add_file(rel)
    bundle.meta.files[rel] = fresh.meta.files[rel]


def _build_and_save(bundle: Bundle, options: BuildOptions, device: DeviceInfo, writable: bool) -> BuildResult:
    """Build and store the engine; the caller holds `bundle_lock` (flock locks do not nest, even in one process)."""
    rel = f"{ENGINE_DIR}/{engine_filename(device, options.precision)}"
    batches = profile_batches(resolve_tiles(bundle, options.tiles), frame_group(bundle))
    start = time.monotonic()
    graph_path = graph_for(bundle, options.precision)
    graph = bundle.read_verified(graph_path.relative_to(bundle.path).as_posix())  # built from what was hashed
    engine = build_serialized(graph_path, bundle.input_size, options, batches,
                              bundle.path / TIMING_CACHE if writable else None, graph=graph)
    seconds = time.monotonic() - start
    saved = False
    if writable:
        try:
            write_atomic(bundle.path / rel, engine)
            record_file(bundle, rel)
            saved = True
        except OSError as err:
            log.warning("could not save %s in the bundle (%s): the engine is used but rebuilt next start", rel, err)
    return BuildResult(rel_path=rel, seconds=seconds, profile=batches, engine=engine, saved=saved)


def build_engine(bundle: Bundle, options: BuildOptions, device: DeviceInfo | None = None) -> BuildResult:
    """Build, write to engines/<gpu>_sm<cc>_trt<version>_<precision>.engine and record it in bundle.yaml."""
    options.validate()
    resolve_tiles(bundle, options.tiles)  # a bad --tiles fails before the GPU is touched
    device = device or probe_device()
    with bundle_lock(bundle) as writable:
        return _build_and_save(bundle, options, device, writable)


def first_start_precision(bundle: Bundle, device: DeviceInfo) -> str:
    """fp16 where the GPU has fast fp16 and the bundle carries the mixed graph; fp32 otherwise (logged)."""
    if default_precision(device.compute_capability) != "fp16":
        return "fp32"
    if MIXED_GRAPH not in bundle.meta.files:
        log.warning("%s has no %s: building fp32 (run `edge-export tensorrt %s --graph-only` on the workstation "
                    "for the faster fp16 engine)", bundle.path, MIXED_GRAPH, bundle.path)
        return "fp32"
    return "fp16"


def _graph_sha256(bundle: Bundle, precision: str) -> str:
    return bundle.meta.files[MIXED_GRAPH if precision == "fp16" else MODEL_FILE]


def _cached(bundle: Bundle, device: DeviceInfo, precision: str | None) -> tuple[str, bytes] | None:
    cache = engine_cache_dir(bundle)
    if cache is None:
        return None
    for wanted in ([precision] if precision else PREFERENCE):
        if wanted == "fp16" and MIXED_GRAPH not in bundle.meta.files:
            continue
        found = read_cached_engine(cache, device, wanted, _graph_sha256(bundle, wanted))
        if found is not None:
            return found
    return None


def ensure_engine(bundle: Bundle, device: DeviceInfo, precision: str | None,
                  tiles: int | None = None) -> tuple[str, bytes]:
    """The matching engine's (path, bytes), building one first when the bundle has none for this device.

    Order: an engine recorded in the bundle, one cached in the state directory, else build (minutes: the
    service keeps systemd's start timeout extended meanwhile) and save it in the bundle when writable,
    else in the state directory.
    """
    chosen = select_engine(bundle.meta.files, device, precision)
    if chosen is not None:
        return chosen, read_verified(bundle, chosen)
    cached = _cached(bundle, device, precision)
    if cached is not None:
        log.info("using TensorRT engine %s built earlier by this service", cached[0])
        return cached
    with bundle_lock(bundle) as writable:
        # Another service on this device may have built it while we waited for the lock (not with signatures
        # required: an engine recorded in bundle.yaml after signing is not trusted; see core.bundle).
        if not bundle.signed_only:
            with contextlib.suppress(Exception):
                bundle.meta.files.update(Bundle.load(bundle.path, verify=False).meta.files)
        chosen = select_engine(bundle.meta.files, device, precision)
        if chosen is not None:
            return chosen, read_verified(bundle, chosen)
        precision = precision or first_start_precision(bundle, device)
        options = BuildOptions(precision=precision, tiles=tiles)
        log.warning("no TensorRT engine in %s for %s (sm%s, TensorRT %s): building a %s engine now, this "
                    "takes minutes", bundle.path, device.gpu_name, device.sm, device.trt_version, precision)
        # With signatures required, an engine written into the bundle would not be trusted next start: keep it
        # in the service's state directory instead (_keep).
        result = _build_and_save(bundle, options, device, writable and not bundle.signed_only)
    return _keep(bundle, result, _graph_sha256(bundle, precision))


def _keep(bundle: Bundle, result: BuildResult, graph_sha256: str) -> tuple[str, bytes]:
    """Where a first-start engine ends up: the bundle, else the state directory, else this process only."""
    cache = engine_cache_dir(bundle)
    if not result.saved and cache is not None:
        try:
            path = save_cached_engine(cache, result.rel_path.rpartition("/")[2], result.engine, graph_sha256)
            log.warning("built %s in %.1f s; the bundle folder is read-only, saved in %s", result.rel_path,
                        result.seconds, path)
            return str(path), result.engine
        except OSError as err:
            log.warning("could not save the engine in %s (%s)", cache, err)
    log.warning("built %s in %.1f s%s", result.rel_path, result.seconds,
                "" if result.saved else " (not saved: bundle folder is read-only and no state directory)")
    return result.rel_path, result.engine
