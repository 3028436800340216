"""MQTT and OPC UA outputs beside ZeroMQ, against a real mosquitto broker and a real asyncua client.

The broker is Debian's /usr/sbin/mosquitto, started by the test on a free loopback port with a generated
config; the service runs in-process on a folder of real PNG frames judged by the session's real PaDiM bundle.
Skipped cleanly where mosquitto, paho-mqtt or asyncua is missing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_inspector.core.errors import ConfigError
from edge_inspector.service.app import Service
from edge_inspector.service.config import parse_config
from edge_inspector.tools.subscriber import Subscriber
from service_helpers import config_data, conveyor_frames, free_port, wait_for

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def image_folder(folder: Path, count: int, seed: int = 5) -> Path:
    frames, _ = conveyor_frames(np.random.default_rng(seed), count, [i % 3 == 1 for i in range(count)])
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frame)
    return folder


class Broker:
    """A real mosquitto on loopback; stop() and start() again on the same port, as a broker restart."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.config = folder / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        assert MOSQUITTO
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        import socket

        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) == 0
        wait_for(listening, 10, "mosquitto to listen")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


class Listener:
    """A real paho subscriber on <prefix>/#, re-subscribing on every (re)connect."""

    def __init__(self, port: int, prefix: str):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-listener-{port}")
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = lambda c, *_: c.subscribe(f"{prefix}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, keepalive=5)
        self.client.loop_start()

    def _on_message(self, _client, _userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [payload for t, payload, _ in self.messages if t.endswith(topic)]

    def results(self) -> list[dict]:
        return [json.loads(p) for p in self.on("/result")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path):
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    pytest.importorskip("paho.mqtt.client")
    broker = Broker(tmp_path)
    broker.start()
    yield broker
    broker.stop()


def run_in_thread(service: Service) -> threading.Thread:
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False}, daemon=True)
    runner.start()
    return runner


