"""Sources on real files, folders and a real HTTP stream: order, end of stream, waiting and reconnecting."""

from __future__ import annotations

import os
import threading
import time

import cv2
import numpy as np
import pytest

from edge_inspector.config import CameraConfig
from edge_inspector.errors import ConfigError
from edge_inspector.sources import Camera, create_source, detect_kind, gstreamer_available

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


def test_folder_in_name_order_skipping_unreadable_images(tmp_path):
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
    assert len(got) == 5 and camera.source.unreadable == 1
    assert np.array_equal(got[0].image, frames[0]) and np.array_equal(got[3].image, frames[3])
    assert got[4].image.shape == (96, 128, 3)  # the 16-bit gray image arrives as 8-bit BGR
    assert camera.state == "ended"


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
