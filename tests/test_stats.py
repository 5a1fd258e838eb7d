"""etf.pipeline.ablate.stats against scipy and against hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sp

from etf.pipeline.ablate.stats import holm, mcnemar, paired_bootstrap, paired_seed_tests, summarize

A = [0.81, 0.83, 0.80, 0.86, 0.84]
B = [0.78, 0.80, 0.81, 0.82, 0.79]


def test_summary_matches_scipy_t_interval():
    s = summarize(A)
    low, high = sp.t.interval(0.95, len(A) - 1, loc=np.mean(A), scale=sp.sem(A))
    assert (s.n, s.mean, s.std) == (5, pytest.approx(np.mean(A)), pytest.approx(np.std(A, ddof=1)))
    assert (s.ci_low, s.ci_high) == (pytest.approx(low), pytest.approx(high))


def test_summary_of_one_seed_and_of_none():
    one = summarize([0.7])
    assert one.mean == 0.7 and math.isnan(one.std) and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    assert math.isnan(summarize([]).mean)
    same = summarize([0.5, 0.5, 0.5])
    assert same.std == 0 and same.ci_low == same.ci_high == 0.5


def test_paired_seed_tests_match_scipy():
    p_t, p_w = paired_seed_tests(A, B)
    assert p_t == pytest.approx(sp.ttest_rel(A, B).pvalue)
    assert p_w == pytest.approx(sp.wilcoxon(A, B).pvalue)


@pytest.mark.parametrize("a,b", [([0.8, 0.9], [0.8, 0.9]), ([0.8], [0.7]), ([], [])])
def test_paired_seed_tests_degenerate_cases_are_nan(a, b):
    assert all(math.isnan(p) for p in paired_seed_tests(a, b))


def test_paired_seed_tests_constant_difference_does_not_crash():
    p_t, p_w = paired_seed_tests([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])
    assert p_w == pytest.approx(0.25)  # the smallest two-sided exact p with three pairs
    assert math.isnan(p_t) or p_t < 1e-6


def test_mcnemar_exact_by_hand():
    # 3 samples only the first model gets right, 9 only the second: n = 12 discordant pairs.
    a = np.array([1] * 3 + [0] * 9 + [1] * 20 + [0] * 5, bool)
    b = np.array([0] * 3 + [1] * 9 + [1] * 20 + [0] * 5, bool)
    r = mcnemar(a, b)
    assert (r.b, r.c, r.method) == (3, 9, "exact")
    # two-sided exact binomial: 2 * P(X <= 3), X ~ Bin(12, 1/2)
    assert r.p == pytest.approx(2 * sum(math.comb(12, k) for k in range(4)) / 2**12)


def test_mcnemar_chi_square_by_hand():
    a = np.array([1] * 10 + [0] * 25 + [1] * 40, bool)
    b = np.array([0] * 10 + [1] * 25 + [1] * 40, bool)
    r = mcnemar(a, b)
    assert (r.b, r.c, r.method) == (10, 25, "chi2")
    statistic = (abs(10 - 25) - 1) ** 2 / 35  # 5.6
    assert r.p == pytest.approx(math.erfc(math.sqrt(statistic / 2)))  # chi-square with 1 dof
    assert mcnemar(a, a).p == 1.0  # no discordant pair


def test_holm_by_hand():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06
    got = holm([0.01, 0.04, float("nan"), 0.03, 0.005])
    np.testing.assert_allclose(got, [0.03, 0.06, np.nan, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1, never decreasing
    assert holm([]).shape == (0,) and np.isnan(holm([float("nan")])).all()


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    assert paired_bootstrap(a, a) == 1.0
    # a constant shift: every resampled mean difference equals the observed one
    assert paired_bootstrap(a + 1, a, resamples=999) == pytest.approx(1 / 1000)
    noisy = paired_bootstrap(a + 0.01 * rng.normal(size=200), a, resamples=2000)
    assert 0.05 < noisy <= 1.0
    assert math.isnan(paired_bootstrap(np.array([]), np.array([])))
