"""MQTT output (paho-mqtt >= 2, the `mqtt` extra): what PLCs, HMIs and plant brokers speak natively.

Topics under `<prefix>` (default `edge-inspector/<camera id>`):

- `<prefix>/result`: the result header JSON, the same schema-versioned header as the ZeroMQ result
  (docs/wire-format.md), QoS `qos`, not retained;
- `<prefix>/verdict`: `{"verdict", "sequence", "score", "threshold", "capture_time"}`, small enough for a
  PLC's JSON parser, retained when `retain_verdict` (a PLC that reconnects reads the latest at once);
- `<prefix>/health`: the health payload, on the health schedule;
- `<prefix>/status`: `online` (retained) on every connect, `offline` as the Last Will (the broker sends it
  when the link dies) and on a clean stop.

The connection and reconnects (exponential backoff, reconnect_min_s doubling up to reconnect_max_s) are
paho's network thread's. While the broker is away, messages wait in this output's queue (base.py; oldest
dropped and counted past queue_size), not in paho: paho's own queue is capped at the same size so a broker
that accepts the connection and then stalls cannot grow memory either.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_inspector.core.errors import ConfigError
from edge_inspector.core.wire import dumps_strict
from edge_inspector.service.outputs.base import Message
from edge_inspector.service.outputs.config import MqttConfig

log = logging.getLogger(__name__)


def verdict_message(header: dict[str, Any]) -> dict[str, Any]:
    """The `<prefix>/verdict` payload: what a PLC needs to act on a part, nothing else."""
    return {"verdict": header.get("verdict"), "part_id": header.get("part_id"), "sequence": header.get("sequence"),
            "score": header.get("score"),
            "threshold": header.get("threshold"), "capture_time": header.get("capture_time"),
            "schema_version": header.get("schema_version")}


class MqttOutput:
    name = "mqtt"

    def __init__(self, config: MqttConfig, camera_id: str, resolve: Callable[[str], Path]):
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise ConfigError("outputs.mqtt: needs paho-mqtt >= 2 (pip install 'edge-inspector[mqtt]')") from None
        self.config = config
        self.prefix = config.topic_prefix or f"edge-inspector/{camera_id}"
        if any(c in self.prefix for c in "#+\x00"):
            raise ConfigError(f"outputs.mqtt.topic_prefix: the default edge-inspector/<camera id> would be "
                              f"{self.prefix!r}, which MQTT refuses (+, #); set outputs.mqtt.topic_prefix")
        self.status_topic = f"{self.prefix}/status"
        self.connected = threading.Event()
        self.connects = 0
        self.disconnects = 0
        self.last_reason = ""
        self.closing = False
        self.broker = f"{config.host}:{config.port}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=config.client_id or
                             f"edge-inspector-{camera_id}", protocol=mqtt.MQTTv311, clean_session=True)
        client.enable_logger(log)
        client.will_set(self.status_topic, b"offline", qos=1, retain=True)
        client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)
        client.max_queued_messages_set(config.queue_size)
        if config.username:
            client.username_pw_set(config.username, self._password(resolve))
        if config.tls:
            self._tls(client, resolve)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self.client = client
        self._mqtt = mqtt

    def _password(self, resolve: Callable[[str], Path]) -> str | None:
        if not self.config.password_file:
            return None
        path = resolve(self.config.password_file)
        try:
            return path.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"outputs.mqtt.password_file: cannot read {path}: {err.__class__.__name__}: "
                              f"{getattr(err, 'strerror', None) or err}") from None

    def _tls(self, client: Any, resolve: Callable[[str], Path]) -> None:
        config = self.config
        files = {key: resolve(value) for key, value in
                 (("ca_file", config.ca_file), ("cert_file", config.cert_file), ("key_file", config.key_file))
                 if value}
        for key, path in files.items():
            if not path.is_file():
                raise ConfigError(f"outputs.mqtt.{key}: {path} is not a readable file")
        try:
            client.tls_set(ca_certs=str(files["ca_file"]) if "ca_file" in files else None,
                           certfile=str(files["cert_file"]) if "cert_file" in files else None,
                           keyfile=str(files["key_file"]) if "key_file" in files else None)
        except (OSError, ValueError) as err:  # ssl.SSLError is an OSError: a file that is not PEM
            raise ConfigError(f"outputs.mqtt.tls: {str(err).splitlines()[0]}") from None

    # -- paho's network thread -------------------------------------------------------------------------------

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any, _properties: Any) -> None:
        if reason.is_failure:
            self.last_reason = str(reason)
            log.warning("MQTT broker %s refused the connection: %s", self.broker, reason)
            return
        self.connects += 1
        client.publish(self.status_topic, b"online", qos=1, retain=True)
        log.info("MQTT connected to %s (topics %s/...)%s", self.broker, self.prefix,
                 f", reconnect {self.connects - 1}" if self.connects > 1 else "")
        self.connected.set()

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _properties: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if self.closing:
            log.info("MQTT disconnected from %s at stop", self.broker)
        elif was:
            self.disconnects += 1
            self.last_reason = str(reason)
            log.warning("MQTT broker %s lost (%s); reconnecting with backoff up to %d s", self.broker, reason,
                        self.config.reconnect_max_s)

    # -- Output ---------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Start connecting in the background: a broker that is down at boot must not stop the line."""
        try:
            self.client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        except (OSError, ValueError) as err:
            raise ConfigError(f"outputs.mqtt.host: {self.config.host!r}: {err}") from None
        self.client.loop_start()

    def ready(self) -> bool:
        return self.connected.is_set()

    def send(self, message: Message) -> None:
        qos = self.config.qos
        if message.kind == "health":
            if self.config.health:
                self._publish(f"{self.prefix}/health", dumps_strict(message.payload), qos, False)
            return
        header = message.payload
        self._publish(f"{self.prefix}/result", dumps_strict(header), qos, False)
        self._publish(f"{self.prefix}/verdict", dumps_strict(verdict_message(header)), qos,
                      self.config.retain_verdict)

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == self._mqtt.MQTT_ERR_NO_CONN and qos > 0:
            return  # the link died just now: paho keeps a QoS 1/2 message and sends it after the reconnect
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:  # QUEUE_SIZE: paho's own cap (queue_size) is full
            raise RuntimeError(f"publish to {topic} failed: {self._mqtt.error_string(info.rc)}")

    def snapshot(self) -> dict[str, Any]:
        return {"connected": self.connected.is_set(), "broker": self.broker, "topic_prefix": self.prefix,
                "connects": self.connects, "disconnects": self.disconnects, "last_reason": self.last_reason}

    def close(self) -> None:
        self.closing = True
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(1.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
