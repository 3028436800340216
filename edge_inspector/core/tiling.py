"""Frame -> tiles -> one stitched heatmap.

A 2448x2048 frame shrunk whole to a 256x256 model input loses the 0.3 mm scratch; cutting it into a grid
of tiles keeps defects a few pixels wide at model resolution. The same Tiler cuts training images (export
side, so a fit sees exactly what the service will feed) and live frames (device side), and stitches the
tiles' anomaly maps back into one frame-sized heatmap, averaging where tiles overlap.

Geometry per axis (the ROI extent L split into n tiles):
  * no tile_size:          n equal tiles that exactly cover L (no overlap);
  * tile_size, no stride:  n tiles of that size spread evenly from edge to edge (overlap as needed);
  * tile_size and stride:  tile i starts at i * stride (what is left past the last tile is not inspected).
Boxes depend on the frame size, so they are computed per frame shape and cached (a camera reconnecting at
another resolution just gets new boxes).
"""

from __future__ import annotations

import cv2
import numpy as np

from edge_inspector.core.errors import ConfigError
from edge_inspector.core.images import resize_to

Box = tuple[int, int, int, int]  # x, y, width, height
MIN_MAP_SCALE = 0.05  # publish.heatmap_scale's lower bound: below it a heatmap is a handful of pixels


def _axis(length: int, n: int, tile: int | None, stride: int | None, name: str) -> list[tuple[int, int]]:
    """(start, size) of each tile along one axis of length `length`."""
    if tile is None:
        if length < n:
            raise ConfigError(f"tiling: {n} tiles do not fit in {length} pixels of {name}")
        edges = np.round(np.linspace(0, length, n + 1)).astype(int)
        return [(int(a), int(b - a)) for a, b in zip(edges[:-1], edges[1:])]
    if tile > length:
        raise ConfigError(f"tiling.tile_size: {tile} pixels exceed the {length}-pixel {name} of the inspected area")
    if stride is None:
        if n * tile < length:
            raise ConfigError(f"tiling.tile_size: {n} tiles of {tile} pixels leave gaps in the {length}-pixel "
                              f"{name}; enlarge tile_size or set stride")
        starts = np.round(np.linspace(0, length - tile, n)).astype(int)
        return [(int(s), tile) for s in starts]
    if (n - 1) * stride + tile > length:
        raise ConfigError(f"tiling: {n} tiles of {tile} at stride {stride} need {(n - 1) * stride + tile} pixels, "
                          f"the {name} of the inspected area is {length}")
    return [(i * stride, tile) for i in range(n)]


def _scaled_box(box: Box, scale: float) -> Box:
    """A tile rectangle in the pixels of a map `scale` times the frame's size (edges rounded, >= 1 pixel)."""
    x, y, w, h = box
    x0, y0 = round(x * scale), round(y * scale)
    return x0, y0, max(1, round((x + w) * scale) - x0), max(1, round((y + h) * scale) - y0)


