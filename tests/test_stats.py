"""etf.pipeline.ablate.stats and .terms: against scipy and scikit-learn, hand-computed
examples, and calibration on simulated seeds x samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sp
from sklearn.metrics import f1_score

from etf.pipeline.ablate.stats import adjust, compare, paired_seed_tests, summarize
from etf.pipeline.ablate.terms import mean_terms, sample_terms
from etf.pipeline.fit import metrics

A = [0.81, 0.83, 0.80, 0.86, 0.84]
B = [0.78, 0.80, 0.81, 0.82, 0.79]


def _accuracy(sums):
    return sums[..., 0] / sums[..., 1]


def _correct(rng, logits):
    """Per-sample correctness (N,) drawn from per-sample logits of being right."""
    return np.stack([rng.random(len(logits)) < 1 / (1 + np.exp(-logits)), np.ones(len(logits))], axis=1).astype(float)


def test_summary_matches_scipy_t_interval_and_stays_in_the_metric_range():
    s = summarize(A)
    low, high = sp.t.interval(0.95, len(A) - 1, loc=np.mean(A), scale=sp.sem(A))
    assert (s.n, s.mean, s.std) == (5, pytest.approx(np.mean(A)), pytest.approx(np.std(A, ddof=1)))
    assert (s.ci_low, s.ci_high) == (pytest.approx(low), pytest.approx(high))
    wide = summarize([0.95, 1.0], bounds=(0.0, 1.0))  # the unclipped interval is [0.63, 1.29]
    assert wide.ci_low == pytest.approx(0.975 - 12.706 * 0.025, abs=1e-3) and wide.ci_high == 1.0


def test_summary_of_one_seed_and_of_none():
    one = summarize([0.7])
    assert one.mean == 0.7 and math.isnan(one.std) and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    assert math.isnan(summarize([]).mean)
    same = summarize([0.5, 0.5, 0.5])
    assert same.std == 0 and same.ci_low == same.ci_high == 0.5


def test_paired_seed_tests_match_scipy():
    r = paired_seed_tests(A, B)
    assert r.t == pytest.approx(sp.ttest_rel(A, B).pvalue)
    assert r.wilcoxon == pytest.approx(sp.wilcoxon(A, B).pvalue)
    assert "Wilcoxon cannot go below p = 0.0625 with 5 seed(s)" in r.note  # 2 / 2**5 > 0.05


@pytest.mark.parametrize(
    "a,b,note",
    [([0.8, 0.9], [0.8, 0.9], "identical results"), ([0.8], [0.7], "1 seed(s)"), ([], [], "0 seed(s)")],
)
def test_paired_seed_tests_degenerate_cases_are_nan_and_say_why(a, b, note):
    r = paired_seed_tests(a, b)
    assert math.isnan(r.t) and math.isnan(r.wilcoxon) and note in r.note


def test_the_same_delta_in_every_seed_is_no_t_test():
    # scipy's t-test gives p = 7e-16 here (a zero spread), with its warning hidden
    r = paired_seed_tests([0.95, 1.0], [0.90, 0.95])
    assert math.isnan(r.t) and "the same delta in every seed: the t-test is undefined" in r.note
    three = paired_seed_tests([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])
    assert math.isnan(three.t)
    assert three.wilcoxon == pytest.approx(0.25)  # the smallest two-sided exact p with three pairs
    assert "Wilcoxon cannot go below p = 0.25 with 3 seed(s)" in three.note


def test_adjustments_by_hand_and_against_scipy():
    p = [0.01, 0.04, float("nan"), 0.03, 0.005]
    # Holm, sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06
    np.testing.assert_allclose(adjust(p, "holm"), [0.03, 0.06, np.nan, 0.06, 0.02])
    np.testing.assert_allclose(adjust(p, "bonferroni"), [0.04, 0.16, np.nan, 0.12, 0.02])
    # Benjamini-Hochberg, sorted: 0.005*4/1 = 0.02, 0.01*4/2 = 0.02, 0.03*4/3 = 0.04, 0.04*4/4 = 0.04
    np.testing.assert_allclose(adjust(p, "fdr_bh"), [0.02, 0.04, np.nan, 0.04, 0.02])
    np.testing.assert_allclose(adjust(p, "fdr_bh")[[0, 1, 3, 4]], sp.false_discovery_control([0.01, 0.04, 0.03, 0.005]))
    np.testing.assert_allclose(adjust([0.5, 0.6]), [1.0, 1.0])  # capped at 1, never decreasing
    assert adjust([]).shape == (0,) and np.isnan(adjust([float("nan")], "bonferroni")).all()


def test_compare_with_seed_variance_only_is_the_paired_t_test_on_the_seeds():
    """Deltas that differ between seeds but not between samples: no sample variance, so the
    test is the seed-level paired t-test (S - 1 degrees of freedom)."""
    deltas = np.array([0.10, 0.30, 0.20, 0.25])
    n = 10
    a = [np.stack([np.full(n, 0.5 + d), np.ones(n)], axis=1) for d in deltas]
    b = [np.stack([np.full(n, 0.5), np.ones(n)], axis=1) for _ in deltas]
    c = compare(a, b, _accuracy, bounds=(-1, 1))
    assert c.delta == pytest.approx(deltas.mean()) and c.se_sample == pytest.approx(0, abs=1e-12)
    assert (c.seeds, c.units, c.df) == (4, n, pytest.approx(3))
    assert c.p == pytest.approx(sp.ttest_1samp(deltas, 0).pvalue)
    half = sp.t.ppf(0.975, 3) * deltas.std(ddof=1) / 2
    assert (c.ci_low, c.ci_high) == (pytest.approx(deltas.mean() - half), pytest.approx(deltas.mean() + half))


def test_compare_with_sample_variance_only_is_the_bootstrap_of_the_shared_samples():
    """Four seeds that predict alike: the variance is the bootstrap variance of the mean
    per-sample difference, N / (N - 1) short of its textbook value; as the seeds show no
    spread to estimate theirs from, the test keeps their S - 1 degrees of freedom."""
    rng = np.random.default_rng(0)
    right_a, right_b = rng.random(400) < 0.8, rng.random(400) < 0.6
    a = [np.stack([right_a, np.ones(400)], axis=1).astype(float)] * 4
    b = [np.stack([right_b, np.ones(400)], axis=1).astype(float)] * 4
    c = compare(a, b, _accuracy, bounds=(-1, 1), resamples=4000)
    d = right_a.astype(float) - right_b
    assert c.delta == pytest.approx(d.mean()) and c.se_seed == 0
    assert c.se_sample == pytest.approx(d.std() / math.sqrt(400), rel=0.05)
    assert "the same delta in every seed" in c.note and c.df == 3
    assert c.p == pytest.approx(2 * sp.t.sf(c.delta / c.se_sample, 3)) and c.p < 0.05


def test_compare_degenerate_cases_say_so():
    same = [np.stack([np.ones(5), np.ones(5)], axis=1)] * 3
    c = compare(same, same, _accuracy)
    assert (c.delta, c.p) == (0.0, 1.0) and c.note == "identical results in every seed"
    one = compare(same[:1], [np.stack([np.zeros(5), np.ones(5)], axis=1)], _accuracy)
    assert one.delta == 1.0 and math.isnan(one.p) and "one seed" in one.note
    shift = [np.stack([np.full(5, 2.0), np.ones(5)], axis=1)] * 2
    flat = compare(shift, [np.stack([np.ones(5), np.ones(5)], axis=1)] * 2, _accuracy)
    assert flat.delta == 1.0 and math.isnan(flat.p) and "no variance" in flat.note
    assert "no seed" in compare([], [], _accuracy).note


def test_compare_interval_stays_in_the_deltas_the_metric_allows():
    rng = np.random.default_rng(3)
    a = [_correct(rng, np.full(6, 3.0)) for _ in range(2)]
    b = [_correct(rng, np.full(6, -3.0)) for _ in range(2)]
    c = compare(a, b, _accuracy, bounds=(-1, 1))
    assert c.delta > 0.5 and c.ci_high <= 1 and c.ci_low >= -1
    assert c.ci_high == 1 and -1 < c.ci_low < c.delta  # the upper end was clipped, the lower one not needed


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_calibration_no_effect_gives_yes_at_most_alpha(seeds):
    """The configuration predicts like its baseline (same per-sample difficulty), but each
    training run shifts its accuracy by a seed effect, large here: the unadjusted rate of
    p < 0.05 stays at about alpha or less, and Holm's correction over the family leaves no
    "yes". A bootstrap over seeds pooled with samples, or the seeds treated as many
    samples, goes far past alpha on these data."""
    rng = np.random.default_rng(seeds)
    p = []
    for k in range(100):
        difficulty = rng.normal(0, 1.5, 150)
        a = [_correct(rng, difficulty + rng.normal(0, 1.0)) for _ in range(seeds)]
        b = [_correct(rng, difficulty + rng.normal(0, 1.0)) for _ in range(seeds)]
        p.append(compare(a, b, _accuracy, bounds=(-1, 1), resamples=300, seed=k).p)
    p = np.array(p)
    assert np.mean(p < 0.05) <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / len(p))
    assert not (adjust(p, "holm") < 0.05).any()


def test_calibration_a_real_effect_is_found():
    rng = np.random.default_rng(7)
    found = 0
    for k in range(20):
        difficulty = rng.normal(0, 1.5, 150)
        a = [_correct(rng, difficulty + 2.0 + rng.normal(0, 0.3)) for _ in range(3)]
        b = [_correct(rng, difficulty + rng.normal(0, 0.3)) for _ in range(3)]
        c = compare(a, b, _accuracy, bounds=(-1, 1), resamples=300, seed=k)
        found += c.p < 0.05 and c.delta > 0
    assert found >= 15  # power about 0.9 (simulated: 0.88 over 200)


def test_terms_recompute_the_task_metrics():
    """reduce(sum of terms) is the metric the fit computed, for every metric ablate compares."""
    rng = np.random.default_rng(1)
    ids = [f"s{i}" for i in range(60)]
    y, p = rng.integers(0, 2, (60, 5)).astype(float), rng.integers(0, 2, (60, 5)).astype(float)
    mask = rng.random((60, 5)) > 0.3
    mask[:4] = False  # samples without any label are left out
    y[~mask] = np.nan
    keep = mask.any(axis=1)
    want = metrics.multilabel_metrics(np.nan_to_num(y[keep]).astype(int), p[keep].astype(int), mask[keep])
    for name in ("mean_f1", "mean_accuracy"):
        t = sample_terms("multilabel", name, ids, y, p, mask, None)
        assert t.value == pytest.approx(want[name]) and len(t.units) == 56
    assert sample_terms("multilabel", "mean_f1", ids, y, p, mask, None).value == pytest.approx(
        np.mean([f1_score(np.nan_to_num(y[mask[:, k], k]), p[mask[:, k], k], zero_division=0) for k in range(5)])
    )
    c = sample_terms("classify", "accuracy", ids, y[:, :1], p[:, :1], mask[:, :1], None)
    assert c.value == pytest.approx(np.mean(y[mask[:, 0], 0] == p[mask[:, 0], 0]))
    yr, pr = rng.normal(size=(60, 3)), rng.normal(size=(60, 3))
    r = sample_terms("regress", "mae", ids, yr, pr, np.ones((60, 3), bool), None)
    assert r.value == pytest.approx(metrics.regression_metrics(yr, pr)["mae"])
    pts, noise = rng.uniform(0, 50, (60, 68, 2)), rng.normal(size=(60, 68, 2))
    norm = rng.uniform(20, 40, 60)
    flat = lambda x: x.reshape(60, -1)  # noqa: E731
    lm = sample_terms("landmarks", "nme", ids, flat(pts), flat(pts + noise), np.ones((60, 136), bool), norm)
    assert lm.value == pytest.approx(metrics.nme(pts, pts + noise, norm).mean())
    folds = mean_terms([f"fold{k}" for k in range(10)], np.linspace(0.9, 0.99, 10))
    assert folds.value == pytest.approx(np.linspace(0.9, 0.99, 10).mean())
    assert folds.select(["fold3", "fold0"]).tolist() == [[0.93, 1.0], [0.9, 1.0]]
