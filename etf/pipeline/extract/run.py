"""Stage 1: run a frozen encoder once over a dataset and write its tokens to a store.

Decoding and resizing run in DataLoader workers, overlapped with the forward pass; chunk
writes run in a background thread. Batches never straddle a chunk, so a resumed run
computes every chunk from exactly the same batches as an uninterrupted one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from etf.cache.catalog import CacheDir, write_manifest
from etf.cache.features import read_ahead
from etf.cache.format import DTYPES
from etf.cache.location import Location, cache_location
from etf.cache.store import (
    ArraySpec,
    StoreWriter,
    TokenStore,
    is_complete,
    library_versions,
    physical_dtype,
    plan_arrays,
    plan_views,
    store_path,
)
from etf.cache.tokens import cast_tokens, host_tokens, parse_tokens, select_tokens
from etf.data.base import Dataset
from etf.data.images import check_image
from etf.errors import EtfError
from etf.pipeline.extract import PRECISIONS
from etf.pipeline.extract.augment import Augmenter, check_view_options, parse_augment
from etf.pipeline.extract.encoders import Encoder
from etf.pipeline.extract.preprocess import (
    Preprocess,
    jpeg_bytes,
    model_input,
    pil_uint8,
    resolve_decode,
)

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExtractOptions:
    """Everything about an extraction except the encoder and the data."""

    layers: list[int] | None = None
    tokens: str = "all"
    norm: bool = True
    dtype: str = "float16"
    precision: str = "auto"
    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    store: str = "zarr"
    codec: str = "none"
    chunk_rows: int | None = None
    on_error: str = "fail"
    shard: tuple[int, int] | None = None
    progress: bool | None = None
    #: views per sample: view 0 the clean image, 1..K-1 seeded augmentations (``--augment``)
    views: int = 1
    augment: str | None = None
    view_seed: int = 0
    #: where JPEGs are decoded, resized and cropped (``--decode``; auto: the device on CUDA)
    decode: str = "auto"


@dataclass
class ExtractResult:
    path: Location
    complete: bool
    samples_done: int
    seconds: float
    skipped: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.samples_done / self.seconds if self.seconds > 0 else 0.0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        local = os.environ.get("LOCAL_RANK")
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local}" if local else "cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EtfError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, mps, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EtfError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise EtfError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise EtfError(f"--device {device}: MPS is not available on this machine")
    return dev


def resolve_precision(precision: str, device: torch.device, without_bf16: str = "fp16") -> str:
    """``auto``: bf16 on a GPU that has it (else ``without_bf16``), fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise EtfError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else without_bf16
    return "fp32"


def resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int] | None:
    """``--shard I/N``, or the rank of a ``torchrun`` launch when not given."""
    if shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        shard = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    if shard is not None and not (0 <= shard[0] < shard[1]):
        raise EtfError(f"--shard {shard[0]}/{shard[1]}: need 0 <= I < N")
    return shard


def store_spec(
    dataset: Dataset, encoder: Encoder, layers: list[int], opts: ExtractOptions, precision: str, decode: str = "cpu"
) -> dict[str, Any]:
    """What determines the stored tokens; its hash names the store. ``decode: device`` is
    recorded (its pixels differ slightly from PIL's); the ``cpu`` path, which every store
    before it used, is the default and leaves the spec, and so existing keys, as they were."""
    return {
        "name": encoder.name,
        "source": encoder.source,
        "dataset_key": dataset.key,
        "n": len(dataset),
        **encoder.spec(),
        "layers": layers,
        "tokens": opts.tokens,
        "norm": opts.norm,
        "dtype": opts.dtype,
        "precision": precision,
        **({"views": views_spec(opts)} if opts.views > 1 else {}),
        **({"decode": decode} if decode != "cpu" else {}),
    }


def plan_decode(
    dataset: Dataset, encoder: Encoder, opts: ExtractOptions, device: torch.device
) -> tuple[str, str | None]:
    """The decode path an extraction takes, and why it falls back to ``cpu`` for this
    dataset and encoder when ``device`` was asked for (None when it does not)."""
    decode = resolve_decode(opts.decode, device)
    if decode == "cpu":
        return decode, None
    crop = dataset.options.get("crop", "none")
    why = (
        f"--crop {crop} is applied by PIL"
        if crop != "none"
        else "augmented views are made by PIL"
        if opts.views > 1
        else encoder.preprocess.why_not_on_device()
    )
    if why is None:
        return decode, None
    return "cpu", f"{encoder.name}: decoding on CPU workers for {dataset.describe()} ({why}), not on {device.type}"


