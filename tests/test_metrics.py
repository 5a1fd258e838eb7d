"""Metric functions against scikit-learn and direct computation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, mean_absolute_error

from etf.pipeline.fit import metrics


def test_classification_matches_sklearn():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    m = metrics.classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["mean_class_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert m["mean_class_accuracy"] == pytest.approx(np.mean([(p[y == k] == k).mean() for k in range(4)]))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))


def test_multilabel_matches_sklearn_and_respects_the_mask():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, (100, 5)), rng.integers(0, 2, (100, 5))
    full = metrics.multilabel_metrics(y, p, np.ones_like(y, bool))
    assert full["mean_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert full["mean_accuracy"] == pytest.approx((y == p).mean())
    mask = rng.random((100, 5)) > 0.3
    part = metrics.multilabel_metrics(y, p, mask)
    want = np.mean([f1_score(y[mask[:, k], k], p[mask[:, k], k]) for k in range(5)])
    assert part["mean_f1"] == pytest.approx(want)


def test_regression_matches_sklearn():
    rng = np.random.default_rng(2)
    y, p = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    m = metrics.regression_metrics(y, p)
    assert m["mae"] == pytest.approx(mean_absolute_error(y.ravel(), p.ravel()))
    assert m["mae_1"] == pytest.approx(mean_absolute_error(y[:, 1], p[:, 1]))


def test_landmark_metrics_by_hand():
    truth = np.zeros((4, 2, 2))
    truth[:, 1, 0] = 10.0  # two points 10 px apart: normaliser 10
    pred = truth.copy()
    pred[:, :, 0] += np.array([0.0, 0.5, 1.0, 2.0])[:, None]  # shift every point by 0, .5, 1, 2 px
    per = metrics.nme(truth, pred, np.full(4, 10.0))
    np.testing.assert_allclose(per, [0.0, 0.05, 0.1, 0.2])
    m = metrics.landmark_metrics(per)
    assert m["nme"] == pytest.approx(0.0875)
    assert m["fr@0.1"] == pytest.approx(0.25)  # only 0.2 exceeds 0.1
    # CED: 1/4 at [0, .05), 2/4 at [.05, .1), 3/4 at 0.1 -> area/0.1 = (.25*.05 + .5*.05)/.1
    assert m["auc@0.1"] == pytest.approx(0.375, abs=2e-3)
    assert m["fr@0.08"] == pytest.approx(0.5)  # 0.1 and 0.2 exceed 0.08
    # CED: 1/4 at [0, .05), 2/4 at [.05, .08] -> area/0.08 = (.25*.05 + .5*.03)/.08
    assert m["auc@0.08"] == pytest.approx(0.34375, abs=2e-3)
    assert list(m) == ["nme", "fr@0.08", "auc@0.08", "fr@0.1", "auc@0.1"]
