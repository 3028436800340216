"""Reading images from disk into the one format the models take: uint8 BGR, HxWx3.

Factory images come as 8-bit or 16-bit, grayscale, colour or with alpha; the bundle's graph takes only uint8
BGR, so every path into the model (fit, replay, folder source) converts here, once, the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from edge_inspector.core.errors import DataError, ImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def to_bgr8(image: np.ndarray, source: str = "image") -> np.ndarray:
    """Convert any decoded image (gray/BGR/BGRA, 8/16-bit, float) to contiguous uint8 BGR."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        image = np.clip(image * 255.0 if image.max(initial=0) <= 1.0 else image, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(f"{source}: unsupported pixel type {image.dtype} (expected 8- or 16-bit)")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif not (image.ndim == 3 and image.shape[2] == 3):
        raise ImageError(f"{source}: unsupported image shape {image.shape} (expected gray, BGR or BGRA)")
    return np.ascontiguousarray(image)


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 BGR; raise ImageError naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageError(f"{path}: cannot decode image (corrupt or not an image)")
    return to_bgr8(image, str(path))


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool HxW, resized (nearest) to size=(height, width) when given."""
    path = Path(path)
    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else np.empty(0, np.uint8)
    mask = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if mask is None:
        raise ImageError(f"{path}: cannot decode mask image")
    if size is not None and mask.shape != tuple(size):
        mask = cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return mask > mask_cutoff(mask)


def mask_cutoff(mask: np.ndarray) -> int:
    """Pixel value above which a mask pixel is defective.

    Two conventions exist: 0/255 masks (MVTec AD; JPEG-saved ones carry noise near the edges, hence the
    midpoint) and label-index masks where each defect class is a small integer (VisA: 1..7). Reading the
    latter at 127 made every VisA mask empty and pixel metrics silently n/a; a mask whose brightest pixel
    is at most 127 is therefore read as "any non-zero value is a defect".
    """
    return 127 if int(mask.max(initial=0)) > 127 else 0


def list_non_images(folder: str | Path) -> list[Path]:
    """Files under folder that replay/fit skip because they are not images (hidden files ignored)."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _placed(image: np.ndarray, dst: np.ndarray | None) -> np.ndarray:
    """`image` itself, or copied into `dst` when the caller gave one."""
    if dst is None:
        return image
    dst[...] = image
    return dst


def resize_to(image: np.ndarray, size: tuple[int, int], dst: np.ndarray | None = None) -> np.ndarray:
    """Resize uint8 BGR to size=(height, width): area averaging when shrinking, linear when growing.

    Every model input is made here (fit, replay, the service's tiles), so training and the line see the same
    pixels. OpenCV's area resize is fast only for whole-number factors: a 640x512 tile to 256x256 (2x2 tiles
    of 1280x1024, factors 2.5 x 2) took 1.2-1.7 ms a tile on the 2-core VM. So a shrink by 2x or more first
    averages whole-number blocks per axis (OpenCV's fast path), then area-resizes the rest (< 2x): 4.6-4.7
    -> 2.0-2.4 ms for the four tiles. Both steps average boxes of pixels; against one area resize the tiles
    differ by 0.25 (plain part) to 0.8 (with sensor noise) grey levels on average, p99 1-3, a few edge
    pixels more; up to k - 1 pixels past the last whole block (right and bottom) are left out of the first
    step, less than one model pixel. `dst`: write into this uint8 array of the output's shape.
    """
    height, width = size
    rows, cols = image.shape[:2]
    if (rows, cols) == (height, width):
        return _placed(image, dst)
    if rows <= height and cols <= width:
        return cv2.resize(image, (width, height), dst=dst, interpolation=cv2.INTER_LINEAR)
    ky, kx = max(1, rows // height), max(1, cols // width)
    whole_factors = rows == ky * height and cols == kx * width
    both_shrink = rows >= height and cols >= width  # one axis growing: a single area resize, as before
    if both_shrink and max(ky, kx) >= 2 and not whole_factors:
        rows, cols = rows - rows % ky, cols - cols % kx
        image = cv2.resize(image[:rows, :cols], (cols // kx, rows // ky), interpolation=cv2.INTER_AREA)
        if image.shape[:2] == (height, width):
            return _placed(image, dst)
    return cv2.resize(image, (width, height), dst=dst, interpolation=cv2.INTER_AREA)


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """All image files under folder, sorted, so runs and hashes are reproducible."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def iter_readable(paths: Iterable[Path], logger: logging.Logger) -> Iterator[tuple[Path, np.ndarray]]:
    """Yield (path, image) for readable files; unreadable ones are logged and skipped (training sets)."""
    for path in paths:
        try:
            image = read_image(path)
        except Exception as err:  # ImageError, or a decoder crash on a damaged file
            logger.warning("skipping unreadable training image: %s", err)
            continue
        yield path, image
