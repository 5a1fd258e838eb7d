"""Options shared by several commands, defined once."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from etf.data.base import Dataset, load_dataset


def cache_option(fn: Callable) -> Callable:
    return click.option(
        "--cache",
        "cache_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: os.environ.get("ETF_CACHE", "cache"),
        show_default="$ETF_CACHE or ./cache",
        help="Cache directory holding manifests and token stores.",
    )(fn)


def data_options(fn: Callable) -> Callable:
    """``--data SPEC`` plus the options every dataset format accepts."""
    fn = click.option(
        "--crop",
        default=None,
        help="Face crop before preprocessing: none, bbox[:margin], align5[:size] (part of the dataset key).",
    )(fn)
    return click.option(
        "--data",
        "data_spec",
        required=True,
        metavar="SPEC",
        help="FORMAT:PATH[?key=value&...] (folder:, csv:, a dataset name) or an embedded name (lfw-subset).",
    )(fn)


def open_dataset(data_spec: str, crop: str | None, **options: Any) -> Dataset:
    return load_dataset(data_spec, crop=crop, **options)


def echo_kv(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"  {k:<{width}}  {v}")
