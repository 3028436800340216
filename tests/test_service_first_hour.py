"""The service side of the first hour on a line (issues 8 and 11): install permissions, honest health from the
first message to the last, bad files as error results, exit codes, start-timeout extension, TensorRT fallback
and engine cache, watchdog retry and process pauses. Real processes, real sockets, real files."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from edge_inspector.backends import BackendRuntimeError, create_backend
from edge_inspector.core.errors import BackendError
from edge_inspector.core.systemd import Notifier, extending_start
from edge_inspector.service.app import Service
from edge_inspector.service.config import parse_config
from edge_inspector.tools.subscriber import Subscriber
from service_helpers import (
    CLI_CODE,
    REPO,
    NotifyListener,
    SilentCamera,
    config_data,
    conveyor_frames,
    copy_world_readable,
    shared_folder,
    subprocess_env,
    unprivileged_run,
    wait_for,
    write_video,
)


@pytest.fixture
def installed(bundle):
    """A world-readable folder like /var/lib/edge-inspector after the documented install (as root)."""
    folder = shared_folder("first-hour")
    copy_world_readable(bundle.path, folder / "bundle")
    frames = folder / "frames"
    frames.mkdir(mode=0o755)
    for i, image in enumerate(conveyor_frames(np.random.default_rng(51), 3, [False, True, False])[0]):
        cv2.imwrite(str(frames / f"{i:02d}.png"), image)
        (frames / f"{i:02d}.png").chmod(0o644)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def write_config(folder: Path, data: dict) -> Path:
    path = folder / "line.yaml"
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o644)
    return path


def test_an_unreadable_image_is_an_error_result_naming_it_and_the_run_goes_on(installed):
    """The issue's case: a mode-600 file in the folder as the service user. Before: exit 1, restart, again."""
    (installed / "frames" / "01.png").chmod(0o600)
    data = config_data(str(installed / "frames") + "/", installed / "bundle",
                       publish={"wait_for_subscriber_s": 30.0})
    config = write_config(installed, data)
    results, health = [], []
    with Subscriber(data["publish"]["endpoint"]) as subscriber:
        stop = threading.Event()

        def receive():
            while not stop.is_set():
                message = subscriber.receive(0.2)
                if message is not None:
                    (results if message.is_result else health).append(message.header)

        receiver = threading.Thread(target=receive)
        receiver.start()
        try:
            done = unprivileged_run(CLI_CODE, "run", str(config), timeout=120)
            time.sleep(0.5)
        finally:
            stop.set()
            receiver.join(5)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["sequence"] for r in results] == [1, 2, 3]
    assert [Path(r["source_file"]).name for r in results] == ["00.png", "01.png", "02.png"]
    bad = results[1]
    assert bad["verdict"] == "error" and "01.png: cannot read (Permission denied)" in bad["error"]
    assert set(bad["latency_ms"]) == {"capture", "queue", "tiling", "inference", "decision", "encode", "total"}
    assert bad["latency_ms"]["inference"] == 0.0
    assert results[0]["verdict"] == "pass" and results[2]["verdict"] == "pass"
    final = health[-1]
    assert final["state"] == "stopped" and final["ok"] and final["errors"] == 1 and final["unreadable_images"] == 1


def test_unreadable_config_or_bundle_is_one_line_and_exit_2_for_the_service_user(installed):
    config = write_config(installed, config_data(str(installed / "frames") + "/", installed / "bundle"))
    config.chmod(0o600)
    for command in (["run", str(config)], ["check-config", "--config", str(config)]):
        done = unprivileged_run(CLI_CODE, *command)
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [f"error: {config}: cannot read (Permission denied; the "
                                                    "service user needs read access to it)"]
    config.chmod(0o644)
    (installed / "bundle" / "model.onnx").chmod(0o600)
    done = unprivileged_run(CLI_CODE, "run", "--config", str(config))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "model.onnx: cannot read (Permission denied" in done.stderr


