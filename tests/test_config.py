"""The service config: every example loads; every kind of mistake is one line naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge_inspector.core.bundle import Bundle
from edge_inspector.core.errors import ConfigError
from edge_inspector.service.config import ServiceConfig, config_to_dict, load_config, parse_config
from service_helpers import REPO

EXAMPLES = sorted((REPO / "configs").glob("service-*.yaml"))


def write(tmp_path: Path, text: str, name: str = "line.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_examples_exist_and_each_one_loads():
    assert len(EXAMPLES) >= 3
    for path in EXAMPLES:
        config = load_config(path)
        assert isinstance(config, ServiceConfig)
        assert config.model.bundle, path
        assert config.path == str(path)


def test_minimal_config_gets_documented_defaults(tmp_path):
    config = load_config(write(tmp_path, "model:\n  bundle: bundles/a\n"))
    assert config.camera.id == "cam0" and config.camera.source == 0
    assert (config.tiling.rows, config.tiling.cols) == (1, 1)
    assert config.model.backend == "auto"
    assert config.publish.endpoint == "tcp://127.0.0.1:5556"  # loopback unless opened on purpose
    assert config.publish.control_endpoint == "tcp://127.0.0.1:5557"
    assert config.publish.heatmap == "png"
    assert config.archive.enabled is False
    assert config.bundle_path == tmp_path / "bundles" / "a"  # relative to the config file


def test_wrong_type_names_file_and_key(tmp_path):
    message = error_of(tmp_path, "model: {bundle: b}\ntiling:\n  rows: two\n")
    assert message.startswith(f"{tmp_path / 'line.yaml'}: tiling.rows: expected an integer")
    assert message.endswith("got 'two'")


def test_out_of_range_value(tmp_path):
    message = error_of(tmp_path, "model: {bundle: b}\ntiling: {cols: 0}\n")
    assert "tiling.cols: expected an integer in [1, 64], got 0" in message
    message = error_of(tmp_path, "model: {bundle: b}\npublish: {health_interval_s: -1}\n")
    assert "publish.health_interval_s" in message and "got -1" in message
    for workers in (0, 17):
        message = error_of(tmp_path, f"model: {{bundle: b, workers: {workers}}}\n")
        assert f"model.workers: expected an integer in [1, 16], got {workers}" in message


def test_workers_that_would_fight_over_the_cores_are_named():
    """Several CPU inference workers each run an ONNX Runtime session of model.threads threads."""
    from edge_inspector.service.app import oversubscribed

    assert oversubscribed(1, None, 2) is None and oversubscribed(2, 1, 2) is None and oversubscribed(4, 2, 8) is None
    assert oversubscribed(2, None, 2) == ("model.workers 2 x model.threads null (= 2) asks for 4 inference threads "
                                          "on 2 cores; set model.threads to 1")
    assert oversubscribed(3, 2, 4) == ("model.workers 3 x model.threads 2 asks for 6 inference threads on 4 cores; "
                                       "set model.threads to 1")


def test_the_cpu_runtime_says_its_threads_are_the_cores(bundle):
    """The oversubscription warning asks the backend, not its name: ONNX Runtime on the CPU provider does."""
    from edge_inspector.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(Bundle.load(bundle.path), threads=1)
    try:
        assert backend.runs_on_cpu_cores and backend.providers[0] == "CPUExecutionProvider"
    finally:
        backend.close()


@pytest.mark.parametrize("value, shown", [("0.01", "0.01"), ("1.5", "1.5"), ("big", "'big'"), ("true", "True")])
def test_heatmap_scale_is_a_number_in_range_or_auto(tmp_path, value, shown):
    message = error_of(tmp_path, f"model: {{bundle: b}}\npublish: {{heatmap_scale: {value}}}\n")
    assert f"publish.heatmap_scale: expected a number in [0.05, 1] or one of auto, got {shown}" in message
    assert load_config(write(tmp_path, "model: {bundle: b}\n")).publish.heatmap_scale == "auto"
    half = load_config(write(tmp_path, "model: {bundle: b}\npublish: {heatmap_scale: 0.5}\n"))
    assert half.publish.heatmap_scale == 0.5


def test_unknown_keys_at_every_level(tmp_path):
    assert "tilling: unknown key" in error_of(tmp_path, "model: {bundle: b}\ntilling: {rows: 2}\n")
    message = error_of(tmp_path, "model: {bundle: b, treads: 2}\n")
    assert "model.treads: unknown key" in message and "threads" in message


def test_choices_and_booleans(tmp_path):
    assert "model.backend: expected one of auto, onnxruntime, tensorrt, got 'cuda'" in error_of(
        tmp_path, "model: {bundle: b, backend: cuda}\n")
    assert "archive.enabled: expected true or false, got 'yes please'" in error_of(
        tmp_path, "model: {bundle: b}\narchive: {enabled: yes please}\n")
    assert "camera.fps" in error_of(tmp_path, "model: {bundle: b}\ncamera: {fps: .nan}\n")


def test_booleans_are_not_integers(tmp_path):
    assert "tiling.rows" in error_of(tmp_path, "model: {bundle: b}\ntiling: {rows: true}\n")


def test_lists_pairs_and_rectangles(tmp_path):
    config = load_config(write(tmp_path, "model: {bundle: b}\ntiling: {roi: [10, 20, 300, 200], "
                                         "tile_size: [100, 150], stride: [50, 75]}\n"))
    assert config.tiling.roi == (10, 20, 300, 200)
    assert config.tiling.tile_size == (100, 150) and config.tiling.stride == (50, 75)
    assert "tiling.roi: expected [x, y, width, height]" in error_of(
        tmp_path, "model: {bundle: b}\ntiling: {roi: [10, 20, 300]}\n")
    assert "tiling.tile_size: expected a list of 2 integers" in error_of(
        tmp_path, "model: {bundle: b}\ntiling: {tile_size: 256}\n")


def test_cross_field_rules(tmp_path):
    assert "model.bundle: required" in error_of(tmp_path, "camera: {id: a}\n")
    assert "tiling.stride: needs tiling.tile_size" in error_of(
        tmp_path, "model: {bundle: b}\ntiling: {stride: [10, 10]}\n")
    assert "larger than tiling.tile_size" in error_of(
        tmp_path, "model: {bundle: b}\ntiling: {tile_size: [10, 10], stride: [20, 10]}\n")
    assert "camera.reconnect_max_s" in error_of(
        tmp_path, "model: {bundle: b}\ncamera: {reconnect_initial_s: 5, reconnect_max_s: 1}\n")
    assert "publish.control_endpoint: must differ" in error_of(
        tmp_path, "model: {bundle: b}\npublish: {endpoint: 'tcp://*:1', control_endpoint: 'tcp://*:1'}\n")


def test_invalid_yaml_and_missing_file(tmp_path):
    message = error_of(tmp_path, "model: {bundle: b\ncamera: [\n")
    assert "invalid YAML at line" in message
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    assert "top level: expected a mapping" in error_of(tmp_path, "- a\n- b\n")


def test_relative_sources_resolve_next_to_the_config(tmp_path):
    config = load_config(write(tmp_path, "model: {bundle: b}\ncamera: {source: videos/line.avi}\n"))
    assert config.camera.source == str(tmp_path / "videos" / "line.avi")
    config = load_config(write(tmp_path, "model: {bundle: b}\ncamera: {source: frames/}\n"))
    assert config.camera.source == str(tmp_path / "frames") + "/"
    config = load_config(write(tmp_path, "model: {bundle: b}\ncamera: {source: 'rtsp://cam/1'}\n"))
    assert config.camera.source == "rtsp://cam/1"


def test_parse_config_roundtrips_through_plain_data():
    config = parse_config({"model": {"bundle": "/b"}, "tiling": {"rows": 2, "cols": 3}})
    data = config_to_dict(config)
    assert data["tiling"]["rows"] == 2 and "path" not in data
    again = parse_config(yaml.safe_load(yaml.safe_dump(data)))
    assert config_to_dict(again) == data
