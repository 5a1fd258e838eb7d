"""Task metrics. scikit-learn where it has them; NME, failure rate, CED-AUC and the
k-fold verification protocol otherwise.

Every function takes NumPy arrays of valid entries only (callers drop missing labels).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    mean_absolute_error,
    roc_auc_score,
    roc_curve,
)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, mean-class accuracy (mean per-class recall) and macro F1."""
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "mean_class_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def multilabel_metrics(y_true: np.ndarray, y_pred: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Mean over labels of accuracy and of binary F1, each label over its labelled samples.

    ``mask`` (N, K) marks which entries are labelled; action-unit and attribute sets often
    miss some labels per sample.
    """
    accs, f1s = [], []
    for k in range(y_true.shape[1]):
        m = mask[:, k]
        if m.any():
            accs.append(accuracy_score(y_true[m, k], y_pred[m, k]))
            f1s.append(f1_score(y_true[m, k], y_pred[m, k], zero_division=0))
    return {"mean_accuracy": float(np.mean(accs)), "mean_f1": float(np.mean(f1s))}


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MAE over all targets, and per target when there are several (e.g. yaw, pitch, roll)."""
    out = {"mae": float(mean_absolute_error(y_true.reshape(-1), y_pred.reshape(-1)))}
    if y_true.ndim == 2 and y_true.shape[1] > 1:
        out.update({f"mae_{k}": float(mean_absolute_error(y_true[:, k], y_pred[:, k])) for k in range(y_true.shape[1])})
    return out


def nme(points_true: np.ndarray, points_pred: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Per-sample normalised mean error: mean point-to-point distance over ``norm``.

    ``points_*`` are (N, K, 2); ``norm`` is (N,) (inter-ocular distance, box size, ...).
    """
    dist = np.linalg.norm(points_true - points_pred, axis=-1).mean(axis=1)
    return dist / norm


def landmark_norm(points_true: np.ndarray, given: np.ndarray | None = None) -> np.ndarray:
    """Per-sample NME normaliser: the dataset's ``nme_norm`` when it has one, else the square
    root of the ground-truth landmarks' bounding-box area; never below 1e-8."""
    if given is None:
        span = points_true.max(axis=1) - points_true.min(axis=1)
        given = np.sqrt(span[:, 0] * span[:, 1])
    return np.maximum(given, 1e-8)


#: the NME thresholds of the failure rate and the CED-AUC (the 300W and WFLW literature reports both)
LANDMARK_THRESHOLDS = (0.08, 0.1)


def landmark_metrics(
    per_sample_nme: np.ndarray, thresholds: tuple[float, ...] = LANDMARK_THRESHOLDS
) -> dict[str, float]:
    """Mean NME and, per threshold, the failure rate (NME > threshold) and the area under the
    cumulative error distribution up to it, normalised to [0, 1]."""
    errors = np.sort(per_sample_nme)
    out = {"nme": float(per_sample_nme.mean())}
    for threshold in thresholds:
        grid = np.linspace(0.0, threshold, 1001)
        ced = np.searchsorted(errors, grid, side="right") / len(errors)
        out[f"fr@{threshold:g}"] = float((per_sample_nme > threshold).mean())
        out[f"auc@{threshold:g}"] = float(np.trapezoid(ced, grid) / threshold)
    return out


#: metrics without an upper bound (errors); every other metric lies in [0, 1]
_UNBOUNDED = re.compile(r"^(mae|nme)(_.*)?$")


def metric_bounds(name: str) -> tuple[float, float]:
    """The values metric ``name`` can take: [0, inf) for errors (MAE, NME), else [0, 1]."""
    return (0.0, math.inf) if _UNBOUNDED.match(name) else (0.0, 1.0)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The score threshold (``same`` iff score >= threshold) with the highest accuracy on these pairs.

    Every distinct score is a candidate (``roc_curve`` without dropping points); accuracy at
    each is ``(TP + TN) / n``; ties go to the highest threshold.
    """
    fpr, tpr, thresholds = roc_curve(same, scores, drop_intermediate=False)
    positives = int(same.sum())
    correct = tpr * positives + (1 - fpr) * (len(same) - positives)
    return float(thresholds[int(np.argmax(correct))])


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    """True-accept rate at the largest false-accept rate not above ``far`` (no interpolation)."""
    return float(tpr[fpr <= far].max())


def verification_metrics(
    scores: np.ndarray, same: np.ndarray, folds: np.ndarray, fars: tuple[float, ...] = (1e-3, 1e-4)
) -> dict[str, Any]:
    """The LFW k-fold protocol plus ROC summaries over pair similarity ``scores``.

    For each fold the threshold that maximises accuracy on the other folds classifies the
    fold's pairs; ``accuracy_10fold`` is the mean over folds and ``accuracy_10fold_std`` their
    population std (as common LFW evaluation code reports), ``fold_accuracy`` lists them for
    paired tests. ``auc`` and ``tar@far=F`` use all pairs; a FAR is reported only when there
    are at least ``1 / F`` mismatched pairs, so that it is resolved at all.
    """
    same = same.astype(int)
    accuracy, thresholds = [], []
    for k in np.unique(folds):
        held = folds == k
        t = best_threshold(scores[~held], same[~held])
        thresholds.append(t)
        accuracy.append(float(accuracy_score(same[held], scores[held] >= t)))
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    out: dict[str, Any] = {
        "accuracy_10fold": float(np.mean(accuracy)),
        "accuracy_10fold_std": float(np.std(accuracy)),
        "auc": float(roc_auc_score(same, scores)),
    }
    negatives = int((same == 0).sum())
    for far in fars:
        if negatives * far >= 1:
            out[f"tar@far={far:.0e}".replace("e-0", "e-")] = tar_at_far(fpr, tpr, far)
    out.update(threshold=float(np.mean(thresholds)), pairs=len(same), fold_accuracy=accuracy)
    if not np.isfinite(out["threshold"]):  # a fold did best rejecting every pair (roc_curve's +inf)
        out["threshold"] = None
        out["threshold_note"] = f"{int(np.sum(~np.isfinite(thresholds)))} fold(s) chose to reject every pair"
    return out


def format_metrics(metrics: dict[str, Any]) -> str:
    """One task's metrics as ``name value`` pairs for a summary line; lists (per-fold values) left out."""
    return "  ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if not isinstance(v, list)
    )
