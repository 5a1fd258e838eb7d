"""Several priors' stores over one dataset, joined by sample id, read in whole blocks.

:class:`PriorSet` resolves each prior to a complete store of the same dataset manifest,
chooses layers and a read-time token selection; :class:`Batches` either loads the
selected tokens into memory (when they fit the budget) or streams them block by block
(:class:`BlockStream`) through a shuffle pool, never reading one sample at a time from a
compressed store.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
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
    """Whole blocks onto the fitting device, for a reader thread: a copy into pinned host
    memory, then a non-blocking copy on the reader's side stream, awaited by an event of its
    own before the block is handed over. Several readers thus overlap reads, pinning and
    copies (each block's copy is in flight while the next is read), and the training stream
    never waits on a host-to-device copy. Identity on the CPU."""

    def __init__(self, device: torch.device | None) -> None:
        self.device = device if device is not None and device.type == "cuda" else None
        self._streams = threading.local()

    def __call__(self, block: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device is None:
            return block
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        consumer = torch.cuda.default_stream(self.device)
        with torch.cuda.stream(stream):
            out = [x.pin_memory().to(self.device, non_blocking=True) for x in block]
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()
        for x in out:  # freed later by the training stream: keep the allocator from reusing it early
            x.record_stream(consumer)
        return out


def to_index(positions: np.ndarray, device: torch.device) -> torch.Tensor:
    """Positions as an index tensor on ``device``: through pinned memory and a non-blocking
    copy on a GPU, so that gathering a batch never stalls the host on a pageable copy."""
    index = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64))
    if device.type != "cuda":
        return index
    return index.pin_memory().to(device, non_blocking=True)


def reader_threads(device: torch.device | None = None) -> int:
    """Block readers of a streamed fit. Each read spends most of its time in per-call
    overhead and I/O that release the GIL, so several readers in parallel hide it. Feeding
    a GPU: one per two cores, at most 8. On the CPU, whose cores train: one per four, 1 to 4."""
    cores = os.cpu_count() or 1
    if device is not None and device.type == "cuda":
        return max(1, min(8, cores // 2))
    return max(1, min(4, cores // 4))


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
        labels: list[str] | None = None,
    ) -> None:
        """``priors`` name the stores (by name, ``NAME-HASHPREFIX`` or path); ``labels``, the
        names the priors go by (default: as named), e.g. a run's names for stores it located
        by their spec hashes."""
        if not priors:
            raise EtfError("--encoders: name at least one prior")
        if len(set(priors)) != len(priors):
            raise EtfError(f"--encoders {','.join(priors)}: a prior is named twice")
        self.cache_dir = cache_location(cache_dir)
        self.dataset = dataset
        _check_manifest(self.cache_dir, dataset)
        self.paths = [self._resolve(p) for p in priors]
        self.names = labels or priors
        self.tokens = parse_tokens(tokens) if tokens else None
        self.stores = [TokenStore.open(p) for p in self.paths]
        skipped: set[str] = set()
        for name, store in zip(self.names, self.stores):
            if store.spec["dataset_key"] != dataset.key or store.n != len(dataset):
                raise EtfError(
                    f"--encoders {name}: {store.path} was extracted from a different sample set "
                    f"(dataset key {store.spec['dataset_key']}, {store.n} samples) than --data (key {dataset.key}, {len(dataset)} samples)"
                )
            skipped.update(store.skipped)
        self.view_specs = [store.spec.get("views") for store in self.stores]
        #: views per sample every prior holds alike (count, augmentation, seed); else 1, the clean view
        self.views_differ = len({canonical_json(v) for v in self.view_specs}) > 1
        self.views = 1 if self.views_differ else self.stores[0].views
        self.valid = np.array([sid not in skipped for sid in dataset.ids])
        self.groups: list[Group] = []
        self._source: list[tuple[int, int]] = []  # (store index, layer) of each group
        for p, store in enumerate(self.stores):
            for layer in self._layers(store, layers, self.names[p]):
                layout = store.layouts[layer]
                if self.tokens:
                    probe = torch.zeros(1, layout.count, 1)
                    layout = select_tokens(probe, layout, self.tokens)[1]
                self.groups.append(Group(p, self.names[p], layer, layout, store.shape(layer)[1]))
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

    def geometry(self) -> np.ndarray:
        """(N, K, 3, 3): every sample's view matrices, the same in every prior's store (their
        views were drawn from the same spec and seed)."""
        matrices = self.stores[0].geometry()
        for name, store in zip(self.names[1:], self.stores[1:]):
            if not np.allclose(store.geometry(), matrices, atol=1e-6):
                raise EtfError(f"--encoders {name}: {store.path} holds other view geometry than {self.names[0]}'s")
        return matrices

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

    def group_row_bytes(self, k: int) -> int:
        g = self.groups[k]
        return g.tokens * g.dim * _TORCH_DTYPE[self.stores[g.prior].spec["dtype"]].itemsize

    def row_bytes(self) -> int:
        return sum(self.group_row_bytes(k) for k in range(len(self.groups)))

    @property
    def block_rows(self) -> int:
        return max(s.chunk_rows for s in self.stores)

    def read_block(self, start: int, stop: int, view: int = 0, groups: list[int] | None = None) -> list[torch.Tensor]:
        """Rows ``start:stop`` of every group (or of ``groups``, by index) in one view (0: the
        clean image), with the read-time token selection applied."""
        sources = [self._source[k] for k in (range(len(self.groups)) if groups is None else groups)]
        read = {
            p: store.read_layers([layer for q, layer in sources if q == p], start, stop, view)
            for p, store in enumerate(self.stores)
            if any(q == p for q, _ in sources)
        }
        out = []
        for p, layer in sources:
            store = self.stores[p]
            x = torch.from_numpy(read[p][layer]).to(_TORCH_DTYPE[store.spec["dtype"]])
            if self.tokens:
                x = select_tokens(x, store.layouts[layer], self.tokens)[0]
            out.append(x.contiguous())
        return out

    def group_key(self, k: int, view: int = 0) -> tuple[Any, ...]:
        """What group ``k``'s tokens in ``view`` are, across PriorSets: its store's content
        hash, its layer, the read-time selection."""
        p, layer = self._source[k]
        return (self.stores[p].attrs["spec_hash"], str(self.stores[p].path), layer, str(self.tokens), view)

    def load(self, rows: np.ndarray, block_rows: int | None = None, view: int = 0) -> list[torch.Tensor]:
        """The selected tokens of ``rows`` (sorted sample indices) in one view in memory, read
        block-wise into preallocated tensors: peak memory is the result plus one block (each
        block's rows are gathered straight into the result, not into a copy of the block
        first). Under :func:`keep_resident`, every row of each group is read once per process
        and kept (on its device), and ``rows`` are gathered from there."""
        if _RESIDENT is not None:
            kept = _RESIDENT.tokens(self, view)
            if kept is not None:
                return [t.index_select(0, to_index(rows, t.device)) for t in kept]
        return self._read_rows(rows, list(range(len(self.groups))), block_rows, view)

    def _read_rows(
        self, rows: np.ndarray, groups: list[int], block_rows: int | None = None, view: int = 0
    ) -> list[torch.Tensor]:
        step = block_rows or self.block_rows * max(1, (64 << 20) // max(1, self.row_bytes() * self.block_rows))
        out = [
            torch.empty((len(rows), g.tokens, g.dim), dtype=_TORCH_DTYPE[self.stores[g.prior].spec["dtype"]])
            for g in (self.groups[k] for k in groups)
        ]
        filled = 0
        for start in range(0, len(self.dataset), step):
            stop = min(len(self.dataset), start + step)
            sel = rows_between(rows, start, stop)
            if len(sel):
                local = torch.from_numpy(sel - start)
                for o, b in zip(out, self.read_block(start, stop, view, groups)):
                    torch.index_select(b, 0, local, out=o[filled : filled + len(sel)])
                filled += len(sel)
        return out


class ResidentTokens:
    """Every row of the groups fits have read, kept in this process (on ``device``) for the
    next fit that reads them: a grid worker reads each store once, whichever subsets its
    groups hold. Least recently used groups leave once ``budget`` bytes would be exceeded;
    a PriorSet whose groups cannot all fit is read from its stores as without this."""

    def __init__(self, device: torch.device, budget: int) -> None:
        self.device, self.budget = device, budget
        self.kept: dict[tuple[Any, ...], torch.Tensor] = {}  # insertion order: least recently used first

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kept.values())

    def tokens(self, priors: PriorSet, view: int) -> list[torch.Tensor] | None:
        """Every row of each of ``priors``' groups in ``view``, read now if not kept yet;
        None when they cannot all be kept at once."""
        keys = [priors.group_key(k, view) for k in range(len(priors.groups))]
        sizes = [len(priors.dataset) * priors.group_row_bytes(k) for k in range(len(priors.groups))]
        if sum(sizes) > self.budget:
            return None
        for key in keys:  # in use: the last to leave
            if key in self.kept:
                self.kept[key] = self.kept.pop(key)
        missing = [k for k, key in enumerate(keys) if key not in self.kept]
        while self.nbytes + sum(sizes[k] for k in missing) > self.budget:
            del self.kept[next(key for key in self.kept if key not in keys)]
        if missing:
            for k, t in zip(missing, priors._read_rows(np.arange(len(priors.dataset)), missing)):
                self.kept[keys[k]] = t.to(self.device)
        return [self.kept[key] for key in keys]


_RESIDENT: ResidentTokens | None = None


def keep_resident(device: torch.device, budget: int | None = None) -> ResidentTokens:
    """Keep the tokens fits read resident in this process from now on (``etf ablate``'s
    workers): on ``device``, within ``budget`` bytes (default: the device budget on a GPU,
    the memory budget on the CPU). Called again, it keeps what it holds."""
    global _RESIDENT
    if _RESIDENT is None or _RESIDENT.device != device:
        if budget is None:
            budget = default_device_budget(device) if device.type == "cuda" else default_memory_budget()
        _RESIDENT = ResidentTokens(device, budget)
    return _RESIDENT


def stop_resident() -> None:
    """Release what :func:`keep_resident` holds and read from the stores again."""
    global _RESIDENT
    _RESIDENT = None


def rows_between(rows: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The entries of sorted ``rows`` in ``[start, stop)``: a view found by bisection, not a
    mask over all rows (which, once per block, is quadratic in N)."""
    lo, hi = np.searchsorted(rows, [start, stop])
    return rows[lo:hi]


def read_ahead(read: Callable[[Any], Any], items: Iterable[Any], threads: int = 1, depth: int = 2) -> Iterator[Any]:
    """``read(item)`` of each item in order, computed by ``threads`` background threads up
    to ``depth`` items ahead: block reads (which release the GIL in Zarr/HDF5 decoding and
    file I/O) overlap each other and the training step. Closing the iterator early cancels
    the reads not yet started."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="etf-read")
    ahead: deque = deque()
    todo = iter(items)
    try:
        for item in todo:
            ahead.append(pool.submit(read, item))
            if len(ahead) > max(depth, threads):
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
    finally:
        for f in ahead:
            f.cancel()
        pool.shutdown(wait=True)


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
        views: int = 1,
        to_device: DeviceCopy | None = None,
        readers: int | None = None,
    ) -> None:
        self.priors, self.rows, self.batch_size = priors, np.sort(rows), batch_size
        self.shuffle, self.seed, self.pool_blocks = shuffle, seed, max(1, pool_blocks)
        self.views = views
        self.to_device = to_device or DeviceCopy(None)
        self.readers = readers or reader_threads(self.to_device.device)
        n = len(priors.dataset)
        self.blocks = [(b * block_rows, min(n, (b + 1) * block_rows)) for b in np.unique(self.rows // block_rows)]

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, list[torch.Tensor]]]:
        """(rows, their views, tokens) batches. With ``views`` > 1 each block is read in one
        view drawn per block and epoch: an epoch reads as many bytes as with the clean view
        alone, whatever K."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.blocks)) if self.shuffle else range(len(self.blocks))
        block_view = draw_views(self.seed, epoch, len(self.blocks), self.views)

        def read(i: int) -> list[Any]:
            start, stop = self.blocks[i]
            sel = rows_between(self.rows, start, stop)
            view = int(block_view[i])
            block = self.to_device(self.priors.read_block(start, stop, view))
            return [sel, sel - start, block, np.full(len(sel), view)]

        blocks = read_ahead(read, order, self.readers, depth=1)
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
    def _take(pool: list[list[Any]], drawn: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[torch.Tensor]]:
        """The rows at sorted positions ``drawn`` of the pool's remaining rows (block after
        block), with their views, gathered straight from their blocks and removed from the pool."""
        idx, views, parts, offset = [], [], [], 0
        for p in pool:
            rows, local, block, view = p
            mine = drawn[(drawn >= offset) & (drawn < offset + len(rows))] - offset
            offset += len(rows)
            if len(mine):
                idx.append(rows[mine])
                views.append(view[mine])
                at = to_index(local[mine], block[0].device)
                parts.append([x[at] for x in block])
                keep = np.ones(len(rows), dtype=bool)
                keep[mine] = False
                p[0], p[1], p[3] = rows[keep], local[keep], view[keep]
        tokens = [torch.cat(ts) if len(ts) > 1 else ts[0] for ts in zip(*parts)]
        return np.concatenate(idx), np.concatenate(views), tokens


def draw_views(seed: int, epoch: int, count: int, views: int) -> np.ndarray:
    """Which view each of ``count`` units (samples, or streamed blocks) is seen in this
    epoch: a seeded draw, all 0 (the clean view) when there is only one."""
    if views <= 1:
        return np.zeros(count, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0x71E5]).integers(views, size=count)


