"""Heatmap -> picture: the 8-bit scale shared by the wire, the archive and replay overlays.

One scale everywhere: 255 is `full_scale` x threshold, so the threshold sits at 255 / full_scale whatever
tool draws it, and an operator reads the same colours in the live view, the archive and a replay overlay.
"""

from __future__ import annotations

import cv2
import numpy as np

# Heatmaps are smooth: one fixed SUB filter + run-length zlib encodes ~5x faster than OpenCV's default
# adaptive filtering, at about the same size (measured on a 1280x1024 map: 20 vs 104 ms, 205 vs 227 kB).
PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.10 lets us pick the filter
    PNG_FAST += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]


def heatmap_to_u8(heatmap: np.ndarray, threshold: float, full_scale: float) -> np.ndarray:
    """Raw-score heatmap -> uint8 where 255 is `full_scale` x threshold (so threshold = 255 / full_scale)."""
    scale = 255.0 / (threshold * full_scale)
    # One saturating pass (anomaly maps are >= 0, so the absolute value changes nothing).
    return cv2.convertScaleAbs(heatmap, alpha=scale)


def heatmap_size(frame_shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """(width, height) of the published heatmap: the frame's, times publish.heatmap_scale."""
    height, width = frame_shape[:2]
    return max(1, round(width * scale)), max(1, round(height * scale))


VERDICT_COLOURS = {"pass": (60, 180, 60), "review": (216, 91, 142), "fail": (40, 40, 230)}  # BGR: green, violet, red


def overlay_image(image: np.ndarray, heatmap: np.ndarray, threshold: float, score: float | None = None,
                  verdict: str | None = None, label: str | None = None) -> np.ndarray:
    """What an engineer looks at first: the heatmap blended on the image, the defect outlined, the verdict.

    Colours (JET): blue = far below the threshold, green/yellow = approaching it, red = at or over twice
    the threshold. White outline: every region whose score is over the threshold. Banner (when a score is
    given): PASS/FAIL, the score as a multiple of the threshold (1.00x is the threshold), the raw score and
    threshold, and `label` (replay gives the file name) on a second line, on a strip above the picture, so the
    picture is taller by the strip and none of it is hidden. The picture keeps the image's own resolution.
    """
    colour = cv2.applyColorMap(heatmap_to_u8(heatmap, threshold, 2.0), cv2.COLORMAP_JET)
    out = cv2.addWeighted(image, 0.6, colour, 0.4, 0)
    contours, _ = cv2.findContours((heatmap > threshold).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    if score is not None:
        out = _with_verdict(out, score, threshold, verdict or ("fail" if score > threshold else "pass"), label)
    return out


def _with_verdict(image: np.ndarray, score: float, threshold: float, verdict: str,
                  label: str | None = None) -> np.ndarray:
    """The picture under a strip in the verdict's colour, text sized to the image (256 px and 5 MP alike).

    The banner used to be drawn over the top-left corner, where it hid a defect region on a fryum overlay
    (replay of VisA fryum, 000.png: an outline at 0,0 under the banner). The verdict is the decision's (a
    score over the threshold still passes when no region reaches min_defect_area), so the banner never
    contradicts the verdict the line would give. Every line of text is shrunk to the picture's width, so a
    long file name on a 256 px part is small rather than cut off.
    """
    lines = [f"{verdict.upper()} {score / threshold:.2f}x  score {score:.4g} / threshold {threshold:.4g}"]
    if label:
        lines.append(label)
    width = image.shape[1]
    scale = max(0.4, min(image.shape[:2]) / 400.0)
    thickness = max(1, round(scale * 2))
    # The strip's height from one reference text, so every overlay of a folder has the same size.
    (_, height), baseline = cv2.getTextSize("PASS FAIL 0.00x", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(2, round(4 * scale))
    row = height + baseline + pad
    strip = np.empty((pad + row * len(lines), width, 3), np.uint8)
    strip[:] = VERDICT_COLOURS.get(verdict, (90, 90, 90))
    for i, text in enumerate(lines):
        (text_width, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        fit = min(scale, scale * (width - 2 * pad) / max(text_width, 1))
        cv2.putText(strip, text, (pad, pad + height + i * row), cv2.FONT_HERSHEY_SIMPLEX, fit, (255, 255, 255),
                    max(1, min(thickness, round(fit * 2))), cv2.LINE_AA)
    return np.vstack([strip, image])
