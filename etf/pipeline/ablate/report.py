"""The ablation report: every configuration against its single-prior baseline, on every test split.

``write_report`` reads the finished runs (``metrics.json``, ``predictions.csv``) and writes
``report.md``, ``results.csv``, ``results.json`` and PNG plots (matplotlib figures drawn
without a display). A configuration is a grid point without its seed; its summary is over
seeds, and its comparison with the baseline counts seed and test-sample variance together
(:func:`etf.pipeline.ablate.stats.compare`), corrected for multiple comparisons across
every configuration and test split of the report.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from etf.pipeline.ablate.stats import ALPHA, adjust, compare, interval, paired_seed_tests, summarize
from etf.pipeline.ablate.terms import Terms, mean_terms, sample_terms
from etf.pipeline.fit.metrics import metric_bounds
from etf.utils import atomic_path, read_json, write_json_atomic

#: labels every configuration has; others appear in its name only where the grid varies them
FIXED_LABELS = ("subset", "priors", "fuser")
#: bootstrap draws of the test samples per comparison (they estimate a variance, not a tail)
RESAMPLES = 2000


@dataclass(frozen=True)
class Metric:
    """What the report compares: metric ``name`` of task ``task`` on each of ``splits`` (the
    first is the plots'), evaluated with every prior (``infer="all"``) or the canonical prior
    alone (``"canonical"``)."""

    task: str
    kind: str
    name: str
    splits: tuple[str, ...]
    higher_is_better: bool
    infer: str = "all"
    #: a joint fit's dataset label: the task's metrics sit under ``datasets`` in metrics.json
    dataset: str | None = None

    def key(self, split: str) -> str:
        """The split's name in metrics.json and predictions.csv for this inference mode."""
        return split if self.infer == "all" else f"{split}:{self.infer}"

    def other(self) -> Metric:
        """The same metric in the other inference mode."""
        return replace(self, infer="canonical" if self.infer == "all" else "all")

    def title(self, split: str) -> str:
        mode = "" if self.infer == "all" else ", canonical prior alone"
        where = f"{self.dataset} " if self.dataset else ""
        return f"{where}{split} {self.task} {self.name}{mode}"

    @property
    def bounds(self) -> tuple[float, float]:
        return metric_bounds(self.name)

    @property
    def delta_bounds(self) -> tuple[float, float]:
        lo, hi = self.bounds
        return lo - hi, hi - lo


@dataclass(frozen=True)
class Run:
    """One grid point as the report sees it."""

    run_id: str
    labels: dict[str, Any]
    baseline: str
    path: Path
    status: str
    error: str | None = None


@dataclass
class _Result:
    values: dict[str, float]  # the metric per test split, as metrics.json has it
    others: dict[str, float]  # the same in the other inference mode
    shares: dict[str, float] | None
    terms: dict[str, Terms]  # per test split: per test sample (verify: per fold of the pair protocol)


def _load(run: Run, metric: Metric, norms: dict[str, float] | None) -> _Result:
    metrics = read_json(run.path / "metrics.json")
    shares = metrics.get("attention_share")
    if metric.dataset is not None:
        metrics = metrics["datasets"][metric.dataset]

    def value(task: dict[str, Any]) -> float:
        return math.nan if task.get(metric.name) is None else float(task[metric.name])  # null: NaN

    tasks = {s: metrics.get(metric.key(s), {}).get(metric.task, {}) for s in metric.splits}
    values = {s: value(t) for s, t in tasks.items()}
    others = {s: value(metrics.get(metric.other().key(s), {}).get(metric.task, {})) for s in metric.splits}
    if metric.kind == "verify":  # embeddings are not predictions: the protocol's folds are the units
        terms = {
            s: mean_terms([f"fold{k}" for k in range(len(t["fold_accuracy"]))], np.array(t["fold_accuracy"], float))
            for s, t in tasks.items()
            if t.get("fold_accuracy")
        }
    else:
        terms = _prediction_terms(run.path, metric, norms)
    return _Result(values, others, shares, terms)


def _prediction_terms(run: Path, metric: Metric, norms: dict[str, float] | None) -> dict[str, Terms]:
    """Per test split, the metric's per-sample terms from a run's predictions.csv, read
    through the run's task (class names back to indices)."""
    from etf.pipeline.fit.heads import Task

    (state,) = [t for t in read_json(run / "config.json")["tasks"] if t["name"] == metric.task]
    task = Task.from_state(state)
    true, pred = task.csv_columns()
    rows: dict[str, list[tuple[str, list[str], list[str]]]] = {metric.key(s): [] for s in metric.splits}
    with open(run / "predictions.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] in rows and row.get("dataset") == metric.dataset:  # a joint fit's: its dataset's rows
                rows[row["split"]].append((row["id"], [row[c] for c in true], [row[c] for c in pred]))
    out = {}
    for split in metric.splits:
        entries = rows[metric.key(split)]
        if not entries:
            continue
        ids = [i for i, _, _ in entries]
        y = np.array([[task.parse_cell(v) for v in t] for _, t, _ in entries])
        p = np.array([[task.parse_cell(v) for v in q] for _, _, q in entries])
        norm = None if norms is None else np.array([norms.get(i, math.nan) for i in ids], dtype=np.float64)
        out[split] = sample_terms(metric.kind, metric.name, ids, y, p, ~np.isnan(y), norm)
    return out


def shown_labels(runs: list[Run]) -> list[str]:
    """The settings a configuration's name shows: those the grid varies among the models
    that read them (a setting a fuser does not read is None and never tells runs apart)."""
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.labels) if k not in (*FIXED_LABELS, "seed")]
    return [k for k in keys if len({str(v) for r in runs if (v := r.labels.get(k)) is not None}) > 1]


