"""``etf data check``: what a dataset holds and what is wrong with it, before any extraction.

Counts per split and per class, label sanity (class indices out of range, NaN or infinite
values, columns with no value at all, default tasks naming absent columns), and image
files that are missing or unreadable (header check, :func:`check_image`). The report is
plain text; :attr:`CheckReport.problems` decides the exit status.
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from numbers import Number

from etf.data.base import Dataset, get_adapter
from etf.data.images import check_image
from etf.data.labels import parse_task, point_columns
from etf.errors import EtfError

SHOW = 5  # bad files listed by name; the rest are counted


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        verdict = ["ok"] if self.ok else [f"{len(self.problems)} problem(s):", *(f"  - {p}" for p in self.problems)]
        return "\n".join([*self.lines, *verdict])


def split_order(splits: list[str]) -> list[str]:
    fixed = [s for s in ("train", "val", "test") if s in splits]
    return fixed + sorted(s for s in set(splits) if s not in fixed)


def check_dataset(dataset: Dataset, images: bool = True, workers: int = 8) -> CheckReport:
    report = CheckReport()
    counts = Counter(dataset.splits)
    order = split_order(list(counts))
    metric = get_adapter(dataset.name).metric or "-"
    try:
        key = dataset.key
    except ValueError as e:  # NaN labels cannot be hashed; reported below
        key = f"none: {e}"
    report.lines += [
        f"{dataset.describe()}  (dataset key {key})",
        f"samples  {len(dataset)}: " + ", ".join(f"{s} {counts[s]}" for s in order),
        f"tasks    {', '.join(dataset.tasks) or '(none: give --task)'}; metric {metric}",
    ]
    if dataset.options:
        report.lines.append("options  " + ", ".join(f"{k}={v}" for k, v in dataset.options.items()))
    if dataset.skipped:
        first = dataset.skipped[0]
        report.lines.append(
            f"skipped  {len(dataset.skipped)} by the adapter (first: {first['id']}: {first.get('reason', '')})"
        )
    _check_tasks(dataset, report)
    report.lines += protocol_lines(dataset)
    _check_labels(dataset, order, report)
    if images:
        _check_images(dataset, report, workers)
    return report


def protocol_lines(dataset: Dataset) -> list[str]:
    """The evaluation protocol a dataset ships: per split, its pairs (matched, mismatched) and
    folds, the unit that verification results are reported in."""
    lines = []
    for split, p in (dataset.pairs or {}).items():
        matched = sum(p["same"])
        folds = f"{len(set(p['fold']))} folds" if "fold" in p else "no folds (10 stratified folds are drawn)"
        lines.append(
            f"protocol {split}: {len(p['same'])} pairs ({matched} matched, {len(p['same']) - matched} mismatched), {folds}"
        )
    return lines


def _check_tasks(dataset: Dataset, report: CheckReport) -> None:
    for text in dataset.tasks:
        try:
            task = parse_task(text)
            columns = task.columns(dataset.label_columns)
        except EtfError as e:
            report.problems.append(str(e))
            continue
        if task.kind == "classify":  # what etf fit would refuse after the extraction
            values = {v for v in dataset.column(columns[0]) if v is not None}
            if len(values) < 2:
                report.problems.append(f"task {text}: {len(values)} class(es) labelled; a classifier needs two or more")


def _check_labels(dataset: Dataset, order: list[str], report: CheckReport) -> None:
    points = point_columns(dataset.label_columns)
    in_points = {c for pairs in points.values() for pair in pairs for c in pair}
    for col in dataset.classes:
        if col not in dataset.label_columns:
            report.problems.append(f"classes are given for {col!r}, which is not a label column")
    report.lines.append("labels")
    for prefix, pairs in points.items():
        xs = [v for x, _ in pairs for v in dataset.column(x) if isinstance(v, Number)]
        ys = [v for _, y in pairs for v in dataset.column(y) if isinstance(v, Number)]
        _finite(f"{prefix}* points", xs + ys, report)
        span = f"x {min(xs):.1f}..{max(xs):.1f}, y {min(ys):.1f}..{max(ys):.1f}" if xs and ys else "no values"
        report.lines.append(f"  {prefix}<i>_x/_y  {len(pairs)} points; {span}")
    for col in dataset.label_columns:
        if col in in_points:
            continue
        values = dataset.column(col)
        present = [v for v in values if v is not None]
        if not present:
            report.problems.append(f"label column {col!r} has no value for any sample")
            continue
        flat = [x for v in present for x in (v if isinstance(v, list | tuple) else [v])]
        nums = [v for v in flat if isinstance(v, Number) and not isinstance(v, bool)]
        if len(nums) != len(flat):
            odd = next(v for v in flat if not isinstance(v, Number) or isinstance(v, bool))
            report.problems.append(f"label column {col!r} holds values that are not numbers (e.g. {odd!r})")
            continue
        _finite(f"label column {col!r}", nums, report)
        missing = f", {len(values) - len(present)} missing" if len(present) < len(values) else ""
        if col in dataset.classes:
            _class_table(dataset, col, order, report)
        else:
            finite = [v for v in nums if math.isfinite(v)]
            stats = f"min {min(finite):g}, mean {sum(finite) / len(finite):.4g}, max {max(finite):g}" if finite else ""
            report.lines.append(f"  {col:<14} {len(present)} values{missing}; {stats}")


def _finite(what: str, values: list[float], report: CheckReport) -> None:
    bad = sum(1 for v in values if not math.isfinite(v))
    if bad:
        report.problems.append(f"{what}: {bad} NaN or infinite value(s)")


def _class_table(dataset: Dataset, col: str, order: list[str], report: CheckReport) -> None:
    names = dataset.classes[col]
    counts = {s: Counter() for s in order}
    bad = []
    for sample, v in zip(dataset.samples, dataset.column(col)):
        if v is None:
            continue
        if not (float(v).is_integer() and 0 <= v < len(names)):
            bad.append((sample.id, v))
            continue
        counts[sample.split][int(v)] += 1
    if bad:
        report.problems.append(
            f"label column {col!r}: {len(bad)} value(s) outside the {len(names)} classes (first: sample {bad[0][0]!r} has {bad[0][1]})"
        )
    width = max(len(n) for n in names)
    report.lines.append(f"  {col}  {'class':<{width}}  " + "  ".join(f"{s:>7}" for s in order))
    for i, name in enumerate(names):
        report.lines.append(f"  {'':<{len(col)}}  {name:<{width}}  " + "  ".join(f"{counts[s][i]:>7}" for s in order))
        if sum(counts[s][i] for s in order) == 0:
            report.lines[-1] += "  (no sample)"


def _check_images(dataset: Dataset, report: CheckReport, workers: int) -> None:
    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(pool.map(lambda s: check_image(s.path), dataset.samples))
    missing = [s for s, r in zip(dataset.samples, reasons) if r == "file not found"]
    unreadable = [(s, r) for s, r in zip(dataset.samples, reasons) if r and r != "file not found"]
    report.lines.append(f"images   {len(dataset)} checked: {len(missing)} missing, {len(unreadable)} unreadable")
    for s in missing[:SHOW]:
        report.lines.append(f"  missing     {s.id}: {s.path}")
    for s, reason in unreadable[:SHOW]:
        report.lines.append(f"  unreadable  {s.id}: {reason}")
    if missing:
        report.problems.append(f"{len(missing)} image file(s) missing (first: {missing[0].path})")
    if unreadable:
        report.problems.append(
            f"{len(unreadable)} image file(s) unreadable (first: {unreadable[0][0].path}: {unreadable[0][1]})"
        )