def test_health_is_ok_from_the_first_message_and_stopped_is_the_last(bundle, tmp_path):
    """Three starts: every health message says ok while stages start, the run's last message is `stopped`."""
    frames, _ = conveyor_frames(np.random.default_rng(52), 3, 0.0)
    video = write_video(tmp_path / "line.avi", frames)
    for _attempt in range(3):
        # wait_for_subscriber_s: on a loaded machine the whole 3-frame run can end before the SUB's
        # subscription reaches the PUB, and then nothing at all is received (seen in a full-suite run).
        data = config_data(str(video), bundle.path, publish={"health_interval_s": 0.05,
                                                             "wait_for_subscriber_s": 20.0})
        service = Service(parse_config(data))
        messages = []
        with Subscriber(data["publish"]["endpoint"]) as subscriber:
            time.sleep(0.3)  # the SUB is connecting while the service binds and loads
            runner = threading.Thread(target=service.run, kwargs={"install_signals": False})
            runner.start()
            runner.join(60)
            while (message := subscriber.receive(1.0)) is not None:
                messages.append(message.header)
        assert not runner.is_alive()
        health = [m for m in messages if m["type"] == "health"]
        assert health and all(h["ok"] for h in health), [h["problems"] for h in health if not h["ok"]]
        assert messages[-1]["type"] == "health" and messages[-1]["state"] == "stopped"
        assert sum(m["type"] == "health" and m["state"] == "stopped" for m in messages) == 1
        assert messages[-1]["processed"] == 3


def test_extend_timeout_is_sent_while_a_slow_start_runs():
    notify = NotifyListener()
    try:
        notifier = Notifier({"NOTIFY_SOCKET": notify.path})
        with extending_start(notifier, "building TensorRT engine", step_s=0.3):
            time.sleep(1.0)  # a slow engine build
        count = len(notify.seen("EXTEND_TIMEOUT_USEC"))
        time.sleep(0.4)
        assert len(notify.seen("EXTEND_TIMEOUT_USEC")) == count  # nothing after the build ended
        assert count >= 3 and notify.seen("EXTEND_TIMEOUT_USEC")[0]["EXTEND_TIMEOUT_USEC"] == "300000"
        assert notify.seen("EXTEND_TIMEOUT_USEC")[-1]["STATUS"].startswith("starting: building TensorRT engine (")
        with extending_start(notifier, "hung", step_s=0.3, limit_s=0.4):
            time.sleep(0.8)
            at_limit = len([m for m in notify.messages if "hung" in m.get("STATUS", "")])
            time.sleep(0.5)
            later = len([m for m in notify.messages if "hung" in m.get("STATUS", "")])
        assert at_limit >= 2 and later == at_limit  # bounded: a start that never ends is not kept alive forever
    finally:
        notify.close()


class FailingTensorRT:
    """Stands in for the TensorRT backend on machines without a GPU: it fails to start, as on a busy Jetson."""

    def __init__(self, bundle):
        raise BackendRuntimeError("CUDA cudaMalloc failed: cudaErrorMemoryAllocation (out of memory)")


def test_auto_falls_back_to_onnxruntime_when_tensorrt_fails_to_start(bundle, caplog):
    backend = create_backend(bundle, "auto", threads=1, tensorrt_factory=FailingTensorRT,
                             warm_up=lambda b: b.infer(np.zeros((1, 128, 128, 3), np.uint8)))
    try:
        assert backend.describe().startswith("onnxruntime")
    finally:
        backend.close()
    assert "TensorRT failed to start (BackendRuntimeError: CUDA cudaMalloc failed" in caplog.text
    with pytest.raises(BackendRuntimeError):  # explicit tensorrt: no fallback, and restartable (not exit 2)
        create_backend(bundle, "tensorrt", tensorrt_factory=FailingTensorRT)
    assert not issubclass(BackendRuntimeError, BackendError)


