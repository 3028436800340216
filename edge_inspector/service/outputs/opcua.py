"""OPC UA server output (asyncua, the `opcua` extra): the protocol Siemens, Beckhoff, Rockwell and Codesys
PLCs and SCADA (WinCC, Ignition) read natively.

The service runs an OPC UA server (default `opc.tcp://127.0.0.1:4840/edge-inspector/`, loopback, no
security, anonymous read-only). Under Objects it holds one object per camera, `<camera id>`, in the
namespace `namespace` (default `urn:edge-inspector`), whose variables a client reads or subscribes to; node
ids are strings `ns=<ns>;s=<camera id>.<Name>`, stable across restarts:

    LastVerdict (String: pass/review/fail/error), LastPartId (String: the id the reject gate matches),
    LastScore (Double), Threshold (Double), Sequence (UInt64),
    PartsTotal, FailsTotal (UInt64: results and fails since start), LastResultTime (DateTime: capture
    time of the frame judged), LastError (String), Healthy (Boolean), ModelId (String),
    Heartbeat (DateTime: the last health update)

Every variable is read-only. With `allow_trigger` (only with security basic256sha256, and camera.trigger
external) the camera object also has a method `Trigger(PartId: String) -> PartId: String`
(`ns=<ns>;s=<camera id>.Trigger`): one part, as the control command `trigger` with that part id (empty:
the service numbers it), through the same validation (triggers.parse_trigger) into the same queue; it
returns the part id queued, or a Bad status (BadInvalidArgument: a malformed id or wrong arguments;
BadResourceUnavailable: the queue is full or the service is still starting), counted in health
`outputs.opcua.triggers_refused`, the first of a streak logged.

asyncua is asyncio-based: it runs on this output's own event loop thread, so neither the publish thread nor
the queue's thread (base.py) ever waits on a client.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_inspector.core.errors import ConfigError
from edge_inspector.service.outputs.base import Message
from edge_inspector.service.outputs.config import OpcuaConfig
from edge_inspector.service.triggers import parse_trigger

log = logging.getLogger(__name__)

START_TIMEOUT_S = 20.0
WRITE_TIMEOUT_S = 5.0

# name -> (OPC UA type name, initial value)
VARIABLES: dict[str, tuple[str, Any]] = {
    "LastVerdict": ("String", ""),
    "LastPartId": ("String", ""),
    "LastScore": ("Double", 0.0),
    "Threshold": ("Double", 0.0),
    "Sequence": ("UInt64", 0),
    "PartsTotal": ("UInt64", 0),
    "FailsTotal": ("UInt64", 0),
    "LastResultTime": ("DateTime", dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)),
    "LastError": ("String", ""),
    "Healthy": ("Boolean", False),
    "ModelId": ("String", ""),
    "Heartbeat": ("DateTime", dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)),
}


def result_values(message: Message) -> dict[str, Any]:
    """The variables a result sets (None: leave as is)."""
    header = message.payload
    values: dict[str, Any] = {"LastVerdict": header.get("verdict") or "", "Sequence": int(header.get("sequence") or 0),
                              "PartsTotal": message.totals.results, "FailsTotal": message.totals.fails,
                              "LastError": header.get("error") or "",
                              "LastPartId": str(header.get("part_id") or ""),
                              "LastScore": float(header["score"]) if header.get("score") is not None else None,
                              "Threshold": float(header["threshold"]) if header.get("threshold") is not None else None,
                              "ModelId": (header.get("model") or {}).get("id")}
    capture_time = header.get("capture_time")
    if capture_time is not None:
        values["LastResultTime"] = dt.datetime.fromtimestamp(float(capture_time), dt.timezone.utc)
    return values


def health_values(message: Message) -> dict[str, Any]:
    health = message.payload
    model = health.get("model") or {}
    threshold = health.get("threshold")
    return {"Healthy": bool(health.get("ok")) and health.get("state") != "stopped",
            "Heartbeat": dt.datetime.now(dt.timezone.utc), "ModelId": model.get("id"),
            "Threshold": float(threshold) if threshold is not None else None}


class OpcuaOutput:
    name = "opcua"

    def __init__(self, config: OpcuaConfig, camera_id: str, resolve: Callable[[str], Path],
                 trigger: Callable[[str | None, int], dict[str, Any]] | None = None):
        try:
            import asyncua  # noqa: F401 (checked here: the error must name the extra, at start)
        except ImportError:
            raise ConfigError("outputs.opcua: needs asyncua (pip install 'edge-inspector[opcua]')") from None
        logging.getLogger("asyncua").setLevel(max(logging.WARNING, logging.getLogger().level))  # its INFO is
        # per request (sessions, subscriptions): a client polling every second would flood the journal
        self.config = config
        self.camera_id = camera_id
        self.resolve = resolve
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="edge-opcua-loop", daemon=True)
        self.server: Any = None
        self.nodes: dict[str, Any] = {}
        self.namespace_index = 0
        self.running = False
        self.trigger_sink = trigger if config.allow_trigger else None
        self.triggers_open = False  # open_triggers(): the service is ready
        self.triggers_received = 0
        self.triggers_refused = 0
        self.last_refusal = ""
        self._refusing = False

    def _call(self, coroutine: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def open(self) -> None:
        self.thread.start()
        try:
            self._call(self._start(), START_TIMEOUT_S)
        except ConfigError:
            self._stop_loop()
            raise
        except Exception as err:  # a taken port, an address not on this machine
            self._stop_loop()
            raise ConfigError(f"outputs.opcua.endpoint: cannot serve {self.config.endpoint}: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
        self.running = True
        log.info("OPC UA server on %s (namespace %s, security %s), camera object %s", self.config.endpoint,
                 self.config.namespace, self.config.security, self.camera_id)

    async def _start(self) -> None:
        from asyncua import Server, ua

        server = Server()
        await server.init()
        server.set_endpoint(self.config.endpoint)
        server.set_server_name(f"edge-inspector {self.camera_id}")
        await self._security(server, ua)
        index = await server.register_namespace(self.config.namespace)
        camera = await server.nodes.objects.add_object(f"ns={index};s={self.camera_id}",
                                                       ua.QualifiedName(self.camera_id, index))
        for name, (type_name, initial) in VARIABLES.items():
            variant_type = getattr(ua.VariantType, type_name)
            node = await camera.add_variable(f"ns={index};s={self.camera_id}.{name}",
                                             ua.QualifiedName(name, index), ua.Variant(initial, variant_type))
            self.nodes[name] = (node, variant_type)
        if self.trigger_sink is not None:
            await self._add_trigger_method(camera, index, ua)
        self.namespace_index = index
        await server.start()
        self.server = server

    async def _security(self, server: Any, ua: Any) -> None:
        config = self.config
        if config.security == "none":
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            return
        assert config.certificate and config.private_key  # cross_check requires both
        for key, value in (("certificate", config.certificate), ("private_key", config.private_key)):
            if not self.resolve(value).is_file():
                raise ConfigError(f"outputs.opcua.{key}: {self.resolve(value)} is not a readable file")
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        try:
            await server.load_certificate(str(self.resolve(config.certificate)))
            await server.load_private_key(str(self.resolve(config.private_key)))
        except Exception as err:  # not a certificate / key: one line at start
            raise ConfigError(f"outputs.opcua.certificate: cannot load {config.certificate} / "
                              f"{config.private_key}: {type(err).__name__}: {err}") from None

    async def _add_trigger_method(self, camera: Any, index: int, ua: Any) -> None:
        def argument(name: str, text: str) -> Any:
            return ua.Argument(Name=name, DataType=ua.NodeId(ua.ObjectIds.String), ValueRank=-1,
                               ArrayDimensions=[], Description=ua.LocalizedText(text))

        await camera.add_method(f"ns={index};s={self.camera_id}.Trigger", ua.QualifiedName("Trigger", index),
                                self._method_trigger,
                                [argument("PartId", "the part's id (1-64 of A-Z a-z 0-9 . _ : -); empty: the "
                                                    "service numbers it")],
                                [argument("PartId", "the part id queued")])

    async def _method_trigger(self, _parent: Any, *arguments: Any) -> Any:
        """The Trigger method, on the server's event loop: validates and appends under the gate's lock (no
        I/O), so it never holds the loop. Any exception becomes a Bad status, never a dead server."""
        from asyncua import ua

        self.triggers_received += 1
        values = [getattr(argument, "Value", argument) for argument in arguments]
        try:
            if not self.triggers_open or self.trigger_sink is None:
                return self._refused("trigger: the service is still starting", ua.StatusCodes.BadResourceUnavailable)
            if len(values) != 1 or not isinstance(values[0], str):
                return self._refused(f"trigger: expected one String argument PartId, got {len(values)} argument(s)"
                                     f" {', '.join(type(value).__name__ for value in values)}".rstrip(),
                                     ua.StatusCodes.BadInvalidArgument)
            part_id, delay_ms = parse_trigger({"part_id": values[0]} if values[0] else {})
        except ConfigError as err:
            return self._refused(str(err), ua.StatusCodes.BadInvalidArgument)
        try:
            reply = self.trigger_sink(part_id, delay_ms)
        except ConfigError as err:  # the queue is full, or the stream has ended
            return self._refused(str(err), ua.StatusCodes.BadResourceUnavailable)
        if self._refusing:
            log.info("OPC UA: triggers accepted again after %d refused", self.triggers_refused)
        self._refusing = False
        return [ua.Variant(str(reply["part_id"]), ua.VariantType.String)]

    def _refused(self, reason: str, code: Any) -> Any:
        from asyncua import ua

        self.triggers_refused += 1
        self.last_refusal = reason
        if not self._refusing:
            log.warning("OPC UA Trigger refused: %s (%d refused so far; counted in health "
                        "outputs.opcua.triggers_refused; further refusals logged after one is accepted)", reason,
                        self.triggers_refused)
        self._refusing = True
        return ua.StatusCode(code)

    def open_triggers(self) -> None:
        self.triggers_open = True

    def ready(self) -> bool:
        return self.running

    def send(self, message: Message) -> None:
        values = result_values(message) if message.kind == "result" else health_values(message)
        self._call(self._write(values), WRITE_TIMEOUT_S)

    async def _write(self, values: dict[str, Any]) -> None:
        from asyncua import ua

        for name, value in values.items():
            if value is None:
                continue
            node, variant_type = self.nodes[name]
            await node.write_value(ua.Variant(value, variant_type))

    def snapshot(self) -> dict[str, Any]:
        return {"running": self.running, "endpoint": self.config.endpoint, "namespace": self.config.namespace,
                **({"triggers_received": self.triggers_received, "triggers_refused": self.triggers_refused,
                    "last_trigger_refusal": self.last_refusal} if self.trigger_sink else {})}

    def close(self) -> None:
        if self.server is not None and self.thread.is_alive():
            try:
                self._call(self.server.stop(), WRITE_TIMEOUT_S)
            except Exception:
                log.exception("OPC UA server did not stop cleanly")
        self.running = False
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5.0)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()
