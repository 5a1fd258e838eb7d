"""``etf probe``: every prior alone under standard frozen-feature protocols, and how much the
priors overlap, from the cache.

The splits are ``etf fit``'s (the dataset's, or the declared ``--test-split``, val held out
of train where there is none), the metrics are the task's own, and every choice (k, C) is
made on val and reported once on test. Few-shot draws (``shots`` per class, ``tries``
seeded draws) come from train alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from etf.cache.features import PriorSet
from etf.cache.location import Location
from etf.data.base import Dataset
from etf.errors import EtfError
from etf.pipeline.fit.heads import Classify, MultiLabel, Regress, Task, parse_task, selection_metric, unique_names
from etf.pipeline.probe.knn import KS, TEMPERATURE, knn_predict
from etf.pipeline.probe.logreg import C_GRID, sweep
from etf.utils import claim_dir

METHODS = ("knn", "logreg", "linear")


@dataclass
class ProbeConfig:
    """What ``etf probe`` takes besides the dataset."""

    cache_dir: Path | Location
    encoders: list[str]
    out: Path
    tasks: list[str] = field(default_factory=list)
    methods: tuple[str, ...] = ("knn", "logreg")
    ks: tuple[int, ...] = KS
    temperature: float = TEMPERATURE
    cs: tuple[float, ...] = C_GRID
    #: training samples per class (few-shot), drawn ``tries`` times; None: all of train
    shots: int | None = None
    tries: int = 5
    #: each prior's pooled token (None: its own pooling), as ``etf fit --pool``
    pool: str | None = None
    seed: int = 0
    val_fraction: float = 0.1
    test_split: str | None = None
    device: str = "auto"
    cka_samples: int = 2000
    #: ``etf fit`` settings of the ``linear`` method (epochs, lr, ...), as FitConfig fields
    linear: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse bad settings before any work, naming the flag."""
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise EtfError(f"--method {','.join(self.methods)}: use one or more of {', '.join(METHODS)}")
        if not self.ks or min(self.ks) < 1:
            raise EtfError(f"--k {','.join(map(str, self.ks))}: give positive neighbour counts")
        if not self.temperature > 0:
            raise EtfError(f"--temperature {self.temperature}: must be positive")
        if self.shots is not None and self.shots < 1:
            raise EtfError(f"--shots {self.shots}: must be at least 1")
        if self.tries < 1:
            raise EtfError(f"--tries {self.tries}: must be at least 1")


def task_kind(task: Task) -> str:
    """How the probes treat a task: classify, multilabel or regress (landmarks too)."""
    if isinstance(task, Classify):
        return "classify"
    if isinstance(task, MultiLabel):
        return "multilabel"
    if isinstance(task, Regress):
        return "regress"
    raise EtfError(
        f"--task {task.spec}: etf probe evaluates classify, multilabel, regress and landmarks tasks, not {task.kind}"
    )


@dataclass
class _Data:
    """Targets, splits and pooled features of the probed samples."""

    tasks: list[Task]
    targets: dict[str, tuple[np.ndarray, np.ndarray]]
    extra: dict[str, np.ndarray]
    train: np.ndarray
    evaluate: dict[str, np.ndarray]
    features: dict[str, np.ndarray]
    position: np.ndarray  # sample index -> row of the feature matrices

    def x(self, prior: str, rows: np.ndarray) -> np.ndarray:
        return self.features[prior][self.position[rows]]

    def train_rows(self, task: Task) -> np.ndarray:
        return labelled(task, self.targets, self.train)

    def metrics(self, task: Task, pred: np.ndarray, rows: np.ndarray) -> dict[str, float] | None:
        y, m = self.targets[task.name]
        if not m[rows].any():
            return None
        return task.metrics(pred, y[rows], m[rows], {"rows": rows, **{k: v[rows] for k, v in self.extra.items()}})


def labelled(task: Task, targets: dict[str, tuple[np.ndarray, np.ndarray]], rows: np.ndarray) -> np.ndarray:
    """The ``rows`` that carry the task's label (every column of it, for regression)."""
    m = targets[task.name][1][rows]
    return rows[m.all(axis=1) if task_kind(task) == "regress" else m.any(axis=1)]


