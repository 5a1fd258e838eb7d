"""``etf explain``: attention maps of a trained run, over images or a whole split."""

from __future__ import annotations

from pathlib import Path

import click

from etf.cli.options import claim_dir, device_option, location_type, run_option, storage_option, weights_option


@click.command("explain")
@run_option
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--split", help="Instead of images: mean attention share per prior/stage over this split of the cache.")
@click.option(
    "--data", "data_spec", metavar="SPEC", help="With --split: the dataset.  [default: as the run recorded it]"
)
@click.option(
    "--cache",
    "cache_dir",
    callback=location_type,
    metavar="DIR|URL",
    help="With --split: the cache, a directory or fsspec URL.  [default: the run's]",
)
@storage_option
@weights_option
@device_option
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the PNGs: new, empty, or one etf explain wrote.",
)
def command(run, images, split, data_spec, cache_dir, weights, device, out) -> None:
    """Draw where --run's fuser looks: over IMAGE... (PNG overlays), or over --split (bar chart)."""
    if bool(images) == bool(split):
        raise click.UsageError("give IMAGE... or --split NAME (one of them)")
    claim_dir(out, "--out", "explain")
    from etf.pipeline.fit.explain import explain_images, explain_split

    if images:
        paths = explain_images(run, list(images), out, weights, device)
    else:
        paths = explain_split(run, split, out, data_spec, cache_dir, device)
    for path in paths:
        click.echo(path)
