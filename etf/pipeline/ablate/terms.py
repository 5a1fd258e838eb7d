"""A task's protocol metric as a function of sums of per-sample terms.

The comparison of a configuration with its baseline resamples test samples and recomputes
the metric on each resample (:func:`etf.pipeline.ablate.stats.compare`). Every protocol
metric that ``etf ablate`` compares is a function of sums over samples: accuracy, MAE and
NME are means of a per-sample value; mean accuracy and mean F1 over labels are ratios of
per-label counts. So each sample contributes a row of terms, a resample weighs the rows,
and ``reduce`` turns the weighted sums into the metric, exactly as the fit computed it on
the whole split (:mod:`etf.pipeline.fit.metrics`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from etf.errors import EtfError
from etf.pipeline.fit.metrics import landmark_norm, nme


@dataclass(frozen=True)
class Terms:
    """Per-unit terms of a metric: ``units`` names the rows of ``values`` (N, q) (sample ids,
    or folds); ``reduce`` maps sums of rows (..., q) to the metric (...)."""

    units: list[str]
    values: np.ndarray
    reduce: Callable[[np.ndarray], np.ndarray]

    def select(self, units: list[str]) -> np.ndarray:
        """The rows of ``units``, in that order."""
        index = {u: k for k, u in enumerate(self.units)}
        return self.values[[index[u] for u in units]]

    @property
    def value(self) -> float:
        """The metric over every unit."""
        return float(self.reduce(self.values.sum(axis=0)))


def _mean(sums: np.ndarray) -> np.ndarray:
    return sums[..., 0] / sums[..., 1]


def mean_terms(units: list[str], per_unit: np.ndarray) -> Terms:
    """A metric that is the mean of a per-unit value (accuracy, MAE, NME, fold accuracy)."""
    return Terms(units, np.stack([per_unit, np.ones(len(per_unit))], axis=1), _mean)


def _mean_accuracy(sums: np.ndarray) -> np.ndarray:
    k = sums.shape[-1] // 2
    right, labelled = sums[..., :k], sums[..., k:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanmean(np.where(labelled > 0, right / labelled, np.nan), axis=-1)


def _mean_f1(sums: np.ndarray) -> np.ndarray:
    """Mean over labels with a labelled sample of binary F1 = 2TP / (2TP + FP + FN), 0 when
    there is no positive at all (scikit-learn's ``zero_division=0``)."""
    k = sums.shape[-1] // 4
    tp, fp, fn, labelled = (sums[..., i * k : (i + 1) * k] for i in range(4))
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denominator > 0, 2 * tp / denominator, 0.0)
        return np.nanmean(np.where(labelled > 0, f1, np.nan), axis=-1)


def sample_terms(
    kind: str, name: str, ids: list[str], y: np.ndarray, p: np.ndarray, mask: np.ndarray, norm: np.ndarray | None
) -> Terms:
    """Terms of metric ``name`` of a ``kind`` task from predictions: truths ``y``, predictions
    ``p`` and the mask of present truths, each (N, k) in the order of ``ids``; ``norm``
    (N,): the dataset's NME normaliser (landmarks), None when it has none.

    Samples are kept as the task's metrics keep them: classify and multilabel with any
    label present (a multilabel label counts only where labelled), regression and landmarks
    with every coordinate present.
    """
    if kind == "multilabel" and name in ("mean_accuracy", "mean_f1"):
        keep = mask.any(axis=1)
        y, p, m = y[keep] > 0.5, p[keep] > 0.5, mask[keep]
        if name == "mean_accuracy":
            values = np.concatenate([m & (y == p), m], axis=1)
            return Terms(_kept(ids, keep), values.astype(np.float64), _mean_accuracy)
        values = np.concatenate([m & y & p, m & ~y & p, m & y & ~p, m], axis=1)
        return Terms(_kept(ids, keep), values.astype(np.float64), _mean_f1)
    if kind == "classify" and name == "accuracy":
        keep = mask[:, 0]
        return mean_terms(_kept(ids, keep), (y[keep, 0] == p[keep, 0]).astype(np.float64))
    if kind == "regress" and name == "mae":
        keep = mask.all(axis=1)
        return mean_terms(_kept(ids, keep), np.abs(y[keep] - p[keep]).mean(axis=1))
    if kind == "landmarks" and name == "nme":
        keep = mask.all(axis=1)
        truth = y[keep].reshape(int(keep.sum()), -1, 2)
        scale = landmark_norm(truth, None if norm is None else norm[keep])
        return mean_terms(_kept(ids, keep), nme(truth, p[keep].reshape(truth.shape), scale))
    raise EtfError(f"etf ablate: no per-sample form of the {kind} metric {name!r}, so it cannot be compared")


def _kept(ids: list[str], keep: np.ndarray) -> list[str]:
    return [i for i, k in zip(ids, keep) if k]
