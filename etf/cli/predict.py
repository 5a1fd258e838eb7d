"""``etf predict``: a trained run on new images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click

from etf.cli.options import (
    cache_option,
    claim_dir,
    device_option,
    open_dataset,
    run_option,
    weights_option,
    writable_file,
)
from etf.pipeline.fit.config import INFER_MODES


@click.command("predict")
@run_option
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--embed",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write each verify task's embeddings to DIR/embeddings-<task>.npy (+ .txt: the ids, one a line); "
    "DIR is new, empty, or one etf wrote embeddings to.",
)
@click.option(
    "--data",
    "data_spec",
    metavar="SPEC",
    help="Embed a cached dataset's samples instead of IMAGES (needs --embed; tokens from --cache) and evaluate its pair protocols.",
)
@cache_option
@click.option("--crop", default=None, help="The --crop the dataset was extracted with.")
@weights_option
@click.option(
    "--infer",
    type=click.Choice(INFER_MODES),
    default="all",
    show_default=True,
    help="all: every prior the fuser reads; canonical: the canonical prior alone (only its encoder runs).",
)
@device_option
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the predictions as JSON."
)
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the predictions as CSV.")
def command(
    run, images, embed, data_spec, cache_dir, crop, weights, infer, device, batch_size, json_out, csv_out
) -> None:
    """Predict every task of --run for IMAGE... (encoders, fuser and heads end to end)."""
    if data_spec:
        if images or not embed:
            raise click.UsageError("--data takes no IMAGE arguments and needs --embed DIR")
    elif not images:
        raise click.UsageError("give IMAGE... (or --data SPEC with --embed DIR)")
    writable_file(json_out, "--json")
    writable_file(csv_out, "--csv")
    if embed:
        claim_dir(embed, "--embed", "embed")
    from etf.pipeline.fit.predict import embed_dataset, load_predictor, predict_all
    from etf.pipeline.fit.verification import format_pair_metrics

    if data_spec:
        results = embed_dataset(run, open_dataset(data_spec, crop), cache_dir, embed, batch_size, device)
        click.echo(format_pair_metrics(results) or f"embeddings written to {embed}; the dataset has no pair protocol")
        return
    from etf.data.images import require_readable

    require_readable(list(images))  # before any encoder is built
    predictor = load_predictor(run, weights, device, infer)
    records = predict_all(predictor, list(images), batch_size, embed)
    if embed:
        click.echo(f"embeddings of {len(images)} images written to {embed}")
    if json_out:
        json_out.write_text(json.dumps(records, indent=1) + "\n")
    if csv_out:
        with open(csv_out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records)
    if not (json_out or csv_out) and len(records[0]) > 1:
        keys = list(records[0])
        widths = [max(len(k), *(len(str(r[k])) for r in records)) for k in keys]
        click.echo("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
        for r in records:
            click.echo("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)))