def test_mqtt_results_verdicts_and_a_broker_restart_mid_run(bundle, broker, tmp_path):
    folder = image_folder(tmp_path / "frames", 6)
    prefix = "plant/line9/cam"
    data = config_data(str(folder), bundle.path, camera={"kind": "folder", "fps": 15, "loop": True},
                       publish={"wait_for_subscriber_s": 30.0},
                       outputs={"mqtt": {"port": broker.port, "topic_prefix": prefix, "reconnect_min_s": 1,
                                         "reconnect_max_s": 1, "keepalive_s": 5, "queue_size": 8}})
    listener = Listener(broker.port, prefix)
    wait_for(lambda: listener.client.is_connected(), 10, "the test's MQTT subscriber")
    service = Service(parse_config(data))
    zmq_results: list[dict] = []
    zmq_health: list[dict] = []

    def receive_until(predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            message = subscriber.receive(0.1)
            if message is not None:
                (zmq_results if message.is_result else zmq_health).append(message.header)

    with Subscriber(data["publish"]["endpoint"]) as subscriber:
        runner = run_in_thread(service)
        try:
            receive_until(lambda: len(listener.results()) >= 4, 30, "results over MQTT")
            # The same schema-versioned header as ZeroMQ's, sequence for sequence.
            by_sequence = {h["sequence"]: h for h in zmq_results}
            for header in listener.results()[:4]:
                assert header == by_sequence[header["sequence"]]
            verdicts = [json.loads(p) for p in listener.on("/verdict")]
            assert verdicts and verdicts[0]["verdict"] in ("pass", "fail") and verdicts[0]["part_id"]
            assert {v["sequence"] for v in verdicts} <= set(by_sequence)
            assert b"online" in listener.on("/status")
            receive_until(lambda: listener.on("/health"), 10, "health over MQTT")
            assert json.loads(listener.on("/health")[-1])["type"] == "health"

            broker.stop()  # mid-run: ZeroMQ goes on, MQTT messages are dropped oldest first and counted
            before_stop = zmq_results[-1]["sequence"]
            mqtt_before = max(h["sequence"] for h in listener.results())

            def dropped() -> int:
                return zmq_health[-1]["outputs"]["mqtt"]["dropped"] if zmq_health else 0
            receive_until(lambda: dropped() > 0 and not zmq_health[-1]["outputs"]["mqtt"]["connected"], 30,
                          "MQTT drops counted in health")
            # The line does not wait for the broker: 20 more results (1.3 s at 15 frames/s) during the outage.
            receive_until(lambda: zmq_results[-1]["sequence"] >= before_stop + 20, 15, "results during the outage")
            seen = [h["sequence"] for h in zmq_results]
            assert seen == list(range(seen[0], seen[0] + len(seen)))  # no ZeroMQ result lost meanwhile

            broker.start()
            restarted_at = zmq_results[-1]["sequence"]
            receive_until(lambda: any(h["sequence"] > restarted_at for h in listener.results()), 30,
                          "MQTT results after the restart")
            delivered = [h["sequence"] for h in listener.results()]
            assert delivered == sorted(delivered)  # in order (paho may re-send an unacknowledged one: dup)
            # Of the outage's results, only the queue's 8 newest plus what paho held (capped at 8) are kept.
            outage = {s for s in delivered if mqtt_before < s <= restarted_at}
            assert len(outage) <= 16 < restarted_at - mqtt_before
            receive_until(lambda: zmq_health[-1]["outputs"]["mqtt"]["connects"] >= 2, 10, "the reconnect in health")
            assert zmq_health[-1]["outputs"]["mqtt"]["disconnects"] >= 1
        finally:
            service.stop()
            runner.join(30)
    assert not runner.is_alive()
    wait_for(lambda: listener.on("/status")[-1:] == [b"offline"], 10, "offline on a clean stop")
    listener.close()


def test_a_broker_that_never_comes_up_does_not_stop_the_line(bundle, tmp_path):
    pytest.importorskip("paho.mqtt.client")
    folder = image_folder(tmp_path / "frames", 5)
    data = config_data(str(folder), bundle.path, camera={"kind": "folder"},
                       publish={"wait_for_subscriber_s": 30.0},
                       outputs={"mqtt": {"port": free_port(), "queue_size": 2}})
    service = Service(parse_config(data))
    results, reports = [], []
    with Subscriber(data["publish"]["endpoint"]) as subscriber:
        runner = run_in_thread(service)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(h.get("state") == "stopped" for h in reports):
            message = subscriber.receive(0.2)
            if message is not None:
                (results if message.is_result else reports).append(message.header)
        runner.join(30)
    assert [r["sequence"] for r in results] == [1, 2, 3, 4, 5]
    mqtt = reports[-1]["outputs"]["mqtt"]
    assert mqtt["connected"] is False and mqtt["sent"] == 0
    assert mqtt["dropped"] >= 3  # 5 results and the health messages through a queue of 2


def test_opcua_client_reads_the_last_verdict_and_counters(bundle, tmp_path):
    asyncua = pytest.importorskip("asyncua")
    folder = image_folder(tmp_path / "frames", 6)
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/edge-inspector/"
    data = config_data(str(folder), bundle.path, camera={"kind": "folder"},
                       publish={"wait_for_subscriber_s": 30.0},
                       outputs={"opcua": {"endpoint": url, "namespace": "urn:test:line"}})
    service = Service(parse_config(data))
    results = []
    with Subscriber(data["publish"]["endpoint"]) as subscriber:
        service.start()  # not run(): the server stays up after the finite folder ends, until shutdown
        try:
            assert service.publisher is not None and service.pipeline is not None
            wait_for(service.publisher.subscribed.is_set, 30, "the ZeroMQ subscriber")
            service.pipeline.gate.set()  # what supervise() does once a subscriber is attached
            wait_for(lambda: service.pipeline is not None and service.pipeline.finished.is_set(), 60, "the run")
            while (message := subscriber.receive(0.2)) is not None:
                if message.is_result:
                    results.append(message.header)
            assert [r["sequence"] for r in results] == [1, 2, 3, 4, 5, 6]

            async def read() -> dict:
                async with asyncua.Client(url, timeout=5) as client:
                    index = await client.get_namespace_index("urn:test:line")
                    names = ("LastVerdict", "LastPartId", "Sequence", "PartsTotal", "FailsTotal", "LastScore",
                             "ModelId", "Healthy", "LastResultTime", "Threshold")
                    return {name: await client.get_node(f"ns={index};s=line9.{name}").read_value()
                            for name in names}

            async def tamper(action: str) -> None:
                async with asyncua.Client(url, timeout=5) as client:
                    index = await client.get_namespace_index("urn:test:line")
                    node = client.get_node(f"ns={index};s=line9.LastVerdict")
                    if action == "write":
                        await node.write_value(asyncua.ua.Variant("pass", asyncua.ua.VariantType.String))
                    else:
                        await client.delete_nodes([node])

            # Any local process can connect: anonymous clients may read, never change a verdict or the nodes.
            for action in ("write", "delete"):
                with pytest.raises(asyncua.ua.UaStatusCodeError) as refused:
                    asyncio.run(tamper(action))
                assert "Bad" in type(refused.value).__name__, action

            deadline = time.monotonic() + 10
            values = asyncio.run(read())
            while values["Sequence"] < 6 and time.monotonic() < deadline:
                time.sleep(0.1)
                values = asyncio.run(read())
        finally:
            service.shutdown()
    last = results[-1]
    assert values["Sequence"] == 6 and values["PartsTotal"] == 6
    assert values["LastVerdict"] == last["verdict"] and values["LastPartId"] == last["part_id"]
    assert values["FailsTotal"] == sum(r["verdict"] == "fail" for r in results) > 0
    assert values["LastScore"] == pytest.approx(last["score"])
    assert values["Threshold"] == pytest.approx(last["threshold"])
    assert values["ModelId"] == bundle.model_id
    assert values["LastResultTime"].timestamp() == pytest.approx(last["capture_time"], abs=1e-3)


def test_opcua_port_taken_is_one_config_line(bundle, tmp_path):
    pytest.importorskip("asyncua")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        url = f"opc.tcp://127.0.0.1:{taken.getsockname()[1]}/edge-inspector/"
        data = config_data(str(image_folder(tmp_path / "f", 1)), bundle.path, camera={"kind": "folder"},
                           outputs={"opcua": {"endpoint": url}})
        with pytest.raises(ConfigError) as info:
            Service(parse_config(data)).start()
    assert str(info.value).startswith("outputs.opcua.endpoint: cannot serve") and "\n" not in str(info.value)


@pytest.mark.parametrize(("section", "expected"), [
    ({"mqtt": {"qos": 3}}, "outputs.mqtt.qos: expected one of 0, 1, 2, got 3"),
    ({"mqtt": {"topic_prefix": "line/#"}}, "outputs.mqtt.topic_prefix: expected an MQTT topic"),
    ({"mqtt": {"brokr": "x"}}, "outputs.mqtt.brokr: unknown key"),
    ({"mqtt": {"password_file": "pw"}}, "outputs.mqtt.username: required with password_file"),
    ({"mqtt": {"ca_file": "ca.pem"}}, "outputs.mqtt.tls: set tls: true"),
    ({"opcua": {"endpoint": "tcp://x:1"}}, "outputs.opcua.endpoint: expected opc.tcp://"),
    ({"opcua": {"security": "basic256sha256"}}, "outputs.opcua.certificate: security basic256sha256 needs"),
    ({"kafka": {}}, "outputs.kafka: unknown key"),
    ({"opcua": {"allow_trigger": True}}, "outputs.opcua.allow_trigger: needs camera.trigger external"),
])
def test_output_config_mistakes_are_one_line(section, expected):
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"bundle": "b"}, "outputs": section}, "line.yaml")
    assert str(info.value).startswith(f"line.yaml: {expected}"), str(info.value)


