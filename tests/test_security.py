"""CURVE on the result stream and the control socket, with real keys, real sockets and the real service."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from edge_inspector.core.errors import ConfigError
from edge_inspector.core.keys import ClientKeys, curve_available, generate_keypair
from edge_inspector.core.wire import send_control
from edge_inspector.service.app import Service
from edge_inspector.service.config import parse_config
from edge_inspector.tools.subscriber import Subscriber
from service_helpers import (
    LANES,
    REPO,
    conveyor_frames,
    endpoint,
    fitted_bundle,
    subprocess_env,
    write_video,
)

pytestmark = pytest.mark.skipif(not curve_available(), reason="libzmq without CURVE")


def keys_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_inspector.cli", "keys", *args], capture_output=True,
                          text=True, env=subprocess_env(), cwd=REPO, timeout=60)


def test_keys_command_writes_a_pair_and_never_overwrites(tmp_path):
    done = keys_cli(str(tmp_path / "keys"), "line1")
    assert done.returncode == 0, done.stderr
    public, secret = tmp_path / "keys" / "line1.key", tmp_path / "keys" / "line1.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o644
    assert "secret-key" not in public.read_text() and "secret-key" in secret.read_text()
    again = keys_cli(str(tmp_path / "keys"), "line1")
    assert again.returncode == 2 and again.stderr.strip().endswith("refusing to overwrite a key (delete it first "
                                                                   "to replace it)")


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A running service with CURVE: results for authorised HMIs only, control for one engineer key."""
    base = tmp_path_factory.mktemp("curve")
    keys = base / "keys"
    generate_keypair(keys, "service")
    for name, folder in (("hmi", "results"), ("engineer", "control"), ("intruder", "elsewhere")):
        generate_keypair(keys / folder, name)
    bundle = fitted_bundle(tmp_path_factory.getbasetemp())
    frames, _ = conveyor_frames(np.random.default_rng(41), 4, 0.0)
    video = write_video(base / "line.avi", frames)
    data = {"camera": {"id": "sec", "source": str(video), "fps": 5.0, "loop": True},
            "tiling": {"rows": 1, "cols": LANES},
            "model": {"bundle": str(bundle.path), "backend": "onnxruntime", "threads": 1},
            "publish": {"endpoint": endpoint(), "control_endpoint": endpoint(), "health_interval_s": 0.3},
            "security": {"curve_secret_key": str(keys / "service.key_secret"),
                         "result_clients": str(keys / "results"), "control_clients": str(keys / "control")}}
    service = Service(parse_config(data))
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False}, daemon=True)
    runner.start()
    assert service.ready.wait(60)
    yield service, data, keys, bundle
    service.stop()
    runner.join(30)
    assert not runner.is_alive()


def client(keys, folder: str, name: str) -> ClientKeys:
    return ClientKeys.from_files(keys / "service.key", keys / folder / f"{name}.key_secret")


def received(endpoint_: str, keys: ClientKeys | None, seconds: float = 3.0) -> int:
    count = 0
    with Subscriber(endpoint_, keys=keys) as subscriber:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if subscriber.receive(0.2) is not None:
                count += 1
    return count


def test_results_reach_authorised_subscribers_only(secured):
    service, data, keys, _ = secured
    pub = data["publish"]["endpoint"]
    assert received(pub, client(keys, "results", "hmi")) > 0
    assert received(pub, None) == 0  # plain TCP: the handshake fails, nothing arrives
    assert received(pub, client(keys, "elsewhere", "intruder")) == 0  # right server key, unknown client key
    assert received(pub, client(keys, "control", "engineer")) == 0  # control rights do not include results


def test_control_needs_an_authorised_key(secured):
    service, data, keys, bundle = secured
    control = data["publish"]["control_endpoint"]
    with pytest.raises(TimeoutError):
        send_control(control, "status", timeout_s=1.0)
    with pytest.raises(TimeoutError):
        send_control(control, "status", timeout_s=1.0, keys=client(keys, "results", "hmi"))
    engineer = client(keys, "control", "engineer")
    assert send_control(control, "status", keys=engineer)["ok"]
    reply = send_control(control, {"command": "set_threshold", "value": bundle.threshold * 1.02}, keys=engineer)
    assert reply["ok"]
    status = send_control(control, "status", keys=engineer)
    assert status["threshold_source"].startswith("control socket (key ")  # who changed it, by CURVE key
    assert engineer.public.decode() in status["threshold_source"]
    assert send_control(control, {"command": "set_threshold", "value": bundle.threshold}, keys=engineer)["ok"]


