"""Statistics of ``rift compare``: binomial standard errors, paired differences with intervals, the Pareto front."""

from __future__ import annotations

import math
import statistics

import numpy as np


def accuracy_se(p: float, n: int) -> float:
    """Binomial standard error sqrt(p (1 - p) / n) of an accuracy p (fraction) on n images (0 when n = 0)."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else 0.0


def paired_difference(a, b, confidence: float = 0.95, per_image: bool = True) -> dict:
    """Mean of a - b with its standard error and confidence interval.

    Args:
        a, b: per-image scores of two models on the same images ([n] of 0/1, or fractions for corruption
            accuracy) when ``per_image``; else per-seed accuracies ([S], the same seeds in the same order).
        confidence: the interval's level.
        per_image: per-image paired difference, s.e. = sqrt(sum (d_i - mean)^2) / n (for 0/1 scores the
            McNemar-style sqrt(b + c - (b - c)^2 / n) / n, b and c the discordant counts), normal interval;
            else a paired t interval over the seeds, s.e. = sd(d_s) / sqrt(S) (sample sd), t with S - 1 d.o.f.

    Returns:
        {"mean", "se", "low", "high", "n", "method"} (fractions).

    Raises:
        ValueError: different lengths, no values, or one seed for the t interval.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_difference needs two equal-length 1-d score lists, got {a.shape} and {b.shape}")
    d = a - b
    n = d.size
    mean = float(d.mean())
    if per_image:
        se = float(math.sqrt(((d - mean) ** 2).sum()) / n)
        q = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
        how = "per-image paired difference, McNemar-style s.e., normal interval"
    else:
        if n < 2:
            raise ValueError("a paired t interval over seeds needs at least 2 seeds; use per_image=True for one")
        from scipy import stats

        se = float(d.std(ddof=1) / math.sqrt(n))
        q = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
        how = f"paired t over {n} seeds"
    return {"mean": mean, "se": se, "low": mean - q * se, "high": mean + q * se, "n": n, "method": how}


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (clean, robust) points no other point dominates (>= in both, > in one); equal points both stay."""
    out = []
    for i, (c, r) in enumerate(points):
        out.append(not any(c2 >= c and r2 >= r and (c2 > c or r2 > r) for j, (c2, r2) in enumerate(points) if j != i))
    return out

