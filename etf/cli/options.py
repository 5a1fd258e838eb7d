"""Options shared by several commands, defined once so that they mean the same everywhere.

Nothing here imports torch, timm or zarr: ``etf --help`` and commands that compute nothing
start at once. Defaults come from the configuration dataclasses they fill.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click

from etf.data.base import Dataset, load_dataset
from etf.errors import EtfError
from etf.utils import claim_dir, writable_dir  # noqa: F401  (re-exported for the commands)


def default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name``: the one place a default is written."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
    raise KeyError(name)


def _set_storage_options(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> None:
    from etf.cache.location import parse_storage_options, set_storage_options

    set_storage_options(parse_storage_options(values))


def storage_option(fn: Callable) -> Callable:
    """``--storage-option KEY=VALUE``: fsspec options of the caches this command reaches. Eager,
    so that every cache location the command builds carries them."""
    return click.option(
        "--storage-option",
        multiple=True,
        is_eager=True,
        expose_value=False,
        callback=_set_storage_options,
        metavar="KEY=VALUE",
        help="fsspec option for a cache URL (endpoint_url=..., anon=true); repeat for several. "
        "Also from $ETF_STORAGE_OPTIONS (JSON) and the usual AWS_* variables. Never recorded.",
    )(fn)


def location_type(ctx: click.Context | None, param: click.Parameter | None, value: str | None):
    """A cache directory or store as a local path or an fsspec URL (``s3://bucket/prefix``)."""
    from etf.cache.location import cache_location

    return None if value is None else cache_location(value)


def cache_option(fn: Callable) -> Callable:
    fn = click.option(
        "--cache",
        "cache_dir",
        default=lambda: os.environ.get("ETF_CACHE", "cache"),
        callback=location_type,
        show_default="$ETF_CACHE or ./cache",
        metavar="DIR|URL",
        help="Cache holding manifests and token stores: a directory or an fsspec URL (s3://bucket/prefix).",
    )(fn)
    return storage_option(fn)


def data_options(fn: Callable | None = None, *, multiple: bool = False) -> Callable:
    """``--data SPEC`` plus the options every dataset format accepts; ``multiple``: ``--data``
    may repeat (a joint fit over several datasets)."""
    if fn is None:
        return lambda f: data_options(f, multiple=multiple)
    fn = click.option(
        "--crop",
        default=None,
        help="Face crop before preprocessing: none, bbox[:margin], align5[:size] (part of the dataset key).",
    )(fn)
    return click.option(
        "--data",
        "data_spec",
        required=True,
        multiple=multiple,
        metavar="SPEC",
        help="FORMAT:PATH[?key=value&...] (folder:, csv:, a dataset name) or an embedded name (lfw-subset)."
        + (
            " Repeat for a joint fit over several datasets (their own stores of the same --encoders)."
            if multiple
            else ""
        ),
    )(fn)


def _comma_list(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def encoders_option(help: str, required: bool = True) -> Callable[[Callable], Callable]:
    """``--encoders A,B`` or ``--encoder A --encoder B`` (both forms, in every command)."""
    return click.option(
        "--encoders",
        "--encoder",
        "encoders",
        multiple=True,
        required=required,
        callback=_comma_list,
        metavar="A[,B...]",
        help=help + " Comma list or repeated.",
    )


def device_option(fn: Callable) -> Callable:
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="cpu, cuda, cuda:N, mps, or auto (the first GPU, else the CPU).",
    )(fn)


def progress_option(fn: Callable) -> Callable:
    return click.option("--progress/--no-progress", default=None, help="Progress bars.  [default: when on a terminal]")(
        fn
    )


def run_option(fn: Callable) -> Callable:
    return click.option(
        "--run",
        "run",
        required=True,
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="A run directory written by etf fit.",
    )(fn)


def weights_option(fn: Callable) -> Callable:
    return click.option(
        "--weights",
        multiple=True,
        callback=_named_files,
        metavar="PRIOR=FILE",
        help="The checkpoint of a prior extracted with --weights; repeat for several priors (and for a soup's sources).",
    )(fn)


def _named_files(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{v!r}: expected PRIOR=FILE", param_hint="--weights")
        if not Path(path).is_file():
            raise click.BadParameter(f"{path}: no such file", param_hint="--weights")
        out.setdefault(name, []).append(Path(path))
    return out


def open_dataset(data_spec: str, crop: str | None, **options: Any) -> Dataset:
    return load_dataset(data_spec, crop=crop, **options)


def writable_file(path: Path | None, flag: str) -> Path | None:
    """Refuse an output file whose directory does not exist or cannot be written."""
    if path is None:
        return None
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise EtfError(f"{flag} {path}: is a directory")
    if not parent.is_dir():
        raise EtfError(f"{flag} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise EtfError(f"{flag} {path}: {parent} is not writable")
    return path


def echo_kv(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"  {k:<{width}}  {v}")
