"""What ``etf cache info`` and ``etf cache verify`` report about a store."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from etf.cache.catalog import STORE_RE, CacheDir, list_stores, read_manifest
from etf.cache.location import Location, cache_location
from etf.cache.store import ArraySpec, ChecksumError, TokenStore, decode_tokens, partial_of, version_mismatch
from etf.errors import EtfError
from etf.utils import spec_hash


def _partial_attrs(path: Location) -> dict[str, Any] | None:
    """The ``etf`` attributes of a store still being extracted (None before its first chunk)."""
    attrs = partial_of(path) / "attrs.json"
    return attrs.read_json() if attrs.exists() else None


def partial_progress(path: Location) -> tuple[int, int]:
    """(chunks done, chunks in all) of a store still being extracted."""
    attrs = _partial_attrs(path)
    if attrs is None:
        return 0, 0
    total = -(-int(attrs["spec"]["n"]) // int(attrs["chunk_rows"]))
    return len((partial_of(path) / "done").glob("*.json")), total


def list_summary(cache_dir: CacheDir) -> list[dict[str, str]]:
    """One row per store under ``cache_dir`` for ``etf cache ls``: state (complete, damaged,
    incomplete with its progress), what tells stores of one encoder apart (layers, tokens,
    input size, weights or init seed) and the size on disk."""
    rows = []
    for e in list_stores(cache_dir):
        row = {"dataset_key": e.dataset_key, "store": e.path.name, "size": human_size(e.path.size())}
        try:
            if e.complete:
                with TokenStore.open(e.path, check=False) as store:
                    damage = store.damage()
                    row["state"] = f"damaged: {damage[0]}" if damage else "complete"
                    row.update(_settings(store.spec))
            else:
                done, total = partial_progress(e.path)
                row["state"] = f"incomplete ({done}/{total} chunks)"
                attrs = _partial_attrs(e.path)
                row.update(_settings(attrs["spec"]) if attrs else {})
        except (EtfError, OSError, KeyError, ValueError) as err:
            row["state"] = f"unreadable ({err})"
        rows.append(
            {
                k: row.get(k, "-")
                for k in ("dataset_key", "store", "state", "layers", "tokens", "input", "weights", "size")
            }
        )
    return rows


def _settings(spec: dict[str, Any]) -> dict[str, str]:
    size = (spec.get("data_config") or {}).get("input_size")
    weights = (
        spec.get("pretrained")
        or spec.get("weights_file")
        or (f"seed {spec['init_seed']}" if spec.get("init_seed") is not None else spec.get("source", "-"))
    )
    return {
        "layers": ",".join(str(v) for v in spec.get("layers", [])),
        "tokens": str(spec.get("tokens", "-")),
        "input": f"{size[-1]}px" if size else "-",
        "weights": str(weights),
    }


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def store_info(path: str | Location) -> dict[str, Any]:
    path = cache_location(path)
    with TokenStore.open(path) as store:
        spec = store.spec
        return {
            "path": str(path),
            "name": spec["name"],
            "dataset_key": spec["dataset_key"],
            "samples": store.n,
            "skipped": len(store.skipped),
            "source": spec.get("source"),
            "model": spec.get("model"),
            "weights": spec.get("pretrained")
            or spec.get("weights_file")
            or (f"random init, seed {spec['init_seed']}" if spec.get("init_seed") is not None else None),
            "layers": store.layers,
            "tokens": spec["tokens"],
            "arrays": {a.name: [store.n, *a.shape] for a in store.array_specs + store.view_specs},
            "views": spec.get("views"),
            "layouts": {k: v.to_json() for k, v in store.layouts.items()},
            "dtype": spec["dtype"],
            "precision": spec.get("precision"),
            "input_size": (spec.get("data_config") or {}).get("input_size"),
            "chunk_rows": store.chunk_rows,
            "codec": store.attrs.get("codec"),
            "bytes": path.size(),
            "flops_per_image": store.attrs.get("info", {}).get("flops_per_image"),
            "versions": store.attrs.get("info", {}).get("versions"),
            "format_version": store.attrs.get("format_version"),
            "checksums": store.checksums,
        }


def has_checksums(path: str | Location) -> bool:
    """Whether every chunk of the store carries a checksum (format version 2 on)."""
    with TokenStore.open(cache_location(path), check=False) as store:
        return store.checksums


def verify_store(path: str | Location, cache_dir: CacheDir | None = None) -> list[str]:
    """Every problem found (empty when the store is sound): spec hash, manifest, shape,
    completeness of every chunk, finite values."""
    path = cache_location(path)
    problems: list[str] = []
    try:
        store = TokenStore.open(path, check=False)
    except EtfError as e:
        return [str(e)]
    with store:
        m = STORE_RE.match(path.name)
        if not m or m["hash"] != spec_hash(store.spec):
            problems.append(f"spec hash {spec_hash(store.spec)} does not match the file name {path.name}")
        cache_dir = cache_dir or path.parent.parent
        if path.parent.name != store.spec["dataset_key"]:
            problems.append(f"store sits under {path.parent.name} but its dataset key is {store.spec['dataset_key']}")
        try:
            manifest = read_manifest(cache_dir, store.spec["dataset_key"])
            if len(manifest["ids"]) != store.n:
                problems.append(f"manifest has {len(manifest['ids'])} samples, store has {store.n}")
        except EtfError as e:
            problems.append(f"manifest: {e}")
        ids, skipped = _row_ids(cache_dir, store), set(store.skipped)
        for a in store.array_specs + store.view_specs:
            arr = store._arrays.get(a.name)
            if arr is None or tuple(arr.shape) != (store.n, *a.shape):
                found = "missing" if arr is None else f"shape {tuple(arr.shape)}"
                problems.append(f"{a.name}: {found}, expected {(store.n, *a.shape)}")
                continue
            problems += _scan_values(store, a, ids, skipped)
        problems[:0] = store.damage()
        differs = version_mismatch(store.attrs)
        if differs:
            problems.append(f"written with {differs} (a note: the tokens are used as stored)")
    return problems


def _row_ids(cache_dir: CacheDir, store: TokenStore) -> list[str]:
    """Sample ids of the store's rows (row numbers when the manifest is unusable)."""
    try:
        ids = read_manifest(cache_dir, store.spec["dataset_key"])["ids"]
    except EtfError:
        ids = []
    return ids if len(ids) == store.n else [f"row {i}" for i in range(store.n)]


