"""Tasks and their heads: targets from dataset labels, losses with missing labels masked,
predictions and metrics.

A task string is ``KIND:ARG[?key=value&...]``: ``classify:COL``, ``multilabel:C1,C2,...``,
``regress:COL[,COL...]``, ``landmarks:PREFIX`` (columns ``PREFIX<i>_x``/``PREFIX<i>_y``;
NME normalised by the ``nme_norm`` column when present, else by the square root of the
ground-truth landmarks' bounding-box area; Wing loss by default, see :class:`Landmarks`), ``verify:COL`` (identity embeddings, see
:mod:`etf.pipeline.fit.verification`). Registered in :data:`TASKS`, like the fusers; the
options after ``?`` are the task's own (:attr:`Task.options`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from etf.data import labels
from etf.data.base import Dataset
from etf.errors import EtfError
from etf.pipeline.fit import metrics
from etf.pipeline.fit.config import LANDMARK_LOSSES, LANDMARK_UNITS

TASKS: dict[str, type[Task]] = {}


def register_task(kind: str) -> Callable[[type[Task]], type[Task]]:
    def deco(cls: type[Task]) -> type[Task]:
        TASKS[kind] = cls
        cls.kind = kind
        return cls

    return deco


class Head(nn.Module):
    """A linear read-out; with per-query inputs (B, Q, d) each query gets its own weights.

    Q-Face style fusers give one query per task (Q = 1) or per label (Q = outputs).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 2:
            return self.linear(h)
        if h.shape[1] == 1:
            return self.linear(h[:, 0])
        # one output per query: row q of the weight reads query q
        return torch.einsum("bqd,qd->bq", h, self.linear.weight) + self.linear.bias


