"""Stage 3: ablation grids from the cache, run in parallel, resumable, with a report.

A grid is the encoder subsets of ``--encoders`` times every combination of its axes
(fusers, attention and mask strategies, seeds, and any other fit setting given as a list in
a TOML file). Subsets keep the order of ``--encoders``, so the first encoder of a subset is
its canonical prior. The ``linear`` fuser reads only the canonical prior: it is the
*baseline* of every subset that starts with that prior, run once per (prior, seed, data and
optimisation settings, ``head``) with the default fuser settings otherwise, whether or not
``--fusers`` names it.

Each grid point is one fit in ``OUT/runs/<run id>``, the id a content hash of its resolved
FitConfig (without paths), the dataset key and its stores' spec hashes. ``done.json`` is
written last, once the run directory is complete: finished runs are skipped, a failed run
gets ``failed.json`` (its error) and is retried by the next call, and an interrupted grid
resumes. Points that differ only in model settings share the data and train together in one
``fit_many`` pass: one parallel job per such group, on joblib's loky (local processes), Dask
or Ray backend.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import traceback
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from etf.cache.catalog import store_name
from etf.cache.features import PriorSet, stop_resident
from etf.cache.location import Location, cache_location
from etf.data.base import Dataset, load_dataset
from etf.errors import EtfError
from etf.pipeline.ablate import BACKENDS, CORRECTIONS, SUBSETS
from etf.pipeline.ablate.report import REPORT_FILES, Metric, Run, write_report
from etf.pipeline.fit.checksums import sums_problem
from etf.pipeline.fit.config import INFER_MODES, FitConfig, FuserConfig, data_key, resolve
from etf.pipeline.fit.fusers import check_fuser
from etf.pipeline.fit.heads import parse_task, selection_metric, unique_names, with_recipe
from etf.pipeline.fit.mixing import JointConfig, assign, dataset_labels, parse_task_weights
from etf.pipeline.fit.train import evaluated_test_splits, fit_many
from etf.pipeline.probe.ablate import append_probe_section, probe_grid
from etf.utils import (
    canonical_json,
    claim_dir,
    mark_owned,
    owner_mark,
    parse_size,
    read_json,
    spec_hash,
    write_json_atomic,
)

BASELINE_FUSER = "linear"
#: how long to wait for a cluster named by --scheduler
CONNECT_SECONDS = 10

#: FitConfig and FuserConfig fields a grid may vary, with their defaults; the rest of
#: FitConfig is fixed by the grid itself
FIT_AXES = (
    "fuser",
    "seed",
    "layers",
    "tokens",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "train_fraction",
    "shots",
    "val_fraction",
    "max_memory",
    "device",
    "views",
    "feature_aug",
    "precision",
    "optimizer",
    "schedule",
    "early_stop",
    "select_by",
)
FUSER_AXES = tuple(f.name for f in fields(FuserConfig))
AXES = {f.name: f.default for f in fields(FitConfig) if f.name in FIT_AXES} | {
    f.name: f.default for f in fields(FuserConfig)
}
#: the axis of joint grids (several ``data``): how steps draw on the datasets
JOINT_AXES = {"mix": JointConfig.mix}
#: axes whose option has a plural name, and axes given as comma lists on the command line
PLURAL = {"fuser": "fusers", "seed": "seeds"}
COMMA_AXES = (
    "fuser", "seed", "attn", "mask", "prior_tokens", "fuse", "position_code", "head", "pool", "views", "mix"
)  # fmt: skip
#: settings that are not axes, with their defaults
OPTIONS = {
    "data": None,
    "crop": None,
    "cache": "cache",
    "out": None,
    "encoders": None,
    "tasks": [],
    "subsets": "all",
    "jobs": 1,
    "backend": "loky",
    "scheduler": None,
    "progress": False,
    "test_split": None,
    "correction": "holm",
    "metric_infer": "all",
    "recipe": "etf",
    "probe": False,
    # joint grids: fixed settings of every fit (see JointConfig)
    "task_weights": [],
    "uncertainty": False,
    "steps_per_epoch": None,
    "select": None,
}


def parse_subsets(spec: str, encoders: list[str]) -> list[tuple[str, ...]]:
    """Subsets of ``encoders`` in their order (smaller first): ``all``, ``singles``,
    ``leave-one-out`` (the full set and each set without one encoder), ``k=K`` or ``k=A..B``."""
    n = len(encoders)
    if spec == "singles":
        sizes = [1]
    elif spec == "all":
        sizes = list(range(1, n + 1))
    elif spec == "leave-one-out":
        sizes = sorted({max(1, n - 1), n})
    else:
        lo, sep, hi = spec.removeprefix("k=").partition("..")
        try:
            sizes = list(range(int(lo), int(hi if sep else lo) + 1)) if spec.startswith("k=") else []
        except ValueError:
            sizes = []
        if not sizes or not 1 <= sizes[0] <= sizes[-1] <= n:
            raise EtfError(f"--subsets {spec!r}: use {SUBSETS}, with 1 <= A <= B <= {n} (the number of --encoders)")
    return [c for k in sizes for c in itertools.combinations(encoders, k)]


# ---------------------------------------------------------------------------- settings


def load_toml(path: Path) -> dict[str, Any]:
    """An experiment file's settings; keys as the command's options (``batch_size`` or ``batch-size``)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise EtfError(f"--config {path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise EtfError(f"{path}: malformed TOML: {e}") from None
    settings = {k.replace("-", "_"): v for k, v in raw.items()}
    if len(settings) < len(raw):  # batch-size and batch_size: which one was meant?
        twice = next(k for k in raw if k.replace("-", "_") != k and k.replace("-", "_") in raw)
        raise EtfError(f"{path}: {twice!r} and {twice.replace('-', '_')!r} are one setting, given twice; keep one")
    known = {*OPTIONS, *(PLURAL.get(k, k) for k in AXES), *JOINT_AXES}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise EtfError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return settings


def _listed(value: Any) -> list[Any]:
    """A TOML list, or a comma-separated string from the command line, as a list."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def _check_type(name: str, value: Any, hint: Any, where: str | None) -> Any:
    """``value`` if it has the field's type (ints pass for floats; None only where allowed)."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in allowed if isinstance(t, type)):
        return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise EtfError(f"{where + ': ' if where else ''}{name} = {value!r}: expected {names}")


@dataclass
class Grid:
    """What ``etf ablate`` runs: the subsets of ``encoders`` times every combination of ``axes``.
    Several ``data`` make every point a joint fit (``joint`` its fixed settings, ``mix`` an axis)."""

    data: list[str]
    cache: Location
    out: Path | None
    encoders: list[str]
    crop: str | None = None
    tasks: list[str] = field(default_factory=list)
    subsets: str = "all"
    axes: dict[str, list[Any]] = field(default_factory=dict)
    jobs: int = 1
    backend: str = "loky"
    scheduler: str | None = None
    progress: bool = False
    test_split: str | None = None
    correction: str = "holm"
    #: the inference mode of the report's metric: every prior, or the canonical prior alone
    metric_infer: str = "all"
    joint: JointConfig | None = None
    #: the recipe the unset settings came from (see ``apply_recipe``); its task options apply in planning
    recipe: str = "etf"
    #: run ``etf probe`` over the priors first and add its section to the report
    probe: bool = False

    @classmethod
    def from_settings(cls, settings: dict[str, Any], where: str | None = None, dry_run: bool = False) -> Grid:
        """Settings from the command line and/or a TOML file (``where``, named in errors).
        Axis values come as lists (a list in TOML is an axis) or as comma-separated strings
        (``fusers``, ``seeds``, ``attn``, ``mask``). A dry run needs no ``out``."""
        s = {**OPTIONS, **settings}
        for key in ("data", "encoders") if dry_run else ("data", "encoders", "out"):
            if not s.get(key):
                raise EtfError(f"--{key}: required (on the command line or in the --config file)")
        if s["backend"] not in BACKENDS:
            raise EtfError(f"--backend {s['backend']!r}: use one of {', '.join(BACKENDS)}")
        if s["scheduler"] and s["backend"] == "loky":
            raise EtfError("--scheduler: needs --backend dask or ray")
        if s["metric_infer"] not in INFER_MODES:
            raise EtfError(f"--metric-infer {s['metric_infer']!r}: use {' or '.join(INFER_MODES)}")
        if not isinstance(s["jobs"], int) or s["jobs"] < 1:
            raise EtfError(f"--jobs {s['jobs']!r}: must be a positive integer")
        if s["correction"] not in CORRECTIONS:
            raise EtfError(f"--correction {s['correction']!r}: use one of {', '.join(CORRECTIONS)}")
        hints = {**typing.get_type_hints(FitConfig), **typing.get_type_hints(FuserConfig)}
        axes: dict[str, list[Any]] = {}
        for key, default in AXES.items():
            option = PLURAL.get(key, key)
            raw = s.get(option, default)
            values = _listed(raw) if key in COMMA_AXES else raw if isinstance(raw, list) else [raw]
            if key == "max_memory":
                values = [parse_size(v) if isinstance(v, str) else v for v in values]
            if key == "seed":
                values = [_int(v, option) for v in values]
            if not values:
                raise EtfError(f"--{option.replace('_', '-')}: give at least one value")
            axes[key] = list(dict.fromkeys(_check_type(key, v, hints[key], where) for v in values))
        for f in axes["fuser"]:
            check_fuser(f, "--fusers")
        data = list(s["data"]) if isinstance(s["data"], (list, tuple)) else [s["data"]]
        joint = _joint_settings(s, len(data))
        if joint is not None:
            axes["mix"] = list(dict.fromkeys(_listed(s.get("mix") or joint.mix)))
            for mix in axes["mix"]:
                JointConfig(mix=mix)
        tasks = s["tasks"]
        return cls(
            data=data,
            cache=cache_location(s["cache"]),
            out=check_grid_out(Path(s["out"])) if s.get("out") else None,
            encoders=_listed(s["encoders"]),
            crop=s["crop"],
            tasks=[tasks] if isinstance(tasks, str) else list(tasks),
            subsets=str(s["subsets"]),
            axes=axes,
            jobs=s["jobs"],
            backend=s["backend"],
            scheduler=s["scheduler"],
            progress=bool(s["progress"]),
            test_split=s["test_split"],
            correction=s["correction"],
            metric_infer=s["metric_infer"],
            joint=joint,
            recipe=s["recipe"],
            probe=bool(s["probe"]),
        )


def check_grid_out(out: Path) -> Path:
    """``--out``: new, empty, or a grid etf wrote (marked, or from before grids were marked:
    holding only runs/ and the report's files); never a cache or a folder of other files."""
    if out.is_dir() and owner_mark(out) is None and {p.name for p in out.iterdir()} <= {"runs", *REPORT_FILES}:
        return out
    return claim_dir(out, "--out", "grid")


def _joint_settings(s: dict[str, Any], datasets: int) -> JointConfig | None:
    """The fixed joint-fit settings of a grid over several datasets (None for one, which takes none)."""
    flags = {"mix": "--mix", "task_weights": "--task-weight", "uncertainty": "--uncertainty"}
    flags |= {"steps_per_epoch": "--steps-per-epoch", "select": "--select"}
    if datasets == 1:
        given = [flag for k, flag in flags.items() if s.get(k) not in (None, [], (), False)]
        if given:
            raise EtfError(f"{', '.join(given)}: for a joint grid over several --data; this grid has one")
        return None
    weights = s["task_weights"]
    return JointConfig(
        task_weights=weights if isinstance(weights, dict) else parse_task_weights(list(weights)),
        uncertainty=bool(s["uncertainty"]),
        steps_per_epoch=s["steps_per_epoch"],
        select=s["select"],
    )


def _int(value: Any, flag: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EtfError(f"--{flag} {value!r}: expected integers") from None


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Point:
    """One run of the grid: its fit config, its labels in the report and its baseline's id."""

    run_id: str
    config: FitConfig
    labels: dict[str, Any]
    baseline: str
    #: a joint fit's settings (None: a fit of one dataset)
    joint: JointConfig | None = None

    @property
    def dir(self) -> Path:
        return Path(self.config.out)


@dataclass
class Plan:
    """A grid resolved against the cache: every point with its run id, grouped for fit_many."""

    grid: Grid
    datasets: list[Dataset]
    points: list[Point]
    #: what the report compares: the first task's metric, or for a joint grid every task's
    metrics: list[Metric]

    @property
    def dataset(self) -> Dataset:
        return self.datasets[0]

    @property
    def metric(self) -> Metric:
        return self.metrics[0]

    def groups(self) -> list[list[Point]]:
        """Points that share the data (same subset, seed, data and joint settings), seed-major
        so an interrupted grid has complete seeds first."""
        groups: dict[str, list[Point]] = {}
        for p in self.points:
            joint = p.joint.to_json() if p.joint else None
            groups.setdefault(canonical_json([data_key(p.config), joint]), []).append(p)
        return sorted(groups.values(), key=lambda g: g[0].config.seed)


def plan_grid(grid: Grid) -> Plan:
    """Resolve ``grid``: open the dataset, check every store and task, expand and hash the points.

    Everything a run would trip over in the same way for all runs (an unknown encoder, a
    missing store, a bad task) is an error here, before anything runs.
    """
    if len(set(grid.encoders)) != len(grid.encoders):
        raise EtfError(f"--encoders {','.join(grid.encoders)}: an encoder is named twice")
    subsets = parse_subsets(grid.subsets, grid.encoders)
    datasets = [load_dataset(d, crop=grid.crop) for d in grid.data]
    stores_by, store_names = _stores(grid, datasets)
    stores = stores_by[0]
    if grid.joint is None:
        dataset = datasets[0]
        task_specs = with_recipe(grid.tasks or dataset.tasks, grid.recipe)
        if not task_specs:
            raise EtfError(f"--task: {dataset.describe()} has no default task; give e.g. --task classify:COLUMN")
        tasks = [parse_task(t, dataset) for t in task_specs]
        unique_names(tasks)
        task_kinds = [t.kind for t in tasks]
        t = tasks[0]
        metrics = [
            Metric(t.name, t.kind, selection_metric(t, dataset), _test_splits(dataset, grid), t.higher_is_better,
                   grid.metric_infer)
        ]  # fmt: skip
        data_id: dict[str, Any] = {"dataset": dataset.key}
    else:
        from etf.pipeline.fit.joint import resolve_tasks

        labels = dataset_labels([d.name for d in datasets])
        per = [mine or list(d.tasks) for mine, d in zip(assign(grid.tasks, labels, "--task"), datasets)]
        task_specs = with_recipe([f"{k + 1}={spec}" for k, mine in enumerate(per) for spec in mine], grid.recipe)
        joint_tasks = list(zip(labels, datasets, resolve_tasks(datasets, task_specs, labels)))
        task_kinds = [t.kind for _, _, ts in joint_tasks for t in ts]
        metrics = [
            Metric(t.name, t.kind, selection_metric(t, d), _test_splits(d, grid), t.higher_is_better,
                   grid.metric_infer, label)
            for label, d, ts in joint_tasks
            for t in ts
        ]  # fmt: skip
        if grid.joint.select is not None and grid.joint.select not in {m.task for m in metrics}:
            raise EtfError(
                f"--select {grid.joint.select!r}: no such task (tasks: {', '.join(m.task for m in metrics)})"
            )
        data_id = {"datasets": [d.key for d in datasets], "joint": grid.joint.to_json()}

    names = list(grid.axes)
    varied = [k for k in names if len(grid.axes[k]) > 1 and k not in ("fuser", "attn", "mask", "seed")]
    points: dict[str, Point] = {}

    def add(subset: tuple[str, ...], values: dict[str, Any]) -> str:
        # resolved for the fitted tasks: a setting no model of this point reads is None, so its points merge
        fuser_cfg = resolve(values["fuser"], FuserConfig(**{k: values[k] for k in FUSER_AXES}), task_kinds)
        cfg = FitConfig(
            cache_dir=grid.cache,
            encoders=list(subset),
            out=Path(),
            tasks=list(task_specs),
            fuser_config=fuser_cfg,
            progress=grid.progress,
            test_split=grid.test_split,
            recipe=grid.recipe,
            **{k: values[k] for k in FIT_AXES},
        )
        hashed = {k: v for k, v in cfg.to_json().items() if k not in ("out", "cache_dir", "progress")}
        hashed["encoders"] = [store_names[e] for e in subset]  # however the stores were named on the command line
        joint = replace(grid.joint, mix=values["mix"]) if grid.joint else None
        if joint is None:
            run_id = spec_hash({"fit": hashed, **data_id, "stores": [stores[e] for e in subset]})
        else:
            by_data = [[st[e] for e in subset] for st in stores_by]
            run_id = spec_hash({"fit": hashed, **data_id, "mix": joint.mix, "stores": by_data})
        if run_id not in points:
            baseline = run_id if values["fuser"] == BASELINE_FUSER else add(subset[:1], _as_baseline(values))
            labels = {
                "subset": "+".join(subset),
                "priors": len(subset),
                "fuser": values["fuser"],
                # as resolved: a setting the fuser does not read shows as None (and its points merge)
                **{
                    k: getattr(cfg.fuser_config, k) if k in FUSER_AXES else values[k] for k in ("attn", "mask", *varied)
                },
                **({"mix": values["mix"]} if joint else {}),
                "seed": values["seed"],
            }
            out = (grid.out or Path()) / "runs" / run_id
            points[run_id] = Point(run_id, replace(cfg, out=out), labels, baseline, joint)
        return run_id

    for subset in subsets:
        for combo in itertools.product(*(grid.axes[k] for k in names)):
            values = dict(zip(names, combo))
            if values["fuser"] == BASELINE_FUSER:
                add(subset[:1], _as_baseline(values))
            else:
                add(subset, values)
    return Plan(grid, datasets, list(points.values()), metrics)


def _stores(grid: Grid, datasets: list[Dataset]) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Per dataset, the spec hash of each encoder's store (a joint grid's must match), and the
    name each store was written under (``vit_b`` for ``vit_b-1a2b`` or a store's path): what
    a run's identity holds, so that it does not change with how ``--encoders`` names a store."""
    priors: list[PriorSet] = []
    try:
        for d in datasets:
            priors.append(PriorSet(grid.cache, d, grid.encoders))
        if len(priors) > 1:
            from etf.pipeline.fit.joint import check_priors_match

            check_priors_match(priors, dataset_labels([d.name for d in datasets]))
        names = {s["name"]: store_name(s["path"]) for s in priors[0].specs()}
        return [{s["name"]: s["spec_hash"] for s in p.specs()} for p in priors], names
    except EtfError as e:
        raise EtfError(f"--encoders: {e}") from None
    finally:
        for p in priors:
            p.close()


def _test_splits(dataset: Dataset, grid: Grid) -> tuple[str, ...]:
    """The test splits a grid compares on (for a joint grid, ``--test-split`` declares those
    of the datasets without their own)."""
    own = any(s.startswith("test") for s in dataset.splits)
    declared = None if grid.joint is not None and own else grid.test_split
    splits = evaluated_test_splits(dataset, declared)
    if not splits:
        raise EtfError(
            f"--test-split {grid.test_split}: etf ablate compares on a test split; declare one (holdout:F or val)"
        )
    return tuple(splits)


#: the fuser settings the baseline reads: it reads the canonical prior as the point does (its
#: pooled token, normalised or not) and its heads are the point's heads, reading what they read
BASELINE_READS = ("head", "pool", "canonical_norm", "readout")


def _as_baseline(values: dict[str, Any]) -> dict[str, Any]:
    """The baseline of a point: the linear fuser with default fuser settings but the ones it
    reads (:data:`BASELINE_READS`), same data, optimisation and seed."""
    return {**values, "fuser": BASELINE_FUSER, **{k: AXES[k] for k in FUSER_AXES if k not in BASELINE_READS}}


# ---------------------------------------------------------------------------- records


def status(point: Point) -> str:
    """``done`` (complete run directory), ``failed`` (retried next time) or ``pending``."""
    if (point.dir / "done.json").exists():
        return "done"
    return "failed" if (point.dir / "failed.json").exists() else "pending"


def _recheck_done(points: list[Point], echo: Callable[[str], None]) -> None:
    """A finished run whose files changed since its fit (see :mod:`etf.pipeline.fit.checksums`)
    or whose metrics.json cannot be read (a run fitted before runs carried checksums) is no
    result: it is recorded as failed, with one line, and fitted again, rather than stopping
    every later call of the grid."""
    for point in points:
        problem = _done_problem(point.dir) if status(point) == "done" else None
        if problem:
            echo(f"  {point.dir}: {problem}; fitting it again")
            (point.dir / "done.json").unlink()
            _record_failure(point, EtfError(problem))


def _done_problem(run: Path) -> str | None:
    problem = sums_problem(run)
    if problem:
        return problem
    try:
        return None if isinstance(read_json(run / "metrics.json"), dict) else "metrics.json holds no JSON object"
    except EtfError:
        return "metrics.json cannot be read"


def _record_done(point: Point, seconds: float, group: list[Point]) -> None:
    (point.dir / "failed.json").unlink(missing_ok=True)
    mark_owned(point.dir, "run", ["done.json"])  # first: what the run directory holds is etf's
    write_json_atomic(
        point.dir / "done.json",
        {"run_id": point.run_id, "labels": point.labels, "seconds": seconds, "trained_with": [p.run_id for p in group]},
    )


def _record_failure(point: Point, error: BaseException) -> str:
    path = point.dir / "failed.json"
    attempts = read_json(path).get("attempts", 0) + 1 if path.exists() else 1
    message = f"{type(error).__name__}: {error}" if not isinstance(error, EtfError) else str(error)
    mark_owned(point.dir, "run", ["failed.json"])  # a retry may replace the directory
    write_json_atomic(
        path,
        {
            "run_id": point.run_id,
            "labels": point.labels,
            "error": message,
            "attempts": attempts,
            "traceback": traceback.format_exception(error),
        },
    )
    return message


@contextmanager
def limit_threads(threads: int) -> Iterator[None]:
    """At most ``threads`` threads for torch and the BLAS/OpenMP pools, so parallel jobs do
    not oversubscribe the cores; restored afterwards (in-process workers share them)."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            yield
    finally:
        torch.set_num_threads(before)


def _as_child(parent: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a worker; a worker process that the grid's process started itself (loky's)
    first arranges to exit when that process dies, rather than go on fitting for nobody and
    overlap a re-run of the grid (``kill -9`` runs no cleanup in the parent)."""
    if os.getpid() != parent and os.getppid() == parent:
        _exit_with_parent(parent)
    return fn(*args)


#: the process this worker watches, once it does
_WATCHED: list[int] = []


def _exit_with_parent(parent: int) -> None:
    """Exit this process at once when it is orphaned: its parent died and it was re-parented."""
    if _WATCHED:
        return
    _WATCHED.append(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)  # what it was fitting resumes from its last saved epoch next time

    threading.Thread(target=watch, name="etf-exit-with-parent", daemon=True).start()


def run_group(datasets: list[Dataset], group: list[Point], threads: int, jobs: int = 1) -> list[tuple[str, str, str]]:
    """One parallel job: fit a group in one pass and record each run. Never raises for a run's
    error: it returns (run id, ``done``/``failed``, message) per point.

    The worker keeps the tokens it reads resident (on the group's device) for its next
    groups, within its share (1/``jobs``) of the memory budget: each store is read once per
    worker, not once per group."""
    from etf.cache.features import default_device_budget, default_memory_budget, keep_resident
    from etf.pipeline.extract.run import resolve_device

    device = resolve_device(group[0].config.device)
    budget = default_device_budget(device) if device.type == "cuda" else default_memory_budget()
    keep_resident(device, budget // max(1, jobs))
    with limit_threads(threads):
        return _fit_group(datasets, group)


def _fit_group(datasets: list[Dataset], group: list[Point]) -> list[tuple[str, str, str]]:
    configs = [p.config for p in group]
    try:  # the grid owns its run directories
        if group[0].joint is None:
            results = fit_many(datasets[0], configs, overwrite=True)
        else:
            from etf.pipeline.fit.joint import fit_joint

            results = fit_joint(datasets, configs, group[0].joint, overwrite=True)
    except Exception as e:  # any run's error is recorded, the grid goes on
        if len(group) > 1:  # one model's failure must not sink the others: fit them one by one
            return [r for p in group for r in _fit_group(datasets, [p])]
        return [(group[0].run_id, "failed", _record_failure(group[0], e))]
    out = []
    for p, r in zip(group, results):
        if r.diverged:  # a failed run, never a row
            out.append((p.run_id, "failed", _record_failure(p, EtfError(r.diverged))))
        else:
            _record_done(p, r.metrics["seconds"], group)
            out.append((p.run_id, "done", ""))
    return out


# ---------------------------------------------------------------------------- execution


@contextmanager
def _backend(grid: Grid, threads: int) -> Iterator[dict[str, Any]]:
    """joblib ``parallel_config`` arguments for ``--backend``, with its cluster client open."""
    if grid.backend == "loky":
        yield {"backend": "loky", "inner_max_num_threads": threads}
    elif grid.backend == "dask":
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise EtfError("--backend dask: dask is not installed; pip install 'etf[dask]'") from None
        if grid.scheduler:
            try:
                client = Client(grid.scheduler, timeout=CONNECT_SECONDS)
            except Exception as e:  # refused, timed out, or something else answering at that address
                raise EtfError(
                    f"--scheduler {grid.scheduler}: no Dask scheduler answered within {CONNECT_SECONDS} s "
                    f"({type(e).__name__}: {str(e)[:120]})"
                ) from None
            with client:
                yield {"backend": "dask"}
        else:
            with LocalCluster(n_workers=grid.jobs, threads_per_worker=1) as cluster, Client(cluster):
                yield {"backend": "dask"}
    else:
        try:
            import ray
            from ray.util.joblib import register_ray
        except ImportError:
            raise EtfError("--backend ray: ray is not installed; pip install 'etf[ray]'") from None
        register_ray()
        # without --scheduler: a local instance with one CPU (one worker process) per job
        local = {"num_cpus": grid.jobs, "include_dashboard": False, "log_to_driver": False}
        try:
            ray.init(address=grid.scheduler) if grid.scheduler else ray.init(**local)
        except Exception as e:  # refused, timed out, not a Ray head
            what = (
                f"--scheduler {grid.scheduler}: cannot join the Ray cluster"
                if grid.scheduler
                else "--backend ray: cannot start a local Ray instance"
            )
            raise EtfError(f"{what} ({type(e).__name__}: {str(e)[:120]})") from None
        try:
            yield {"backend": "ray"}
        finally:
            ray.shutdown()


@dataclass
class Outcome:
    """What one ``etf ablate`` call did; ``stopped`` says why the executor gave up, if it did."""

    report: Path
    runs: int
    reused: int
    groups: int
    done: int = 0
    failed: list[tuple[Point, str]] = field(default_factory=list)
    stopped: str | None = None


def run_grid(plan: Plan, echo: Callable[[str], None] = lambda line: None) -> Outcome:
    """Run every point not yet done (failed ones again), in groups, in parallel; then write the report."""
    import joblib

    grid = plan.grid
    by_id = {p.run_id: p for p in plan.points}
    _recheck_done(plan.points, echo)
    todo = [[p for p in g if status(p) != "done"] for g in plan.groups()]
    todo = [g for g in todo if g]
    mark_owned(grid.out, "grid")
    outcome = Outcome(grid.out / "report.md", len(plan.points), len(plan.points) - sum(map(len, todo)), len(todo))
    threads = max(1, joblib.cpu_count() // grid.jobs)
    probed = probe_grid(plan, echo) if grid.probe else None
    echo(
        f"grid: {outcome.runs} runs ({outcome.reused} already done), {sum(map(len, todo))} to fit in {len(todo)} "
        f"group(s) on {grid.jobs} {grid.backend} worker(s) x {threads} thread(s); runs in {grid.out / 'runs'}"
    )
    if todo:
        with _backend(grid, threads) as config, joblib.parallel_config(**config):
            as_ = "list" if grid.backend == "ray" else "generator_unordered"
            jobs = joblib.Parallel(n_jobs=grid.jobs, return_as=as_)(
                joblib.delayed(_as_child)(os.getpid(), run_group, plan.datasets, g, threads, grid.jobs) for g in todo
            )
            try:
                for k, results in enumerate(jobs, 1):
                    for run_id, state, message in results:
                        outcome.done += state == "done"
                        if state == "failed":
                            labels = by_id[run_id].labels
                            outcome.failed.append((by_id[run_id], message))
                            echo(f"  failed: {labels['subset']} {labels['fuser']} seed {labels['seed']}: {message}")
                    first = by_id[results[0][0]].labels
                    ok = sum(s == "done" for _, s, _ in results)
                    echo(f"[{k}/{len(todo)}] {first['subset']} seed {first['seed']}: {ok}/{len(results)} run(s) done")
            except Exception as e:  # a worker died (out of memory, a signal): keep what finished
                outcome.stopped = f"{type(e).__name__}: {e}"
            finally:  # one job runs in this process: free what it kept resident
                stop_resident()
    runs = [_as_run(p) for p in plan.points]
    if grid.joint is None:
        norms = _nme_norms(plan.dataset)
    else:
        labels = dataset_labels([d.name for d in plan.datasets])
        norms = {label: _nme_norms(d) for label, d in zip(labels, plan.datasets)}
    report = write_report(runs, plan.metrics, grid.out, _title(grid), grid.correction, norms)
    if probed is not None:
        append_probe_section(report, probed)
    return outcome


def _nme_norms(dataset: Dataset) -> dict[str, float] | None:
    """The dataset's NME normaliser per sample id (in crop coordinates), when it has one."""
    if "nme_norm" not in dataset.label_columns:
        return None
    return {i: float("nan") if v is None else float(v) for i, v in zip(dataset.ids, dataset.column("nme_norm"))}


def _as_run(point: Point) -> Run:
    state = status(point)
    error = read_json(point.dir / "failed.json")["error"] if state == "failed" else None
    return Run(point.run_id, point.labels, point.baseline, point.dir, state, error)


def _title(grid: Grid) -> str:
    return f"{' + '.join(grid.data)}: {', '.join(grid.encoders)} ({grid.subsets})"
