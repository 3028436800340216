"""ZeroMQ on loopback: result messages, heatmap encodings, health, high-water marks, the control socket."""

from __future__ import annotations

import json
import threading
import time

import cv2
import numpy as np
import pytest
import zmq

from edge_inspector.core.decision import DecisionParams, validate_threshold
from edge_inspector.core.errors import ConfigError
from edge_inspector.core.inspect import Inspector
from edge_inspector.core.render import heatmap_to_u8
from edge_inspector.core.wire import SCHEMA_VERSION, send_control
from edge_inspector.service.app import load_model
from edge_inspector.service.config import PublishConfig, parse_config
from edge_inspector.service.control import ControlServer
from edge_inspector.service.pipeline import InferenceEngine
from edge_inspector.service.publisher import Publisher
from edge_inspector.service.sources import Frame
from edge_inspector.tools.subscriber import Subscriber, format_health, format_result
from service_helpers import LANES, PART, conveyor_frames, endpoint


@pytest.fixture(scope="module")
def engine(bundle):
    config = parse_config({"tiling": {"rows": 1, "cols": LANES},
                           "model": {"bundle": str(bundle.path), "backend": "onnxruntime", "threads": 2}})
    return InferenceEngine(Inspector(load_model(config), DecisionParams(threshold=bundle.threshold, min_defect_area=5)))


def frame_of(image: np.ndarray, index: int = 0) -> Frame:
    return Frame(image=image, index=index, capture_time=time.time(), capture_mono=time.monotonic(), capture_ms=1.0)


def connected_pair(heatmap: str = "png", **kwargs):
    """A publisher and a subscriber whose subscription has reached the publisher (no lost first message)."""
    config = PublishConfig(endpoint=endpoint(), control_endpoint=None, heatmap=heatmap, **kwargs)
    publisher = Publisher(config, "cam7", health=lambda: {"state": "connected", "fps": 1.5})
    subscriber = Subscriber(publisher.endpoint, ("inspection.", "health."))
    deadline = time.monotonic() + 5
    while not publisher.subscribed.is_set() and time.monotonic() < deadline:
        publisher._poll_subscriptions()
        time.sleep(0.01)
    assert publisher.subscribed.is_set()
    return publisher, subscriber


def publish_and_receive(results, heatmap: str = "png", **kwargs):
    """Send results through a real loopback PUB/SUB pair and return the messages as received."""
    publisher, subscriber = connected_pair(heatmap, **kwargs)
    try:
        for result in results:
            publisher.send(result)
        return [subscriber.receive(5) for _ in results]
    finally:
        subscriber.close()
        publisher.close()


def test_result_message_header_and_png_heatmap(engine):
    frames, _ = conveyor_frames(np.random.default_rng(11), 2, [False, True])
    results = [engine.process(frame_of(f, i)) for i, f in enumerate(frames)]
    messages = publish_and_receive(results)
    good, bad = messages
    assert good.topic == "inspection.cam7" and good.is_result
    header = bad.header
    assert header["schema_version"] == SCHEMA_VERSION and header["type"] == "inspection"
    assert header["sequence"] == results[1].sequence and header["frame_index"] == 1
    assert header["camera_id"] == "cam7" and header["verdict"] == "fail"
    assert good.header["verdict"] == "pass" and good.header["defects"] == []
    assert header["threshold"] == pytest.approx(engine.inspector.params.threshold)
    assert header["normalised_score"] == pytest.approx(header["score"] / header["threshold"], rel=1e-4)
    assert len(header["tile_scores"]) == LANES and header["tile_boxes"] == [[0, 0, PART, PART], [PART, 0, PART, PART]]
    assert header["defects"] and {"x", "y", "width", "height", "area", "peak"} <= set(header["defects"][0])
    assert header["min_defect_area"] == 5
    assert set(header["latency_ms"]) >= {"capture", "inference", "encode", "total"}
    assert header["model"] == {"id": results[1].model_id, "sha256": results[1].model_sha256}
    assert header["frame"] == {"width": PART * LANES, "height": PART}
    assert header["heatmap"]["format"] == "png" and header["error"] is None
    assert abs(header["capture_time"] - time.time()) < 60 and header["capture_time_iso"].endswith("+00:00")
    heat = bad.heatmap_image()
    assert heat.shape == (PART, PART * LANES) and heat.dtype == np.uint8
    assert np.array_equal(heat, heatmap_to_u8(results[1].heatmap, header["threshold"], 2.0))
    box = header["defects"][0]
    assert heat[box["y"]:box["y"] + box["height"], box["x"]:box["x"] + box["width"]].max() > 255 / 2.0
    assert "FAIL" in format_result(header) and "defect" in format_result(header)


