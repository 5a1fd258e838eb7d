"""Stage 2: train a fuser and task heads from cached prior tokens; only they train.

``fit(dataset, FitConfig(...))`` joins the priors' stores, builds the splits (with the
low-data protocols), trains with AdamW and a warm-up + cosine schedule, selects the epoch
by the first task's primary metric on the validation split, and writes the run directory.
"""

from __future__ import annotations

import copy
import csv
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save
from torch import nn
from tqdm.auto import tqdm

import etf
from etf.cache.features import Batches, PriorSet, default_memory_budget
from etf.cache.location import cache_location
from etf.data.base import Dataset
from etf.data.geometry import check_views, view_samples
from etf.data.labels import point_columns
from etf.errors import EtfError
from etf.pipeline.extract.run import autocast_for, resolve_device, resolve_precision
from etf.pipeline.fit import resume
from etf.pipeline.fit.checksums import check_sums, write_sums
from etf.pipeline.fit.config import INFER_MODES, FitConfig, FuserConfig, data_key, schedule_period
from etf.pipeline.fit.feature_aug import feature_augment, parse_feature_aug
from etf.pipeline.fit.fusers import create_fuser
from etf.pipeline.fit.fusers.base import count_parameters, flops_per_sample
from etf.pipeline.fit.heads import Classify, Task, parse_task, selection_metric, unique_names
from etf.pipeline.fit.metrics import format_metrics
from etf.utils import atomic_path, claim_dir, read_json, staged_dir, write_json_atomic


class FusionModel(nn.Module):
    """A fuser and one head per task (a map head for the fuser's ``map_tasks``)."""

    def __init__(self, fuser: nn.Module, tasks: list[Task]) -> None:
        super().__init__()
        self.fuser = fuser
        readout = fuser.cfg.readout
        self.heads = nn.ModuleDict(
            {
                t.name: t.make_head(fuser.map_dim, fuser.grid, readout)
                if t.name in fuser.map_tasks
                else t.make_head(fuser.out_dim, None, readout)
                for t in tasks
            }
        )

    def forward(self, tokens: list[torch.Tensor], infer: str = "all") -> dict[str, torch.Tensor]:
        """``infer``: ``all`` priors, or the ``canonical`` prior alone (the others absent)."""
        reps = self.fuser(tokens, infer)
        return {name: head(reps[name]) for name, head in self.heads.items()}


def build_model(name: str, groups: list, tasks: list[Task], cfg: FuserConfig, seed: int) -> FusionModel:
    torch.manual_seed(seed)
    return FusionModel(create_fuser(name, groups, tasks, cfg), tasks)


# ---------------------------------------------------------------------------- splits

#: what ``--test-split`` declares for a dataset without a test split
TEST_SPLITS = "holdout:F[:SEED] (a seeded hold-out of train, by group), val (its val split) or none (etf fit only)"
#: the names a declared test split is evaluated and reported under
HOLDOUT, VAL_AS_TEST = "test_holdout", "test_val"


@dataclass(frozen=True)
class ParsedTestSplit:
    """A parsed ``--test-split``: ``dataset`` (its own test splits), ``holdout`` (``fraction``
    of train's groups, seeded by ``seed``, the same for every run), ``val`` or ``none``."""

    kind: str
    fraction: float = 0.0
    seed: int = 0


def parse_test_split(value: str | None) -> ParsedTestSplit:
    if value is None:
        return ParsedTestSplit("dataset")
    if value in ("val", "none"):
        return ParsedTestSplit(value)
    m = re.fullmatch(r"holdout:([0-9.]+)(?::([0-9]+))?", value)
    try:
        fraction = float(m[1]) if m else -1.0
    except ValueError:
        fraction = -1.0
    if not 0 < fraction < 1:
        raise EtfError(f"--test-split {value!r}: use {TEST_SPLITS}, with 0 < F < 1")
    return ParsedTestSplit("holdout", fraction, int(m[2] or 0))


def evaluated_test_splits(dataset: Dataset, test_split: str | None) -> list[str]:
    """The splits a fit evaluates as test, in report order. Val never stands in for test: a
    dataset without a test split is refused unless ``--test-split`` declares one. Several
    ``test_*`` subsets (300W's common and challenging) are also evaluated together as
    ``test``, the full test set."""
    spec = parse_test_split(test_split)
    own = [s for s in dict.fromkeys(dataset.splits) if s.startswith("test")]
    if spec.kind == "dataset":
        if not own:
            raise EtfError(
                f"{dataset.describe()} has no test split, and val does not stand in for one: declare one with "
                "--test-split holdout:0.2 (a seeded hold-out of train, by group), --test-split val (its val split) "
                "or, for etf fit, --test-split none"
            )
        return (["test"] if len(own) > 1 and "test" not in own else []) + own
    if own:
        raise EtfError(
            f"--test-split {test_split}: {dataset.describe()} has its own test split(s) ({', '.join(own)}); "
            "--test-split declares one for a dataset that has none"
        )
    if spec.kind == "val" and "val" not in dataset.splits:
        raise EtfError(f"--test-split val: {dataset.describe()} has no val split")
    return {"holdout": [HOLDOUT], "val": [VAL_AS_TEST], "none": []}[spec.kind]