def test_mqtt_password_file_missing_is_one_line(bundle, tmp_path):
    pytest.importorskip("paho.mqtt.client")
    data = config_data(str(image_folder(tmp_path / "f", 1)), bundle.path, camera={"kind": "folder"},
                       outputs={"mqtt": {"username": "u", "password_file": str(tmp_path / "missing")}})
    with pytest.raises(ConfigError) as info:
        Service(parse_config(data)).start()
    assert str(info.value).startswith("outputs.mqtt.password_file: cannot read") and "\n" not in str(info.value)


def test_opcua_basic256sha256_refuses_plain_clients_and_serves_encrypted_ones(bundle, tmp_path):
    """security: basic256sha256 with a generated certificate: a client without security finds no endpoint it
    may use; one with its own certificate, signing and encrypting, reads the nodes."""
    asyncua = pytest.importorskip("asyncua")
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    async def certificates() -> None:
        for name, uri, use in (("server", "urn:edge-inspector", ExtendedKeyUsageOID.SERVER_AUTH),
                               ("client", "urn:test:client", ExtendedKeyUsageOID.CLIENT_AUTH)):
            await setup_self_signed_certificate(tmp_path / f"{name}-key.pem", tmp_path / f"{name}-cert.der", uri,
                                                "localhost", [use], {"commonName": name})
    asyncio.run(certificates())
    url = f"opc.tcp://127.0.0.1:{free_port()}/edge-inspector/"
    data = config_data(str(image_folder(tmp_path / "frames", 2)), bundle.path, camera={"kind": "folder"},
                       outputs={"opcua": {"endpoint": url, "security": "basic256sha256",
                                          "certificate": str(tmp_path / "server-cert.der"),
                                          "private_key": str(tmp_path / "server-key.pem")}})
    service = Service(parse_config(data))
    service.start()
    try:
        async def plain() -> None:
            async with asyncua.Client(url, timeout=5) as client:
                await client.nodes.objects.get_children()

        from asyncua.ua import UaError

        with pytest.raises(UaError, match="No matching endpoints.*SecurityPolicy#None"):
            asyncio.run(plain())

        async def secure() -> str:
            client = asyncua.Client(url, timeout=5)
            client.application_uri = "urn:test:client"
            await client.set_security_string(f"Basic256Sha256,SignAndEncrypt,{tmp_path / 'client-cert.der'},"
                                             f"{tmp_path / 'client-key.pem'}")
            async with client:
                index = await client.get_namespace_index("urn:edge-inspector")
                return await client.get_node(f"ns={index};s=line9.ModelId").read_value()

        assert asyncio.run(secure()) in ("", bundle.model_id)
    finally:
        service.shutdown()


