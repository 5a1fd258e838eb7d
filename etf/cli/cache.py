"""``etf cache ls|info|verify|import``."""

from __future__ import annotations

from pathlib import Path

import click

from etf.cache.format import DTYPES, NO_CHECKSUMS, POOLS
from etf.cli.options import cache_option, data_options, echo_kv, location_type, open_dataset, storage_option
from etf.errors import EtfError


def store_argument(fn):
    """STORE: a store's path or URL, with the ``--storage-option`` flags to reach it."""
    fn = click.argument("store", metavar="STORE", callback=location_type)(fn)
    return storage_option(fn)


def describe_store(path) -> None:
    from etf.cache.audit import human_size, store_info

    info = store_info(path)
    click.echo(f"{path}")
    echo_kv(
        [
            ("encoder", f"{info['name']} ({info['model'] or info['source']}; {info['weights'] or 'imported'})"),
            ("samples", f"{info['samples']}" + (f" ({info['skipped']} skipped)" if info["skipped"] else "")),
            ("arrays", ", ".join(f"{k} {tuple(v)}" for k, v in info["arrays"].items())),
            ("layers", ",".join(map(str, info["layers"]))),
            *(
                [("views", f"{v['count']} (0: clean, 1..{v['count'] - 1}: " + _made_by(v) + ")")]
                if (v := info["views"])
                else []
            ),
            (
                "tokens",
                f"{info['tokens']}; "
                + ", ".join(
                    f"layer {k}: {v['prefix']} prefix + {'x'.join(map(str, v['grid'])) if v['grid'] else 'no'} grid, "
                    f"pooled by {v['pool']}"
                    for k, v in info["layouts"].items()
                ),
            ),
            ("dtype", f"{info['dtype']} (computed in {info['precision'] or 'n/a'}), input {info['input_size']}"),
            ("on disk", f"{human_size(info['bytes'])}, {info['chunk_rows']} samples per chunk, codec {info['codec']}"),
            ("GFLOPs/img", f"{info['flops_per_image'] / 1e9:.2f}" if info["flops_per_image"] else "n/a"),
            ("format", f"version {info['format_version']}; written by {_versions(info['versions'])}"),
            ("checksums", "every chunk (crc32c / fletcher32)" if info["checksums"] else f"none; {NO_CHECKSUMS}"),
        ]
    )


def _made_by(views: dict) -> str:
    if "augment" in views:
        return f"--augment {views['augment']}, seed {views['seed']}"
    return f"imported, geometry sha256 {views['geometry_sha256'][:12]}"


def _versions(versions: dict[str, str] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (versions or {}).items()) or "unknown versions"


@click.group("cache")
def command() -> None:
    """Inspect, check and import token stores."""


@command.command("ls")
@click.argument("cache_dir", metavar="CACHE", default="cache", callback=location_type)
@storage_option
def ls(cache_dir) -> None:
    """List datasets and stores under CACHE (a directory or URL): state, encoder settings and size."""
    from etf.cache.audit import list_summary, manifest_summary

    if not cache_dir.is_dir():
        raise EtfError(f"{cache_dir}: no such cache directory")
    rows = list_summary(cache_dir)
    if not rows:
        click.echo(f"{cache_dir}: no stores")
        return
    headers = ("store", "state", "layers", "tokens", "input", "weights", "size")
    for key in dict.fromkeys(r["dataset_key"] for r in rows):
        click.echo(f"{key}  {manifest_summary(cache_dir, key)}")
        table = [[r[h] for h in headers] for r in rows if r["dataset_key"] == key]
        widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
        click.echo("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
        for row in table:
            click.echo("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


@command.command("info")
@store_argument
def info(store) -> None:
    """What STORE holds: encoder, layers, token layout, dtype, size."""
    describe_store(store)


@command.command("verify")
@store_argument
def verify(store) -> None:
    """Check STORE: spec hash, manifest, shapes, every chunk present and readable, finite values."""
    from etf.cache.audit import has_checksums, verify_store

    problems = verify_store(store)
    if problems:
        for p in problems:
            click.echo(f"{store}: {p}", err=True)
        raise SystemExit(1)
    click.echo(
        f"{store}: ok" if has_checksums(store) else f"{store}: ok, but its chunks carry no checksums; {NO_CHECKSUMS}"
    )


@command.command("import")
@cache_option
@data_options
@click.option("--name", required=True, help="Name of the prior (used as --encoders NAME by etf fit).")
@click.option(
    "--array",
    "array_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=".npy of shape (N,T,D) or (N,L,T,D): row i holds sample i of --ids (or of the manifest).",
)
@click.option(
    "--ids",
    "ids_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Sample id of each row, one per line.  [default: manifest order]",
)
@click.option(
    "--prefix",
    type=click.IntRange(min=0),
    help="Leading non-patch tokens.  [default: 0 or 1, whichever leaves a square grid]",
)
@click.option(
    "--pool",
    type=click.Choice(POOLS),
    help="How the prior summarises an image: its class token (the first prefix token) or the mean, max or "
    "mean+max/2 of its patch tokens.  [default: token with a prefix, else avg]",
)
@click.option(
    "--geometry",
    "geometry_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Augmented views: .npy (N,K,3,3), per sample and view the matrix from clean to view pixels (view 0 the "
    "identity); --array then has a view axis, (N,K,T,D) or (N,K,L,T,D).",
)
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True)
@click.option("--store", "store_format", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True)
def import_(
    cache_dir, data_spec, crop, name, array_file, ids_file, prefix, pool, geometry_file, dtype, store_format
) -> None:
    """Bring tokens computed elsewhere into the cache as a store."""
    from etf.cache.importer import import_tokens
    from etf.cache.store import check_store_format

    check_store_format(cache_dir, store_format).check_writable("--cache")
    dataset = open_dataset(data_spec, crop)
    path = import_tokens(
        cache_dir, dataset, name, array_file, ids_file, dtype, prefix, store_format, geometry_file, pool
    )
    describe_store(path)