def check_neighbours(cfg: ProbeConfig, task: Task, train: int) -> None:
    """kNN needs at least the smallest k training samples with the task's label."""
    if "knn" in cfg.methods and train < min(cfg.ks):
        raise EtfError(
            f"--method knn: --task {task.spec} has {train} training sample(s) with labels, fewer than the "
            f"smallest k ({min(cfg.ks)}): no k has that many neighbours; lower --k or use --method logreg"
        )


def draw_shots(task: Classify, y: np.ndarray, train: np.ndarray, shots: int, seed: int, tries: int) -> list[np.ndarray]:
    """``tries`` seeded draws of ``shots`` training samples per class (sorted rows of ``train``)."""
    labels = y[train, 0].astype(int)
    for k, name in enumerate(task.classes):
        have = int((labels == k).sum())
        if have < shots:
            raise EtfError(f"--shots {shots}: class {name!r} of {task.spec} has only {have} training samples")
    draws = []
    for r in range(tries):
        rng = np.random.default_rng([seed, r])
        picked = [rng.choice(train[labels == k], shots, replace=False) for k in range(len(task.classes))]
        draws.append(np.sort(np.concatenate(picked)))
    return draws


def run_probe(dataset: Dataset, cfg: ProbeConfig) -> dict[str, Any]:
    """Probe every prior of ``cfg.encoders`` alone, measure their overlap, write ``cfg.out``
    (probe.json, probe.md, plots); return what probe.json holds."""
    from etf.pipeline.extract.run import resolve_device
    from etf.pipeline.fit.config import FitConfig
    from etf.pipeline.fit.train import prepare_data
    from etf.pipeline.probe.cka import pairwise_cka
    from etf.pipeline.probe.features import pooled_features
    from etf.pipeline.probe.report import overlap, suggest_subsets, write_probe

    t0 = time.perf_counter()
    cfg.check()
    claim_dir(Path(cfg.out), "--out", "probe")  # a new or empty directory, or a probe etf wrote
    specs = cfg.tasks or dataset.tasks
    if not specs:
        raise EtfError(f"--task: {dataset.describe()} has no default task; give e.g. --task classify:COLUMN")
    tasks = [parse_task(s, dataset) for s in specs]
    unique_names(tasks)
    for t in tasks:
        task_kind(t)
        if cfg.shots is not None and not isinstance(t, Classify):
            raise EtfError(f"--shots {cfg.shots}: samples per class need classify tasks; --task {t.spec} is not one")
    device = resolve_device(cfg.device)
    priors = PriorSet(cfg.cache_dir, dataset, cfg.encoders)
    try:
        fit_cfg = FitConfig(
            cache_dir=cfg.cache_dir,
            encoders=cfg.encoders,
            out=cfg.out,
            tasks=specs,
            seed=cfg.seed,
            val_fraction=cfg.val_fraction,
            test_split=cfg.test_split,
        )
        targets, splits, extra = prepare_data(dataset, priors, tasks, fit_cfg)
        draws = {
            t.name: draw_shots(t, targets[t.name][0], splits.train, cfg.shots, cfg.seed, cfg.tries)
            if cfg.shots is not None
            else None
            for t in tasks
        }
        for t in tasks:
            check_neighbours(
                cfg, t, len(draws[t.name][0]) if draws[t.name] else len(labelled(t, targets, splits.train))
            )
        rows = np.unique(np.concatenate([splits.train, *splits.evaluate.values()]))
        position = np.full(len(dataset), -1)
        position[rows] = np.arange(len(rows))
        features = pooled_features(priors, rows, cfg.pool)
    finally:
        priors.close()
    data = _Data(tasks, targets, extra, splits.train, splits.evaluate, features, position)
    results: list[dict[str, Any]] = []
    selections: list[dict[str, Any]] = []
    test_preds: dict[tuple[str, str], np.ndarray] = {}  # (task, prior) -> the first method's test predictions
    first_test = next(iter(splits.tests), None)
    for t in tasks:
        metric = selection_metric(t, dataset)
        for p in cfg.encoders:
            for method in cfg.methods:
                if method == "linear":
                    continue
                t1 = time.perf_counter()
                tries = draws[t.name] or [data.train_rows(t)]
                runs = [_probe_once(method, data, t, p, train, metric, cfg, device) for train in tries]
                for config in runs[0]["metrics"] if method == "knn" else ():  # logreg: the chosen C only
                    for split in runs[0]["metrics"][config]:
                        per_try = [r["metrics"][config][split] for r in runs]
                        results.append(
                            {
                                "task": t.name,
                                "prior": p,
                                "method": method,
                                "config": config,
                                "chosen": [r["chosen"] for r in runs].count(config) / len(runs),
                                "split": split,
                                **_aggregate(per_try),
                            }
                        )
                chosen = [r["chosen"] for r in runs]
                selections.append(
                    {
                        "task": t.name,
                        "prior": p,
                        "method": method,
                        "chosen": chosen,
                        "by": f"val {metric}",
                        "val_scores": [r["val_scores"] for r in runs],
                        "note": runs[0].get("note", ""),
                        "seconds": time.perf_counter() - t1,
                    }
                )
                # the chosen configuration's metrics, under the name every table reads
                for split in runs[0]["metrics"][chosen[0]]:
                    per_try = [r["metrics"][r["chosen"]][split] for r in runs]
                    results.append(
                        {
                            "task": t.name,
                            "prior": p,
                            "method": method,
                            "config": "chosen",
                            "chosen": 1.0,
                            "split": split,
                            **_aggregate(per_try),
                        }
                    )
                if first_test is not None and (t.name, p) not in test_preds:
                    test_preds[(t.name, p)] = runs[0]["test_pred"]
    if "linear" in cfg.methods:
        results += _linear(dataset, cfg, specs, tasks, fit_cfg)
    pairs = pairwise_cka(
        {p: data.x(p, splits.tests.get(first_test, splits.val)) for p in cfg.encoders},
        cfg.seed,
        cfg.cka_samples,
        device=device,
    )
    cka = [
        {"a": a, "b": b, "cka": c.value, "low": c.low, "high": c.high, "samples": c.samples}
        for (a, b), c in pairs.items()
    ]
    overlaps = overlap(data, tasks, test_preds, splits.tests.get(first_test)) if first_test else []
    record = {
        "dataset": dataset.describe(),
        "priors": list(cfg.encoders),
        "tasks": [t.spec for t in tasks],
        #: per task (in order), the metric that picks k and C on val and ranks the priors
        "metrics": [
            {"task": t.name, "metric": selection_metric(t, dataset), "higher_is_better": t.higher_is_better}
            for t in tasks
        ],
        "methods": list(cfg.methods),
        "pool": cfg.pool or "each prior's own",
        "ks": list(cfg.ks),
        "temperature": cfg.temperature,
        "cs": list(cfg.cs),
        "shots": cfg.shots,
        "tries": cfg.tries if cfg.shots is not None else 1,
        "seed": cfg.seed,
        "splits": splits.counts(),
        **({"held_out": splits.held_out} if splits.held_out else {}),
        "test_split": first_test,
        "overlap_method": next((m for m in cfg.methods if m != "linear"), None),
        "results": results,
        "selections": selections,
        "cka": cka,
        "overlap": overlaps,
        "device": str(device),
    }
    record["suggested_subsets"] = suggest_subsets(record)
    record["seconds"] = time.perf_counter() - t0
    write_probe(Path(cfg.out), record)
    return record


