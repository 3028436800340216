"""Write bundles so that a failed or interrupted export never leaves a half-written bundle behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_inspector.core.atomic import fsync_dir, fsync_tree
from edge_inspector.core.bundle import BUNDLE_FILE
from edge_inspector.core.errors import DataError

BUNDLE_FOLDER_MODE = 0o755
BUNDLE_FILE_MODE = 0o644


def make_world_readable(folder: Path) -> None:
    """Folders 0755, files 0644, whatever the umask.

    `tempfile.mkdtemp` makes the staging folder 0700, so a bundle copied with `sudo cp -r` (as
    docs/service.md says) stayed unreadable for the unprivileged `edge-inspector` service user. A bundle
    holds no secrets: it is meant to be copied to devices.
    """
    os.chmod(folder, BUNDLE_FOLDER_MODE)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), BUNDLE_FOLDER_MODE)
        for name in files:
            os.chmod(os.path.join(root, name), BUNDLE_FILE_MODE)


def check_output_folder(out_dir: Path, force: bool) -> None:
    """Refuse, before any long work starts, to replace an existing bundle or non-empty folder without --force.

    A fit takes minutes and its bundle may be the one running on the line: replacing it must be a decision.
    """
    out_dir = Path(out_dir)
    if out_dir.is_file():
        raise DataError(f"--out {out_dir}: is a file; expected a folder for the bundle")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not (out_dir / BUNDLE_FILE).exists():
        raise DataError(f"--out {out_dir}: exists and is not a model bundle; choose another folder")
    if not force:
        raise DataError(f"--out {out_dir}: a bundle is already there; pass --force to replace it")


@contextmanager
def staged_bundle_folder(out_dir: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside out_dir; on success it replaces out_dir, on error it is removed.

    Staging sits in the same parent so the final rename is atomic on one filesystem. An existing out_dir is
    replaced only if it is a bundle (or empty), so a typo in --out cannot wipe an unrelated folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / BUNDLE_FILE).exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir}: exists and is not a model bundle; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        yield staging
        if not (staging / BUNDLE_FILE).is_file():
            raise RuntimeError("bundle staging finished without bundle.yaml")
        make_world_readable(staging)
        fsync_tree(staging)  # the files are on disk before the rename makes them the bundle
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "bundle")
        os.replace(staging, out_dir)
        fsync_dir(out_dir.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
        fsync_dir(out_dir.parent)
