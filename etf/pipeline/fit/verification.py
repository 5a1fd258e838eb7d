"""Face recognition: identity embeddings trained with a margin softmax, evaluated on pairs.

``verify:COL`` reads identity labels from COL. The fuser's representation goes through a
linear layer to an L2-normalised embedding; training classifies the *training* identities
with an ArcFace or CosFace margin, so what transfers to identities never seen in training
is the embedding, not a classifier. Evaluation scores pairs of embeddings by cosine
similarity: a split's own pair protocol when the dataset has one (LFW's ten folds, CFP's
ten splits), otherwise pairs drawn from the split's identity labels (e.g. a val split held
out from train), so model selection uses the same metric as the test.

Options ride on the task string, so they are recorded with the task in the run's
config.json and ``etf predict`` rebuilds the same head:
``verify:COL?dim=512&margin=arcface&s=64&m=0.5`` (``m`` defaults to 0.5 for ArcFace,
0.35 for CosFace).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch import nn

from etf.data.base import Dataset
from etf.errors import EtfError
from etf.pipeline.fit import metrics
from etf.pipeline.fit.config import MARGINS
from etf.pipeline.fit.heads import Task, _numeric, register_task, with_task_options
from etf.utils import atomic_path

FOLDS = 10
DRAWN_PAIRS = 3000  # matched pairs drawn at most per split without a protocol (LFW's count)


@dataclass(frozen=True)
class Pairs:
    """Pairs as positions ``a``, ``b`` into a list of samples, whether they match, and their fold."""

    a: np.ndarray
    b: np.ndarray
    same: np.ndarray
    fold: np.ndarray

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Cosine similarity of each pair (embeddings are L2-normalised)."""
        return np.einsum("nd,nd->n", embeddings[self.a], embeddings[self.b])

    def metrics(self, embeddings: np.ndarray) -> dict[str, Any]:
        return metrics.verification_metrics(self.scores(embeddings), self.same, self.fold)

    def at(self, positions: np.ndarray) -> Pairs:
        """The same pairs with ``a`` and ``b`` mapped through ``positions``."""
        return Pairs(positions[self.a], positions[self.b], self.same, self.fold)


def assign_folds(same: np.ndarray, where: str) -> np.ndarray:
    """Ten seeded folds stratified by match/mismatch, for pair lists that carry no folds."""
    counts = np.bincount(same, minlength=2)
    if counts.min() < FOLDS:
        raise EtfError(
            f"{where}: {counts[1]} matched and {counts[0]} mismatched pairs; the 10-fold protocol needs at least {FOLDS} of each"
        )
    fold = np.empty(len(same), dtype=np.int64)
    for k, (_, held) in enumerate(StratifiedKFold(FOLDS, shuffle=True, random_state=0).split(same, same)):
        fold[held] = k
    return fold


def draw_pairs(labels: np.ndarray, where: str, limit: int = DRAWN_PAIRS) -> Pairs:
    """Pairs among samples with identity ``labels`` (positions into it), seeded.

    Matched: consecutive samples of each identity in a shuffled order (at most ``limit``);
    mismatched: as many random pairs of different identities.
    """
    if len(labels) < 2:
        raise EtfError(f"{where}: fewer than two samples with an identity label; nothing to pair")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    matched = labels[order[1:]] == labels[order[:-1]]
    a, b = order[:-1][matched], order[1:][matched]
    if len(a) > limit:
        keep = np.sort(rng.choice(len(a), limit, replace=False))
        a, b = a[keep], b[keep]
    x, y = rng.integers(len(labels), size=(2, 4 * len(a) + 100))
    differ = labels[x] != labels[y]
    x, y = x[differ][: len(a)], y[differ][: len(a)]
    same = np.r_[np.ones(len(a), np.int64), np.zeros(len(x), np.int64)]
    return Pairs(np.r_[a, x], np.r_[b, y], same, assign_folds(same, where))


def protocol_pairs(dataset: Dataset) -> dict[str, Pairs]:
    """The dataset's pair lists per split, as sample indices (folds assigned when absent)."""
    index = {sid: i for i, sid in enumerate(dataset.ids)}
    out = {}
    for split, p in (dataset.pairs or {}).items():
        same = np.asarray(p["same"], dtype=np.int64)
        where = f"{dataset.describe()}: pairs of split {split!r}"
        fold = np.asarray(p["fold"], dtype=np.int64) if "fold" in p else assign_folds(same, where)
        a, b = (np.array([index[s] for s in p[k]], dtype=np.int64) for k in ("a", "b"))
        out[split] = Pairs(a, b, same, fold)
    return out


