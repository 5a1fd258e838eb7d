"""``etf cache ls|info|verify|import``."""

from __future__ import annotations

from pathlib import Path

import click

from etf.cache.audit import disk_bytes, manifest_summary, partial_progress, store_info, verify_store
from etf.cache.catalog import list_stores
from etf.cache.importer import import_tokens
from etf.cli.options import cache_option, data_options, echo_kv, open_dataset

STORE_PATH = click.Path(exists=True, path_type=Path)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe_store(path: Path) -> None:
    info = store_info(path)
    click.echo(f"{path}")
    echo_kv(
        [
            ("encoder", f"{info['name']} ({info['model'] or info['source']}; {info['weights'] or 'imported'})"),
            ("samples", f"{info['samples']}" + (f" ({info['skipped']} skipped)" if info["skipped"] else "")),
            ("arrays", ", ".join(f"{k} {tuple(v)}" for k, v in info["arrays"].items())),
            ("layers", ",".join(map(str, info["layers"]))),
            (
                "tokens",
                f"{info['tokens']}; "
                + ", ".join(
                    f"layer {k}: {v['prefix']} prefix + {'x'.join(map(str, v['grid'])) if v['grid'] else 'no'} grid"
                    for k, v in info["layouts"].items()
                ),
            ),
            ("dtype", f"{info['dtype']} (computed in {info['precision'] or 'n/a'}), input {info['input_size']}"),
            ("on disk", f"{_size(info['bytes'])}, {info['chunk_rows']} samples per chunk, codec {info['codec']}"),
            ("GFLOPs/img", f"{info['flops_per_image'] / 1e9:.2f}" if info["flops_per_image"] else "n/a"),
        ]
    )


@click.group("cache")
def command() -> None:
    """Inspect, check and import token stores."""


@command.command("ls")
@click.argument("cache_dir", type=click.Path(file_okay=False, path_type=Path), default="cache")
def ls(cache_dir: Path) -> None:
    """List datasets and stores under CACHE_DIR."""
    entries = list_stores(cache_dir)
    if not entries:
        click.echo(f"{cache_dir}: no stores")
        return
    for key in dict.fromkeys(e.dataset_key for e in entries):
        click.echo(f"{key}  {manifest_summary(cache_dir, key)}")
        for e in (e for e in entries if e.dataset_key == key):
            if e.complete:
                state = "complete"
            else:
                done, total = partial_progress(e.path)
                state = f"incomplete ({done}/{total} chunks)"
            click.echo(f"  {e.path.name:<48} {state:<24} {_size(disk_bytes(e.path))}")


@command.command("info")
@click.argument("store", type=STORE_PATH)
def info(store: Path) -> None:
    """What STORE holds: encoder, layers, token layout, dtype, size."""
    describe_store(store)


@command.command("verify")
@click.argument("store", type=STORE_PATH)
def verify(store: Path) -> None:
    """Check STORE: spec hash, manifest, shapes, every chunk present, finite values."""
    problems = verify_store(store)
    if problems:
        for p in problems:
            click.echo(f"{store}: {p}", err=True)
        raise SystemExit(1)
    click.echo(f"{store}: ok")


@command.command("import")
@cache_option
@data_options
@click.option("--name", required=True, help="Name of the prior (used as --encoders NAME by etf fit).")
@click.option(
    "--tokens",
    "tokens_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=".npy of shape (N,T,D) or (N,L,T,D).",
)
@click.option(
    "--ids",
    "ids_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Sample id of each row, one per line.  [default: manifest order]",
)
@click.option("--prefix", type=int, help="Leading non-patch tokens.  [default: 0 or 1, whichever leaves a square grid]")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True)
@click.option("--store", "store_format", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True)
def import_(cache_dir, data_spec, crop, name, tokens_file, ids_file, prefix, dtype, store_format) -> None:
    """Bring tokens computed elsewhere into the cache as a store."""
    dataset = open_dataset(data_spec, crop)
    path = import_tokens(cache_dir, dataset, name, tokens_file, ids_file, dtype, prefix, store_format)
    describe_store(path)