def test_engines_built_by_the_service_go_to_the_state_directory(bundle, tmp_path):
    from edge_inspector.backends.tensorrt.engines import (
        DeviceInfo,
        engine_cache_dir,
        engine_filename,
        read_cached_engine,
        save_cached_engine,
    )

    device = DeviceInfo(gpu_name="Orin", compute_capability=(8, 7), trt_version="10.3.0")
    assert engine_cache_dir(bundle, {}) is None
    folder = engine_cache_dir(bundle, {"STATE_DIRECTORY": str(tmp_path / "state")})
    assert folder == tmp_path / "state" / "engines" / bundle.sha256[:16]
    assert read_cached_engine(folder, device, None) is None
    path = save_cached_engine(folder, engine_filename(device, "fp16"), b"serialized engine")
    assert read_cached_engine(folder, device, None) == (str(path), b"serialized engine")
    other = DeviceInfo(gpu_name="Orin", compute_capability=(8, 7), trt_version="10.4.0")
    assert read_cached_engine(folder, other, None) is None  # another TensorRT: never used
    path.write_bytes(b"serialized eng")  # truncated
    assert read_cached_engine(folder, device, None) is None


def test_a_withheld_watchdog_ping_goes_out_as_soon_as_the_stage_recovers(bundle, tmp_path):
    camera = SilentCamera()  # the open hangs for open_timeout_s, then fails; capture beats again
    notify = NotifyListener()
    data = config_data(camera.url, bundle.path, camera={"open_timeout_s": 4.0, "read_timeout_s": 4.0,
                                                        "reconnect_initial_s": 8.0, "reconnect_max_s": 8.0})
    config = parse_config(data)
    config.pipeline.stall_timeout_s = 0.5  # below the open timeout on purpose: the open looks hung for 3.5 s
    service = Service(config, notifier=Notifier({"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "6000000"}))
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False})
    try:
        runner.start()
        wait_for(lambda: any("capture unresponsive" in p for p in service.problems()), 30, "the hang")
        hung, pings = time.monotonic(), len(notify.seen("WATCHDOG"))
        cleared = pinged = None
        while time.monotonic() < hung + 10 and (cleared is None or pinged is None):
            now = time.monotonic()
            if cleared is None and not service.problems():
                cleared = now
            if pinged is None and len(notify.seen("WATCHDOG")) > pings:
                pinged = now
            time.sleep(0.01)
        assert cleared is not None and pinged is not None
        assert cleared - hung > 3.0  # the hang outlasted the 3 s ping interval: a ping was due and withheld
        # ... and it went out on the first supervisor tick after the problem cleared, not 3 s later.
        assert pinged - cleared < 1.0
    finally:
        service.stop()
        runner.join(20)
        camera.close()
        notify.close()


@pytest.mark.slow
def test_a_whole_process_pause_is_not_a_stall(bundle, tmp_path):
    """SIGSTOP for longer than the stall timeout, then SIGCONT: no watchdog withheld, health stays ok."""
    frames, _ = conveyor_frames(np.random.default_rng(53), 4, 0.0)
    video = write_video(tmp_path / "line.avi", frames)
    data = config_data(str(video), bundle.path, camera={"fps": 5.0, "loop": True, "open_timeout_s": 0.5,
                                                        "read_timeout_s": 0.5},
                       pipeline={"stall_timeout_s": 1.0}, publish={"health_interval_s": 0.1})
    config = tmp_path / "line.yaml"
    config.write_text(yaml.safe_dump(data))
    notify = NotifyListener()
    process = subprocess.Popen([sys.executable, "-m", "edge_inspector.cli", "run", str(config)],
                               env=subprocess_env(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="1000000"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    health = []
    try:
        with Subscriber(data["publish"]["endpoint"], ("health.",)) as subscriber:
            wait_for(lambda: notify.seen("READY"), 90, "READY")
            wait_for(lambda: (m := subscriber.receive(0.5)) is not None and m.header["processed"] > 2, 30, "frames")
            process.send_signal(signal.SIGSTOP)
            time.sleep(2.5)  # 2.5 x the stall timeout
            pings = len(notify.seen("WATCHDOG"))
            process.send_signal(signal.SIGCONT)
            wait_for(lambda: len(notify.seen("WATCHDOG")) > pings, 3, "a ping right after the pause")
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                if (message := subscriber.receive(0.2)) is not None:
                    health.append(message.header)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        notify.close()
    assert process.returncode == 0
    assert health and all(h["ok"] for h in health), [h["problems"] for h in health]
    assert "withholding watchdog" not in output and "the process was paused" in output


# -- no tool is ever silent (issue 28, item 4) ------------------------------------------------------------------


def _curve_server(socket_type: int):
    """A real CURVE-only socket, as the service binds with security.curve_secret_key set."""
    import zmq

    context = zmq.Context.instance()
    public, secret = zmq.curve_keypair()
    socket = context.socket(socket_type)
    socket.setsockopt(zmq.LINGER, 0)
    socket.curve_server, socket.curve_secretkey, socket.curve_publickey = True, secret, public
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    return socket, f"tcp://127.0.0.1:{port}"


def _run_cli(*args: str):
    from click.testing import CliRunner

    from edge_inspector.cli import main

    return CliRunner().invoke(main, list(args))


def test_subscribe_says_what_it_waits_for_and_why_nothing_comes():
    from service_helpers import free_port

    nobody = f"tcp://127.0.0.1:{free_port()}"
    done = _run_cli("subscribe", nobody, "--timeout", "1")
    assert done.exit_code == 1
    assert done.stderr.startswith(f"waiting for inspection and health messages from {nobody}")
    assert f"nothing accepts connections at {nobody}" in done.stderr
    import zmq

    server, curve_only = _curve_server(zmq.PUB)
    try:
        done = _run_cli("subscribe", curve_only, "--timeout", "1")
    finally:
        server.close(0)
    assert done.exit_code == 1 and f"{curve_only} requires CURVE" in done.stderr and "--server-key" in done.stderr


def test_control_names_curve_when_the_service_requires_it():
    import zmq

    server, curve_only = _curve_server(zmq.REP)
    try:
        done = _run_cli("control", curve_only, "status", "--timeout", "0.5")
    finally:
        server.close(0)
    assert done.exit_code == 1
    line = done.stderr.strip()
    assert line.startswith(f"error: no reply from {curve_only} within 0.5 s; {curve_only} requires CURVE")
    assert "\n" not in line


def test_check_config_probes_the_folder_camera_and_ports(installed, tmp_path):
    import zmq

    from service_helpers import free_port

    data = config_data(str(installed / "frames"), installed / "bundle")
    done = _run_cli("check-config", str(write_config(tmp_path, data)))
    assert done.exit_code == 0, done.output
    assert "checked: folder" in done.stdout and "3 image(s) at its top level" in done.stdout
    assert done.stdout.count("is free") == 2

    nested = tmp_path / "test"
    shutil.copytree(installed / "frames", nested / "good")
    done = _run_cli("check-config", str(write_config(tmp_path, config_data(str(nested) + "/", installed / "bundle"))))
    assert done.exit_code == 2 and "3 images in subfolders are not read" in done.stderr
    assert "OK" not in done.stdout

    busy = zmq.Context.instance().socket(zmq.PUB)
    port = free_port()
    busy.bind(f"tcp://127.0.0.1:{port}")
    try:
        data["publish"]["endpoint"] = f"tcp://127.0.0.1:{port}"
        done = _run_cli("check-config", str(write_config(tmp_path, data)))
    finally:
        busy.close(0)
    assert done.exit_code == 2 and f"publish.endpoint: cannot bind tcp://127.0.0.1:{port}" in done.stderr

    camera = config_data("7", installed / "bundle")
    camera["camera"]["source"] = 7
    done = _run_cli("check-config", str(write_config(tmp_path, camera)))
    assert done.exit_code == 0 and "warning: cannot open device 7" in done.stdout
    assert "retry it forever" in done.stdout and "[ WARN" not in done.output


def test_the_tiling_warning_is_logged_once(bundle, tmp_path, caplog):
    from edge_inspector.service.app import check_tiling
    from edge_inspector.service.config import load_config

    data = config_data("frames/", bundle.path, tiling={"rows": 2, "cols": 2})
    config = load_config(str(write_config(tmp_path, data)))
    with caplog.at_level("WARNING"):
        check_tiling(config, bundle)
        check_tiling(config, bundle)
    assert sum("differs from the" in r.getMessage() for r in caplog.records) == 1


def test_progress_prints_plain_lines_off_a_terminal(capsys):
    from edge_inspector.core.progress import is_interactive, progress

    assert not is_interactive()  # pytest captures stderr: not a terminal
    for _ in progress(range(4), desc="fit: features", unit="batch", line_every_s=0.0):
        pass
    for _ in progress(range(4), desc="short loop", unit="batch"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("fit: features: 1/4 batch (25%), 0 s, about 0 s left")
    assert lines[-1].startswith("fit: features: done, 4 batch in")
    assert not any("short loop" in line for line in lines)  # shorter than LINE_EVERY_S: nothing to say


# -- example configs run README's path (issue 28, item 5) -------------------------------------------------------


def _example(name: str, folder: Path, source: str, bundle_path: Path) -> Path:
    """configs/NAME with only what README says to edit (camera.source, model.bundle); the ports move to free ones
    only because tests run beside other tests on this machine."""
    from service_helpers import endpoint

    data = yaml.safe_load((REPO / "configs" / name).read_text())
    data["camera"]["source"], data["model"]["bundle"] = source, str(bundle_path)
    data["publish"]["endpoint"] = endpoint()
    data["publish"]["control_endpoint"] = endpoint()
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def _washer_frames(synthetic_dataset: Path, folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    images = sorted((synthetic_dataset / "test" / "good").glob("*.png"))[:count]
    return [Path(shutil.copy(p, folder / f"{i:03d}.png")) for i, p in enumerate(images)]


@pytest.mark.parametrize("name", ["service-replay-folder.yaml", "service-usb.yaml"])
def test_example_configs_run_the_readme_path_with_only_source_and_bundle_edited(name, small_padim_bundle,
                                                                                synthetic_dataset, tmp_path):
    from edge_inspector.core.wire import send_control
    from edge_inspector.service.config import load_config

    frames = _washer_frames(synthetic_dataset, tmp_path / "frames", 4)
    if name == "service-usb.yaml":  # no camera here: a recorded video stands in for it (README: edit the source)
        images = [cv2.imread(str(p)) for p in frames] * 15  # 60 frames: 4 s at the config's 15 fps, a live feed
        source = str(write_video(tmp_path / "line1.avi", images))
    else:
        source = str(tmp_path / "frames")
    config = load_config(str(_example(name, tmp_path, source, small_padim_bundle.path)))
    assert config.tiling.rows == config.tiling.cols == 1  # the grid README's `fit` makes: no tiling warning
    service = Service(config)
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False})
    runner.start()
    try:
        wait_for(service.ready.is_set, 60, "service ready")
        time.sleep(1.5)  # the user opens the second terminal a moment later
        with Subscriber(config.publish.endpoint, ("inspection.",)) as subscriber:
            first = subscriber.receive(30)
            assert first is not None, "no result reached the late subscriber"
            if name == "service-replay-folder.yaml":  # wait_for_subscriber_s held the first frame for it
                assert first.header["frame_index"] == 0, first.header
        status = send_control(config.publish.control_endpoint, {"command": "status"}, timeout_s=10)
        assert status["ok"] and status["camera_id"] == config.camera.id
    finally:
        service.stop()
        runner.join(30)


def test_reload_keeps_an_operator_threshold_only_inside_the_new_range(bundle, tmp_path, caplog):
    from edge_inspector.core.bundle import Bundle, finalize_bundle
    from edge_inspector.core.wire import send_control

    video = write_video(tmp_path / "v.avi", conveyor_frames(np.random.default_rng(5), 6, [False] * 6)[0])
    data = config_data(str(video), bundle.path, camera={"loop": True, "fps": 10})
    far = tmp_path / "far"  # the same graph re-issued with a threshold 100 x higher: a range far above the old one
    shutil.copytree(bundle.path, far)
    meta = Bundle.load(far).meta
    meta.threshold.value = bundle.threshold * 100
    meta.score_stats = None
    finalize_bundle(far, meta)
    service = Service(parse_config(data))
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False})
    runner.start()
    control = data["publish"]["control_endpoint"]
    try:
        wait_for(service.ready.is_set, 60, "service ready")
        low, high = send_control(control, {"command": "status"})["threshold_range"]
        operator = round((bundle.threshold + high) / 2, 4)
        assert send_control(control, {"command": "set_threshold", "value": operator})["ok"]
        with caplog.at_level("WARNING"):
            same = send_control(control, {"command": "reload"}, timeout_s=60)
            assert same["ok"] and same["threshold"] == pytest.approx(operator)
            assert same["threshold_note"].startswith("kept the threshold set by the control socket")
            moved = send_control(control, {"command": "reload", "bundle": str(far)}, timeout_s=60)
        assert moved["ok"] and moved["threshold"] == pytest.approx(bundle.threshold * 100)
        assert f"the threshold {operator:.6g} set by the control socket" in moved["threshold_note"]
        assert "outside the new bundle's range" in moved["threshold_note"] and moved["threshold_source"] == "bundle"
        logged = [r.getMessage() for r in caplog.records if "reload by the control socket" in r.getMessage()]
        assert len(logged) == 2 and "kept the threshold" in logged[0] and "outside the new bundle's" in logged[1]
    finally:
        service.stop()
        runner.join(30)


# -- one install path in docs/service.md and docs/jetson.md (issue 28, item 5) ----------------------------------

LINK_STEP = "sudo ln -sf /opt/edge-inspector/venv/bin/edge-inspector /usr/local/bin/edge-inspector"
USER_STEP = "sudo useradd --system --no-create-home --shell /usr/sbin/nologin --groups video edge-inspector"


def _drop_in(doc: str, name: str) -> str:
    """The exact drop-in text a doc gives for `sudo tee .../edge-inspector@.service.d/NAME <<'END'`."""
    text = (REPO / "docs" / doc).read_text()
    head = f"/etc/systemd/system/edge-inspector@.service.d/{name} >/dev/null <<'END'\n"
    assert head in text, f"docs/{doc} gives no {name} drop-in"
    return text.split(head, 1)[1].split("\nEND\n", 1)[0] + "\n"


def test_the_two_install_guides_are_one_path():
    service, jetson = ((REPO / "docs" / name).read_text() for name in ("service.md", "jetson.md"))
    unit = (REPO / "systemd" / "edge-inspector@.service").read_text()
    assert "ExecStart=/usr/local/bin/edge-inspector run --config /etc/edge-inspector/%i.yaml" in unit
    for text in (service, jetson):
        assert LINK_STEP in text and USER_STEP in text
        assert "sudo chown -R edge-inspector:edge-inspector /var/lib/edge-inspector\n" in text
        assert "/var/lib/edge-inspector/bundles/" in text and "/opt/edge-inspector/bundles" not in text
    assert "BindPaths=/tmp/argus_socket" in _drop_in("jetson.md", "jetson.conf")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_the_units_and_drop_ins_at_the_documented_paths(tmp_path):
    """A scratch root laid out as the docs install it: the venv's script, the link the unit runs, the config
    folder, both units and both drop-ins; `systemd-analyze verify --root` then checks every directive and
    that ExecStart= names an executable."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in (REPO / "systemd").glob("*.service"):
        shutil.copy(unit, units / unit.name)
    (units / "edge-inspector@.service.d").mkdir()
    (units / "edge-inspector@.service.d" / "gpu.conf").write_text(_drop_in("service.md", "gpu.conf"))
    (units / "edge-inspector@.service.d" / "jetson.conf").write_text(_drop_in("jetson.md", "jetson.conf"))
    script = root / "opt/edge-inspector/venv/bin/edge-inspector"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (root / "usr/local/bin").mkdir(parents=True)
    target, link = LINK_STEP.split()[-2:]
    (root / link.lstrip("/")).symlink_to(target)  # absolute, as `ln -sf` makes it: resolved inside the root
    (root / "etc/edge-inspector").mkdir()
    (root / "etc/edge-inspector/view-line1.env").write_text("VIEW_OPTIONS=--connect tcp://127.0.0.1:5556\n")
    done = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "edge-inspector@line1.service",
                           "edge-inspector-view@line1.service"], capture_output=True, text=True, timeout=60)
    ours = [line for line in done.stderr.splitlines() if "edge-inspector" in line]
    assert done.returncode == 0 and not ours, done.stderr
    script.unlink()  # the check can fail: without the venv the link dangles and verify says so
    done = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "edge-inspector@line1.service"],
                          capture_output=True, text=True, timeout=60)
    assert "/usr/local/bin/edge-inspector is not executable" in done.stderr