def _variant(labels: dict[str, Any], shown: list[str]) -> str:
    """The fuser and the varied settings it reads: a configuration without its subset."""
    return " ".join([labels["fuser"], *(f"{k}={labels[k]}" for k in shown if labels.get(k) is not None)])


def _name(labels: dict[str, Any], shown: list[str]) -> str:
    return f"{labels['subset']} {_variant(labels, shown)}"


def _interval(done: list[_Result], split: str, metric: Metric) -> tuple[float, float]:
    """A configuration's 95% interval of its mean on ``split``: seeds and test samples both vary."""
    terms = [d.terms[split] for d in done if split in d.terms and not math.isnan(d.values[split])]
    if len(terms) < 2:
        return math.nan, math.nan
    units = sorted(set.intersection(*(set(t.units) for t in terms)))
    return interval([t.select(units) for t in terms], terms[0].reduce, bounds=metric.bounds, resamples=RESAMPLES)


def _comparison(pairs: list[tuple[_Result, _Result]], split: str, metric: Metric) -> dict[str, Any]:
    """The row fields of one configuration's comparison with its baseline on ``split``, paired
    by seed (none: every field undefined, with a note); a seed whose metric is undefined in
    either run does not enter the test, and ``seeds_tested`` says how many did."""
    pairs = [(x, y) for x, y in pairs if not (math.isnan(x.values[split]) or math.isnan(y.values[split]))]
    a, b = np.array([x.values[split] for x, _ in pairs]), np.array([y.values[split] for _, y in pairs])
    seed_level = paired_seed_tests(a, b)
    with_terms = [(x.terms[split], y.terms[split]) for x, y in pairs if split in x.terms and split in y.terms]
    units = sorted(set.intersection(*(set(t.units) & set(u.units) for t, u in with_terms))) if with_terms else []
    c = compare(
        [t.select(units) for t, _ in with_terms],
        [u.select(units) for _, u in with_terms],
        with_terms[0][0].reduce if with_terms else np.sum,
        bounds=metric.delta_bounds,
        resamples=RESAMPLES,
    )
    return {
        "seeds_tested": len(with_terms),
        "baseline_mean": float(b.mean()) if len(b) else math.nan,
        "delta": c.delta,
        "delta_ci_low": c.ci_low,
        "delta_ci_high": c.ci_high,
        "p": c.p,
        "p_adjusted": math.nan,  # set across the report
        "significant": "",
        "note": c.note,
        "df": c.df,
        "se_seed": c.se_seed,
        "se_sample": c.se_sample,
        "test_units": c.units,
        "p_ttest": seed_level.t,
        "p_wilcoxon": seed_level.wilcoxon,
        "seed_note": seed_level.note,
    }