def _aggregate(per_try: list[dict[str, float] | None]) -> dict[str, Any]:
    """One configuration's metrics on one split: as they are, or over few-shot tries their
    mean and (population) std."""
    done = [m for m in per_try if m is not None]
    if not done:
        return {"metrics": {}}
    if len(per_try) == 1:
        return {"metrics": done[0]}
    keys = [k for k, v in done[0].items() if isinstance(v, float)]
    return {
        "metrics": {k: float(np.mean([m[k] for m in done])) for k in keys},
        "std": {k: float(np.std([m[k] for m in done])) for k in keys},
        "tries": len(done),
    }


def _score(task: Task, metric: str, metrics: dict[str, float] | None) -> float:
    value = (metrics or {}).get(metric, math.nan)
    if math.isnan(value):
        return -math.inf
    return value if task.higher_is_better else -value


def _probe_once(
    method: str, data: _Data, task: Task, prior: str, train: np.ndarray, metric: str, cfg: ProbeConfig, device: Any
) -> dict[str, Any]:
    """One prior, one task, one training set: every configuration's metrics per split, the
    configuration val chose, and its predictions on the first test split."""
    kind = task_kind(task)
    y, m = data.targets[task.name]
    classes = len(task.classes) if kind == "classify" else None
    x_train = data.x(prior, train)
    splits = data.evaluate
    note = ""
    if method == "knn":
        check_neighbours(cfg, task, len(train))
        ks = tuple(k for k in cfg.ks if k <= len(train))
        if len(ks) < len(cfg.ks):
            note = f"k > {len(train)} training samples left out: {', '.join(str(k) for k in cfg.ks if k not in ks)}"
        preds = {name: {} for name in splits}
        for name, rows in splits.items():
            out = knn_predict(
                x_train,
                y[train, 0] if classes else y[train],
                data.x(prior, rows),
                ks,
                classes,
                None if classes else m[train],
                cfg.temperature,
                device,
            )
            for k, p in out.items():
                preds[name][f"k={k}"] = (p > 0.5).astype(np.float32) if kind == "multilabel" else p
        configs = [f"k={k}" for k in ks]
        metrics = {
            c: {name: data.metrics(task, preds[name][c], rows) for name, rows in splits.items()} for c in configs
        }
        val_scores = {c: _score(task, metric, metrics[c]["val"]) for c in configs}
        chosen = max(configs, key=lambda c: val_scores[c])  # ties: the smaller k (first)
    else:
        val_rows = splits["val"]
        found, scaler = sweep(
            kind,
            (x_train, y[train], m[train]),
            data.x(prior, val_rows),
            lambda p: _score(task, metric, data.metrics(task, p, val_rows)),
            cfg.cs,
        )
        chosen = f"C={found.c:g}"
        if found.c in (min(cfg.cs), max(cfg.cs)):
            note = f"C={found.c:g} is at the edge of the swept range"
        preds = {
            name: {chosen: found.probe.predict(scaler.transform(data.x(prior, rows)))} for name, rows in splits.items()
        }
        metrics = {chosen: {name: data.metrics(task, preds[name][chosen], rows) for name, rows in splits.items()}}
        val_scores = {f"C={c:g}": s for c, s in found.val_scores.items()}
    tests = [s for s in splits if s != "val"]
    return {
        "metrics": {c: {s: v for s, v in by.items() if v is not None} for c, by in metrics.items()},
        "chosen": chosen,
        "val_scores": {c: (v if math.isfinite(v) else None) for c, v in val_scores.items()},
        "test_pred": preds[tests[0]][chosen] if tests else None,
        "note": note,
    }


