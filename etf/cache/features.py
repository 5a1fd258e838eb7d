"""Several priors' stores over one dataset, joined by sample id, read in whole blocks.

:class:`PriorSet` resolves each prior to a complete store of the same dataset manifest,
chooses layers and a read-time token selection; :class:`Batches` either loads the
selected tokens into memory (when they fit the budget) or streams them block by block
(:class:`BlockStream`) through a shuffle pool, never reading one sample at a time from a
compressed store.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from etf.cache.catalog import CacheDir, find_store, read_manifest
from etf.cache.location import Location, cache_location
from etf.cache.store import TokenStore
from etf.cache.tokens import TokenLayout, parse_tokens, select_tokens
from etf.data.base import Dataset
from etf.errors import EtfError
from etf.utils import canonical_json

_TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def default_memory_budget() -> int:
    """40% of physical memory, at most 16 GiB: room for the model, the OS and a second job."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return int(min(16 << 30, 0.4 * total))


def default_device_budget(device: torch.device) -> int:
    """Device memory the tokens may take when they live on an accelerator: half of what is
    free when fitting starts (the rest is the models', their activations and optimisers')."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return free // 2


class DeviceCopy:
    """Whole blocks onto the fitting device, for a reader thread: pinned host memory and a
    non-blocking copy on a side stream, finished before the block is handed over, so the
    training stream never waits on a host-to-device copy. Identity on the CPU."""

    def __init__(self, device: torch.device | None) -> None:
        self.device = device if device is not None and device.type == "cuda" else None
        self._stream = torch.cuda.Stream(self.device) if self.device is not None else None

    def __call__(self, block: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device is None:
            return block
        consumer = torch.cuda.default_stream(self.device)
        with torch.cuda.stream(self._stream):
            out = [x.pin_memory().to(self.device, non_blocking=True) for x in block]
        self._stream.synchronize()
        for x in out:  # freed later by the training stream: keep the allocator from reusing it early
            x.record_stream(consumer)
        return out


@dataclass(frozen=True)
class Group:
    """One token sequence a fuser reads: one layer of one prior, after read-time selection."""

    prior: int
    name: str
    layer: int
    layout: TokenLayout
    dim: int

    @property
    def tokens(self) -> int:
        return self.layout.count

    def to_json(self) -> dict[str, Any]:
        return {
            "prior": self.prior,
            "name": self.name,
            "layer": self.layer,
            "layout": self.layout.to_json(),
            "dim": self.dim,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Group:
        return cls(d["prior"], d["name"], d["layer"], TokenLayout.from_json(d["layout"]), d["dim"])


def _check_manifest(cache_dir: Location, dataset: Dataset) -> None:
    """The cached manifest must describe exactly the data given by ``--data``."""
    try:
        manifest = read_manifest(cache_dir, dataset.key)
    except EtfError:
        raise EtfError(
            f"--data {dataset.describe()}: no manifest for dataset key {dataset.key} in {cache_dir}; run etf extract first"
        ) from None
    spec = dataset.spec()
    differs = [k for k in spec if canonical_json(manifest.get(k)) != canonical_json(spec[k])]
    if differs:
        raise EtfError(
            f"{cache_dir}/{dataset.key}/manifest.json differs from --data {dataset.describe()} in {', '.join(differs)}"
        )


class PriorSet:
    """The token groups of several priors, aligned to the dataset's sample order."""

    def __init__(
        self,
        cache_dir: CacheDir,
        dataset: Dataset,
        priors: list[str],
        layers: str = "last",
        tokens: str | None = None,
    ) -> None:
        if not priors:
            raise EtfError("--encoders: name at least one prior")
        if len(set(priors)) != len(priors):
            raise EtfError(f"--encoders {','.join(priors)}: a prior is named twice")
        self.cache_dir = cache_location(cache_dir)
        self.dataset = dataset
        _check_manifest(self.cache_dir, dataset)
        self.paths = [self._resolve(p) for p in priors]
        self.names = priors
        self.tokens = parse_tokens(tokens) if tokens else None
        self.stores = [TokenStore.open(p) for p in self.paths]
        skipped: set[str] = set()
        for name, store in zip(priors, self.stores):
            if store.spec["dataset_key"] != dataset.key or store.n != len(dataset):
                raise EtfError(
                    f"--encoders {name}: {store.path} was extracted from a different sample set "
                    f"(dataset key {store.spec['dataset_key']}, {store.n} samples) than --data (key {dataset.key}, {len(dataset)} samples)"
                )
            skipped.update(store.skipped)
        self.valid = np.array([sid not in skipped for sid in dataset.ids])
        self.groups: list[Group] = []
        self._source: list[tuple[int, int]] = []  # (store index, layer) of each group
        for p, store in enumerate(self.stores):
            for layer in self._layers(store, layers, priors[p]):
                layout = store.layouts[layer]
                if self.tokens:
                    probe = torch.zeros(1, layout.count, 1)
                    layout = select_tokens(probe, layout, self.tokens)[1]
                self.groups.append(Group(p, priors[p], layer, layout, store.shape(layer)[1]))
                self._source.append((p, layer))

    def _resolve(self, prior: str) -> Location:
        """A store named by path or URL, else by name in the cache."""
        if prior.endswith((".zarr", ".h5")):
            path = cache_location(prior)
            if path.exists():
                return path
        return find_store(self.cache_dir, self.dataset.key, prior)

    @staticmethod
    def _layers(store: TokenStore, layers: str, name: str) -> list[int]:
        if layers == "last":
            return [max(store.layers)]
        if layers == "all":
            return list(store.layers)
        try:
            wanted = [int(v) for v in layers.split(",")]
        except ValueError:
            raise EtfError(f"--layers {layers!r}: use last, all, or comma-separated layer numbers") from None
        missing = [w for w in wanted if w not in store.layers]
        if missing:
            raise EtfError(
                f"--layers {layers}: prior {name} has layers {','.join(map(str, store.layers))}, not {missing[0]}"
            )
        return wanted

    def close(self) -> None:
        for s in self.stores:
            s.close()

    def specs(self) -> list[dict[str, Any]]:
        """What a run records about its inputs: name, path, spec hash and spec of each store."""
        return [
            {
                "name": n,
                "path": str(s.path),
                "spec_hash": s.attrs["spec_hash"],
                "spec": s.spec,
                "layouts": s.attrs["layouts"],
                "info": s.attrs.get("info", {}),
            }
            for n, s in zip(self.names, self.stores)
        ]

    def row_bytes(self) -> int:
        size = {p: _TORCH_DTYPE[s.spec["dtype"]].itemsize for p, s in enumerate(self.stores)}
        return sum(g.tokens * g.dim * size[g.prior] for g in self.groups)

    @property
    def block_rows(self) -> int:
        return max(s.chunk_rows for s in self.stores)

    def read_block(self, start: int, stop: int) -> list[torch.Tensor]:
        """Rows ``start:stop`` of every group, with the read-time token selection applied."""
        read = {
            p: store.read_layers([layer for q, layer in self._source if q == p], start, stop)
            for p, store in enumerate(self.stores)
        }
        out = []
        for p, layer in self._source:
            store = self.stores[p]
            x = torch.from_numpy(read[p][layer]).to(_TORCH_DTYPE[store.spec["dtype"]])
            if self.tokens:
                x = select_tokens(x, store.layouts[layer], self.tokens)[0]
            out.append(x.contiguous())
        return out

    def load(self, rows: np.ndarray, block_rows: int | None = None) -> list[torch.Tensor]:
        """The selected tokens of ``rows`` (sorted sample indices) in memory, read block-wise
        into preallocated tensors: peak memory is the result plus one block (each block's
        rows are gathered straight into the result, not into a copy of the block first)."""
        step = block_rows or self.block_rows * max(1, (64 << 20) // max(1, self.row_bytes() * self.block_rows))
        out = [
            torch.empty((len(rows), g.tokens, g.dim), dtype=_TORCH_DTYPE[self.stores[g.prior].spec["dtype"]])
            for g in self.groups
        ]
        filled = 0
        for start in range(0, len(self.dataset), step):
            stop = min(len(self.dataset), start + step)
            sel = rows_between(rows, start, stop)
            if len(sel):
                local = torch.from_numpy(sel - start)
                for o, b in zip(out, self.read_block(start, stop)):
                    torch.index_select(b, 0, local, out=o[filled : filled + len(sel)])
                filled += len(sel)
        return out


def rows_between(rows: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The entries of sorted ``rows`` in ``[start, stop)``: a view found by bisection, not a
    mask over all rows (which, once per block, is quadratic in N)."""
    lo, hi = np.searchsorted(rows, [start, stop])
    return rows[lo:hi]


def prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Produce ``items`` in a background thread, ``depth`` ahead: block reads (which release
    the GIL in Zarr/HDF5 decoding and file I/O) overlap the training step."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)


class BlockStream:
    """Batches of ``rows`` read in blocks of contiguous samples, for data beyond the budget.

    Only whole blocks are read, one ahead in a background thread, in a seeded random order
    per epoch. Shuffled batches are drawn at random from a pool of ``pool_blocks`` blocks
    (a shuffle buffer), so that a batch mixes many parts of the dataset even when it is
    stored sorted by class; a block leaves the pool once all its rows are drawn. Batches
    are full-sized until the last, so an epoch has as many steps as one from memory. Peak
    memory is the pool plus the block being read, whatever N is. With ``to_device`` on a
    GPU the pool lives in device memory and batches are gathered there.
    """

    def __init__(
        self,
        priors: PriorSet,
        rows: np.ndarray,
        batch_size: int,
        block_rows: int,
        shuffle: bool,
        seed: int,
        pool_blocks: int = 8,
        to_device: DeviceCopy | None = None,
    ) -> None:
        self.priors, self.rows, self.batch_size = priors, np.sort(rows), batch_size
        self.shuffle, self.seed, self.pool_blocks = shuffle, seed, max(1, pool_blocks)
        self.to_device = to_device or DeviceCopy(None)
        n = len(priors.dataset)
        self.blocks = [(b * block_rows, min(n, (b + 1) * block_rows)) for b in np.unique(self.rows // block_rows)]

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.blocks)) if self.shuffle else range(len(self.blocks))

        def read() -> Iterator[list[Any]]:
            for i in order:
                start, stop = self.blocks[i]
                sel = rows_between(self.rows, start, stop)
                yield [sel, torch.from_numpy(sel - start), self.to_device(self.priors.read_block(start, stop))]

        blocks = prefetch(read(), depth=1)
        pool_blocks = self.pool_blocks if self.shuffle else 1  # in order, a pool only delays the first batch
        pool: list[list[Any]] = []  # [rows not yet drawn, their positions in the block, block]
        exhausted = False
        try:
            while True:
                remaining = sum(len(p[0]) for p in pool)
                while not exhausted and (len(pool) < pool_blocks or remaining < self.batch_size):
                    item = next(blocks, None)
                    if item is None:
                        exhausted = True
                    else:
                        pool.append(item)
                        remaining += len(item[0])
                if not remaining:
                    return
                k = min(self.batch_size, remaining)
                drawn = np.sort(rng.choice(remaining, size=k, replace=False)) if self.shuffle else np.arange(k)
                yield self._take(pool, drawn)
                pool = [p for p in pool if len(p[0])]
        finally:
            blocks.close()  # stops the reader thread when the consumer stops early

    @staticmethod
    def _take(pool: list[list[Any]], drawn: np.ndarray) -> tuple[np.ndarray, list[torch.Tensor]]:
        """The rows at sorted positions ``drawn`` of the pool's remaining rows (block after
        block), gathered straight from their blocks and removed from the pool."""
        idx, parts, offset = [], [], 0
        for p in pool:
            rows, local, block = p
            mine = drawn[(drawn >= offset) & (drawn < offset + len(rows))] - offset
            offset += len(rows)
            if len(mine):
                idx.append(rows[mine])
                parts.append([x[local[mine]] for x in block])
                keep = np.ones(len(rows), dtype=bool)
                keep[mine] = False
                p[0], p[1] = rows[keep], local[torch.from_numpy(keep)]
        tokens = [torch.cat(ts) if len(ts) > 1 else ts[0] for ts in zip(*parts)]
        return np.concatenate(idx), tokens


class Batches:
    """Batches of selected tokens for given rows, from memory or streamed from the stores.

    With a ``device`` (fit passes its accelerator), tokens that fit ``device_budget``
    (default: half its free memory) are loaded onto it once and every batch is gathered
    there (``resident``); streamed blocks go to it whole, from pinned memory, in the reader
    thread, when the shuffle pool fits. Batches come out alike either way."""

    def __init__(
        self,
        priors: PriorSet,
        rows: np.ndarray,
        budget: int,
        batch_size: int,
        seed: int,
        device: torch.device | None = None,
        device_budget: int | None = None,
    ) -> None:
        self.batch_size, self.seed = batch_size, seed
        nbytes = priors.row_bytes() * len(rows)
        self.streamed = nbytes > budget
        if device is not None and device_budget is None:
            device_budget = default_device_budget(device)
        self.resident = device is not None and not self.streamed and nbytes <= device_budget
        self.device = device if self.resident else None
        if self.streamed:
            # blocks: a multiple of the chunk size, about 1/24 of the budget; a shuffle pool of
            # blocks up to half of it (the reader's copies and batches take the rest)
            per_block = max(priors.block_rows, (budget // 24) // max(1, priors.row_bytes()))
            self.block_rows = per_block - per_block % priors.block_rows
            self.pool_blocks = max(1, (budget // 2) // (self.block_rows * max(1, priors.row_bytes())))
            self.priors = priors
            pool = self.block_rows * self.pool_blocks * priors.row_bytes()
            self.to_device = DeviceCopy(device if device is not None and pool <= device_budget else None)
        else:
            self.rows = np.sort(rows)
            self.tokens = [t.to(device) for t in priors.load(self.rows)] if self.resident else priors.load(self.rows)

    def iterate(
        self, rows: np.ndarray, shuffle: bool, epoch: int = 0
    ) -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
        if self.streamed:
            stream = BlockStream(
                self.priors,
                rows,
                self.batch_size,
                self.block_rows,
                shuffle,
                self.seed,
                self.pool_blocks,
                self.to_device,
            )
            yield from stream.epoch(epoch)
            return
        order = np.sort(rows)
        if shuffle:
            order = order[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        pos = np.searchsorted(self.rows, order)
        for b in range(0, len(order), self.batch_size):
            sel = torch.from_numpy(pos[b : b + self.batch_size]).to(self.device)
            yield order[b : b + self.batch_size], [t[sel] for t in self.tokens]
