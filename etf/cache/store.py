"""Token stores: one per (dataset manifest, encoder spec), content-addressed and resumable.

Layout (documented in the README, readable without etf); ``DIR`` is a local directory or
an fsspec URL (:mod:`etf.cache.location`)::

    DIR/<dataset-key>/manifest.json
    DIR/<dataset-key>/<name>-<spec-hash>.zarr      complete stores (or .h5, local only)
    DIR/<dataset-key>/<name>-<spec-hash>.zarr.partial/   while extraction is under way
        attrs.json     the store's etf attributes, "complete": false
        done/<c>.json  one file per finished chunk c (its skipped sample ids and why)
        data.zarr/     on a local disk: the arrays being filled

Arrays are ``tokens`` (N, L, T, D) when every layer has the same shape, else one
``tokens_<layer>`` (N, T, D) per layer. A store of augmented views (``--views K``) also
holds ``views`` (N, K-1, L, T, D) or ``views_<layer>`` (N, K-1, T, D), views 1..K-1 chunked
one view at a time, and the geometry of every view, view 0 (the clean image) included:
``view_matrix`` (N, K, 3, 3) and ``view_flip`` (N, K). Rows are written a whole chunk at a time and a
chunk's marker is written after its data, so a run killed at any moment resumes by
redoing only unmarked chunks. The arrays are staged without a root group: the root
``zarr.json``, whose ``etf`` attributes say ``"complete": true``, is written last, once
every chunk object is known to exist, so neither etf nor another Zarr reader can open a
store before it is complete. On a local disk the staged arrays are then renamed into
place; on object storage, which cannot rename, they were written in place from the start.
"""

from __future__ import annotations

import asyncio
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from etf.cache.format import (
    CODECS,
    FORMAT_VERSION,
    FORMATS,
    HDF5_CHUNK_BYTES,
    PHYSICAL,
    READABLE_VERSIONS,
    ZARR_CHUNK_BYTES,
)
from etf.cache.location import Location, cache_location
from etf.cache.tokens import TokenLayout, legacy_pool
from etf.data.geometry import is_mirror
from etf.errors import EtfError
from etf.utils import atomic_path, canonical_json, spec_hash


def physical_dtype(dtype: str) -> np.dtype:
    return np.dtype(PHYSICAL[dtype])


def decode_tokens(a: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values to floats: float16/float32 as stored, bfloat16 bits widened to float32."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store: its name, the layers it holds, and the per-sample shape."""

    name: str
    layers: tuple[int, ...]
    shape: tuple[int, ...]  # (L, T, D) for ``tokens``, (T, D) for ``tokens_<layer>``, views first for ``views*``
    #: physical dtype of a geometry array; None: the store's token dtype
    dtype: str | None = None

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "layers": list(self.layers),
            "shape": list(self.shape),
            **({"dtype": self.dtype} if self.dtype else {}),
        }

    @property
    def is_views(self) -> bool:
        """An array of augmented views' tokens: chunked one view at a time."""
        return self.name.startswith("views")

    def chunks(self, rows: int) -> tuple[int, ...]:
        return (rows, 1, *self.shape[1:]) if self.is_views else (rows, *self.shape)

    @property
    def dimension_names(self) -> tuple[str, ...]:
        """Zarr v3 dimension names, so that xarray and dask open the arrays by name. Per-layer
        arrays (whose token counts and widths differ) name their own token and channel axes."""
        if self.name in GEOMETRY:
            return GEOMETRY[self.name][1]
        view = ("view",) if self.is_views else ()
        if self.name in ("tokens", "views"):
            return ("sample", *view, "layer", "token", "channel")
        layer = self.layers[0]
        return ("sample", *view, f"token_{layer}", f"channel_{layer}")

    @classmethod
    def from_json(cls, d: dict) -> ArraySpec:
        return cls(d["name"], tuple(d["layers"]), tuple(d["shape"]), d.get("dtype"))