def _norms_for(norms: dict[str, Any] | None, metric: Metric) -> dict[str, float] | None:
    """A metric's NME normalisers: ``norms`` per sample id, or per dataset label and sample
    id where the metric is a joint fit's."""
    if norms is None or metric.dataset is None:
        return norms
    return norms.get(metric.dataset)


def configurations(
    runs: list[Run], metric: Metric | list[Metric], correction: str = "holm", norms: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per metric, test split and configuration (in grid order) with its statistics,
    and the prior names of the attention-share columns; the p-values are adjusted over every
    row. ``norms``: the dataset's NME normaliser per sample id (landmark tasks; per dataset
    label first for a joint fit's metrics)."""
    metrics = [metric] if isinstance(metric, Metric) else list(metric)
    rows, priors, of = [], [], []
    for m in metrics:
        mine, shared = _metric_rows(runs, m, _norms_for(norms, m))
        rows += mine
        of += [m] * len(mine)
        priors = list(dict.fromkeys([*priors, *shared]))
    adjusted = adjust([math.nan if r["is_baseline"] else r["p"] for r in rows], correction)
    for row, p, m in zip(rows, adjusted, of):
        row["p_adjusted"] = float(p)
        row["significant"] = _verdict(row, m)
    return rows, priors


def _metric_rows(
    runs: list[Run], metric: Metric, norms: dict[str, float] | None
) -> tuple[list[dict[str, Any]], list[str]]:
    results = {r.run_id: _load(r, metric, norms) for r in runs if r.status == "done"}
    by_id = {r.run_id: r for r in runs}
    shown = shown_labels(runs)
    config: dict[str, list[Run]] = {}
    for r in runs:
        config.setdefault(_name(r.labels, shown), []).append(r)
    priors = list(dict.fromkeys(p for res in results.values() for p in res.shares or {}))
    rows = []
    for split in metric.splits:
        for name, members in config.items():
            done = [results[r.run_id] for r in members if r.run_id in results]
            s = summarize([d.values[split] for d in done], bounds=metric.bounds)
            ci_low, ci_high = _interval(done, split, metric)
            is_baseline = all(r.baseline == r.run_id for r in members)
            pairs = [
                (results[r.run_id], results[r.baseline])
                for r in members
                if r.run_id in results and r.baseline in results
            ]
            row = {
                "split": split,
                **({"dataset": metric.dataset, "task": metric.task, "metric": metric.name} if metric.dataset else {}),
                "configuration": name,
                "variant": _variant(members[0].labels, shown),
                **{k: v for k, v in members[0].labels.items() if k != "seed"},
                "seeds": len(done),
                "failed": sum(r.status == "failed" for r in members),
                "mean": s.mean,
                "std": s.std,
                "ci_low": ci_low,
                "ci_high": ci_high,
                "baseline": _name(by_id[members[0].baseline].labels, shown),
                **_comparison([] if is_baseline else pairs, split, metric),
            }
            if is_baseline:
                row["note"] = row["seed_note"] = ""
                row["seeds_tested"] = len(done)
            elif row["seeds_tested"] < len(done):
                lost = f"{row['seeds_tested']} of {len(done)} seeds entered the test (the others' metric or baseline is undefined or missing)"
                row["note"] = "; ".join(n for n in (lost, row["note"]) if n)
            other = [d.others[split] for d in done]
            row[f"mean_{metric.other().infer}"] = float(np.mean(other)) if other else math.nan
            sign = 1 if metric.infer == "canonical" else -1
            row["canonical_minus_all"] = (
                float(np.mean([sign * (d.values[split] - d.others[split]) for d in done])) if done else math.nan
            )
            for p in priors:
                shares = [d.shares[p] for d in done if d.shares and p in d.shares]
                row[f"share_{p}"] = float(np.mean(shares)) if shares else math.nan
            row["is_baseline"] = is_baseline
            rows.append(row)
    return rows, priors


def _verdict(row: dict[str, Any], metric: Metric) -> str:
    if row["is_baseline"]:
        return "baseline"
    if math.isnan(row["p_adjusted"]):
        return "n/a"
    if row["p_adjusted"] >= ALPHA:
        return "no"
    return "yes (better)" if (row["delta"] > 0) == metric.higher_is_better else "yes (worse)"


# ---------------------------------------------------------------------------- files

#: the files :func:`write_report` writes (and nothing else beside a grid's runs/)
REPORT_FILES = ("report.md", "results.csv", "results.json", "priors.png", "heatmap.png", "attention.png")


def write_report(
    runs: list[Run],
    metric: Metric | list[Metric],
    out: Path,
    title: str,
    correction: str = "holm",
    norms: dict[str, Any] | None = None,
) -> Path:
    """Write the report files into ``out``; return the path of ``report.md``. With several
    metrics (a joint grid: every task of every dataset) each has its tables, the correction
    runs over all of them, and the plots show the first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = [metric] if isinstance(metric, Metric) else list(metric)
    metric = metrics[0]
    rows, priors = configurations(runs, metrics, correction, norms)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:  # whole or not at all
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    runs_json = [
        {
            "run_id": r.run_id,
            "labels": r.labels,
            "baseline": r.baseline,
            "path": str(r.path),
            "status": r.status,
            "error": r.error,
        }
        for r in runs
    ]
    held_out = next((res for res in (_held_out(r) for r in runs) if res), {})
    write_json_atomic(  # strict JSON: NaN as null
        out / "results.json",
        {
            "title": title,
            "metric": asdict(metric),
            **({"metrics": [asdict(m) for m in metrics]} if len(metrics) > 1 else {}),
            "alpha": ALPHA,
            "correction": correction,
            "held_out": held_out,
            "configurations": rows,
            "runs": runs_json,
        },
    )
    primary = [r for r in _mine(rows, metric) if r["split"] == metric.splits[0]]
    plots = [
        p
        for p in (
            _plot_priors(primary, metric, out),
            _plot_heatmap(primary, metric, out),
            _plot_shares(primary, priors, out),
        )
        if p
    ]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text(_markdown(runs, rows, metrics, title, plots, correction, held_out))
    return path


def _held_out(run: Run) -> dict[str, str]:
    """How a finished run's hold-outs were made (metrics.json ``held_out``; a joint fit's per dataset)."""
    if run.status != "done":
        return {}
    metrics = read_json(run.path / "metrics.json")
    if "datasets" not in metrics:
        return metrics.get("held_out", {})
    return {f"{d} {k}": v for d, m in metrics["datasets"].items() for k, v in m.get("held_out", {}).items()}


def _num(v: float, fmt: str = ".4f") -> str:
    return "n/a" if math.isnan(v) else format(v, fmt)


def method(metric: Metric, correction: str, comparisons: int) -> str:
    """The report's method paragraph: exactly what the statistics do."""
    units = "the ten folds of the pair protocol" if metric.kind == "verify" else "test samples"
    corrections = {"holm": "Holm's step-down", "bonferroni": "Bonferroni's", "fdr_bh": "the Benjamini-Hochberg"}
    return (
        "Every configuration is compared with its baseline: its canonical (first) prior alone with the `linear` "
        "fuser, same seed and settings, on each test split, in the metric itself. Δ is the mean over seeds of the "
        f"per-seed difference in {metric.name} (configuration - baseline). Its variance has two parts: the spread of "
        f"the per-seed differences over the seeds, and a paired bootstrap ({RESAMPLES} draws) of the {units}, one "
        f"draw shared by every seed and by both runs, with {metric.name} recomputed on each draw. "
        "Δ divided by its standard error is tested two-sided against a t distribution with Welch-Satterthwaite "
        "degrees of freedom, so few seeds give a wide interval; the 95% interval of Δ is clipped to the differences "
        f"the metric allows. The p-values of all {comparisons} comparisons in this report (every configuration on "
        f"every test split) are adjusted by {corrections[correction]} correction (`--correction {correction}`); "
        f"significant means an adjusted p below {ALPHA}, better or worse. With one seed the seed variance is "
        "unknown and there is no test; a note says when a test is undefined. results.csv also holds seed-level "
        "paired t and Wilcoxon p-values (no test-sample variance, not corrected, not used for the verdict)."
    )


