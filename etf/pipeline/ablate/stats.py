"""Statistics for ablation grids: summaries over seeds, the comparison of a configuration
with its baseline, and the multiple-comparison correction across the grid.

The comparison (:func:`compare`) counts two sources of variance together. Every seed trains
the configuration and its baseline once, so the per-seed deltas vary with training
randomness; every seed is evaluated on the same test samples, so the deltas also vary with
which samples the test set happens to hold (seeds x samples are crossed, not nested). The
seed part is the variance of the per-seed deltas over the seeds; the sample part is a paired
bootstrap of the test samples (or verification folds), one draw shared by every seed and by
both runs, with the protocol metric recomputed on each draw. Their sum is the variance of
the mean delta (slightly over-estimated: the seed x sample interaction is counted in both),
tested with a t distribution whose degrees of freedom come from the Welch-Satterthwaite
formula, the seed part taken at its 90% upper confidence bound (the same delta in every seed
bounds nothing: the test then keeps the seeds' S - 1 degrees of freedom). With few seeds the
seed part has few degrees of freedom and the test is wide, as it should be, where a
bootstrap over two or three seeds would be overconfident.

Degenerate inputs never raise: undefined quantities are NaN (printed ``n/a``) and a
``note`` says why.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from etf.pipeline.ablate import CORRECTIONS

NAN = float("nan")
ALPHA = 0.05
#: the unbounded range of a delta or a metric
UNBOUNDED = (-math.inf, math.inf)
#: the confidence bound of the seed variance that sets the degrees of freedom (see compare)
SEED_BOUND = 0.9


def _clip(low: float, high: float, bounds: tuple[float, float]) -> tuple[float, float]:
    lo, hi = bounds
    return min(max(low, lo), hi), min(max(high, lo), hi)


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and two-sided t confidence interval of the mean,
    the interval clipped to the values the metric can take."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


def summarize(
    values: Sequence[float] | np.ndarray, confidence: float = 0.95, bounds: tuple[float, float] = UNBOUNDED
) -> Summary:
    """Summary over seeds; the interval needs two values (NaN with one). ``bounds``: the
    metric's range (an accuracy's interval never runs past 1)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Summary(0, NAN, NAN, NAN, NAN)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, NAN, NAN, NAN)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, *_clip(mean - half, mean + half, bounds))


@dataclass(frozen=True)
class SeedTests:
    """Seed-level paired tests (one metric value per seed, no test-sample variance) and what
    makes either undefined or unable to reach ``alpha``."""

    t: float
    wilcoxon: float
    note: str


#: differences this small are rounding (0.95 - 0.90 and 1.0 - 0.95 differ by 1e-16)
_ROUNDING = 1e-12


def _constant(d: np.ndarray) -> bool:
    return bool(np.ptp(d) <= _ROUNDING * max(1.0, float(np.abs(d).max())))


def wilcoxon_floor(n: int) -> float:
    """The smallest two-sided exact p of the Wilcoxon signed-rank test with ``n`` non-zero pairs."""
    return min(1.0, 2.0 / 2**n)


