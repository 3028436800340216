"""The one atomic, durable write: readers and crashes see the old file or the new one, never a mix."""

from __future__ import annotations

import os
import stat

import pytest

from edge_inspector.core.atomic import fsync_tree, write_atomic, write_atomic_with


def test_write_atomic_replaces_the_whole_file_with_mode_0644(tmp_path):
    target = tmp_path / "sub" / "bundle.yaml"
    write_atomic(target, "threshold: 1\n")
    write_atomic(target, b"threshold: 2\n")
    assert target.read_text() == "threshold: 2\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["bundle.yaml"]  # no temporary left behind


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "last.pt"
    write_atomic(target, b"good checkpoint")

    def crash(tmp):
        tmp.write_bytes(b"half a checkp")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic_with(target, crash)
    assert target.read_bytes() == b"good checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_fsync_tree_walks_files_and_folders(tmp_path):
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "a.engine").write_bytes(os.urandom(64))
    (tmp_path / "model.onnx").write_bytes(b"x")
    fsync_tree(tmp_path)  # real fsync calls on a real file system: must not raise


def test_bundles_and_archive_use_the_one_helper():
    """Every durable write of the device and the exporter goes through edge_inspector.core.atomic."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*(root / "edge_inspector").rglob("*.py"), *(root / "export").rglob("*.py")]:
        if path.name == "atomic.py":
            continue
        text = path.read_text()
        if "os.replace(" in text and path.name != "staging.py":  # staging renames whole folders
            offenders.append(path.relative_to(root).as_posix())
    assert offenders == []
