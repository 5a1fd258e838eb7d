"""``etf fit``: a fuser and task heads from the cache."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from etf.cache.features import parse_size
from etf.cli.options import cache_option, data_options, open_dataset
from etf.pipeline.fit.fusers import FUSERS, FuserConfig
from etf.pipeline.fit.train import FitConfig, fit
from etf.pipeline.fit.verification import MARGINS, with_options


def fuser_options(fn):
    """Fuser hyper-parameters, shared with ``etf ablate``."""
    for opt in reversed(
        [
            click.option("--dim", default=256, show_default=True, help="Fuser width d."),
            click.option("--depth", default=2, show_default=True, help="Self-attention blocks."),
            click.option("--heads", default=4, show_default=True, help="Attention heads."),
            click.option("--mlp-ratio", default=2.0, show_default=True),
            click.option("--dropout", default=0.0, show_default=True),
            click.option(
                "--attn",
                type=click.Choice(["full", "intra"]),
                default="full",
                show_default=True,
                help="intra: prior tokens attend only within their prior; the ensemble token sees all.",
            ),
            click.option(
                "--mask", default="none", show_default=True, help="Training-time dropping: none, token:P, prior:P."
            ),
            click.option(
                "--queries",
                type=click.Choice(["label", "task"]),
                default="label",
                show_default=True,
                help="qface: one label query per label of a multilabel task, or one per task.",
            ),
            click.option("--regions", default=8, show_default=True, help="fra: facial-mask embeddings (regions)."),
            click.option("--temperature", default=0.1, show_default=True, help="fra: heatmap softmax temperature."),
            click.option(
                "--aux",
                default="none",
                show_default=True,
                help="Auxiliary loss: recon:W (etfuser, etfuser+qface: reconstruct hidden prior tokens) or sinkhorn:W (fra: balanced regions).",
            ),
            click.option(
                "--recon-ratio", default=0.5, show_default=True, help="recon: fraction of prior tokens hidden."
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def training_options(fn):
    """Optimisation and protocol options, shared with ``etf ablate``."""
    for opt in reversed(
        [
            click.option(
                "--layers", default="last", show_default=True, help="Store layers to use: last, all, or e.g. 4,8,12."
            ),
            click.option(
                "--tokens", default=None, help="Read-time selection: cls, patch, pool:G or all.  [default: as stored]"
            ),
            click.option("--epochs", default=30, show_default=True),
            click.option("--batch-size", default=64, show_default=True),
            click.option("--lr", default=1e-3, show_default=True),
            click.option("--weight-decay", default=0.05, show_default=True),
            click.option("--warmup-epochs", default=1.0, show_default=True),
            click.option(
                "--train-fraction", default=1.0, show_default=True, help="Seeded (stratified) fraction of train."
            ),
            click.option("--shots", type=int, help="K training samples per class of the first classify task."),
            click.option(
                "--val-fraction",
                default=0.1,
                show_default=True,
                help="Seeded hold-out of train when there is no val split.",
            ),
            click.option(
                "--max-memory",
                default=None,
                help="Load tokens into memory up to this size (e.g. 8G), else stream.  [default: 40% of RAM, at most 16G]",
            ),
            click.option("--device", default="cpu", show_default=True),
            click.option("--progress/--no-progress", default=None, help="Progress bar.  [default: when on a terminal]"),
        ]
    ):
        fn = opt(fn)
    return fn


def pop_fuser_config(kw: dict[str, Any]) -> FuserConfig:
    """Take the ``fuser_options`` values out of a command's keyword arguments."""
    names = {f.name for f in fields(FuserConfig)}
    return FuserConfig(**{k: kw.pop(k) for k in list(kw) if k in names})


def verify_options(fn):
    """Options of verify tasks, shared with ``etf ablate``; a task string's own ``?key=`` wins."""
    for opt in reversed(
        [
            click.option("--embed-dim", type=int, help="verify: embedding size.  [default: 512]"),
            click.option(
                "--margin", type=click.Choice(sorted(MARGINS)), help="verify: margin softmax.  [default: arcface]"
            ),
            click.option("--margin-scale", type=float, help="verify: logit scale s.  [default: 64]"),
            click.option("--margin-m", type=float, help="verify: margin m.  [default: 0.5 arcface, 0.35 cosface]"),
        ]
    ):
        fn = opt(fn)
    return fn


def pop_task_specs(kw: dict[str, Any], default: list[str]) -> list[str]:
    """``--task`` values (or the dataset's defaults) with the ``verify_options`` filled in."""
    tasks = list(kw.pop("tasks")) or default
    return with_options(
        tasks, dim=kw.pop("embed_dim"), margin=kw.pop("margin"), s=kw.pop("margin_scale"), m=kw.pop("margin_m")
    )


def split_names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@click.command("fit")
@cache_option
@data_options
@click.option(
    "--encoders",
    required=True,
    help="Comma-separated priors (store names, NAME-HASHPREFIX, or store paths); the first is canonical.",
)
@click.option(
    "--task",
    "tasks",
    multiple=True,
    help="classify:COL, multilabel:C1,C2, regress:COL, landmarks:PREFIX, verify:COL; repeat for multi-task.  [default: the dataset's]",
)
@verify_options
@click.option("--fuser", type=click.Choice(sorted(FUSERS)), default="etfuser", show_default=True)
@fuser_options
@training_options
@click.option("--seed", default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run directory.")
def command(**kw: Any) -> None:
    """Train --fuser and task heads on cached tokens of --encoders; write the run to --out."""
    dataset = open_dataset(kw.pop("data_spec"), kw.pop("crop"))
    tasks = pop_task_specs(kw, dataset.tasks)
    fuser_config = pop_fuser_config(kw)
    max_memory = kw.pop("max_memory")
    cfg = FitConfig(
        encoders=split_names(kw.pop("encoders")),
        tasks=tasks,
        fuser_config=fuser_config,
        max_memory=parse_size(max_memory) if max_memory else None,
        **kw,
    )
    click.echo(fit(dataset, cfg).summary)
