"""The ablation report: every configuration against its single-prior baseline.

``write_report`` reads the finished runs (``metrics.json``, ``predictions.csv``) and writes
``report.md``, ``results.csv``, ``results.json`` and PNG plots (matplotlib figures drawn
without a display). A configuration is a grid point without its seed; its statistics are
over seeds, its tests paired by seed with the baseline (see :mod:`etf.pipeline.ablate.stats`).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from etf.pipeline.ablate.stats import holm, mcnemar, paired_bootstrap, paired_seed_tests, summarize
from etf.utils import read_json, write_json_atomic

ALPHA = 0.05
#: labels every configuration has; others appear in its name only where the grid varies them
FIXED_LABELS = ("subset", "priors", "fuser")


@dataclass(frozen=True)
class Metric:
    """What the report compares: metric ``name`` of task ``task`` on ``split``, evaluated
    with every prior (``infer="all"``) or the canonical prior alone (``"canonical"``)."""

    task: str
    kind: str
    name: str
    split: str
    higher_is_better: bool
    infer: str = "all"

    @property
    def key(self) -> str:
        """The split's name in metrics.json and predictions.csv for this inference mode."""
        return self.split if self.infer == "all" else f"{self.split}:{self.infer}"

    def other(self) -> Metric:
        """The same metric in the other inference mode."""
        return replace(self, infer="canonical" if self.infer == "all" else "all")

    @property
    def title(self) -> str:
        mode = "" if self.infer == "all" else ", canonical prior alone"
        return f"{self.split} {self.task} {self.name}{mode}"


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
    value: float
    #: the metric in the other inference mode (all priors / the canonical prior alone)
    other: float
    shares: dict[str, float] | None
    # per sample id of the split: 1/0 correct (classify), else mean absolute error; for verify,
    # per fold of the pair protocol: its accuracy
    scores: dict[str, float]


def _load(run: Run, metric: Metric) -> _Result:
    metrics = read_json(run.path / "metrics.json")
    task = metrics.get(metric.key, {}).get(metric.task, {})
    value = task.get(metric.name, math.nan)
    other = float(metrics.get(metric.other().key, {}).get(metric.task, {}).get(metric.name, math.nan))
    if metric.kind == "verify":  # embeddings are not predictions: pair the protocol's folds
        folds = {f"fold{k}": float(v) for k, v in enumerate(task.get("fold_accuracy", []))}
        return _Result(float(value), other, metrics.get("attention_share"), folds)
    scores = {}
    with open(run.path / "predictions.csv", newline="") as f:
        reader = csv.DictReader(f)
        true = [c for c in reader.fieldnames or [] if c.startswith(f"{metric.task}:true:")]
        for row in reader:
            if row["split"] != metric.key:
                continue
            pairs = [(float(row[c]), float(row[c.replace(":true:", ":pred:", 1)])) for c in true if row[c] != ""]
            if pairs:
                y, p = np.array(pairs).T
                scores[row["id"]] = float(np.all(y == p)) if metric.kind == "classify" else float(np.abs(y - p).mean())
    return _Result(float(value), other, metrics.get("attention_share"), scores)


def _prediction_test(pairs: list[tuple[_Result, _Result]], metric: Metric) -> tuple[str, float]:
    """McNemar (classification), a paired bootstrap of per-sample errors, or for verify a
    paired t-test of the pair protocol's fold accuracies, on the split's samples (folds) of
    every seed pooled: (test name, p)."""
    a, b = [], []
    for x, y in pairs:
        ids = sorted(x.scores.keys() & y.scores.keys())
        a += [x.scores[i] for i in ids]
        b += [y.scores[i] for i in ids]
    if not a:
        return "n/a", math.nan
    if metric.kind == "classify":
        return "mcnemar", mcnemar(np.array(a) > 0.5, np.array(b) > 0.5).p
    if metric.kind == "verify":
        return "folds t-test", paired_seed_tests(a, b)[0]
    return "bootstrap", paired_bootstrap(np.array(a), np.array(b))


def _variant(labels: dict[str, Any], shown: list[str]) -> str:
    """The fuser and the varied settings: a configuration without its subset."""
    return " ".join([labels["fuser"], *(f"{k}={labels[k]}" for k in shown)])


def _name(labels: dict[str, Any], shown: list[str]) -> str:
    return f"{labels['subset']} {_variant(labels, shown)}"