class AuthorsHead(nn.Module):
    """The authors' task heads (models/heads/MLP.py), after their pooling: a ``classifier``
    (``SimpleClassifier``: ReLU, DropPath 0.2, BatchNorm1d, Linear) or a ``regressor``
    (``SimpleRegressor``: Dropout 0.2, Linear to 256, Linear). Per-query inputs (B, Q, d) go
    through the same layers query by query, then a :class:`Head`."""

    def __init__(self, in_dim: int, out_dim: int, kind: str) -> None:
        super().__init__()
        from timm.layers import DropPath

        if kind == "classifier":
            self.pre = nn.Sequential(nn.ReLU(), DropPath(0.2), nn.BatchNorm1d(in_dim))
        else:
            self.pre = nn.Sequential(nn.Dropout(0.2), nn.Linear(in_dim, 256))
        self.head = Head(in_dim if kind == "classifier" else 256, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 3:
            return self.head(self.pre(h.flatten(0, 1)).unflatten(0, h.shape[:2]))
        return self.head(self.pre(h))


#: channels of the landmark conv head (the authors' ``SimpleLandmarker``)
LANDMARK_WIDTH = 128


class LandmarkHead(nn.Module):
    """A conv head over a (B, C, h, w) map, after the authors' ``SimpleLandmarker``: 1x1 and
    3x3 convolutions at :data:`LANDMARK_WIDTH` channels, their 5x5 stride-2 and 7x7 stride-3
    convolutions where the map has more than ``stride`` positions a side (a 7x7 map ends at
    2x2 as theirs; the small grids of cached ViT tokens keep theirs), then one linear layer
    over the flattened map, which keeps where on the grid each feature lit up. Like theirs,
    no activations between the layers."""

    def __init__(self, in_dim: int, grid: tuple[int, int], out_dim: int) -> None:
        super().__init__()
        w = LANDMARK_WIDTH
        layers: list[nn.Module] = [nn.Conv2d(in_dim, w, 1), nn.Conv2d(w, w, 3, padding=1)]
        size = list(grid)
        for kernel, stride in ((5, 2), (7, 3)):
            if min(size) > stride:
                layers.append(nn.Conv2d(w, w, kernel, stride=stride, padding=kernel // 2))
                size = [(n - 1) // stride + 1 for n in size]
        self.convs = nn.Sequential(*layers)
        self.linear = nn.Linear(w * size[0] * size[1], out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(h).flatten(1))


def wing_loss(err: torch.Tensor, omega: float, epsilon: float) -> torch.Tensor:
    """Wing loss (Feng et al., 2018) of errors: ``omega * ln(1 + |x| / epsilon)`` below
    ``omega``, else ``|x| - C`` with ``C = omega - omega * ln(1 + omega / epsilon)``, which
    joins the two pieces."""
    a = err.abs()
    c = omega - omega * math.log1p(omega / epsilon)
    return torch.where(a < omega, omega * torch.log1p(a / epsilon), a - c)


@dataclass
class Task:
    """One prediction target. Subclasses define targets, loss, decoding and metrics."""

    name: str
    columns: list[str]
    kind: ClassVar[str] = ""
    primary: ClassVar[str] = ""
    #: which of the authors' heads reads this task under ``--readout authors``
    authors_head: ClassVar[str] = "classifier"
    #: the metrics a task of this kind reports that a dataset may name as its protocol metric
    reports: ClassVar[tuple[str, ...]] = ()
    higher_is_better: ClassVar[bool] = True
    #: options a task string may set after ``?``, and their types
    options: ClassVar[dict[str, type]] = {}
    #: whose head reads the canonical map under spatial heads (the others read it pooled)
    spatial: ClassVar[bool] = False

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    @property
    def pred_columns(self) -> list[str]:
        """predictions.csv's prediction columns: the first ``len()`` values of a decoded row."""
        return self.columns

    def targets(self, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """(N, k) float32 targets and an (N, k) mask of present labels."""
        raise NotImplementedError

    def make_head(self, in_dim: int, grid: tuple[int, int] | None = None, readout: str = "linear") -> nn.Module:
        """The module that reads the fuser's representation for this task: a vector, or a
        map of size ``grid`` for a :attr:`spatial` task under spatial heads; one Linear, or
        with ``readout`` ``authors`` the authors' head for the task (:class:`AuthorsHead`)."""
        return (
            AuthorsHead(in_dim, self.out_dim, self.authors_head) if readout == "authors" else Head(in_dim, self.out_dim)
        )

    def check_splits(self, dataset: Dataset, train: np.ndarray, evaluate: dict[str, np.ndarray]) -> None:
        """Refuse splits this task cannot be trained or evaluated on (e.g. leaked identities)."""

    def split_groups(self, y: np.ndarray) -> np.ndarray | None:
        """Per-sample groups that a val split held out from train must not cut (identities), or None."""
        return None

    def fit_stats(self, y: np.ndarray, m: np.ndarray) -> None:
        """Learn target statistics from the training split (regression standardisation)."""

    def loss(self, out: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, out: torch.Tensor) -> np.ndarray:
        """Head output to predictions in label units."""
        raise NotImplementedError

    def metrics(self, pred: np.ndarray, y: np.ndarray, m: np.ndarray, extra: dict[str, np.ndarray]) -> dict[str, float]:
        """Metrics of predictions for the rows ``extra["rows"]`` (sample indices)."""
        raise NotImplementedError

    def csv_columns(self) -> tuple[list[str], list[str]]:
        """predictions.csv's true and predicted columns: ``<task>_true`` and ``<task>_pred``,
        one per column as ``<task>_true_<column>`` when the task reads several."""

        def named(side: str, columns: list[str]) -> list[str]:
            if len(self.columns) == 1:
                return [f"{self.name}_{side}"] if columns else []
            return [f"{self.name}_{side}_{c}" for c in columns]

        return named("true", self.columns), named("pred", self.pred_columns)

    def cell(self, value: float) -> str:
        """One label or prediction as predictions.csv writes it (``""``: no label)."""
        if math.isnan(value):
            return ""
        return str(int(value)) if float(value).is_integer() else f"{value:.6g}"

    def parse_cell(self, text: str) -> float:
        """The inverse of :meth:`cell`, for readers of predictions.csv (NaN: no label)."""
        return float(text) if text != "" else math.nan

    def save_outputs(self, out: Path, ids: list[str], pred: np.ndarray) -> None:
        """Write decoded outputs that predictions.csv does not hold (an embedding) into the run
        directory ``out``; ``ids`` name the rows of ``pred``."""

    def state(self) -> dict[str, Any]:
        """What predict needs to rebuild the task (class names, target statistics)."""
        return {"kind": self.kind, "spec": self.spec, "name": self.name, "columns": self.columns}

    @staticmethod
    def from_state(state: dict[str, Any]) -> Task:
        _import_tasks()
        fields = {k: v for k, v in state.items() if k not in ("kind", "spec")}
        return TASKS[state["kind"]](**fields)

    @property
    def spec(self) -> str:
        return f"{self.kind}:{','.join(self.columns)}"


def _numeric(dataset: Dataset, col: str, task: str) -> np.ndarray:
    values = dataset.column(col)
    out = np.full(len(values), np.nan, dtype=np.float64)
    for i, v in enumerate(values):
        if v is None:
            continue
        if not isinstance(v, (int, float)):
            raise EtfError(f"--task {task}: column {col!r} holds {v!r} for sample {dataset.ids[i]!r}, not a number")
        if v != v:
            raise EtfError(
                f"--task {task}: column {col!r} is NaN for sample {dataset.ids[i]!r}; leave it empty for missing"
            )
        out[i] = float(v)
    return out


@register_task("classify")
@dataclass
class Classify(Task):
    """Single-label classification: cross-entropy; accuracy, mean-class accuracy, macro F1."""

    classes: list[str] | None = None
    primary: ClassVar[str] = "accuracy"
    reports: ClassVar[tuple[str, ...]] = ("accuracy", "mean_class_accuracy", "macro_f1")

    @property
    def out_dim(self) -> int:
        return len(self.classes or [])

    def targets(self, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        (col,) = self.columns
        y = _numeric(dataset, col, self.spec)
        present = ~np.isnan(y)
        if np.any(y[present] != np.round(y[present])):
            raise EtfError(f"--task {self.spec}: column {col!r} holds non-integer values; use regress:{col}")
        names = dataset.classes.get(col)
        if self.classes is None:
            n = int(y[present].max()) + 1 if present.any() else 0
            self.classes = list(names) if names else [str(k) for k in range(n)]
        bad = present & ((y < 0) | (y >= len(self.classes)))
        if bad.any():
            i = int(np.argmax(bad))
            raise EtfError(
                f"--task {self.spec}: sample {dataset.ids[i]!r} has label {y[i]:g}, outside 0..{len(self.classes) - 1}"
            )
        if len(self.classes) < 2:
            raise EtfError(f"--task {self.spec}: column {col!r} has fewer than two classes")
        return np.nan_to_num(y, nan=0).astype(np.float32)[:, None], present[:, None]

    def loss(self, out, y, m):
        m = m[:, 0]
        if not m.any():
            return out.sum() * 0
        return F.cross_entropy(out[m], y[m, 0].long())

    def decode(self, out):
        return out.argmax(dim=1, keepdim=True).cpu().numpy().astype(np.float32)

    def metrics(self, pred, y, m, extra):
        k = m[:, 0]
        return metrics.classification_metrics(y[k, 0].astype(int), pred[k, 0].astype(int))

    def cell(self, value):
        return "" if math.isnan(value) else self.classes[int(value)]  # the class name, not its index

    def parse_cell(self, text):
        return float(self.classes.index(text)) if text != "" else math.nan

    def state(self):
        return {**super().state(), "classes": self.classes}


@register_task("multilabel")
@dataclass
class MultiLabel(Task):
    """Binary labels (attributes, action units): BCE; mean accuracy and mean F1 over labels."""

    primary: ClassVar[str] = "mean_f1"
    reports: ClassVar[tuple[str, ...]] = ("mean_accuracy", "mean_f1")

    @property
    def out_dim(self) -> int:
        return len(self.columns)

    def targets(self, dataset):
        y = np.stack([_numeric(dataset, c, self.spec) for c in self.columns], axis=1)
        present = ~np.isnan(y)
        if np.any((y[present] != 0) & (y[present] != 1)):
            col = self.columns[int(np.argmax(((y != 0) & (y != 1) & present).any(axis=0)))]
            raise EtfError(f"--task {self.spec}: column {col!r} is not binary 0/1")
        return np.nan_to_num(y, nan=0).astype(np.float32), present

    def loss(self, out, y, m):
        if not m.any():
            return out.sum() * 0
        return F.binary_cross_entropy_with_logits(out[m], y[m])

    def decode(self, out):
        return (out > 0).cpu().numpy().astype(np.float32)

    def metrics(self, pred, y, m, extra):
        keep = m.any(axis=1)
        return metrics.multilabel_metrics(y[keep].astype(int), pred[keep].astype(int), m[keep])


@register_task("regress")
@dataclass
class Regress(Task):
    """Real-valued targets (age, valence, pose angles): L1 on standardised targets; MAE."""

    mean: list[float] | None = None
    std: list[float] | None = None
    primary: ClassVar[str] = "mae"
    authors_head: ClassVar[str] = "regressor"
    reports: ClassVar[tuple[str, ...]] = ("mae",)
    higher_is_better: ClassVar[bool] = False

    @property
    def out_dim(self) -> int:
        return len(self.columns)

    def targets(self, dataset):
        for c in self.columns:
            if c in dataset.classes:
                raise EtfError(
                    f"--task {self.spec}: column {c!r} is categorical ({', '.join(dataset.classes[c][:4])}, ...); use classify:{c}"
                )
        y = np.stack([_numeric(dataset, c, self.spec) for c in self.columns], axis=1)
        present = ~np.isnan(y)
        return np.nan_to_num(y, nan=0).astype(np.float32), present

    def fit_stats(self, y, m):
        cols = [y[m[:, k], k] for k in range(y.shape[1])]
        self.mean = [float(c.mean()) if len(c) else 0.0 for c in cols]
        self.std = [float(c.std()) if len(c) > 1 and c.std() > 0 else 1.0 for c in cols]

    def _scale(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return like.new_tensor(self.mean), like.new_tensor(self.std)

    def loss(self, out, y, m):
        if not m.any():
            return out.sum() * 0
        mean, std = self._scale(out)
        return self.penalty(out[m] - ((y - mean) / std)[m]).mean()

    def penalty(self, err: torch.Tensor) -> torch.Tensor:
        """Per-value loss of errors in standardised units: L1."""
        return err.abs()

    def decode(self, out):
        mean, std = self._scale(out)
        return (out * std + mean).detach().cpu().numpy().astype(np.float32)

    def metrics(self, pred, y, m, extra):
        keep = m.all(axis=1)
        return metrics.regression_metrics(y[keep], pred[keep])

    def state(self):
        return {**super().state(), "mean": self.mean, "std": self.std}


@register_task("landmarks")
@dataclass
class Landmarks(Regress):
    """Facial landmarks as 2K coordinates; NME, FR, AUC. Under spatial heads a conv head
    reads the canonical map (:class:`LandmarkHead`).

    The loss (``criterion``): Wing (``omega`` 0.1, ``epsilon`` 2) on each coordinate, Wing on
    each sample's whole error vector's Euclidean norm (``wing-norm``: the authors' ``WingLoss``),
    or L1. The targets (``units``): standardised per coordinate, or ``extent``: the training
    landmarks' extent mapped to [0, 1] (one scale for x and y), which stands for the authors'
    [0, 1] image units on face crops (a cache does not hold each sample's input size)."""

    criterion: str = "wing"
    omega: float = 0.1
    epsilon: float = 2.0
    units: str = "standard"
    primary: ClassVar[str] = "nme"
    reports: ClassVar[tuple[str, ...]] = ("nme",)
    options: ClassVar[dict[str, type]] = {"criterion": str, "omega": float, "epsilon": float, "units": str}
    spatial: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.criterion not in LANDMARK_LOSSES:
            raise EtfError(f"--loss {self.criterion!r}: use {' or '.join(LANDMARK_LOSSES)}")
        if not (self.omega > 0 and self.epsilon > 0):
            raise EtfError(f"--wing-omega {self.omega} / --wing-epsilon {self.epsilon}: both must be positive")
        if self.units not in LANDMARK_UNITS:
            raise EtfError(f"--landmark-units {self.units!r}: use {' or '.join(LANDMARK_UNITS)}")

    @property
    def spec(self) -> str:
        return f"landmarks:{self.name}"

    def make_head(self, in_dim: int, grid: tuple[int, int] | None = None, readout: str = "linear") -> nn.Module:
        return LandmarkHead(in_dim, grid, self.out_dim) if grid else super().make_head(in_dim, None, readout)

    def fit_stats(self, y, m):
        if self.units == "standard":
            return super().fit_stats(y, m)
        rows = m.all(axis=1)
        if not rows.any():
            raise EtfError(f"--task {self.spec}: no training sample has every landmark")
        xs, ys = y[rows, 0::2], y[rows, 1::2]
        origin = [float(xs.min()), float(ys.min())]
        extent = max(float(xs.max()) - origin[0], float(ys.max()) - origin[1]) or 1.0
        self.mean = origin * (y.shape[1] // 2)
        self.std = [extent] * y.shape[1]

    def loss(self, out, y, m):
        if self.criterion != "wing-norm":
            return super().loss(out, y, m)
        rows = m.all(dim=1)
        if not rows.any():
            return out.sum() * 0
        mean, std = self._scale(out)
        err = out[rows] - ((y[rows] - mean) / std)
        return wing_loss(err.pow(2).sum(dim=1).clamp(min=1e-6).sqrt(), self.omega, self.epsilon).mean()

    def penalty(self, err: torch.Tensor) -> torch.Tensor:
        return wing_loss(err, self.omega, self.epsilon) if self.criterion == "wing" else err.abs()

    def state(self):
        return {
            **super().state(),
            "criterion": self.criterion,
            "omega": self.omega,
            "epsilon": self.epsilon,
            "units": self.units,
        }

    def metrics(self, pred, y, m, extra):
        keep = m.all(axis=1)
        pts_true = y[keep].reshape(int(keep.sum()), -1, 2)
        pts_pred = pred[keep].reshape(pts_true.shape)
        norm = metrics.landmark_norm(pts_true, extra["nme_norm"][keep] if "nme_norm" in extra else None)
        per_sample = metrics.nme(pts_true, pts_pred, norm)
        return {**metrics.landmark_metrics(per_sample), "mae": float(np.abs(pts_true - pts_pred).mean())}


def _import_tasks() -> None:
    import etf.pipeline.fit.verification  # noqa: F401  (registers verify)


def _task_options(cls: type[Task], query: str, spec: str) -> dict[str, Any]:
    out = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in cls.options:
            known = f" (options: {', '.join(cls.options)})" if cls.options else ""
            raise EtfError(f"--task {spec!r}: {cls.kind} has no option {key!r}{known}")
        try:
            out[key] = cls.options[key](value)
        except ValueError:
            raise EtfError(
                f"--task {spec!r}: option {key}={value!r} is not a valid {cls.options[key].__name__}"
            ) from None
    return out


def parse_task(spec: str, dataset: Dataset) -> Task:
    """``KIND:ARG[?options]`` to a task bound to ``dataset``'s columns (validated against its labels)."""
    _import_tasks()
    head, _, query = spec.partition("?")
    parsed = labels.parse_task(head)
    columns = parsed.columns(dataset.label_columns)
    name = parsed.names[0] if parsed.kind == "landmarks" or len(columns) == 1 else parsed.kind
    cls = TASKS[parsed.kind]
    return cls(name=name, columns=columns, **_task_options(cls, query, spec))


def with_task_options(specs: list[str], kind: str, flags: str, **options: Any) -> list[str]:
    """Set ``options`` (those not None) on every ``kind:`` task string that does not set them
    itself: how a command's task flags (``flags``, named when no task takes them) reach the
    task, and so its recorded config."""
    given = {k: v for k, v in options.items() if v is not None}
    if not given:
        return specs
    if not any(s.startswith(f"{kind}:") for s in specs):
        raise EtfError(f"{flags} apply to {kind} tasks; none in {', '.join(specs) or 'the tasks'}")
    out = []
    for spec in specs:
        if spec.startswith(f"{kind}:"):
            head, _, query = spec.partition("?")
            spec = f"{head}?{urlencode({**given, **dict(parse_qsl(query))})}"
        out.append(spec)
    return out


def with_recipe(specs: list[str], recipe: str) -> list[str]:
    """``specs`` with the task options ``recipe`` gives (its ``landmarks`` options, e.g. the
    authors' Wing on the error norm in [0, 1] units) where a landmarks task leaves them unset."""
    from etf.pipeline.fit.config import RECIPES

    options = RECIPES[recipe].get("landmarks", {})
    out = []
    for spec in specs:
        label, task = (
            ("", spec) if spec.startswith("landmarks:") else (f"{spec.split('=', 1)[0]}=", spec.split("=", 1)[-1])
        )
        if options and task.startswith("landmarks:"):  # a joint fit's K=SPEC keeps its label
            spec = label + with_task_options([task], "landmarks", "--recipe", **options)[0]
        out.append(spec)
    return out


def unique_names(tasks: list[Task]) -> None:
    """Give tasks distinct names (they key heads, metrics and prediction columns)."""
    seen: dict[str, int] = {}
    for t in tasks:
        if t.name in seen:
            seen[t.name] += 1
            t.name = f"{t.name}_{seen[t.name]}"
        else:
            seen[t.name] = 0


def selection_metric(task: Task, dataset: Dataset) -> str:
    """The metric of ``task`` that picks the best epoch and that ``etf ablate`` compares: the
    dataset's protocol metric where the task reports it (CelebA attributes: mean accuracy),
    else the task's primary (a ``csv:`` dataset, or a task the protocol does not cover)."""
    from etf.data.base import get_adapter

    wanted = get_adapter(dataset.name).metric
    return wanted if wanted in task.reports else task.primary
