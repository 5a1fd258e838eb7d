"""``etf probe``: each prior alone under standard frozen-feature probes, and how much they overlap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from etf.cli.options import cache_option, data_options, device_option, encoders_option, open_dataset, writable_dir

POSITIVE = click.IntRange(min=1)


def _ints(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: a comma list of integers", param_hint="--k") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{value!r}: give positive neighbour counts", param_hint="--k")
    return values


def _methods(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    from etf.pipeline.probe.run import METHODS

    values = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    bad = [v for v in values if v not in METHODS]
    if bad or not values:
        raise click.BadParameter(f"{bad[0] if bad else value!r}: use {', '.join(METHODS)}", param_hint="--method")
    return values


def probe_options(fn):
    """The probe protocols' settings."""
    for opt in reversed(
        [
            click.option(
                "--method",
                "methods",
                default="knn,logreg",
                show_default=True,
                callback=_methods,
                help="Comma list: knn (cosine, k nearest, temperature-weighted votes: dinov2's), logreg (L2; "
                "logistic regression, ridge for regress and landmarks; C chosen on val), linear (etf fit's linear "
                "fuser, for reference).",
            ),
            click.option(
                "--k", "ks", default="10,20,100,200", show_default=True, callback=_ints, help="kNN: k values."
            ),
            click.option(
                "--temperature",
                type=click.FloatRange(0, min_open=True),
                default=0.07,
                show_default=True,
                help="kNN: the softmax temperature of the neighbours' votes.",
            ),
            click.option(
                "--tries", type=POSITIVE, default=5, show_default=True, help="Few-shot: seeded draws of --shots."
            ),
            click.option(
                "--cka-samples",
                type=click.IntRange(min=4),
                default=2000,
                show_default=True,
                help="CKA: test samples it is computed on at most (seeded).",
            ),
        ]
    ):
        fn = opt(fn)
    return fn


@click.command("probe")
@cache_option
@data_options
@encoders_option("Priors to probe, each alone (store names, NAME-HASHPREFIX, or store paths).")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    help="classify:COL, multilabel:C1,C2, regress:COL, landmarks:PREFIX; repeat for several.  [default: the dataset's]",
)
@probe_options
@click.option("--shots", type=POSITIVE, help="K training samples per class (classify tasks), drawn --tries times.")
@click.option(
    "--tokens",
    type=click.Choice(["cls", "mean"]),
    default="cls",
    show_default=True,
    help="Each prior's pooled token as the fuser reads it (cls: its own pooling, a ViT's class token, a CNN's map "
    "mean), or the mean of its patch tokens.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.1,
    show_default=True,
    help="Seeded hold-out of train when there is no val split (as for etf fit).",
)
@click.option("--test-split", default=None, help="As for etf fit: holdout:F[:SEED] or val, for a dataset without one.")
@device_option
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Directory for probe.json, probe.md, plots."
)
def command(**kw: Any) -> None:
    """Probe every prior of --encoders alone from the cache (kNN, logistic regression, the linear
    fuser), measure how similar they are (debiased CKA, error overlap) and suggest subsets to fuse."""
    from etf.pipeline.probe import ProbeConfig, run_probe
    from etf.pipeline.probe.report import summary

    dataset = open_dataset(kw.pop("data_spec"), kw.pop("crop"))
    kw["cache_dir"] = kw.pop("cache_dir")
    kw["pool"] = None if kw.pop("tokens") == "cls" else "avg"
    kw["out"] = writable_dir(kw["out"], "--out")
    kw["tasks"] = list(kw["tasks"])
    kw["encoders"] = list(kw["encoders"])
    click.echo(summary(run_probe(dataset, ProbeConfig(**kw))))