def configurations(runs: list[Run], metric: Metric) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per configuration (in grid order) with its statistics, and the prior names
    of the attention-share columns."""
    results = {r.run_id: _load(r, metric) for r in runs if r.status == "done"}
    by_id = {r.run_id: r for r in runs}
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.labels) if k not in (*FIXED_LABELS, "seed")]
    shown = [k for k in keys if len({str(r.labels[k]) for r in runs}) > 1]
    config: dict[str, list[Run]] = {}
    for r in runs:
        config.setdefault(_name(r.labels, shown), []).append(r)
    priors = list(dict.fromkeys(p for res in results.values() for p in res.shares or {}))
    rows = []
    for name, members in config.items():
        done = [results[r.run_id] for r in members if r.run_id in results]
        s = summarize([d.value for d in done])
        is_baseline = all(r.baseline == r.run_id for r in members)
        pairs = [
            (results[r.run_id], results[r.baseline]) for r in members if r.run_id in results and r.baseline in results
        ]
        row = {
            "configuration": name,
            "variant": _variant(members[0].labels, shown),
            **{k: v for k, v in members[0].labels.items() if k != "seed"},
            "seeds": len(done),
            "failed": sum(r.status == "failed" for r in members),
            "mean": s.mean,
            "std": s.std,
            "ci_low": s.ci_low,
            "ci_high": s.ci_high,
            "baseline": _name(by_id[members[0].baseline].labels, shown),
            "baseline_mean": math.nan,
            "delta": math.nan,
            "p_ttest": math.nan,
            "p_wilcoxon": math.nan,
            "test": "n/a",
            "p_predictions": math.nan,
        }
        if pairs and not is_baseline:
            a, b = np.array([x.value for x, _ in pairs]), np.array([y.value for _, y in pairs])
            row["baseline_mean"], row["delta"] = float(b.mean()), float((a - b).mean())
            row["p_ttest"], row["p_wilcoxon"] = paired_seed_tests(a, b)
            row["test"], row["p_predictions"] = _prediction_test(pairs, metric)
        other = [d.other for d in done]
        row[f"mean_{metric.other().infer}"] = float(np.mean(other)) if other else math.nan
        sign = 1 if metric.infer == "canonical" else -1
        row["canonical_minus_all"] = float(np.mean([sign * (d.value - d.other) for d in done])) if done else math.nan
        for p in priors:
            shares = [d.shares[p] for d in done if d.shares and p in d.shares]
            row[f"share_{p}"] = float(np.mean(shares)) if shares else math.nan
        row["is_baseline"] = is_baseline
        rows.append(row)
    adjusted = holm([math.nan if r["is_baseline"] else r["p_predictions"] for r in rows])
    for row, p in zip(rows, adjusted):
        row["p_holm"] = float(p)
        row["significant"] = _verdict(row, metric)
    return rows, priors


def _verdict(row: dict[str, Any], metric: Metric) -> str:
    if row["is_baseline"]:
        return "baseline"
    if math.isnan(row["p_holm"]):
        return "n/a"
    if row["p_holm"] >= ALPHA:
        return "no"
    return "yes (better)" if (row["delta"] > 0) == metric.higher_is_better else "yes (worse)"


# ---------------------------------------------------------------------------- files


def write_report(runs: list[Run], metric: Metric, out: Path, title: str) -> Path:
    """Write the report files into ``out``; return the path of ``report.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, priors = configurations(runs, metric)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
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
    write_json_atomic(
        out / "results.json",
        _finite({"title": title, "metric": metric.__dict__, "alpha": ALPHA, "configurations": rows, "runs": runs_json}),
    )
    plots = [
        p
        for p in (_plot_priors(rows, metric, out), _plot_heatmap(rows, metric, out), _plot_shares(rows, priors, out))
        if p
    ]
    path = out / "report.md"
    path.write_text(_markdown(runs, rows, metric, title, plots))
    return path


