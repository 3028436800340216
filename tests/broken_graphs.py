"""Real ONNX graphs outside the bundle contract, built with onnx.helper, in copies of a real bundle whose
digests are recomputed (what an attacker with the exporter's code can make: it passes every hash check).
Used by tests/test_model_probe.py and benchmarks/hardening_bench.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from edge_inspector.core.bundle import Bundle, finalize_bundle


def graph(kind: str, height: int, width: int) -> onnx.ModelProto:
    """image uint8 (N, H, W, 3) -> anomaly_map, score, mis-built as `kind`:
    nan: the map is NaN everywhere; rank4: the map keeps the channel axis; small: a 64x64 map;
    nan_on_white: (m - 255) / (m - 255) with m the channel mean, NaN only where a pixel is white."""
    nodes = [helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[3], keepdims=0)]
    inits = [helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")]),
             helper.make_tensor("white", TensorProto.FLOAT, [], [255.0]),
             helper.make_tensor("starts", TensorProto.INT64, [2], [0, 0]),
             helper.make_tensor("ends", TensorProto.INT64, [2], [64, 64]),
             helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])]
    map_shape: list = ["N", height, width]
    score_axes = [1, 2]
    if kind == "nan":
        nodes.append(helper.make_node("Mul", ["mean", "nan"], ["anomaly_map"]))
    elif kind == "rank4":
        nodes.append(helper.make_node("Identity", ["pixels"], ["anomaly_map"]))
        map_shape, score_axes = ["N", height, width, 3], [1, 2, 3]
    elif kind == "small":
        nodes.append(helper.make_node("Slice", ["mean", "starts", "ends", "axes"], ["anomaly_map"]))
        map_shape = ["N", 64, 64]
    elif kind == "nan_on_white":
        nodes += [helper.make_node("Sub", ["mean", "white"], ["dark"]),
                  helper.make_node("Div", ["dark", "dark"], ["anomaly_map"])]
    nodes.append(helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=score_axes, keepdims=0))
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(
        nodes, kind, [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", height, width, 3])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, map_shape),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        [init for init in inits if init.name in used])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def broken_bundle(bundle: Bundle, folder: Path, kind: str) -> Path:
    """A copy of the real bundle with its graph replaced and every digest recomputed (what an attacker with
    the exporter's code can make: it passes every hash check)."""
    target = Path(shutil.copytree(bundle.path, folder / kind))
    for extra in target.glob("model.onnx*"):
        extra.unlink()
    onnx.save(graph(kind, *bundle.input_size), str(target / "model.onnx"))
    finalize_bundle(target, Bundle.load(target, verify=False).meta)
    return target
