"""Statistics for the study report: means with t-based confidence intervals, a Welch comparison of two
methods with Hedges' g as its effect size, Kendall's rank correlation with its p-value, and the
multiple-comparison corrections (Holm; Benjamini-Hochberg) the report applies across every test it makes.

Everything here is plain numbers in, plain numbers out (floats, ``None`` where a quantity is undefined,
e.g. the confidence interval of a single seed), so the results go straight into ``report.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ConfigurationError


def _finite_values(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.ndim != 1:
        raise ConfigurationError(f"{what} must be a flat sequence of numbers.")
    return arr[np.isfinite(arr)]


@dataclass(frozen=True)
class MeanCI:
    """Mean of ``n`` values with a two-sided ``level`` confidence interval from Student's t distribution.

    ``half_width = t_{(1+level)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation (ddof=1).
    ``std``, ``half_width``, ``low`` and ``high`` are ``None`` when ``n < 2``; all fields are ``None``
    when ``n == 0``.
    """

    n: int
    mean: float | None
    std: float | None
    half_width: float | None
    low: float | None
    high: float | None
    level: float
    scale: str = "linear"  # "linear": t-interval of the mean; "log": t-interval on log scale (around ``center``)
    center: float | None = None  # the estimate the interval is built around: the mean, or the geometric mean

    def as_dict(self) -> dict:
        return asdict(self)


def mean_ci(values: Sequence[float], level: float = 0.95) -> MeanCI:
    """Mean and t-based confidence interval of ``values``; non-finite values are dropped."""
    if not 0.0 < level < 1.0:
        raise ConfigurationError(f"level must lie in (0, 1), got {level}; use e.g. 0.95.")
    from scipy import stats

    arr = _finite_values(values, "values")
    n = int(arr.size)
    if n == 0:
        return MeanCI(0, None, None, None, None, None, level)
    mean = float(arr.mean())
    if n == 1:
        return MeanCI(1, mean, None, None, None, None, level, center=mean)
    std = float(arr.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2.0, df=n - 1)) * std / math.sqrt(n)
    return MeanCI(n, mean, std, half, mean - half, mean + half, level, center=mean)


def bounded_mean_ci(values: Sequence[float], level: float = 0.95, bounds: tuple[float, float] = (0.0, 1.0)) -> MeanCI:
    """:func:`mean_ci` for a quantity that lies in ``bounds`` by definition (an accuracy, a probability): the
    t-interval intersected with ``bounds``. The true mean lies in ``bounds``, so the intersection keeps the
    coverage and never reports an impossible value."""
    ci = mean_ci(values, level)
    if ci.low is None:
        return ci
    lo, hi = bounds
    return MeanCI(ci.n, ci.mean, ci.std, ci.half_width, max(lo, ci.low), min(hi, ci.high), level, "linear", ci.mean)


def positive_mean_ci(values: Sequence[float], level: float = 0.95) -> MeanCI:
    """A confidence interval that respects the sign of a quantity every value of which is positive (a
    curvature, a sharpness, a time): the t-interval of ``log(values)`` mapped back, i.e. an interval for the
    geometric mean ``center = exp(mean(log x))`` that never crosses zero (the log-normal model; Limpert,
    Stahel & Abbt, BioScience 2001). Values spread over decades give a correspondingly wide interval, where a
    t-interval on the raw values would run below zero. ``half_width`` is ``None`` (the interval is not
    symmetric). If some value is zero or negative the quantity is not positive: :func:`mean_ci` is returned."""
    if not 0.0 < level < 1.0:
        raise ConfigurationError(f"level must lie in (0, 1), got {level}; use e.g. 0.95.")
    from scipy import stats

    arr = _finite_values(values, "values")
    if arr.size < 2 or (arr <= 0).any():
        return mean_ci(arr, level)
    logs = np.log(arr)
    m, s = float(logs.mean()), float(logs.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2.0, df=arr.size - 1)) * s / math.sqrt(arr.size)
    with np.errstate(over="ignore"):
        low, high = float(np.exp(m - half)), float(np.exp(m + half))
    return MeanCI(int(arr.size), float(arr.mean()), float(arr.std(ddof=1)), None, low,
                  high if math.isfinite(high) else None, level, "log", float(np.exp(m)))


@dataclass(frozen=True)
class Comparison:
    """``mean(a) - mean(b)`` with Welch's t-test (unequal variances) and its confidence interval."""

    n_a: int
    n_b: int
    mean_a: float | None
    mean_b: float | None
    difference: float | None
    low: float | None
    high: float | None
    p_value: float | None
    level: float

    def as_dict(self) -> dict:
        return asdict(self)


def welch_compare(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Comparison:
    """Compare two samples: difference of means, Welch-Satterthwaite CI and two-sided p-value.

    With fewer than two finite values on either side, or zero variance on both, only the means and their
    difference are returned (the test is undefined).
    """
    from scipy import stats

    xa, xb = _finite_values(a, "a"), _finite_values(b, "b")
    mean_a = float(xa.mean()) if xa.size else None
    mean_b = float(xb.mean()) if xb.size else None
    diff = mean_a - mean_b if mean_a is not None and mean_b is not None else None
    if xa.size < 2 or xb.size < 2:
        return Comparison(int(xa.size), int(xb.size), mean_a, mean_b, diff, None, None, None, level)
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Comparison(int(xa.size), int(xb.size), mean_a, mean_b, diff, diff, diff,
                          None if diff == 0 else 0.0, level)
    # Welch-Satterthwaite degrees of freedom.
    df = (va + vb) ** 2 / (va**2 / (xa.size - 1) + vb**2 / (xb.size - 1))
    tq = float(stats.t.ppf(0.5 + level / 2.0, df=df))
    p = float(2.0 * stats.t.sf(abs(diff) / se, df=df))
    return Comparison(int(xa.size), int(xb.size), mean_a, mean_b, diff, diff - tq * se, diff + tq * se, p, level)


@dataclass(frozen=True)
class RankCorrelation:
    """Kendall's tau-b between two paired samples with its two-sided p-value (``scipy.stats.kendalltau``)."""

    n: int
    tau: float | None
    p_value: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> RankCorrelation:
    """Kendall's tau-b of the pairs ``(x[i], y[i])`` whose both values are finite.

    ``tau`` and ``p_value`` are ``None`` when fewer than three pairs remain or one side is constant
    (the statistic is undefined there).
    """
    from scipy import stats

    xs = np.asarray([float(v) for v in x], dtype=np.float64)
    ys = np.asarray([float(v) for v in y], dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ConfigurationError(
            f"kendall_tau needs two flat sequences of the same length, got {xs.shape} and {ys.shape}."
        )
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    n = int(xs.size)
    if n < 3 or np.ptp(xs) == 0.0 or np.ptp(ys) == 0.0:
        return RankCorrelation(n, None, None)
    result = stats.kendalltau(xs, ys)
    return RankCorrelation(n, float(result.statistic), float(result.pvalue))


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Standardized mean difference ``(mean(a) - mean(b)) / s_pooled`` with Hedges' small-sample correction
    ``J = 1 - 3 / (4 (n_a + n_b) - 9)`` (Hedges & Olkin, *Statistical Methods for Meta-Analysis*, 1985, eq. 5.10).

    ``s_pooled^2 = ((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2)``. ``None`` with fewer than two finite
    values on a side or zero pooled variance (the effect is then undefined in standard-deviation units).
    """
    xa, xb = _finite_values(a, "a"), _finite_values(b, "b")
    na, nb = int(xa.size), int(xb.size)
    if na < 2 or nb < 2:
        return None
    pooled = ((na - 1) * xa.var(ddof=1) + (nb - 1) * xb.var(ddof=1)) / (na + nb - 2)
    if pooled <= 0.0:
        return None
    correction = 1.0 - 3.0 / (4.0 * (na + nb) - 9.0)
    return float(correction * (xa.mean() - xb.mean()) / math.sqrt(pooled))


def _check_p_values(p_values: Sequence[float | None]) -> list[float | None]:
    out: list[float | None] = []
    for p in p_values:
        if p is None:
            out.append(None)
            continue
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ConfigurationError(f"p-values must lie in [0, 1], got {p}; pass None for an undefined test.")
        out.append(p)
    return out


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (Holm, Scand. J. Statist. 1979), in the input order.

    With the ``m`` defined p-values sorted, ``p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``; rejecting
    where ``p~ < alpha`` controls the family-wise error rate at ``alpha`` under any dependence. ``None``
    (an undefined test) stays ``None`` and does not count in ``m``.
    """
    ps = _check_p_values(p_values)
    defined = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    m = len(defined)
    out: list[float | None] = [None] * len(ps)
    running = 0.0
    for rank, (p, i) in enumerate(defined):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def benjamini_hochberg(p_values: Sequence[float | None]) -> list[float | None]:
    """Benjamini-Hochberg adjusted p-values (J. R. Statist. Soc. B 1995), in the input order.

    ``p~_(i) = min_{j >= i} min(1, m p_(j) / j)``; rejecting where ``p~ < q`` controls the false discovery
    rate at ``q`` for independent or positively dependent tests. ``None`` stays ``None``.
    """
    ps = _check_p_values(p_values)
    defined = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    m = len(defined)
    out: list[float | None] = [None] * len(ps)
    running = 1.0
    for rank in range(m - 1, -1, -1):
        p, i = defined[rank]
        running = min(running, min(1.0, m * p / (rank + 1)))
        out[i] = running
    return out
