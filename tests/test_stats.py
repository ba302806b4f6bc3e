"""Intervals and verdicts on hand-computable numbers; the t quantiles are the printed table values."""

from __future__ import annotations

import math

import pytest

from tipdistill.stats import (CONTRADICTED, NO_DATA, NOT_CONTRADICTED, SUPPORTED, Interval, combine, difference,
                              paired_difference, t_interval, verdict, welch_difference)

# Student-t table, two-sided 95%: t(0.975, dof)
T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764}


def test_t_interval_by_hand():
    iv = t_interval([0.6, 0.7, 0.8])  # mean 0.7, s = 0.1, se = 0.1 / sqrt(3)
    half = T975[2] * 0.1 / math.sqrt(3)  # 0.2484
    assert iv.n == 3 and iv.mean == pytest.approx(0.7)
    assert iv.lo == pytest.approx(0.7 - half, abs=1e-4) and iv.hi == pytest.approx(0.7 + half, abs=1e-4)
    two = t_interval([0.5, 0.7])  # s = sqrt(0.02), se = 0.1: half = 12.706 * 0.1
    assert (two.lo, two.hi) == (pytest.approx(0.6 - 1.27062, abs=1e-4), pytest.approx(0.6 + 1.27062, abs=1e-4))


def test_t_interval_edges():
    one = t_interval([0.4, math.nan])  # NaN = a run without the metric: ignored
    assert one.n == 1 and one.mean == pytest.approx(0.4) and math.isnan(one.lo) and not one.defined
    assert t_interval([]).n == 0 and math.isnan(t_interval([]).mean)
    flat = t_interval([0.3, 0.3, 0.3])
    assert (flat.lo, flat.hi) == (pytest.approx(0.3), pytest.approx(0.3))


def test_paired_uses_only_shared_seeds_and_beats_unpaired_spread():
    full = {0: 0.60, 1: 0.70, 2: 0.80, 3: 0.90}  # seed 3 has no partner
    rule = {0: 0.55, 1: 0.70, 2: 0.70, 5: 0.10}  # seed 5 neither
    iv = paired_difference(rule, full)  # diffs -0.05, 0, -0.10: mean -0.05, s 0.05
    half = T975[2] * 0.05 / math.sqrt(3)
    assert iv.n == 3 and iv.kind == "paired" and iv.mean == pytest.approx(-0.05)
    assert iv.lo == pytest.approx(-0.05 - half, abs=1e-4) and iv.hi == pytest.approx(-0.05 + half, abs=1e-4)
    # the shared seed-to-seed spread cancels: narrower than either group's own interval
    assert iv.hi - iv.lo < t_interval([0.6, 0.7, 0.8]).hi - t_interval([0.6, 0.7, 0.8]).lo


def test_welch_by_hand_and_the_fallback():
    # a = 0,1,2 and b = 1,2,3: both variances 1, se = sqrt(2/3), Welch dof = (2/3)^2 / (2 * (1/3)^2 / 2) = 4
    iv = welch_difference([0, 1, 2], [1, 2, 3])
    half = T975[4] * math.sqrt(2 / 3)
    assert iv.mean == pytest.approx(-1) and iv.lo == pytest.approx(-1 - half, abs=1e-3) and iv.hi == pytest.approx(-1 + half, abs=1e-3)
    # fewer than two shared seeds: unpaired; two or more: paired
    assert difference({0: 0, 1: 1, 2: 2}, {3: 1, 4: 2, 5: 3}).kind == "welch"
    assert difference({0: 0, 1: 1, 2: 2}, {0: 1, 1: 2, 5: 3}).kind == "paired"
    assert not difference({0: 0.5}, {0: 0.4}).defined  # one seed each: no interval


@pytest.mark.parametrize("lo, hi, bound, expected", [
    (0.01, 0.05, 0.0, SUPPORTED),          # excludes 0 in the claimed direction
    (-0.05, -0.01, 0.0, CONTRADICTED),     # excludes 0 the other way
    (-0.02, 0.03, 0.0, NOT_CONTRADICTED),  # contains 0
    (0.0, 0.03, 0.0, NOT_CONTRADICTED),    # touching the bound is not excluding it
    (-0.015, 0.01, -0.02, SUPPORTED),      # "nearly matches": above -0.02 throughout
    (-0.05, -0.03, -0.02, CONTRADICTED),
    (-0.03, 0.01, -0.02, NOT_CONTRADICTED),
])
def test_verdict_rule(lo, hi, bound, expected):
    assert verdict(Interval((lo + hi) / 2, lo, hi, 3), bound) == expected


def test_verdict_without_interval_and_combined():
    assert verdict(Interval(0.1, math.nan, math.nan, 1)) == NO_DATA
    assert verdict(Interval(math.nan, math.nan, math.nan, 0)) == NO_DATA
    assert combine([SUPPORTED, SUPPORTED]) == SUPPORTED
    assert combine([SUPPORTED, NOT_CONTRADICTED]) == NOT_CONTRADICTED
    assert combine([SUPPORTED, NO_DATA]) == NO_DATA
    assert combine([NO_DATA, CONTRADICTED, SUPPORTED]) == CONTRADICTED
    assert combine([]) == NO_DATA
