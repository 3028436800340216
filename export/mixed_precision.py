"""Rewrite a bundle's fp32 `model.onnx` into a mixed-precision graph: backbone in fp16, distance in fp32.

Why a rewritten graph instead of builder flags: TensorRT 10 could be asked for fp16 with `BuilderFlag.FP16`
and told to keep some layers in fp32 with `PREFER_PRECISION_CONSTRAINTS`, a preference it may drop silently.
TensorRT 11 removed both (and implicit INT8): networks are strongly typed, every tensor has the type the ONNX
graph gives it. So the precision has to be in the graph itself, with explicit Casts at the boundaries. Such
a graph builds the same engine on TensorRT 10 (STRONGLY_TYPED network flag) and 11 (always strongly typed),
and ONNX Runtime runs it too, which is how its accuracy is checked without a GPU.

Where the boundary lies, and why there:
  * preprocessing (uint8 Cast, BGR->RGB Gather, normalisation) stays fp32: a handful of element-wise ops,
    and the autoencoder compares its reconstruction with this very tensor;
  * the network proper, from its first convolution to the features the distance consumes, runs in fp16:
    that is where the time goes (EfficientNet-Lite/ResNet convolutions, PaDiM's Gather upsampling and
    AveragePool, PatchCore's projection MatMul, the autoencoder's encoder/decoder);
  * the distance and everything after it stay fp32: PaDiM's squared Mahalanobis distance sums ~100 products
    that exceed fp16's 65504 on defective parts, PatchCore's nearest-bank search ranks squared distances
    that differ in their last digits, the autoencoder's squared error is small differences of similar
    numbers. After them come the run-time-sized Resize, the MatMul blur and the max: all fp32.

The distance is found by the submodule names the graph builders already give it (`/mahalanobis/` in
`export.padim.model.Mahalanobis`, `/bank/` in `export.patchcore.model.BankDistance`, `/error/` in
`export.autoencoder.model.ReconstructionError`): every node in one of these scopes, and every node
downstream of one, is fp32. A graph with none of them is refused rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_inspector.core.bundle import sha256_file
from edge_inspector.core.errors import BundleError

# Scopes (ONNX node-name components) of the distance each model kind computes; see the module docstring.
DISTANCE_SCOPES = ("mahalanobis", "bank", "error")
# The network proper starts at its first convolution (every backbone and the autoencoder start with one).
NETWORK_START_OPS = frozenset({"Conv", "ConvTranspose"})
# Operators allowed to run in fp16 here: all of them take float inputs of one type (the "T" of the ONNX
# spec) except the few input positions in KEEP_INPUT_TYPE. Anything else in the fp16 part is refused with
# its name, so a new operator is a loud error on the workstation, never a silently wrong graph. Left out on
# purpose: Exp and Pow (overflow fp16 from small inputs: exp(11.1) > 65504), ReduceSum (sums grow with size).
FP16_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Sqrt", "Neg", "Abs", "Erf", "Max", "Min",
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Softplus",
    "Conv", "ConvTranspose", "BatchNormalization", "MatMul", "Gemm",
    "AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceMin",
    "Concat", "Reshape", "Transpose", "Gather", "Slice", "Squeeze", "Unsqueeze", "Flatten", "Split", "Pad",
    "Resize", "Identity", "Shape", "Expand", "Tile",
})
# (op, input index) whose type is fixed by the spec whatever the data type: Resize's roi and scales.
KEEP_INPUT_TYPE = frozenset({("Resize", 1), ("Resize", 2)})
FP16_MAX = 65504.0
_FLOAT, _FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16, without importing onnx at module level
SOURCE_KEY = "edge_inspector.mixed_precision.source_sha256"
LAYOUT_KEY = "edge_inspector.mixed_precision"
LAYOUT = "fp32 preprocessing, fp16 network, fp32 distance and after (explicit Casts)"


@dataclass
class Regions:
    """Node indices of the graph by the precision they will run in."""

    fp16: set[int] = field(default_factory=set)
    distance: set[int] = field(default_factory=set)  # the distance and everything downstream: fp32


@dataclass
class MixedReport:
    """What the rewrite did, for the log and for tests."""

    fp16_nodes: int
    fp32_nodes: int
    casts_to_fp16: int
    casts_to_fp32: int
    converted_constants: int


class _Graph:
    """Producers, consumers and element types of one ONNX graph (after shape inference)."""

    def __init__(self, model: Any) -> None:
        import onnx

        self.model = model
        graph = model.graph
        self.nodes = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = index
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(index)
        self.initializers = {init.name: init for init in graph.initializer}
        self.types: dict[str, int] = {}
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.HasField("tensor_type"):
                self.types[info.name] = info.type.tensor_type.elem_type
        for init in graph.initializer:
            self.types[init.name] = init.data_type
        for node in self.nodes:
            if node.op_type == "Constant":
                value = next((a for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.types[node.output[0]] = onnx.helper.get_attribute_value(value).data_type

    def is_float(self, name: str) -> bool:
        return self.types.get(name) == _FLOAT

    def downstream(self, start: Iterable[int]) -> set[int]:
        """`start` and every node that consumes, directly or not, one of their outputs."""
        seen, todo = set(), list(start)
        while todo:
            index = todo.pop()
            if index in seen:
                continue
            seen.add(index)
            for name in self.nodes[index].output:
                todo.extend(self.consumers.get(name, []))
        return seen


def _in_scope(node_name: str, scopes: tuple[str, ...]) -> bool:
    return any(part in scopes for part in node_name.split("/"))


def _distance_seeds(graph: _Graph, scopes: tuple[str, ...]) -> list[int]:
    """Computing nodes of the distance scopes. Constants are left out: a constant torch happened to name in
    the distance's scope but that a backbone node also reads must not pull that node into fp32."""
    return [i for i, node in enumerate(graph.nodes) if node.op_type != "Constant" and _in_scope(node.name, scopes)]