def paired_seed_tests(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, alpha: float = ALPHA
) -> SeedTests:
    """Two-sided p-values of the paired t-test and the Wilcoxon signed-rank test of ``a``
    against ``b`` (paired by seed).

    Undefined, and said so: fewer than two pairs; no difference at all; the same difference
    in every seed (the t statistic divides by a zero spread: scipy would print a p near 0).
    The note also says when the Wilcoxon test cannot go below ``alpha`` with this many seeds.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) < 2:
        return SeedTests(NAN, NAN, f"{len(d)} seed(s): no seed-level test")
    if np.all(np.abs(d) <= _ROUNDING):
        return SeedTests(NAN, NAN, "identical results in every seed")
    notes = []
    if _constant(d):
        p_t = NAN
        notes.append("the same delta in every seed: the t-test is undefined")
    else:
        p_t = float(stats.ttest_rel(a, b).pvalue)
    nonzero = int(np.count_nonzero(d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about zero differences, which it drops
        p_w = float(stats.wilcoxon(d).pvalue)
    if wilcoxon_floor(nonzero) >= alpha:
        notes.append(f"Wilcoxon cannot go below p = {wilcoxon_floor(nonzero):.3g} with {nonzero} seed(s)")
    return SeedTests(p_t, p_w, "; ".join(notes))


@dataclass(frozen=True)
class Comparison:
    """A configuration against its baseline: the mean over seeds of the per-seed metric delta,
    its confidence interval (clipped to the deltas the metric allows), the two-sided p, the
    t test's degrees of freedom and the two standard-error parts; ``note`` says what was
    degenerate."""

    seeds: int
    units: int
    delta: float
    ci_low: float
    ci_high: float
    p: float
    df: float
    se_seed: float
    se_sample: float
    note: str = ""


def compare(
    a: Sequence[np.ndarray],
    b: Sequence[np.ndarray],
    reduce: Callable[[np.ndarray], np.ndarray],
    *,
    bounds: tuple[float, float] = UNBOUNDED,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Comparison:
    """Compare a configuration with its baseline over seeds and test samples (see the module).

    ``a[s]`` and ``b[s]`` are the per-unit terms (N, q) of seed ``s``'s run and of its
    baseline, rows the same N test units (samples or folds) in the same order in every seed;
    ``reduce`` maps sums of terms (..., q) to the protocol metric (...), so the metric of any
    resample is recomputed exactly. ``bounds``: the range of a delta.
    """
    s_count = len(a)
    units = int(a[0].shape[0]) if s_count else 0
    if s_count == 0 or units == 0:
        return Comparison(s_count, units, NAN, NAN, NAN, NAN, NAN, NAN, NAN, "no seed with both runs and test samples")
    ta = np.stack([np.asarray(x, dtype=np.float64) for x in a])  # (S, N, q)
    tb = np.stack([np.asarray(x, dtype=np.float64) for x in b])
    per_seed = reduce(ta.sum(axis=1)) - reduce(tb.sum(axis=1))
    delta = float(per_seed.mean())
    if s_count == 1:
        note = "one seed: seed-to-seed variance unknown, no test (run two or more seeds)"
        return Comparison(1, units, delta, NAN, NAN, NAN, NAN, NAN, NAN, note)
    var_sample = _sample_variance(ta, tb, reduce, resamples, seed)
    var_seed = 0.0 if _constant(per_seed) else float(per_seed.var(ddof=1)) / s_count
    total = var_seed + var_sample
    same = var_seed == 0  # no spread to bound the seed variance by
    notes = (
        [f"the same delta in every seed: the test keeps the seeds' {s_count - 1} degree(s) of freedom"] if same else []
    )
    if not math.isfinite(total):
        notes.append("the metric is undefined on some resamples: no test")
        return Comparison(s_count, units, delta, NAN, NAN, NAN, NAN, NAN, NAN, "; ".join(notes))
    if total <= _ROUNDING**2:
        if abs(delta) <= _ROUNDING:
            return Comparison(s_count, units, 0.0, 0.0, 0.0, 1.0, math.inf, 0.0, 0.0, "identical results in every seed")
        notes.append("the same delta in every seed and sample: no variance, no test")
        return Comparison(s_count, units, delta, NAN, NAN, NAN, NAN, 0.0, 0.0, "; ".join(notes))
    df = s_count - 1 if same else _degrees_of_freedom(var_seed, s_count - 1, var_sample, max(units - 1, 1))
    se = math.sqrt(total)
    p = float(2 * stats.t.sf(abs(delta) / se, df))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    low, high = _clip(delta - half, delta + half, bounds)
    return Comparison(
        s_count, units, delta, low, high, p, df, math.sqrt(var_seed), math.sqrt(var_sample), "; ".join(notes)
    )


def interval(
    a: Sequence[np.ndarray],
    reduce: Callable[[np.ndarray], np.ndarray],
    *,
    bounds: tuple[float, float] = UNBOUNDED,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """The confidence interval of a configuration's mean metric over seeds, with both sources
    of variance as :func:`compare` counts them for a delta (the seeds' spread, and a bootstrap
    of the test units shared by every seed), so that two seeds that agree do not give a
    zero-width interval. ``a[s]``: seed ``s``'s per-unit terms (N, q). NaN with fewer than
    two seeds; clipped to ``bounds``, the metric's range."""
    if len(a) < 2 or not a[0].shape[0]:
        return NAN, NAN
    ta = np.stack([np.asarray(x, dtype=np.float64) for x in a])
    per_seed = reduce(ta.sum(axis=1))
    mean = float(per_seed.mean())
    var_sample = _sample_variance(ta, None, reduce, resamples, seed)
    var_seed = 0.0 if _constant(per_seed) else float(per_seed.var(ddof=1)) / len(a)
    total = var_seed + var_sample
    if not math.isfinite(total):
        return NAN, NAN
    if total <= _ROUNDING**2:
        return _clip(mean, mean, bounds)
    df = len(a) - 1 if var_seed == 0 else _degrees_of_freedom(var_seed, len(a) - 1, var_sample, ta.shape[1] - 1 or 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(total)
    return _clip(mean - half, mean + half, bounds)


def _degrees_of_freedom(var_seed: float, df_seed: int, var_sample: float, df_sample: int) -> float:
    """Welch-Satterthwaite degrees of freedom of the sum of the two variance parts, with the
    seed part at its upper :data:`SEED_BOUND` confidence bound: estimated from a few seeds it
    is often far too small by chance, and plugged in as it is it would lend a t test on two
    or three seeds many degrees of freedom it does not have (a false-positive rate up to
    2.5 alpha in simulation; with the bound, at most alpha)."""
    upper = var_seed * df_seed / float(stats.chi2.ppf(1 - SEED_BOUND, df_seed))
    return (upper + var_sample) ** 2 / (upper**2 / df_seed + var_sample**2 / df_sample)


def _sample_variance(
    ta: np.ndarray, tb: np.ndarray | None, reduce: Callable[[np.ndarray], np.ndarray], resamples: int, seed: int
) -> float:
    """Bootstrap variance of the mean delta over test units (of the mean metric without
    ``tb``): each draw of N units with replacement weighs every seed's terms and both runs'
    alike (paired, crossed)."""
    s_count, units, q = ta.shape
    rng = np.random.default_rng(seed)
    flat_a = ta.transpose(1, 0, 2).reshape(units, s_count * q)
    flat_b = None if tb is None else tb.transpose(1, 0, 2).reshape(units, s_count * q)
    means, step = [], max(1, (1 << 21) // units)  # a few million weights at a time
    uniform = np.full(units, 1.0 / units)
    for start in range(0, resamples, step):
        weights = rng.multinomial(units, uniform, size=min(step, resamples - start)).astype(np.float64)
        shape = (len(weights), s_count, q)
        d = reduce((weights @ flat_a).reshape(shape))
        if flat_b is not None:
            d = d - reduce((weights @ flat_b).reshape(shape))
        means.append(d.mean(axis=1))
    with np.errstate(invalid="ignore"):
        return float(np.concatenate(means).var(ddof=1))


def adjust(pvalues: Sequence[float] | np.ndarray, method: str = "holm") -> np.ndarray:
    """Adjusted p-values in the input order: ``holm`` (Holm-Bonferroni step-down),
    ``bonferroni`` or ``fdr_bh`` (Benjamini-Hochberg, scipy's). NaN entries (tests that
    could not be run) are not part of the family and stay NaN."""
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}")
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, NAN)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    if m == 0:
        return out
    if method == "fdr_bh":
        out[tested] = stats.false_discovery_control(p[tested], method="bh")
    elif method == "bonferroni":
        out[tested] = np.minimum(1.0, m * p[tested])
    else:
        order = tested[np.argsort(p[tested], kind="stable")]
        # the i-th smallest (0-based) is multiplied by m - i; adjusted values never decrease
        out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out
