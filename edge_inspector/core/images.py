"""Reading images from disk into the one format the models take: uint8 BGR, HxWx3.

Factory images come as 8-bit or 16-bit, grayscale, colour or with alpha; the bundle's graph takes only uint8
BGR, so every path into the model (fit, replay, folder source) converts here, once, the same way.

Every image file is read by one bounded reader (`read_image`), the folder source's, replay's and fit's alike:
- opened with O_NONBLOCK (O_NOFOLLOW too for the service's drop folder) and checked on the open descriptor
  (fstat S_ISREG), so a FIFO renamed over a listed image is an error for that file, never a capture stuck in
  open(); a check on the name before opening would race with the rename;
- read up to a byte cap, and its header's width x height checked against a pixel cap before OpenCV decodes
  it (core/imageheader.py): a 186-byte TIFF declaring 100000x100000 once ended replay with a traceback, a
  389 KB 20000x20000 PNG took it to 5.25 GB for 47 s;
- named in errors and logs through `shown`, which escapes control characters: a file name holding a newline
  and a fake log line once forged a line in the service log.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from edge_inspector.core.errors import DataError, ImageError
from edge_inspector.core.imageheader import HeaderError, image_size
from edge_inspector.core.schema import read_at_most

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# The pixel cap of replay and fit, and the default of the service's camera.max_frame_pixels: 50 MP is above
# any line camera in use (the largest seen, 45 MP) and below what the 2-core VM can decode in memory.
MAX_IMAGE_PIXELS = 50_000_000
_UNSHOWABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


# Errors that mean the process is short of a resource, not that the file is bad: they clear by themselves.
SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class ShortageError(ImageError):
    """A file could not be read because the process ran out of descriptors or memory (EMFILE, ENOMEM):
    the file may be fine; the service reports the shortage in health and goes on."""


def is_shortage(err: BaseException) -> bool:
    """True for MemoryError, an OSError of SHORTAGE_ERRNOS, or an error raised for one (`shortage` set)."""
    return (isinstance(err, (MemoryError, ShortageError)) or getattr(err, "errno", None) in SHORTAGE_ERRNOS
            or bool(getattr(err, "shortage", False)))


def _read_error(name: str, err: OSError) -> ImageError:
    kind = ShortageError if err.errno in SHORTAGE_ERRNOS else ImageError
    return kind(f"{name}: cannot read ({err.strerror or err})")


def shown(name: str | Path) -> str:
    """A file name (or any text from outside) safe to put in a log line or a one-line error: control
    characters, line separators and undecodable bytes are escaped as Python's repr does (`a\\nb.png`),
    everything else is left as it is (accents and other scripts stay readable). Backslashes are not
    doubled, so text escaped once is unchanged by a second pass (an error naming a file is escaped where it
    is made and again where it is logged)."""
    return _UNSHOWABLE.sub(lambda match: repr(match.group())[1:-1], str(name))


def max_file_bytes(max_pixels: int) -> int:
    """No compressed image is larger than its raw 16-bit RGBA pixels: anything bigger is not worth reading."""
    return max_pixels * 8 + (1 << 20)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def read_file_bytes(path: str | Path, max_bytes: int, follow_links: bool = True, cap_name: str = "") -> bytes:
    """The bytes of a regular file of at most max_bytes; ImageError naming the file (escaped) otherwise.

    The type is checked on the descriptor, after an O_NONBLOCK open that cannot block on a FIFO.
    `follow_links` False (the service) refuses a symbolic link as the last path component (O_NOFOLLOW).
    """
    name = shown(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP and not follow_links:
            raise ImageError(f"{name}: a symbolic link (refused: regular files only)") from None
        raise _read_error(name, err) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{name}: {_file_kind(info.st_mode)}, not a regular file (refused)")
        too_big = ImageError(f"{name}: file larger than {max_bytes >> 20} MB, more than any image of at most "
                             f"{cap_name or 'the pixel cap'} pixels")
        if info.st_size > max_bytes:
            raise too_big
        data = read_at_most(fd, max_bytes)
    except OSError as err:
        raise _read_error(name, err) from None
    except MemoryError:
        raise ShortageError(f"{name}: cannot read (out of memory)") from None
    finally:
        os.close(fd)
    if data is None:  # grew while being read
        raise too_big
    return data


def decode_image(data: bytes, source: str, max_pixels: int = MAX_IMAGE_PIXELS, cap_name: str = "",
                 flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """Decode file bytes after checking the header's size against max_pixels; ImageError naming `source`
    (an already escaped name) when the header is unknown, too large, or the data does not decode."""
    try:
        width, height = image_size(data)
    except HeaderError as err:
        raise ImageError(f"{source}: cannot decode image ({err})") from None
    if width * height > max_pixels:
        raise ImageError(f"{source}: {width}x{height} = {width * height} pixels exceeds "
                         f"{cap_name or f'the cap of {max_pixels}'}{f' ({max_pixels})' if cap_name else ''}; "
                         "refused before decoding")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as err:  # code -4 (StsNoMem): OpenCV could not allocate the pixels, the file may be fine
        kind = ShortageError if getattr(err, "code", None) == -4 else ImageError
        raise kind(f"{source}: cannot decode image ({str(err).strip().splitlines()[-1]})") from None
    except MemoryError:
        raise ShortageError(f"{source}: cannot decode image (out of memory)") from None
    if image is None:
        raise ImageError(f"{source}: cannot decode image (corrupt or not an image)")
    return image


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


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, follow_links: bool = True,
               cap_name: str = "") -> np.ndarray:
    """Decode an image file to uint8 BGR through the bounded reader (module docstring); ImageError naming
    the file when it cannot be read, is not a regular file, or declares more than max_pixels pixels.
    `cap_name`: the setting the cap comes from, named in the error (the service: camera.max_frame_pixels)."""
    name = shown(path)
    data = read_file_bytes(path, max_file_bytes(max_pixels), follow_links, cap_name)
    return to_bgr8(decode_image(data, name, max_pixels, cap_name), name)


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool HxW, resized (nearest) to size=(height, width) when given."""
    name = shown(path)
    try:
        data = read_file_bytes(path, max_file_bytes(MAX_IMAGE_PIXELS))
        mask = decode_image(data, name, flags=cv2.IMREAD_GRAYSCALE)
    except ImageError as err:
        raise ImageError(f"{name}: cannot decode mask image ({str(err).removeprefix(name + ': ')})") from None
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
