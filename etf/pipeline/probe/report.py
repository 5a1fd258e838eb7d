"""What ``etf probe`` writes: probe.json, probe.md (a table per task and split, the CKA of
every pair, error overlap, a suggested order of subsets) and two plots."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from etf.utils import mark_owned, write_json_atomic

#: what the suggested order is, said wherever it is shown
HEURISTIC = (
    "heuristic, not a result: start from the best prior alone (its test score rescaled to [0.5, 1] among the "
    "priors) and add, one at a time, the prior whose rescaled score times (1 - its largest CKA to those already "
    "in) is highest; pairs are ranked by their mean rescaled score times (1 - their CKA). Fit these subsets first."
)


def _wrong(kind: str, pred: np.ndarray, y: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Per labelled sample, whether the prediction is wrong: a class or any label missed, or,
    for real values, an error in the worse half of that prior's errors."""
    if kind == "classify":
        return pred[:, 0] != y[:, 0]
    if kind == "multilabel":
        return ((pred != y) & m).any(axis=1)
    err = np.abs(pred - y).mean(axis=1)
    return err > np.median(err)


def overlap(data: Any, tasks: list, preds: dict[tuple[str, str], np.ndarray], rows: np.ndarray) -> list[dict]:
    """Per task and pair of priors, on the test samples: how often both are wrong, exactly one,
    neither (the first of kNN and logreg run, its chosen configuration, first try)."""
    from etf.pipeline.probe.run import task_kind

    out = []
    for t in tasks:
        y, m = data.targets[t.name]
        kind = task_kind(t)
        keep = m[rows].all(axis=1) if kind == "regress" else m[rows].any(axis=1)
        have = [p for (name, p) in preds if name == t.name]
        wrong = {p: _wrong(kind, preds[(t.name, p)][keep], y[rows][keep], m[rows][keep]) for p in have}
        for a, b in combinations(have, 2):
            n = int(keep.sum())
            both, one = int((wrong[a] & wrong[b]).sum()), int((wrong[a] ^ wrong[b]).sum())
            out.append(
                {
                    "task": t.name,
                    "a": a,
                    "b": b,
                    "n": n,
                    "both_wrong": both / n,
                    "one_wrong": one / n,
                    "neither_wrong": (n - both - one) / n,
                    "wrong_kind": "worse half of its errors" if kind == "regress" else "wrong",
                }
            )
    return out


def solo_scores(record: dict[str, Any]) -> tuple[str, str, dict[str, float], bool] | None:
    """The first task's selection metric on the test split under the first method, per
    prior: (task, metric, scores, higher is better); None without a test split."""
    split = record.get("test_split")
    if split is None:
        return None
    first = record["metrics"][0]
    task, metric, higher = first["task"], first["metric"], first["higher_is_better"]
    method = record["methods"][0]
    scores = {
        r["prior"]: r["metrics"].get(metric, math.nan)
        for r in record["results"]
        if r["task"] == task and r["method"] == method and r["config"] == "chosen" and r["split"] == split
    }
    return task, metric, scores, higher


def _cka_matrix(record: dict[str, Any]) -> np.ndarray:
    names = record["priors"]
    c = np.eye(len(names))
    for e in record["cka"]:
        i, j = names.index(e["a"]), names.index(e["b"])
        c[i, j] = c[j, i] = e["cka"]
    return c