def margin_logits(cos: torch.Tensor, labels: torch.Tensor, margin: str, s: float, m: float) -> torch.Tensor:
    """Scaled cosines with the target class's margin: ArcFace cos(theta + m), CosFace cos(theta) - m.

    Past theta = pi - m ArcFace's cos(theta + m) would rise again; there it falls back to
    cos(theta) - m sin(m), as insightface does, so the target logit stays monotonic.
    """
    target = cos.gather(1, labels[:, None])
    if margin == "arcface":
        theta = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
        shifted = torch.where(theta + m < math.pi, torch.cos(theta + m), target - m * math.sin(m))
    else:
        shifted = target - m
    return s * cos.scatter(1, labels[:, None], shifted)


class Embedded(NamedTuple):
    """A verify head's output: the L2-normalised embedding and, in training, its cosines to
    the training identities' proxies (what the margin softmax reads)."""

    embedding: torch.Tensor
    cosine: torch.Tensor | None


class EmbeddingHead(nn.Module):
    """Linear projection to an L2-normalised embedding, plus one learned proxy per training identity."""

    def __init__(self, in_dim: int, dim: int, identities: int) -> None:
        super().__init__()
        self.project = nn.Linear(in_dim, dim)
        self.proxies = nn.Parameter(torch.empty(identities, dim))
        nn.init.normal_(self.proxies, std=0.01)

    def forward(self, h: torch.Tensor) -> Embedded:
        if h.dim() == 3:  # per-query fusers: one embedding from all the task's queries
            h = h.mean(dim=1)
        e = F.normalize(self.project(h), dim=-1)
        return Embedded(e, e @ F.normalize(self.proxies, dim=-1).T if self.training else None)


