"""One way to write a file so that a reader, a crash or a power cut never leaves half of it.

`os.replace` alone makes the rename atomic for readers, but on a power cut an eMMC or SD card can keep the
new name pointing at data that never reached the flash (ext4 with delayed allocation: a zero-length
bundle.yaml after reboot). The recipe: write a temporary file in the same folder, fsync it, rename it over
the target, then fsync the folder so the rename itself is on disk. Used for bundle.yaml, the bundle folder
as a whole (`fsync_tree` before its rename), TensorRT engines and timing caches, the failed-frame archive and
training checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

FILE_MODE = 0o644


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new entry in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (e.g. certain network mounts) refuse fsync on folders
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str, mode: int = FILE_MODE) -> Path:
    """Replace `path` with `data`, durably: readers see the old file or the new one, never a mix."""
    payload = data.encode() if isinstance(data, str) else data
    return write_atomic_with(path, lambda tmp: tmp.write_bytes(payload), mode)


def write_atomic_with(path: str | Path, write: Callable[[Path], object], mode: int = FILE_MODE) -> Path:
    """As `write_atomic`, for writers that want a file name (e.g. `torch.save`): `write(tmp)` fills it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_tree(folder: str | Path) -> None:
    """fsync every file and folder under `folder` (a staged bundle, before it is renamed into place)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(root)