def views_spec(opts: ExtractOptions) -> dict[str, Any]:
    """What the augmented views are made by (part of the store key): their count, the
    canonical ``--augment`` spec and the seed of their draws."""
    return {"count": opts.views, "augment": str(parse_augment(opts.augment or "face")), "seed": opts.view_seed}


class _Images(torch.utils.data.Dataset):
    """Per sample, uint8 pixels with the matrix of each view (view 0 the clean image); a
    failure becomes an error string, not an exception. ``cpu`` decoding sends (K, C, H, W)
    resized and cropped by PIL; ``device`` decoding sends a JPEG's bytes (1-D) or, for what
    the device cannot decode, the decoded (C, h, w) image, to be resized where the model is."""

    def __init__(self, dataset: Dataset, pre: Preprocess, decode: str, augmenter: Augmenter | None, views: int) -> None:
        self.dataset, self.pre, self.decode = dataset, pre, decode
        self.transform = pre.pil_transform if decode == "cpu" else None
        self.augmenter, self.views = augmenter, views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor, str]:
        matrices = torch.eye(3, dtype=torch.float64).repeat(self.views, 1, 1)
        try:
            if self.decode == "device":
                path = self.dataset.samples[i].path
                return i, _or_decoded(jpeg_bytes(path), path), matrices, ""
            img = self.dataset.load_image(i)
            xs = [self.transform(img)]
            for v in range(1, self.views):
                view, matrix = self.augmenter.view(img, self.dataset.ids[i], v)
                xs.append(self.transform(view))
                matrices[v] = torch.from_numpy(matrix)
            return i, torch.stack(xs), matrices, ""
        except Exception as e:  # PIL and OS errors of many kinds; reported per sample
            blank = torch.zeros(
                (self.views, 3, *self.pre.size) if self.decode == "cpu" else (3, 1, 1), dtype=torch.uint8
            )
            return i, blank, matrices, f"{type(e).__name__}: {e}"


def _or_decoded(data: torch.Tensor | None, path: str) -> torch.Tensor:
    from etf.data.images import load_rgb

    return data if data is not None else pil_uint8(load_rgb(path))


def _collate_payloads(items: list[tuple[int, torch.Tensor, torch.Tensor, str]]) -> tuple[Any, ...]:
    """A ``device`` decoding batch: payloads of many sizes stay a list."""
    idx, payloads, matrices, errors = zip(*items)
    return torch.tensor(idx), list(payloads), torch.stack(matrices), list(errors)


class _ChunkBatches(Sampler[list[int]]):
    """Batches of sample indices, never crossing a chunk boundary."""

    def __init__(self, chunks: list[int], writer: StoreWriter, batch_size: int, skip: set[int]) -> None:
        self.batches = []
        for c in chunks:
            start, stop = writer.chunk_range(c)
            for b in range(start, stop, batch_size):
                idx = [i for i in range(b, min(stop, b + batch_size)) if i not in skip]
                if idx:
                    self.batches.append(idx)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def autocast_for(precision: str, device: torch.device) -> Any:
    """The autocast context of a resolved ``--precision`` (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=_AUTOCAST[precision]) if precision in _AUTOCAST else nullcontext()


def _prepared(loader: Any, pre: Preprocess, decode: str, device: torch.device) -> Iterator[tuple[Any, ...]]:
    """Loader batches with their model input (:func:`model_input`). On a GPU a thread
    prepares the next batch on a stream of its own while this one's forward runs: nvjpeg's
    host-side work and the resize overlap the forward instead of preceding it."""

    def prepare(batch: tuple[Any, ...], stream: torch.cuda.Stream | None = None) -> tuple[Any, ...]:
        idx, x, matrices, errors = batch
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            x, errors = model_input(pre, x, list(errors), decode, device)
        if stream is not None:
            stream.synchronize()
            x.record_stream(torch.cuda.default_stream(device))  # used, then freed, by the forward's stream
        return idx, x, matrices, errors

    if device.type != "cuda":
        return map(prepare, loader)
    stream = torch.cuda.Stream(device)
    return read_ahead(lambda batch: prepare(batch, stream), loader, threads=1, depth=2)


def compute_tokens(
    encoder: Encoder, x: torch.Tensor, layers: list[int], opts: ExtractOptions, ids: list[str], autocast: Any
) -> dict[int, np.ndarray]:
    """Stored form of the tokens of a preprocessed batch, per layer: what extraction writes
    and what ``etf predict`` recomputes for new images."""
    return _land(_launch(encoder, x, layers, opts, autocast), opts.dtype, ids)


@dataclass
class _Launched:
    """A batch's tokens per layer in the storage dtype, with each sample's finiteness, being
    copied to pinned host memory without blocking; ``done`` fires when they are there."""

    layers: list[int]
    tokens: list[tuple[torch.Tensor, torch.Tensor]]
    done: torch.cuda.Event | None


def _launch(encoder: Encoder, x: torch.Tensor, layers: list[int], opts: ExtractOptions, autocast: Any) -> _Launched:
    """Queue the forward of a batch and the copy of its stored form to the host: on a GPU
    the caller can queue the next batch before this one's tokens are waited for."""
    with autocast:
        outs = encoder.tokens(x, layers, opts.norm)
    cast = [cast_tokens(select_tokens(t, lay, opts.tokens)[0], opts.dtype) for t, lay in outs]
    if x.device.type != "cuda":
        return _Launched(layers, cast, None)
    host = [tuple(_pinned_copy(t) for t in pair) for pair in cast]
    done = torch.cuda.Event()
    done.record()
    return _Launched(layers, host, done)


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def _land(launched: _Launched, dtype: str, ids: list[str]) -> dict[int, np.ndarray]:
    """The launched tokens on the host, per layer, checked finite and viewed as stored."""
    if launched.done is not None:
        launched.done.synchronize()
    return {layer: host_tokens(t, ok, dtype, ids) for layer, (t, ok) in zip(launched.layers, launched.tokens)}