def test_subscribe_and_control_clis_take_the_keys(secured):
    service, data, keys, _ = secured
    done = subprocess.run([sys.executable, "-m", "edge_inspector.cli", "subscribe", data["publish"]["endpoint"],
                           "--count", "1", "--server-key", str(keys / "service.key"),
                           "--client-key", str(keys / "results" / "hmi.key_secret")],
                          capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=60)
    assert done.returncode == 0 and " sec #" in done.stdout
    done = subprocess.run([sys.executable, "-m", "edge_inspector.cli", "control", data["publish"]["control_endpoint"],
                           "status", "--server-key", str(keys / "service.key"),
                           "--client-key", str(keys / "control" / "engineer.key_secret")],
                          capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=60)
    assert done.returncode == 0 and '"camera_id": "sec"' in done.stdout
    done = subprocess.run([sys.executable, "-m", "edge_inspector.cli", "control", data["publish"]["control_endpoint"],
                           "status", "--server-key", str(keys / "service.key")],
                          capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=60)
    assert done.returncode == 2 and "go together" in done.stderr


def test_curve_config_mistakes_are_one_line_config_errors(tmp_path):
    base = {"model": {"bundle": "b"}}
    with pytest.raises(ConfigError, match="security.control_clients: required with CURVE"):
        parse_config({**base, "security": {"curve_secret_key": "k"}})
    with pytest.raises(ConfigError, match="security.curve_secret_key: required when"):
        parse_config({**base, "security": {"result_clients": "r"}})
    generate_keypair(tmp_path, "svc")
    config = parse_config({**base, "publish": {"endpoint": endpoint(), "control_endpoint": None},
                           "security": {"curve_secret_key": str(tmp_path / "svc.key")}})
    from edge_inspector.core.keys import CurveServer

    context = zmq.Context()
    try:
        with pytest.raises(ConfigError, match="holds no secret key"):
            CurveServer(context, config.security.curve_secret_key, None, None)
    finally:
        context.term()


def test_the_live_view_follows_a_curve_service_with_its_own_key(secured):
    """The view is one more client: it sees results and may change the threshold only with keys the service
    lists; without them the page stays empty and control answers with an error."""
    import json
    import urllib.request

    from edge_inspector.tools.view import ViewServer

    service, data, keys, bundle = secured
    generate_keypair(keys / "results", "view")
    view_keys = ClientKeys.from_files(keys / "service.key", keys / "results" / "view.key_secret")

    def state(view: ViewServer) -> dict:
        with urllib.request.urlopen(view.url + "api/state", timeout=5) as reply:
            return json.loads(reply.read())

    # The service loaded its client keys at start, so the view's key is not allowed in yet: nothing arrives.
    plain = ViewServer([data["publish"]["endpoint"]], listen="127.0.0.1:0", keys=view_keys)
    plain.start()
    try:
        time.sleep(2.0)
        assert all(not c.get("results_seen") for c in state(plain)["cameras"])
    finally:
        plain.stop()

    # An authorised key (the engineer's, listed for control, and the HMI's for results) gets both.
    hmi = client(keys, "results", "hmi")
    view = ViewServer([data["publish"]["endpoint"]], listen="127.0.0.1:0", keys=hmi)
    view.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(c.get("results_seen") for c in state(view)["cameras"]):
            time.sleep(0.2)
        assert any(c.get("results_seen") for c in state(view)["cameras"])
    finally:
        view.stop()
    engineer = client(keys, "control", "engineer")
    controller = ViewServer([data["publish"]["endpoint"]], [data["publish"]["control_endpoint"]],
                            listen="127.0.0.1:0", keys=engineer)
    assert controller.control.request(controller.control.endpoints[0], {"command": "status"})["ok"]
    denied = ViewServer([data["publish"]["endpoint"]], [data["publish"]["control_endpoint"]],
                        listen="127.0.0.1:0", keys=hmi)
    reply = denied.control.request(denied.control.endpoints[0], {"command": "status"}, timeout_s=1.0)
    assert reply["ok"] is False
    for server in (controller, denied):
        server.http.server_close()
        server.feed._close()
