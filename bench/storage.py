"""Zarr store layers on object storage: fsspec (s3fs) against obstore, with local disk as the
baseline; and what the chunks' checksums cost a read.

1. Checksums: the same array on local disk read in ``etf fit``'s block sizes from Zarr without
   and with the ``crc32c`` codec (the baseline: format version 1 against 2), and from HDF5
   without and with the ``fletcher32`` filter; printed as MB/s and the ratio to the baseline.
2. Object storage: starts a local S3 server (moto's server mode, the one the tests use) on 127.0.0.1, writes
a float16 token array of whole 8 MiB chunks through each store layer and reads it back in
the block sizes ``etf fit`` streams, all in one run. What carries over between machines is
the ratio of the two object-store layers; both talk to the same server.

    python bench/storage.py [--mib 256] [--repeat 2] [--no-s3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.s3 import S3Server  # noqa: E402


def _stores(server: S3Server, local: Path) -> dict:
    import obstore.store
    import zarr.storage

    fs = zarr.storage.FsspecStore.from_url(f"s3://{server.bucket}/fsspec", storage_options=server.storage_options)
    obs = obstore.store.S3Store(
        server.bucket,
        prefix="obstore",
        endpoint=server.endpoint,
        access_key_id="testing",
        secret_access_key="testing",
        region="us-east-1",
        client_options={"allow_http": True},
    )
    return {
        "local disk": zarr.storage.LocalStore(local),
        "s3 via fsspec (s3fs)": fs,
        "s3 via obstore": zarr.storage.ObjectStore(obs),
    }


def measure(store, data: np.ndarray, rows: int, block: int) -> tuple[float, float, float]:
    """(write MB/s, block read MB/s, open + chunk listing s) of one array in ``store``."""
    import zarr

    t = time.perf_counter()
    arr = zarr.create_array(store, name="tokens", shape=data.shape, chunks=(rows, *data.shape[1:]), dtype=data.dtype,
                            compressors=None, fill_value=0, overwrite=True)  # fmt: skip
    for start in range(0, len(data), rows):
        arr[start : start + rows] = data[start : start + rows]
    write = data.nbytes / (time.perf_counter() - t) / 1e6
    t = time.perf_counter()
    arr = zarr.open_array(store, path="tokens", mode="r")
    for start in range(0, len(data), block):
        np.asarray(arr[start : start + block])
    read = data.nbytes / (time.perf_counter() - t) / 1e6
    from zarr.core.sync import sync

    async def keys() -> list[str]:
        return [k async for k in store.list_prefix("tokens/")]

    t = time.perf_counter()
    sync(keys())
    return write, read, time.perf_counter() - t


def checksum_reads(local: Path, data: np.ndarray, rows: int, block: int, repeat: int) -> dict[str, list[float]]:
    """Block read MB/s of ``data`` stored four ways: Zarr and HDF5, each without and with the
    checksum etf's stores carry; ``repeat`` rounds, each reading every array in turn (so load
    from other processes falls on all alike), after one untimed round (page cache warm)."""
    import h5py
    import zarr

    arrays = {}
    for crc in (False, True):
        path = local / f"crc{crc}.zarr"
        arr = zarr.create_array(str(path), shape=data.shape, chunks=(rows, *data.shape[1:]), dtype=data.dtype,
                                compressors=[zarr.codecs.Crc32cCodec()] if crc else None, fill_value=0)  # fmt: skip
        arr[:] = data
        arrays["Zarr, crc32c" if crc else "Zarr, no checksum"] = zarr.open_array(str(path), mode="r")
    for f32 in (False, True):
        path = local / f"f32{f32}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("tokens", data=data, chunks=(16, *data.shape[1:]), fletcher32=f32)
        arrays["HDF5, fletcher32" if f32 else "HDF5, no checksum"] = h5py.File(path, "r")["tokens"]
    out: dict[str, list[float]] = {name: [] for name in arrays}
    for r in range(repeat + 1):
        for name, arr in arrays.items():
            t = time.perf_counter()
            for start in range(0, len(data), block):
                np.asarray(arr[start : start + block])
            if r:
                out[name].append(data.nbytes / (time.perf_counter() - t) / 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="array size")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-s3", action="store_true", help="only the checksums' read cost")
    args = ap.parse_args()
    t, d = 197, 384  # ViT-S tokens
    row = t * d * 2
    rows = (8 << 20) // row
    n = (args.mib << 20) // row // rows * rows
    data = np.random.default_rng(0).standard_normal((n, t, d)).astype(np.float16)
    block = rows * 4
    print(f"{n} x {t} x {d} float16 ({data.nbytes / 2**20:.0f} MiB), {rows} rows per chunk, reads of {block} rows")
    local = Path(tempfile.mkdtemp(prefix="etf-bench-storage-"))
    try:
        reads = checksum_reads(local, data, rows, block, max(3, args.repeat))
        print("| local disk, block reads | MB/s, best / median | ratio to no checksum, best / median |")
        print("|---|---|---|")
        for name, mbs in reads.items():
            base = reads[name.split(",")[0] + ", no checksum"]
            best, median = max(mbs), float(np.median(mbs))
            print(f"| {name} | {best:.0f} / {median:.0f} | {best / max(base):.3f} / {median / np.median(base):.3f} |")
        if args.no_s3:
            return
        with S3Server() as server:
            print(f"| store layer | write MB/s | block read MB/s | listing {n // rows} chunks, ms |")
            print("|---|---|---|---|")
            for name, store in _stores(server, local).items():
                runs = [measure(store, data, rows, block) for _ in range(args.repeat)]
                w, r, ls = (" / ".join(f"{v:.0f}" for v in col) for col in zip(*[(a, b, c * 1e3) for a, b, c in runs]))
                print(f"| {name} | {w} | {r} | {ls} |")
    finally:
        shutil.rmtree(local, ignore_errors=True)
        os.environ.pop("AWS_ENDPOINT_URL", None)


if __name__ == "__main__":
    main()