class Tiler:
    """Cuts frames into a rows x cols grid of model inputs and stitches the maps back."""

    def __init__(self, rows: int, cols: int, input_size: tuple[int, int], tile_size: tuple[int, int] | None = None,
                 stride: tuple[int, int] | None = None, roi: tuple[int, int, int, int] | None = None):
        if rows < 1 or cols < 1:
            raise ConfigError(f"tiling: rows and cols must be >= 1, got {rows}x{cols}")
        if stride is not None and tile_size is None:
            raise ConfigError("tiling.stride: needs tiling.tile_size")
        self.rows, self.cols = int(rows), int(cols)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.tile_size = None if tile_size is None else (int(tile_size[0]), int(tile_size[1]))
        self.stride = None if stride is None else (int(stride[0]), int(stride[1]))
        self.roi = None if roi is None else tuple(int(v) for v in roi)
        self._cache: dict[tuple[int, int], tuple[list[Box], bool]] = {}

    @property
    def tiles(self) -> int:
        return self.rows * self.cols

    def describe(self) -> str:
        parts = [f"{self.rows}x{self.cols} tiles -> {self.input_size[1]}x{self.input_size[0]}"]
        if self.tile_size:
            parts.append(f"tile {self.tile_size[1]}x{self.tile_size[0]}")
        if self.stride:
            parts.append(f"stride {self.stride[1]}x{self.stride[0]}")
        if self.roi:
            parts.append(f"roi {self.roi}")
        return ", ".join(parts)

    def detail_scale(self, frame_shape: tuple[int, ...], blur_sigma: float = 0.0) -> float:
        """The heatmap scale that keeps all the detail the model's map holds.

        Each tile is resized to the model's input, so a map stitched larger than one pixel per model-input
        pixel holds only upsampled pixels: for 2x2 tiles of a 1280x1024 frame at 256x256 that is 0.5, for
        one whole-frame tile 0.25; 1.0 whenever tiles are upscaled. A map the graph blurred with a Gaussian
        of `blur_sigma` model pixels (bundle.yaml's map_blur_sigma; every kind's default is 4) holds nothing
        finer than sigma / 2 pixels, so it is sent at one pixel per sigma / 2 model pixels (never coarser
        than MIN_MAP_SCALE). Measured on bottle's PaDiM maps (sigma 4): kept every 2 model pixels and
        upsampled back bilinearly, the 8-bit map moved by at most 1 grey level (mean 0.04), every 4 pixels by
        up to 5; a generated sharp defect peaking at 191: 3 and 13 (tests/test_tiling.py). On the 2-core VM
        the PNG of a 2x2 heatmap went from 5.6 ms (640x512) to 1.8 ms (320x256).
        """
        boxes, _ = self._layout(frame_shape)
        height, width = self.input_size
        scale = max(max(height / h, width / w) for _, _, w, h in boxes)
        scale = min(1.0, scale) / max(1.0, float(blur_sigma) / 2.0)
        return max(MIN_MAP_SCALE, scale)

    def boxes(self, frame_shape: tuple[int, ...]) -> list[Box]:
        """Tile rectangles (x, y, width, height) in frame pixels, row-major."""
        return list(self._layout(frame_shape)[0])

    def _layout(self, frame_shape: tuple[int, ...]) -> tuple[list[Box], bool]:
        key = (int(frame_shape[0]), int(frame_shape[1]))
        if key not in self._cache:
            self._cache[key] = self._compute(*key)
        return self._cache[key]

    def _compute(self, height: int, width: int) -> tuple[list[Box], bool]:
        rx, ry, rw, rh = self.roi if self.roi else (0, 0, width, height)
        if rx + rw > width or ry + rh > height:
            raise ConfigError(f"tiling.roi: {[rx, ry, rw, rh]} reaches outside the {width}x{height} frame")
        th, tw = self.tile_size if self.tile_size else (None, None)
        sy, sx = self.stride if self.stride else (None, None)
        ys = _axis(rh, self.rows, th, sy, "height")
        xs = _axis(rw, self.cols, tw, sx, "width")
        boxes = [(rx + x, ry + y, w, h) for y, h in ys for x, w in xs]
        overlapping = any(a[0] + a[1] > b[0] for a, b in zip(ys, ys[1:])) or any(
            a[0] + a[1] > b[0] for a, b in zip(xs, xs[1:]))
        return boxes, overlapping

    def split(self, frame: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 -> uint8 (T, h, w, 3): each tile resized to the model's input size, row-major."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ConfigError(f"tiling: expected a uint8 HxWx3 frame, got {frame.dtype} {frame.shape}")
        boxes, _ = self._layout(frame.shape)
        height, width = self.input_size
        out = np.empty((len(boxes), height, width, 3), np.uint8)
        for i, (x, y, w, h) in enumerate(boxes):
            resize_to(frame[y:y + h, x:x + w], (height, width), dst=out[i])
        return out

    def stitch(self, maps: np.ndarray, frame_shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
        """float32 (T, h, w) tile maps -> float32 frame map; overlaps averaged, outside the ROI 0.

        `scale` < 1 stitches straight at that fraction of the frame's size (the published heatmap's): a
        1280x1024 float map is 5 MB written and read per frame, and at scale 0.5 a quarter of that, with no
        full-size copy made only to be shrunk again.
        """
        boxes, overlapping = self._layout(frame_shape)
        if maps.ndim != 3 or maps.shape[0] != len(boxes):
            raise ValueError(f"stitch: expected {len(boxes)} maps (T, h, w), got shape {maps.shape}")
        height, width = int(frame_shape[0]), int(frame_shape[1])
        if scale != 1.0:
            height, width = max(1, round(height * scale)), max(1, round(width * scale))
            boxes = [_scaled_box(box, scale) for box in boxes]
        full = np.zeros((height, width), np.float32)
        if not overlapping:  # each tile's map resized straight into its place: the map is written once
            for tile_map, (x, y, w, h) in zip(maps, boxes):
                _resize_into(np.asarray(tile_map, np.float32), full[y:y + h, x:x + w])
            return full
        count = np.zeros_like(full)
        for tile_map, (x, y, w, h) in zip(maps, boxes):
            tile_map = np.asarray(tile_map, np.float32)
            if tile_map.shape != (h, w):
                tile_map = cv2.resize(tile_map, (w, h), interpolation=cv2.INTER_LINEAR)
            full[y:y + h, x:x + w] += tile_map
            count[y:y + h, x:x + w] += 1.0
        np.divide(full, count, out=full, where=count > 0)
        return full


def _resize_into(tile_map: np.ndarray, target: np.ndarray) -> None:
    """Bilinear resize of one float32 tile map into `target`, a (row-strided) view of the stitched map.

    OpenCV writes into the view in place, so no tile-sized temporary is made and copied (measured at 2x2
    tiles of a 1280x1024 frame, one OpenCV thread: 1.8 -> 0.9 ms per stitch, 2-core VM).
    """
    if tile_map.shape == target.shape:
        target[...] = tile_map
        return
    out = cv2.resize(tile_map, (target.shape[1], target.shape[0]), dst=target, interpolation=cv2.INTER_LINEAR)
    if out is not target and not np.shares_memory(out, target):  # never seen; kept so a binding change cannot
        target[...] = out                                         # silently leave the tile empty