def test_two_stations_into_one_broker_each_in_order(bundle, broker, tmp_path):
    """A plant in small: two services publish into one mosquitto under <site>/<line>/<camera>; one subscriber
    on the site gets every result of both, in order per station."""
    listener = Listener(broker.port, "site1")
    wait_for(lambda: listener.client.is_connected(), 10, "the test's MQTT subscriber")
    services, runners = [], []
    for line in ("line1", "line2"):
        data = config_data(str(image_folder(tmp_path / line, 5, seed=len(line) + len(runners))), bundle.path,
                           camera={"id": line, "kind": "folder"},
                           outputs={"mqtt": {"port": broker.port, "topic_prefix": f"site1/{line}/cam1",
                                             "client_id": f"station-{line}"}})
        services.append(Service(parse_config(data)))
    for service in services:
        runners.append(run_in_thread(service))
    for runner in runners:
        runner.join(60)
    assert not any(runner.is_alive() for runner in runners)
    wait_for(lambda: len(listener.on("/result")) >= 10, 10, "both stations' results")
    with listener.lock:
        per_station = {line: [json.loads(p)["sequence"] for t, p, _ in listener.messages
                              if t == f"site1/{line}/cam1/result"] for line in ("line1", "line2")}
    assert per_station == {"line1": [1, 2, 3, 4, 5], "line2": [1, 2, 3, 4, 5]}
    listener.close()


