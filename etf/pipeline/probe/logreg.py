"""L2-regularised linear probe, as dinov2's ``eval/log_regression.py``, with the selection
CLIP_benchmark fixed: the inverse regularisation C is swept on the val split only, with each
model trained on train alone, and the one C chosen is scored once on test. Val never joins
train, and test never picks C.

Classify: multinomial logistic regression; multilabel: one binary logistic regression per
label (on the samples that have it), one C for all; regress and landmarks: ridge regression
with ``alpha = 1 / C``. Features are standardised by the training samples' statistics.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

#: the Cs swept, from strong to weak regularisation (warm starts follow this order): decades
#: of dinov2's range (1e-6 to 1e5) up to 1e3
C_GRID = tuple(float(c) for c in 10.0 ** np.arange(-6, 4))
MAX_ITER = 1000
#: features (samples x width) up to which the solver runs on one thread: on small problems
#: BLAS and OpenMP threads cost far more CPU than they save (30x measured at 6000 x 384)
ONE_THREAD = 1 << 24


class LinearProbe:
    """One C's model of one task ``kind`` (classify, multilabel or regress); predictions
    decoded as the task's heads decode them (class index, 0/1 per label, values)."""

    def __init__(self, kind: str, c: float) -> None:
        self.kind, self.c = kind, c
        self.models: list = []

    def fit(self, x: np.ndarray, y: np.ndarray, m: np.ndarray, previous: LinearProbe | None = None) -> LinearProbe:
        """Fit on standardised ``x``; ``previous`` (the last C's probe) warm-starts the solver."""
        if self.kind == "regress":
            rows = m.all(axis=1)
            self.models = [Ridge(alpha=1.0 / self.c).fit(x[rows], y[rows])]
            return self
        columns = [0] if self.kind == "classify" else range(y.shape[1])
        self.models = []
        for j in columns:
            rows = m[:, j]
            labels = y[rows, j].astype(int)
            if len(np.unique(labels)) < 2:  # a label with one value in train: that value
                self.models.append(int(labels[0]) if len(labels) else 0)
                continue
            warm = previous.models[len(self.models)] if previous is not None else None
            model = copy.deepcopy(warm) if isinstance(warm, LogisticRegression) else None
            model = model or LogisticRegression(max_iter=MAX_ITER, warm_start=True)
            model.set_params(C=self.c)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                self.models.append(model.fit(x[rows], labels))
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "regress":
            return self.models[0].predict(x).reshape(len(x), -1).astype(np.float32)
        cols = [np.full(len(x), m) if isinstance(m, int) else m.predict(x) for m in self.models]
        return np.stack(cols, axis=1).astype(np.float32)


@dataclass
class Sweep:
    """The C chosen on val, every C's val score, and the chosen probe (trained on train)."""

    c: float
    val_scores: dict[float, float]
    probe: LinearProbe


def sweep(
    kind: str,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    val_x: np.ndarray,
    val_score: Callable[[np.ndarray], float],
    cs: tuple[float, ...] = C_GRID,
) -> tuple[Sweep, StandardScaler]:
    """Fit ``train`` (features, targets, mask) at every C; ``val_score`` of the val
    predictions (higher is better; ties go to the smaller C) picks one. Returns the sweep
    and the training standardisation, which the caller applies to whatever it scores."""
    x, y, m = train
    scaler = StandardScaler().fit(x)
    xs, vs = scaler.transform(x), scaler.transform(val_x)
    best: LinearProbe | None = None
    scores: dict[float, float] = {}
    previous = None
    with threadpool_limits(1 if xs.size <= ONE_THREAD else None):
        for c in sorted(cs):
            probe = LinearProbe(kind, c).fit(xs, y, m, previous)
            scores[c] = float(val_score(probe.predict(vs)))
            if best is None or scores[c] > scores[best.c]:
                best = probe
            previous = probe
    return Sweep(best.c, scores, best), scaler
