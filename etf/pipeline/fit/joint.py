"""Joint fits: one fuser over several datasets, each with its own tasks (Q-Face's unified model).

``fit_joint(datasets, configs, joint)`` trains one fuser and every dataset's task heads (or
Q-Face label queries) together. Each dataset reads its own stores of the same priors (the
specs must agree apart from the dataset), its own splits, and streams within its share of
``--max-memory`` (:func:`etf.pipeline.fit.mixing.memory_shares`). Every training step takes
one batch of one dataset, the dataset drawn by ``--mix`` (:func:`mixing.step_plan`), and the
loss is that dataset's tasks' only (weighted by ``--task-weight``, optionally by learned
log-variances): a sample never trains another dataset's heads. An epoch is as many steps as
one pass over the largest train split (``--steps-per-epoch`` overrides). The epoch is
selected on the val splits by :class:`Selection`. Several configs that differ only in model
settings train together over one read of the data, as in ``fit_many``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from etf.cache.features import Batches, PriorSet, default_memory_budget
from etf.cache.format import DATASET_FIELDS, VIEW_FIELDS
from etf.data.base import Dataset
from etf.errors import EtfError
from etf.pipeline.extract.run import resolve_device, resolve_precision
from etf.pipeline.fit.checksums import write_sums
from etf.pipeline.fit.config import INFER_MODES, FitConfig
from etf.pipeline.fit.heads import Task, parse_task, selection_metric, unique_names
from etf.pipeline.fit.metrics import format_metrics
from etf.pipeline.fit.mixing import JointConfig, assign, dataset_labels, memory_shares, mix_probabilities, step_plan
from etf.pipeline.fit.train import (
    FitResult,
    Splits,
    _cost,
    _Member,
    _optimizer,
    _score,
    attention_shares,
    check_group,
    cost_metrics,
    dataset_record,
    evaluate,
    evaluated_test_splits,
    live,
    predict_rows,
    prepare_data,
    run_config,
    schedule_for,
    task_cells,
    write_model_files,
)
from etf.utils import staged_dir

#: the smallest first-epoch magnitude a relative change divides by (a metric starting at 0)
REL_FLOOR = 0.01


# ---------------------------------------------------------------------------- what is fitted


def resolve_tasks(datasets: list[Dataset], specs: list[str], labels: list[str]) -> list[list[Task]]:
    """Per dataset its tasks: those ``--task K=SPEC`` gives it, else its defaults; names made
    unique over all of them (they key heads, metrics and prediction columns). A task naming
    a column its dataset lacks but another dataset has is refused with a hint."""
    given = assign(specs, labels, "--task")
    out: list[list[Task]] = []
    for k, (dataset, mine) in enumerate(zip(datasets, given)):
        mine = mine or list(dataset.tasks)
        if not mine:
            raise EtfError(
                f"--task: {labels[k]} ({dataset.describe()}) has no default task; give e.g. --task {k + 1}=classify:COLUMN"
            )
        tasks = []
        for spec in mine:
            try:
                tasks.append(parse_task(spec, dataset))
            except EtfError as e:
                others = [labels[j] for j, d in enumerate(datasets) if j != k and _parses(spec, d)]
                if not others:
                    raise
                raise EtfError(
                    f"--task {k + 1}={spec}: {labels[k]} has no such column ({e}); {others[0]} has it: "
                    f"write --task {labels.index(others[0]) + 1}={spec}"
                ) from None
        out.append(tasks)
    unique_names([t for tasks in out for t in tasks])
    return out


def _parses(spec: str, dataset: Dataset) -> bool:
    try:
        parse_task(spec, dataset)
    except EtfError:
        return False
    return True


def check_priors_match(priors: list[PriorSet], labels: list[str]) -> None:
    """Every dataset's store of a prior must come from the same encoder spec (apart from the
    dataset) and give the same token groups: one fuser reads them all."""
    first = priors[0]
    for ps, label in zip(priors[1:], labels[1:]):
        for a, b in zip(first.specs(), ps.specs()):
            keys = sorted(set(a["spec"]) | set(b["spec"]))
            differs = [
                k for k in keys if k not in DATASET_FIELDS + VIEW_FIELDS and a["spec"].get(k) != b["spec"].get(k)
            ]
            if differs:
                raise EtfError(
                    f"--encoders {a['name']}: the store of {label} ({b['path']}) has another spec than that of "
                    f"{labels[0]} ({a['path']}) in {', '.join(differs)}; a joint fit needs the same prior on every dataset"
                )
        if [g.to_json() for g in ps.groups] != [g.to_json() for g in first.groups]:
            raise EtfError(f"--encoders: the token groups of {label} differ from those of {labels[0]}")


@dataclass
class Part:
    """One dataset of a joint fit, with everything its batches, losses and metrics need."""

    label: str
    dataset: Dataset
    tasks: list[Task]
    priors: PriorSet
    targets: dict[str, tuple[np.ndarray, np.ndarray]]
    splits: Splits
    extra: dict[str, np.ndarray]
    batches: Batches | None = None
    memory: int = 0

    @property
    def rows(self) -> np.ndarray:
        return np.unique(np.concatenate([self.splits.train, *self.splits.evaluate.values()]))


def _seed(seed: int, k: int) -> int:
    """Dataset ``k``'s shuffling seed: an independent stream per dataset from the run's seed."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


