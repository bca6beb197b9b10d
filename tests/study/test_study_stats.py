"""The study's statistics against hand computations, t-table values and scipy's documented example."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharpguard.errors import ConfigurationError
from sharpguard.study.stats import kendall_tau, mean_ci, welch_compare

T_975 = {1: 12.706204736174698, 2: 4.302652729749464, 4: 2.7764451051977934}  # Student t table, two-sided 95%


def test_mean_ci_matches_hand_computation():
    ci = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    s = math.sqrt(2.5)  # sample std, ddof=1
    assert ci.n == 5 and ci.mean == pytest.approx(3.0)
    assert ci.std == pytest.approx(s)
    assert ci.half_width == pytest.approx(T_975[4] * s / math.sqrt(5), rel=1e-9)
    assert (ci.low, ci.high) == pytest.approx((3.0 - ci.half_width, 3.0 + ci.half_width))


def test_mean_ci_two_values_uses_one_degree_of_freedom():
    ci = mean_ci([0.0, 2.0])
    assert ci.half_width == pytest.approx(T_975[1] * math.sqrt(2.0) / math.sqrt(2.0), rel=1e-9)


def test_mean_ci_degenerate_sizes_and_non_finite_values():
    one = mean_ci([7.0])
    assert one.mean == 7.0 and one.half_width is None and one.low is None
    empty = mean_ci([])
    assert empty.n == 0 and empty.mean is None
    dropped = mean_ci([1.0, float("nan"), 3.0, float("inf")])
    assert dropped.n == 2 and dropped.mean == pytest.approx(2.0)


def test_mean_ci_rejects_bad_level():
    with pytest.raises(ConfigurationError, match="level"):
        mean_ci([1.0, 2.0], level=1.5)


def test_mean_ci_covers_the_true_mean_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    samples = rng.normal(loc=1.0, scale=2.0, size=(4000, 3))
    covered = [ci.low <= 1.0 <= ci.high for ci in map(mean_ci, samples)]
    assert 0.935 <= np.mean(covered) <= 0.965


def test_welch_compare_hand_computation_and_scipy_p_value():
    from scipy import stats

    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]
    c = welch_compare(a, b)
    se = math.sqrt(1 / 3 + 1 / 3)  # var/n on each side; Welch df = 4 here
    assert c.difference == pytest.approx(-3.0)
    assert c.low == pytest.approx(-3.0 - T_975[4] * se, rel=1e-9)
    assert c.high == pytest.approx(-3.0 + T_975[4] * se, rel=1e-9)
    assert c.p_value == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)


def test_welch_compare_undefined_cases():
    c = welch_compare([1.0], [2.0, 3.0])
    assert c.difference == pytest.approx(-1.5) and c.p_value is None and c.low is None
    z = welch_compare([1.0, 1.0], [2.0, 2.0])  # zero variance: the difference is certain
    assert z.difference == -1.0 and z.p_value == 0.0 and z.low == z.high == -1.0


def test_kendall_tau_perfect_concordance_and_discordance():
    x = [0.1, 0.5, 0.9, 1.3, 2.0]
    assert kendall_tau(x, [1, 2, 3, 4, 5]).tau == pytest.approx(1.0)
    assert kendall_tau(x, [5, 4, 3, 2, 1]).tau == pytest.approx(-1.0)


def test_kendall_tau_small_example_by_hand():
    # 6 pairs, one discordant (ranks 2 and 3 swapped): tau = (5 - 1) / 6. Exact null distribution of the
    # number of discordant pairs for n = 4 is 1, 3, 5, 6, 5, 3, 1 (of 24), so P(D <= 1) = 4/24, two-sided 1/3.
    r = kendall_tau([1, 2, 3, 4], [1, 3, 2, 4])
    assert r.n == 4
    assert r.tau == pytest.approx(2 / 3)
    assert r.p_value == pytest.approx(1 / 3)


def test_kendall_tau_scipy_documented_example_with_ties():
    r = kendall_tau([12, 2, 1, 12, 2], [1, 4, 7, 1, 0])
    assert r.tau == pytest.approx(-0.47140452079103173)
    assert r.p_value == pytest.approx(0.2827454599327748)


def test_kendall_tau_undefined_and_bad_input():
    assert kendall_tau([1, 2], [2, 1]).tau is None  # fewer than 3 pairs
    assert kendall_tau([1, 1, 1], [1, 2, 3]).tau is None  # constant side
    assert kendall_tau([1, 2, float("nan"), 3, 4], [1, 2, 5, 3, 4]).n == 4  # the NaN pair is dropped
    with pytest.raises(ConfigurationError, match="same length"):
        kendall_tau([1, 2, 3], [1, 2])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)), min_size=3, max_size=20))
def test_kendall_tau_laws(pairs):
    x = [a for a, _ in pairs]
    y = [b for _, b in pairs]
    r = kendall_tau(x, y)
    if r.tau is None:
        return
    assert -1.0 - 1e-12 <= r.tau <= 1.0 + 1e-12
    assert kendall_tau(y, x).tau == pytest.approx(r.tau)  # symmetric
    assert kendall_tau(x, [-b for b in y]).tau == pytest.approx(-r.tau)  # antisymmetric under negation
    # invariant to a strictly increasing transform of either side
    assert kendall_tau([a**3 + a for a in x], y).tau == pytest.approx(r.tau)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=30))
def test_mean_ci_contains_the_mean_and_shifts_with_the_data(values):
    ci = mean_ci(values)
    assert ci.low <= ci.mean <= ci.high
    shifted = mean_ci([v + 10.0 for v in values])
    assert shifted.mean == pytest.approx(ci.mean + 10.0, abs=1e-6)
    assert shifted.half_width == pytest.approx(ci.half_width, rel=1e-6, abs=1e-6)


def test_holm_and_benjamini_hochberg_by_hand():
    from sharpguard.study.stats import benjamini_hochberg, holm

    # sorted: 0.005, 0.01, 0.03, 0.04 (m = 4). Holm: 4*0.005, 3*0.01, 2*0.03, max(0.06, 1*0.04)
    assert holm([0.01, None, 0.04, 0.03, 0.005]) == pytest.approx([0.03, None, 0.06, 0.06, 0.02])
    # BH: m p_(i) / i = 0.02, 0.02, 0.04, 0.04, then the running minimum from the top
    assert benjamini_hochberg([0.01, None, 0.04, 0.03, 0.005]) == pytest.approx([0.02, None, 0.04, 0.04, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == [] and holm([None]) == [None]
    with pytest.raises(ConfigurationError, match="p-values must lie in"):
        holm([0.2, 1.5])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=25))
def test_corrections_agree_with_scipy_and_dominate_the_raw_p_values(ps):
    from scipy import stats

    from sharpguard.study.stats import benjamini_hochberg, holm

    h, bh = holm(ps), benjamini_hochberg(ps)
    assert all(a >= p - 1e-15 for a, p in zip(h, ps)) and all(a >= p - 1e-15 for a, p in zip(bh, ps))
    assert all(b <= a + 1e-12 for a, b in zip(h, bh))  # BH is never stricter than Holm
    assert bh == pytest.approx(list(stats.false_discovery_control(ps, method="bh")), abs=1e-12)
    # Holm keeps the order of the raw p-values
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    assert all(h[order[i]] <= h[order[i + 1]] + 1e-15 for i in range(len(ps) - 1))


def test_hedges_g_by_hand():
    from sharpguard.study.stats import hedges_g

    # pooled sd 1, d = -3, J = 1 - 3 / (4 * 6 - 9) = 0.8
    assert hedges_g([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(-2.4)
    assert hedges_g([1.0], [2.0, 3.0]) is None
    assert hedges_g([1.0, 1.0], [2.0, 2.0]) is None  # zero pooled variance