def _bad_list(bad: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{sid}: {why}" for sid, why in bad[:5])
    return shown + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")


@contextmanager
def on_device(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """``model`` on ``device`` for the block, then back where its caller had it: extraction
    never moves a model it was handed (a caller's later forward on the CPU still works)."""
    before = next(model.parameters(), torch.empty(0)).device
    model.to(device)
    try:
        yield
    finally:
        model.to(before)


def extract(dataset: Dataset, encoder: Encoder, cache_dir: CacheDir, opts: ExtractOptions) -> ExtractResult:
    """Fill (or resume, or find complete) the store of ``encoder`` over ``dataset``."""
    t0 = time.perf_counter()
    if opts.dtype not in DTYPES:
        raise EtfError(f"--dtype {opts.dtype!r}: use one of {', '.join(DTYPES)}")
    if opts.on_error not in ("fail", "skip"):
        raise EtfError(f"--on-error {opts.on_error!r}: use fail or skip")
    if opts.batch_size < 1:
        raise EtfError("--batch-size must be at least 1")
    opts.tokens = parse_tokens(opts.tokens)
    check_view_options(opts.views, opts.augment)
    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision, device)
    if encoder.fixed_precision and precision != encoder.fixed_precision:
        if opts.precision != "auto":
            raise EtfError(f"--precision {opts.precision}: {encoder.name} computes in {encoder.fixed_precision} only")
        precision = encoder.fixed_precision
    shard = resolve_shard(opts.shard)
    if opts.store == "hdf5" and shard is not None:
        raise EtfError("--shard with --store hdf5: HDF5 has no concurrent writers; extract to zarr, or run one process")
    layers = encoder.resolve_layers(opts.layers)
    cache = cache_location(cache_dir)
    decode, _ = plan_decode(dataset, encoder, opts, device)
    spec = store_spec(dataset, encoder, layers, opts, precision, decode)
    path = store_path(cache, dataset.key, encoder.name, spec, opts.store)
    if is_complete(path):  # found: nothing is written, so a read-only cache serves too
        with TokenStore.open(path) as store:
            return ExtractResult(path, True, 0, time.perf_counter() - t0, store.skipped)
    cache.check_writable("--cache")
    write_manifest(cache, dataset)
    with on_device(encoder.model, device):
        autocast = autocast_for(precision, device)
        with autocast:
            probe, flops = encoder.probe(layers, opts.norm)
        selected = [select_tokens(t, lay, opts.tokens) for t, lay in probe]
        layouts = {layer: lay for layer, (_, lay) in zip(layers, selected)}
        arrays = plan_arrays(layers, [tuple(t.shape[1:]) for t, _ in selected])
        views = plan_views(arrays, opts.views)
        info = {
            "flops_per_image": flops,
            "versions": library_versions(),
            "load_report": encoder.load_report.summary() if encoder.load_report else None,
        }
        writer = StoreWriter(
            path, spec, arrays, layouts, codec=opts.codec, chunk_rows=opts.chunk_rows, info=info, views=views
        )

        todo = sorted(set(range(writer.num_chunks)) - writer.done_chunks())
        if shard is not None:
            i, n = shard
            todo = [c for c in todo if c * n // writer.num_chunks == i]
        rows = [r for c in todo for r in range(*writer.chunk_range(c))]

        bad = _prescan(dataset, rows)
        listed = _bad_list([(dataset.ids[r], w) for r, w in sorted(bad.items())]) if bad else ""
        if bad and opts.on_error == "fail":
            raise EtfError(
                f"{len(bad)} unreadable image(s) in {dataset.describe()}: {listed} "
                "(nothing written for them; fix or remove them, or pass --on-error skip)"
            )
        if len(bad) == len(dataset):
            raise EtfError(
                f"every image of {dataset.describe()} is unreadable ({listed}); check the dataset path and format"
            )
        done_rows = _run(dataset, encoder, writer, todo, bad, layers, opts, device, autocast, decode)
        complete = writer.finalize()
        skipped = []
        if complete:
            with TokenStore.open(path, check=False) as store:  # only its attributes: finalize checked the chunks
                skipped = store.skipped
                write_manifest(cache, dataset, store.skip_reasons)
        return ExtractResult(path, complete, done_rows, time.perf_counter() - t0, skipped)


def _prescan(dataset: Dataset, rows: list[int]) -> dict[int, str]:
    """Header-check the images about to be read, in threads (I/O bound)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        reasons = pool.map(lambda r: check_image(dataset.samples[r].path), rows)
        return {r: why for r, why in zip(rows, reasons) if why}


class _ChunkBuffer:
    """Rows of one chunk collected from batches; handed to the writer once full."""

    def __init__(self, writer: StoreWriter, c: int, dataset: Dataset, skip: dict[int, str]) -> None:
        self.c = c
        self.start, stop = writer.chunk_range(c)
        dtype = physical_dtype(writer.spec["dtype"])
        self.data = {a.name: np.zeros((stop - self.start, *a.shape), a.dtype or dtype) for a in writer.all_arrays}
        if "view_matrix" in self.data:  # a skipped row's views are the clean image: labels stay finite
            self.data["view_matrix"][:] = np.eye(3)
        rows = range(self.start, stop)
        self.skipped = {dataset.ids[r]: skip[r] for r in rows if r in skip}  # sample id -> why
        self.missing = len(rows) - len(self.skipped)

    def put(self, idx: list[int], arrays: dict[str, np.ndarray]) -> None:
        rows = np.asarray(idx, dtype=np.intp) - self.start
        for name, block in arrays.items():
            self.data[name][rows] = block
        self.missing -= len(idx)


def _run(
    dataset: Dataset,
    encoder: Encoder,
    writer: StoreWriter,
    todo: list[int],
    skip: dict[int, str],
    layers: list[int],
    opts: ExtractOptions,
    device: torch.device,
    autocast: Any,
    decode: str,
) -> int:
    """The extraction loop: decode in workers, forward here, write in a background thread.

    Whatever stops the loop (a bad image, a failed write, Ctrl-C), the chunks already
    handed to the writer are finished and marked before the exception leaves, so a re-run
    resumes after them.
    """
    workers = opts.workers if opts.workers is not None else default_workers(device)
    sampler = _ChunkBatches(todo, writer, opts.batch_size, skip)
    buffers: dict[int, _ChunkBuffer] = {}  # chunks being filled: memory follows the batches, not the dataset
    pending: list[Future] = []
    total = sum(len(b) for b in sampler.batches)
    disable = None if opts.progress is None else not opts.progress
    with (
        ThreadPoolExecutor(max_workers=1) as io,
        tqdm(total=total, unit="img", desc=encoder.name, disable=disable) as bar,
    ):

        def flush(buf: _ChunkBuffer) -> None:
            pending.append(io.submit(writer.write_chunk, buf.c, buf.data, buf.skipped))
            # at most two chunks in flight; a failed write stops the run at the next chunk
            while len(pending) > 2 or (pending and pending[0].done()):
                pending.pop(0).result()

        for c in todo:  # chunks of skipped rows only: no batch will come for them
            if all(r in skip for r in range(*writer.chunk_range(c))):
                flush(_ChunkBuffer(writer, c, dataset, skip))

        def land(batch: tuple[list[int], list[int], dict[int, str], Any, list[_Launched]]) -> None:
            """Hand a batch's tokens, once on the host, to its chunk; write the chunk once full."""
            idx, ok, failed, matrices, launched = batch
            c = idx[0] // writer.chunk_rows
            if c not in buffers:
                buffers[c] = _ChunkBuffer(writer, c, dataset, skip)
            buf = buffers[c]
            if ok:
                ids = [dataset.ids[i] for i in ok]
                buf.put(ok, _blocks(writer, [_land(t, opts.dtype, ids) for t in launched], matrices.numpy()))
            buf.skipped.update({dataset.ids[i]: why for i, why in failed.items()})
            buf.missing -= len(failed)
            bar.update(len(idx))
            if buf.missing == 0:
                flush(buffers.pop(buf.c))

        pre = encoder.preprocess
        loader = (
            _loader(dataset, encoder, sampler, workers, device, opts, decode) if total else []
        )  # none for an idle shard
        landing = None  # the previous batch, its tokens on their way to the host while this one runs
        try:
            for idx, x, matrices, errors in _prepared(loader, pre, decode, device):
                idx = idx.tolist()
                failed = {i: e for i, e in zip(idx, errors) if e}
                if failed and opts.on_error == "fail":
                    raise EtfError(
                        f"unreadable image(s) in {dataset.describe()}: {_bad_list([(dataset.ids[i], e) for i, e in failed.items()])} "
                        "(the store stays incomplete and is never read; fix them, or pass --on-error skip to resume)"
                    )
                keep = [k for k, i in enumerate(idx) if i not in failed]
                launched = []
                if keep:
                    x, matrices = (x[keep], matrices[keep]) if failed else (x, matrices)
                    launched = [_launch(encoder, x[:, v], layers, opts, autocast) for v in range(x.shape[1])]
                previous, landing = landing, (idx, [idx[k] for k in keep], failed, matrices, launched)
                if previous is not None:
                    land(previous)
        finally:  # whatever stops the loop, the batch computed before it is kept
            previous, landing = landing, None
            if previous is not None:
                land(previous)
        while pending:
            pending.pop(0).result()
    return total


def _stack(a: ArraySpec, per_layer: dict[int, np.ndarray]) -> np.ndarray:
    """One array's block from per-layer tokens: (B, L, T, D) for ``tokens``, else (B, T, D)."""
    return np.stack([per_layer[la] for la in a.layers], axis=1) if a.name == "tokens" else per_layer[a.layers[0]]


def _blocks(writer: StoreWriter, per_view: list[dict[int, np.ndarray]], matrices: np.ndarray) -> dict[str, np.ndarray]:
    """Every array's block of a batch: view 0's tokens, views 1..K-1 on their axis, geometry."""
    out = {a.name: _stack(a, per_view[0]) for a in writer.arrays}
    if len(per_view) > 1:
        for a in writer.arrays:
            out[a.name.replace("tokens", "views", 1)] = np.stack([_stack(a, p) for p in per_view[1:]], axis=1)
        out["view_matrix"] = matrices
    return out


def _loader(
    dataset: Dataset,
    encoder: Encoder,
    sampler: _ChunkBatches,
    workers: int,
    device: torch.device,
    opts: ExtractOptions,
    decode: str,
) -> DataLoader:
    augmenter = Augmenter(parse_augment(opts.augment or "face"), opts.view_seed) if opts.views > 1 else None
    return DataLoader(
        _Images(dataset, encoder.preprocess, decode, augmenter, opts.views),
        batch_sampler=sampler,
        collate_fn=_collate_payloads if decode == "device" else None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        worker_init_fn=_yield_to_forward if device.type == "cpu" else None,
    )


#: Niceness of decode workers while the forward pass runs on the CPU: they then use the
#: cycles the forward leaves idle instead of preempting its threads (bench/README.md).
CPU_DECODE_NICENESS = 10


def _yield_to_forward(worker_id: int) -> None:
    os.nice(CPU_DECODE_NICENESS)


def default_workers(device: torch.device) -> int:
    """Decode workers. On a GPU, one per core but the main process's: however fast the device
    decodes, the files must be read, and PIL decodes what it cannot. On the CPU, decoding
    and preprocessing cost about a tenth of a small ViT's forward per image, so one worker
    per eight cores keeps up (see bench/README.md)."""
    cores = os.cpu_count() or 2
    if device.type == "cpu":
        return max(1, min(8, cores // 8))
    return max(1, cores - 1)
