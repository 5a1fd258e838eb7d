"""``etf ablate --probe``: the probes before the grid, and their section of its report.

The probes run over the grid's priors, data, tasks and splits (its first seed, its pooling
where the grid has one) into ``OUT/probe``; the report gains their table, the CKA map, and
per fused configuration its gain beside what its priors score alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from etf.errors import EtfError
from etf.utils import read_json


def probe_grid(plan: Any, echo: Callable[[str], None]) -> dict[str, Any]:
    """Run the probes of ``plan``'s grid into ``OUT/probe``; return probe.json's record."""
    from etf.pipeline.probe import ProbeConfig, run_probe

    grid = plan.grid
    if grid.joint is not None:
        raise EtfError("--probe: probes a grid over one --data; this grid has several")
    one = {k: v[0] for k, v in grid.axes.items() if len(v) == 1}
    cfg = ProbeConfig(
        cache_dir=grid.cache,
        encoders=list(grid.encoders),
        out=Path(grid.out) / "probe",
        tasks=list(grid.tasks),
        shots=one.get("shots"),
        pool=one.get("pool"),
        seed=grid.axes["seed"][0],
        val_fraction=one.get("val_fraction", 0.1),
        test_split=grid.test_split,
        device=one.get("device", "auto"),
    )
    record = run_probe(plan.dataset, cfg)
    echo(f"probes: {cfg.out / 'probe.md'} ({record['seconds']:.1f} s)")
    return record


def _solo(record: dict[str, Any], task: str, metric: str, split: str) -> dict[str, dict[str, float]]:
    """Per prior, per probe method, its chosen configuration's ``metric`` on ``split``."""
    out: dict[str, dict[str, float]] = {}
    for r in record["results"]:
        if r["task"] == task and r["split"] == split and r["config"] == "chosen":
            out.setdefault(r["prior"], {})[r["method"]] = r["metrics"].get(metric, math.nan)
    return out


def append_probe_section(report: Path, record: dict[str, Any]) -> None:
    """Add the probes' section to the grid's report.md: their tables and CKA map, and each
    configuration's fused score and gain over its baseline beside its priors' solo scores."""
    from etf.pipeline.probe.report import markdown

    results = read_json(report.parent / "results.json")
    metric = results["metric"]
    split = metric["splits"][0]
    solo = _solo(record, metric["task"], metric["name"], split)
    methods = [m for m in record["methods"] if m != "linear"] or record["methods"]
    plots = [f"probe/{p}" for p in ("cka.png", "score_vs_cka.png") if (report.parent / "probe" / p).exists()]
    lines = ["", *markdown(record, plots, level="##"), f"### Fused subsets beside their priors alone ({split})", ""]
    lines += [
        f"{metric['task']} {metric['name']}; the gain is over each configuration's baseline (the linear fuser on "
        f"its canonical prior); solo: each prior's probe ({', '.join(methods)}, chosen on val).",
        "",
        "| configuration | fused | gain | its priors alone |",
        "|---|---|---|---|",
    ]
    for row in results["configurations"]:
        if row["split"] != split or row.get("metric", metric["name"]) != metric["name"]:
            continue
        priors = str(row.get("subset", "")).split("+")
        alone = "; ".join(
            f"{p} " + " / ".join(f"{solo.get(p, {}).get(m, math.nan):.4f}" for m in methods) for p in priors
        )
        gain = "baseline" if row["is_baseline"] else _num(row.get("delta"), "+.4f")
        lines.append(f"| {row['configuration']} | {_num(row.get('mean'))} | {gain} | {alone} |")
    with open(report, "a") as f:
        f.write("\n".join(lines) + "\n")


def _num(v: Any, fmt: str = ".4f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)
