"""Exact (Clopper-Pearson) 95% confidence intervals for a rate of k events in n trials, without scipy.

Why exact and not the normal approximation: the rates that matter here are small (a few escapes among a few
dozen defects), where the normal interval goes below 0 and undercovers. The bounds solve
P(X >= k | p_low) = alpha/2 and P(X <= k | p_high) = alpha/2 by bisection on the binomial tail, summed in
log space (n up to tens of thousands stays exact to 1e-12).
"""

from __future__ import annotations

import math


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _bisect(function, target: float, increasing: bool) -> float:
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if (function(middle) < target) == increasing:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) bounds of the rate k / n; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else _bisect(lambda p: 1.0 - binomial_cdf(k - 1, n, p), alpha / 2, increasing=True)
    high = 1.0 if k == n else _bisect(lambda p: binomial_cdf(k, n, p), alpha / 2, increasing=False)
    return low, high


def format_rate(k: int, n: int) -> str:
    """'4.1% (2 of 49; 95% CI 0.5-14.0%)'."""
    if n == 0:
        return "unknown (0 images)"
    low, high = clopper_pearson(k, n)
    return f"{100 * k / n:.1f}% ({k} of {n}; 95% CI {100 * low:.1f}-{100 * high:.1f}%)"
