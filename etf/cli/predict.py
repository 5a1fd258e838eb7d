"""``etf predict``: a trained run on new images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click

from etf.pipeline.predict import load_predictor, predict


def _weights(ctx, param, values: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            raise click.BadParameter(f"{v!r}: expected PRIOR=FILE")
        out[name] = Path(path)
    return out


@click.command("predict")
@click.option("--run", "run", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--weights", multiple=True, callback=_weights, help="PRIOR=FILE for priors extracted with --weights.")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the predictions as JSON.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the predictions as CSV.")
def command(run, images, weights, device, batch_size, json_out, csv_out) -> None:
    """Predict every task of --run for IMAGE... (encoders, fuser and heads end to end)."""
    predictor = load_predictor(run, weights, device)
    records = []
    for b in range(0, len(images), batch_size):
        records += predict(predictor, list(images[b : b + batch_size]))
    if json_out:
        json_out.write_text(json.dumps(records, indent=1) + "\n")
    if csv_out:
        with open(csv_out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records)
    if not (json_out or csv_out):
        keys = list(records[0])
        widths = [max(len(k), *(len(str(r[k])) for r in records)) for k in keys]
        click.echo("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
        for r in records:
            click.echo("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)))