def _mine(rows: list[dict[str, Any]], metric: Metric) -> list[dict[str, Any]]:
    """The rows of ``metric`` (all of them where the report has one metric)."""
    return [r for r in rows if r.get("dataset") == metric.dataset and r.get("task", metric.task) == metric.task]


def _markdown(
    runs: list[Run],
    rows: list[dict[str, Any]],
    metrics: list[Metric],
    title: str,
    plots: list[tuple[str, str]],
    correction: str,
    held_out: dict[str, str],
) -> str:
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "failed", "pending")}
    comparisons = sum(not math.isnan(r["p"]) for r in rows)
    described = [
        f"**{m.dataset + ' ' if m.dataset else ''}{m.task} {m.name}** "
        f"({'higher' if m.higher_is_better else 'lower'} is better) on the test split(s) {', '.join(m.splits)}"
        for m in metrics
    ]
    several = len(metrics) > 1
    lines = [
        f"# Ablation: {title}",
        "",
        f"Metric{'s' if several else ''}: {'; '.join(described)}; mean over seeds ± their standard deviation, and a 95% interval of the mean that "
        "counts seed and test-sample variance together, as the test of Δ does. "
        f"Runs: {counts['done']} done, {counts['failed']} failed, {counts['pending']} not run.",
        "",
        method(replace(metrics[0], name="each task's metric") if several else metrics[0], correction, comparisons),
    ]
    if held_out:
        lines += ["", "Hold-outs: " + "; ".join(f"`{k}`: {v}" for k, v in held_out.items()) + "."]
    for metric in metrics:
        lines += _tables(_mine(rows, metric), metric, correction, several)
    for caption, file in plots:
        lines += ["", f"![{caption}]({file})"]
    for metric in metrics:
        lines += _modes_table(_mine(rows, metric), metric)
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        lines += ["", "## Failed runs (retried by the next `etf ablate` call)", ""]
        lines += [
            f"- `{r.run_id}` {r.labels['subset']} {r.labels['fuser']} seed {r.labels['seed']}: {r.error}"
            for r in failed
        ]
    return "\n".join(lines) + "\n"