class Batches:
    """Batches of selected tokens for given rows, from memory or streamed from the stores.

    ``views`` > 1 (``etf fit --views random``) makes :meth:`train_epoch` draw each training
    sample's view: per sample from memory (every view is loaded), per block when streamed
    (one view of each block is read). Evaluation (:meth:`iterate`) reads view 0.

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
        views: int = 1,
        device: torch.device | None = None,
        device_budget: int | None = None,
    ) -> None:
        self.batch_size, self.seed, self.views = batch_size, seed, views
        nbytes = priors.row_bytes() * len(rows) * views
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
            loaded = [priors.load(self.rows, view=v) for v in range(views)]  # per view, per group
            self.tokens = [[t.to(device) for t in ts] for ts in loaded] if self.resident else loaded

    def iterate(
        self, rows: np.ndarray, shuffle: bool, epoch: int = 0
    ) -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
        """Batches of ``rows`` in the clean view (what evaluation reads)."""
        for idx, _, tokens in self._batches(rows, shuffle, epoch, 1):
            yield idx, tokens

    def train_epoch(self, rows: np.ndarray, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, list[torch.Tensor]]]:
        """Shuffled batches of ``rows`` as (rows, the view each is seen in, tokens)."""
        return self._batches(rows, True, epoch, self.views)

    def _batches(
        self, rows: np.ndarray, shuffle: bool, epoch: int, views: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[torch.Tensor]]]:
        if self.streamed:
            stream = BlockStream(
                self.priors,
                rows,
                self.batch_size,
                self.block_rows,
                shuffle,
                self.seed,
                self.pool_blocks,
                views,
                self.to_device,
            )
            yield from stream.epoch(epoch)
            return
        order = np.sort(rows)
        if shuffle:
            order = order[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        pos = np.searchsorted(self.rows, order)
        seen_in = draw_views(self.seed, epoch, len(self.rows), views)[pos]
        for b in range(0, len(order), self.batch_size):
            sel, view = pos[b : b + self.batch_size], seen_in[b : b + self.batch_size]
            if views == 1:
                yield (
                    order[b : b + self.batch_size],
                    view,
                    [t[to_index(sel, t.device)] for t in self.tokens[0]],
                )
                continue
            tokens = [torch.empty((len(sel), *t.shape[1:]), dtype=t.dtype, device=t.device) for t in self.tokens[0]]
            for v in np.unique(view):
                device = self.tokens[v][0].device  # a view's groups share one device
                dst, src = to_index(np.nonzero(view == v)[0], device), to_index(sel[view == v], device)
                for out, t in zip(tokens, self.tokens[v]):
                    out[dst] = t[src]
            yield order[b : b + self.batch_size], view, tokens
