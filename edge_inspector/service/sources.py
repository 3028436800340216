"""Frame sources: USB/V4L2 devices, video files, RTSP/HTTP streams, GStreamer pipelines, image folders.

Everything but folders goes through one `cv2.VideoCapture`; the kinds differ only in how they are opened
and in what the end of the stream means (a file ends, a camera is lost). `Camera` wraps any source with what
a line needs from it: it never gives up. A failed open or read closes the source and retries with
exponential backoff, counting and reporting each loss, so a camera unplugged for a minute costs a minute of
frames, not a service restart. The backoff waits in short slices so the stage stays responsive to stop
requests and to the watchdog while the camera is away.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge_inspector.core.errors import ConfigError, ImageError, InspectorError
from edge_inspector.core.images import IMAGE_EXTENSIONS, is_shortage, list_images, read_image, shown, to_bgr8
from edge_inspector.core.inspect import Tiles
from edge_inspector.service.config import CameraConfig

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".m4v", ".webm", ".mjpg", ".mjpeg", ".h264", ".h265", ".ts")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class SourceError(InspectorError):
    """A source could not be opened or read; the Camera retries (never fatal). `shortage`: for lack of
    descriptors or memory (see FrameError)."""

    def __init__(self, message: str, shortage: bool = False):
        super().__init__(message)
        self.shortage = shortage


class EndOfStream(Exception):
    """A finite source (file or folder without `loop`) has delivered its last frame."""


class FrameError(Exception):
    """One frame could not be delivered (unreadable file, decode failure, too large) but the source is fine:
    the frame becomes an `error` result naming the reason, and capture goes on. `shortage`: the reason was
    the process running out of descriptors or memory (reported in health, see Camera.problems)."""

    def __init__(self, message: str, shortage: bool = False):
        super().__init__(message)
        self.shortage = shortage


# A shortage of descriptors or memory (1,100 idle connections under a 1024-fd limit once crashed capture)
# stays in health's problems this long after the last one, so it is seen in at least two health messages.
SHORTAGE_HOLD_S = 10.0


@dataclass
class Frame:
    image: np.ndarray | None  # uint8 BGR HxWx3; None when the source could not deliver it (see error)
    index: int  # frames captured since the service started (gaps in processed results = dropped frames)
    capture_time: float  # wall clock (time.time()) when the frame was read
    capture_mono: float  # monotonic time of the same instant, for latencies
    capture_ms: float  # time spent reading/decoding it
    source_file: str | None = None  # the image file it came from (folder sources)
    error: str | None = None  # why there is no image: becomes an `error` result, never a silent gap
    tiles: Tiles | None = None  # model inputs cut by the capture stage ahead of inference (pipeline.py)
    part_id: str | None = None  # camera.trigger external: the trigger's part (service/triggers.py)
    trigger_time: float | None = None  # wall clock when that trigger arrived
    part_step: str | None = None  # presence judged on every frame: "more" frames of this part follow, or "last"


def detect_kind(source: int | str) -> str:
    """The source kind `auto` stands for, decided from the spec alone (the target may not exist yet)."""
    if isinstance(source, int) or re.fullmatch(r"/dev/video\d+", str(source)):
        return "device"
    text = str(source)
    if "!" in text:
        return "gstreamer"
    if _URL.match(text):
        return "url"
    path = Path(text)
    if path.is_dir() or text.endswith("/"):
        return "folder"
    if path.suffix.lower() in VIDEO_EXTENSIONS or path.is_file():
        return "file"
    if path.suffix == "":
        return "folder"
    raise ConfigError(f"camera.source: cannot tell what kind of source {text!r} is; set camera.kind")


class FrameSource(ABC):
    """One way of getting frames. open/read raise SourceError on failure; read raises EndOfStream at the end."""

    kind = "abstract"
    finite = False  # True when the stream has a real end (file/folder without loop)
    current_file: str | None = None  # the file the last read came from (folder sources)

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def read(self) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 (optional hook: image folders hold nothing open)
        """Release the device/file; safe to call when not open."""

    @abstractmethod
    def describe(self) -> str: ...


class TimedReader:
    """Runs `capture.read()` on a helper thread so a frozen stream is declared lost after read_timeout_s.

    OpenCV's FFmpeg read timeout is a hint to the demuxer, not a deadline: a frozen RTSP stream was declared
    lost after 15 s with a 5 s setting (the RTSP demuxer retries internally), and a hung V4L2 driver blocks
    for its own timeout. A blocking read cannot be interrupted, so on timeout the capture is abandoned to
    the helper thread, which releases it when the read finally returns; the camera reconnects meanwhile.
    """

    def __init__(self, capture: cv2.VideoCapture, name: str):
        self.capture = capture
        self._request = threading.Event()
        self._done = threading.Event()
        self._abandoned = False
        self._closed = False
        self._result: tuple[bool, np.ndarray | None] = (False, None)
        self.thread = threading.Thread(target=self._run, name=f"edge-read-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            self._request.wait()
            self._request.clear()
            if self._closed:
                break
            try:
                self._result = self.capture.read()
            except cv2.error:
                self._result = (False, None)
            self._done.set()
            if self._abandoned:
                break
        self.capture.release()

    def read(self, timeout_s: float) -> tuple[bool, np.ndarray | None] | None:
        """(ok, image), or None when no frame came within timeout_s (the reader is then abandoned)."""
        self._done.clear()
        self._request.set()
        if not self._done.wait(timeout_s):
            self._abandoned = True
            return None
        return self._result

    def close(self) -> None:
        """Release the capture: at once when idle, by the helper thread after its read when abandoned."""
        if not self._abandoned:
            self._closed = True
            self._request.set()


class VideoCaptureSource(FrameSource):
    """Device, file, URL or GStreamer pipeline through cv2.VideoCapture."""

    def __init__(self, config: CameraConfig, kind: str):
        self.config = config
        self.kind = kind
        self.finite = kind == "file" and not config.loop
        self.capture: cv2.VideoCapture | None = None
        self.reader: TimedReader | None = None  # live sources: reads with a hard deadline
        if kind == "gstreamer" and not gstreamer_available():
            raise ConfigError("camera.source: a GStreamer pipeline needs OpenCV built with GStreamer "
                              "(this OpenCV is not; see cv2.getBuildInformation())")

    def describe(self) -> str:
        return f"{self.kind} {self.config.source}"

    def _target_and_api(self) -> tuple[int | str, int, list[int]]:
        source = self.config.source
        timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.config.open_timeout_s * 1000),
                    cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.config.read_timeout_s * 1000)]
        if self.kind == "device":
            return source, cv2.CAP_V4L2 if hasattr(cv2, "CAP_V4L2") else cv2.CAP_ANY, []
        if self.kind == "gstreamer":
            return str(source), cv2.CAP_GSTREAMER, []
        if self.kind == "file" and not Path(str(source)).is_file():
            raise SourceError(f"{source}: video file not found")
        return str(source), cv2.CAP_FFMPEG, timeouts

    def open(self) -> None:
        self.close()
        target, api, params = self._target_and_api()
        capture = cv2.VideoCapture(target, api, params) if params else cv2.VideoCapture(target, api)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"cannot open {self.describe()}")
        if self.kind == "device":
            if self.config.width and self.config.height:
                capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.config.width)
                capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.config.height)
            if self.config.fps:
                capture.set(cv2.CAP_PROP_FPS, self.config.fps)
        self.capture = capture
        if self.kind != "file":
            self.reader = TimedReader(capture, self.kind)

    def read(self) -> np.ndarray:
        if self.capture is None:
            raise SourceError(f"{self.describe()} is not open")
        if self.reader is not None:
            got = self.reader.read(self.config.read_timeout_s)
            if got is None:
                raise SourceError(f"no frame from {self.describe()} within camera.read_timeout_s "
                                  f"({self.config.read_timeout_s:g} s)")
            ok, image = got
        else:
            ok, image = self.capture.read()
        if ok and image is not None:
            return to_bgr8(image, self.describe())
        if self.kind == "file":
            if not self.config.loop:
                raise EndOfStream
            self.capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self.capture.read()
            if ok and image is not None:
                return to_bgr8(image, self.describe())
        raise SourceError(f"read failed on {self.describe()}")

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()  # the reader thread owns the capture and releases it
            self.reader = None
            self.capture = None
        if self.capture is not None:
            self.capture.release()
            self.capture = None


class FolderSource(FrameSource):
    """Images of a folder in name order: a drop folder, or recorded frames replayed as a camera."""

    kind = "folder"

    def __init__(self, config: CameraConfig):
        self.config = config
        self.folder = Path(str(config.source))
        self.finite = not config.loop
        self.paths: list[Path] = []
        self.position = 0
        self.unreadable = 0  # images that could not be read or decoded (each one an error result)
        self.max_pixels = config.max_frame_pixels

    def describe(self) -> str:
        return f"folder {shown(self.folder)}"

    def open(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"{self.folder}: image folder not found")
        try:
            self.paths = [p for p in list_images(self.folder, recursive=False)
                          if p.suffix.lower() in IMAGE_EXTENSIONS]
            nested = 0 if self.paths else len(list_images(self.folder, recursive=True))
        except OSError as err:  # EMFILE included: the folder is retried with the camera's backoff
            raise SourceError(f"{shown(self.folder)}: cannot list the folder ({err.strerror or err})",
                              shortage=is_shortage(err)) from None
        self.position = 0
        if not self.paths:
            # A folder of subfolders (an MVTec-style test set) is a likely mistake: say why nothing is read.
            hint = (f" ({nested} images in subfolders are not read: a folder source reads only the folder's own "
                    "files)") if nested else ""
            raise SourceError(f"{self.folder}: no images yet{hint}")

    def read(self) -> np.ndarray:
        if self.position >= len(self.paths):
            if not self.config.loop:
                raise EndOfStream
            self.open()  # re-list, so images added meanwhile are picked up
        path = self.paths[self.position]
        self.position += 1
        self.current_file = str(path)
        try:
            return self._decode(path)
        except FrameError:
            self.unreadable += 1
            raise

    def _decode(self, path: Path) -> np.ndarray:
        """Read one image through the shared bounded reader (core/images.py): a file that is not regular
        (a FIFO renamed over a listed image) or a symbolic link, any OSError, a header over
        max_frame_pixels or a decode failure is a FrameError naming the file, escaped for the log."""
        try:
            return read_image(path, self.max_pixels, follow_links=False, cap_name="camera.max_frame_pixels")
        except ImageError as err:
            raise FrameError(str(err), shortage=is_shortage(err)) from None


def _message(err: BaseException) -> str:
    """One escaped line for a source error (an OSError or MemoryError named by its kind)."""
    if isinstance(err, InspectorError):
        return shown(str(err))
    return shown(f"{type(err).__name__}: {getattr(err, 'strerror', None) or err or 'out of memory'}")


def gstreamer_available() -> bool:
    info = cv2.getBuildInformation()
    return bool(re.search(r"GStreamer:\s+YES", info))


def create_source(config: CameraConfig) -> FrameSource:
    kind = detect_kind(config.source) if config.kind == "auto" else config.kind
    if kind == "device" and not (isinstance(config.source, int) or str(config.source).startswith("/dev/")):
        raise ConfigError(f"camera.source: a device is an index (0, 1, ...) or /dev/videoN, got {config.source!r}")
    if kind == "folder":
        return FolderSource(config)
    return VideoCaptureSource(config, kind)


class Camera:
    """A source that reconnects forever, paces replayed media and reports its state.

    `on_event(kind, message)` is called (from the capture thread) on "connected", "disconnected" and
    "ended", so the publisher can send a health message at once instead of at the next interval.
    """

    def __init__(self, source: FrameSource, config: CameraConfig,
                 on_event: Callable[[str, str], None] | None = None):
        self.source = source
        self.config = config
        self.on_event = on_event or (lambda kind, message: None)
        self.state = "starting"  # starting | connected | waiting | ended | stopped
        self._snapshot_lock = threading.Lock()
        self.last_error = ""
        self.connects = 0
        self.reconnects = 0  # successful re-opens after the stream was lost or could not be opened
        self.disconnects = 0  # streams lost after delivering frames
        self.failed_opens = 0
        self.frames_read = 0
        self.next_due = 0.0
        self.shortages = 0  # reads/opens that failed for lack of descriptors or memory
        self._last_shortage: tuple[float, str] | None = None

    def problems(self) -> list[str]:
        """A recent shortage of descriptors or memory (SHORTAGE_HOLD_S), for health; capture goes on."""
        last = self._last_shortage
        if last is None or time.monotonic() - last[0] > SHORTAGE_HOLD_S:
            return []
        return [f"capture short of resources ({self.shortages} time(s), last {time.monotonic() - last[0]:.0f} s "
                f"ago: {last[1]})"]

    def _note_shortage(self, err: BaseException, message: str) -> None:
        if is_shortage(err):
            self.shortages += 1
            self._last_shortage = (time.monotonic(), message)

    @property
    def paced_fps(self) -> float | None:
        return self.config.fps if self.source.kind in ("file", "folder") else None

    def frames(self, stop: threading.Event, beat: Callable[[], None]) -> Iterator[Frame]:
        """Yield frames until stop is set or a finite source ends; never raises for source trouble."""
        delay = self.config.reconnect_initial_s
        lost = False
        try:
            while not stop.is_set():
                if self.state != "connected":
                    if not self._try_open(lost):
                        self._wait(delay, stop, beat)
                        delay = min(delay * 2, self.config.reconnect_max_s)
                        lost = True
                        continue
                    delay = self.config.reconnect_initial_s
                    lost = False
                self._pace(stop, beat)
                start = time.monotonic()
                error: str | None = None
                try:
                    image: np.ndarray | None = self.source.read()
                except EndOfStream:
                    self._set_state("ended", "end of stream")
                    return
                except FrameError as err:  # this frame only: reported as an error result, capture goes on
                    image, error = None, str(err)
                    self.last_error = error
                    self._note_shortage(err, error)
                except (SourceError, ImageError, OSError, MemoryError) as err:  # OSError: EMFILE and kin
                    message = _message(err)
                    self._note_shortage(err, message)
                    self._lose(message)
                    lost = True
                    continue
                now = time.monotonic()
                beat()
                yield Frame(image=image, index=self.frames_read, capture_time=time.time(), capture_mono=now,
                            capture_ms=(now - start) * 1000.0, source_file=self.source.current_file, error=error)
                self.frames_read += 1
        finally:
            self.source.close()
            if self.state != "ended":
                self.state = "stopped"

    def _try_open(self, after_failure: bool) -> bool:
        try:
            self.source.open()
        except (SourceError, ImageError, OSError, MemoryError) as err:  # never fatal: retried with backoff
            message = _message(err)
            self._note_shortage(err, message)
            self.failed_opens += 1
            if self.state != "waiting" or message != self.last_error:
                log.warning("camera %s: %s; retrying", self.config.id, message)
            self.last_error = message
            self._set_state("waiting", self.last_error)
            return False
        self.next_due = 0.0
        with self._snapshot_lock:  # health readers never see the new reconnect count with the old state
            self.connects += 1
            self.reconnects += int(after_failure)
            changed = self.state != "connected"
            self.state = "connected"
        log.info("camera %s: connected to %s%s", self.config.id, self.source.describe(),
                 f" (reconnect {self.reconnects})" if after_failure else "")
        if changed:
            self.on_event("connected", self.source.describe())
        return True

    def _lose(self, message: str) -> None:
        self.disconnects += 1
        self.last_error = message
        self.source.close()
        log.warning("camera %s: %s; reconnecting", self.config.id, message)
        self._set_state("waiting", message)

    def _set_state(self, state: str, message: str) -> None:
        changed = state != self.state
        self.state = state
        if changed:
            self.on_event({"connected": "connected", "waiting": "disconnected", "ended": "ended"}.get(state, state),
                          message)

    def _pace(self, stop: threading.Event, beat: Callable[[], None]) -> None:
        """Replay files/folders at the configured rate, as a camera would deliver them."""
        fps = self.paced_fps
        if not fps:
            return
        period = 1.0 / fps
        now = time.monotonic()
        if self.next_due > now:
            self._wait(self.next_due - now, stop, beat)
        # Keep the schedule (no drift) unless we fell more than a period behind; then restart it from now.
        base = self.next_due if self.next_due >= now - period else now
        self.next_due = base + period

    @staticmethod
    def _wait(seconds: float, stop: threading.Event, beat: Callable[[], None]) -> None:
        end = time.monotonic() + seconds
        while not stop.is_set():
            beat()
            left = end - time.monotonic()
            if left <= 0:
                return
            stop.wait(min(left, 0.2))

    def snapshot(self) -> dict:
        with self._snapshot_lock:
            return self._snapshot()

    def _snapshot(self) -> dict:
        return {"state": self.state, "source": self.source.describe(), "reconnects": self.reconnects,
                "disconnects": self.disconnects, "failed_opens": self.failed_opens, "last_error": self.last_error,
                "frames_read": self.frames_read,
                "unreadable_images": getattr(self.source, "unreadable", 0)}
