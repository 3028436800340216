"""The operating point: what a threshold costs in escapes, when labelled defects are known.

Shared by the workstation (`edge-export fit --validation`, which records it in bundle.yaml) and the device's
offline tools (`edge-inspector replay`, which prints it for a labelled folder): pure numpy, one definition, so
the two never disagree on what "1% false rejects" means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TRADEOFF_FALSE_REJECT_RATES = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
LOUD_ESCAPE_RATE = 0.5  # a threshold that lets more than this share of known defects pass is called out


@dataclass
class OperatingPoint:
    """One threshold and what it does on labelled images (a part fails when score > threshold)."""

    threshold: float
    false_reject_rate: float  # share of good images rejected
    escape_rate: float  # share of defective images passed


def rate_above(scores: np.ndarray, threshold: float) -> float:
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.count_nonzero(scores > threshold)) / scores.size if scores.size else 0.0


def operating_point(good: np.ndarray, defects: np.ndarray, threshold: float) -> OperatingPoint:
    return OperatingPoint(float(threshold), rate_above(good, threshold), 1.0 - rate_above(defects, threshold))


def threshold_for_false_reject(good: np.ndarray, rate: float) -> float:
    """Lowest threshold (one of the good scores) that rejects at most `rate` of these good images."""
    scores = np.sort(np.asarray(good, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("no good scores")
    allowed = math.floor(rate * scores.size + 1e-9)
    return float(scores[max(scores.size - 1 - allowed, 0)])


def threshold_for_escape(defects: np.ndarray, rate: float) -> float:
    """Highest threshold that lets at most `rate` of these defective images pass (score <= threshold passes)."""
    scores = np.sort(np.asarray(defects, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("no defect scores")
    allowed = math.floor(rate * scores.size + 1e-9)
    if allowed >= scores.size:
        return float(scores[-1])
    return float(np.nextafter(scores[allowed], -np.inf))


def tradeoff_table(good: np.ndarray, defects: np.ndarray,
                   false_reject_rates: tuple[float, ...] = TRADEOFF_FALSE_REJECT_RATES) -> list[OperatingPoint]:
    """False-reject rate vs escape rate at the thresholds that reach each false-reject rate on these images."""
    return [operating_point(good, defects, threshold_for_false_reject(good, rate)) for rate in false_reject_rates]


def format_tradeoff(points: list[OperatingPoint], chosen: OperatingPoint | None = None) -> str:
    lines = [f"{'threshold':>12}{'false reject':>14}{'escape':>9}"]
    for point in ([chosen] if chosen else []) + points:
        mark = "  <- bundle threshold" if point is chosen else ""
        lines.append(f"{point.threshold:>12.6g}{100 * point.false_reject_rate:>13.1f}%"
                     f"{100 * point.escape_rate:>8.1f}%{mark}")
    return "\n".join(lines)
