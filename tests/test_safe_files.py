"""Files are opened safely: regular files only (checked on the open descriptor), names escaped in logs, the
pixel and size caps in replay as in the service, stale temporary files of the archive removed at start."""

from __future__ import annotations

import csv
import logging
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_inspector.core.errors import ImageError
from edge_inspector.core.images import read_image, shown
from edge_inspector.service.app import Service
from edge_inspector.service.archive import Archive
from edge_inspector.service.config import ArchiveConfig, parse_config
from edge_inspector.service.sources import Camera, FolderSource
from service_helpers import LANES, PART, REPO, config_data, subprocess_env, wait_for


def tiff_declaring(width: int, height: int) -> bytes:
    """A tiny little-endian TIFF whose first IFD declares width x height (8-bit gray, one strip)."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8),
            (277, 3, 1), (278, 4, height), (279, 4, 1)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", tag, kind, 1, value)
                                                  for tag, kind, value in tags) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8 + 4) + b"\0\0\0\0" + ifd


def png_header_declaring(width: int, height: int) -> bytes:
    """A PNG cut after IHDR and a first IDAT chunk: what a decoder allocates for comes from IHDR alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)))


def write_parts(folder: Path, count: int) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:02d}.png"
        cv2.imwrite(str(path), np.full((PART, PART * LANES, 3), 90 + i, np.uint8))
        paths.append(path)
    return paths


def _frames(source: FolderSource, config) -> list:
    camera = Camera(source, config)
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(camera.frames(threading.Event(), lambda: None)), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "capture stuck"
    return got


def test_a_fifo_renamed_over_a_listed_image_is_an_error_result_not_a_stuck_capture(tmp_path):
    paths = write_parts(tmp_path / "in", 3)
    config = parse_config(config_data(str(tmp_path / "in"), tmp_path / "b")).camera
    source = FolderSource(config)
    source.open()  # listed: 00, 01, 02
    os.mkfifo(tmp_path / "fifo")
    os.replace(tmp_path / "fifo", paths[1])  # swapped in after listing; nobody ever writes to it
    source.open = lambda: None  # type: ignore[method-assign]  (keep the listing made before the swap)
    got = _frames(source, config)
    assert [f.image is not None for f in got] == [True, False, True]
    assert got[1].error == f"{paths[1]}: a FIFO, not a regular file (refused)"
    assert source.unreadable == 1


def test_the_service_folder_refuses_a_symbolic_link(tmp_path):
    paths = write_parts(tmp_path / "in", 1)
    (tmp_path / "in" / "01.png").symlink_to(paths[0])
    config = parse_config(config_data(str(tmp_path / "in"), tmp_path / "b")).camera
    got = _frames(FolderSource(config), config)
    assert got[0].image is not None and got[1].image is None
    assert got[1].error == f"{tmp_path / 'in' / '01.png'}: a symbolic link (refused: regular files only)"


def test_a_file_name_with_a_newline_cannot_forge_a_log_line(bundle, tmp_path, caplog):
    folder = tmp_path / "in"
    write_parts(folder, 1)
    forged = "x.png\n2026-12-07 23:00:00 WARNING edge_inspector.service.app: threshold changed: 9 -> 1e6 x.png"
    (folder / forged).write_bytes(b"not an image")
    service = Service(parse_config(config_data(str(folder), bundle.path, camera={"fps": 20.0})))
    with caplog.at_level(logging.INFO):
        service.start()
        try:
            wait_for(lambda: service.stats.processed >= 2, 20, "both files judged")
        finally:
            service.stop()
            service.shutdown()
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "\n" in m or "\r" in m]
    assert any("x.png\\n2026-12-07 23:00:00 WARNING" in m and "cannot decode image" in m for m in messages)


def test_shown_escapes_control_characters_and_undecodable_bytes_only():
    assert shown("a\nb\r\x1b[31m\u2028é.png") == "a\\nb\\r\\x1b[31m\\u2028é.png"
    assert shown(shown("a\nb")) == shown("a\nb")
    assert shown(os.fsdecode(b"bad\xff.png")) == "bad\\udcff.png"


