"""Extraction and token-store benchmarks. Every figure is printed beside a baseline measured
in the same run, on the same machine, so figures from different machines compare as ratios.
See bench/README.md for the figures and the defaults chosen from them.

    python bench/extract.py                                     # a few minutes on 2 CPU cores
    python bench/extract.py --models vit_tiny_patch16_224 --images 128 --repeats 1   # quick look

1. Extraction throughput: ``etf.pipeline.extract.extract`` end to end (JPEG files on disk,
   header scan, decode, preprocessing, forward, token selection, writes, publication)
   divided by the bare ``forward_intermediates`` throughput of the same model over the same
   images already preprocessed in memory, at the same batch size, precision and threads.
2. Bytes per sample on disk for each codec, on real activations (random-init weights).
3. Sequential read throughput of Zarr and HDF5 stores in chunk-aligned blocks, as
   ``TokenStore.blocks`` reads them, for several chunk size targets.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random-init models only: never wait on the network

import numpy as np
import torch
from PIL import Image

from etf.cache import store as store_mod
from etf.cache.importer import guess_layout
from etf.cache.location import cache_location
from etf.cache.store import CODECS, StoreWriter, TokenStore, plan_arrays
from etf.data import load_dataset
from etf.pipeline.extract import run as extract_mod
from etf.pipeline.extract.encoders import Encoder, create_encoder
from etf.pipeline.extract.run import ExtractOptions, default_workers, extract

MiB = 1 << 20


def make_faces(root: Path, n: int, size: int = 250) -> Path:
    """``n`` JPEG faces and non-faces from scikit-image's LFW subset, upscaled to ``size``
    (mirrored on every second pass over the 200 originals)."""
    from skimage.data import lfw_subset

    images = lfw_subset()
    for i in range(n):
        k, mirrored = i % len(images), (i // len(images)) % 2
        img = Image.fromarray(np.round(images[k] * 255).astype(np.uint8)).convert("RGB")
        img = img.resize((size, size), Image.Resampling.BICUBIC)
        if mirrored:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = root / ("face" if k < 100 else "nonface") / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
    return root


def others_cpu() -> float:
    """CPU seconds used so far by everything on this machine except this process and its
    reaped children (decode workers are reaped when an extraction ends). Linux only."""
    with open("/proc/stat") as f:  # first line: jiffies of all cores together
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    own = os.times()
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy - (own.user + own.system + own.children_user + own.children_system)


@dataclass(frozen=True)
class Run:
    seconds: float
    others: float  # share of the machine's CPU that other processes took meanwhile


def timed(fn: Callable[[], object]) -> Run:
    before, t = others_cpu(), time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    return Run(seconds, max(0.0, (others_cpu() - before) / (seconds * (os.cpu_count() or 1))))


def fastest(runs: list[Run]) -> Run:
    """The fastest run that other processes left alone (under 5% of the CPU), else the fastest."""
    quiet = [r for r in runs if r.others < 0.05]
    return min(quiet or runs, key=lambda r: r.seconds)


def bare_forward(encoder: Encoder, x: torch.Tensor, batch: int) -> np.ndarray:
    """The baseline: timm's forward_intermediates over preprocessed batches, nothing else.
    Returns the last block's tokens as float16 (the storage benchmarks use them)."""
    out = []
    with torch.inference_mode():
        for b in range(0, len(x), batch):
            ((patches, prefix),) = encoder.model.forward_intermediates(
                x[b : b + batch],
                indices=[encoder.num_layers - 1],
                norm=True,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=True,
            )
            out.append(torch.cat([prefix, patches], 1).half().numpy())
    return np.concatenate(out)


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, dataset, transform, n: int) -> None:
        self.dataset, self.transform, self.n = dataset, transform, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.dataset.load_image(i))


def worker_rates(
    dataset, encoder: Encoder, workers: int, batch: int, pin: bool = False, n: int = 1 << 30
) -> dict[str, float]:
    """img/s per decode worker of a DataLoader sending float32 batches (timm's transform, as
    extraction did) and uint8 batches (PIL resize and crop only, as it does now), through
    ``workers`` worker processes over the first ``n`` images; the first batch (worker
    start) is not counted."""
    out = {}
    for name, tf in (("float32", encoder.transform()), ("uint8", encoder.preprocess.pil_transform)):
        loader = torch.utils.data.DataLoader(
            _Decoded(dataset, tf, n), batch_size=batch, num_workers=workers, pin_memory=pin, prefetch_factor=4
        )
        it = iter(loader)
        first = next(it)
        t, n = time.perf_counter(), 0
        for x in it:
            n += len(x)
        out[name] = n / (time.perf_counter() - t) / workers
        assert first.dtype == (torch.float32 if name == "float32" else torch.uint8)
    return out