# ---------------------------------------------------------------------------- selection


class Selection:
    """Which epoch a joint fit keeps, from its val metrics (higher score is better).

    With ``select`` a task name, that task's protocol metric alone (as a single fit selects by
    its first task). Otherwise the mean over every task of its protocol metric's relative
    change from the first epoch it is defined, signed so that improvement is positive:
    ``s_t (v_t - v_t,1) / max(|v_t,1|, REL_FLOOR)``, ``s_t`` -1 for lower-is-better metrics.
    Relative change puts accuracies, F1 and MAEs in years on one scale; a task whose metric
    is undefined (NaN) after it was defined makes the epoch the worst.
    """

    def __init__(self, parts: list[Part], select: str | None) -> None:
        self.metrics = {t.name: (t, selection_metric(t, p.dataset)) for p in parts for t in p.tasks}
        if select is not None and select not in self.metrics:
            raise EtfError(f"--select {select!r}: no such task (tasks: {', '.join(self.metrics)})")
        self.select = select
        self.reference: dict[str, float] = {}

    def describe(self) -> str:
        if self.select:
            task, metric = self.metrics[self.select]
            return f"val {task.name} {metric}"
        return "mean relative change over tasks of val " + ", ".join(f"{t} {m}" for t, (_, m) in self.metrics.items())

    def __call__(self, val: dict[str, dict[str, float]]) -> float:
        if self.select:
            return _score(*self.metrics[self.select], val)
        changes = []
        for name, (task, metric) in self.metrics.items():
            value = val.get(name, {}).get(metric, math.nan)
            if name not in self.reference:
                if not math.isnan(value):
                    self.reference[name] = value
                changes.append(0.0)
                continue
            if math.isnan(value):
                return -math.inf
            ref = self.reference[name]
            sign = 1.0 if task.higher_is_better else -1.0
            changes.append(sign * (value - ref) / max(abs(ref), REL_FLOOR))
        return float(np.mean(changes))


# ---------------------------------------------------------------------------- training


class TaskUncertainty(nn.Module):
    """Learned per-task log-variances ``s_t`` (Kendall, Gal and Cipolla, 2018), in the form
    ``exp(-s_t) L_t + s_t`` for every task kind: a noisier task weighs less, and the ``+ s_t``
    term keeps its weight from vanishing. Start at ``s_t = 0`` (weight 1)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.index = {n: k for k, n in enumerate(names)}
        self.log_var = nn.Parameter(torch.zeros(len(names)))

    def forward(self, name: str, loss: torch.Tensor) -> torch.Tensor:
        s = self.log_var[self.index[name]]
        return torch.exp(-s) * loss + s

    def values(self) -> dict[str, float]:
        return {n: float(self.log_var[k].detach()) for n, k in self.index.items()}


class _JointMember(_Member):
    """A :class:`_Member` whose loss weighs each task (``--task-weight``, learned
    log-variances) and whose epochs are scored by a :class:`Selection`."""

    def __init__(
        self,
        cfg: FitConfig,
        groups: list,
        tasks: list[Task],
        steps_per_epoch: int,
        device: torch.device,
        joint: JointConfig,
        selection: Selection,
        precision: str = "fp32",
    ) -> None:
        super().__init__(cfg, groups, tasks, steps_per_epoch, device, precision)
        self.weights = {t.name: float(joint.task_weights.get(t.name, 1.0)) for t in tasks}
        self.selection = selection
        self.uncertainty = TaskUncertainty([t.name for t in tasks]).to(device) if joint.uncertainty else None
        if self.uncertainty is not None:  # the log-variances train with the model, without decay
            trained = nn.ModuleDict({"model": self.model, "uncertainty": self.uncertainty})
            self.opt = _optimizer(trained, cfg.lr, cfg.weight_decay, cfg.optimizer)
            self.sched = schedule_for(self.opt, cfg, steps_per_epoch)

    def task_loss(self, out, targets, tasks):
        total = out[tasks[0].name].new_zeros(())
        for t in tasks:
            loss = t.loss(out[t.name], *targets[t.name])
            if self.uncertainty is not None:
                loss = self.uncertainty(t.name, loss)
            total = total + self.weights[t.name] * loss
        return total

    def end_joint_epoch(self, epoch: int, seen: int, rate: float, val: dict, predicted: list) -> None:
        score = self.selection(val)
        self.end_epoch(epoch, seen, rate, val, predicted, score)
        if self.uncertainty is not None:
            self.history[-1].update({f"log_var_{n}": v for n, v in self.uncertainty.values().items()})


def _cycle(part: Part) -> Any:
    """The dataset's training batches, pass after pass (each pass freshly shuffled)."""
    n = 0
    while True:
        yield from part.batches.iterate(part.splits.train, shuffle=True, epoch=n)
        n += 1