def _scan_values(store: TokenStore, a: ArraySpec, ids: list[str], skipped: set[str]) -> list[str]:
    """Read every chunk of one array: unreadable chunks and non-finite samples, per layer
    (of any view, for the views arrays)."""
    dtype, step = (a.dtype or store.spec["dtype"]), store.chunk_rows
    if not a.layers:
        return _scan_geometry(store, a, ids)
    bad: dict[int, list[str]] = {layer: [] for layer in a.layers}
    problems = []
    for start in range(0, store.n, step):
        stop = min(store.n, start + step)
        try:
            block = decode_tokens(store._rows(a.name, start, stop), dtype)
        except EtfError as e:
            problems.append(f"{a.name}: rows {start}:{stop} {_unreadable(e)}")
            continue
        views = block.reshape(len(block), -1 if a.is_views else 1, *block.shape[1 + a.is_views :])
        per_layer = views if a.name in ("tokens", "views") else views[:, :, None]
        finite = np.isfinite(per_layer.reshape(*per_layer.shape[:3], -1)).all(axis=(1, 3))
        for k, layer in enumerate(a.layers):
            bad[layer] += [ids[start + i] for i in np.nonzero(~finite[:, k])[0] if ids[start + i] not in skipped]
    what = "views of layer" if a.is_views else "layer"
    problems += [
        f"{what} {layer}: non-finite values for {', '.join(b[:5])}" + (f" (+{len(b) - 5} more)" if len(b) > 5 else "")
        for layer, b in bad.items()
        if b
    ]
    return problems


def _unreadable(e: EtfError) -> str:
    """Why rows could not be read, as a verify line says it."""
    return "fail their checksum (changed bytes)" if isinstance(e, ChecksumError) else "cannot be read"


def _scan_geometry(store: TokenStore, a: ArraySpec, ids: list[str]) -> list[str]:
    """Read every chunk of a views geometry array: unreadable chunks and non-finite matrices."""
    problems, bad = [], []
    for start in range(0, store.n, store.chunk_rows):
        stop = min(store.n, start + store.chunk_rows)
        try:
            block = store._rows(a.name, start, stop)
        except EtfError as e:
            problems.append(f"{a.name}: rows {start}:{stop} {_unreadable(e)}")
            continue
        bad += [ids[start + i] for i in np.nonzero(~np.isfinite(block.reshape(len(block), -1)).all(1))[0]]
    if bad:
        problems.append(f"{a.name}: non-finite values for {', '.join(bad[:5])}")
    return problems


def manifest_summary(cache_dir: CacheDir, key: str) -> str:
    try:
        m = read_manifest(cache_dir, key)
    except EtfError:
        return "(no manifest)"
    splits = Counter(m["splits"])  # in order of first appearance, one pass
    return f"{m['name']} ({len(m['ids'])} samples: {json.dumps(splits)[1:-1]})"