def test_jpeg_overlay_and_no_heatmap(engine):
    frames, _ = conveyor_frames(np.random.default_rng(12), 1, [True])
    result = engine.process(frame_of(frames[0]))
    for mode, shape in (("jpeg_overlay", (PART, PART * LANES, 3)), ("none", None)):
        message, = publish_and_receive([result], heatmap=mode)
        image = message.heatmap_image()
        assert message.header["heatmap"]["format"] == mode
        assert (image is None and message.heatmap == b"") if shape is None else image.shape == shape


def test_heatmap_scale_shrinks_the_image_not_the_boxes(engine):
    frames, _ = conveyor_frames(np.random.default_rng(14), 1, [True])
    result = InferenceEngine(engine.inspector, 0.5).process(frame_of(frames[0]))
    message, = publish_and_receive([result])
    header = message.header
    assert message.heatmap_image().shape == (PART // 2, PART * LANES // 2)
    assert (header["heatmap"]["width"], header["heatmap"]["height"]) == (PART * LANES // 2, PART // 2)
    assert header["frame"] == {"width": PART * LANES, "height": PART}
    box = result.decision.boxes[0]
    assert header["defects"][0]["x"] == box.x and header["defects"][0]["width"] == box.width


def test_auto_heatmap_scale_publishes_the_models_own_detail(engine):
    """heatmap_scale auto (the default): one heatmap pixel per 2 model pixels (the bundle's map is blurred with
    sigma 4), so a frame twice the model's tile input is sent at a quarter, one at the input's size at half;
    boxes, areas and the frame's size stay in frame pixels."""
    assert PublishConfig().heatmap_scale == "auto"
    frames, _ = conveyor_frames(np.random.default_rng(15), 1, [True])
    big = cv2.resize(frames[0], None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    auto = InferenceEngine(engine.inspector, "auto")
    large, small = auto.process(frame_of(big)), auto.process(frame_of(frames[0]))
    assert engine.inspector.model.bundle.meta.map_blur_sigma == 4.0
    assert (large.heatmap_scale, small.heatmap_scale) == (0.25, 0.5)
    assert large.verdict == "fail" and large.decision.boxes
    message, whole = publish_and_receive([large, small])
    header = message.header
    assert message.heatmap_image().shape == (PART // 2, PART * LANES // 2)
    assert (header["heatmap"]["width"], header["heatmap"]["height"]) == (PART * LANES // 2, PART // 2)
    assert header["frame"] == {"width": 2 * PART * LANES, "height": 2 * PART}
    assert header["defects"][0]["area"] == large.decision.boxes[0].area  # decided on the full-size map
    assert whole.heatmap_image().shape == (PART // 2, PART * LANES // 2)
    assert whole.header["frame"] == {"width": PART * LANES, "height": PART}


def test_auto_keeps_the_frames_detail_in_a_jpeg_overlay(engine):
    """jpeg_overlay blends the map on the frame, whose detail the map's blur does not limit: auto keeps one
    pixel per model-input pixel there (the frame at the input's size: whole; twice that: half)."""
    frames, _ = conveyor_frames(np.random.default_rng(16), 1, [True])
    big = cv2.resize(frames[0], None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    overlay = InferenceEngine(engine.inspector, "auto", picture_of_frame=True)
    large, small = overlay.process(frame_of(big)), overlay.process(frame_of(frames[0]))
    assert (large.heatmap_scale, small.heatmap_scale) == (0.5, 1.0)
    message, = publish_and_receive([large], heatmap="jpeg_overlay")
    assert message.heatmap_image().shape == (PART, PART * LANES, 3)
    assert (message.header["heatmap"]["width"], message.header["heatmap"]["height"]) == (PART * LANES, PART)


def test_error_results_are_published_with_the_reason(engine):
    result = engine.process(frame_of(np.zeros((10, 1, 3), np.uint8)))
    message, = publish_and_receive([result])
    header = message.header
    assert header["verdict"] == "error" and "do not fit" in header["error"]
    assert header["score"] is None and header["heatmap"]["format"] == "none" and message.heatmap == b""
    assert "ERROR" in format_result(header)


def test_health_on_interval_and_on_request():
    publisher, subscriber = connected_pair(health_interval_s=60.0)
    try:
        publisher.idle()  # first idle: due at once
        first = subscriber.receive(5)
        publisher.idle()  # not due again for a minute
        assert subscriber.receive(0.3) is None
        publisher.request_health()
        publisher.idle()
        second = subscriber.receive(5)
    finally:
        subscriber.close()
        publisher.close()
    assert first.topic == "health.cam7" and not first.is_result
    assert first.header["type"] == "health" and first.header["schema_version"] == SCHEMA_VERSION
    assert first.header["fps"] == 1.5 and second.header["camera_id"] == "cam7"
    assert "HEALTH cam7 connected" in format_health(second.header)


def test_a_stalled_subscriber_cannot_block_the_publisher(engine):
    frames, _ = conveyor_frames(np.random.default_rng(13), 1, [True])
    result = engine.process(frame_of(frames[0]))
    result.frame.image = np.random.default_rng(0).integers(0, 255, (512, 512, 3), np.uint8)  # ~0.8 MB JPEG
    publisher, subscriber = connected_pair(heatmap="jpeg_overlay", sndhwm=5, jpeg_quality=100)
    subscriber.socket.setsockopt(zmq.RCVHWM, 5)
    result.heatmap = np.zeros((512, 512), np.float32)
    sent = 300
    sender = threading.Thread(target=lambda: [publisher.send(result) for _ in range(sent)])
    try:
        sender.start()  # nobody reads: without the high-water mark this would queue ~240 MB
        sender.join(120)
        assert not sender.is_alive(), "send blocked on a stalled subscriber"
        received = 0
        while subscriber.receive(0.5) is not None:
            received += 1
    finally:
        subscriber.close()
        publisher.close()
    assert 0 < received < sent


def test_bind_conflicts_are_config_errors():
    taken = endpoint()
    config = PublishConfig(endpoint=taken, control_endpoint=None)
    first = Publisher(config, "a", health=dict)
    try:
        with pytest.raises(ConfigError, match="publish.endpoint: cannot bind"):
            Publisher(config, "b", health=dict)
        with pytest.raises(ConfigError, match="publish.control_endpoint: cannot bind"):
            ControlServer(taken, {})
    finally:
        first.close()


def test_control_socket_commands_and_errors():
    state = {"threshold": 1.0}

    def set_threshold(request):
        state["threshold"] = validate_threshold(float(request["value"]) if isinstance(request.get("value"), str)
                                                else request.get("value"))
        return {"threshold": state["threshold"]}

    def broken(_request):
        raise KeyError("bug")

    server = ControlServer(endpoint(), {"status": lambda r: {"state": "connected"}, "set_threshold": set_threshold,
                                        "broken": broken})
    server.start()
    try:
        address = server.endpoint
        assert send_control(address, {"command": "status"}) == {"ok": True, "state": "connected"}
        assert send_control(address, {"command": "set_threshold", "value": 2.5})["threshold"] == 2.5
        refused = send_control(address, {"command": "set_threshold", "value": -3})
        assert refused["ok"] is False and "threshold" in refused["error"] and state["threshold"] == 2.5
        unknown = send_control(address, {"command": "launch"})
        assert unknown["ok"] is False and "unknown command 'launch'" in unknown["error"]
        assert send_control(address, {"command": "broken"})["ok"] is False
        with zmq.Context.instance().socket(zmq.REQ) as raw:  # the plain-text form, and garbage
            raw.setsockopt(zmq.RCVTIMEO, 5000)
            raw.connect(address)
            raw.send(b"set_threshold 4")
            assert json.loads(raw.recv())["threshold"] == 4.0
            raw.send(b"{not json")
            assert "not valid JSON" in json.loads(raw.recv())["error"]
    finally:
        server.stop()
    assert not server.thread.is_alive()
