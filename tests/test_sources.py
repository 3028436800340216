"""Sources on real files, folders and a real HTTP stream: order, end of stream, waiting and reconnecting."""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_inspector.core.errors import ConfigError
from edge_inspector.service.config import CameraConfig
from edge_inspector.service.sources import (
    Camera,
    create_source,
    detect_kind,
    gstreamer_available,
)
from service_helpers import FlakyVideoServer, read_video, write_video


def camera_config(source, **kwargs) -> CameraConfig:
    kwargs.setdefault("reconnect_initial_s", 0.05)
    kwargs.setdefault("reconnect_max_s", 0.2)
    return CameraConfig(source=source, **kwargs)


def numbered_frames(count: int, size=(96, 128)) -> list[np.ndarray]:
    frames = []
    for i in range(count):
        frame = np.full((*size, 3), 40 + 5 * i, np.uint8)
        cv2.putText(frame, str(i), (20, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 255), 3)
        frames.append(frame)
    return frames


def collect(camera: Camera, limit: int, timeout: float = 20.0):
    """Frames from camera.frames() until `limit` frames, the end of the stream, or timeout."""
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    frames = []
    try:
        for frame in camera.frames(stop, lambda: None):
            frames.append(frame)
            if len(frames) >= limit:
                break
    finally:
        timer.cancel()
    return frames


def test_detect_kind():
    assert detect_kind(0) == "device"
    assert detect_kind("/dev/video2") == "device"
    assert detect_kind("rtsp://10.0.0.5/stream") == "url"
    assert detect_kind("http://cam/video.mjpg") == "url"
    assert detect_kind("v4l2src ! videoconvert ! appsink") == "gstreamer"
    assert detect_kind("/data/line.avi") == "file"
    assert detect_kind("/data/frames/") == "folder"


def test_video_file_frames_in_order_then_end(tmp_path):
    video = write_video(tmp_path / "line.avi", numbered_frames(12))
    expected = read_video(video)
    events = []
    camera = Camera(create_source(camera_config(str(video))), camera_config(str(video)),
                    on_event=lambda kind, msg: events.append(kind))
    frames = collect(camera, 100)
    assert [f.index for f in frames] == list(range(12))
    assert all(np.array_equal(f.image, e) for f, e in zip(frames, expected))
    assert all(f.capture_time > 0 and f.capture_ms >= 0 for f in frames)
    assert camera.state == "ended" and events == ["connected", "ended"]


def test_video_file_loop_starts_over(tmp_path):
    video = write_video(tmp_path / "line.avi", numbered_frames(5))
    config = camera_config(str(video), loop=True)
    frames = collect(Camera(create_source(config), config), 12)
    assert len(frames) == 12
    assert np.array_equal(frames[0].image, frames[5].image) and np.array_equal(frames[1].image, frames[11].image)


def test_missing_file_is_awaited_then_picked_up(tmp_path):
    target = tmp_path / "later.avi"
    config = camera_config(str(target))
    events = []
    camera = Camera(create_source(config), config, on_event=lambda kind, msg: events.append((kind, msg)))
    staged = write_video(tmp_path / "staged.avi", numbered_frames(4))

    def appear():
        time.sleep(0.5)
        os.replace(staged, target)

    threading.Thread(target=appear).start()
    frames = collect(camera, 100)
    assert len(frames) == 4
    assert camera.failed_opens >= 1 and camera.reconnects == 1
    assert events[0][0] == "disconnected" and "not found" in events[0][1]
    assert ("connected", f"file {target}") in events


def test_stream_lost_mid_way_is_reconnected_and_counted(tmp_path):
    video = write_video(tmp_path / "line.avi", numbered_frames(20))
    with FlakyVideoServer(video, cut=1) as server:
        config = camera_config(server.url)
        events = []
        camera = Camera(create_source(config), config, on_event=lambda kind, msg: events.append(kind))
        frames = collect(camera, 26)
    assert len(frames) == 26
    assert server.requests >= 2
    assert camera.disconnects >= 1 and camera.reconnects >= 1
    assert events[:3] == ["connected", "disconnected", "connected"]
    assert [f.index for f in frames] == list(range(26))  # capture numbering runs on across reconnects


def test_folder_in_name_order_unreadable_images_become_error_frames(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = numbered_frames(4)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:02d}.png"), frame)
    (folder / "02b.png").write_bytes(b"not a png")
    cv2.imwrite(str(folder / "03b.png"), (frames[0][:, :, 0].astype(np.uint16) * 257))  # 16-bit gray
    config = camera_config(str(folder) + "/")
    camera = Camera(create_source(config), config)
    got = collect(camera, 100)
    assert len(got) == 6 and camera.source.unreadable == 1
    assert [Path(f.source_file).name for f in got] == ["00.png", "01.png", "02.png", "02b.png", "03.png", "03b.png"]
    bad = got[3]
    assert bad.image is None
    assert bad.error == f"{folder / '02b.png'}: cannot decode image (not a PNG, JPEG, BMP or TIFF image)"
    assert np.array_equal(got[0].image, frames[0]) and np.array_equal(got[4].image, frames[3])
    assert got[5].image.shape == (96, 128, 3)  # the 16-bit gray image arrives as 8-bit BGR
    assert camera.state == "ended"


