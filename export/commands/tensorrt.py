"""`edge-export tensorrt BUNDLE`: write the mixed-precision graph and build a TensorRT engine into the bundle.

The builder lives in `edge_inspector.backends.tensorrt.build` (the device needs it for first-start builds);
this module adds what only a person at a terminal needs: the mixed-precision graph (`export.mixed_precision`,
needs the `onnx` package), a check of the graph against TensorRT's documented ONNX restrictions, and the
command line. It imports neither torch nor TensorRT at module level, so it also runs on a Jetson without
the training stack.

No INT8: TensorRT's implicit INT8 calibration is deprecated since 10.1 and removed in 11 (see docs/jetson.md
for what explicit quantisation would take).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from edge_inspector.backends.tensorrt.build import (
    BuildOptions,
    build_engine,
    bundle_lock,
    frame_group,
    record_file,
    resolve_tiles,
)
from edge_inspector.backends.tensorrt.engines import ENGINE_DIR, MIXED_GRAPH, default_precision, parse_engine_filename
from edge_inspector.core.bundle import Bundle, write_meta
from edge_inspector.core.errors import BackendError, BundleError, ConfigError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- graph check (TensorRT 10 ONNX parser rules)

# Operators the TensorRT 10 ONNX parser does not import (onnx-tensorrt docs/operators.md, "N" rows).
UNSUPPORTED_OPS = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "CenterCropPad",
    "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique"})
RESIZE_COORDINATE_MODES = frozenset({"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                                     "align_corners"})
# Highest opset every TensorRT we deploy on parses: 8.5/8.6 (JetPack 5.1 / 6.0) stop at 17, 10.0 at 20.
PORTABLE_OPSET = 17
_ONNX_FLOAT, _ONNX_FLOAT16, _ONNX_UINT8 = 1, 10, 2


@dataclass
class GraphCheck:
    errors: list[str] = field(default_factory=list)  # the TensorRT parser/builder will refuse these
    warnings: list[str] = field(default_factory=list)  # builds on TensorRT 10, not on older JetPacks


def _constant_names(graph) -> set[str]:
    names = {init.name for init in graph.initializer}
    names.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    return names


def _attr(node, name: str, default=None):
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _node_label(node) -> str:
    return f"{node.op_type} node {node.name or '(unnamed)'!r}"


def _check_node(node, constants: set[str], opset: int, result: GraphCheck) -> None:
    op, label = node.op_type, _node_label(node)
    if node.domain not in ("", "ai.onnx"):
        result.errors.append(f"{label}: custom domain {node.domain!r} (TensorRT would need a plugin)")
    elif op in UNSUPPORTED_OPS:
        result.errors.append(f"{label}: operator not supported by the TensorRT ONNX parser")
    elif op == "Resize":
        if _attr(node, "mode", "nearest") not in ("nearest", "linear"):
            result.errors.append(f"{label}: mode {_attr(node, 'mode')!r} (TensorRT resizes nearest or linear only)")
        if _attr(node, "coordinate_transformation_mode", "half_pixel") not in RESIZE_COORDINATE_MODES:
            result.errors.append(f"{label}: coordinate_transformation_mode "
                                 f"{_attr(node, 'coordinate_transformation_mode')!r} unsupported by TensorRT")
        if _attr(node, "antialias", 0):
            result.errors.append(f"{label}: antialias=1 is not supported by TensorRT")
    elif op == "Clip" and any(name and name not in constants for name in node.input[1:]):
        result.warnings.append(f"{label}: min/max computed at run time (TensorRT 10 falls back to element-wise "
                               "max/min; older TensorRT requires initializers)")
    elif op in ("MaxPool", "AveragePool"):
        if any(d != 1 for d in (_attr(node, "dilations") or [])):
            result.errors.append(f"{label}: dilations must be 1 for TensorRT pooling")
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            result.errors.append(f"{label}: the Indices output is not supported by TensorRT")
    elif op.startswith("Reduce") and len(node.input) > 1 and node.input[1] and node.input[1] not in constants:
        result.errors.append(f"{label}: axes must be a constant (TensorRT restriction)")
    elif op == "Pad" and len(node.input) > 1 and node.input[1] not in constants and opset >= 11:
        result.warnings.append(f"{label}: pads computed at run time (fine on TensorRT 10; fold constants for "
                               "TensorRT 8.x, e.g. polygraphy surgeon sanitize --fold-constants)")


def check_graph(onnx_path: Path, input_name: str = "image") -> GraphCheck:
    """Check an exported bundle graph against the TensorRT ONNX parser's documented restrictions.

    Runs without TensorRT or a GPU, so an export that TensorRT would refuse is caught on the workstation.
    The key rule: TensorRT accepts UINT8 only as network input/output and converts it only to float32 or
    float16, so the uint8 `image` must go straight into a Cast to float before any Transpose/Gather/Slice.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    result = GraphCheck()
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > PORTABLE_OPSET:
        result.warnings.append(f"opset {opset} > {PORTABLE_OPSET}: TensorRT 8.5/8.6 (JetPack 5.1/6.0) cannot parse "
                               "it; TensorRT 10 parses opsets 9 to 20 or more")
    uint8_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == _ONNX_UINT8}
    constants = _constant_names(graph)
    for node in graph.node:
        for name in node.input:
            to_float = node.op_type == "Cast" and _attr(node, "to") in (_ONNX_FLOAT, _ONNX_FLOAT16)
            if name in uint8_inputs and not to_float:
                result.errors.append(f"{_node_label(node)} consumes the uint8 input {name!r}: TensorRT takes UINT8 "
                                     "only into a Cast to float32/float16; cast before transposing or reordering")
        _check_node(node, constants, opset, result)
    if input_name not in {i.name for i in graph.input}:
        result.errors.append(f"graph input {input_name!r} missing")
    return result


