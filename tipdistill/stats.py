"""Intervals over seeds and the verdict rule, shared by the report tables and the claim verdicts.

Every interval is a two-sided 95% Student-t interval for a mean: m ± t(0.975, n-1) · s / √n, with s
the sample standard deviation (ddof=1). With a handful of seeds the t quantile (12.71 at n=2, 4.30 at
n=3, 2.78 at n=5) is what keeps the interval honest; the normal 1.96 would shrink it 2-6x.

A difference between two configurations is paired over the seeds both have (same seed: same initial
student, same training prompts, same evaluation samples), so the seed-to-seed spread they share
cancels. Only where fewer than two seeds are shared does it fall back to Welch's unpaired interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

LEVEL = 0.95

SUPPORTED = "supported"
NOT_CONTRADICTED = "not contradicted"
CONTRADICTED = "contradicted"
NO_DATA = "no data"

VERDICT_RULE = (
    "A claim is a statement that a difference d = A - B (the claimed winner minus the other side) lies above a "
    "bound b (0 unless stated). With the 95% interval [lo, hi] of d: **supported** when lo > b (the interval "
    "excludes b in the claimed direction), **contradicted** when hi < b (it excludes b the other way), "
    "**not contradicted** when it contains b, **no data** when fewer than two seeds exist on a side. "
    "A claim made of several comparisons is contradicted if any of them is, has no data if any lacks data, "
    "is supported only if all are, and is not contradicted otherwise. No correction for multiple "
    "comparisons is applied: with many rows, expect about one in forty to exclude b in a given direction by chance."
)


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% interval over `n` values; lo/hi are NaN when n < 2."""

    mean: float
    lo: float
    hi: float
    n: int
    kind: str = "mean"  # mean | paired | welch

    @property
    def defined(self) -> bool:
        return self.n >= 2 and math.isfinite(self.lo) and math.isfinite(self.hi)


def t_quantile(dof: float, level: float = LEVEL) -> float:
    """The two-sided Student-t quantile, e.g. 4.303 for dof=2 at 95%."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))


def _finite(values: Iterable[float]) -> np.ndarray:
    x = np.asarray([float(v) for v in values], dtype=float)
    return x[np.isfinite(x)]


def t_interval(values: Iterable[float], level: float = LEVEL, kind: str = "mean") -> Interval:
    """Mean and Student-t interval of the finite values (NaNs are runs without that metric)."""
    x = _finite(values)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, kind)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, kind)
    half = t_quantile(n - 1, level) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, kind)


def paired_difference(a_by_seed: Mapping, b_by_seed: Mapping, level: float = LEVEL) -> Interval:
    """Interval of mean(a - b) over the seeds both sides have (n = number of shared seeds)."""
    seeds = sorted(s for s in set(a_by_seed) & set(b_by_seed)
                   if math.isfinite(a_by_seed[s]) and math.isfinite(b_by_seed[s]))
    return t_interval([a_by_seed[s] - b_by_seed[s] for s in seeds], level, kind="paired")


def welch_difference(a: Iterable[float], b: Iterable[float], level: float = LEVEL) -> Interval:
    """Unpaired interval of mean(a) - mean(b) without assuming equal variances (n = the smaller side)."""
    from scipy.stats import ttest_ind

    xa, xb = _finite(a), _finite(b)
    n = min(len(xa), len(xb))
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "welch")
    mean = float(xa.mean() - xb.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, "welch")
    if xa.std(ddof=1) == 0 and xb.std(ddof=1) == 0:  # no spread at all: scipy divides by zero
        return Interval(mean, mean, mean, n, "welch")
    ci = ttest_ind(xa, xb, equal_var=False).confidence_interval(level)
    return Interval(mean, float(ci.low), float(ci.high), n, "welch")


def difference(a_by_seed: Mapping, b_by_seed: Mapping, level: float = LEVEL) -> Interval:
    """a - b: paired over shared seeds when at least two are shared, else Welch over all seeds."""
    paired = paired_difference(a_by_seed, b_by_seed, level)
    if paired.n >= 2:
        return paired
    return welch_difference(list(a_by_seed.values()), list(b_by_seed.values()), level)


def verdict(iv: Interval, bound: float = 0.0) -> str:
    """The rule in VERDICT_RULE for one difference `A - B > bound`."""
    if not iv.defined:
        return NO_DATA
    if iv.lo > bound:
        return SUPPORTED
    if iv.hi < bound:
        return CONTRADICTED
    return NOT_CONTRADICTED


def combine(verdicts: Iterable[str]) -> str:
    """One verdict for a claim made of several comparisons (see VERDICT_RULE)."""
    vs = list(verdicts)
    if not vs:
        return NO_DATA
    if CONTRADICTED in vs:
        return CONTRADICTED
    if NO_DATA in vs:
        return NO_DATA
    if all(v == SUPPORTED for v in vs):
        return SUPPORTED
    return NOT_CONTRADICTED