def _tables(rows: list[dict[str, Any]], metric: Metric, correction: str, named: bool) -> list[str]:
    """A metric's table per test split; ``named``: headings say the dataset, task and metric."""
    lines: list[str] = []
    for split in metric.splits:
        lines += [
            "",
            f"## {metric.title(split)}" if named else f"## {split}",
            "",
            f"| configuration | seeds | mean ± std | 95% CI | Δ vs baseline | 95% CI of Δ | p | p ({correction}) "
            "| significant | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["split"] == split):
            seeds = f"{r['seeds']}" + (f", {r['seeds_tested']} tested" if r["seeds_tested"] < r["seeds"] else "")
            seeds += f" ({r['failed']} failed)" if r["failed"] else ""
            lines.append(
                f"| {r['configuration']} | {seeds} | {_num(r['mean'])} ± {_num(r['std'])} | "
                f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}] | {_num(r['delta'], '+.4f')} | "
                f"[{_num(r['delta_ci_low'], '+.4f')}, {_num(r['delta_ci_high'], '+.4f')}] | "
                f"{_num(r['p'], '.3g')} | {_num(r['p_adjusted'], '.3g')} | {r['significant']} | {r['note']} |"
            )
    return lines


def _modes_table(rows: list[dict[str, Any]], metric: Metric) -> list[str]:
    """Every configuration with every prior and with the canonical prior alone (the others
    absent at test time: ET-Fuser's one-backbone inference), from the same runs."""
    other = metric.other()
    by_mode = {metric.infer: "mean", other.infer: f"mean_{other.infer}"}
    lines = [
        "",
        "## Inference modes" + (f": {metric.dataset} {metric.task}" if metric.dataset else ""),
        "",
        f"The same runs' {metric.task} {metric.name} with every prior and with the canonical prior alone (the "
        "other priors absent); Δ = canonical − all, mean over seeds.",
        "",
        "| split | configuration | all | canonical | Δ |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['split']} | {r['configuration']} | {_num(r[by_mode['all']])} | {_num(r[by_mode['canonical']])} | "
            f"{_num(r['canonical_minus_all'], '+.4f')} |"
        )
    return lines