# ---------------------------------------------------------------- mixed-precision graph


def mixed_graph_is_current(bundle: Bundle) -> bool:
    """The bundle records a mixed graph made from its present model.onnx (sha256 kept in the graph's metadata).

    Read with ONNX Runtime (a device dependency), so a device without the onnx package can still tell.
    """
    import onnxruntime as ort

    from export.mixed_precision import SOURCE_KEY

    path = bundle.path / MIXED_GRAPH
    if MIXED_GRAPH not in bundle.meta.files or not path.is_file():
        return False
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.get_modelmeta().custom_metadata_map.get(SOURCE_KEY) == bundle.sha256


def _forget_fp16_engines(bundle: Bundle) -> None:
    """Drop recorded fp16 engines: they were built from the mixed graph being replaced."""
    fresh = Bundle.load(bundle.path, verify=False)
    stale = [rel for rel in fresh.meta.files
             if rel.startswith(f"{ENGINE_DIR}/") and (spec := parse_engine_filename(rel.rpartition("/")[2]))
             and spec.precision == "fp16"]
    for rel in stale:
        del fresh.meta.files[rel]
        (bundle.path / rel).unlink(missing_ok=True)
        bundle.meta.files.pop(rel, None)
        log.info("removed %s: built from the previous mixed-precision graph", rel)
    if stale:
        write_meta(bundle.path, fresh.meta)


