"""The result fan-out: the pipeline's one sink, ZeroMQ first, then every extra output's queue.

The ZeroMQ publisher stays what it was (encodes, sends, archives, health on time); the fan-out sends each
result through it first and then hands the very header it sent, and each health payload it sent, to the
outputs. So every output carries the same schema-versioned header as the ZeroMQ result, and nothing an
output does happens before the ZeroMQ send.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge_inspector.service.outputs.base import Message, QueuedOutput, Totals

if TYPE_CHECKING:
    from edge_inspector.service.config import ServiceConfig
    from edge_inspector.service.pipeline import Result
    from edge_inspector.service.publisher import Publisher

log = logging.getLogger(__name__)


class OutputFanOut:
    """A ResultSink (service/pipeline.py): called from the publish thread only."""

    def __init__(self, publisher: Publisher, outputs: list[QueuedOutput] | None = None):
        self.publisher = publisher
        self.outputs = outputs or []
        self.totals = Totals()
        self._health_seen = publisher.health_sent

    @classmethod
    def build(cls, config: ServiceConfig, publisher: Publisher,
              trigger: Callable[[str | None, int], dict[str, Any]] | None = None) -> OutputFanOut:
        """The outputs the config asks for, opened (a port clash or bad key file fails the start here).

        trigger: the trigger queue (TriggerGate.trigger) for outputs that also take triggers in."""
        outputs: list[QueuedOutput] = []
        section = config.outputs
        try:
            if section.mqtt is not None:
                from edge_inspector.service.outputs.mqtt import MqttOutput

                mqtt = MqttOutput(section.mqtt, config.camera.id, config.resolve, trigger)
                outputs.append(QueuedOutput(mqtt, section.mqtt.queue_size))
                outputs[-1].start()
            if section.opcua is not None:
                from edge_inspector.service.outputs.opcua import OpcuaOutput

                opcua = OpcuaOutput(section.opcua, config.camera.id, config.resolve, trigger)
                outputs.append(QueuedOutput(opcua, section.opcua.queue_size))
                outputs[-1].start()
        except BaseException:
            for output in outputs:
                output.close(drain_s=0.0)
            raise
        return cls(publisher, outputs)

    def send(self, result: Result) -> None:
        self.publisher.send(result)  # ZeroMQ (and the archive) first, on the line's clock
        if not self.outputs:
            return
        header = self.publisher.last_header
        self.totals.results += 1
        self.totals.fails += result.verdict == "fail"
        totals = Totals(self.totals.results, self.totals.fails)
        for output in self.outputs:
            output.submit(Message("result", header, totals))

    def open_inputs(self) -> None:
        """The service is ready: outputs that take triggers in start listening now."""
        for output in self.outputs:
            opener = getattr(output.output, "open_triggers", None)
            if opener is not None:
                opener()

    def idle(self) -> None:
        self.publisher.idle()
        self._forward_health()

    def finish(self) -> None:
        self.publisher.finish()  # the `stopped` health message, ZeroMQ's last
        self._forward_health()

    def _forward_health(self) -> None:
        if self.publisher.health_sent == self._health_seen:
            return
        self._health_seen = self.publisher.health_sent
        health = self.publisher.last_health
        if health is None or not self.outputs:
            return
        totals = Totals(self.totals.results, self.totals.fails)
        for output in self.outputs:
            output.submit(Message("health", health, totals))

    def snapshot(self) -> dict[str, Any]:
        """health.outputs: each output's queue, counters and connection."""
        return {output.name: output.snapshot() for output in self.outputs}

    def close(self, drain_s: float = 2.0) -> None:
        for output in self.outputs:
            output.close(drain_s)
