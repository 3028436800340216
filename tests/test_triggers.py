"""camera.trigger external: one result per trigger with its part id, on real sources and real ZeroMQ sockets."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_inspector.core.errors import ConfigError
from edge_inspector.core.wire import send_control
from edge_inspector.service.app import Service
from edge_inspector.service.config import parse_config
from edge_inspector.service.triggers import PartCounter, TriggerGate, counter_file, parse_trigger
from edge_inspector.tools.control import build_request
from edge_inspector.tools.subscriber import Subscriber
from export.synthetic import make_part
from service_helpers import config_data, conveyor_frames, wait_for, write_video


@contextmanager
def running(data: dict):
    """The service on its own thread, a subscriber attached before capture starts; stopped on exit."""
    service = Service(parse_config(data))
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False})
    with Subscriber(data["publish"]["endpoint"], ("inspection.", "health.")) as subscriber:
        runner.start()
        try:
            yield service, subscriber
        finally:
            service.stop()
            runner.join(30)
    assert not runner.is_alive()


def results(subscriber: Subscriber, count: int, timeout: float = 30.0) -> list[dict]:
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        message = subscriber.receive(0.2)
        if message is not None and message.is_result:
            got.append(message.header)
    return got


def quiet(subscriber: Subscriber, seconds: float) -> list[dict]:
    """Results that arrive within `seconds` (none are expected without a trigger)."""
    return results(subscriber, 10**6, timeout=seconds)


@pytest.fixture
def video(tmp_path: Path) -> Path:
    frames, _ = conveyor_frames(np.random.default_rng(7), 6, [False, True, False, False, True, False])
    return write_video(tmp_path / "line.avi", frames)


def triggered(source: str, bundle_path: Path, **camera) -> dict:
    return config_data(source, bundle_path, camera={"trigger": "external", **camera},
                       publish={"wait_for_subscriber_s": 30.0})


def test_n_triggers_give_n_results_with_their_part_ids_in_order(bundle, video):
    data = triggered(str(video), bundle.path, fps=20.0, loop=True)
    control = data["publish"]["control_endpoint"]
    with running(data) as (service, subscriber):
        wait_for(lambda: service.camera is not None and service.camera.state == "connected", 30, "the camera")
        assert quiet(subscriber, 0.6) == []  # a streaming camera and no trigger: nothing judged
        ids = ["P-1", "P-2", "lot7.A:3", None, "P-5"]
        replies = [send_control(control, {"command": "trigger", **({"part_id": i} if i else {})}) for i in ids]
        assert all(r["ok"] for r in replies), replies
        assert replies[3]["part_id"] == "1"  # no part_id: the service's own counter
        assert send_control(control, "trigger P-6")["part_id"] == "P-6"  # the bare words work too
        got = results(subscriber, 6)
        assert [h["part_id"] for h in got] == ["P-1", "P-2", "lot7.A:3", "1", "P-5", "P-6"]
        assert [h["sequence"] for h in got] == list(range(1, 7))
        assert all(h["verdict"] in ("pass", "fail", "review") and h["trigger_time"] for h in got), got
        # each part is judged on a frame captured after its trigger arrived
        assert all(h["capture_time"] >= h["trigger_time"] for h in got)
        assert quiet(subscriber, 0.5) == []  # no more triggers, no more results
        health = service.health()
        assert health["processed"] == 6 and health["triggers"]["received"] == 6
        assert health["frames_skipped"] >= 5  # 20 frames/s streamed while nothing was triggered
        assert health["triggers"]["timeouts"] == 0 and health["triggers"]["refused"] == 0


def test_delay_and_a_full_trigger_queue(bundle, video):
    data = triggered(str(video), bundle.path, fps=20.0, loop=True, trigger_queue=2)
    control = data["publish"]["control_endpoint"]
    with running(data) as (service, subscriber):
        wait_for(lambda: service.camera is not None and service.camera.state == "connected", 30, "the camera")
        sent = time.time()
        first = send_control(control, {"command": "trigger", "part_id": "D-1", "delay_ms": 600})
        second = send_control(control, {"command": "trigger", "part_id": "D-2", "delay_ms": 600})
        third = send_control(control, {"command": "trigger", "part_id": "D-3"})
        assert first["ok"] and second["ok"]
        assert third["ok"] is False and "trigger queue full" in third["error"] and "\n" not in third["error"]
        got = results(subscriber, 3)
        by_part = {h["part_id"]: h for h in got}
        assert set(by_part) == {"D-1", "D-2", "D-3"}
        assert by_part["D-3"]["verdict"] == "error" and "trigger refused" in by_part["D-3"]["error"]
        for part in ("D-1", "D-2"):  # judged on a frame at least the delay after the trigger
            assert by_part[part]["verdict"] != "error"
            assert by_part[part]["capture_time"] >= sent + 0.55
        assert [h["part_id"] for h in got if h["part_id"] != "D-3"] == ["D-1", "D-2"]
        assert service.health()["triggers"]["refused"] == 1


def test_a_trigger_with_the_camera_stopped_is_an_error_result(bundle, tmp_path):
    missing = tmp_path / "camera-folder-not-there"  # a camera that is not delivering: retried, never opens
    data = triggered(str(missing) + "/", bundle.path, trigger_timeout_ms=300)
    control = data["publish"]["control_endpoint"]
    with running(data) as (service, subscriber):
        wait_for(lambda: service.camera is not None and service.camera.state == "waiting", 30, "a waiting camera")
        started = time.monotonic()
        assert send_control(control, {"command": "trigger", "part_id": "Q-1"})["ok"]
        got = results(subscriber, 1, timeout=10)
        assert len(got) == 1 and got[0]["part_id"] == "Q-1" and got[0]["verdict"] == "error"
        assert "no frame within 300 ms" in got[0]["error"]
        assert time.monotonic() - started < 3.0  # on time although the camera is away (reconnect backoff)
        health = service.health()
        assert health["errors"] == 1 and health["triggers"]["timeouts"] == 1
        assert send_control(control, "status")["ok"]  # the service runs on


def test_malformed_triggers_get_one_line_refusals_and_the_service_goes_on(bundle, video):
    data = triggered(str(video), bundle.path, fps=20.0, loop=True)
    control = data["publish"]["control_endpoint"]
    with running(data) as (service, subscriber):
        wait_for(lambda: service.camera is not None and service.camera.state == "connected", 30, "the camera")
        bad = [{"part_id": "has space"}, {"part_id": "../../etc"}, {"part_id": "x" * 65}, {"part_id": ""},
               {"part_id": 12}, {"part_id": ["A"]}, {"part_id": "A\nforged log line"}, {"delay_ms": -1},
               {"delay_ms": 10**9}, {"delay_ms": 1.5}, {"delay_ms": True}, {"delay_ms": "10"},
               {"part_id": "A", "colour": "red"}]
        for fields in bad:
            reply = send_control(control, {"command": "trigger", **fields})
            assert reply["ok"] is False and reply["error"].startswith("trigger:"), fields
            assert "\n" not in reply["error"] and len(reply["error"]) < 200, reply
        assert send_control(control, "trigger two words")["ok"] is False
        assert quiet(subscriber, 0.4) == []  # a refused trigger makes no part
        assert send_control(control, {"command": "trigger", "part_id": "OK-1"})["ok"]
        got = results(subscriber, 1)
        assert [h["part_id"] for h in got] == ["OK-1"] and got[0]["verdict"] != "error"
        assert service.health()["triggers"]["received"] == 1


def test_free_run_judges_every_frame_and_refuses_triggers(bundle, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    frames, _ = conveyor_frames(np.random.default_rng(3), 3, [False] * 3)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frame)
    data = config_data(str(folder), bundle.path, camera={"loop": True, "fps": 10.0},
                       publish={"wait_for_subscriber_s": 30.0})
    with running(data) as (service, subscriber):
        got = results(subscriber, 3)
        assert [h["part_id"] for h in got] == [str(h["sequence"]) for h in got] == ["1", "2", "3"]
        assert all(h["trigger_time"] is None for h in got)
        reply = send_control(data["publish"]["control_endpoint"], {"command": "trigger", "part_id": "A"})
        assert reply["ok"] is False and "free_run" in reply["error"]
        assert service.health()["frames_skipped"] == 0 and service.health()["triggers"] is None


def test_parse_trigger_and_config_rules(bundle):
    assert parse_trigger({"command": "trigger"}) == (None, 0)
    assert parse_trigger({"command": "trigger", "value": "A-1"}) == ("A-1", 0)
    assert parse_trigger({"command": "trigger", "part_id": "Z9", "delay_ms": 250}) == ("Z9", 250)
    assert build_request("trigger", "A-1") == {"command": "trigger", "part_id": "A-1"}
    assert build_request("trigger", None) == {"command": "trigger"}
    data = triggered("/tmp/none/", bundle.path)
    data["publish"]["control_endpoint"] = None
    with pytest.raises(ConfigError, match="camera.trigger: external needs publish.control_endpoint"):
        parse_config(data)
    data = triggered("/tmp/none/", bundle.path)
    data["pipeline"] = {"when_behind": "drop"}
    with pytest.raises(ConfigError, match="pipeline.when_behind: drop would lose parts"):
        parse_config(data)
    data = triggered("/tmp/none/", bundle.path, trigger="sometimes")
    with pytest.raises(ConfigError, match="camera.trigger"):
        parse_config(data)


# -- presence ------------------------------------------------------------------------------------------------

BELT = (128, 320)  # height, width
PART_SIDE = 64
SPEED = 16  # pixels per frame
ROI = [128, 0, 64, 128]  # centred at x 160


def conveyor_video(path: Path) -> tuple[Path, list[set[int]]]:
    """A belt with four parts: one alone, two close together, one that stops in view for 30 frames, and
    lighting flicker (the whole frame +-35 grey levels, over the threshold) on a third of the frames, empty
    stretches included.

    Returns the video and, per part, the frame indices where it is best placed (its centre at the ROI's)."""
    rng = np.random.default_rng(11)
    pictures = [make_part(rng, PART_SIDE)[0] for _ in range(4)]
    # (first frame, frames stopped at the centre): left edge x = -64 + 16 k, centred (x = 128) at k = 12
    schedule = [(12, 0), (50, 0), (60, 0), (100, 30)]  # parts 2 and 3: 160 px apart centre to centre
    total = 175
    frames, best = [], [set() for _ in schedule]
    for t in range(total):
        frame = np.full((*BELT, 3), 70, np.uint8)
        frame = cv2.add(frame, rng.integers(0, 6, frame.shape, dtype=np.uint8))
        for number, ((start, stop), picture) in enumerate(zip(schedule, pictures)):
            k = t - start
            if k < 0:
                continue
            k = k if k <= 12 else max(12, k - stop)
            x = -PART_SIDE + SPEED * k
            if x >= BELT[1] or x + PART_SIDE <= 0:
                continue
            if x == 128:
                best[number].add(t)
            left, right = max(0, x), min(BELT[1], x + PART_SIDE)
            frame[32:32 + PART_SIDE, left:right] = picture[:, left - x:right - x]
        if rng.random() < 0.33:
            shift = np.full_like(frame, 35)  # over presence_threshold (25)
            frame = cv2.add(frame, shift) if rng.random() < 0.5 else cv2.subtract(frame, shift)
        frames.append(frame)
    return write_video(path, frames, fps=20.0), best


def test_presence_counts_each_part_once_on_its_best_placed_frame(bundle, tmp_path):
    video, best = conveyor_video(tmp_path / "belt.avi")
    data = config_data(str(video), bundle.path, camera={"trigger": "presence", "presence_roi": ROI},
                       publish={"wait_for_subscriber_s": 30.0})
    with running(data) as (service, subscriber):
        got = results(subscriber, 4)
        assert quiet(subscriber, 0.5) == []  # and no more: no part judged twice, flicker is no part
        wait_for(lambda: service.pipeline is not None and service.pipeline.finished.is_set(), 30, "the end")
        health = service.health()
    assert [h["part_id"] for h in got] == ["1", "2", "3", "4"]
    assert all(h["verdict"] != "error" for h in got), got
    for header, frames in zip(got, best):  # judged on the frame where the part is centred in the ROI
        assert header["frame_index"] in frames, (header["frame_index"], frames)
    assert health["presence"]["parts"] == 4 and health["processed"] == 4
    assert health["frames_skipped"] == 175 - 4


def test_triggers_waiting_at_stop_get_their_error_results(bundle, tmp_path):
    data = triggered(str(tmp_path / "absent") + "/", bundle.path, trigger_timeout_ms=600_000)
    control = data["publish"]["control_endpoint"]
    service = Service(parse_config(data))
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False})
    with Subscriber(data["publish"]["endpoint"], ("inspection.",)) as subscriber:
        runner.start()
        wait_for(lambda: service.camera is not None and service.camera.state == "waiting", 30, "a waiting camera")
        assert send_control(control, "trigger S-1")["ok"] and send_control(control, "trigger S-2")["ok"]
        service.stop()  # the drain publishes every part the service knows of
        got = results(subscriber, 2, timeout=15)
        runner.join(30)
    assert [h["part_id"] for h in got] == ["S-1", "S-2"]
    assert all(h["verdict"] == "error" and "service stopped" in h["error"] for h in got)


