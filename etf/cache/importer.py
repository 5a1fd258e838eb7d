"""``etf cache import``: tokens computed elsewhere (e.g. a face model outside timm) as a store."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from etf.cache.catalog import CacheDir, write_manifest
from etf.cache.location import Location
from etf.cache.store import StoreWriter, is_complete, plan_arrays, plan_views, store_path
from etf.cache.tokens import TokenLayout, encode_tokens
from etf.data.base import Dataset
from etf.errors import EtfError
from etf.utils import sha256_file


def guess_layout(tokens: int, prefix: int | None, pool: str | None = None) -> TokenLayout:
    """A square patch grid after ``prefix`` tokens; by default 0 or 1 prefix tokens, whichever
    leaves a square number, else every token counts as prefix (no grid). ``pool``: how the
    prior summarises an image (default: its class token where there is a prefix, else the
    patch mean); a pooling the tokens cannot give is refused."""
    options = [prefix] if prefix is not None else [0, 1]
    layout = None
    for p in options:
        side = math.isqrt(tokens - p) if tokens - p > 0 else 0
        if side * side == tokens - p and side > 0:
            layout = TokenLayout(p, (side, side), pool or "")
            break
    if layout is None and prefix is not None:
        raise EtfError(f"--prefix {prefix}: {tokens - prefix} remaining tokens do not form a square grid")
    layout = layout or TokenLayout(tokens, None, pool or "")
    if pool and layout.pool != pool:
        has = f"{layout.prefix} prefix token(s) and " + ("a patch grid" if layout.grid else "no patch grid")
        raise EtfError(f"--pool {pool}: these tokens have {has}; set --prefix, or use --pool {layout.pool}")
    return layout


def _row_order(dataset: Dataset, n_rows: int, ids_file: Path | None) -> np.ndarray:
    """For each manifest sample, the row of the array that holds it."""
    if ids_file is None:
        if n_rows != len(dataset):
            raise EtfError(f"--array has {n_rows} rows but {dataset.describe()} has {len(dataset)} samples; pass --ids")
        return np.arange(n_rows)
    ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    if len(ids) != n_rows:
        raise EtfError(f"--ids {ids_file}: {len(ids)} ids for {n_rows} rows of --array")
    row_of: dict[str, int] = {}
    known = set(dataset.ids)
    for r, sid in enumerate(ids):
        if sid in row_of:
            raise EtfError(f"--ids {ids_file}: line {r + 1}: id {sid!r} appears twice")
        if sid not in known:
            raise EtfError(f"--ids {ids_file}: line {r + 1}: {sid!r} is not a sample of {dataset.describe()}")
        row_of[sid] = r
    missing = [s for s in dataset.ids if s not in row_of]
    if missing:
        raise EtfError(f"--ids {ids_file}: {len(missing)} samples of the dataset have no row (first: {missing[0]!r})")
    return np.array([row_of[s] for s in dataset.ids])


def import_tokens(
    cache_dir: CacheDir,
    dataset: Dataset,
    name: str,
    tokens_file: Path,
    ids_file: Path | None = None,
    dtype: str = "float16",
    prefix: int | None = None,
    store_format: str = "zarr",
    geometry_file: Path | None = None,
    pool: str | None = None,
) -> Location:
    """Write ``tokens_file`` ((N, T, D) or (N, L, T, D) .npy) as the complete store ``name``.

    With ``geometry_file`` ((N, K, 3, 3) .npy: per sample and view, the matrix from clean to
    view pixels, view 0 the identity) the array has a view axis after the sample axis,
    (N, K, T, D) or (N, K, L, T, D), and its views 1..K-1 become the store's views.
    ``pool`` states the prior's own pooling (:func:`guess_layout`); it is part of the key.
    """
    src = _load(tokens_file, "--array")
    shapes = "(N,K,T,D) or (N,K,L,T,D)" if geometry_file else "(N,T,D) or (N,L,T,D)"
    if src.ndim not in (3 + bool(geometry_file), 4 + bool(geometry_file)) or not np.issubdtype(src.dtype, np.floating):
        raise EtfError(f"--array {tokens_file}: expected a float array {shapes}, got {src.dtype} {src.shape}")
    if 0 in src.shape:
        raise EtfError(f"--array {tokens_file}: an empty array {src.shape}; every axis of {shapes} needs a size")
    if not geometry_file:
        src = src[:, None]  # one view
    if src.ndim == 4:
        src = src[:, :, None]  # one layer
    views = src.shape[1]
    order = _row_order(dataset, src.shape[0], ids_file)
    geometry = _geometry(geometry_file, src.shape[:2]) if geometry_file else None
    n_layers, t, d = src.shape[2:]
    layers = list(range(1, n_layers + 1))
    layout = guess_layout(t, prefix, pool)
    spec = {
        "name": name,
        "source": "import",
        "dataset_key": dataset.key,
        "n": len(dataset),
        "tokens_sha256": sha256_file(tokens_file),
        "ids_sha256": sha256_file(ids_file) if ids_file else None,
        "layers": layers,
        "layout": layout.to_json(),
        "tokens": "all",
        "dtype": dtype,
        **({"views": {"count": views, "geometry_sha256": sha256_file(geometry_file)}} if views > 1 else {}),
    }
    path = store_path(cache_dir, dataset.key, name, spec, store_format)
    write_manifest(cache_dir, dataset)
    if is_complete(path):
        return path
    arrays = plan_arrays(layers, [(t, d)] * n_layers)
    writer = StoreWriter(path, spec, arrays, {layer: layout for layer in layers}, views=plan_views(arrays, views))
    for c in sorted(set(range(writer.num_chunks)) - writer.done_chunks()):
        start, stop = writer.chunk_range(c)
        rows = order[start:stop]
        block = torch.from_numpy(np.ascontiguousarray(src[rows], dtype=np.float32))
        ids = dataset.ids[start:stop]
        stored = encode_tokens(block.flatten(2, 3).flatten(0, 1), dtype, [i for i in ids for _ in range(views)])
        stored = stored.reshape(block.shape)
        data = {"tokens": stored[:, 0]}
        if views > 1:
            data |= {"views": stored[:, 1:], "view_matrix": geometry[rows]}
        writer.write_chunk(c, data, {})
    writer.finalize()
    return path


def _load(file: Path, flag: str) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise EtfError(f"{flag} {file}: cannot read as .npy ({e})") from None


def _geometry(file: Path, shape: tuple[int, int]) -> np.ndarray:
    """``--geometry``: (N, K, 3, 3) finite matrices, view 0 the identity."""
    g = np.asarray(_load(file, "--geometry"), dtype=np.float64)
    if g.shape != (*shape, 3, 3):
        raise EtfError(f"--geometry {file}: expected shape {(*shape, 3, 3)} (N, K, 3, 3) for --array, got {g.shape}")
    if not np.isfinite(g).all():
        raise EtfError(f"--geometry {file}: holds non-finite values")
    if not np.allclose(g[:, 0], np.eye(3)):
        raise EtfError(f"--geometry {file}: view 0 must be the clean image (the identity matrix for every sample)")
    return g
