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
# A ZeroMQ subscription is a byte prefix: `inspection.line1` also matched `inspection.line10`. Every topic
# therefore ends in NUL, which no camera id may hold (`check_camera_id`): `inspection.line1\0` is a prefix of
# line1's topic only, while `inspection.` still takes every camera. NUL rather than a printable delimiter
# ('.' or '/') so that no id in use today has to change: a printable one would have to be banned from ids.
TOPIC_END = b"\x00"
# The frame a result judged, as JPEG, for the live view: published only while a subscriber asks for this
# topic (docs/wire-format.md, "Frame message"), so PLCs and HMIs that subscribe to results never pay for it.
FRAME_TOPIC = "frame"
# Control requests are a few hundred bytes; ZeroMQ itself drops a peer that sends a bigger message, before
# it is buffered (without a cap, a 100 MB request was accepted and cost 336 MB of RSS).
MAX_CONTROL_MESSAGE = 64 * 1024


def check_camera_id(camera_id: str) -> str | None:
    """Why `camera_id` cannot name a topic (and be written to a log line as is), or None when it can."""
    if any(ord(char) < 32 or ord(char) == 127 for char in camera_id):
        return f"must not contain control characters (got {camera_id!r})"
    return None


def topic(kind: str, camera_id: str) -> bytes:
    """The exact topic of one camera's results (`kind` RESULT_TOPIC) or health (HEALTH_TOPIC)."""
    return f"{kind}.{camera_id}".encode() + TOPIC_END


def subscription(kind: str, camera_id: str | None = None) -> bytes:
    """The SUBSCRIBE prefix for one camera's `kind` messages, or every camera's when camera_id is None."""
    return topic(kind, camera_id) if camera_id else f"{kind}.".encode()


def topic_text(raw: bytes) -> str:
    """A received topic as text without its terminator (`inspection.line1`); old services sent none."""
    return raw.removesuffix(TOPIC_END).decode("utf-8", "replace")


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


# Idle peers on a listening socket hold a descriptor each: 1,100 idle TCP connections under a 1024-fd limit
# once crashed the service. ZeroMQ has no connection cap, but it can drop what is idle: a connection that
# has not finished the ZMTP handshake (greeting, CURVE) within HANDSHAKE_MS is closed (libzmq's default is
# 30 s); after it, a ZMTP ping every HEARTBEAT_MS, and a peer silent for HEARTBEAT_TIMEOUT_MS (half-open:
# unplugged, suspended) is dropped. Every libzmq >= 4.2 client answers pings by itself.
HANDSHAKE_MS = 5_000
HEARTBEAT_MS = 5_000
HEARTBEAT_TIMEOUT_MS = 20_000


def bound_idle_peers(socket: zmq.Socket) -> None:
    """Set the idle-peer bounds above on a socket before it binds (they apply to connections it accepts)."""
    socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    socket.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)


def bind_or_refuse(socket: zmq.Socket, endpoint: str, key: str) -> str:
    """Bind, or close the socket and raise the one-line ConfigError naming the config key (a port clash is a
    config mistake, exit 2); returns the endpoint really bound (a `:0`/`*` port resolved). Every listening
    socket of the service binds here, with idle peers bounded (`bound_idle_peers`)."""
    bound_idle_peers(socket)
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