def test_a_trigger_flood_loses_no_part_and_stays_bounded(bundle, video):
    """200 triggers as fast as one client can send them, queue 8: every part id gets exactly one result."""
    data = triggered(str(video), bundle.path, fps=20.0, loop=True, trigger_queue=8)
    control = data["publish"]["control_endpoint"]
    with running(data) as (service, subscriber):
        wait_for(lambda: service.camera is not None and service.camera.state == "connected", 30, "the camera")
        replies = [send_control(control, {"command": "trigger", "part_id": f"F-{i}"}) for i in range(200)]
        accepted = [r["part_id"] for r in replies if r["ok"]]
        assert 8 <= len(accepted) < 200  # the queue bound held
        got = results(subscriber, 200, timeout=60)
        triggers = service.health()["triggers"]
    assert sorted(h["part_id"] for h in got) == sorted(f"F-{i}" for i in range(200))  # one result each
    judged = [h["part_id"] for h in got if h["verdict"] != "error"]
    assert judged == accepted  # the accepted ones, judged in the order they were sent
    assert all("trigger queue full" in h["error"] for h in got if h["part_id"] not in accepted)
    assert triggers["refused"] == 200 - len(accepted) and triggers["pending"] == 0


def test_presence_worst_judges_every_frame_of_a_part_and_keeps_the_worst(bundle, tmp_path):
    video, _ = conveyor_video(tmp_path / "belt.avi")

    def run(**camera) -> tuple[list[dict], dict]:
        data = config_data(str(video), bundle.path, camera={"trigger": "presence", "presence_roi": ROI, **camera},
                           publish={"wait_for_subscriber_s": 30.0})
        with running(data) as (service, subscriber):
            got = results(subscriber, 4)
            assert quiet(subscriber, 0.5) == []
            wait_for(lambda: service.pipeline is not None and service.pipeline.finished.is_set(), 30, "the end")
            return got, service.health()

    best, _ = run()
    worst, health = run(presence_judge="worst", presence_max_frames=100)
    assert [h["part_id"] for h in worst] == ["1", "2", "3", "4"]
    assert [h["sequence"] for h in worst] == [1, 2, 3, 4]  # renumbered: no gaps where frames were merged
    assert health["processed"] == 4 and health["presence"]["parts"] == 4
    assert health["presence"]["frames_judged"] >= 4 * 5  # every frame of each part while in view
    # every frame was judged, the best-placed one among them: the worst is at least as bad, and for some
    # part another frame (the part half in view) scored higher
    pairs = [(w["score"], b["score"]) for w, b in zip(worst, best)]
    assert all(w >= b - 1e-6 for w, b in pairs), pairs
    assert any(w > b for w, b in pairs), pairs


