"""Image dimensions from the file header, read before anything is decoded.

A decoder allocates what the header asks for: a 1.1 MB PNG declaring 20000x20000 pixels took the service
to 8.3 GB of RSS and stalled inference for 24.5 s. The folder source therefore reads width and height from
the header (a few dozen bytes for PNG/BMP, a marker scan for JPEG, the first IFD for TIFF) and refuses a
frame over `camera.max_frame_pixels` before OpenCV sees it.
"""

from __future__ import annotations

import struct

# JPEG start-of-frame markers carry the size; C4 (DHT), C8 (JPG extension) and CC (DAC) are not frames.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class HeaderError(ValueError):
    """The header is not one of the supported formats or is cut short."""


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG, JPEG, BMP or TIFF header; HeaderError for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg(data)
    if data.startswith(b"BM"):
        return _bmp(data)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff(data)
    raise HeaderError("not a PNG, JPEG, BMP or TIFF image")


def _need(data: bytes, end: int) -> None:
    if len(data) < end:
        raise HeaderError("header cut short")


def _png(data: bytes) -> tuple[int, int]:
    _need(data, 24)
    if data[12:16] != b"IHDR":
        raise HeaderError("PNG without IHDR")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _jpeg(data: bytes) -> tuple[int, int]:
    pos = 2
    while True:
        _need(data, pos + 4)
        if data[pos] != 0xFF:
            raise HeaderError("JPEG marker expected")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker in _SOF:
            _need(data, pos + 9)
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        if marker == 0xD9 or length < 2:
            raise HeaderError("JPEG without a frame header")
        pos += 2 + length


def _bmp(data: bytes) -> tuple[int, int]:
    _need(data, 26)
    header_size = struct.unpack("<I", data[14:18])[0]
    if header_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack("<HH", data[18:22])
        return width, height
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)  # negative height: top-down rows


def _tiff(data: bytes) -> tuple[int, int]:
    order = "<" if data[:2] == b"II" else ">"
    _need(data, 8)
    offset = struct.unpack(order + "I", data[4:8])[0]
    _need(data, offset + 2)
    count = struct.unpack(order + "H", data[offset:offset + 2])[0]
    size: dict[int, int] = {}
    for i in range(count):
        entry = offset + 2 + 12 * i
        _need(data, entry + 12)
        tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            fmt = order + ("H" if kind == 3 else "I")
            size[tag] = struct.unpack(fmt, data[entry + 8:entry + 8 + struct.calcsize(fmt)])[0]
    if 256 not in size or 257 not in size:
        raise HeaderError("TIFF without width/height tags")
    return size[256], size[257]