Setting = tuple[int | None, int]  # (--workers, or None for the default; decode workers' niceness)


def parse_settings(text: str) -> list[Setting]:
    """``default,0,1@0,2``: worker counts, ``@N`` for a niceness other than the default."""
    out = []
    for item in text.split(","):
        workers, _, nice = item.partition("@")
        out.append(
            (None if workers == "default" else int(workers), int(nice) if nice else extract_mod.CPU_DECODE_NICENESS)
        )
    return out


def throughput(model: str, data: Path, batch: int, repeats: int, settings: list[Setting], work: Path) -> np.ndarray:
    """Print extraction / bare-forward ratios for ``model``; return its last-block tokens.

    Runs are interleaved (baseline, then each setting, ``repeats`` times) so slow drifts
    hit all alike; the fastest undisturbed run of each is kept, and the share of the CPU
    other processes took during it is printed beside it."""
    dataset = load_dataset(f"folder:{data}")
    encoder = create_encoder(model, pretrained=False)
    tf = encoder.transform()
    x = torch.stack([tf(dataset.load_image(i)) for i in range(len(dataset))])
    n = len(dataset)
    caches = (work / f"{model}-{k}" for k in range(1 << 30))

    def run(setting: Setting) -> None:
        workers, nice = setting
        with mock.patch.object(extract_mod, "CPU_DECODE_NICENESS", nice):
            res = extract(
                dataset, encoder, next(caches), ExtractOptions(batch_size=batch, workers=workers, progress=False)
            )
        assert res.complete and res.samples_done == n

    tokens = bare_forward(encoder, x, batch)
    base, ext = [], {s: [] for s in settings}
    for _ in range(repeats):
        base.append(timed(lambda: bare_forward(encoder, x, batch)))
        for s in settings:
            ext[s].append(timed(lambda s=s: run(s)))
    ref = fastest(base)
    print(f"\n{model}: {n} JPEG 250x250 -> 224 px, batch {batch}, fp32, {torch.get_num_threads()} torch threads")
    print(f"  {'':<40} {'img/s':>7} {'ratio':>6}  other load")
    print(f"  {'bare forward_intermediates':<40} {n / ref.seconds:7.1f} {1:6.3f}  {ref.others:5.0%}")
    for s in settings:
        got = fastest(ext[s])
        workers, nice = s
        count = f"default ({default_workers(torch.device('cpu'))})" if workers is None else str(workers)
        label = f"extract, --workers {count}" + (f", nice {nice}" if workers != 0 else "")
        print(f"  {label:<40} {n / got.seconds:7.1f} {ref.seconds / got.seconds:6.3f}  {got.others:5.0%}")
    rates = worker_rates(dataset, encoder, 1, batch)
    print(
        f"  one decode worker, at normal priority: float32 batches {rates['float32']:.0f} img/s, "
        f"uint8 batches {rates['uint8']:.0f} img/s ({rates['uint8'] / rates['float32']:.2f}x)"
    )
    return tokens


def write_store(path: Path, tokens: np.ndarray, codec: str = "none", chunk_bytes: int | None = None) -> Run:
    """Write ``tokens`` (N, T, D) float16 as a complete store at ``path`` (.zarr or .h5) the
    way extraction does; ``chunk_bytes`` overrides the format's chunk size target."""
    n, t, d = tokens.shape
    spec = {"name": path.stem, "n": n, "dtype": "float16"}
    zarr_bytes, h5_bytes = (
        (chunk_bytes, chunk_bytes) if chunk_bytes else (store_mod.ZARR_CHUNK_BYTES, store_mod.HDF5_CHUNK_BYTES)
    )

    def write() -> None:
        writer = StoreWriter(path, spec, plan_arrays([1], [(t, d)]), {1: guess_layout(t, None)}, codec=codec)
        for c in range(writer.num_chunks):
            a, b = writer.chunk_range(c)
            writer.write_chunk(c, {"tokens": tokens[a:b, None]}, {})
        assert writer.finalize()

    with mock.patch.multiple(store_mod, ZARR_CHUNK_BYTES=zarr_bytes, HDF5_CHUNK_BYTES=h5_bytes):
        return timed(write)