def bomb_png(width: int, height: int) -> bytes:
    """A real, valid 1-bit grayscale PNG of width x height zero pixels: ~1000x smaller than its pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_from_its_header_and_capture_goes_on(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    bomb = bomb_png(20000, 20000)
    assert len(bomb) < 100_000  # 400 megapixels in well under 100 kB
    (folder / "00.png").write_bytes(bomb)
    cv2.imwrite(str(folder / "01.png"), numbered_frames(1)[0])
    small = bomb_png(64, 48)
    (folder / "02.png").write_bytes(small)
    config = camera_config(str(folder) + "/", max_frame_pixels=10_000_000)
    camera = Camera(create_source(config), config)
    got = collect(camera, 10)
    assert len(got) == 3
    assert got[0].image is None and "20000x20000 = 400000000 pixels exceeds camera.max_frame_pixels" in got[0].error
    assert got[1].image.shape == (96, 128, 3) and got[2].image.shape == (48, 64, 3)  # the same format decodes


def test_a_file_that_vanishes_after_listing_is_an_error_frame(tmp_path):
    """A drop folder cleaned up by another process between listing and reading: an OSError, not a crash."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(numbered_frames(3)):
        cv2.imwrite(str(folder / f"{i:02d}.png"), frame)
    config = camera_config(str(folder) + "/")
    source = create_source(config)
    camera = Camera(source, config)
    stop = threading.Event()
    got = []
    for frame in camera.frames(stop, lambda: None):
        got.append(frame)
        if len(got) == 1:
            (folder / "01.png").unlink()
    assert len(got) == 3 and got[1].image is None and "01.png: cannot read (No such file or directory)" in got[1].error
    assert got[2].image is not None


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff"])
def test_header_sizes_match_what_opencv_decodes(tmp_path, ext):
    from edge_inspector.core.imageheader import image_size

    image = numbered_frames(1, size=(37, 53))[0]
    path = tmp_path / f"x{ext}"
    cv2.imwrite(str(path), image)
    assert image_size(path.read_bytes()) == (53, 37)


def test_paced_replay_is_not_faster_than_fps(tmp_path):
    video = write_video(tmp_path / "line.avi", numbered_frames(6))
    config = camera_config(str(video), fps=20.0)
    started = time.monotonic()
    frames = collect(Camera(create_source(config), config), 100)
    assert len(frames) == 6
    assert time.monotonic() - started >= 5 / 20.0 * 0.95  # a rate limit, not a speed claim


def test_absent_device_is_awaited_without_giving_up():
    config = camera_config("/dev/video97", kind="device")
    camera = Camera(create_source(config), config)
    assert collect(camera, 1, timeout=0.6) == []
    assert camera.failed_opens >= 2 and camera.state == "stopped" and "cannot open" in camera.last_error


def test_config_level_source_errors():
    with pytest.raises(ConfigError, match="device is an index"):
        create_source(camera_config("line.avi", kind="device"))
    if not gstreamer_available():
        with pytest.raises(ConfigError, match="GStreamer"):
            create_source(camera_config("videotestsrc ! appsink", kind="gstreamer"))


class FreezingMjpegCamera:
    """A real HTTP MJPEG camera (multipart JPEG, like most IP cameras) that freezes after `frames` frames:
    the connection stays open and nothing more is sent."""

    def __init__(self, frames: int = 6):
        import http.server
        import socketserver

        images = [cv2.imencode(".jpg", image)[1].tobytes() for image in numbered_frames(frames)]
        server = self
        self.release = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for data in images:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(data) + data + b"\r\n")
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:
                    return
                server.release.wait(30)  # frozen

            def log_message(self, *args):
                pass

        self.httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/video.mjpg"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_frozen_stream_is_declared_lost_after_read_timeout(tmp_path):
    camera_server = FreezingMjpegCamera()
    try:
        config = camera_config(camera_server.url, kind="url", read_timeout_s=1.0, open_timeout_s=5.0,
                               reconnect_initial_s=30.0, reconnect_max_s=30.0)
        events: dict[str, float] = {}
        camera = Camera(create_source(config), config,
                        on_event=lambda kind, message: events.setdefault(kind, time.monotonic()))
        stop = threading.Event()
        times: list[float] = []
        reader = threading.Thread(target=lambda: [times.append(time.monotonic())
                                                  for _ in camera.frames(stop, lambda: None)])
        reader.start()
        deadline = time.monotonic() + 15
        while "disconnected" not in events and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        reader.join(10)
        lost = events["disconnected"]
        times = [t for t in times if t < lost]
        assert len(times) >= 6 and camera.disconnects >= 1  # FFmpeg may repeat the first frame
        # Whichever gives up first, FFmpeg's own timeout or the reader's deadline, it is about 1 s.
        assert "within camera.read_timeout_s (1 s)" in camera.last_error or "read failed" in camera.last_error
        assert 0.9 < lost - times[-1] < 3.0  # declared lost after about read_timeout_s (1 s)
    finally:
        camera_server.close()