def test_a_killed_service_is_announced_offline_by_its_last_will(bundle, broker, tmp_path):
    """SIGKILL leaves no time for a goodbye: the broker itself publishes the retained `offline` Last Will,
    so a PLC watching <prefix>/status knows the station is gone."""
    import signal
    import sys

    import yaml

    from service_helpers import REPO, subprocess_env

    prefix = "site1/line7/cam1"
    data = config_data(str(image_folder(tmp_path / "frames", 3)), bundle.path,
                       camera={"kind": "folder", "fps": 5, "loop": True},
                       outputs={"mqtt": {"port": broker.port, "topic_prefix": prefix}})
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump(data))
    listener = Listener(broker.port, prefix)
    process = subprocess.Popen([sys.executable, "-m", "edge_inspector.cli", "run", "--config", str(config)],
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        wait_for(lambda: listener.on("/status")[-1:] == [b"online"] and listener.on("/verdict"), 90,
                 "the service online with a verdict")
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        wait_for(lambda: listener.on("/status")[-1:] == [b"offline"], 10, "the Last Will")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        listener.close()
    # Retained: a subscriber that joins now still reads offline, and the latest verdict.
    late = Listener(broker.port, prefix)
    try:
        wait_for(lambda: late.on("/status") == [b"offline"] and len(late.on("/verdict")) == 1, 10,
                 "retained status and verdict")
        with late.lock:
            assert all(retained for topic, _, retained in late.messages)
    finally:
        late.close()


def test_mqtt_triggers_feed_the_trigger_queue_and_a_malformed_one_is_refused(bundle, broker, tmp_path, caplog):
    """camera.trigger external with outputs.mqtt.trigger: messages on <prefix>/trigger (JSON or a bare id)
    each make one part, in order; a malformed or retained one is refused, counted, and the next one works."""
    import paho.mqtt.client as mqtt

    from service_helpers import write_video

    frames, _ = conveyor_frames(np.random.default_rng(7), 6, [False, True, False, False, True, False])
    video = write_video(tmp_path / "line.avi", frames)
    prefix = "site1/line3/cam1"
    data = config_data(str(video), bundle.path, camera={"trigger": "external", "fps": 20.0, "loop": True},
                       publish={"wait_for_subscriber_s": 30.0},
                       outputs={"mqtt": {"port": broker.port, "topic_prefix": prefix, "trigger": True}})
    service = Service(parse_config(data))
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-plc")
    sender.connect("127.0.0.1", broker.port, keepalive=5)
    sender.loop_start()

    def send(payload: bytes | str, retain: bool = False) -> None:
        sender.publish(f"{prefix}/trigger", payload, qos=1, retain=retain).wait_for_publish(5)

    def mqtt_health() -> dict:
        return service.health()["outputs"]["mqtt"]

    got: list[dict] = []

    def collect(count: int, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            message = subscriber.receive(0.2)
            if message is not None and message.is_result:
                got.append(message.header)
        return got

    # Left retained on the topic (by mistake) before the service starts: the broker hands it over on
    # subscribe, and on every reconnect; it must never be a part.
    send("R-1", retain=True)
    with Subscriber(data["publish"]["endpoint"], ("inspection.",)) as subscriber:
        runner = run_in_thread(service)
        try:
            wait_for(lambda: service.outputs is not None and mqtt_health().get("trigger_subscribed"), 60,
                     "the service subscribed to its trigger topic")
            assert mqtt_health()["trigger_topic"] == f"{prefix}/trigger"
            wait_for(lambda: mqtt_health()["triggers_refused"] == 1, 10, "the retained trigger refused")
            assert mqtt_health()["last_trigger_refusal"].startswith("trigger: retained")
            send(json.dumps({"part_id": "M-1"}))
            send("M-2")  # a bare part id
            send(json.dumps({"part_id": "M-3", "delay_ms": 100}))
            send(b"")  # no id: the service numbers the part
            assert [h["part_id"] for h in collect(4)][:3] == ["M-1", "M-2", "M-3"]
            assert len(got) == 4 and got[3]["part_id"].isdigit()
            assert all(h["verdict"] in ("pass", "fail", "review") and h["capture_time"] >= h["trigger_time"]
                       for h in got), got
            for bad in ('{"part_id": "two words"}', "{not json", '{"part_id": "M-9", "command": "reload"}',
                        json.dumps({"delay_ms": -1}), b"\xff\xfe", "x" * 2000):
                send(bad)
            send("M-4")
            assert collect(5)[4]["part_id"] == "M-4"  # the refused ones made no part; the next works
            time.sleep(0.5)
            assert collect(6, timeout=0.5)[4:] == got[4:5]  # and nothing else came
            health = mqtt_health()
            assert health["triggers_refused"] == 7 and health["triggers_received"] == 12
            assert health["last_trigger_refusal"].startswith("trigger: message of 2000 bytes")
            assert service.health()["triggers"]["received"] == 5 and service.health()["processed"] == 5
            # logged once per streak of refusals: the retained one, then the six in a row
            refusals = [r for r in caplog.records if r.getMessage().startswith("MQTT trigger on")]
            assert [r.getMessage().split(" refused: ", 1)[1][:31] for r in refusals] == [
                "trigger: retained message refus", "trigger: part_id 'two words' is"]
        finally:
            service.stop()
            runner.join(30)
            sender.publish(f"{prefix}/trigger", b"", retain=True).wait_for_publish(5)  # clear the retained one
            sender.disconnect()
            sender.loop_stop()
    assert not runner.is_alive()


def test_mqtt_triggers_need_an_external_camera_trigger():
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"bundle": "b"}, "outputs": {"mqtt": {"trigger_topic": "a/b"}}}, "line.yaml")
    assert str(info.value) == ("line.yaml: outputs.mqtt.trigger_topic: MQTT triggers need camera.trigger external, "
                               "got free_run")


