"""Generated parts for the built-in demo and the tests: no camera and no download needed.

A machined washer on a textured conveyor belt, with small position/brightness jitter like a real fixture,
and three defect kinds a vision engineer would recognise: a scratch, a contamination spot and a missing
chunk. Each defective image comes with its exact ground-truth mask, written in the MVTec AD layout so the
same replay/evaluate code paths run on generated and on real benchmark data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

DEFECT_KINDS = ("scratch", "spot", "missing")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    noise = rng.normal(70, 6, (height, width)).astype(np.float32)
    base = np.asarray(cv2.GaussianBlur(noise, (0, 0), 1.2), np.float32)
    stripes = 4 * np.sin(np.arange(width, dtype=np.float32) / 3.0)[None, :]
    return base + stripes


def make_part(rng: np.random.Generator, size: int | tuple[int, int] = 256,
              defect: str | None = None, center: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One part image (uint8 BGR) and its defect mask (bool; all False for a good part)."""
    height, width = (size, size) if isinstance(size, int) else size
    scale = min(height, width) / 256.0
    gray = _background(rng, height, width)
    cy, cx = center if center is not None else (height / 2, width / 2)
    cy += rng.uniform(-3, 3) * scale
    cx += rng.uniform(-3, 3) * scale
    outer, inner = 80 * scale, 32 * scale
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = np.hypot(yy - cy, xx - cx)
    ring = (radius < outer) & (radius > inner)
    angle = np.arctan2(yy - cy, xx - cx)
    metal = 165 + 25 * np.cos(angle - 0.6) + 6 * np.sin(radius / (2.5 * scale))  # brushed, lit from one side
    gray = np.where(ring, metal + rng.normal(0, 3, gray.shape), gray)
    gray = gray * rng.uniform(0.95, 1.05)
    mask = np.zeros((height, width), np.uint8)
    if defect is not None:
        gray = _add_defect(rng, gray, mask, defect, (cy, cx), outer, inner, scale)
    gray = cv2.GaussianBlur(np.clip(gray, 0, 255).astype(np.float32), (0, 0), 0.7)
    tint = np.array([1.0, 0.98, 0.94], np.float32)  # slightly warm light, so colour order matters
    image = np.clip(gray[:, :, None] * tint[None, None, :], 0, 255).astype(np.uint8)
    return image, mask > 0


def _add_defect(rng, gray, mask, kind, center, outer, inner, scale):
    cy, cx = center
    theta = rng.uniform(0, 2 * np.pi)
    r = rng.uniform(inner + 10 * scale, outer - 10 * scale)
    py, px = cy + r * np.sin(theta), cx + r * np.cos(theta)
    if kind == "scratch":
        length = rng.uniform(20, 40) * scale
        phi = rng.uniform(0, np.pi)
        p0 = (int(px - length / 2 * np.cos(phi)), int(py - length / 2 * np.sin(phi)))
        p1 = (int(px + length / 2 * np.cos(phi)), int(py + length / 2 * np.sin(phi)))
        cv2.line(mask, p0, p1, 1, max(2, int(3 * scale)))
        return np.where(mask > 0, gray * 0.45, gray)
    if kind == "spot":
        axes = (int(rng.uniform(5, 10) * scale), int(rng.uniform(4, 8) * scale))
        cv2.ellipse(mask, (int(px), int(py)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
        return np.where(mask > 0, 60 + rng.normal(0, 4, gray.shape), gray)
    if kind == "missing":
        pr = outer - 4 * scale
        ey, ex = cy + pr * np.sin(theta), cx + pr * np.cos(theta)
        chunk = np.zeros_like(mask)
        cv2.circle(chunk, (int(ex), int(ey)), int(rng.uniform(12, 18) * scale), 1, -1)
        yy, xx = np.mgrid[0:gray.shape[0], 0:gray.shape[1]]
        on_part = np.hypot(yy - cy, xx - cx) < outer
        chunk &= on_part.astype(np.uint8)
        mask |= chunk
        return np.where(chunk > 0, _background(rng, *gray.shape), gray)
    raise ValueError(f"unknown defect kind {kind!r} (expected one of {', '.join(DEFECT_KINDS)})")


def write_mvtec_layout(folder: Path, make: Callable[[str | None], tuple[np.ndarray, np.ndarray]],
                       defect_kinds: tuple[str, ...], train: int, test_good: int, test_per_defect: int) -> Path:
    """Write generated images (and masks) in MVTec AD layout: `make(defect_or_None) -> (image, mask)`."""
    def save(sub: str, name: str, image: np.ndarray) -> None:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / sub / name), image)

    for i in range(train):
        save("train/good", f"{i:03d}.png", make(None)[0])
    for i in range(test_good):
        save("test/good", f"{i:03d}.png", make(None)[0])
    for kind in defect_kinds:
        for i in range(test_per_defect):
            image, mask = make(kind)
            save(f"test/{kind}", f"{i:03d}.png", image)
            save(f"ground_truth/{kind}", f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    return folder


def write_dataset(root: str | Path, train: int = 60, test_good: int = 12, test_per_defect: int = 8,
                  size: int = 256, seed: int = 0, category: str = "washer") -> Path:
    """Write a synthetic category in MVTec AD layout under root/category and return that folder."""
    rng = np.random.default_rng(seed)
    return write_mvtec_layout(Path(root) / category, lambda defect: make_part(rng, size, defect=defect),
                              DEFECT_KINDS, train, test_good, test_per_defect)
