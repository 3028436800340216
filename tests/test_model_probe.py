"""No output can pass a part it did not judge: real ONNX graphs built with onnx.helper that answer NaN, a
map of the wrong rank or size, are refused at load, reload and by check-config; a graph that answers NaN only
on some images gives error results there (never pass) and turns health not-ok with the reason."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from broken_graphs import broken_bundle

from edge_inspector.core.decision import DecisionParams
from edge_inspector.core.errors import BundleError
from edge_inspector.core.inspect import Inspector
from edge_inspector.core.wire import send_control
from edge_inspector.service.app import Service, load_model
from edge_inspector.service.config import parse_config
from edge_inspector.service.pipeline import InferenceEngine
from edge_inspector.service.sources import Frame
from service_helpers import LANES, PART, REPO, config_data, subprocess_env, wait_for


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