def test_opcua_trigger_needs_sign_and_encrypt():
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"bundle": "b"}, "camera": {"trigger": "external"},
                      "publish": {"control_endpoint": "tcp://127.0.0.1:5557"},
                      "outputs": {"opcua": {"allow_trigger": True}}}, "line.yaml")
    assert str(info.value).startswith("line.yaml: outputs.opcua.allow_trigger: needs security basic256sha256")


def test_opcua_trigger_method_makes_parts_over_basic256sha256(bundle, tmp_path):
    """allow_trigger: a real asyncua client, signing and encrypting, calls Trigger(part_id) on the camera
    object; each call is one part with that id, in order; a malformed id is a Bad status, counted, and the
    next call works."""
    asyncua = pytest.importorskip("asyncua")
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from service_helpers import write_video

    async def certificates() -> None:
        for name, uri, use in (("server", "urn:edge-inspector", ExtendedKeyUsageOID.SERVER_AUTH),
                               ("client", "urn:test:client", ExtendedKeyUsageOID.CLIENT_AUTH)):
            await setup_self_signed_certificate(tmp_path / f"{name}-key.pem", tmp_path / f"{name}-cert.der", uri,
                                                "localhost", [use], {"commonName": name})
    asyncio.run(certificates())
    frames, _ = conveyor_frames(np.random.default_rng(7), 6, [False, True, False, False, True, False])
    video = write_video(tmp_path / "line.avi", frames)
    url = f"opc.tcp://127.0.0.1:{free_port()}/edge-inspector/"
    data = config_data(str(video), bundle.path, camera={"trigger": "external", "fps": 20.0, "loop": True},
                       publish={"wait_for_subscriber_s": 30.0},
                       outputs={"opcua": {"endpoint": url, "security": "basic256sha256", "allow_trigger": True,
                                          "certificate": str(tmp_path / "server-cert.der"),
                                          "private_key": str(tmp_path / "server-key.pem")}})
    service = Service(parse_config(data))

    async def call(*part_ids) -> list:
        client = asyncua.Client(url, timeout=5)
        client.application_uri = "urn:test:client"
        await client.set_security_string(f"Basic256Sha256,SignAndEncrypt,{tmp_path / 'client-cert.der'},"
                                         f"{tmp_path / 'client-key.pem'}")
        replies = []
        async with client:
            index = await client.get_namespace_index("urn:edge-inspector")
            camera = client.get_node(f"ns={index};s=line9")
            for part_id in part_ids:
                try:
                    replies.append(await camera.call_method(f"{index}:Trigger", *part_id))
                except asyncua.ua.UaStatusCodeError as err:
                    replies.append(type(err).__name__)
        return replies

    got: list[dict] = []
    with Subscriber(data["publish"]["endpoint"], ("inspection.",)) as subscriber:
        runner = run_in_thread(service)
        try:
            wait_for(service.ready.is_set, 60, "the service ready")
            not_a_string = asyncua.ua.Variant(7, asyncua.ua.VariantType.Int32)
            replies = asyncio.run(call(["O-1"], [""], ["two words"], [not_a_string], [], ["O-3"]))
            assert replies[0] == "O-1" and replies[1].isdigit() and replies[5] == "O-3"
            assert replies[2] == replies[3] == "BadInvalidArgument", replies
            assert replies[4] == "BadInvalidArgument", replies
            deadline = time.monotonic() + 30
            while len(got) < 3 and time.monotonic() < deadline:
                message = subscriber.receive(0.2)
                if message is not None and message.is_result:
                    got.append(message.header)
            assert [h["part_id"] for h in got] == ["O-1", replies[1], "O-3"]
            assert all(h["verdict"] in ("pass", "fail", "review") for h in got)
            opcua = service.health()["outputs"]["opcua"]
            assert opcua["triggers_refused"] == 3 and opcua["triggers_received"] == 6, (opcua, replies)
            assert opcua["last_trigger_refusal"].startswith("trigger: expected one String argument PartId, got 0")
            assert service.health()["triggers"]["received"] == 3
        finally:
            service.stop()
            runner.join(30)
    assert not runner.is_alive()