def test_part_ids_the_service_assigns_never_repeat_across_restarts(tmp_path):
    path = tmp_path / "state" / "parts" / "line9"
    first = PartCounter(path)
    ids = [int(first.take()) for _ in range(PartCounter.BLOCK + 5)]  # past one reserved block
    assert ids == list(range(1, PartCounter.BLOCK + 6))
    second = PartCounter(path)  # a restart (or SIGKILL: the file is written before ids are used)
    assert int(second.take()) > ids[-1]
    gate = TriggerGate(1000, 4, "line9", PartCounter(path))  # the gates take their ids from it
    assert int(gate.trigger(None, 0)["part_id"]) > ids[-1]
    for bad in ("", "12x", "-3", "9" * 20):
        path.write_text(bad)
        with pytest.raises(ConfigError, match=f"{path}: expected the next part id"):
            PartCounter(path)
    assert counter_file(None, "", "line9") is None  # outside systemd, no file: ids start at 1 each run
    under_systemd = counter_file(None, "/var/lib/edge-inspector", "a/../b")
    assert under_systemd is not None and under_systemd.parent == Path("/var/lib/edge-inspector/parts")
    assert under_systemd.name.startswith("a_.._b-")  # one file name inside parts/, whatever the id holds
    assert counter_file(None, "/s", "a/b") != counter_file(None, "/s", "a_b")  # two cameras, two files