def _linear(dataset: Dataset, cfg: ProbeConfig, specs: list[str], tasks: list[Task], fit_cfg: Any) -> list[dict]:
    """The ``linear`` fuser (a trained head on each prior's pooled token) as ``etf fit``
    trains it, one run per prior under ``cfg.out/linear``; few-shot, one run per try as
    ``etf fit --shots K --seed S`` for S = seed .. seed + tries - 1 (fit's own draws)."""
    from etf.pipeline.fit.config import FuserConfig
    from etf.pipeline.fit.train import fit

    rows = []
    seeds = [cfg.seed + r for r in range(cfg.tries)] if cfg.shots is not None else [cfg.seed]
    for p in cfg.encoders:
        t1 = time.perf_counter()
        per_seed = []
        for seed in seeds:
            run = Path(cfg.out) / "linear" / (p if len(seeds) == 1 else f"{p}-seed{seed}")
            run_cfg = replace(
                fit_cfg,
                encoders=[p],
                out=run,
                fuser="linear",
                fuser_config=FuserConfig(pool=cfg.pool),
                seed=seed,
                shots=cfg.shots,
                device=cfg.device,
                progress=False,
                **cfg.linear,
            )
            per_seed.append(fit(dataset, run_cfg, overwrite=True).metrics)
        for t in tasks:
            for split in [s for s in per_seed[0] if s == "val" or (s.startswith("test") and ":" not in s)]:
                per_try = [m[split].get(t.name) for m in per_seed]
                rows.append(
                    {
                        "task": t.name,
                        "prior": p,
                        "method": "linear",
                        "config": "chosen",
                        "chosen": 1.0,
                        "split": split,
                        **_aggregate(per_try),
                        "seconds": time.perf_counter() - t1,
                    }
                )
    return rows
