"""What `check-config` tries beyond parsing: the source opens and yields a frame, the ports are free.

A config can be valid and still never produce a result: a folder whose images are all in subfolders (the
folder source reads only the folder's own files and waits forever), a camera index with no camera behind
it (the service retries forever), a port another process holds (the service exits 2 at start). Each probe
uses the service's own source classes and binds the service's own endpoints, so "checked" means the service
would get as far; what cannot be tried without side effects (a live stream, a GStreamer pipeline that
claims the sensor) is reported as "not checked" rather than passed over.

The folder source stays non-recursive on purpose: a drop folder often holds `done/` or `rejected/`
subfolders of parts already judged, and reading them again would judge every part twice; `replay` recurses
because it walks a test set (good/ and each defect folder) once.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import cv2
import zmq

from edge_inspector.core.images import list_images
from edge_inspector.service.config import ServiceConfig
from edge_inspector.service.sources import FolderSource, FrameError, FrameSource, SourceError, VideoCaptureSource


@dataclass
class ProbeReport:
    """Lines for the user: `checked` passed, `warnings` may be fine (a camera unplugged now), `errors` will fail."""

    checked: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return ([f"  checked: {line}" for line in self.checked] + [f"  warning: {line}" for line in self.warnings]
                + [f"  not checked: {line}" for line in self.not_checked])


@contextmanager
def quiet_opencv() -> Iterator[None]:
    """OpenCV's own `[ WARN:0@...]` lines on a failed open say less than the probe's line: silence them."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def probe_config(config: ServiceConfig, source: FrameSource) -> ProbeReport:
    report = ProbeReport()
    if isinstance(source, FolderSource):
        probe_folder(source, report)
    elif isinstance(source, VideoCaptureSource):
        probe_capture(source, report)
    probe_ports(config, report)
    return report


def probe_folder(source: FolderSource, report: ProbeReport) -> None:
    folder = source.folder
    if not folder.is_dir():
        report.warnings.append(f"image folder {folder} does not exist (yet): the service waits for it")
        return
    if not os.access(folder, os.R_OK | os.X_OK):
        report.errors.append(f"camera.source: image folder {folder} is not readable by this user")
        return
    try:
        source.open()
    except SourceError as err:
        nested = len(list_images(folder, recursive=True))
        if nested:
            report.errors.append(f"camera.source: {err}; point camera.source at the folder that holds them, or "
                                 "use `edge-inspector replay` for a test set")
        else:
            report.warnings.append(f"{err}: the service waits until images arrive")
        return
    first = source.paths[0]
    try:
        image = source.read()
    except FrameError as err:
        report.warnings.append(f"{err} (each unreadable image becomes an error result)")
        return
    report.checked.append(f"folder {folder}: {len(source.paths)} image(s) at its top level (subfolders are not "
                          f"read); the first, {first.name}, decodes to {image.shape[1]}x{image.shape[0]}")


def probe_capture(source: VideoCaptureSource, report: ProbeReport) -> None:
    if source.kind in ("url", "gstreamer"):
        what = "a network stream" if source.kind == "url" else "a GStreamer pipeline (it would claim the sensor)"
        report.not_checked.append(f"{source.describe()}: {what} is opened by the service itself; watch its "
                                  "health (`edge-inspector subscribe`) for `connected`")
        return
    try:
        with quiet_opencv():
            source.open()
            image = source.read()
    except SourceError as err:
        if source.kind == "device":
            devices = sorted(glob.glob("/dev/video*"))
            here = f"video devices here: {', '.join(devices)}" if devices else "no /dev/video* devices here"
            report.warnings.append(f"{err} ({here}; a camera in use by a running service cannot open twice): the "
                                   "service would retry it forever")
        else:  # the file source retries too, as for a camera: the file may be copied in later
            report.warnings.append(f"{err}: the service would retry it forever")
        return
    finally:
        source.close()
    report.checked.append(f"{source.describe()} opens and delivers a {image.shape[1]}x{image.shape[0]} frame")


def probe_ports(config: ServiceConfig, report: ProbeReport) -> None:
    endpoints = [("publish.endpoint", config.publish.endpoint)]
    if config.publish.control_endpoint:
        endpoints.append(("publish.control_endpoint", config.publish.control_endpoint))
    context = zmq.Context()
    try:
        for name, endpoint in endpoints:
            socket = context.socket(zmq.PUB)
            socket.setsockopt(zmq.LINGER, 0)
            try:
                socket.bind(endpoint)
            except zmq.ZMQError as err:
                report.errors.append(f"{name}: cannot bind {endpoint} ({err}); is the service already running "
                                     "(`edge-inspector control ENDPOINT status`), or another program on that port?")
            else:
                report.checked.append(f"{name} {endpoint} is free")
            finally:
                socket.close(0)
    finally:
        context.term()