@pytest.mark.parametrize("data, size", [(tiff_declaring(100000, 100000), "100000x100000"),
                                        (png_header_declaring(20000, 20000), "20000x20000")])
def test_read_image_refuses_a_decompression_bomb_before_decoding(tmp_path, data, size):
    path = tmp_path / ("bomb.tif" if data.startswith(b"II") else "bomb.png")
    path.write_bytes(data)
    with pytest.raises(ImageError, match=f"^{path}: {size} = \\d+ pixels exceeds the cap of 50000000; refused"):
        read_image(path)


def test_replay_gives_one_error_row_per_bomb_and_goes_on(bundle, tmp_path):
    folder = tmp_path / "images"
    write_parts(folder, 2)
    (folder / "00b.tif").write_bytes(tiff_declaring(100000, 100000))
    assert len((folder / "00b.tif").read_bytes()) < 200  # the 186-byte attack file's kind
    (folder / "00c.png").write_bytes(png_header_declaring(20000, 20000))
    out = tmp_path / "results.csv"
    done = subprocess.run([sys.executable, "-m", "edge_inspector.cli", "replay", str(folder), "--bundle",
                           str(bundle.path), "--out", str(out)], capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = {Path(row["path"]).name: row for row in csv.DictReader(out.open())}
    assert [rows[name]["verdict"] != "error" for name in ("00.png", "00b.tif", "00c.png", "01.png")] == [
        True, False, False, True]  # scored, refused, refused, scored: replay went on after each bomb
    assert "100000x100000 = 10000000000 pixels exceeds" in rows["00b.tif"]["error"]
    assert "20000x20000 = 400000000 pixels exceeds" in rows["00c.png"]["error"]
    assert "4 images:" in done.stdout and ", 2 error" in done.stdout


def test_stale_temporary_files_of_the_archive_are_removed_at_start(tmp_path):
    folder = tmp_path / "archive"
    folder.mkdir()
    stale = folder / ".20250101T000000.000Z_cam1_00000001_fail.png.4242.tmp"  # core/atomic.py's name
    stale.write_bytes(b"\0" * (2 << 20))
    other = folder / "notes.tmp"  # not ours: left alone
    other.write_bytes(b"x")
    archive = Archive(folder, ArchiveConfig(enabled=True, folder=str(folder)))
    try:
        assert not stale.exists() and other.exists()
        assert archive.snapshot()["stale_removed"] == 1 and archive.snapshot()["megabytes"] == 0
    finally:
        archive.close()


def test_a_stale_temporary_file_that_stays_counts_in_the_size_cap(tmp_path, monkeypatch):
    folder = tmp_path / "archive"
    folder.mkdir()
    (folder / ".20250101T000000.000Z_cam1_00000001_fail.png.4242.tmp").write_bytes(b"\0" * (3 << 20))
    real_unlink = os.unlink

    def refuse_temporary(path, *args, **kwargs):  # as a read-only leftover owned by another user would
        if str(path).endswith(".tmp"):
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse_temporary)
    archive = Archive(folder, ArchiveConfig(enabled=True, folder=str(folder)))
    try:
        assert archive.snapshot()["megabytes"] == 3.0 and archive.snapshot()["stale_removed"] == 0
    finally:
        archive.close()


def test_fit_reads_through_the_same_caps(tmp_path, caplog):
    """fit's reader (iter_readable, used by every model kind's fit) skips a bomb with one line, fast."""
    from edge_inspector.core.images import iter_readable

    good = write_parts(tmp_path, 1)[0]
    bomb = tmp_path / "bomb.tif"
    bomb.write_bytes(tiff_declaring(100000, 100000))
    with caplog.at_level(logging.WARNING):
        read = [path for path, _ in iter_readable([good, bomb], logging.getLogger("fit"))]
    assert read == [good]
    warning, = [record.getMessage() for record in caplog.records]
    assert "bomb.tif: 100000x100000 = 10000000000 pixels exceeds the cap of 50000000" in warning