def _finite(obj: Any) -> Any:
    """NaN as null: strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _num(v: float, fmt: str = ".4f") -> str:
    return "n/a" if v is None or math.isnan(v) else format(v, fmt)


def _markdown(
    runs: list[Run], rows: list[dict[str, Any]], metric: Metric, title: str, plots: list[tuple[str, str]]
) -> str:
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "failed", "pending")}
    better = "higher" if metric.higher_is_better else "lower"
    lines = [
        f"# Ablation: {title}",
        "",
        f"Metric: **{metric.title}** ({better} is better), mean over seeds with a 95% t-interval. "
        f"Runs: {counts['done']} done, {counts['failed']} failed, {counts['pending']} not run.",
        "",
        "Every configuration is compared with its baseline: its canonical (first) prior alone with the `linear` "
        "fuser, same seed and settings. Δ and the p-values of the paired t-test and the Wilcoxon signed-rank test "
        "pair runs by seed; the prediction-level test (McNemar for classification, a paired t-test of the pair "
        "protocol's fold accuracies for verification, a paired bootstrap of per-sample errors otherwise) pools "
        f"the {metric.split} predictions of all seeds. Holm's correction runs across the grid "
        f"on the prediction-level p; significant at {ALPHA}.",
        "",
        "| configuration | seeds | mean ± std | 95% CI | Δ vs baseline | p (t) | p (Wilcoxon) | p (predictions) | p (Holm) | significant |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seeds = f"{r['seeds']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        lines.append(
            f"| {r['configuration']} | {seeds} | {_num(r['mean'])} ± {_num(r['std'])} | "
            f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}] | {_num(r['delta'], '+.4f')} | {_num(r['p_ttest'], '.3g')} | "
            f"{_num(r['p_wilcoxon'], '.3g')} | {_num(r['p_predictions'], '.3g')} {'' if r['test'] == 'n/a' else r['test']} | "
            f"{_num(r['p_holm'], '.3g')} | {r['significant']} |"
        )
    for caption, file in plots:
        lines += ["", f"![{caption}]({file})"]
    lines += _modes_table(rows, metric)
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        lines += ["", "## Failed runs (retried by the next `etf ablate` call)", ""]
        lines += [
            f"- `{r.run_id}` {r.labels['subset']} {r.labels['fuser']} seed {r.labels['seed']}: {r.error}"
            for r in failed
        ]
    return "\n".join(lines) + "\n"


def _modes_table(rows: list[dict[str, Any]], metric: Metric) -> list[str]:
    """Every configuration with every prior and with the canonical prior alone (the others
    absent at test time: ET-Fuser's one-backbone inference), from the same runs."""
    other = metric.other()
    by_mode = {metric.infer: "mean", other.infer: f"mean_{other.infer}"}
    lines = [
        "",
        "## Inference modes",
        "",
        f"The same runs' {metric.split} {metric.task} {metric.name} with every prior and with the canonical prior "
        "alone (the other priors absent); Δ = canonical − all, mean over seeds.",
        "",
        "| configuration | all | canonical | Δ |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['configuration']} | {_num(r[by_mode['all']])} | {_num(r[by_mode['canonical']])} | "
            f"{_num(r['canonical_minus_all'], '+.4f')} |"
        )
    return lines


# ---------------------------------------------------------------------------- plots


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure  # no pyplot: no display, no global state

    return Figure(figsize=(width, height), layout="constrained")


def _plot_priors(rows: list[dict[str, Any]], metric: Metric, out: Path) -> tuple[str, str] | None:
    """Metric vs number of priors: one marker per subset (95% CI bars), a line through the
    mean of each fuser variant per number of priors."""
    rows = [r for r in rows if not math.isnan(r["mean"])]
    if not rows:
        return None
    fig = _figure(8.0, 4.0)
    ax = fig.subplots()
    variants: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        variants.setdefault(r["variant"], []).append(r)
    for i, (variant, members) in enumerate(variants.items()):
        shift = 0.08 * (i - (len(variants) - 1) / 2)
        x = np.array([r["priors"] for r in members], dtype=float) + shift
        y = np.array([r["mean"] for r in members])
        err = np.nan_to_num(np.array([r["ci_high"] - r["mean"] for r in members]))
        line = ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, alpha=0.8, label=variant)
        ks = sorted({r["priors"] for r in members})
        ax.plot(
            np.array(ks) + shift,
            [np.mean([r["mean"] for r in members if r["priors"] == k]) for k in ks],
            "-",
            color=line[0].get_color(),
            alpha=0.6,
        )
    ax.set_xticks(sorted({r["priors"] for r in rows}))
    ax.set_xlabel("number of priors")
    ax.set_ylabel(metric.title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(out / "priors.png", dpi=120)
    return f"{metric.title} vs number of priors", "priors.png"


def _plot_heatmap(rows: list[dict[str, Any]], metric: Metric, out: Path) -> tuple[str, str] | None:
    """Fuser x mask at the largest number of priors, averaged over seeds and the other axes."""
    rows = [r for r in rows if not math.isnan(r["mean"])]
    if not rows:
        return None
    k = max(r["priors"] for r in rows)
    rows = [r for r in rows if r["priors"] == k] or rows
    fusers, masks = sorted({r["fuser"] for r in rows}), sorted({r["mask"] for r in rows})
    grid = np.full((len(fusers), len(masks)), np.nan)
    for i, f in enumerate(fusers):
        for j, m in enumerate(masks):
            cell = [r["mean"] for r in rows if r["fuser"] == f and r["mask"] == m]
            grid[i, j] = np.mean(cell) if cell else np.nan
    fig = _figure(1.8 + 1.3 * len(masks), 1.4 + 0.6 * len(fusers))
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white" if v < np.nanmean(grid) else "black")
    ax.set_xticks(range(len(masks)), masks)
    ax.set_yticks(range(len(fusers)), fusers)
    ax.set_xlabel("mask")
    ax.set_ylabel("fuser")
    ax.set_title(f"{metric.title}, {k} prior(s)", fontsize="medium")
    fig.colorbar(image, ax=ax)
    fig.savefig(out / "heatmap.png", dpi=120)
    return f"fuser x mask, {k} prior(s)", "heatmap.png"


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
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(out / "attention.png", dpi=120)
    return "attention share of each prior", "attention.png"
