"""Generated surface textures with injected defects, for testing reconstruction models without a download.

Reconstruction models are meant for surfaces (fabric, brushed metal, grained leather) rather than placed
parts, so the synthetic washer of `export.synthetic` is not their test case. Every image here is a
fresh random instance of one texture family (random phase, orientation jitter, grain and brightness), so a
model cannot memorise pixels; it has to learn the texture. Defects are the three kinds a line sees on
surfaces: a scratch, a spot of contamination and a missing area (a hole showing the dark backing), each with
its exact ground-truth mask.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from export.synthetic import write_mvtec_layout

TEXTURES = ("fabric", "brushed", "grain")
DEFECTS = ("scratch", "spot", "missing")


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return yy, xx


def _fabric(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Woven threads: two crossing sinusoids with random phase and a slight weave angle."""
    yy, xx = _grid(height, width)
    period = rng.uniform(7.0, 8.0)
    angle = rng.uniform(-0.05, 0.05)
    u = xx * np.cos(angle) + yy * np.sin(angle) + rng.uniform(0, period)
    v = yy * np.cos(angle) - xx * np.sin(angle) + rng.uniform(0, period)
    weave = np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)
    return 125 + 35 * weave + rng.normal(0, 5, (height, width))


def _brushed(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Brushed metal: fine streaks along x (noise smeared horizontally) under a soft lighting gradient."""
    streaks = cv2.GaussianBlur(rng.normal(0, 22, (height, width)).astype(np.float32), (0, 0), sigmaX=9.0, sigmaY=0.6)
    _, xx = _grid(height, width)
    light = 15 * np.cos(xx / width * np.pi + rng.uniform(0, np.pi))
    return 150 + streaks + light


def _grain(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Leather-like grain: band-passed isotropic noise."""
    noise = rng.normal(0, 1, (height, width)).astype(np.float32)
    fine = cv2.GaussianBlur(noise, (0, 0), 1.5)
    coarse = cv2.GaussianBlur(noise, (0, 0), 4.0)
    band = fine - coarse
    return 120 + 90 * band / (band.std() + 1e-6) * 0.35


_MAKERS = {"fabric": _fabric, "brushed": _brushed, "grain": _grain}


def make_texture(rng: np.random.Generator, size: int | tuple[int, int] = 128, texture: str = "fabric",
                 defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One texture image (uint8 BGR) and its defect mask (bool; all False for a good image)."""
    if texture not in _MAKERS:
        raise ValueError(f"unknown texture {texture!r} (expected one of {', '.join(TEXTURES)})")
    height, width = (size, size) if isinstance(size, int) else size
    gray = _MAKERS[texture](rng, height, width).astype(np.float32) * rng.uniform(0.95, 1.05)
    mask = np.zeros((height, width), np.uint8)
    if defect is not None:
        gray = _inject(rng, gray, mask, defect)
    tint = np.array([0.92, 1.0, 1.06], np.float32) if texture == "fabric" else np.array([1.0, 1.0, 0.97], np.float32)
    image = np.clip(gray[:, :, None] * tint[None, None, :], 0, 255).astype(np.uint8)
    return image, mask > 0


def _inject(rng: np.random.Generator, gray: np.ndarray, mask: np.ndarray, kind: str) -> np.ndarray:
    height, width = gray.shape
    scale = min(height, width) / 128.0
    margin = int(16 * scale)
    cy, cx = rng.uniform(margin, height - margin), rng.uniform(margin, width - margin)
    if kind == "scratch":
        length, phi = rng.uniform(25, 45) * scale, rng.uniform(0, np.pi)
        dx, dy = length / 2 * np.cos(phi), length / 2 * np.sin(phi)
        cv2.line(mask, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), 1, max(2, int(2 * scale)))
        return np.where(mask > 0, gray * 0.45, gray)
    if kind == "spot":
        axes = (int(rng.uniform(5, 9) * scale), int(rng.uniform(4, 7) * scale))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
        stain = 200 + rng.normal(0, 4, gray.shape)
        return np.where(mask > 0, stain, gray)
    if kind == "missing":
        corners = rng.uniform(-1, 1, (6, 2)) * np.array([12, 12]) * scale + np.array([cx, cy])
        hull = cv2.convexHull(corners.astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 1)
        return np.where(mask > 0, 25 + rng.normal(0, 3, gray.shape), gray)
    raise ValueError(f"unknown defect kind {kind!r} (expected one of {', '.join(DEFECTS)})")


def write_texture_dataset(root: str | Path, texture: str = "fabric", train: int = 48, test_good: int = 12,
                          test_per_defect: int = 6, size: int = 128, seed: int = 0) -> Path:
    """Write one texture category in MVTec AD layout under root/texture and return that folder."""
    rng = np.random.default_rng(seed)
    return write_mvtec_layout(Path(root) / texture, lambda defect: make_texture(rng, size, texture, defect),
                              DEFECTS, train, test_good, test_per_defect)