def _predict(parts: list[Part], models: list[nn.Module], which: str, device: torch.device, infer: str = "all"):
    """Per dataset, (rows, per model predictions) on split ``which`` (absent: skipped)."""
    out = {}
    for p in parts:
        rows = p.splits.evaluate.get(which)
        if rows is not None and len(rows):
            out[p.label] = predict_rows(models, p.tasks, p.batches, rows, device, infer)
    return out


def fit_joint(
    datasets: list[Dataset], configs: list[FitConfig], joint: JointConfig, overwrite: bool = False
) -> list[FitResult]:
    """Train one model per config jointly over ``datasets`` and write each run directory.
    ``cfg.tasks`` hold ``K=SPEC`` or ``NAME=SPEC`` strings (:func:`resolve_tasks`);
    ``cfg.test_split`` applies to the datasets without a test split of their own."""
    t0 = time.perf_counter()
    cfg = check_group(configs, overwrite)
    if len(datasets) < 2:
        raise EtfError("a joint fit takes at least two --data")
    if cfg.views == "random":
        raise EtfError("--views random: a joint fit trains on each store's clean view; use --views clean")
    if cfg.select_by != "metric":
        raise EtfError(f"--select-by {cfg.select_by}: a joint fit picks its epoch by --select (a task, or all)")
    labels = dataset_labels([d.name for d in datasets])
    tasks_by = resolve_tasks(datasets, cfg.tasks, labels)
    tasks = [t for ts in tasks_by for t in ts]
    unknown = sorted(set(joint.task_weights) - {t.name for t in tasks})
    if unknown:
        raise EtfError(f"--task-weight {unknown[0]}: no such task (tasks: {', '.join(t.name for t in tasks)})")
    for d in datasets:  # every dataset needs a test split (its own, or --test-split's) before any work
        own = any(s.startswith("test") for s in d.splits)
        evaluated_test_splits(d, None if own else cfg.test_split)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, without_bf16="fp32")
    priors: list[PriorSet] = []
    try:
        for d in datasets:
            priors.append(PriorSet(cfg.cache_dir, d, cfg.encoders, cfg.layers, cfg.tokens))
        check_priors_match(priors, labels)
        parts = []
        for label, d, ts, ps in zip(labels, datasets, tasks_by, priors):
            own = any(s.startswith("test") for s in d.splits)
            data_cfg = replace(cfg, test_split=None if own else cfg.test_split)
            try:
                parts.append(Part(label, d, ts, ps, *prepare_data(d, ps, ts, data_cfg)))
            except EtfError as e:
                raise EtfError(f"{label}: {e}") from None
        budget = cfg.max_memory or default_memory_budget()
        shares = memory_shares([p.priors.row_bytes() * len(p.rows) for p in parts], budget)
        for k, (p, share) in enumerate(zip(parts, shares)):
            on = device if device.type != "cpu" else None  # resident on an accelerator when they fit, as in fit_many
            p.memory = share
            p.batches = Batches(p.priors, p.rows, max(1, share), cfg.batch_size, _seed(cfg.seed, k), device=on)
        sizes = [len(p.splits.train) for p in parts]
        mix = mix_probabilities(joint.mix, sizes)
        steps = joint.steps_per_epoch or -(-max(sizes) // cfg.batch_size)
        every = [
            _JointMember(c, priors[0].groups, tasks, steps, device, joint, Selection(parts, joint.select), precision)
            for c in configs
        ]
        y_dev = [
            {
                t.name: (
                    torch.from_numpy(p.targets[t.name][0]).to(device),
                    torch.from_numpy(p.targets[t.name][1]).to(device),
                )
                for t in p.tasks
            }
            for p in parts
        ]
        streams = [_cycle(p) for p in parts]
        disable = None if cfg.progress is None else not cfg.progress
        bar = tqdm(range(cfg.epochs), desc=f"fit {'+'.join(c.fuser for c in configs)} over {'+'.join(labels)}",
                   unit="epoch", disable=disable)  # fmt: skip
        try:
            for epoch in bar:
                members = live(every)  # a diverged model stops; the others go on
                if not members:
                    break
                models = [m.model for m in members]
                for model in models:
                    model.train()
                te, seen = time.perf_counter(), 0
                for k in step_plan(mix, steps, cfg.seed, epoch):
                    idx, tokens = next(streams[k])
                    tokens = [t.to(device, non_blocking=True) for t in tokens]  # a no-op for resident tokens
                    sel = torch.from_numpy(idx).to(device)
                    batch = {name: (y[sel], m[sel]) for name, (y, m) in y_dev[k].items()}
                    for member in members:
                        member.step(tokens, batch, parts[k].tasks)
                    seen += len(idx)
                rate = seen / (time.perf_counter() - te)
                members = [m for m in members if m.check_loss(epoch + 1, seen)]
                models = [m.model for m in members]
                predicted = _predict(parts, models, "val", device)
                for j, member in enumerate(members):
                    val, mine = {}, {}
                    for p in parts:
                        order, preds = predicted[p.label]
                        val.update(evaluate(p.tasks, order, preds[j], p.targets, p.extra))
                        mine[p.label] = (order, preds[j])
                    member.end_joint_epoch(epoch + 1, seen, rate, val, mine)
                for first in live(members)[:1]:
                    bar.set_postfix(loss=f"{first.history[-1]['train_loss']:.4f}", sps=f"{rate:.0f}")
        finally:
            for s in streams:
                s.close()  # stops streaming readers
        members = [m for m in every if not m.diverged]  # those that stopped early too
        models = [m.model for m in members]
        for member in members:
            member.model.load_state_dict(member.best_state)
        results = [
            {
                p.label: {"val": {t.name: m.best_val[0][t.name] for t in p.tasks if t.name in m.best_val[0]}}
                for p in parts
            }
            for m in members
        ]
        predictions = [{p.label: [("val", *m.best_val[1][p.label])] for p in parts} for m in members]
        for split in dict.fromkeys(s for p in parts for s in p.splits.tests):
            for infer in INFER_MODES:
                name = split if infer == "all" else f"{split}:{infer}"
                for label, (order, preds) in _predict(parts, models, split, device, infer).items():
                    part = next(p for p in parts if p.label == label)
                    for j, p in enumerate(preds):
                        results[j][label][name] = evaluate(part.tasks, order, p, part.targets, part.extra)
                        predictions[j][label].append((name, order, p))
        shares_by = {
            p.label: attention_shares(models, p.batches, _test_rows(p), priors[0].names, device) for p in parts
        }
        sample = [t[:1].to(device) for t in next(parts[0].batches.iterate(parts[0].splits.val[:1], shuffle=False))[1]]
        seconds = time.perf_counter() - t0
        out = {m.cfg.out: FitResult(m.cfg.out, {}, "", m.diverged) for m in every if m.diverged}
        for j, member in enumerate(members):
            by_dataset = {}
            for p in parts:
                entry = {
                    **results[j][p.label],
                    "tasks": [t.name for t in p.tasks],
                    "splits": p.splits.counts(),
                    **({"held_out": p.splits.held_out} if p.splits.held_out else {}),
                    "streamed": p.batches.streamed,
                    "memory_share": p.memory,
                }
                if shares_by[p.label][j] is not None:
                    entry["attention_share"] = shares_by[p.label][j]
                by_dataset[p.label] = entry
            metrics = {
                "datasets": by_dataset,
                "best_epoch": member.best_epoch,
                "selected_by": member.selection.describe(),
                "mix": {p.label: float(q) for p, q in zip(parts, mix)},
                "steps_per_epoch": steps,
                "precision": precision,
                "task_weights": member.weights,
                **({"log_variance": member.uncertainty.values()} if member.uncertainty is not None else {}),
                **cost_metrics(member.model, priors[0], sample),
                "seconds": seconds,
            }
            pooled = _pooled_shares([(len(_test_rows(p)), shares_by[p.label][j]) for p in parts])
            if pooled is not None:
                metrics["attention_share"] = pooled
            with staged_dir(Path(member.cfg.out)) as run:
                summary = _write_joint(run, member, joint, parts, metrics, predictions[j])
                write_sums(run)
            out[member.cfg.out] = FitResult(member.cfg.out, metrics, summary)
    finally:
        for ps in priors:
            ps.close()
    return [out[m.cfg.out] for m in every]


def _test_rows(part: Part) -> np.ndarray:
    tests = part.splits.tests
    return np.unique(np.concatenate(list(tests.values()))) if tests else part.splits.val


def _pooled_shares(entries: list[tuple[int, dict[str, float] | None]]) -> dict[str, float] | None:
    """The datasets' attention shares averaged over their test samples (the report's plot)."""
    kept = [(n, s) for n, s in entries if s is not None and n]
    if not kept:
        return None
    total = sum(n for n, _ in kept)
    return {name: sum(n * s[name] for n, s in kept) / total for name in kept[0][1]}


# ---------------------------------------------------------------------------- run directory


def _write_joint(out: Path, member: _JointMember, joint: JointConfig, parts: list[Part], metrics, predictions) -> str:
    cfg, tasks = member.cfg, [t for p in parts for t in p.tasks]
    config = {
        **run_config(cfg, parts[0].dataset, tasks, parts[0].priors),  # "dataset": the first, for predict
        "datasets": [
            {
                "label": p.label,
                **dataset_record(p.dataset),
                "tasks": [t.name for t in p.tasks],
                "stores": [{"path": s["path"], "spec_hash": s["spec_hash"]} for s in p.priors.specs()],
            }
            for p in parts
        ],
        "joint": joint.to_json(),
    }
    write_model_files(out, config, parts[0].priors.specs(), metrics, member.model, member.history)
    _write_predictions(out / "predictions.csv", parts, tasks, predictions)
    for p in parts:
        every_prior = [x for x in predictions[p.label] if not x[0].endswith(":canonical")]
        ids = [p.dataset.ids[i] for _, order, _ in every_prior for i in order]
        for t in p.tasks:
            t.save_outputs(out, ids, np.concatenate([preds[t.name] for _, _, preds in every_prior]))
    summary = format_joint_summary(cfg, parts, metrics)
    (out / "summary.txt").write_text(summary + "\n")
    return summary


def _write_predictions(path: Path, parts: list[Part], tasks: list[Task], predictions) -> None:
    """predictions.csv as a single fit writes it, with a ``dataset`` column after ``split``;
    a row fills only its own dataset's task columns."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        header = ["id", "split", "dataset"]
        for t in tasks:
            header += [c for side in t.csv_columns() for c in side]
        w.writerow(header)
        for p in parts:
            mine = {t.name for t in p.tasks}
            for split, order, preds in predictions[p.label]:
                for k, i in enumerate(order):
                    row = [p.dataset.ids[i], split, p.label]
                    for t in tasks:
                        if t.name not in mine:
                            row += [""] * sum(map(len, t.csv_columns()))
                            continue
                        row += task_cells(t, *p.targets[t.name], i, preds[t.name][k])
                    w.writerow(row)


def format_joint_summary(cfg: FitConfig, parts: list[Part], metrics: dict[str, Any]) -> str:
    mix = ", ".join(f"{k} {v:.2f}" for k, v in metrics["mix"].items())
    lines = [
        f"run {cfg.out}: {cfg.fuser} over {', '.join(metrics['priors'])}, jointly on {', '.join(p.label for p in parts)}",
        f"best epoch {metrics['best_epoch']}/{cfg.epochs} by {metrics['selected_by']}",
        f"steps: {metrics['steps_per_epoch']} per epoch, drawn {mix}",
    ]
    for p in parts:
        m = metrics["datasets"][p.label]
        lines.append(
            f"{p.label} ({p.dataset.describe()}): samples  "
            + "  ".join(f"{k} {v}" for k, v in m["splits"].items())
            + (" (streamed from the stores)" if m["streamed"] else "")
        )
        lines += [f"  held out {k}: {v}" for k, v in m.get("held_out", {}).items()]
        splits = [s for s in m if s == "val" or s.startswith("test")]
        width = max(8, *map(len, splits))
        for split in splits:
            for t in p.tasks:
                if m[split].get(t.name):
                    lines.append(f"  {split:<{width}} {t.name:<12} " + format_metrics(m[split][t.name]))
    lines.append(f"cost     {metrics['fuser_params'] / 1e6:.3f} M trainable parameters, " + _cost(metrics, ""))
    lines.append(f"         canonical prior alone: {_cost(metrics, '_canonical')}")
    return "\n".join(lines)
