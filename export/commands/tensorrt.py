"""`edge-export tensorrt BUNDLE`: build a TensorRT engine for this GPU into the bundle.

The builder itself lives in `edge_inspector.backends.tensorrt.engines` (the device needs it for first-start
builds); this module adds what only a person at a terminal needs: INT8 calibration images, a check of the
graph against TensorRT's documented ONNX restrictions, and the command line. It imports neither torch nor
TensorRT at module level, so `edge-export tensorrt` also runs on a Jetson without the training stack.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import click
import numpy as np

from edge_inspector.backends.tensorrt.engines import (ENGINE_DIR, BuildOptions, CalibrationSource, build_engine,
                                                     probe_device)
from edge_inspector.core.bundle import Bundle
from edge_inspector.core.errors import BackendError, ConfigError, DataError
from edge_inspector.core.images import iter_readable, list_images, resize_to

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


# ---------------------------------------------------------------- INT8 calibration data

def calibration_source(folder: Path, bundle: Bundle, batch_size: int, limit: int = 500) -> CalibrationSource:
    """Good images from `folder`, fed exactly as the graph receives them: uint8 BGR NHWC at the input size.

    Tiled bundles are calibrated on tiles cut by the same Tiler the service uses, so activation ranges match
    what the engine will see on the line. The last batch is padded by repeating images because the
    calibration profile has a fixed batch size.
    """
    paths = list_images(folder)[:limit]
    if not paths:
        raise DataError(f"{folder}: no images (png, jpg, bmp, tiff) found for INT8 calibration")
    tiling = bundle.meta.tiling
    tiler = None
    if tiling.tiles > 1:
        from edge_inspector.core.tiling import Tiler

        tiler = Tiler(tiling.rows, tiling.cols, bundle.input_size)

    def samples() -> Iterator[np.ndarray]:
        for _, image in iter_readable(paths, log):
            yield from (tiler.split(image) if tiler else resize_to(image, bundle.input_size)[None])

    def batches() -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        for sample in samples():
            pending.append(sample)
            if len(pending) == batch_size:
                yield np.stack(pending)
                pending = []
        if pending:
            pending.extend(pending[i % len(pending)] for i in range(batch_size - len(pending)))
            yield np.stack(pending)

    listing = "\n".join(f"{p.name}:{p.stat().st_size}" for p in paths)
    key = hashlib.sha256(f"{batch_size}\n{listing}".encode()).hexdigest()[:12]
    return CalibrationSource(batch_size=batch_size, batches=batches,
                             cache_path=bundle.path / ENGINE_DIR / f"int8_calibration_{key}.cache")


# ---------------------------------------------------------------- command line

def options_from_cli(bundle: Bundle | None, fp16: bool, int8: bool, calib: Path | None, max_batch: int,
                     opt_batch: int | None, workspace_mb: int) -> BuildOptions:
    """Turn flags into validated BuildOptions (a bad combination is a one-line ConfigError, exit 2)."""
    if calib is not None and not int8:
        raise ConfigError("--calib is only used with --int8")
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    tiles = bundle.meta.tiling.tiles if bundle is not None else 1
    options = BuildOptions(precision=precision, max_batch=max_batch,
                           opt_batch=opt_batch if opt_batch is not None else min(tiles, max_batch),
                           workspace_mb=workspace_mb)
    if int8 and calib is None:
        raise ConfigError("--int8 needs --calib DIR with good images to calibrate on")
    options.validate()
    return options


@click.command("tensorrt")
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option("--fp16", is_flag=True, help="Half precision (distance layers stay fp32).")
@click.option("--int8", is_flag=True, help="INT8 with entropy calibration on --calib images (implies fp16).")
@click.option("--calib", type=click.Path(path_type=Path), help="Folder of good images for INT8 calibration.")
@click.option("--calib-limit", default=500, show_default=True, help="Use at most this many calibration images.")
@click.option("--max-batch", default=8, show_default=True, help="Largest batch the engine accepts.")
@click.option("--opt-batch", type=int, default=None, help="Batch the engine is tuned for [tiles per frame].")
@click.option("--workspace", "workspace_mb", default=1024, show_default=True, help="Builder workspace in MB.")
@click.option("--check-only", is_flag=True, help="Only check the graph against TensorRT's ONNX restrictions.")
def tensorrt_command(bundle_path: Path, fp16: bool, int8: bool, calib: Path | None, calib_limit: int,
                     max_batch: int, opt_batch: int | None, workspace_mb: int, check_only: bool) -> None:
    """Build a TensorRT engine for this GPU into BUNDLE/engines/ and record it in bundle.yaml."""
    options_from_cli(None, fp16, int8, calib, max_batch, opt_batch, workspace_mb)  # flag errors before any I/O
    bundle = Bundle.load(bundle_path)
    options = options_from_cli(bundle, fp16, int8, calib, max_batch, opt_batch, workspace_mb)
    checked = _report_graph_check(bundle)
    if check_only:
        if not checked:
            raise ConfigError("--check-only needs the onnx package (pip install onnx)")
        click.echo(f"{bundle.onnx_path}: no TensorRT incompatibilities found")
        return
    from edge_inspector.backends.tensorrt.runtime import unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise BackendError(f"cannot build a TensorRT engine on this machine: {reason}")
    if int8:
        options.calibration = calibration_source(calib, bundle, options.opt_batch, calib_limit)
    device = probe_device()
    result = build_engine(bundle, options, device)
    size_mb = len(result.engine) / 1e6
    if not result.saved:
        raise BackendError(f"{bundle.path}: engine built but could not be written (read-only bundle folder?)")
    click.echo(f"{bundle.path / result.rel_path}: {options.precision} engine for {device.gpu_name} "
               f"(sm{device.sm}, TensorRT {device.trt_version}), {size_mb:.1f} MB, built in {result.seconds:.1f} s")


def _report_graph_check(bundle: Bundle) -> bool:
    """Log the graph check's warnings, raise on its first error; False when it could not run."""
    try:
        result = check_graph(bundle.onnx_path)
    except ImportError:  # the onnx package is a workstation dependency; the device may lack it
        log.info("onnx not installed: skipping the graph check")
        return False
    for warning in result.warnings:
        log.warning("%s: %s", bundle.onnx_path, warning)
    if result.errors:
        more = f" (+{len(result.errors) - 1} more, see log)" if len(result.errors) > 1 else ""
        for error in result.errors:
            log.error("%s: %s", bundle.onnx_path, error)
        raise BundleGraphError(f"{bundle.onnx_path}: {result.errors[0]}{more}")
    return True


class BundleGraphError(BackendError):
    """The bundle's graph uses something TensorRT refuses; the export must change."""
