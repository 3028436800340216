"""Write bundles so that a failed or interrupted export never leaves a half-written bundle behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edge_inspector.bundle import BUNDLE_FILE
from edge_inspector.errors import DataError


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
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "bundle")
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