def suggest_subsets(record: dict[str, Any]) -> dict[str, Any]:
    """Subsets to fit first, from solo scores and CKA (:data:`HEURISTIC`)."""
    solo = solo_scores(record)
    names = record["priors"]
    if solo is None or len(names) < 2:
        return {"note": "needs a test split and two priors", "order": [], "pairs": []}
    _, _, scores, higher = solo
    s = np.array([scores.get(p, math.nan) for p in names]) * (1 if higher else -1)
    s = np.nan_to_num(s, nan=np.nanmin(s) if np.isfinite(s).any() else 0.0)
    span = s.max() - s.min()
    q = 0.5 + 0.5 * ((s - s.min()) / span if span > 0 else np.ones_like(s))
    c = np.clip(_cka_matrix(record), 0, 1)
    chosen = [int(np.argmax(q))]
    order = []
    while len(chosen) < len(names):
        rest = [i for i in range(len(names)) if i not in chosen]
        gain = [q[i] * (1 - c[i, chosen].max()) for i in rest]
        chosen.append(rest[int(np.argmax(gain))])
        order.append([names[i] for i in chosen])
    pairs = sorted(combinations(range(len(names)), 2), key=lambda ij: -(q[list(ij)].mean() * (1 - c[ij])))
    return {"note": HEURISTIC, "order": order, "pairs": [[names[i], names[j]] for i, j in pairs]}


def _fmt(v: Any, std: Any = None) -> str:
    if not isinstance(v, float):
        return str(v)
    return f"{v:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def tables(record: dict[str, Any], configs: bool = True) -> list[str]:
    """Per task and split, a plain-text table: one line per prior, method and configuration
    (``configs``: every k of kNN besides the chosen one); the chosen one is marked ``*``."""
    lines = []
    results = record["results"]
    chosen = {(s["task"], s["prior"], s["method"]): s["chosen"] for s in record["selections"]}
    for task in dict.fromkeys(r["task"] for r in results):
        for split in dict.fromkeys(r["split"] for r in results if r["task"] == task):
            rows = [r for r in results if r["task"] == task and r["split"] == split and r["metrics"]]
            if not configs:
                rows = [r for r in rows if r["config"] == "chosen"]
            if not rows:
                continue
            metrics = [k for k, v in rows[0]["metrics"].items() if isinstance(v, float)]
            n = record["splits"].get(split, "")
            lines.append(f"{task} on {split} ({n} samples)")
            head = ["prior", "method", *metrics]
            body = []
            for r in rows:
                config = r["config"]
                if config == "chosen":
                    picked = chosen.get((task, r["prior"], r["method"]), [])
                    config = ("chosen " + "/".join(dict.fromkeys(picked))) if picked else ""
                label = f"{r['method']} {config}".strip()
                std = r.get("std", {})
                body.append([r["prior"], label, *(_fmt(r["metrics"].get(k, math.nan), std.get(k)) for k in metrics)])
            widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
            lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *body]]
            lines.append("")
    return lines


def summary(record: dict[str, Any]) -> str:
    """What ``etf probe`` prints: the chosen configurations' tables, CKA and the suggestion."""
    lines = [
        f"probe of {', '.join(record['priors'])} on {record['dataset']}: {', '.join(record['methods'])}"
        + (f", {record['shots']}-shot over {record['tries']} tries" if record["shots"] else "")
        + f"; pooled by {record['pool']}; {record['seconds']:.1f} s on {record['device']}",
        "samples  " + "  ".join(f"{k} {v}" for k, v in record["splits"].items()),
        "",
        *tables(record, configs=False),
    ]
    for e in record["cka"]:
        lines.append(f"CKA {e['a']}~{e['b']}: {e['cka']:.3f} [{e['low']:.3f}, {e['high']:.3f}]")
    order = record["suggested_subsets"]["order"]
    if order:
        lines.append("suggested subsets (heuristic): " + "; ".join("+".join(s) for s in order))
    return "\n".join(lines)


def write_probe(out: Path, record: dict[str, Any]) -> None:
    """probe.json, probe.md, cka.png and score_vs_cka.png into ``out``."""
    mark_owned(out, "probe")
    write_json_atomic(out / "probe.json", record)
    plots = [p for p in (_plot_cka(record, out), _plot_score(record, out)) if p]
    (out / "probe.md").write_text("\n".join(markdown(record, plots)) + "\n")


