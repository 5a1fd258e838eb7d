"""Statistics for ablation grids: summaries over seeds, paired tests against a baseline,
and Holm's correction across the grid.

Degenerate inputs (one seed, identical results, no discordant predictions) never raise:
undefined quantities are NaN, which reports print as ``n/a``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

NAN = float("nan")


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and two-sided t confidence interval of the mean."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


def summarize(values: list[float] | np.ndarray, confidence: float = 0.95) -> Summary:
    """Summary over seeds; the interval needs two values (NaN with one)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Summary(0, NAN, NAN, NAN, NAN)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, NAN, NAN, NAN)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired_seed_tests(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> tuple[float, float]:
    """Two-sided p-values of the paired t-test and the Wilcoxon signed-rank test of ``a``
    against ``b`` (paired by seed). NaN with fewer than two pairs or no difference at all."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or np.all(a == b):
        return NAN, NAN
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # precision-loss warnings when all differences are equal
        p_t = float(stats.ttest_rel(a, b).pvalue)
        try:
            p_w = float(stats.wilcoxon(a, b).pvalue)
        except ValueError:
            p_w = NAN
    return p_t, p_w


@dataclass(frozen=True)
class McNemar:
    """Discordant pairs (``b``: only the first right, ``c``: only the second right) and the
    two-sided p-value; ``method`` is ``exact`` (binomial) or ``chi2`` (continuity-corrected)."""

    b: int
    c: int
    p: float
    method: str


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray, exact_below: int = 25) -> McNemar:
    """McNemar's test of paired per-sample correctness: exact binomial while the discordant
    count is below ``exact_below``, else chi-square with continuity correction. No discordant
    pair at all is no evidence of a difference: p = 1."""
    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    n = b + c
    if n == 0:
        return McNemar(b, c, 1.0, "exact")
    if n < exact_below:
        return McNemar(b, c, float(stats.binomtest(b, n, 0.5).pvalue), "exact")
    statistic = (abs(b - c) - 1) ** 2 / n
    return McNemar(b, c, float(stats.chi2.sf(statistic, 1)), "chi2")


def paired_bootstrap(score_a: np.ndarray, score_b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value that the mean per-sample scores differ, by a paired bootstrap of the
    per-sample differences (the resampled differences are centred on the observed one)."""
    d = np.asarray(score_a, dtype=np.float64) - np.asarray(score_b, dtype=np.float64)
    if len(d) == 0:
        return NAN
    observed = d.mean()
    rng = np.random.default_rng(seed)
    extreme, step = 0, max(1, (1 << 22) // len(d))  # bounded memory: a few million indices at once
    for start in range(0, resamples, step):
        means = d[rng.integers(0, len(d), size=(min(step, resamples - start), len(d)))].mean(axis=1)
        extreme += int(np.sum(np.abs(means - observed) >= abs(observed)))
    return (1 + extreme) / (1 + resamples)


def holm(pvalues: list[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order. NaN entries (tests that could
    not be run) are not part of the family and stay NaN."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, NAN)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    if m == 0:
        return out
    order = tested[np.argsort(p[tested], kind="stable")]
    # the i-th smallest (0-based) is multiplied by m - i; adjusted values never decrease
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adjusted
    return out
