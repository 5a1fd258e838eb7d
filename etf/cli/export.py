"""``etf export``: a trained run's canonical inference as one ONNX or TorchScript file."""

from __future__ import annotations

from pathlib import Path

import click

from etf.cli.options import run_option, weights_option, writable_file


@click.command("export")
@run_option
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The model file to write.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "torchscript"]),
    default="onnx",
    show_default=True,
    help="onnx: runs under onnxruntime without torch; torchscript: torch.jit.load.",
)
@click.option(
    "--layout",
    type=click.Choice(["nhwc", "nchw"]),
    default="nhwc",
    show_default=True,
    help="The input's layout: uint8 (N, H, W, 3) or (N, 3, H, W) RGB images at the store's input size.",
)
@weights_option
def command(run, out, fmt, layout, weights) -> None:
    """Write --run's canonical encoder, fuser and heads as one file, and a JSON card beside it."""
    writable_file(out, "--out")
    from etf.pipeline.fit.export import card_path, describe, export_run

    card = export_run(run, out, fmt, layout, weights)
    click.echo(f"wrote {out} ({fmt}) and {card_path(out)}")
    click.echo(describe(card))