def markdown(record: dict[str, Any], plots: list[str], level: str = "#") -> list[str]:
    """probe.md's lines (``level``: the heading level, for a section of another report)."""
    lines = [f"{level} Probes: {', '.join(record['priors'])}", ""]
    lines += [
        f"{record['dataset']}; methods {', '.join(record['methods'])}; kNN k in {record['ks']}, T = "
        f"{record['temperature']} (cosine, dinov2's weighted vote); logreg C swept on val over {len(record['cs'])} "
        f"values, scored once on test; pooled by {record['pool']}"
        + (
            f"; {record['shots']} samples per class, {record['tries']} seeded tries (mean ± std)"
            if record["shots"]
            else ""
        )
        + ". Samples: "
        + ", ".join(f"{k} {v}" for k, v in record["splits"].items())
        + ".",
        "",
        "```",
        *tables(record),
        "```",
        "",
        *(f"- {s['task']}, {s['prior']}, {s['method']}: {s['note']}" for s in record["selections"] if s["note"]),
        "",
        f"{level}# Complementarity",
        "",
        "| prior A | prior B | debiased linear CKA | 95% interval | samples |",
        "|---|---|---|---|---|",
        *(
            f"| {e['a']} | {e['b']} | {e['cka']:.3f} | [{e['low']:.3f}, {e['high']:.3f}] | {e['samples']} |"
            for e in record["cka"]
        ),
        "",
    ]
    if record["overlap"]:
        lines += [
            f"Error overlap on {record['test_split']} ({record['overlap_method']}, its chosen configuration"
            + (", first try" if record["shots"] else "")
            + "):",
            "",
            "| task | prior A | prior B | both wrong | one wrong | neither | samples |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {o['task']} | {o['a']} | {o['b']} | {o['both_wrong']:.3f} | {o['one_wrong']:.3f} | "
                f"{o['neither_wrong']:.3f} | {o['n']} |"
                for o in record["overlap"]
            ),
            "",
        ]
    lines += [f"![{p}]({p})" for p in plots] + [""]
    s = record["suggested_subsets"]
    if s["order"]:
        lines += [
            "Suggested subsets to fit first: " + "; ".join("+".join(x) for x in s["order"]) + ".",
            "Pairs in that light: " + "; ".join("+".join(x) for x in s["pairs"]) + ".",
            "",
            f"({s['note']})",
            "",
        ]
    return lines


def _plot_cka(record: dict[str, Any], out: Path) -> str | None:
    from etf.pipeline.ablate.report import _figure

    names = record["priors"]
    if len(names) < 2:
        return None
    c = _cka_matrix(record)
    fig = _figure(1.2 + 0.7 * len(names), 1.0 + 0.6 * len(names))
    ax = fig.add_subplot()
    image = ax.imshow(c, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{c[i, j]:.2f}", ha="center", va="center", color="w" if c[i, j] < 0.6 else "k", fontsize=8)
    fig.colorbar(image, ax=ax, label="debiased linear CKA")
    fig.savefig(out / "cka.png", dpi=120)
    return "cka.png"


def _plot_score(record: dict[str, Any], out: Path) -> str | None:
    from etf.pipeline.ablate.report import _figure

    solo = solo_scores(record)
    names = record["priors"]
    if solo is None or len(names) < 2:
        return None
    task, metric, scores, _ = solo
    c = _cka_matrix(record)
    mean_cka = (c.sum(axis=1) - 1) / (len(names) - 1)
    fig = _figure(4.8, 3.6)
    ax = fig.add_subplot()
    ax.scatter(mean_cka, [scores.get(p, math.nan) for p in names])
    for p, x in zip(names, mean_cka):
        ax.annotate(p, (x, scores.get(p, math.nan)), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlim(min(-0.05, float(mean_cka.min()) - 0.05), 1.05)  # CKA's range: reports compare at a glance
    ax.set_xlabel("mean CKA to the other priors")
    ax.set_ylabel(f"{task} {metric} alone ({record['methods'][0]}, {record['test_split']})")
    fig.savefig(out / "score_vs_cka.png", dpi=120)
    return "score_vs_cka.png"