# ---------------------------------------------------------------------------- plots


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure  # no pyplot: no display, no global state

    return Figure(figsize=(width, height), layout="constrained")


#: marker shapes cycled with the colours, so that more variants than colours stay apart
MARKERS = "osD^vP*Xh<>"


def _styles(names: list[str]) -> dict[str, dict[str, Any]]:
    """A distinct colour and marker per name (tab10, then tab20 beyond ten)."""
    import matplotlib

    colours = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"].colors
    return {n: {"color": colours[i % len(colours)], "marker": MARKERS[i // len(colours) % len(MARKERS)]}
            for i, n in enumerate(names)}  # fmt: skip


def _plot_priors(rows: list[dict[str, Any]], metric: Metric, out: Path) -> tuple[str, str] | None:
    """Metric per subset, the subsets grouped by their number of priors along the x axis
    (each named on it): one marker per fuser variant (mean over seeds, 95% interval), a
    line across each group at the variant's mean over the group's subsets."""
    rows = [r for r in rows if not math.isnan(r["mean"])]
    if not rows:
        return None
    title = metric.title(metric.splits[0])
    subsets = sorted(dict.fromkeys(r["subset"] for r in rows), key=lambda s: (s.count("+"), s))
    x_of = {s: i + s.count("+") * 0.6 for i, s in enumerate(subsets)}  # a gap between sizes
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    styles = _styles(variants)
    fig = _figure(max(6.4, 1.6 + 0.45 * len(subsets) * max(1, len(variants)) ** 0.5), 4.4)
    ax = fig.subplots()
    width = 0.6 / len(variants)
    for i, variant in enumerate(variants):
        members = [r for r in rows if r["variant"] == variant]
        shift = width * (i - (len(variants) - 1) / 2)
        x = np.array([x_of[r["subset"]] + shift for r in members])
        y = np.array([r["mean"] for r in members])
        low, high = (np.array([r[k] for r in members], dtype=float) for k in ("ci_low", "ci_high"))
        err = np.nan_to_num(np.stack([y - low, high - y]))
        ax.errorbar(x, y, yerr=err, fmt=styles[variant]["marker"], color=styles[variant]["color"], capsize=3,
                    label=variant)  # fmt: skip
        for k in sorted({r["priors"] for r in members}):
            xs = [x_of[r["subset"]] for r in members if r["priors"] == k]
            ax.hlines(np.mean([r["mean"] for r in members if r["priors"] == k]), min(xs) - 0.3, max(xs) + 0.3,
                      color=styles[variant]["color"], alpha=0.5, linestyles="--")  # fmt: skip
    ax.set_xticks([x_of[s] for s in subsets], subsets, rotation=35, ha="right", fontsize="small")
    for k in sorted({r["priors"] for r in rows}):
        xs = [x_of[s] for s in subsets if s.count("+") + 1 == k]
        ax.annotate(f"{k} prior{'s' if k > 1 else ''}", (np.mean(xs), 1.0), xycoords=("data", "axes fraction"),
                    xytext=(0, 3), textcoords="offset points", ha="center", fontsize="small")  # fmt: skip
    ax.set_ylabel(title)
    ax.set_title(f"{title} per subset: mean over seeds, 95% interval; dashed: mean per variant and size",
                 fontsize="medium", pad=16)  # fmt: skip
    ax.legend(title="fuser variant", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(out / "priors.png", dpi=120)
    return f"{title} per subset and number of priors", "priors.png"


def _plot_heatmap(rows: list[dict[str, Any]], metric: Metric, out: Path) -> tuple[str, str] | None:
    drawn = heatmap_figure(rows, metric)
    if drawn is None:
        return None
    fig, k = drawn
    fig.savefig(out / "heatmap.png", dpi=120)
    return f"fuser variant x mask, {k} prior(s), one cell per configuration", "heatmap.png"


def heatmap_figure(rows: list[dict[str, Any]], metric: Metric) -> tuple[Any, int] | None:
    """Fuser variant x mask at the largest number of priors, a panel per subset of that size:
    every cell is one configuration (nothing but its seeds averaged), its mean and 95%
    interval written in it, coloured by its Δ against its baseline on a scale centred at zero."""
    from matplotlib.colors import TwoSlopeNorm

    rows = [r for r in rows if not math.isnan(r["mean"])]
    if not rows:
        return None
    k = max(r["priors"] for r in rows)
    rows = [r for r in rows if r["priors"] == k]
    masks = sorted({str(r["mask"]) for r in rows})
    variant = {id(r): " ".join(t for t in r["variant"].split(" ") if t != f"mask={r['mask']}") for r in rows}
    variants = list(dict.fromkeys(variant[id(r)] for r in rows))
    subsets = list(dict.fromkeys(r["subset"] for r in rows))
    if len(variants) * len(masks) < 2:
        return None  # one cell per panel: the table says it
    deltas = [0.0 if r["is_baseline"] else r["delta"] for r in rows]
    reach = max([abs(d) for d in deltas if not math.isnan(d)] + [1e-9])
    norm = TwoSlopeNorm(0.0, -reach, reach)
    fig = _figure(1.0 + (2.0 + 1.6 * len(masks)) * len(subsets), 1.8 + 0.7 * len(variants))
    axes = np.atleast_1d(fig.subplots(1, len(subsets), sharey=True))
    image = None
    for ax, subset in zip(axes, subsets):
        grid = np.full((len(variants), len(masks)), np.nan)
        for r, d in zip(rows, deltas):
            if r["subset"] == subset:
                i, j = variants.index(variant[id(r)]), masks.index(str(r["mask"]))
                grid[i, j] = d
                ci = f"[{_num(r['ci_low'], '.3f')}, {_num(r['ci_high'], '.3f')}]"
                ax.text(j, i, f"{r['mean']:.3f}\n{ci}", ha="center", va="center", fontsize="x-small")
        image = ax.imshow(grid, cmap="RdBu" if metric.higher_is_better else "RdBu_r", norm=norm, aspect="auto")
        ax.set_xticks(range(len(masks)), masks)
        ax.set_yticks(range(len(variants)), variants, fontsize="small")
        ax.set_xlabel("mask")
        ax.set_title(subset, fontsize="small")
    fig.suptitle(
        f"{metric.title(metric.splits[0])}, {k} prior(s): each cell one configuration, mean over its seeds "
        "[95% interval]; colour: Δ vs its baseline",
        fontsize="medium",
    )
    fig.colorbar(image, ax=list(axes), label=f"Δ {metric.name} vs baseline")
    return fig, k


def _plot_shares(rows: list[dict[str, Any]], priors: list[str], out: Path) -> tuple[str, str] | None:
    """Which prior the ensemble token listens to: its last-block attention per prior (the
    rest goes to the token itself), on the test split, mean over seeds."""
    rows = [r for r in rows if any(not math.isnan(r.get(f"share_{p}", math.nan)) for p in priors)]
    if not rows:
        return None
    fig = _figure(8.0, 1.2 + 0.35 * len(rows))
    ax = fig.subplots()
    left = np.zeros(len(rows))
    for p in priors:
        share = np.nan_to_num(np.array([r.get(f"share_{p}", math.nan) for r in rows]))
        ax.barh(range(len(rows)), share, left=left, label=p)
        left += share
    ax.barh(range(len(rows)), 1 - left, left=left, color="lightgrey", label="ensemble token")
    ax.set_yticks(range(len(rows)), [r["configuration"] for r in rows], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the ensemble token's attention")
    ax.set_title("Which prior the ensemble token reads: last block, test split, mean over seeds", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(out / "attention.png", dpi=120)
    return "attention share of each prior", "attention.png"