def find_regions(graph: _Graph, scopes: tuple[str, ...] = DISTANCE_SCOPES) -> Regions:
    """Split the graph's nodes: fp16 from the first convolution up to the distance, fp32 from the distance on."""
    marked = _distance_seeds(graph, scopes)
    if not marked:
        raise BundleError(f"no distance node (ONNX scope {' / '.join(scopes)}) in the graph: cannot tell where "
                          "fp32 must start, so no mixed-precision graph is made (build fp32 instead)")
    distance = graph.downstream(marked)
    starts = [i for i, node in enumerate(graph.nodes) if node.op_type in NETWORK_START_OPS and i not in distance]
    if not starts:
        raise BundleError("no convolution before the distance: nothing would run in fp16")
    fp16 = graph.downstream(starts) - distance
    return Regions(fp16=fp16, distance=distance)


def _carries_float(graph: _Graph, node) -> bool:
    return any(graph.is_float(name) for name in [*node.input, *node.output] if name)


def _check_fp16_ops(graph: _Graph, regions: Regions) -> None:
    for index in sorted(regions.fp16):
        node = graph.nodes[index]
        if _carries_float(graph, node) and node.op_type not in FP16_OPS:
            raise BundleError(f"{node.op_type} node {node.name or '(unnamed)'!r} lies in the fp16 part of the graph "
                              "and is not known to be safe in fp16 (export.mixed_precision.FP16_OPS)")


def _fp16_constant(array: np.ndarray, name: str) -> np.ndarray:
    finite = array[np.isfinite(array)]
    if finite.size and float(np.abs(finite).max()) > FP16_MAX:
        raise BundleError(f"constant {name!r} holds {float(np.abs(finite).max()):.4g}, beyond fp16's {FP16_MAX:g}: "
                          "it cannot move to the fp16 part of the graph")
    return array.astype(np.float16)


class _Rewriter:
    """Builds the new node list: fp16 nodes read fp16 copies or Casts, their outputs are cast back for fp32 readers."""

    def __init__(self, graph: _Graph, regions: Regions):
        self.graph = graph
        self.regions = regions
        self.new_inits: list = []
        self.half_of: dict[str, str] = {}  # fp32 tensor -> its fp16 counterpart
        self.full_of: dict[str, str] = {}  # fp16-produced tensor -> its fp32 Cast, for fp32 readers
        self.casts_to_fp16 = 0
        self.casts_to_fp32 = 0
        self.converted = 0

    def _const_half(self, name: str):
        """An fp16 initializer holding the value of constant `name` (initializer or Constant node output)."""
        from onnx import numpy_helper

        graph = self.graph
        if name in graph.initializers:
            array = numpy_helper.to_array(graph.initializers[name])
        else:
            node = graph.nodes[graph.producer[name]]
            value = next(a for a in node.attribute if a.name == "value")
            array = numpy_helper.to_array(value.t)
        half = f"{name}__fp16"
        self.new_inits.append(numpy_helper.from_array(_fp16_constant(array, name), half))
        self.converted += 1
        return half

    def _is_constant(self, name: str) -> bool:
        graph = self.graph
        if name in graph.initializers:
            return True
        producer = graph.producer.get(name)
        return producer is not None and graph.nodes[producer].op_type == "Constant"

    def input_for_fp16(self, name: str, before: list) -> str:
        """The fp16 tensor an fp16 node reads in place of fp32 tensor `name` (made once, reused)."""
        import onnx

        if name in self.half_of:
            return self.half_of[name]
        if self._is_constant(name):
            half = self._const_half(name)
        else:
            half = f"{name}__to_fp16"
            before.append(onnx.helper.make_node("Cast", [name], [half], to=_FLOAT16, name=f"{name}/to_fp16"))
            self.casts_to_fp16 += 1
        self.half_of[name] = half
        return half

    def rewrite(self) -> list:
        import onnx

        graph, regions = self.graph, self.regions
        fp16_outputs = {name for i in regions.fp16 for name in graph.nodes[i].output if name and graph.is_float(name)}
        graph_outputs = {o.name for o in graph.model.graph.output}
        nodes: list = []
        for index, original in enumerate(graph.nodes):
            node = onnx.NodeProto()
            node.CopyFrom(original)
            before: list = []
            if index in regions.fp16:
                for position, name in enumerate(node.input):
                    if (name and graph.is_float(name) and name not in fp16_outputs
                            and (node.op_type, position) not in KEEP_INPUT_TYPE):
                        node.input[position] = self.input_for_fp16(name, before)
            else:
                for position, name in enumerate(node.input):
                    if name in fp16_outputs:
                        node.input[position] = self.full_of.setdefault(name, f"{name}__to_fp32")
            nodes.extend(before)
            nodes.append(node)
            if index in regions.fp16:
                for name in node.output:
                    if name in fp16_outputs and (name in graph_outputs or any(
                            c not in regions.fp16 for c in graph.consumers.get(name, []))):
                        full = self.full_of.setdefault(name, f"{name}__to_fp32")
                        nodes.append(onnx.helper.make_node("Cast", [name], [full], to=_FLOAT, name=f"{name}/to_fp32"))
                        self.casts_to_fp32 += 1
        if fp16_outputs & graph_outputs:
            raise BundleError("a graph output is computed in the fp16 part: the distance is missing from the graph")
        return nodes


