"""The `outputs:` section of the service config (typed like every section: edge_inspector/core/schema.py).

A section left out, or null, is off: a line that never asked for MQTT or OPC UA never imports their libraries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from msgspec import Meta

from edge_inspector.core.schema import Text, expect

# MQTT topic names: no wildcards, no NUL, no empty level at either end (docs: MQTT 3.1.1 section 4.7).
Topic = Annotated[str, Meta(pattern=r"^[^/#+\x00][^#+\x00]*(?<!/)$"),
                  expect("an MQTT topic without wildcards (+, #) or a leading/trailing /")]


def doc(text: str) -> Meta:
    return Meta(description=text)


@dataclass
class MqttConfig:
    """Results, verdicts and health to an MQTT broker (outputs/mqtt.py)."""

    host: Annotated[Text, doc("broker host name or address")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535), doc("broker port (1883; 8883 is usual with TLS)")] = 1883
    topic_prefix: Annotated[Topic | None, doc("topics are <prefix>/result, /verdict, /health, /status; null: "
                                              "edge-inspector/<camera id>")] = None
    client_id: Annotated[Text | None, doc("MQTT client id; null: edge-inspector-<camera id>")] = None
    qos: Annotated[Literal[0, 1, 2], doc("QoS of result, verdict and health messages")] = 1
    retain_verdict: Annotated[bool, doc("the broker keeps the latest verdict for subscribers that join "
                                        "later")] = True
    health: Annotated[bool, doc("publish health messages to <prefix>/health on the health schedule")] = True
    keepalive_s: Annotated[int, Meta(ge=5, le=3600), doc("MQTT keep-alive; a dead link is noticed within 1.5x "
                                                         "this")] = 30
    queue_size: Annotated[int, Meta(ge=1, le=100_000),
                          doc("messages held while the broker is slow or away; the oldest is dropped and "
                              "counted past this")] = 1000
    reconnect_min_s: Annotated[int, Meta(ge=1, le=3600), doc("first reconnect delay; doubles per failure")] = 1
    reconnect_max_s: Annotated[int, Meta(ge=1, le=3600), doc("reconnect delay cap")] = 30
    username: Annotated[Text | None, doc("user name (null: anonymous)")] = None
    password_file: Annotated[Text | None, doc("file holding the password (relative: to the config file); "
                                              "needs username")] = None
    tls: Annotated[bool, doc("connect with TLS (the system's CA store unless ca_file is set)")] = False
    ca_file: Annotated[Text | None, doc("CA certificate(s) that signed the broker's certificate (PEM)")] = None
    cert_file: Annotated[Text | None, doc("client certificate (PEM) for brokers that require one")] = None
    key_file: Annotated[Text | None, doc("the client certificate's private key (PEM)")] = None
    trigger: Annotated[bool, doc("camera.trigger external: also take triggers from <prefix>/trigger "
                                 "(or trigger_topic)")] = False
    trigger_topic: Annotated[Topic | None, doc("the topic triggers arrive on; set: triggers on (null: "
                                               "<prefix>/trigger when trigger is true)")] = None

    @property
    def takes_triggers(self) -> bool:
        return self.trigger or self.trigger_topic is not None


@dataclass
class OpcuaConfig:
    """An OPC UA server with one object per camera (outputs/opcua.py)."""

    endpoint: Annotated[Text, doc("server endpoint; the default serves loopback only")] = \
        "opc.tcp://127.0.0.1:4840/edge-inspector/"
    namespace: Annotated[Text, doc("namespace URI of the camera's nodes")] = "urn:edge-inspector"
    queue_size: Annotated[int, Meta(ge=1, le=100_000),
                          doc("updates held while the server is busy; the oldest is dropped and counted "
                              "past this")] = 100
    security: Annotated[Literal["none", "basic256sha256"],
                        doc("none: anonymous, unencrypted (loopback only by default); basic256sha256: "
                            "sign and encrypt with certificate and private_key")] = "none"
    certificate: Annotated[Text | None, doc("server certificate (DER or PEM), for basic256sha256")] = None
    private_key: Annotated[Text | None, doc("the certificate's private key (PEM), for basic256sha256")] = None
    allow_trigger: Annotated[bool, doc("a method Trigger(part_id) on the camera object feeds camera.trigger "
                                       "external's queue; needs security basic256sha256")] = False


@dataclass
class OutputsConfig:
    mqtt: Annotated[MqttConfig | None, doc("MQTT output (null or left out: off)")] = None
    opcua: Annotated[OpcuaConfig | None, doc("OPC UA server (null or left out: off)")] = None


def cross_check(outputs: OutputsConfig) -> tuple[str, str] | None:
    """(key, message) of the first rule broken across keys of the section, or None."""
    mqtt = outputs.mqtt
    if mqtt is not None:
        if mqtt.reconnect_max_s < mqtt.reconnect_min_s:
            return ("outputs.mqtt.reconnect_max_s",
                    f"expected >= outputs.mqtt.reconnect_min_s ({mqtt.reconnect_min_s}), got {mqtt.reconnect_max_s}")
        if mqtt.password_file and not mqtt.username:
            return "outputs.mqtt.username", "required with password_file"
        if (mqtt.ca_file or mqtt.cert_file or mqtt.key_file) and not mqtt.tls:
            return "outputs.mqtt.tls", "set tls: true to use ca_file, cert_file or key_file"
        if bool(mqtt.cert_file) != bool(mqtt.key_file):
            return "outputs.mqtt.key_file" if mqtt.cert_file else "outputs.mqtt.cert_file", \
                "set cert_file and key_file together"
    opcua = outputs.opcua
    if opcua is not None:
        if not opcua.endpoint.startswith("opc.tcp://"):
            return "outputs.opcua.endpoint", f"expected opc.tcp://HOST:PORT/PATH, got {opcua.endpoint!r}"
        if opcua.security != "none" and not (opcua.certificate and opcua.private_key):
            return "outputs.opcua.certificate", f"security {opcua.security} needs certificate and private_key"
        if opcua.allow_trigger and opcua.security != "basic256sha256":
            return ("outputs.opcua.allow_trigger", "needs security basic256sha256 (a trigger makes a part: never "
                    "over an unencrypted, unsigned channel)")
    return None