def read_rates(paths: list[Path], rounds: int = 3) -> dict[Path, tuple[float, Run]]:
    """GB/s of a sequential read of each whole store through ``TokenStore.blocks``, and the
    run it comes from. Rounds go over all stores in turn, so load drifts hit all alike.
    The stores were just written: this reads the page cache, not the disk."""
    runs: dict[Path, list[Run]] = {p: [] for p in paths}
    for _ in range(rounds):
        for path in paths:
            with TokenStore.open(path) as store:
                runs[path].append(timed(lambda store=store: [None for _ in store.blocks(1)]))
    out = {}
    for path in paths:
        with TokenStore.open(path) as store:
            nbytes = store.n * store.chunk_bytes // store.chunk_rows
        run = fastest(runs[path])
        out[path] = nbytes / run.seconds / 1e9, run
    return out


def storage(tokens: np.ndarray, rows: int, chunk_mib: list[int], work: Path) -> None:
    """Codec sizes and read throughput per format and chunk size, on ``tokens`` tiled to ``rows``."""
    data = np.ascontiguousarray(np.resize(tokens, (rows, *tokens.shape[1:])))
    mb = data.nbytes / 1e6
    codecs = {codec: work / f"codec-{codec}.zarr" for codec in CODECS}
    writes = {codec: write_store(path, data, codec=codec) for codec, path in codecs.items()}
    sized = {(fmt, size): work / f"chunks-{size}.{fmt}" for fmt in ("zarr", "h5") for size in chunk_mib}
    for (_, size), path in sized.items():
        write_store(path, data, chunk_bytes=size * MiB)
    rates = read_rates([*codecs.values(), *sized.values()])

    print(
        f"\nstore of {rows} x {data.shape[1]} x {data.shape[2]} float16 ({mb:.0f} MB) of last-block tokens; "
        f"chunk targets: zarr {store_mod.ZARR_CHUNK_BYTES // MiB} MiB, hdf5 {store_mod.HDF5_CHUNK_BYTES // MiB} MiB"
    )
    print(f"  {'zarr codec':<12} {'bytes/sample':>12} {'vs none':>8} {'write MB/s':>11} {'read GB/s':>10}  other load")
    raw = cache_location(codecs["none"]).size() / rows
    for codec, path in codecs.items():
        size = cache_location(path).size() / rows
        rate, run = rates[path]
        print(
            f"  {codec:<12} {size:12,.0f} {size / raw:8.3f} {mb / writes[codec].seconds:11.0f} {rate:10.2f}  {run.others:5.0%}"
        )
    print(f"  {'format':<6} {'chunk':>8} {'rows/chunk':>11} {'read GB/s':>10}  other load")
    for (fmt, size), path in sized.items():
        with TokenStore.open(path) as store:
            per_chunk = store.chunk_rows
        rate, run = rates[path]
        print(f"  {fmt:<6} {size:>4} MiB {per_chunk:>11} {rate:10.2f}  {run.others:5.0%}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        default="vit_tiny_patch16_224,vit_small_patch16_224",
        help="timm models, random init; the first also runs the --workers sweep, the last feeds the storage part",
    )
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs; the fastest of each is reported")
    p.add_argument(
        "--workers",
        default="default,0,1@0,2",
        help="decode worker settings for the first model: counts, "
        "'default', and @N for a worker niceness other than etf's (e.g. 1@0: one worker at normal priority)",
    )
    p.add_argument("--store-rows", type=int, default=2048)
    p.add_argument("--chunk-mib", default="2,8,32")
    args = p.parse_args()
    models = args.models.split(",")
    sweep = parse_settings(args.workers)
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        "'other load' is the share of the CPU other processes took during a run (above 5%: disturbed)"
    )

    def everything() -> None:
        with tempfile.TemporaryDirectory(prefix="etf-bench-") as tmp:
            work = Path(tmp)
            data = make_faces(work / "faces", args.images)
            tokens = np.empty(0)
            for k, model in enumerate(models):
                tokens = throughput(
                    model, data, args.batch_size, args.repeats, sweep if k == 0 else parse_settings("default"), work
                )
            storage(tokens, args.store_rows, [int(s) for s in args.chunk_mib.split(",")], work)

    run = timed(everything)
    print(f"\n{run.seconds:.0f} s; other processes took {run.others:.0%} of the CPU meanwhile")


if __name__ == "__main__":
    main()