def _drop_unused(model) -> None:
    """Remove initializers and Constant nodes nobody reads any more (their fp16 copies replaced them)."""
    used = {name for node in model.graph.node for name in node.input}
    used.update(o.name for o in model.graph.output)
    keep = [n for n in model.graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    inits = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)


def to_mixed_precision(model, scopes: tuple[str, ...] = DISTANCE_SCOPES):
    """(mixed-precision copy of the fp32 `model`, MixedReport). The input model is not changed."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = _Graph(inferred)
    regions = find_regions(graph, scopes)
    _check_fp16_ops(graph, regions)
    rewriter = _Rewriter(graph, regions)
    nodes = rewriter.rewrite()
    mixed = onnx.ModelProto()
    mixed.CopyFrom(model)
    del mixed.graph.node[:]
    mixed.graph.node.extend(nodes)
    mixed.graph.initializer.extend(rewriter.new_inits)
    del mixed.graph.value_info[:]  # stale types; inferred again below
    _drop_unused(mixed)
    mixed = onnx.shape_inference.infer_shapes(mixed, strict_mode=True)
    onnx.checker.check_model(mixed, full_check=True)  # strict type check: no fp16/fp32 mix reaches TensorRT
    report = MixedReport(fp16_nodes=len(regions.fp16), fp32_nodes=len(graph.nodes) - len(regions.fp16),
                         casts_to_fp16=rewriter.casts_to_fp16, casts_to_fp32=rewriter.casts_to_fp32,
                         converted_constants=rewriter.converted)
    check_distance_fp32(mixed, scopes)
    return mixed, report


def node_float_types(model) -> list[tuple[str, str, set[int]]]:
    """(node name, op type, float element types it reads or writes) for every node, after shape inference."""
    import onnx

    graph = _Graph(onnx.shape_inference.infer_shapes(model))
    rows = []
    for node in graph.nodes:
        types = {graph.types.get(n, 0) for n in [*node.input, *node.output] if n}
        rows.append((node.name, node.op_type, {t for t in types if t in (_FLOAT, _FLOAT16)}))
    return rows


def check_distance_fp32(model, scopes: tuple[str, ...] = DISTANCE_SCOPES) -> None:
    """Raise unless every node from the distance on reads and writes only fp32 floats.

    Checked on the graph (types after inference), not by running it: a strongly typed TensorRT build
    computes each node in exactly these types.
    """
    import onnx

    graph = _Graph(onnx.shape_inference.infer_shapes(model))
    for index in sorted(graph.downstream(_distance_seeds(graph, scopes))):
        node = graph.nodes[index]
        if node.op_type == "Cast" and node.name.endswith("/to_fp32"):
            continue
        half = [n for n in [*node.input, *node.output] if n and graph.types.get(n) == _FLOAT16]
        if half:
            raise BundleError(f"{node.op_type} node {node.name!r} of the distance part uses fp16 tensor {half[0]!r}")


def source_sha256(path: Path) -> str | None:
    """The sha256 of the fp32 graph a mixed graph was made from (recorded in its metadata), or None."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == SOURCE_KEY), None)


def write_mixed_graph(source: Path, target: Path) -> MixedReport:
    """Read fp32 `source`, write its mixed-precision version to `target` (atomically), return the report.

    The source's sha256 goes into the target's metadata, so a mixed graph left over from an earlier
    model.onnx is recognised and made again rather than built into an engine.
    """
    import onnx

    from edge_inspector.core.atomic import write_atomic

    if Path(str(source) + ".data").exists():
        raise BundleError(f"{source}: weights stored beside the graph (over 2 GB): the mixed-precision rewrite "
                          "handles graphs under protobuf's 2 GB limit only; build an fp32 engine")
    model = onnx.load(str(source))
    mixed, report = to_mixed_precision(model)
    for key, value in ((SOURCE_KEY, sha256_file(source)), (LAYOUT_KEY, LAYOUT)):
        entry = mixed.metadata_props.add()
        entry.key, entry.value = key, value
    write_atomic(target, mixed.SerializeToString())
    return report