def _smoke_run(path: Path, bundle: Bundle) -> None:
    """ONNX Runtime loads the graph and one frame gives finite outputs: the graph is valid, not just well typed."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    frame = np.full((frame_group(bundle), *bundle.input_size, 3), 128, np.uint8)
    maps, scores = session.run(["anomaly_map", "score"], {"image": frame})
    if maps.dtype != np.float32 or not (np.isfinite(maps).all() and np.isfinite(scores).all()):
        raise BundleError(f"{path}: the mixed-precision graph gives non-finite or non-fp32 outputs")


def ensure_mixed_graph(bundle: Bundle) -> bool:
    """Write engines/model.fp16.onnx (fp16 network, fp32 distance) into the bundle unless it is current.

    Returns True when it was (re)written. Needs the `onnx` package; on a device without it, write the graph
    on the workstation with `--graph-only` and copy the bundle.
    """
    if mixed_graph_is_current(bundle):
        return False
    try:
        import onnx  # noqa: F401  (the rewrite's dependency: a workstation package, optional on the device)

        from export.mixed_precision import write_mixed_graph
    except ImportError as err:
        raise ConfigError(f"writing {MIXED_GRAPH} needs the onnx package ({err}); run `edge-export tensorrt "
                          f"{bundle.path} --graph-only` on the workstation, or build with --precision fp32") from None
    with bundle_lock(bundle) as writable:
        if not writable:
            raise BackendError(f"{bundle.path}: folder is read-only, cannot write {MIXED_GRAPH}")
        target = bundle.path / MIXED_GRAPH
        report = write_mixed_graph(bundle.onnx_path, target)
        _smoke_run(target, bundle)
        _forget_fp16_engines(bundle)
        record_file(bundle, MIXED_GRAPH)
    log.info("wrote %s: %d nodes in fp16, %d in fp32, %d Casts at the boundaries", target, report.fp16_nodes,
             report.fp32_nodes, report.casts_to_fp16 + report.casts_to_fp32)
    return True


# ---------------------------------------------------------------- command line


def options_from_cli(bundle: Bundle | None, precision: str | None, tiles: int | None,
                     workspace_mb: int) -> BuildOptions:
    """Turn flags into validated BuildOptions (a bad value is a one-line ConfigError, exit 2).

    `precision` None is decided later from the GPU (fp16 where it is fast); `tiles` None is the bundle's
    tiles per frame, and a per-tile bundle refuses a figure that is not a multiple of its tiles.
    """
    options = BuildOptions(precision=precision or "fp16", tiles=tiles, workspace_mb=workspace_mb)
    options.validate()
    if bundle is not None:
        resolve_tiles(bundle, tiles)
    return options


@click.command("tensorrt")
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default=None,
              help="fp16: the mixed graph (fp16 network, fp32 distance); fp32: model.onnx as is. "
                   "[default: fp16 where the GPU has fast fp16]")
@click.option("--tiles", type=int, default=None,
              help="Images per call the engine is built for [default: tiles per frame from bundle.yaml]; "
                   "set it for a shared bundle the service runs on a grid.")
@click.option("--workspace", "workspace_mb", default=1024, show_default=True, help="Builder workspace in MB.")
@click.option("--graph-only", is_flag=True,
              help="Only write the mixed-precision graph into the bundle (no TensorRT needed: run it on the "
                   "workstation so devices can build fp16 engines on first start).")
@click.option("--check-only", is_flag=True, help="Only check the graph against TensorRT's ONNX restrictions.")
def tensorrt_command(bundle_path: Path, precision: str | None, tiles: int | None, workspace_mb: int,
                     graph_only: bool, check_only: bool) -> None:
    """Build a strongly typed TensorRT engine for this GPU into BUNDLE/engines/ and record it in bundle.yaml."""
    options_from_cli(None, precision, tiles, workspace_mb)  # flag errors before any I/O
    bundle = Bundle.load(bundle_path)
    options = options_from_cli(bundle, precision, tiles, workspace_mb)
    checked = _report_graph_check(bundle.onnx_path)
    if check_only:
        if not checked:
            raise ConfigError("--check-only needs the onnx package (pip install onnx)")
        click.echo(f"{bundle.onnx_path}: no TensorRT incompatibilities found")
        return
    if graph_only:
        written = ensure_mixed_graph(bundle)
        _report_graph_check(bundle.path / MIXED_GRAPH)
        click.echo(f"{bundle.path / MIXED_GRAPH}: {'written' if written else 'already current'} "
                   "(fp16 network, fp32 distance)")
        return
    _build(bundle, options, precision)


def _build(bundle: Bundle, options: BuildOptions, precision: str | None) -> None:
    from edge_inspector.backends.tensorrt.cuda import probe_device
    from edge_inspector.backends.tensorrt.runtime import unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise BackendError(f"cannot build a TensorRT engine on this machine: {reason}")
    device = probe_device()
    options.precision = precision or default_precision(device.compute_capability)
    if options.precision == "fp16":
        ensure_mixed_graph(bundle)
        _report_graph_check(bundle.path / MIXED_GRAPH)
    result = build_engine(bundle, options, device)
    if not result.saved:
        raise BackendError(f"{bundle.path}: engine built but could not be written (read-only bundle folder?)")
    low, opt, high = result.profile
    click.echo(f"{bundle.path / result.rel_path}: {options.precision} engine for {device.gpu_name} "
               f"(sm{device.sm}, TensorRT {device.trt_version}), batch {low}..{high} tuned for {opt}, "
               f"{len(result.engine) / 1e6:.1f} MB, built in {result.seconds:.1f} s")


def _report_graph_check(onnx_path: Path) -> bool:
    """Log the graph check's warnings, raise on its first error; False when it could not run."""
    try:
        result = check_graph(onnx_path)
    except ImportError:  # the onnx package is a workstation dependency; the device may lack it
        log.info("onnx not installed: skipping the graph check")
        return False
    for warning in result.warnings:
        log.warning("%s: %s", onnx_path, warning)
    if result.errors:
        more = f" (+{len(result.errors) - 1} more, see log)" if len(result.errors) > 1 else ""
        for error in result.errors:
            log.error("%s: %s", onnx_path, error)
        raise BundleGraphError(f"{onnx_path}: {result.errors[0]}{more}")
    return True


class BundleGraphError(BackendError):
    """The bundle's graph uses something TensorRT refuses; the export must change."""