@register_task("verify")
@dataclass
class Verify(Task):
    """Identity embeddings (margin softmax over training identities); pair verification metrics.

    Refused: identities shared between train and val/test; a train split whose every
    identity has one sample (no margin softmax can learn what varies within an identity);
    a pair protocol naming a sample that is skipped or unlabelled; a split without a
    protocol where fewer than ten matched and ten mismatched pairs can be drawn. Training
    identities with one sample are otherwise fine (they still act as negatives).
    """

    dim: int = 512
    margin: str = "arcface"
    s: float = 64.0
    m: float | None = None
    identities: int | None = None  # training identities: the margin softmax's classes
    primary: ClassVar[str] = "accuracy_10fold"
    reports: ClassVar[tuple[str, ...]] = ("accuracy_10fold", "auc")
    options: ClassVar[dict[str, type]] = {"dim": int, "margin": str, "s": float, "m": float}

    def __post_init__(self) -> None:
        if len(self.columns) != 1:
            raise EtfError(f"--task {self.spec}: verify takes one identity column")
        if self.margin not in MARGINS:
            raise EtfError(f"--task {self.spec}: margin {self.margin!r}: use {' or '.join(MARGINS)}")
        if self.m is None:
            self.m = MARGINS[self.margin]
        if self.dim < 1 or self.s <= 0 or self.m < 0:
            raise EtfError(f"--task {self.spec}: need dim >= 1, s > 0 and m >= 0 (got {self.dim}, {self.s}, {self.m})")

    @property
    def out_dim(self) -> int:
        return self.dim

    @property
    def pred_columns(self) -> list[str]:
        return []  # the embedding goes to embeddings-<task>.npy, not predictions.csv

    def targets(self, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        (col,) = self.columns
        y = _numeric(dataset, col, self.spec)
        present = ~np.isnan(y)
        if np.any(y[present] != np.round(y[present])):
            raise EtfError(f"--task {self.spec}: column {col!r} holds non-integer values, not identity indices")
        self._labels = np.where(present, y, -1).astype(np.int64)
        self._names = dataset.classes.get(col)
        self._splits = np.array(dataset.splits)
        self._ids = dataset.ids
        self._protocol = protocol_pairs(dataset)
        return np.nan_to_num(y, nan=0).astype(np.float32)[:, None], present[:, None]

    def _identity(self, label: int) -> str:
        return self._names[label] if self._names else str(label)

    def check_splits(self, dataset: Dataset, train: np.ndarray, evaluate: dict[str, np.ndarray]) -> None:
        train_labels = self._labels[train][self._labels[train] >= 0]
        for split, rows in evaluate.items():
            shared = np.intersect1d(train_labels, self._labels[rows])
            shared = shared[shared >= 0]
            if len(shared):
                raise EtfError(
                    f"--task {self.spec}: identity {self._identity(int(shared[0]))!r} is in both train and {split} "
                    f"({len(shared)} shared); verification must be tested on identities unseen in training"
                )
        if len(train_labels) and np.bincount(train_labels).max() < 2:
            raise EtfError(
                f"--task {self.spec}: every training identity has a single sample; a margin softmax needs identities "
                "with two or more images to learn what stays the same"
            )
        for split, rows in evaluate.items():
            self.pairs_for(rows, f"--task {self.spec}: {split} split")

    def pairs_for(self, rows: np.ndarray, where: str) -> Pairs:
        """Pairs among ``rows`` (sample indices) as positions into ``rows``: the protocol of the
        rows' split when it has one (every pair's samples must be among ``rows``), else drawn.
        Built once per row set: val is evaluated every epoch."""
        built = self.__dict__.setdefault("_pairs", {})
        key = rows.tobytes()
        if key not in built:
            built[key] = self._build_pairs(rows, where)
        return built[key]

    def _build_pairs(self, rows: np.ndarray, where: str) -> Pairs:
        splits = np.unique(self._splits[rows])
        protocol = self._protocol.get(splits[0]) if len(splits) == 1 else None
        if protocol is None:
            labelled = np.nonzero(self._labels[rows] >= 0)[0]
            return draw_pairs(self._labels[rows][labelled], where).at(labelled)
        position = np.full(len(self._labels), -1)
        position[rows] = np.arange(len(rows))
        missing = (position[protocol.a] < 0) | (position[protocol.b] < 0)
        if missing.any():
            k = int(np.argmax(missing))
            sid = self._ids[protocol.a[k] if position[protocol.a[k]] < 0 else protocol.b[k]]
            raise EtfError(
                f"{where}: pair {k + 1} of its protocol names {sid!r}, which was skipped at extraction or has no "
                f"{self.columns[0]!r} label ({int(missing.sum())} pairs affected); the protocol needs every pair"
            )
        return protocol.at(position)

    def split_groups(self, y: np.ndarray) -> np.ndarray:
        return y[:, 0]

    def fit_stats(self, y: np.ndarray, m: np.ndarray) -> None:
        self._classes = np.unique(y[m[:, 0], 0].astype(np.int64))
        self.identities = len(self._classes)

    def make_head(self, in_dim: int, grid: tuple[int, int] | None = None, readout: str = "linear") -> nn.Module:
        return EmbeddingHead(in_dim, self.dim, self.identities)  # its own head whatever the readout

    def loss(self, out: Embedded, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        keep = m[:, 0]
        if not keep.any():
            return out.cosine.sum() * 0
        classes = torch.as_tensor(self._classes, device=y.device)
        labels = torch.searchsorted(classes, y[keep, 0].long())
        return F.cross_entropy(margin_logits(out.cosine[keep], labels, self.margin, self.s, self.m), labels)

    def decode(self, out: Embedded) -> np.ndarray:
        return out.embedding.detach().cpu().numpy().astype(np.float32)

    def metrics(self, pred, y, m, extra):
        return self.pairs_for(extra["rows"], f"--task {self.spec}").metrics(pred)

    def save_outputs(self, out: Path, ids: list[str], pred: np.ndarray) -> None:
        write_embeddings(out, self.name, ids, pred)

    def state(self) -> dict[str, Any]:
        return {
            **super().state(),
            "dim": self.dim,
            "margin": self.margin,
            "s": self.s,
            "m": self.m,
            "identities": self.identities,
        }


def write_embeddings(directory: Path, task: str, ids: list[str], embeddings: np.ndarray) -> Path:
    """``embeddings-<task>.npy`` (float32, one row per id) and ``embeddings-<task>.txt`` (the ids, one a line)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"embeddings-{task}.npy"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(embeddings, dtype=np.float32))
    with atomic_path(path.with_suffix(".txt")) as tmp:
        tmp.write_text("".join(f"{i}\n" for i in ids))
    return path


def pair_metrics(dataset: Dataset, embeddings: np.ndarray, valid: np.ndarray) -> dict[str, dict[str, Any]]:
    """Every pair protocol of ``dataset`` on ``embeddings`` of its samples (dataset order).

    Usable with any run's embeddings; ``valid`` marks samples that have one (not skipped).
    """
    out = {}
    for split, pairs in protocol_pairs(dataset).items():
        bad = ~(valid[pairs.a] & valid[pairs.b])
        if bad.any():
            k = int(np.argmax(bad))
            sid = dataset.ids[pairs.a[k] if not valid[pairs.a[k]] else pairs.b[k]]
            raise EtfError(
                f"{dataset.describe()}: pair {k + 1} of split {split!r} names {sid!r}, which has no embedding (skipped at extraction)"
            )
        out[split] = pairs.metrics(embeddings)
    return out


def format_pair_metrics(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """``{task: {split: metrics}}`` as one line per task and split (lists left out)."""
    return "\n".join(
        f"{split:<8} {task:<12} " + metrics.format_metrics(ms)
        for task, splits in results.items()
        for split, ms in splits.items()
    )


def with_options(specs: list[str], **options: Any) -> list[str]:
    """Set ``options`` (those not None) on every ``verify:`` task string that does not set them itself.

    How ``etf fit``'s --embed-dim/--margin flags reach the task, and so its recorded config.
    """
    return with_task_options(specs, "verify", "--embed-dim, --margin, --margin-scale and --margin-m", **options)