#: the geometry arrays of a views store: name -> (physical dtype, dimension names)
GEOMETRY = {
    "view_matrix": ("float64", ("sample", "view", "row", "column")),
    "view_flip": ("bool", ("sample", "view")),
}


def plan_arrays(layers: list[int], shapes: list[tuple[int, int]]) -> list[ArraySpec]:
    """One ``tokens`` array when all layers agree in (T, D), else one array per layer."""
    if len(set(shapes)) == 1:
        return [ArraySpec("tokens", tuple(layers), (len(layers), *shapes[0]))]
    return [ArraySpec(f"tokens_{layer}", (layer,), shape) for layer, shape in zip(layers, shapes)]


def plan_views(arrays: list[ArraySpec], views: int) -> list[ArraySpec]:
    """The arrays a store of ``views`` views adds to its token ``arrays``: views 1..K-1 of
    each (``tokens`` -> ``views``, ``tokens_<layer>`` -> ``views_<layer>``) and the geometry
    of all K views (view 0 the identity)."""
    if views <= 1:
        return []
    tokens = [ArraySpec(a.name.replace("tokens", "views", 1), a.layers, (views - 1, *a.shape)) for a in arrays]
    shapes = {"view_matrix": (views, 3, 3), "view_flip": (views,)}
    return tokens + [ArraySpec(name, (), shapes[name], dtype) for name, (dtype, _) in GEOMETRY.items()]


def store_path(
    cache_dir: str | os.PathLike | Location, dataset_key: str, name: str, spec: dict[str, Any], fmt: str = "zarr"
) -> Location:
    cache = check_store_format(cache_dir, fmt)
    safe = name.replace("/", "_").replace(":", "_")
    return cache / dataset_key / f"{safe}-{spec_hash(spec)}{FORMATS[fmt]}"


def check_store_format(cache_dir: str | os.PathLike | Location, fmt: str) -> Location:
    """The cache's location, once ``--store FMT`` is known to be possible there."""
    if fmt not in FORMATS:
        raise EtfError(f"--store {fmt!r}: use zarr or hdf5")
    cache = cache_location(cache_dir)
    if fmt == "hdf5" and not cache.renames:
        raise EtfError(f"--store hdf5: HDF5 needs a local --cache, not {cache}; use --store zarr on object storage")
    return cache


def partial_of(path: Location) -> Location:
    """The staging folder of a store (the store itself when given its staging folder)."""
    return path if path.name.endswith(".partial") else path.with_name(path.name + ".partial")


def is_complete(path: Location) -> bool:
    """Whether the store at ``path`` is published: its root metadata (written last) exists."""
    return (path / "zarr.json").exists() if path.suffix == ".zarr" else path.exists()


#: a store has at least this many chunks (when it has the samples): the chunk is the unit of
#: resumption, so an interrupted extraction of a small dataset still keeps most of its work
MIN_CHUNKS = 8


