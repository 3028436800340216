"""The failed-frame archive: what an entry holds, the count/size caps, restarts, and a failing disk."""

from __future__ import annotations

import json
import logging
import subprocess
import time

import cv2
import numpy as np
import pytest

from edge_inspector.core.decision import DecisionParams, decide
from edge_inspector.service.archive import Archive
from edge_inspector.service.config import ArchiveConfig
from edge_inspector.service.pipeline import Result
from edge_inspector.service.sources import Frame


def result_of(sequence: int, verdict: str = "fail", size=(60, 80), noise: bool = False) -> tuple[Result, dict]:
    rng = np.random.default_rng(sequence)
    image = (rng.integers(0, 255, (*size, 3), dtype=np.uint8) if noise
             else np.full((*size, 3), 100, np.uint8))
    heat = np.zeros(size, np.float32)
    heat[10:20, 10:30] = 3.0 if verdict == "fail" else 0.5
    decision = decide(np.array([heat.max()]), heat, DecisionParams(threshold=1.0))
    frame = Frame(image=image, index=sequence, capture_time=1_700_000_000.0 + sequence, capture_mono=time.monotonic(),
                  capture_ms=1.0)
    result = Result(sequence=sequence, frame=frame, verdict=decision.verdict, model_id="m", model_sha256="s",
                    decision=decision, heatmap=heat)
    return result, {"camera_id": "cam1", "sequence": sequence, "verdict": decision.verdict}


def archive_in(folder, **kwargs) -> Archive:
    return Archive(folder, ArchiveConfig(enabled=True, folder=str(folder), **kwargs))


def test_an_entry_is_frame_heatmap_and_header(tmp_path):
    archive = archive_in(tmp_path / "arch")
    assert archive.submit(*result_of(1, "fail"))
    assert not archive.submit(*result_of(2, "pass"))  # only the configured verdicts are kept
    archive.close()
    files = sorted(p.name for p in (tmp_path / "arch").iterdir())
    assert files == ["20231114T221321.000Z_cam1_00000001_fail.heatmap.png",
                     "20231114T221321.000Z_cam1_00000001_fail.json",
                     "20231114T221321.000Z_cam1_00000001_fail.png"]
    folder = tmp_path / "arch"
    assert json.loads((folder / files[1]).read_text())["sequence"] == 1
    assert cv2.imread(str(folder / files[2])).shape == (60, 80, 3)
    heat = cv2.imread(str(folder / files[0]), cv2.IMREAD_GRAYSCALE)
    assert heat.shape == (60, 80) and heat[15, 15] == 255 and heat[0, 0] == 0  # 3x threshold clips at 2x
    assert archive.snapshot()["saved"] == 1 and archive.snapshot()["entries"] == 1


def test_count_cap_removes_the_oldest_first(tmp_path):
    archive = archive_in(tmp_path, max_files=3)
    for sequence in range(1, 8):
        archive.submit(*result_of(sequence))
        time.sleep(0.01)  # let the writer keep up: this test is about eviction, not about skipping
    archive.close()
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert [int(n.split("_")[2]) for n in names] == [5, 6, 7]
    assert archive.stats.removed == 4 and len(list(tmp_path.iterdir())) == 9


def test_size_cap_removes_the_oldest_first(tmp_path):
    result, header = result_of(1, noise=True)
    probe = archive_in(tmp_path / "probe")
    probe.submit(result, header)
    probe.close()
    entry_bytes = probe.stats.bytes
    archive = archive_in(tmp_path / "a", max_megabytes=2.5 * entry_bytes / 1048576)
    for sequence in range(1, 6):
        archive.submit(*result_of(sequence, noise=True))
        time.sleep(0.01)
    archive.close()
    kept = sorted(int(p.name.split("_")[2]) for p in (tmp_path / "a").glob("*.json"))
    assert kept == [4, 5] and archive.stats.bytes <= 2.5 * entry_bytes


def test_caps_hold_across_restarts(tmp_path):
    first = archive_in(tmp_path, max_files=10)
    for sequence in range(1, 5):
        first.submit(*result_of(sequence))
    first.close()
    second = archive_in(tmp_path, max_files=2)
    assert second.snapshot()["entries"] == 4
    second.submit(*result_of(9))
    second.close()
    assert sorted(int(p.name.split("_")[2]) for p in tmp_path.glob("*.json")) == [4, 9]


def test_an_unwritable_archive_is_logged_once_and_the_service_goes_on(tmp_path, caplog):
    blocked = tmp_path / "arch"
    blocked.write_text("a file where the archive folder should be")
    caplog.set_level(logging.ERROR, logger="edge_inspector.service.archive")
    archive = archive_in(blocked)
    for sequence in range(1, 4):
        assert archive.submit(*result_of(sequence))  # never raises into the pipeline
    time.sleep(0.3)
    assert archive.stats.errors >= 3 and archive.stats.saved == 0 and archive.snapshot()["failing"]
    assert len([r for r in caplog.records if "cannot write" in r.message]) == 1
    blocked.unlink()  # the disk problem clears: archiving resumes by itself
    archive.submit(*result_of(4))
    archive.close()
    assert archive.stats.saved == 1 and not archive.snapshot()["failing"]


def test_a_full_disk_leaves_no_partial_entries(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        archive = archive_in(mount / "arch", max_files=1000, max_megabytes=100)
        for sequence in range(1, 20):
            archive.submit(*result_of(sequence, size=(120, 160), noise=True))  # ~60 kB per entry
            time.sleep(0.02)
        archive.close()
        assert archive.stats.errors >= 1 and archive.stats.saved >= 1
        files = [p.name for p in (mount / "arch").iterdir()]
        assert not [n for n in files if n.endswith(".tmp")]
        assert len(files) == 3 * archive.stats.saved  # every entry complete: frame, heatmap and JSON
    finally:
        subprocess.run(["umount", str(mount)], check=False)
