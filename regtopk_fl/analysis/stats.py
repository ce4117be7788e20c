"""Interval estimates over repeats (seeds), with scipy.stats.

* :func:`t_interval`: the mean of independent repeats and the half-width of
  its two-sided t-interval (``scipy.stats.t``, n - 1 degrees of freedom);
* :func:`paired`: A against B paired by seed: the mean difference A - B, its
  t-interval (``scipy.stats.ttest_1samp(...).confidence_interval``), the
  paired t-test's p, the Wilcoxon signed-rank p (``scipy.stats.wilcoxon``
  with its defaults) and how many seeds A beat B in the metric's own
  direction (lower gap or loss is better, higher accuracy is better).

Nothing here is hand-rolled: every interval and p-value is scipy's.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

LEVEL = 0.95
LOWER_IS_BETTER = {"gap": True, "loss": True, "test_loss": True, "accuracy": False}


def lower_is_better(metric: str) -> bool:
    """The metric's direction: gap and loss are minimised, accuracy maximised."""
    name = metric.removeprefix("final_").removeprefix("best_").removeprefix("mean_")
    if name not in LOWER_IS_BETTER:
        raise ValueError(f"metric {metric!r}: no known direction "
                         f"(one of {', '.join(LOWER_IS_BETTER)})")
    return LOWER_IS_BETTER[name]


def _finite(values) -> np.ndarray:
    x = np.asarray(list(values), dtype=float)
    return x[np.isfinite(x)]


def t_interval(values, level: float = LEVEL):
    """(mean, half-width, n) of the finite values. The half-width is
    t_{(1+level)/2, n-1} * s / sqrt(n); NaN for fewer than two values (or
    when every value is the same, 0)."""
    x = _finite(values)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, n
    sem = float(stats.sem(x))
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1) * sem), n


def t_band(values: np.ndarray, axis: int = 0, level: float = LEVEL):
    """Vectorised :func:`t_interval` over ``axis`` of a 2-D array without NaNs:
    (mean, half-width) arrays; the half-width is NaN where n < 2."""
    x = np.asarray(values, dtype=float)
    n = x.shape[axis]
    mean = x.mean(axis=axis)
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * stats.sem(x, axis=axis)
    return mean, half


def paired(a, b, metric: str | None = None, level: float = LEVEL, lower: bool | None = None) -> dict:
    """A against B on paired values (same index = same seed).

    Returns n, mean_a, mean_b, diff_mean (A - B), ci_low, ci_high (the
    t-interval of the mean difference), p_ttest (paired t-test), p_wilcoxon
    (``scipy.stats.wilcoxon`` on the differences, its defaults: two-sided,
    zero differences dropped; NaN when fewer than one non-zero difference),
    wins / losses / ties (seeds where A was better / worse / equal by the
    metric's direction, or ``lower`` when given: lower is better). Pairs with a
    non-finite side are dropped."""
    a, b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values of unequal length: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    n = len(d)
    out = {"n": n, "mean_a": float(a.mean()) if n else math.nan,
           "mean_b": float(b.mean()) if n else math.nan,
           "diff_mean": float(d.mean()) if n else math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "p_ttest": math.nan,
           "p_wilcoxon": math.nan}
    lower = lower_is_better(metric) if lower is None else lower
    better = d < 0 if lower else d > 0
    out.update(wins=int(better.sum()), losses=int(((d != 0) & ~better).sum()),
               ties=int((d == 0).sum()))
    if n >= 2:
        if np.all(d == d[0]):  # no spread: the interval is the point itself; no t-test
            out["ci_low"] = out["ci_high"] = float(d[0])
        else:
            res = stats.ttest_1samp(d, 0.0)
            ci = res.confidence_interval(level)
            out.update(ci_low=float(ci.low), ci_high=float(ci.high), p_ttest=float(res.pvalue))
    if np.any(d != 0):
        with warnings.catch_warnings():  # small-n / ties warnings: the p is still scipy's
            warnings.simplefilter("ignore")
            try:
                out["p_wilcoxon"] = float(stats.wilcoxon(d).pvalue)
            except ValueError:
                pass
    return out