def _chunk_rows(arrays: list[ArraySpec], itemsize: int, target: int, n: int) -> int:
    """Samples per chunk: about ``target`` bytes of the token ``arrays`` (a view's chunk is
    as large as the clean one's) and at most 1/MIN_CHUNKS of the samples, balanced over ``n``
    samples so that the last chunk is nearly full (both formats store an edge chunk at full
    size)."""
    row = sum(int(np.prod(a.shape)) for a in arrays) * itemsize
    rows = int(min(4096, -(-n // MIN_CHUNKS), max(1, target // max(row, 1))))
    return -(-n // -(-n // rows))


def _zarr_compressors(codec: str) -> list[Any]:
    """The bytes-to-bytes codecs of every array: ``codec``, then a CRC-32C of the stored bytes,
    so that any changed byte of a chunk fails its read instead of decoding to wrong tokens."""
    if codec == "none":
        compress = []
    elif codec == "zstd":
        compress = [zarr.codecs.ZstdCodec(level=3)]
    elif codec.startswith("blosc-"):
        compress = [zarr.codecs.BloscCodec(cname=codec.split("-", 1)[1], clevel=3, shuffle="bitshuffle")]
    else:
        raise EtfError(f"--codec {codec!r}: use one of {', '.join(CODECS)}")
    return [*compress, zarr.codecs.Crc32cCodec()]


class StoreWriter:
    """Create or resume the partial store for ``spec`` and fill it chunk by chunk.

    Nothing is created until the first chunk is written, so a run that stops at its input
    checks leaves no trace. Several processes may hold a writer on the same store
    (``--shard I/N``): they write disjoint chunks, and whichever finds every chunk done
    publishes the complete store. Publication is idempotent (every publisher writes the
    same bytes), so on object storage, which has no lock, shards finishing together are safe.
    """

    def __init__(
        self,
        path: str | os.PathLike | Location,
        spec: dict[str, Any],
        arrays: list[ArraySpec],
        layouts: dict[int, TokenLayout],
        *,
        codec: str = "none",
        chunk_rows: int | None = None,
        info: dict[str, Any] | None = None,
        views: list[ArraySpec] | None = None,
    ) -> None:
        self.path = cache_location(path)
        self.fmt = "hdf5" if self.path.suffix == ".h5" else "zarr"
        if self.fmt == "hdf5" and not self.path.renames:
            raise EtfError(f"{self.path}: HDF5 needs a local file system; use --store zarr on object storage")
        self.spec = spec
        self.arrays = arrays
        self.view_arrays = views or []
        self.all_arrays = arrays + self.view_arrays
        self.n = int(spec["n"])
        self.partial = partial_of(self.path)
        self.done_dir = self.partial / "done"
        # the arrays: staged in the partial folder where the file system renames, else in place
        self.data = self.partial / "data.zarr" if self.path.renames else self.path
        self._itemsize = physical_dtype(spec["dtype"]).itemsize
        _zarr_compressors(codec)  # refuse an unknown codec before anything runs
        self.chunk_rows = min(self.n, chunk_rows or _chunk_rows(arrays, self._itemsize, ZARR_CHUNK_BYTES, self.n))
        self.attrs = {
            "spec": spec,
            "complete": False,
            "format_version": FORMAT_VERSION,
            "spec_hash": spec_hash(spec),
            "arrays": [a.to_json() for a in arrays],
            **({"view_arrays": [a.to_json() for a in self.view_arrays]} if self.view_arrays else {}),
            "layouts": {str(k): v.to_json() for k, v in layouts.items()},
            "chunk_rows": self.chunk_rows,
            "codec": codec,
            "info": info or {},
        }
        self._codec = codec
        self._staged: dict[str, zarr.Array] | None = None
        if not self.complete and (self.partial / "attrs.json").exists():
            self._open_partial()

    @property
    def complete(self) -> bool:
        return is_complete(self.path)

    @property
    def num_chunks(self) -> int:
        return -(-self.n // self.chunk_rows)

    def chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk_rows, min(self.n, (c + 1) * self.chunk_rows)

    def done_chunks(self) -> set[int]:
        if self.complete:
            return set(range(self.num_chunks))
        return {int(name.removesuffix(".json")) for name in self.done_dir.glob("*.json")}

    def _open_partial(self) -> None:
        """Open the staging arrays, adopting the chunking they were created with (resume).

        Empty chunks are written too: every chunk of a finished store then exists, which is
        what readers and ``etf cache verify`` check (a chunk of skipped rows is all zeros).
        """
        found = (self.partial / "attrs.json").read_json()
        if canonical_json(found.get("spec")) != canonical_json(self.spec):
            raise EtfError(f"{self.partial}: holds a different spec than this run; remove it to start over")
        rows = int(found["chunk_rows"])
        with zarr.config.set({"array.write_empty_chunks": True}):
            try:
                staged = {
                    a.name: zarr.open_array((self.data / a.name).zarr_store(), mode="r+") for a in self.all_arrays
                }
            except (FileNotFoundError, KeyError, ValueError, zarr.errors.NodeTypeValidationError) as e:
                raise EtfError(f"{self.partial}: staged arrays unreadable ({e}); remove it to start over") from None
        if any(arr.chunks[0] != rows or arr.shape[0] != self.n for arr in staged.values()):
            raise EtfError(
                f"{self.partial}: its arrays were created with another chunking than its attributes say "
                "(shards started with different --chunk-rows?); remove it to start over"
            )
        self.chunk_rows = rows
        self.attrs = {**found, "info": {**found.get("info", {}), **self.attrs["info"]}}
        self._staged = staged

    def _staging(self) -> dict[str, zarr.Array]:
        """The staging arrays, created on first use."""
        if self._staged is None:
            planned = self.chunk_rows
            self._create()
            self._open_partial()
            if self.chunk_rows != planned:  # another shard created it with other --chunk-rows
                raise EtfError(
                    f"{self.partial}: was created with {self.chunk_rows} samples per chunk, this run planned "
                    f"{planned}; give every shard the same --chunk-rows"
                )
        return self._staged

    def _create(self) -> None:
        """The empty arrays (no root group: that is written last, on publication), then
        ``attrs.json``. Each array is created at the root of its own store, so that zarr
        writes no parent group metadata. Shards racing here write the same metadata; the
        first to write ``attrs.json`` wins and the others adopt it."""
        if (self.partial / "attrs.json").exists():
            return
        for a in self.all_arrays:
            try:
                zarr.create_array(
                    (self.data / a.name).zarr_store(),
                    shape=(self.n, *a.shape),
                    chunks=a.chunks(self.chunk_rows),
                    dtype=a.dtype or physical_dtype(self.spec["dtype"]),
                    compressors=_zarr_compressors(self._codec),
                    fill_value=0,
                    dimension_names=a.dimension_names,
                    zarr_format=3,
                )
            except zarr.errors.ContainsArrayError:  # another shard created it first
                pass
        if not (self.partial / "attrs.json").exists():
            (self.partial / "attrs.json").write_json(self.attrs)

    def write_chunk(self, c: int, data: dict[str, np.ndarray], skipped: dict[str, str]) -> None:
        """Write chunk ``c`` of every array, then mark it done (the marker is the commit).
        ``view_flip`` is derived here from ``view_matrix``."""
        start, stop = self.chunk_range(c)
        if "view_matrix" in data:
            data = {**data, "view_flip": is_mirror(data["view_matrix"])}
        for a in self.all_arrays:
            block = data[a.name]
            if block.shape != (stop - start, *a.shape):
                raise EtfError(f"chunk {c} of {a.name}: shape {block.shape}, expected {(stop - start, *a.shape)}")
        try:
            staging = self._staging()
            for a in self.all_arrays:
                staging[a.name][start:stop] = data[a.name]
            (self.done_dir / f"{c}.json").write_json(skipped)
        except OSError as e:
            raise EtfError(f"{self.partial}: cannot write chunk {c} ({e}); fix that and re-run to resume") from None

    def finalize(self) -> bool:
        """Publish the store if every chunk is done; True once the complete store exists."""
        if self.complete:
            self.partial.remove()
            return True
        if len(self.done_chunks()) < self.num_chunks:
            return False
        with (self.partial / "lock").lock():
            if self.complete:
                return True
            self._check_chunks()
            try:
                markers = [(self.done_dir / name).read_json() for name in self.done_dir.glob("*.json")]
            except EtfError:  # a marker vanished as it was read
                markers = []
            if len(markers) < self.num_chunks:
                # without a lock (object storage), another shard published at the same time and
                # removed the staging folder: its store is the same one
                if self.complete:
                    return True
                raise EtfError(f"{self.partial}: chunk markers vanished during publication; re-run to resume")
            reasons = {sid: why for marker in markers for sid, why in marker.items()}
            attrs = {**self.attrs, "complete": True, "skipped": sorted(reasons), "skip_reasons": reasons}
            if self.fmt == "zarr":
                store = self.data.zarr_store()
                zarr.open_group(store, mode="a", zarr_format=3).attrs["etf"] = attrs  # the commit
                with warnings.catch_warnings():  # zarr notes that v3 does not standardise it yet
                    warnings.simplefilter("ignore", UserWarning)
                    zarr.consolidate_metadata(store)  # xarray.open_zarr reads it in one request
                if self.path.renames:
                    self.data.rename(self.path)
            else:
                rows = _chunk_rows(self.arrays, self._itemsize, HDF5_CHUNK_BYTES, self.n)
                staged = {
                    a.name: zarr.open_array((self.data / a.name).zarr_store(read_only=True)) for a in self.all_arrays
                }
                _zarr_to_hdf5(staged, self.path.local_path, {**attrs, "chunk_rows": rows}, self.all_arrays)
        self.partial.remove()
        return True

    def _check_chunks(self) -> None:
        """Every chunk marked done must exist before the store is published: markers of
        missing chunks are removed (the next run redoes them) and publication refused."""
        missing: set[int] = set()
        for a in self.all_arrays:
            arr = zarr.open_array((self.data / a.name).zarr_store(read_only=True))
            index, keys, found = _chunk_objects(arr, chunk_grid(a, self.n, self.chunk_rows))
            missing |= {i[0] for i, k in zip(index, keys) if k not in found}
        if missing:
            for c in missing:
                (self.done_dir / f"{c}.json").remove()
            raise EtfError(
                f"{self.partial}: {len(missing)} chunk(s) marked done were not found (first: chunk {min(missing)}); "
                "re-run the same etf extract to redo them"
            )


def _zarr_to_hdf5(arrays: dict[str, zarr.Array], path: Path, attrs: dict[str, Any], specs: list[ArraySpec]) -> None:
    """Copy the staged arrays into an HDF5 file with ``attrs["chunk_rows"]`` samples per
    chunk (every array alike, views one view per chunk), written beside and renamed into place."""
    import h5py

    rows = int(attrs["chunk_rows"])
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for a in specs:
            name, arr = a.name, arrays[a.name]
            ds = f.create_dataset(name, shape=arr.shape, dtype=arr.dtype, chunks=a.chunks(rows), fletcher32=True)
            step = rows * -(-arr.chunks[0] // rows)  # whole HDF5 chunks, at least one Zarr chunk
            for start in range(0, arr.shape[0], step):
                ds[start : start + step] = arr[start : start + step]
        f.attrs["etf"] = json.dumps(attrs, sort_keys=True)


class TokenStore:
    """Read access to a complete store, Zarr or HDF5 alike.

    ``read(layer, start, stop)`` returns rows ``start:stop`` of one layer as (rows, T, D);
    callers read in blocks of ``chunk_rows`` multiples, never one sample at a time.
    Pickles as its path, so DataLoader workers (fork or spawn) reopen it themselves.
    """

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        other = TokenStore.open(state["path"], check=False)  # checked by the process that pickled it
        self.__dict__.update(other.__dict__)

    def __init__(self, path: Location, attrs: dict[str, Any], arrays: dict[str, Any], handle: Any = None) -> None:
        self.path = path
        self.attrs = attrs
        self._arrays = arrays
        self._handle = handle
        self.array_specs = [ArraySpec.from_json(a) for a in attrs["arrays"]]
        self.view_specs = [ArraySpec.from_json(a) for a in attrs.get("view_arrays", [])]
        self.layouts = {int(k): TokenLayout.from_json(v) for k, v in attrs["layouts"].items()}
        if any("pool" not in v for v in attrs["layouts"].values()):  # written before layouts said how they pool
            self.layouts = {
                k: replace(v, pool=legacy_pool(attrs["spec"].get("model"), v.prefix)) for k, v in self.layouts.items()
            }
            self.attrs = {**attrs, "layouts": {str(k): v.to_json() for k, v in self.layouts.items()}}

    @classmethod
    def open(cls, path: str | os.PathLike | Location, check: bool = True) -> TokenStore:
        """Open a complete store. With ``check`` (always, except for ``etf cache verify``, which
        reports every problem itself, and extract's read of the attributes it just published) a store with a missing or truncated chunk is refused:
        one listing of the chunk objects, no data read."""
        path = cache_location(path)
        incomplete = (
            "incomplete store (extraction still under way or interrupted); re-run the same etf extract to resume"
        )
        if path.name.endswith(".partial"):
            raise EtfError(f"{path}: {incomplete}")
        if not is_complete(path):
            raise EtfError(f"{path}: {incomplete if partial_of(path).exists() or path.exists() else 'no such store'}")
        if path.suffix == ".h5":
            import h5py

            try:
                f = h5py.File(path.local_path, "r", rdcc_nbytes=64 << 20)
                attrs = json.loads(f.attrs["etf"])
            except (OSError, KeyError, ValueError) as e:
                raise EtfError(f"{path}: not a readable etf HDF5 store ({e})") from None
            arrays = {k: f[k] for k in f.keys()}
            handle = f
        else:
            try:
                group = zarr.open_group(path.zarr_store(read_only=True), mode="r")
                attrs = dict(group.attrs)["etf"]
            except EtfError:
                raise
            except Exception as e:
                raise EtfError(f"{path}: not a readable etf Zarr store ({type(e).__name__}: {e})") from None
            arrays = {k: v for k, v in group.arrays()}
            handle = None
        store = cls(path, attrs, arrays, handle)
        problem = (
            "incomplete store; re-run the same etf extract to resume"
            if not attrs.get("complete")
            else f"store format version {attrs.get('format_version')}, this etf reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
            if attrs.get("format_version") not in READABLE_VERSIONS
            else None
        )
        if problem is None and check:
            damage = store.damage()
            problem = f"damaged store ({damage[0]}{' ...' if len(damage) > 1 else ''}); {REPAIR}" if damage else None
        if problem:
            store.close()
            raise EtfError(f"{path}: {problem}")
        if check:
            report_versions(path, attrs)
        return store

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def spec(self) -> dict[str, Any]:
        return self.attrs["spec"]

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def n(self) -> int:
        return int(self.spec["n"])

    @property
    def layers(self) -> list[int]:
        return [layer for a in self.array_specs for layer in a.layers]

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    @property
    def views(self) -> int:
        """Views per sample: 1 (the clean image) unless extracted with ``--views K``."""
        return int((self.spec.get("views") or {}).get("count", 1))

    def geometry(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(rows, K, 3, 3): per sample and view, the matrix from clean to view pixels."""
        stop = self.n if stop is None else stop
        if self.views == 1:
            return np.broadcast_to(np.eye(3), (stop - start, 1, 3, 3)).copy()
        return self._rows("view_matrix", start, stop).astype(np.float64)

    @property
    def skipped(self) -> list[str]:
        return list(self.attrs.get("skipped", []))

    @property
    def skip_reasons(self) -> dict[str, str]:
        """Why each skipped sample was skipped (the decoder's or the header check's words)."""
        return dict(self.attrs.get("skip_reasons") or dict.fromkeys(self.skipped, "unreadable image"))

    def shape(self, layer: int) -> tuple[int, int]:
        """(T, D) of one layer."""
        a, _ = self._locate(layer)
        return tuple(a.shape[-2:])

    def _locate(self, layer: int) -> tuple[ArraySpec, int | None]:
        for a in self.array_specs:
            if layer in a.layers:
                return a, (a.layers.index(layer) if a.name == "tokens" else None)
        raise EtfError(f"{self.path}: has no layer {layer} (layers: {', '.join(map(str, self.layers))})")

    def read(self, layer: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        a, i = self._locate(layer)
        stop = self.n if stop is None else stop
        return decode_tokens(self._rows(a.name, start, stop, i), self.spec["dtype"])

    def _rows(self, name: str, start: int, stop: int, layer_index: int | None = None) -> np.ndarray:
        """Stored rows ``start:stop`` of one array; a chunk that cannot be decoded is an error
        naming the store, never a traceback or a silent substitute."""
        arr = self._arrays[name]
        try:
            return np.asarray(arr[start:stop, layer_index] if layer_index is not None else arr[start:stop])
        except Exception as e:  # codec, shape and I/O errors of a damaged chunk, whatever the format
            if _is_checksum_error(e, arr):
                raise ChecksumError(
                    f"{self.path}: rows {start}:{stop} of {name} fail their checksum; {REPAIR}"
                ) from None
            raise EtfError(
                f"{self.path}: rows {start}:{stop} of {name} cannot be read ({type(e).__name__}: {e}); {REPAIR}"
            ) from None

    @property
    def checksums(self) -> bool:
        """Whether every array's chunks carry a checksum (Zarr ``crc32c``, HDF5 ``fletcher32``):
        format version 2 on; older stores are read without one."""
        return all(_has_checksum(arr) for arr in self._arrays.values())

    def damage(self) -> list[str]:
        """What is wrong with the stored chunks, from one listing: chunk objects that are missing
        or (uncompressed) of the wrong size. Empty for a sound store."""
        problems = []
        for a in self.array_specs + self.view_specs:
            if a.name not in self._arrays:
                problems.append(f"{a.name}: array missing")
                continue
            arr = self._arrays[a.name]
            grid = chunk_grid(a, self.n, self.chunk_rows)
            if self.path.suffix == ".h5":
                expected, found = int(np.prod(grid)), arr.id.get_num_chunks()
                bad = [] if found == expected else [f"{a.name}: {expected - found} of {expected} chunks missing"]
            else:
                bad = _zarr_chunk_damage(arr, a.name, grid, self.attrs.get("codec", "none") == "none")
            problems += bad
        return problems

    def read_layers(
        self, layers: list[int], start: int = 0, stop: int | None = None, view: int = 0
    ) -> dict[int, np.ndarray]:
        """Several layers of rows ``start:stop`` in one view (0: the clean image), reading
        each array's chunks of that view once."""
        stop = self.n if stop is None else stop
        if not 0 <= view < self.views:
            raise EtfError(f"{self.path}: has no view {view} (views 0..{self.views - 1})")
        out: dict[int, np.ndarray] = {}
        for a, source in zip(self.array_specs, self.view_specs if view else self.array_specs):
            wanted = [layer for layer in layers if layer in a.layers]
            if not wanted:
                continue
            block = decode_tokens(self._rows(source.name, start, stop, view - 1 if view else None), self.spec["dtype"])
            for layer in wanted:
                out[layer] = block[:, a.layers.index(layer)] if a.name == "tokens" else block
        missing = [layer for layer in layers if layer not in out]
        if missing:
            self._locate(missing[0])  # raises naming the layer
        return out

    def blocks(self, layer: int, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(start, block) over the whole layer in chunk-aligned blocks."""
        step = rows or self.chunk_rows * max(1, (32 << 20) // max(1, self.chunk_bytes))
        for start in range(0, self.n, step):
            yield start, self.read(layer, start, min(self.n, start + step))

    @property
    def chunk_bytes(self) -> int:
        row = sum(int(np.prod(a.shape)) for a in self.array_specs) * physical_dtype(self.spec["dtype"]).itemsize
        return row * self.chunk_rows


class ChecksumError(EtfError):
    """Stored rows whose chunk no longer matches its checksum: bytes changed after they were written."""


#: what to do about a damaged store, in every message that refuses one
REPAIR = "run etf cache verify on it, then delete it and re-run etf extract"


def _has_checksum(arr: Any) -> bool:
    """Whether a stored array checks its chunks on read: Zarr's ``crc32c`` codec or HDF5's
    ``fletcher32`` filter."""
    if isinstance(arr, zarr.Array):
        return any(isinstance(c, zarr.codecs.Crc32cCodec) for c in arr.metadata.codecs)
    return bool(arr.fletcher32)


def _is_checksum_error(e: Exception, arr: Any) -> bool:
    """A read refused by a chunk's checksum: zarr's crc32c codec says so; HDF5 says only that
    a filter failed, and fletcher32 is the only filter etf's HDF5 stores have."""
    return "checksum" in str(e).lower() or (
        not isinstance(arr, zarr.Array) and _has_checksum(arr) and "filter returned failure" in str(e)
    )


def _chunk_objects(arr: zarr.Array, grid: list[int]) -> tuple[list[tuple[int, ...]], list[str], dict[str, int]]:
    """The index and key of every chunk of an array chunked by rows (and views) over the
    chunk ``grid``, and the size of every object stored under the array, from one listing."""
    import itertools

    from zarr.core.sync import sync

    store, path = arr.store_path.store, arr.store_path.path
    prefix = f"{path}/" if path else ""

    async def sizes() -> dict[str, int]:
        keys = [k async for k in store.list_prefix(prefix)]
        return dict(zip(keys, await asyncio.gather(*(store.getsize(k) for k in keys))))

    encode = arr.metadata.chunk_key_encoding.encode_chunk_key
    rest = [1] * (arr.ndim - len(grid))
    index = list(itertools.product(*(range(g) for g in [*grid, *rest])))
    return index, [f"{prefix}{encode(i)}" for i in index], sync(sizes())


def chunk_grid(a: ArraySpec, n: int, chunk_rows: int) -> list[int]:
    """The number of chunks of array ``a`` of ``n`` rows along each axis."""
    return [-(-s // c) for s, c in zip((n, *a.shape), a.chunks(chunk_rows))]


def _zarr_chunk_damage(arr: zarr.Array, name: str, grid: list[int], uncompressed: bool) -> list[str]:
    """Missing and (for uncompressed arrays, whose chunks all have one size) truncated chunk
    objects of a Zarr array chunked by rows (and views), from one listing of its keys."""
    index, keys, found = _chunk_objects(arr, grid)
    missing = [index[c] for c, k in enumerate(keys) if k not in found]
    out = []
    if missing:
        rows, first = arr.chunks[0], missing[0]
        view = f", view {first[1] + 1}" if name.startswith("views") else ""
        out.append(
            f"{name}: {len(missing)} of {len(keys)} chunks missing (first: rows {first[0] * rows}:{(first[0] + 1) * rows}{view})"
        )
    if uncompressed:
        size = int(np.prod(arr.chunks)) * arr.dtype.itemsize + 4 * _has_checksum(arr)  # a CRC-32C is 4 bytes
        wrong = [c for c, k in enumerate(keys) if k in found and found[k] != size]
        if wrong:
            out.append(
                f"{name}: {len(wrong)} chunk(s) of the wrong size (first: chunk {wrong[0]}, {found[keys[wrong[0]]]} bytes of {size})"
            )
    return out


#: libraries whose versions can change the tokens an encoder computes
TOKEN_LIBRARIES = ("etf", "torch", "timm")


def version_mismatch(attrs: dict[str, Any]) -> str | None:
    """How the library versions a store was written with differ from these, or None."""
    recorded = (attrs.get("info") or {}).get("versions") or {}
    current = library_versions()
    differs = [
        f"{k} {recorded[k]} (now {current[k]})"
        for k in TOKEN_LIBRARIES
        if k in recorded and _public(recorded[k]) != _public(current[k])
    ]
    return ", ".join(differs) or None


def _public(version: str) -> str:
    """A version without its local build tag (``2.14.1+cu130`` -> ``2.14.1``)."""
    return version.split("+")[0]


def report_versions(path: Location, attrs: dict[str, Any]) -> None:
    """One warning when a store was written with other versions of the libraries that compute
    tokens: it is used as it is (its spec has not changed), not rebuilt."""
    differs = version_mismatch(attrs)
    if differs:
        warnings.warn(
            f"{path}: written with {differs}; its tokens are used as stored (delete it and re-run etf extract to refresh)",
            stacklevel=3,
        )


def library_versions() -> dict[str, str]:
    """Installed versions, read from package metadata: nothing heavy is imported to learn them."""
    from importlib.metadata import version

    import etf

    return {"etf": etf.__version__, **{k: version(k) for k in ("torch", "timm", "zarr")}}
