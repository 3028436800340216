"""No output can pass a part it did not judge: real ONNX graphs built with onnx.helper that answer NaN, a
map of the wrong rank or size, are refused at load, reload and by check-config; a graph that answers NaN only
on some images gives error results there (never pass) and turns health not-ok with the reason."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from edge_inspector.core.bundle import Bundle, finalize_bundle
from edge_inspector.core.decision import DecisionParams
from edge_inspector.core.errors import BundleError
from edge_inspector.core.inspect import Inspector
from edge_inspector.core.wire import send_control
from edge_inspector.service.app import Service, load_model
from edge_inspector.service.config import parse_config
from edge_inspector.service.pipeline import InferenceEngine
from edge_inspector.service.sources import Frame
from service_helpers import LANES, PART, REPO, config_data, subprocess_env, wait_for


def _graph(kind: str, height: int, width: int) -> onnx.ModelProto:
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
    onnx.save(_graph(kind, *bundle.input_size), str(target / "model.onnx"))
    finalize_bundle(target, Bundle.load(target, verify=False).meta)
    return target


def _config(bundle_path: Path):
    return parse_config(config_data("/nonexistent/", bundle_path))


@pytest.mark.parametrize("kind, reason", [("nan", "score not finite"),
                                          ("rank4", "anomaly_map has shape \\[2, 128, 128, 3\\]"),
                                          ("small", "anomaly_map has shape \\[2, 64, 64\\]")])
def test_a_bundle_outside_the_contract_is_refused_at_load(bundle, tmp_path, kind, reason):
    path = broken_bundle(bundle, tmp_path, kind)
    with pytest.raises(BundleError, match=f"model.onnx: refused: on a mid-grey 128x128 probe, {reason}"):
        load_model(_config(path))


@pytest.mark.parametrize("kind", ["rank4", "small"])
def test_check_config_refuses_a_misshapen_map(bundle, tmp_path, kind):
    path = broken_bundle(bundle, tmp_path, kind)
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump(config_data(str(tmp_path), path)))
    done = subprocess.run([sys.executable, "-m", "edge_inspector.cli", "check-config", str(config)],
                          capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "anomaly_map has shape" in done.stderr and "OK" not in done.stdout
    assert len(done.stderr.strip().splitlines()) == 1


def test_reload_of_a_nan_graph_is_refused_and_the_old_model_keeps_judging(bundle, tmp_path):
    (tmp_path / "in").mkdir()
    data = config_data(str(tmp_path / "in"), bundle.path, camera={"loop": True, "fps": 5.0})
    service = Service(parse_config(data))
    service.start()
    try:
        reply = send_control(data["publish"]["control_endpoint"],
                             {"command": "reload", "bundle": str(broken_bundle(bundle, tmp_path, "nan"))})
        assert reply["ok"] is False and "not finite" in reply["error"]
        assert service.inspector is not None and service.inspector.model.model_id == bundle.model_id
    finally:
        service.stop()
        service.shutdown()


def _frame(value: int) -> Frame:
    image = np.full((PART, PART * LANES, 3), value, np.uint8)
    return Frame(image=image, index=0, capture_time=time.time(), capture_mono=time.monotonic(), capture_ms=0.0)


def test_nan_at_run_time_is_an_error_result_and_a_health_problem(bundle, tmp_path):
    model = load_model(_config(broken_bundle(bundle, tmp_path, "nan_on_white")))  # grey probe: finite
    engine = InferenceEngine(Inspector(model, DecisionParams(threshold=2.0)))
    assert engine.process(_frame(128)).verdict == "pass" and engine.problems() == []
    white = engine.process(_frame(255))
    assert white.verdict == "error" and white.decision is None
    assert white.error == "model output refused: score not finite (NaN or infinity) on tile(s) [0, 1]"
    problem, = engine.problems()
    assert problem.startswith("model output refused on 1 frame(s), last 0 s ago: score not finite")
    assert engine.process(_frame(128)).verdict == "pass" and engine.problems()  # held for a while
    model.backend.close()


def test_nan_at_run_time_reaches_health_on_a_running_service(bundle, tmp_path):
    """Through the real service: a white image in the folder -> an error result, health not ok, named."""
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "white.png"), np.full((PART, PART * LANES, 3), 255, np.uint8))
    data = config_data(str(folder), broken_bundle(bundle, tmp_path, "nan_on_white"), camera={"fps": 20.0})
    service = Service(parse_config(data))
    service.start()
    try:
        wait_for(lambda: service.stats.processed >= 1, 20, "the white frame judged")
        health = service.health()
        assert service.stats.errors == 1 and service.stats.passes == 0
        assert health["ok"] is False and any("model output refused" in p for p in health["problems"])
        assert service.problems() == []  # the stages are fine: the watchdog is still fed
    finally:
        service.stop()
        service.shutdown()
