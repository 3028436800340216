"""The view's way to the services' control sockets: every request goes through `ControlLink.request`.

One function on purpose: with CURVE (`--server-key/--client-key`), the keys are applied there and nowhere
else. The view only forwards the documented requests (`status`, `set_threshold`, `reload`; see
docs/wire-format.md); the service validates and logs them, and the view logs who asked.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import zmq

from edge_inspector.core.wire import send_control
from edge_inspector.tools.subscriber import connectable

log = logging.getLogger(__name__)

RELOAD_TIMEOUT_S = 120.0  # a reload loads, verifies and warms up a bundle before answering


class ControlLink:
    """Control endpoints, and which camera answers on each (learned from `status`, retried until known)."""

    def __init__(self, endpoints: list[str], timeout_s: float = 5.0, context: zmq.Context | None = None,
                 keys: Any | None = None):
        """`keys`: an `edge_inspector.core.keys.ClientKeys` when the services run with CURVE."""
        self.endpoints = [connectable(e) for e in endpoints]
        self.keys = keys
        self.timeout_s = timeout_s
        self.context = context or zmq.Context.instance()
        self.cameras: dict[str, str] = {}  # camera_id -> endpoint
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.endpoints)

    def request(self, endpoint: str, request: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        """The one place a control request is sent; never raises for an absent or silent service."""
        try:
            return send_control(endpoint, request, timeout_s=timeout_s or self.timeout_s, context=self.context,
                                keys=self.keys)
        except TimeoutError as err:
            return {"ok": False, "error": str(err)}
        except (zmq.ZMQError, ValueError) as err:
            return {"ok": False, "error": f"control request to {endpoint} failed: {err}"}

    def discover(self) -> dict[str, str]:
        """Ask every endpoint not yet mapped which camera it controls."""
        with self.lock:
            known = set(self.cameras.values())
        for endpoint in self.endpoints:
            if endpoint in known:
                continue
            reply = self.request(endpoint, {"command": "status"}, timeout_s=min(self.timeout_s, 2.0))
            if reply.get("ok") and isinstance(reply.get("camera_id"), str):
                with self.lock:
                    self.cameras[reply["camera_id"]] = endpoint
                log.info("control for camera %s on %s", reply["camera_id"], endpoint)
        with self.lock:
            return dict(self.cameras)

    def endpoint_for(self, camera_id: str) -> str | None:
        with self.lock:
            endpoint = self.cameras.get(camera_id)
        if endpoint is None and self.enabled:
            endpoint = self.discover().get(camera_id)
        return endpoint

    def call(self, camera_id: str, request: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        endpoint = self.endpoint_for(camera_id)
        if endpoint is None:
            return {"ok": False, "error": f"no control endpoint answers for camera {camera_id!r} "
                                          f"(tried {', '.join(self.endpoints) or 'none'})"}
        reply = self.request(endpoint, request, timeout_s)
        if not reply.get("ok") and "no reply" in str(reply.get("error", "")):
            with self.lock:  # the service may have moved or restarted elsewhere: ask again next time
                self.cameras.pop(camera_id, None)
        return reply

    def status(self, camera_id: str) -> dict[str, Any]:
        return self.call(camera_id, {"command": "status"})

    def set_threshold(self, camera_id: str, value: Any) -> dict[str, Any]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            return {"ok": False, "error": f"threshold must be a finite number > 0, got {value!r}"}
        return self.call(camera_id, {"command": "set_threshold", "value": float(value)})

    def reload(self, camera_id: str, bundle: str | None = None) -> dict[str, Any]:
        if bundle is not None and not isinstance(bundle, str):
            return {"ok": False, "error": f"bundle must be a folder path string, got {bundle!r}"}
        request: dict[str, Any] = {"command": "reload"}
        if bundle:
            request["bundle"] = bundle
        return self.call(camera_id, request, timeout_s=RELOAD_TIMEOUT_S)
