"""Topics are exact: a subscriber to one camera gets that camera only, never one whose id it prefixes."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edge_inspector.core.errors import ConfigError
from edge_inspector.core.wire import RESULT_TOPIC, topic
from edge_inspector.service.config import PublishConfig, parse_config
from edge_inspector.service.pipeline import Result
from edge_inspector.service.publisher import Publisher
from edge_inspector.service.sources import Frame
from edge_inspector.tools.subscriber import Subscriber, camera_topics
from service_helpers import endpoint


def _error_result(sequence: int) -> Result:
    frame = Frame(image=np.zeros((4, 4, 3), np.uint8), index=sequence, capture_time=time.time(),
                  capture_mono=time.monotonic(), capture_ms=0.0)
    return Result(sequence=sequence, frame=frame, verdict="error", model_id="m", model_sha256="s", error="test")


def _wait_subscribed(publishers: list[Publisher]) -> None:
    deadline = time.monotonic() + 5
    while not all(p.subscribed.is_set() for p in publishers) and time.monotonic() < deadline:
        for publisher in publishers:
            publisher._poll_subscriptions()
        time.sleep(0.01)
    assert all(p.subscribed.is_set() for p in publishers)


def _received(subscriber: Subscriber) -> list[tuple[str, str]]:
    got = []
    while (message := subscriber.receive(0.5)) is not None:
        got.append((message.topic, message.header["camera_id"]))
    return got


@pytest.mark.parametrize("health", [False, True])
def test_one_camera_subscription_is_exact_on_real_sockets(health):
    publishers = [Publisher(PublishConfig(endpoint=endpoint(), control_endpoint=None, heatmap="none"), camera,
                            health=lambda: {"state": "connected"}) for camera in ("line1", "line10")]
    only_line1 = Subscriber(publishers[0].endpoint, camera_topics("line1", health))
    every = Subscriber(publishers[0].endpoint, camera_topics(None, health))
    try:
        for subscriber in (only_line1, every):
            subscriber.socket.connect(publishers[1].endpoint)
        _wait_subscribed(publishers)
        time.sleep(0.2)  # both subscribers' subscriptions reach both publishers
        for publisher in publishers:
            publisher.send(_error_result(1))
            if health:
                publisher.send_health()
        line1, both = _received(only_line1), _received(every)
    finally:
        only_line1.close()
        every.close()
        for publisher in publishers:
            publisher.close()
    kinds = ["inspection", "health"] if health else ["inspection"]
    assert sorted(line1) == sorted((f"{kind}.line1", "line1") for kind in kinds)
    assert sorted(both) == sorted((f"{kind}.{camera}", camera) for kind in kinds for camera in ("line1", "line10"))


def test_topic_ends_in_nul_so_no_camera_id_can_extend_it():
    assert topic(RESULT_TOPIC, "line1") == b"inspection.line1\x00"
    assert not topic(RESULT_TOPIC, "line10").startswith(topic(RESULT_TOPIC, "line1"))


@pytest.mark.parametrize("camera_id", ["line1\x00x", "line\n1"])
def test_camera_id_with_control_characters_is_refused(camera_id):
    with pytest.raises(ConfigError, match="camera.id: must not contain control characters"):
        parse_config({"camera": {"id": camera_id}, "model": {"bundle": "b"}})
