"""Tiling geometry, split and stitch: what the model sees and how its maps come back to frame pixels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_inspector.core.errors import ConfigError
from edge_inspector.core.images import resize_to
from edge_inspector.core.tiling import Tiler


def covered(boxes, shape) -> np.ndarray:
    count = np.zeros(shape, np.int32)
    for x, y, w, h in boxes:
        count[y:y + h, x:x + w] += 1
    return count


def test_grid_covers_the_frame_exactly_once_row_major():
    tiler = Tiler(2, 3, (64, 64))
    boxes = tiler.boxes((101, 150, 3))
    assert len(boxes) == 6 and tiler.tiles == 6
    assert np.all(covered(boxes, (101, 150)) == 1)
    assert boxes[0][:2] == (0, 0) and boxes[1][0] > boxes[0][0] and boxes[3][1] > boxes[0][1]  # row-major


def test_split_returns_each_tile_resized_in_order():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    tiler = Tiler(2, 2, (50, 75))
    tiles = tiler.split(frame)
    assert tiles.shape == (4, 50, 75, 3) and tiles.dtype == np.uint8
    for tile, (x, y, w, h) in zip(tiles, tiler.boxes(frame.shape)):
        expected = cv2.resize(frame[y:y + h, x:x + w], (75, 50), interpolation=cv2.INTER_AREA)  # whole factors
        assert np.array_equal(tile, expected)
        assert np.array_equal(tile, resize_to(frame[y:y + h, x:x + w], (50, 75)))  # what fit feeds the model


def smooth_frame_with_noise(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A camera-like frame: smooth shading, a few sharp-edged shapes and sensor noise (sigma 6 levels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    frame = 90 + 60 * np.sin(xx / 97.0) * np.cos(yy / 71.0)
    for _ in range(12):
        x, y, r = rng.integers(0, shape[1]), rng.integers(0, shape[0]), rng.integers(5, 80)
        frame[(xx - x) ** 2 + (yy - y) ** 2 < r * r] += rng.uniform(-60, 60)
    frame += rng.normal(0, 6, shape)
    return np.repeat(np.clip(frame, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


@pytest.mark.parametrize("shape, size", [((512, 640), (256, 256)), ((1024, 1280), (256, 256)),
                                         ((900, 900), (256, 256)), ((341, 427), (256, 256)), ((600, 100), (256, 256))])
def test_resize_to_is_an_area_average_close_to_one_area_resize(shape, size):
    """Shrinks of 2x or more go through whole-number blocks first (OpenCV's fast area path): the model's
    input stays within camera noise of a single area resize, and is exactly it where no such step is needed."""
    frame = smooth_frame_with_noise(shape)
    fast = resize_to(frame, size)
    one_step = cv2.resize(frame, size[::-1], interpolation=cv2.INTER_AREA)
    assert fast.shape == one_step.shape == (*size, 3) and fast.dtype == np.uint8
    diff = np.abs(fast.astype(np.int16) - one_step)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, (diff.mean(), np.percentile(diff, 99))
    whole = shape[0] % size[0] == 0 and shape[1] % size[1] == 0
    one_axis_grows = shape[0] < size[0] or shape[1] < size[1]
    if whole or one_axis_grows or max(shape[0] // size[0], shape[1] // size[1]) < 2:
        assert diff.max() == 0
    out = np.empty_like(fast)
    assert resize_to(frame, size, dst=out) is out and np.array_equal(out, fast)


def test_stitch_places_each_map_in_its_tile():
    tiler = Tiler(2, 2, (8, 8))
    maps = np.stack([np.full((8, 8), float(i), np.float32) for i in range(4)])
    full = tiler.stitch(maps, (40, 60, 3))
    assert full.shape == (40, 60) and full.dtype == np.float32
    assert full[5, 5] == 0 and full[5, 55] == 1 and full[35, 5] == 2 and full[35, 55] == 3


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.3])
def test_stitch_resizes_each_map_bilinearly_into_its_box(scale):
    """Maps are resized straight into their place in the stitched map: the same values as resizing each
    map on its own and pasting it, at the full and at a published scale."""
    tiler = Tiler(2, 3, (16, 24))
    maps = np.random.default_rng(1).random((6, 16, 24), dtype=np.float32)
    shape = (101, 157, 3)
    full = tiler.stitch(maps, shape, scale)
    height, width = max(1, round(101 * scale)), max(1, round(157 * scale))
    assert full.shape == (height, width)
    expected = np.zeros((height, width), np.float32)
    for tile_map, (x, y, w, h) in zip(maps, tiler.boxes(shape)):
        x0, y0 = round(x * scale), round(y * scale)
        x1, y1 = round((x + w) * scale), round((y + h) * scale)
        expected[y0:y1, x0:x1] = cv2.resize(tile_map, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(full, expected)


def test_stitch_copies_maps_already_at_their_box_size():
    tiler = Tiler(2, 2, (20, 30))
    maps = np.random.default_rng(2).random((4, 20, 30), dtype=np.float32)
    full = tiler.stitch(maps, (40, 60, 3))
    np.testing.assert_array_equal(full, np.block([[maps[0], maps[1]], [maps[2], maps[3]]]))


def test_overlaps_are_averaged():
    tiler = Tiler(1, 2, (10, 10), tile_size=(10, 10), stride=(10, 6))
    boxes = tiler.boxes((10, 16))
    assert boxes == [(0, 0, 10, 10), (6, 0, 10, 10)]
    full = tiler.stitch(np.stack([np.full((10, 10), 1.0, np.float32), np.full((10, 10), 3.0, np.float32)]), (10, 16))
    assert np.all(full[:, :6] == 1) and np.all(full[:, 6:10] == 2) and np.all(full[:, 10:] == 3)


def test_tile_size_without_stride_spreads_tiles_edge_to_edge():
    tiler = Tiler(2, 3, (32, 32), tile_size=(60, 80))
    boxes = tiler.boxes((100, 200))
    assert np.all(covered(boxes, (100, 200)) >= 1)
    assert boxes[0][:2] == (0, 0) and boxes[-1][0] + boxes[-1][2] == 200 and boxes[-1][1] + boxes[-1][3] == 100


def test_roi_limits_inspection_and_heatmap():
    tiler = Tiler(2, 2, (16, 16), roi=(10, 20, 40, 30))
    boxes = tiler.boxes((100, 100))
    assert min(b[0] for b in boxes) == 10 and max(b[0] + b[2] for b in boxes) == 50
    assert min(b[1] for b in boxes) == 20 and max(b[1] + b[3] for b in boxes) == 50
    full = tiler.stitch(np.ones((4, 16, 16), np.float32), (100, 100))
    assert full[20:50, 10:50].min() == 1.0
    assert full.sum() == pytest.approx(40 * 30)  # everything outside the ROI is 0


def test_split_then_stitch_reconstructs_a_smooth_image():
    yy, xx = np.mgrid[0:120, 0:160].astype(np.float32)
    gray = (yy + xx) / 280.0
    frame = np.repeat((gray * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    tiler = Tiler(3, 4, (40, 40), tile_size=(50, 50))
    maps = tiler.split(frame)[..., 0].astype(np.float32) / 255.0
    back = tiler.stitch(maps, frame.shape)
    assert np.abs(back - gray).max() < 0.03


def test_boxes_follow_the_frame_size():
    tiler = Tiler(2, 2, (32, 32))
    assert tiler.boxes((100, 100))[-1] == (50, 50, 50, 50)
    assert tiler.boxes((200, 100))[-1] == (50, 100, 50, 100)


@pytest.mark.parametrize("rows, tile_size, frame, expected", [
    (2, None, (1024, 1280), 0.5),        # 512 model pixels down 1024 frame rows (and 512 across 1280)
    (1, None, (1024, 1280), 0.25),       # one whole-frame tile
    (4, None, (1024, 1280), 1.0),        # 256x320 tiles: upscaled rows, so the frame's own size
    (2, None, (200, 200), 1.0),          # tiles smaller than the input: never above 1
    (1, None, (20000, 20000), 0.05),     # never below the config's floor
    (3, (640, 640), (1024, 1280), 0.4),  # overlapping tiles of a set size: their own shrink factor
])
def test_detail_scale_is_one_map_pixel_per_model_pixel(rows, tile_size, frame, expected):
    tiler = Tiler(rows, rows, (256, 256), tile_size=tile_size)
    assert tiler.detail_scale(frame) == pytest.approx(expected)
    maps = np.ones((rows * rows, 256, 256), np.float32)
    heatmap = tiler.stitch(maps, frame, expected)
    assert heatmap.shape == (round(frame[0] * expected), round(frame[1] * expected))


@pytest.mark.parametrize("rows, sigma, expected", [
    (2, 4.0, 0.25),     # the default blur: nothing finer than 2 model pixels, so half the unblurred detail
    (4, 4.0, 0.5),
    (2, 1.0, 0.5),      # a light blur keeps one pixel per model pixel
    (2, 0.0, 0.5),      # no blur (or a format-2 bundle that does not say): as without it
    (1, 8.0, 0.0625),
    (1, 40.0, 0.05),    # never below the floor
])
def test_detail_scale_follows_the_maps_blur(rows, sigma, expected):
    assert Tiler(rows, rows, (256, 256)).detail_scale((1024, 1280), sigma) == pytest.approx(expected)


def test_a_blurred_map_sent_at_its_detail_loses_about_one_grey_level():
    """What auto's sigma/2 rule costs: a map blurred like the graphs' (sigma 4) with a sharp defect (peak 191 of
    255), kept every 2 pixels and bilinearly upsampled back, is within 3 grey levels of the full map (mean
    0.18); kept every 8 pixels it is off by up to 49."""
    from edge_inspector.core.render import heatmap_to_u8

    rng = np.random.default_rng(3)
    low = np.abs(rng.normal(0, 1, (32, 32))).astype(np.float32)
    low[10:12, 20:22] += 6.0  # a defect
    full = cv2.GaussianBlur(cv2.resize(low, (256, 256), interpolation=cv2.INTER_LINEAR), (0, 0), 4.0)
    def round_trip(step: int) -> np.ndarray:
        small = cv2.resize(full, (256 // step, 256 // step), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (256, 256), interpolation=cv2.INTER_LINEAR)
    reference = heatmap_to_u8(full, 1.0, 8.0).astype(int)
    kept = np.abs(heatmap_to_u8(round_trip(2), 1.0, 8.0).astype(int) - reference)
    coarse = np.abs(heatmap_to_u8(round_trip(8), 1.0, 8.0).astype(int) - reference)
    assert reference.max() > 150 and kept.max() <= 4 and kept.mean() < 0.25
    assert coarse.max() > 3 * max(1, kept.max())


@pytest.mark.parametrize("kwargs, shape, message", [
    ({"roi": (50, 50, 100, 100)}, (120, 120), "tiling.roi"),
    ({"tile_size": (20, 20)}, (100, 100), "leave gaps"),
    ({"tile_size": (200, 20)}, (100, 100), "exceed"),
    ({"tile_size": (50, 50), "stride": (40, 40)}, (100, 100), "need 130 pixels"),
])
def test_geometry_errors_name_the_setting(kwargs, shape, message):
    with pytest.raises(ConfigError, match=message):
        Tiler(3, 3, (32, 32), **kwargs).boxes(shape)


def test_rejects_wrong_frames_and_map_counts():
    tiler = Tiler(2, 2, (16, 16))
    with pytest.raises(ConfigError, match="uint8 HxWx3"):
        tiler.split(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="expected 4 maps"):
        tiler.stitch(np.zeros((3, 16, 16), np.float32), (32, 32))
