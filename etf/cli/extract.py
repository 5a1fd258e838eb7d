"""``etf extract``: encoders over a dataset, into the token cache."""

from __future__ import annotations

from pathlib import Path

import click

from etf.cache.format import CODECS, DTYPES
from etf.cli.options import (
    cache_option,
    data_options,
    device_option,
    encoders_option,
    open_dataset,
    progress_option,
)
from etf.pipeline.extract import PRECISIONS


def _int_list(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers, e.g. 4,8,12") from None


def _shard(ctx, param, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise click.BadParameter(f"{value!r}: need 0 <= I < N")
    return i, n


@click.command("extract")
@data_options
@encoders_option("Aliases (vit_b, dinov2_s, ...) or timm model names.")
@cache_option
@click.option(
    "--weights",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Local checkpoint (.pth/.pt/.bin/.safetensors) for the encoder; repeat with --soup to average several.",
)
@click.option(
    "--soup",
    is_flag=True,
    help="Average the --weights checkpoints (same architecture) uniformly into one encoder: a model soup.",
)
@click.option("--allow-partial", is_flag=True, help="Accept a --weights file that leaves most of the model random.")
@click.option(
    "--pretrained/--no-pretrained",
    default=True,
    show_default=True,
    help="timm pretrained weights, or a random init from --seed.",
)
@click.option(
    "--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of a --no-pretrained random init."
)
@click.option(
    "--layers",
    callback=_int_list,
    help="1-based blocks/stages, e.g. 4,8,12; negatives count from the end.  [default: last]",
)
@click.option("--tokens", default="all", show_default=True, help="all | cls | patch | pool:G")
@click.option(
    "--norm/--no-norm", default=True, show_default=True, help="Apply the model's final norm to the returned layers."
)
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True, help="Storage dtype.")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="Autocast precision (auto: bf16/fp16 on GPU, fp32 on CPU).",
)
@click.option(
    "--img-size",
    type=click.IntRange(min=16),
    help="Input resolution, a multiple of a ViT's patch size (position embeddings are resized).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    help="Decode worker processes (0: decode in the main process).  "
    "[default: on a GPU cores - 1; on the CPU one per 8 cores, at low priority]",
)
@click.option(
    "--decode",
    type=click.Choice(["auto", "cpu", "device"]),
    default="auto",
    show_default=True,
    help="Where JPEGs are decoded, resized and cropped: PIL in the workers (cpu), or the device "
    "(nvjpeg on CUDA); auto: device on CUDA. Recorded in the store's key. Crops and --views decode on CPU.",
)
@device_option
@click.option("--store", "store_format", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True)
@click.option(
    "--codec",
    type=click.Choice(CODECS),
    default="none",
    show_default=True,
    help="Zarr compression (activations compress poorly; see bench/README.md).",
)
@click.option(
    "--chunk-rows",
    type=click.IntRange(min=1),
    help="Samples per chunk (the resume unit).  [default: about 8 MiB, at most 1/8 of the samples]",
)
@click.option(
    "--on-error",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    show_default=True,
    help="Unreadable images: stop, or record them as skipped.",
)
@click.option(
    "--shard", callback=_shard, help="Fill only part I of N of the store (0-based); set automatically under torchrun."
)
@click.option(
    "--views",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Views per sample: view 0 the clean image (in tokens), views 1..K-1 seeded augmentations (in views).",
)
@click.option(
    "--augment",
    help="The views' augmentation: parts and strengths, e.g. flip,crop:0.8,rotate:10,color:0.3, "
    "or the preset face; flip alone makes view 1 the mirror image.  [default with --views: face]",
)
@click.option(
    "--view-seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the views' random draws."
)
@progress_option
def command(
    data_spec,
    crop,
    encoders,
    cache_dir,
    weights,
    soup,
    allow_partial,
    pretrained,
    seed,
    layers,
    tokens,
    norm,
    dtype,
    precision,
    img_size,
    batch_size,
    workers,
    decode,
    device,
    store_format,
    codec,
    chunk_rows,
    on_error,
    shard,
    views,
    augment,
    view_seed,
    progress,
) -> None:
    """Run each frozen --encoder once over --data and cache its tokens (resumable)."""
    from etf.cache.store import check_store_format
    from etf.cache.tokens import parse_tokens

    if weights and len(encoders) > 1:
        raise click.BadParameter(
            "--weights applies to one encoder; run one extract per checkpoint", param_hint="--weights"
        )
    if len(weights) > 1 and not soup:
        raise click.BadParameter(
            f"given {len(weights)} times: one checkpoint per extract, or --soup to average them", param_hint="--weights"
        )
    if soup and len(weights) < 2:
        raise click.BadParameter("needs two or more --weights checkpoints to average", param_hint="--soup")
    parse_tokens(tokens)
    from etf.pipeline.extract.augment import check_view_options

    check_view_options(views, augment)
    cache = check_store_format(cache_dir, store_format)
    if not cache.exists():  # an existing cache may be read-only yet hold every store: extract finds them
        cache.check_writable("--cache")
    dataset = open_dataset(data_spec, crop)

    from etf.cli.cache import describe_store
    from etf.pipeline.extract.encoders import create_encoder
    from etf.pipeline.extract.run import ExtractOptions, extract, plan_decode, resolve_device

    resolve_device(device)
    opts = ExtractOptions(
        layers=layers,
        tokens=tokens,
        norm=norm,
        dtype=dtype,
        precision=precision,
        batch_size=batch_size,
        workers=workers,
        decode=decode,
        device=device,
        store=store_format,
        codec=codec,
        chunk_rows=chunk_rows,
        on_error=on_error,
        shard=shard,
        progress=progress,
        views=views,
        augment=augment,
        view_seed=view_seed,
    )
    click.echo(f"dataset {dataset.describe()}: {len(dataset)} samples, key {dataset.key}")
    for name in encoders:
        encoder = create_encoder(
            name, pretrained=pretrained, weights=weights, seed=seed, img_size=img_size, allow_partial=allow_partial
        )
        for source in encoder.soup or []:
            click.echo(f"{name}: soup source {source['file']} (weights sha256 {source['weights_sha256'][:12]})")
        if encoder.load_report is not None:
            click.echo(f"{name}: {encoder.load_report.summary()}")
        if encoder.pool_note:
            click.echo(f"{name}: {encoder.pool_note}")
        _, fallback = plan_decode(dataset, encoder, opts, resolve_device(device))
        if fallback:
            click.echo(fallback)
        result = extract(dataset, encoder, cache_dir, opts)
        if result.complete and result.samples_done == 0:
            click.echo(f"{name}: found complete, nothing to extract")
        elif result.complete:
            click.echo(f"{name}: {result.samples_done} images in {result.seconds:.1f}s ({result.rate:.1f} img/s)")
        else:
            click.echo(
                f"{name}: this shard is done ({result.samples_done} images); the store completes when all shards finish"
            )
        if result.skipped:
            click.echo(f"{name}: skipped {len(result.skipped)} unreadable image(s), recorded in the manifest")
        if result.complete:
            describe_store(result.path)