@dataclass
class Splits:
    """Sample indices per split; ``evaluate`` lists val and every test split; ``held_out``
    says how each split made from train was drawn."""

    train: np.ndarray
    val: np.ndarray
    tests: dict[str, np.ndarray]
    held_out: dict[str, str] = field(default_factory=dict)

    @property
    def evaluate(self) -> dict[str, np.ndarray]:
        return {"val": self.val, **self.tests}

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), **{k: len(v) for k, v in self.evaluate.items()}}


def _stratify(task: Task | None, y: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    if not isinstance(task, Classify) or y is None:
        return None
    labels = y[rows, 0].astype(int)
    return labels if np.bincount(labels).min(initial=0) >= 2 or len(np.unique(labels)) == 1 else None


@dataclass(frozen=True)
class _Units:
    """What hold-outs keep whole: per sample its group (None: each sample alone) and its name."""

    groups: np.ndarray | None
    name: str

    @classmethod
    def of(cls, dataset: Dataset, first: Task, y0: np.ndarray) -> _Units:
        identities = first.split_groups(y0)
        if identities is not None:
            return cls(identities, "identity")
        if dataset.groups is not None:
            return cls(np.array(dataset.groups, dtype=object), dataset.group_by or "group")
        return cls(None, "sample")

    def hold_out(
        self, rows: np.ndarray, fraction: float, seed: int, first: Task, y0: np.ndarray, flag: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """(kept, held) sorted rows: a seeded ``fraction`` held out, of the groups where samples
        have groups (no group on both sides), else of the samples, stratified by class where
        every class can be. ``flag`` (the option and its value) names errors."""
        from sklearn.model_selection import GroupShuffleSplit, train_test_split

        if self.groups is not None:
            if len(np.unique(self.groups[rows])) < 2:
                raise EtfError(f"{flag}: train has a single {self.name}; nothing to hold out by {self.name}")
            splitter = GroupShuffleSplit(1, test_size=fraction, random_state=seed)
            kept, held = next(splitter.split(rows, groups=self.groups[rows]))
            return np.sort(rows[kept]), np.sort(rows[held])
        if len(rows) < 2:
            raise EtfError(f"{flag}: train has {len(rows)} sample(s); nothing to hold out")
        n_held = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        strat = _stratify(first, y0, rows)
        if strat is not None and min(n_held, len(rows) - n_held) < len(np.unique(strat)):
            strat = None
        kept, held = train_test_split(rows, test_size=n_held, random_state=seed, stratify=strat)
        return np.sort(kept), np.sort(held)

    def describe(self, fraction: float, seed: int) -> str:
        return f"{fraction:.0%} of train by {self.name}, seed {seed}"


def make_splits(dataset: Dataset, usable: np.ndarray, cfg: FitConfig, first: Task, y0: np.ndarray) -> Splits:
    """Train/val/test rows. The test splits are the dataset's or the one ``--test-split``
    declares (a hold-out of train drawn first, with its own seed, so every run of a grid
    tests on the same samples); with no val split, a seeded ``--val-fraction`` of the rest of
    train; then the low-data protocols (``train_fraction``, ``shots``) on what remains of
    train, so val never overlaps the K-shot pool. Every hold-out keeps whole groups
    (subjects, identities, source images) on one side where the dataset has them."""
    split = np.array(dataset.splits)
    rows = lambda name: np.nonzero((split == name) & usable)[0]  # noqa: E731
    names = evaluated_test_splits(dataset, cfg.test_split)
    spec = parse_test_split(cfg.test_split)
    units = _Units.of(dataset, first, y0)
    train, val = rows("train"), rows("val")
    if len(train) == 0:
        raise EtfError(f"{dataset.describe()}: the train split has no usable samples")
    if len(val) == 0 and (split == "val").any():
        raise EtfError(f"{dataset.describe()}: the val split has no usable samples (all skipped or unlabelled)")
    held_out: dict[str, str] = {}
    if spec.kind == "holdout":
        train, held = units.hold_out(train, spec.fraction, spec.seed, first, y0, f"--test-split {cfg.test_split}")
        tests = {HOLDOUT: held}
        held_out[HOLDOUT] = units.describe(spec.fraction, spec.seed)
    elif spec.kind == "val":
        tests, val = {VAL_AS_TEST: val}, val[:0]
    else:
        own = [s for s in names if s in set(split)]
        tests = {s: rows(s) if s in own else np.sort(np.concatenate([rows(t) for t in own])) for s in names}
    if len(val) == 0:
        train, val = units.hold_out(train, cfg.val_fraction, cfg.seed, first, y0, f"--val-fraction {cfg.val_fraction}")
        held_out["val"] = units.describe(cfg.val_fraction, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.shots is not None:
        if not isinstance(first, Classify):
            raise EtfError(f"--shots needs a classify task first, not {first.spec}")
        labels = y0[train, 0].astype(int)
        picked = []
        for k, name in enumerate(first.classes):
            members = train[labels == k]
            if len(members) < cfg.shots:
                raise EtfError(f"--shots {cfg.shots}: class {name!r} has only {len(members)} training samples")
            picked.append(rng.choice(members, cfg.shots, replace=False))
        train = np.sort(np.concatenate(picked))
    elif cfg.train_fraction < 1.0:
        if not 0 < cfg.train_fraction <= 1:
            raise EtfError(f"--train-fraction {cfg.train_fraction}: must be in (0, 1]")
        train, _ = units.hold_out(
            train, 1 - cfg.train_fraction, cfg.seed, first, y0, f"--train-fraction {cfg.train_fraction}"
        )
    if len(val) == 0:
        raise EtfError(f"{dataset.describe()}: the val split has no usable samples")
    return Splits(train, val, {k: v for k, v in tests.items() if len(v)}, held_out)


# ---------------------------------------------------------------------------- views


def training_views(cfg: FitConfig, priors: PriorSet) -> int:
    """How many views training draws from: the stores' K under ``--views random`` (the
    default where they hold views), 1 under ``clean``."""
    held = priors.views
    if cfg.views == "clean" or (cfg.views is None and held == 1):
        return 1
    if held == 1:
        raise EtfError(
            "--views random: the priors' stores hold different views ("
            + "; ".join(f"{n}: {v or 'none'}" for n, v in zip(priors.names, priors.view_specs))
            + "); extract every prior with the same --views, --augment and --view-seed"
            if priors.views_differ
            else "--views random: the stores of --encoders hold no augmented views; extract with --views K --augment SPEC"
        )
    return held


def view_targets(
    dataset: Dataset,
    tasks: list[Task],
    targets: dict[str, tuple[np.ndarray, np.ndarray]],
    geometry: np.ndarray,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task, (K, N, k) targets and masks: view v's labels as they are in that view
    (landmarks mapped and mirrored, pose signs), view 0 the clean ones. Views the labels
    cannot follow are refused first."""
    columns = [c for t in tasks for c in t.columns]
    check_views(columns, geometry, dataset.mirrors, dataset.rotation_sensitive, "--views random")
    moved = [t for t in tasks if set(t.columns) & ({*_point_columns(columns), *dataset.flip_sign})]
    per_view = [targets]
    for v in range(1, geometry.shape[1]):
        if moved:
            samples = view_samples(dataset.samples, geometry[:, v], dataset.mirrors, dataset.flip_sign)
            seen = replace(dataset, samples=samples)
            per_view.append({**targets, **{t.name: t.targets(seen) for t in moved}})
        else:
            per_view.append(targets)
    return {t.name: tuple(np.stack([p[t.name][i] for p in per_view]) for i in (0, 1)) for t in tasks}


def _point_columns(columns: list[str]) -> list[str]:
    return [c for pairs in point_columns(columns).values() for pair in pairs for c in pair]


# ---------------------------------------------------------------------------- training


def _optimizer(model: nn.Module, lr: float, weight_decay: float, kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (or ``kind`` ``adam``: Adam, whose decay is an L2 term in the gradient) without
    decay on norms and biases (1-D parameters) and on the learned tokens, embeddings and gates
    a module names in ``no_weight_decay`` (the usual ViT recipe): decay would pull an ensemble
    token or a zero-initialised gate towards zero."""
    skip = {
        f"{prefix}.{name}".lstrip(".")
        for prefix, module in model.named_modules()
        for name in getattr(module, "no_weight_decay", ())
    }
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return (torch.optim.Adam if kind == "adam" else torch.optim.AdamW)(groups, lr=lr)


def _schedule(
    opt: torch.optim.Optimizer, warmup: int, total: int, cycles: float | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then a cosine: one half-period to zero over the
    rest (etf), or with ``cycles`` the authors' ``WarmupCosineSchedule``: ``cycles`` full
    periods over the rest, back and forth between the peak and zero (warm restarts), their
    warm-up starting at zero."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup if cycles is None else step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if cycles is None:
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 0.5 * (1 + math.cos(2 * math.pi * cycles * progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def schedule_for(opt: torch.optim.Optimizer, cfg: FitConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``cfg``'s learning-rate schedule (``--warmup-epochs``, ``--schedule``) over its epochs."""
    period = schedule_period(cfg.schedule)
    cycles = None if period is None else cfg.epochs / period
    return _schedule(opt, round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch, cycles)


@torch.no_grad()
def predict_rows(
    models: list[FusionModel],
    tasks: list[Task],
    batches: Batches,
    rows: np.ndarray,
    device: torch.device,
    infer: str = "all",
) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """Row order and, per model and task, decoded predictions for ``rows`` in inference mode
    ``infer``: one read for all models."""
    for model in models:
        model.eval()
    order, preds = [], [{t.name: [] for t in tasks} for _ in models]
    for idx, tokens in batches.iterate(rows, shuffle=False):
        tokens = [t.to(device) for t in tokens]
        order.append(idx)
        for model, p in zip(models, preds):
            out = check_finite(model(tokens, infer))
            for t in tasks:
                p[t.name].append(t.decode(out[t.name]))
    return np.concatenate(order), [{k: np.concatenate(v) for k, v in p.items()} for p in preds]


def check_finite(out: dict[str, Any], run: str | Path | None = None) -> dict[str, Any]:
    """A model's outputs (per task a tensor, or a tuple of them), refused when not finite: a
    model with NaN or infinite weights (diverged, or a damaged file) predicts nothing."""
    for name, value in out.items():
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                where = f"--run {run}: " if run else ""
                raise EtfError(f"{where}the model's {name} output is not finite: its weights are NaN or infinite")
    return out


@torch.no_grad()
def attention_shares(
    models: list[FusionModel], batches: Batches, rows: np.ndarray, names: list[str], device: torch.device
) -> list[dict[str, float] | None]:
    """Per model, the mean share of the ensemble token's attention each prior gets on ``rows``
    (which prior the token listens to); None for fusers without ``attention_shares``."""
    which = [k for k, m in enumerate(models) if hasattr(m.fuser, "attention_shares")]
    if not which or not len(rows):
        return [None] * len(models)
    sums = dict.fromkeys(which, 0.0)
    for _, tokens in batches.iterate(rows, shuffle=False):
        tokens = [t.to(device).float() for t in tokens]
        for k in which:
            models[k].eval()
            sums[k] = sums[k] + models[k].fuser.attention_shares(tokens).sum(dim=0)
    return [
        {n: float(v) for n, v in zip(names, sums[k] / len(rows))} if k in sums else None for k in range(len(models))
    ]


def evaluate(
    tasks: list[Task],
    order: np.ndarray,
    preds: dict[str, np.ndarray],
    targets: dict[str, tuple[np.ndarray, np.ndarray]],
    extra: dict[str, np.ndarray],
) -> dict[str, dict[str, float]]:
    out = {}
    for t in tasks:
        y, m = targets[t.name]
        if m[order].any():
            rows = {"rows": order, **{k: v[order] for k, v in extra.items()}}
            out[t.name] = t.metrics(preds[t.name], y[order], m[order], rows)
    return out


@torch.no_grad()
def val_losses(
    models: list[FusionModel],
    tasks: list[Task],
    batches: Batches,
    rows: np.ndarray,
    device: torch.device,
    targets: dict[str, tuple[np.ndarray, np.ndarray]],
) -> list[float]:
    """Each model's mean training loss (the sum over ``tasks``) on ``rows`` in the clean view."""
    sums, n = [0.0] * len(models), 0
    for idx, tokens in batches.iterate(rows, shuffle=False):
        tokens = [t.to(device) for t in tokens]
        batch = {
            k: (torch.from_numpy(y[idx]).to(device), torch.from_numpy(m[idx]).to(device))
            for k, (y, m) in targets.items()
        }
        for j, model in enumerate(models):
            out = model.eval()(tokens)
            sums[j] += float(sum(t.loss(_fp32(out[t.name]), *batch[t.name]) for t in tasks)) * len(idx)
        n += len(idx)
    return [v / max(1, n) for v in sums]


@dataclass(frozen=True)
class FitSelection:
    """What picks the epoch a fit keeps (``--select-by``): the first task's selection
    ``metric`` on val, the val loss, or (``f1-or-loss``, the authors') val macro F1 where the
    first task classifies and the val loss otherwise. Higher scores are better."""

    by: str
    tasks: list[Task]
    metric: str

    @property
    def by_loss(self) -> bool:
        return self.by == "loss" or (self.by == "f1-or-loss" and not isinstance(self.tasks[0], Classify))

    def score(self, val: dict[str, dict[str, float]], loss: float) -> float:
        if self.by_loss:
            return -loss if math.isfinite(loss) else -math.inf
        metric = "macro_f1" if self.by == "f1-or-loss" else self.metric
        return _score(self.tasks[0], metric, val)

    def describe(self) -> str:
        if self.by_loss:
            return "val loss"
        return f"val {self.tasks[0].name} {'macro_f1' if self.by == 'f1-or-loss' else self.metric}"


def _score(task: Task, metric: str, metrics: dict[str, dict[str, float]]) -> float:
    """Higher is better; an undefined (NaN) score is the worst, so it never stays the best."""
    value = metrics.get(task.name, {}).get(metric, float("nan"))
    if math.isnan(value):
        return -math.inf
    return value if task.higher_is_better else -value


@dataclass
class FitResult:
    """A run's metrics and summary, or, for a model whose training diverged, why (no run is written)."""

    out: Path
    metrics: dict[str, Any]
    summary: str
    diverged: str | None = None

    def checked(self) -> FitResult:
        """This result, or its divergence as an error."""
        if self.diverged:
            raise EtfError(f"{self.out}: {self.diverged}")
        return self


def live(members: list[_Member]) -> list[_Member]:
    """The members of a group still training: a model whose loss diverged drops out, and so
    does one that stopped early (``--early-stop``)."""
    return [m for m in members if m.diverged is None and not m.stopped]


def _fp32(out: Any) -> Any:
    """A head's output (a tensor, or a tuple such as a verify head's) with its floating-point
    tensors in fp32: autocast leaves them in bf16/fp16, the losses are computed in fp32."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple):
        items = [_fp32(v) for v in out]
        return type(out)(*items) if hasattr(out, "_fields") else tuple(items)
    return out


class _Member:
    """One model of a :func:`fit_many` group: its own optimiser, schedule, history, best
    state and torch RNG stream (continued from its seeded init, as in a separate fit)."""

    def __init__(
        self,
        cfg: FitConfig,
        groups: list,
        tasks: list[Task],
        steps_per_epoch: int,
        device: torch.device,
        precision: str = "fp32",
    ) -> None:
        self.model = build_model(cfg.fuser, groups, tasks, cfg.fuser_config, cfg.seed).to(device)
        self.cfg = replace(cfg, fuser_config=self.model.fuser.cfg)  # as built: settings no task reads are None
        self.cuda = [device] if device.type == "cuda" else []
        self.device, self.precision = device, precision
        # fp16 gradients underflow without loss scaling; a disabled scaler is a pass-through
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.rng = self._rng_state()
        self.opt = _optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.optimizer)
        self.sched = schedule_for(self.opt, cfg, steps_per_epoch)
        self.feature_aug = parse_feature_aug(cfg.feature_aug)
        self.history: list[dict[str, Any]] = []
        self.best, self.best_state, self.best_epoch = -math.inf, None, 0
        self.best_val: tuple[dict[str, Any], tuple[np.ndarray, dict[str, np.ndarray]]] | None = None
        self.loss_sum = 0.0
        #: why training stopped: the loss was not finite (the run is a failure, never a result)
        self.diverged: str | None = None
        #: the epoch after which ``--early-stop`` ended training (0: it did not)
        self.stopped = 0

    def _rng_state(self) -> list[torch.Tensor]:
        return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in self.cuda)]

    #: what :meth:`state` saves besides the model, optimiser, schedule and scaler
    _KEPT = ("rng", "history", "best", "best_epoch", "best_state", "best_val", "diverged", "stopped")

    def state(self) -> dict[str, Any]:
        """Everything training has changed, at an epoch's end: what a resumed fit restores."""
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            **{k: getattr(self, k) for k in self._KEPT},
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.scaler.load_state_dict(state["scaler"])
        for k in self._KEPT:
            setattr(self, k, state[k])
        if self.best_state is not None:
            self.best_state = {k: v.to(self.device) for k, v in self.best_state.items()}

    def step(
        self, tokens: list[torch.Tensor], targets: dict[str, tuple[torch.Tensor, torch.Tensor]], tasks: list[Task]
    ) -> None:
        """One optimisation step on a batch, drawing random numbers from this model's stream only."""
        with torch.random.fork_rng(devices=self.cuda):
            torch.set_rng_state(self.rng[0])
            for d, state in zip(self.cuda, self.rng[1:]):
                torch.cuda.set_rng_state(state, d)
            with autocast_for(self.precision, self.device):  # the forward in --precision
                out = self.model(feature_augment(tokens, self.feature_aug) if self.feature_aug else tokens)
            loss = self.task_loss({k: _fp32(v) for k, v in out.items()}, targets, tasks)  # the loss in fp32
            if self.model.fuser.aux_loss is not None:
                loss = loss + self.model.fuser.aux_loss.float()
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            self.rng = self._rng_state()
        # summed on the device, read once per epoch: no host sync per step on an accelerator
        self.loss_sum = self.loss_sum + loss.detach().double() * len(tokens[0])

    def check_loss(self, epoch: int, seen: int) -> bool:
        """Whether this epoch's training loss (read once per epoch, before the model is
        evaluated) is finite; if not, this model's training ends (:attr:`diverged`)."""
        loss = float(self.loss_sum) / max(1, seen)
        if not math.isfinite(loss):
            self.diverged = (
                f"training diverged: the loss was {loss} in epoch {epoch} at a peak learning rate of {self.cfg.lr:g} "
                "(--lr); lower it or use --precision fp32"
            )
        return self.diverged is None

    def task_loss(
        self, out: dict[str, torch.Tensor], targets: dict[str, tuple[torch.Tensor, torch.Tensor]], tasks: list[Task]
    ) -> torch.Tensor:
        """The batch's loss over ``tasks``: their sum (a joint fit weighs them)."""
        return sum(t.loss(out[t.name], *targets[t.name]) for t in tasks)

    def end_epoch(
        self,
        epoch: int,
        seen: int,
        rate: float,
        val: dict[str, dict[str, float]],
        predicted: Any,
        score: float,
    ) -> None:
        """Record the epoch; keep the state (and what it ``predicted`` on val) when its
        selection ``score`` (higher is better) is the best so far."""
        if score > self.best or self.best_state is None:
            self.best, self.best_epoch, self.best_state = score, epoch, copy.deepcopy(self.model.state_dict())
            self.best_val = (val, predicted)  # what the best state predicts on val: not predicted again
        row = {
            "epoch": epoch,
            "lr": self.opt.param_groups[0]["lr"],
            "train_loss": float(self.loss_sum) / seen,
            "selection_score": score,
            "samples_per_s": rate,
        }
        patience = self.cfg.early_stop
        if patience is not None and epoch - self.best_epoch >= patience:
            self.stopped = epoch
        row.update({f"val_{t}_{k}": v for t, ms in val.items() for k, v in ms.items() if not isinstance(v, list)})
        self.history.append(row)
        self.loss_sum = 0.0


def fit(dataset: Dataset, cfg: FitConfig, overwrite: bool = False) -> FitResult:
    """Train and evaluate; write the run directory ``cfg.out``; return its metrics. A fit
    whose training loss stops being finite is an error, and writes no run."""
    return fit_many(dataset, [cfg], overwrite)[0].checked()


def check_out(out: Path, overwrite: bool) -> Path:
    """A run goes into a new or empty directory; replacing a run takes ``overwrite``, and
    nothing else is ever replaced (see :func:`~etf.utils.claim_dir`). Checked before any work."""
    out = claim_dir(out, "--out", "run")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise EtfError(f"--out {out}: holds a run already; choose a new directory or pass --overwrite to replace it")
    return out


def prepare_data(
    dataset: Dataset, priors: PriorSet, tasks: list[Task], cfg: FitConfig
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], Splits, dict[str, np.ndarray]]:
    """The tasks' targets, the splits (of samples with tokens and a label) and the extra
    per-sample values metrics need (``nme_norm``); the tasks learn their training statistics."""
    targets = {t.name: t.targets(dataset) for t in tasks}
    labelled = np.any([m.any(axis=1) for _, m in targets.values()], axis=0)
    splits = make_splits(dataset, priors.valid & labelled, cfg, tasks[0], targets[tasks[0].name][0])
    for t in tasks:
        y, m = targets[t.name]
        t.check_splits(dataset, splits.train, splits.evaluate)
        if not m[splits.train].any():
            raise EtfError(f"--task {t.spec}: no training sample has this label")
        t.fit_stats(y[splits.train], m[splits.train])
    extra = (
        {"nme_norm": np.array([v if v is not None else np.nan for v in dataset.column("nme_norm")], dtype=np.float64)}
        if "nme_norm" in dataset.label_columns
        else {}
    )
    return targets, splits, extra


def check_group(configs: list[FitConfig], overwrite: bool) -> FitConfig:
    """The first of ``configs`` once every run directory is free and the configs differ only
    in model settings (they share one pass over the data)."""
    if not configs:
        raise EtfError("fit_many: no configs")
    for c in configs:
        check_out(c.out, overwrite)
    cfg, shared = configs[0], data_key(configs[0])
    for other in configs[1:]:
        differs = [k for k, v in data_key(other).items() if shared[k] != v]
        if differs:
            raise EtfError(
                f"fit_many: {other.out} differs from {cfg.out} in {', '.join(differs)}, not only in model settings"
            )
    return cfg


def fit_many(dataset: Dataset, configs: list[FitConfig], overwrite: bool = False) -> list[FitResult]:
    """Train one model per config over a single read of the data (the linear-eval idea: many
    heads from one pass) and write each run directory.

    The configs may differ only in :data:`MODEL_FIELDS`. Each model keeps its own seeded init
    and RNG stream, so every result is bit-identical to ``fit(dataset, cfg)`` on its own;
    ``metrics["seconds"]`` is the wall time of the whole group.
    """
    t0 = time.perf_counter()
    cfg = check_group(configs, overwrite)
    specs = cfg.tasks or dataset.tasks
    if not specs:
        raise EtfError(f"--task: {dataset.describe()} has no default task; give e.g. --task classify:COLUMN")
    tasks = [parse_task(s, dataset) for s in specs]
    unique_names(tasks)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, without_bf16="fp32")
    priors = PriorSet(cfg.cache_dir, dataset, cfg.encoders, cfg.layers, cfg.tokens)
    try:
        targets, splits, extra = prepare_data(dataset, priors, tasks, cfg)
        all_rows = np.unique(np.concatenate([splits.train, *splits.evaluate.values()]))
        budget = cfg.max_memory or default_memory_budget()
        views = training_views(cfg, priors)
        train_targets = (
            view_targets(dataset, tasks, targets, priors.geometry())
            if views > 1
            else {k: (y[None], m[None]) for k, (y, m) in targets.items()}
        )
        # on an accelerator the tokens live there when they fit (else streamed blocks are copied whole)
        batches = Batches(
            priors, all_rows, budget, cfg.batch_size, cfg.seed, views, device=device if device.type != "cpu" else None
        )
        steps_per_epoch = -(-len(splits.train) // cfg.batch_size)
        selection = FitSelection(cfg.select_by, tasks, selection_metric(tasks[0], dataset))
        every = [_Member(c, priors.groups, tasks, steps_per_epoch, device, precision) for c in configs]
        members = every
        disable = None if cfg.progress is None else not cfg.progress
        keys = [resume.fingerprint(c.to_json(), dataset.key, priors.specs()) for c in configs]
        start = _resume(every, keys)
        bar = tqdm(range(start, cfg.epochs), desc=f"fit {'+'.join(c.fuser for c in configs)}", unit="epoch",
                   disable=disable, initial=start, total=cfg.epochs)  # fmt: skip
        y_dev = {
            name: (torch.from_numpy(y).to(device), torch.from_numpy(m).to(device))
            for name, (y, m) in train_targets.items()
        }
        for epoch in bar:
            members = live(every)  # a diverged model stops; the others go on
            if not members:
                break
            models = [m.model for m in members]
            for model in models:
                model.train()
            te, seen = time.perf_counter(), 0
            for idx, seen_in, tokens in batches.train_epoch(splits.train, epoch):
                tokens = [t.to(device, non_blocking=True) for t in tokens]  # a no-op for resident tokens
                sel = (torch.from_numpy(seen_in).to(device), torch.from_numpy(idx).to(device))
                batch_targets = {name: (y[sel], m[sel]) for name, (y, m) in y_dev.items()}
                for member in members:
                    member.step(tokens, batch_targets, tasks)
                seen += len(idx)
            rate = seen / (time.perf_counter() - te)
            members = [m for m in members if m.check_loss(epoch + 1, seen)]
            models = [m.model for m in members]
            order, preds = predict_rows(models, tasks, batches, splits.val, device)
            losses = val_losses(models, tasks, batches, splits.val, device, targets) if selection.by_loss else None
            for k, (member, p) in enumerate(zip(members, preds)):
                val = evaluate(tasks, order, p, targets, extra)
                score = selection.score(val, losses[k] if losses else math.nan)
                member.end_epoch(epoch + 1, seen, rate, val, (order, p), score)
            for member, key in zip(every, keys):
                resume.save(member.cfg.out, key, epoch + 1, member.state())
            for first in live(members)[:1]:
                row = first.history[-1]
                bar.set_postfix(loss=f"{row['train_loss']:.4f}", val=f"{row['selection_score']:.4f}", sps=f"{rate:.0f}")
        members = [m for m in every if not m.diverged]  # those that stopped early too
        models = [m.model for m in members]
        for member in members:
            member.model.load_state_dict(member.best_state)
        results = [{"val": m.best_val[0]} for m in members]
        predictions = [[("val", *m.best_val[1])] for m in members]
        for name, rows in splits.tests.items():
            for infer in INFER_MODES:  # every prior, then the canonical prior alone
                split = name if infer == "all" else f"{name}:{infer}"
                order, preds = predict_rows(models, tasks, batches, rows, device, infer)
                for k, p in enumerate(preds):
                    results[k][split] = evaluate(tasks, order, p, targets, extra)
                    predictions[k].append((split, order, p))
        test_rows = np.unique(np.concatenate(list(splits.tests.values()))) if splits.tests else splits.val
        shares = attention_shares(models, batches, test_rows, priors.names, device)
        sample = [t[:1].to(device) for t in next(batches.iterate(splits.val[:1], shuffle=False))[1]]
        seconds = time.perf_counter() - t0
        out = {m.cfg.out: FitResult(m.cfg.out, {}, "", m.diverged) for m in every if m.diverged}
        for member, result, prediction, share in zip(members, results, predictions, shares):
            metrics = {
                **result,
                "best_epoch": member.best_epoch,
                "selected_by": selection.describe(),
                **({"stopped_early": member.stopped} if member.stopped else {}),
                **cost_metrics(member.model, priors, sample),
                "splits": splits.counts(),
                **({"held_out": splits.held_out} if splits.held_out else {}),
                "streamed": batches.streamed,
                "views": views,
                "precision": precision,
                "seconds": seconds,
                **({"resumed_after_epoch": start} if start else {}),
            }
            if share is not None:
                metrics["attention_share"] = share
            run = _write_run(
                member.cfg, dataset, tasks, priors, member.model, metrics, member.history, prediction, targets
            )
            out[member.cfg.out] = FitResult(member.cfg.out, metrics, run)
        for member in every:  # published, or diverged: the fit has ended
            resume.clear(member.cfg.out)
    finally:
        priors.close()
    return [out[m.cfg.out] for m in every]


def _resume(members: list[_Member], keys: list[str]) -> int:
    """Restore every member's state saved at the end of the same epoch by an interrupted fit of
    the same settings; the number of epochs to skip (0: start afresh). Members are saved one after
    the other, so a kill between two leaves them at different epochs: then the fit starts over."""
    saved = [resume.load(m.cfg.out, key) for m, key in zip(members, keys)]
    if any(s is None for s in saved) or len({epoch for epoch, _ in saved}) != 1:
        return 0
    for member, (_, state) in zip(members, saved):
        member.restore(state)
    return saved[0][0]


# ---------------------------------------------------------------------------- run directory


def _write_run(cfg, dataset, tasks, priors, model, metrics, history, predictions, targets) -> str:
    """Write the run into a staging directory beside ``cfg.out`` and rename it into place:
    a reader (predict, explain, a resumed grid) sees a complete run or none."""
    with staged_dir(Path(cfg.out)) as out:
        summary = _write_files(out, cfg, dataset, tasks, priors, model, metrics, history, predictions, targets)
        write_sums(out)
        return summary


def cost_metrics(model: FusionModel, priors: PriorSet, sample: list[torch.Tensor]) -> dict[str, Any]:
    """What the fuser costs per sample under both inference modes (counted on ``sample``),
    beside the FLOPs of the encoders it reads, and which priors those are."""
    flops = [int(s["info"].get("flops_per_image") or 0) for s in priors.specs()]
    reads = model.fuser.reads
    return {
        "fuser_params": count_parameters(model),
        "fuser_flops": flops_per_sample(model, sample),
        "fuser_flops_canonical": flops_per_sample(model, sample, "canonical"),
        "encoder_flops": sum(flops[p] for p in reads),
        "canonical_encoder_flops": flops[0],
        "priors": [priors.names[p] for p in reads],
    }


def dataset_record(dataset: Dataset) -> dict[str, Any]:
    """How config.json names a dataset, for predict and explain to reopen it."""
    return {"name": dataset.name, "key": dataset.key, "root": str(dataset.root), "options": dataset.options}


#: the layout of a run directory's model: 2 since priors are pooled by their own pooling (a
#: ViT's class token) and vector heads read the pooled canonical token; readers refuse older runs
RUN_FORMAT = 2


#: what readers of a run take from its config.json (:func:`run_config` writes them)
RUN_KEYS = ("fuser", "fuser_config", "seed", "encoders", "layers", "tokens", "cache_dir", "dataset", "tasks", "groups")


def run_config(cfg: FitConfig, dataset: Dataset, tasks: list[Task], priors: PriorSet) -> dict[str, Any]:
    """config.json of a run: the settings with absolute cache and run locations, the dataset
    predict reopens, the tasks' state and the token groups."""
    return {
        "etf_version": etf.__version__,
        "run_format": RUN_FORMAT,
        **cfg.to_json(),
        "cache_dir": cache_location(cfg.cache_dir).absolute(),
        "out": str(Path(cfg.out).resolve()),
        "dataset": dataset_record(dataset),
        "tasks": [t.state() for t in tasks],
        "groups": [g.to_json() for g in priors.groups],
    }


def _write_files(out, cfg, dataset, tasks, priors, model, metrics, history, predictions, targets) -> str:
    config = run_config(cfg, dataset, tasks, priors)
    write_model_files(out, config, priors.specs(), metrics, model, history)
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        header = ["id", "split"]
        for t in tasks:
            header += [c for side in t.csv_columns() for c in side]
        w.writerow(header)
        ids = dataset.ids
        for split, order, preds in predictions:
            for k, i in enumerate(order):
                row = [ids[i], split]
                for t in tasks:
                    row += task_cells(t, *targets[t.name], i, preds[t.name][k])
                w.writerow(row)
    every_prior = [p for p in predictions if not p[0].endswith(":canonical")]  # embeddings: all-prior only
    evaluated = [ids[i] for _, order, _ in every_prior for i in order]
    for t in tasks:
        t.save_outputs(out, evaluated, np.concatenate([preds[t.name] for _, _, preds in every_prior]))
    summary = format_summary(cfg, tasks, metrics)
    (out / "summary.txt").write_text(summary + "\n")
    return summary


def write_model_files(
    out: Path,
    config: dict[str, Any],
    stores: list[dict[str, Any]],
    metrics: dict[str, Any],
    model: nn.Module,
    history: list[dict[str, Any]],
) -> None:
    """A run's config.json, stores.json, metrics.json, model.safetensors and history.csv."""
    write_json_atomic(out / "config.json", config)
    write_json_atomic(out / "stores.json", stores)
    write_json_atomic(out / "metrics.json", metrics)
    with atomic_path(out / "model.safetensors") as tmp:  # save_file would make it 0600, whatever the umask
        tmp.write_bytes(save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in history for k in r)))
        w.writeheader()
        w.writerows(history)


def task_cells(task: Task, y: np.ndarray, m: np.ndarray, i: int, pred: np.ndarray) -> list[str]:
    """A task's predictions.csv cells for sample ``i``: its labels (empty where missing),
    then its decoded prediction ``pred``."""
    true = [task.cell(y[i, j]) if m[i, j] else "" for j in range(len(task.columns))]
    return true + [task.cell(v) for v in pred[: len(task.pred_columns)]]


def format_summary(cfg: FitConfig, tasks: list[Task], metrics: dict[str, Any]) -> str:
    lines = [
        f"run {cfg.out}: {cfg.fuser} over {', '.join(metrics['priors'])}; best epoch {metrics['best_epoch']}/{cfg.epochs} by {metrics['selected_by']}"
        + (" (streamed from the stores)" if metrics["streamed"] else "")
        + (f"; resumed after epoch {metrics['resumed_after_epoch']}" if metrics.get("resumed_after_epoch") else "")
        + (f"; trained on a random one of {metrics['views']} views per epoch" if metrics.get("views", 1) > 1 else ""),
        "samples  " + "  ".join(f"{k} {v}" for k, v in metrics["splits"].items()),
        *(f"held out {k}: {v}" for k, v in metrics.get("held_out", {}).items()),
    ]
    if not any(s.startswith("test") for s in metrics["splits"]):
        lines.append("no test split (--test-split none): val picked the epoch and is not a test")
    splits = [s for s in metrics if s == "val" or s.startswith("test")]
    width = max(8, *map(len, splits))
    for split in splits:
        for t in tasks:
            ms = metrics[split].get(t.name)
            if ms:
                lines.append(f"{split:<{width}} {t.name:<12} " + format_metrics(ms))
    lines.append(f"cost     {metrics['fuser_params'] / 1e6:.3f} M trainable parameters, " + _cost(metrics, ""))
    lines.append(f"         canonical prior alone: {_cost(metrics, '_canonical')}")
    return "\n".join(lines)


def _cost(metrics: dict[str, Any], mode: str) -> str:
    """The fuser's MFLOPs/sample in one inference mode, against its encoders'."""
    f = metrics[f"fuser_flops{mode}"]
    e = metrics["canonical_encoder_flops" if mode else "encoder_flops"]
    which = f"{metrics['priors'][0]}'s" if mode else "the encoders'"
    return f"{f / 1e6:.2f} MFLOPs/sample" + (f" ({100 * f / e:.2f}% of {which} {e / 1e9:.2f} GFLOPs)" if e else "")


def load_run(run: Path) -> dict[str, Any]:
    """config.json of a run directory (what predict and explain rebuild the model from)."""
    path = Path(run) / "config.json"
    if Path(run).name.startswith(".") and Path(run).name.endswith(".partial"):
        raise EtfError(f"--run {run}: the staging folder of a fit that has not finished, not a run")
    if not path.exists():
        raise EtfError(f"--run {run}: not a run directory (no config.json)")
    check_sums(run)
    config = read_json(path)
    if not isinstance(config, dict):
        raise EtfError(f"--run {run}: config.json holds no JSON object; fit it again")
    missing = [k for k in RUN_KEYS if k not in config]
    if missing:
        raise EtfError(f"--run {run}: config.json lacks {', '.join(map(repr, missing))}; fit it again")
    if config.get("run_format", 1) != RUN_FORMAT:
        raise EtfError(
            f"--run {run}: fitted by etf {config.get('etf_version', '?')} with run format {config.get('run_format', 1)}, "
            f"before each prior was read by its own pooling (a ViT's class token was left out); this etf reads "
            f"format {RUN_FORMAT}: fit it again"
        )
    return config
