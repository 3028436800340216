"""The whole service: as a systemd-style subprocess, in-process with its control socket, and its CLI errors."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_inspector.core.bundle import Bundle, finalize_bundle
from edge_inspector.core.wire import send_control
from edge_inspector.service.app import Service
from edge_inspector.service.config import parse_config
from edge_inspector.tools.subscriber import Subscriber
from service_helpers import (
    LANES,
    PART,
    REPO,
    FlakyVideoServer,
    NotifyListener,
    SilentCamera,
    config_data,
    conveyor_frames,
    subprocess_env,
    wait_for,
    write_video,
)


def write_config(folder: Path, data: dict) -> Path:
    path = folder / "service.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_inspector.cli", *args], capture_output=True, text=True,
                          env=env or subprocess_env(), cwd=REPO, timeout=timeout)


@pytest.mark.slow
def test_systemd_subprocess_ready_watchdog_and_clean_sigterm(bundle, tmp_path):
    """Camera absent at start -> READY anyway; camera appears -> results; SIGTERM -> all in flight published, exit 0."""
    target = tmp_path / "camera.avi"
    data = config_data(str(target), bundle.path, camera={"fps": 15.0, "loop": True},
                       publish={"wait_for_subscriber_s": 30.0})
    config = write_config(tmp_path, data)
    notify = NotifyListener()
    results, health = [], []
    subscriber = Subscriber(data["publish"]["endpoint"])
    process = subprocess.Popen([sys.executable, "-m", "edge_inspector.cli", "run", "--config", str(config)],
                               env=subprocess_env(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="400000"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    stop_receiving = threading.Event()

    def receive():
        while not stop_receiving.is_set():
            message = subscriber.receive(0.2)
            if message is not None:
                (results if message.is_result else health).append(message)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    try:
        wait_for(lambda: notify.seen("READY"), 90, "READY=1")
        assert not results  # READY came without a camera
        wait_for(lambda: any(h.header["state"] == "waiting" for h in health), 20, "a 'waiting' health message")
        waiting = next(h.header for h in health if h.header["state"] == "waiting")
        assert "not found" in waiting["last_error"]
        wait_for(lambda: any("waiting for camera" in m.get("STATUS", "") for m in notify.messages), 20,
                 "STATUS saying the camera is awaited")
        wait_for(lambda: len(notify.seen("WATCHDOG")) >= 2, 20, "watchdog pings while waiting for the camera")

        frames, _ = conveyor_frames(np.random.default_rng(21), 8, [False, True] * 4)
        os.replace(write_video(tmp_path / "staged.avi", frames), target)  # the camera comes online
        wait_for(lambda: len(results) >= 6, 60, "results")
        pings = len(notify.seen("WATCHDOG"))
        wait_for(lambda: len(notify.seen("WATCHDOG")) > pings, 20, "watchdog pings while streaming")

        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        time.sleep(1.0)
    finally:
        stop_receiving.set()
        receiver.join(5)
        if process.poll() is None:
            process.kill()
        subscriber.close()
        notify.close()

    assert notify.seen("STOPPING")
    assert notify.messages.index(notify.seen("READY")[0]) < notify.messages.index(notify.seen("STOPPING")[0])
    sequences = [m.header["sequence"] for m in results]
    assert sequences == list(range(1, len(results) + 1))  # nothing lost, nothing twice
    final = health[-1].header
    assert final["processed"] == len(results)  # every frame that entered inference was published
    assert final["captured"] == final["processed"] + final["dropped"]  # and every captured frame is accounted for
    for message in results:
        assert message.heatmap_image().shape == (PART // 2, PART * LANES // 2)  # auto: the map's blur, sigma 4
        assert message.header["verdict"] == ("fail" if message.header["frame_index"] % 2 else "pass")
    assert "stopped:" in output


def test_stream_lost_mid_way_is_reconnected_and_reported(bundle, tmp_path):
    frames, _ = conveyor_frames(np.random.default_rng(22), 12, 0.0)
    video = write_video(tmp_path / "line.avi", frames)
    with FlakyVideoServer(video, cut=1) as server:
        data = config_data(server.url, bundle.path, publish={"wait_for_subscriber_s": 30.0})
        service = Service(parse_config(data))
        runner = threading.Thread(target=service.run, kwargs={"install_signals": False})
        with Subscriber(data["publish"]["endpoint"]) as subscriber:
            runner.start()
            results, reports = [], []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (
                    any(h["reconnects"] >= 1 for h in reports) and len(results) > 12):
                message = subscriber.receive(0.5)
                if message is not None:
                    (results if message.is_result else reports).append(message.header)
            service.stop()
            runner.join(30)
    assert not runner.is_alive()
    assert any(h["state"] == "waiting" and "read failed" in h["last_error"] for h in reports)
    reported = next(h for h in reports if h["reconnects"] >= 1)
    # The health message is sent asynchronously after the reconnect event, by which time the short replayed
    # stream may have ended and been lost again, so its state is not asserted; the results below prove the
    # reconnect delivered frames.
    assert reported["disconnects"] >= 1
    assert len(results) > 12  # frames flowed again after the reconnect
    assert [r["sequence"] for r in results] == list(range(1, len(results) + 1))


@pytest.mark.parametrize("workers", [1, 2])
def test_control_socket_threshold_and_reload_without_stopping(bundle, tmp_path, workers):
    """Also with two inference workers (model.workers): a reload while frames are judged at once."""
    frames, _ = conveyor_frames(np.random.default_rng(23), 6, [True] * 6)
    video = write_video(tmp_path / "line.avi", frames)
    data = config_data(str(video), bundle.path, camera={"fps": 10.0, "loop": True},
                       publish={"wait_for_subscriber_s": 30.0}, model={"workers": workers})
    control = data["publish"]["control_endpoint"]
    # A second bundle: the same graph re-issued with another threshold (as after a re-fit on the line).
    other = tmp_path / "bundle-b"
    shutil.copytree(bundle.path, other)
    meta = Bundle.load(other).meta
    meta.threshold.value = bundle.threshold * 3
    finalize_bundle(other, meta)

    service = Service(parse_config(data))
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False})
    seen = []
    with Subscriber(data["publish"]["endpoint"], ("inspection.",)) as subscriber:
        runner.start()

        def take(count: int, after: int = 0) -> list[dict]:
            """`count` results with a sequence above `after` (older ones still in flight are skipped)."""
            got = []
            while len(got) < count:
                message = subscriber.receive(30)
                assert message is not None, "results stopped"
                seen.append(message.header)
                if message.header["sequence"] > after:
                    got.append(message.header)
            return got

        def applied_from() -> int:
            """Results after this sequence were certainly judged with what the last command set: the swap
            happens before the next frame, and at most one frame per worker was being inferred when it was
            asked for."""
            return send_control(control, {"command": "stats"})["stats"]["last_sequence"] + workers

        try:
            assert all(h["verdict"] == "fail" for h in take(3))
            status = send_control(control, {"command": "status"})
            assert status["ok"] and status["camera_id"] == "line9" and status["threshold"] == bundle.threshold
            assert status["config"]["tiling"]["cols"] == LANES and status["problems"] == []
            stats = send_control(control, {"command": "stats"})
            assert stats["stats"]["processed"] >= 3

            refused = send_control(control, {"command": "set_threshold", "value": "high"})
            assert refused["ok"] is False and "threshold" in refused["error"]
            low, high = status["threshold_range"]
            assert low <= bundle.threshold <= high
            for silly in (5e-324, bundle.threshold * 1000, high * 1.01, low * 0.99):
                refused = send_control(control, {"command": "set_threshold", "value": silly})
                assert refused["ok"] is False and "outside the allowed range" in refused["error"], silly
            raised = send_control(control, "set_threshold " + repr(high))  # the bare words work too
            assert raised["ok"] and raised["previous"] == bundle.threshold and raised["threshold"] == high
            later = take(3, after=applied_from())
            assert all(h["threshold"] == pytest.approx(high) and h["normalised_score"] == pytest.approx(
                h["score"] / high, rel=1e-4) for h in later)
            health = send_control(control, "status")
            assert health["threshold_source"].startswith("control socket (from 127.0.0.1")

            missing = send_control(control, {"command": "reload", "bundle": str(tmp_path / "nope")})
            assert missing["ok"] is False and "not found" in missing["error"]
            reloaded = send_control(control, {"command": "reload", "bundle": str(other)}, timeout_s=60)
            # The operator's threshold lies inside the new bundle's range, so it survives the reload (issue 28).
            assert reloaded["ok"] and reloaded["threshold"] == pytest.approx(high)
            assert reloaded["threshold_note"].startswith("kept the threshold set by the control socket")
            after = take(3, after=applied_from())
            assert all(h["threshold"] == pytest.approx(high) for h in after)
        finally:
            service.stop()
            runner.join(30)
    assert [h["sequence"] for h in seen] == sorted(h["sequence"] for h in seen)
    assert len({h["sequence"] for h in seen}) == len(seen)


def test_bad_config_exits_2_with_one_line(tmp_path):
    config = write_config(tmp_path, {"model": {"bundle": "b"}, "tiling": {"rows": "two"}})
    for command in (["run", "--config", str(config)], ["check-config", str(config)]):
        done = cli(*command)
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert lines == [f"error: {config}: tiling.rows: expected an integer in [1, 64], got 'two'"]
    done = cli("run", "--config", str(tmp_path / "missing.yaml"))
    assert done.returncode == 2 and done.stderr.strip() == f"error: {tmp_path / 'missing.yaml'}: config file not found"


def test_bundle_problems_exit_2(bundle, tmp_path):
    config = write_config(tmp_path, config_data(str(tmp_path / "v.avi"), tmp_path / "no-bundle"))
    done = cli("run", "--config", str(config))
    assert done.returncode == 2 and "bundle folder not found" in done.stderr and len(done.stderr.splitlines()) == 1
    per_tile = tmp_path / "per-tile"
    shutil.copytree(bundle.path, per_tile)
    meta = Bundle.load(per_tile).meta
    meta.tiling.mode, meta.tiling.rows, meta.tiling.cols = "per_tile", 1, LANES
    finalize_bundle(per_tile, meta)
    config = write_config(tmp_path, config_data(str(tmp_path / "v.avi"), per_tile, tiling={"rows": 2, "cols": 2}))
    done = cli("check-config", str(config))
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"error: {config}: tiling: grid 2x2 does not match")
    config = write_config(tmp_path, config_data(str(tmp_path / "v.avi"), per_tile))
    done = cli("check-config", str(config))
    assert done.returncode == 0 and "OK" in done.stdout and Bundle.load(per_tile).model_id in done.stdout
    assert bundle.model_id not in done.stdout  # the tiling edit is another model on the wire
    done = cli("check-config", "--config", str(config))  # the form docs/jetson.md uses
    assert done.returncode == 0 and "OK" in done.stdout


def test_check_config_accepts_the_examples_without_their_bundles():
    for path in sorted((REPO / "configs").glob("service-*.yaml")):
        done = cli("check-config", "--skip-bundle", str(path))
        if "GStreamer" in done.stderr:
            continue  # the Jetson example needs an OpenCV built with GStreamer
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"{path}: OK")


def test_watchdog_is_withheld_while_a_stage_hangs_and_stop_still_works(bundle, tmp_path):
    from edge_inspector.core.systemd import Notifier

    camera = SilentCamera()
    notify = NotifyListener()
    data = config_data(camera.url, bundle.path, camera={"open_timeout_s": 30.0, "read_timeout_s": 30.0},
                       pipeline={"stall_timeout_s": 31.0})
    config = parse_config(data)
    config.pipeline.stall_timeout_s = 0.6  # below the camera timeouts on purpose: this open now "hangs"
    service = Service(config, notifier=Notifier({"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"}))
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False})
    try:
        with Subscriber(data["publish"]["endpoint"], ("health.",)) as subscriber:
            runner.start()
            wait_for(lambda: notify.seen("READY"), 60, "READY=1")
            wait_for(lambda: any("capture unresponsive" in p for p in service.problems()), 20, "the hang to show")
            pings = len(notify.seen("WATCHDOG"))
            time.sleep(1.0)
            assert len(notify.seen("WATCHDOG")) == pings  # no WATCHDOG=1 while capture is stuck
            wait_for(lambda: (m := subscriber.receive(0.5)) is not None and not m.header["ok"], 20,
                     "a health message reporting the problem")
            service.stop()
            runner.join(20)
            assert not runner.is_alive()  # the stuck capture is cut loose; shutdown still completes
    finally:
        service.stop()
        camera.close()
        notify.close()
    assert notify.seen("STOPPING")


def test_sd_notify_abstract_socket_and_watchdog_pid():
    from edge_inspector.core.systemd import Notifier

    name = f"edge-inspector-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.settimeout(5)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
        assert notifier.ping_interval_s == 1.5
        assert notifier.ready("line 1\nline 2")
        assert listener.recv(4096) == b"READY=1\nSTATUS=line 1 line 2"
        assert notifier.watchdog() and listener.recv(4096) == b"WATCHDOG=1"
        notifier.close()
    finally:
        listener.close()
    other_pid = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"})
    assert other_pid.ping_interval_s is None  # the watchdog belongs to another process
    outside = Notifier({})
    assert not outside.enabled and outside.ready("x") is False
