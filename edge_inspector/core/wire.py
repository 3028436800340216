"""The wire format both ends share: topics, schema version, strict JSON, and the control client.

Every JSON message is encoded with `allow_nan=False` semantics: a value that is not finite becomes null
(and is logged), never the `Infinity`/`NaN` tokens that strict JSON parsers (Node.js, .NET, PLC gateways)
reject. docs/wire-format.md documents every field; `SCHEMA_VERSION` changes only when a field's meaning does.
The service (publisher, control server) and the offline tools (subscriber, control CLI, live view) import
this module, never each other.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import zmq

from edge_inspector.core.errors import ConfigError

log = logging.getLogger(__name__)

# 2: `verdict` may be `review` (the review band: uncertain parts for a person; a PLC sends them to a manual
# lane), with the band's `review_threshold` in the header and `reviews` counted in health. A version-1 client
# that only knows pass/fail must not treat `review` as pass: hence the bump.
SCHEMA_VERSION = 2
RESULT_TOPIC = "inspection"
HEALTH_TOPIC = "health"
# The frame a result judged, as JPEG, for the live view: published only while a subscriber asks for this
# topic (docs/wire-format.md, "Frame message"), so PLCs and HMIs that subscribe to results never pay for it.
FRAME_TOPIC = "frame"
# Control requests are a few hundred bytes; ZeroMQ itself drops a peer that sends a bigger message, before
# it is buffered (without a cap, a 100 MB request was accepted and cost 336 MB of RSS).
MAX_CONTROL_MESSAGE = 64 * 1024


def dumps_strict(payload: Any) -> bytes:
    """JSON that every strict parser accepts: non-finite floats become null (never `Infinity`/`NaN`)."""
    try:
        return json.dumps(payload, allow_nan=False).encode()
    except ValueError:
        log.warning("non-finite number in an outgoing message; sent as null")
        return json.dumps(_finite(payload), allow_nan=False).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def bind_or_refuse(socket: zmq.Socket, endpoint: str, key: str) -> str:
    """Bind, or close the socket and raise the one-line ConfigError naming the config key (a port clash is a
    config mistake, exit 2); returns the endpoint really bound (a `:0`/`*` port resolved)."""
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as err:
        socket.close(0)
        raise ConfigError(f"{key}: cannot bind {endpoint} ({err})") from None
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def send_control(endpoint: str, request: dict[str, Any] | str, timeout_s: float = 5.0,
                 context: zmq.Context | None = None, keys: Any | None = None) -> dict[str, Any]:
    """Client side of the control socket: a dict is sent as JSON, a string as the bare words.

    `keys`: an `edge_inspector.core.keys.ClientKeys` when the service runs with CURVE.
    """
    context = context or zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    socket.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    if keys is not None:
        keys.apply(socket)
    try:
        socket.connect(endpoint)
        socket.send(request.encode() if isinstance(request, str) else json.dumps(request).encode())
        return json.loads(socket.recv())
    except zmq.Again:
        raise TimeoutError(f"no reply from {endpoint} within {timeout_s} s") from None
    finally:
        socket.close(0)
