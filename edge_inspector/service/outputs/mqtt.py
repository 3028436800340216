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

Triggers in (`trigger: true` or `trigger_topic`, with camera.trigger external): the output also subscribes
to `<prefix>/trigger`. A message is a JSON object `{"part_id": "...", "delay_ms": N}` (both optional) or a
bare part id (or nothing: the service numbers the part); it goes through the control command's validation
(triggers.parse_trigger) into the same trigger queue (TriggerGate.trigger). paho's network thread runs the
handler; it only parses and appends under the gate's lock (no I/O), so it cannot stall the link. A refused
message (malformed, retained, queue full) is counted in health `triggers_refused` and the first of a streak
is logged; nothing a sender puts on the topic can raise out of the handler (paho would stop its thread).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_inspector.core.errors import ConfigError
from edge_inspector.core.wire import dumps_strict
from edge_inspector.service.outputs.base import Message
from edge_inspector.service.outputs.config import MqttConfig
from edge_inspector.service.triggers import parse_trigger

log = logging.getLogger(__name__)

MAX_TRIGGER_BYTES = 1024  # a valid trigger is under 100 bytes; longer is refused before parsing
TRIGGER_KEYS = frozenset({"part_id", "delay_ms"})  # parse_trigger also knows the control socket's own fields
TriggerSink = Callable[[str | None, int], dict[str, Any]]  # TriggerGate.trigger: raises ConfigError if refused


def trigger_request(payload: bytes) -> dict[str, Any]:
    """The control-command form of an MQTT trigger payload; ConfigError (one line) if it is not one."""
    if len(payload) > MAX_TRIGGER_BYTES:
        raise ConfigError(f"trigger: message of {len(payload)} bytes (expected at most {MAX_TRIGGER_BYTES})")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError("trigger: message is not UTF-8 text (expected JSON or a bare part id)") from None
    if not text:
        return {}
    if not text.startswith("{"):
        return {"part_id": text}
    try:
        request = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"trigger: not valid JSON ({str(err).splitlines()[0][:80]})") from None
    if not isinstance(request, dict):
        raise ConfigError("trigger: expected a JSON object {\"part_id\": ..., \"delay_ms\": ...}")
    unknown = sorted(str(key)[:40] for key in request if key not in TRIGGER_KEYS)
    if unknown:
        raise ConfigError(f"trigger: unknown field(s) {', '.join(map(repr, unknown))} (expected part_id, delay_ms)")
    return request


def verdict_message(header: dict[str, Any]) -> dict[str, Any]:
    """The `<prefix>/verdict` payload: what a PLC needs to act on a part, nothing else."""
    return {"verdict": header.get("verdict"), "part_id": header.get("part_id"), "sequence": header.get("sequence"),
            "score": header.get("score"),
            "threshold": header.get("threshold"), "capture_time": header.get("capture_time"),
            "schema_version": header.get("schema_version")}


class MqttOutput:
    name = "mqtt"

    def __init__(self, config: MqttConfig, camera_id: str, resolve: Callable[[str], Path],
                 trigger: TriggerSink | None = None):
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
        self.trigger_sink = trigger if config.takes_triggers else None
        self.trigger_topic = (config.trigger_topic or f"{self.prefix}/trigger") if self.trigger_sink else None
        self.triggers_open = False  # set by open_triggers() once the service is ready
        self.trigger_subscribed = threading.Event()
        self.triggers_received = 0
        self.triggers_refused = 0
        self.last_refusal = ""
        self._refusing = False
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
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
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
        if self.triggers_open:
            self._subscribe_triggers()

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _properties: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self.trigger_subscribed.clear()
        if self.closing:
            log.info("MQTT disconnected from %s at stop", self.broker)
        elif was:
            self.disconnects += 1
            self.last_reason = str(reason)
            log.warning("MQTT broker %s lost (%s); reconnecting with backoff up to %d s", self.broker, reason,
                        self.config.reconnect_max_s)

    # -- triggers in (paho's network thread) ------------------------------------------------------------------

    def open_triggers(self) -> None:
        """Subscribe to the trigger topic from now on (the service is ready: a trigger that arrived during
        the model load would have timed out before the first frame)."""
        if self.trigger_sink is None:
            return
        self.triggers_open = True
        if self.connected.is_set():
            self._subscribe_triggers()

    def _subscribe_triggers(self) -> None:
        # QoS 2: a sender publishing at QoS 2 gets each trigger exactly once (QoS 1 may repeat one on a
        # reconnect, which would be a second part)
        assert self.trigger_topic is not None  # only called with a trigger sink
        self.client.subscribe(self.trigger_topic, qos=2)

    def _on_subscribe(self, _client: Any, _userdata: Any, _mid: Any, reasons: Any, _properties: Any) -> None:
        if reasons and all(not reason.is_failure for reason in reasons):
            self.trigger_subscribed.set()
            log.info("MQTT: taking triggers on %s", self.trigger_topic)
        else:
            log.warning("MQTT broker %s refused the subscription to %s: %s (no MQTT triggers)", self.broker,
                        self.trigger_topic, reasons)

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        try:
            self._trigger(message)
        except Exception:  # never out of paho's thread: it would stop the link (and every output message)
            log.exception("MQTT: trigger handler failed")

    def _trigger(self, message: Any) -> None:
        if self.trigger_sink is None or message.topic != self.trigger_topic:
            return
        self.triggers_received += 1
        try:
            if message.retain:  # a retained trigger would fire again on every reconnect: never a part
                raise ConfigError("trigger: retained message refused (publish triggers with retain false)")
            part_id, delay_ms = parse_trigger(trigger_request(bytes(message.payload)))
            self.trigger_sink(part_id, delay_ms)
        except ConfigError as err:
            self._refused(str(err))
            return
        if self._refusing:
            log.info("MQTT: triggers accepted again after %d refused", self.triggers_refused)
        self._refusing = False

    def _refused(self, reason: str) -> None:
        self.triggers_refused += 1
        self.last_refusal = reason
        if not self._refusing:
            log.warning("MQTT trigger on %s refused: %s (%d refused so far; counted in health "
                        "outputs.mqtt.triggers_refused; further refusals logged after one is accepted)",
                        self.trigger_topic, reason, self.triggers_refused)
        self._refusing = True

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
                "connects": self.connects, "disconnects": self.disconnects, "last_reason": self.last_reason,
                **({"trigger_topic": self.trigger_topic, "trigger_subscribed": self.trigger_subscribed.is_set(),
                    "triggers_received": self.triggers_received, "triggers_refused": self.triggers_refused,
                    "last_trigger_refusal": self.last_refusal} if self.trigger_sink else {})}

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
