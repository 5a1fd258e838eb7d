"""Fit from the cache vs fit from tensors already in memory, and a streamed fit's peak memory.

    python bench/fit.py [--n 4096] [--tokens 197] [--dim 384] [--epochs 2]

1. Throughput: the same ET-Fuser fit (same data, seed, batches) three ways in one run:
   tokens loaded into memory then trained (the baseline: gathering batches from RAM),
   streamed block-wise from the Zarr store, and streamed from an HDF5 copy. Printed as
   samples/s of the training loop and the ratio streamed / in-memory (target >= 0.9).
2. Memory: a streamed fit in a fresh process on a store 4x larger than --max-memory;
   its peak RSS above the process's RSS after imports, less the same figure for the same
   fit (same store, steps and evaluations) with the tokens held in memory minus the
   store's bytes (model, activations, optimiser, allocator pools, lazy imports), is what
   streaming the data costs; printed against the budget.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from etf.cache.importer import import_tokens  # noqa: E402
from etf.data import load_dataset  # noqa: E402
from etf.pipeline.fit.fusers import FuserConfig  # noqa: E402
from etf.pipeline.fit.train import FitConfig, fit  # noqa: E402
from tests.synthetic import make_csv_dataset, planted_tokens, standard_splits  # noqa: E402


def make_store(tmp: Path, n: int, t: int, d: int, formats: tuple[str, ...] = ("zarr", "hdf5")) -> tuple[str, Path]:
    """A labelled dataset of ``n`` samples and a store per format (Zarr ``Pzarr``, HDF5
    ``Phdf5``) of (t, d) float16 tokens whose first channels carry the label."""
    rng = np.random.default_rng(0)
    s = rng.choice([-1.0, 1.0], n)
    dataset, spec = make_csv_dataset(tmp / "data", {"label": (s > 0).astype(float)}, standard_splits(n))
    tokens = rng.normal(size=(n, t, d)).astype(np.float16)
    tokens[:, :, :16] += planted_tokens(rng, s, 2.0)[:, :1, :].astype(np.float16)
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "tokens.npy", tokens)
    cache = tmp / "cache"
    for f in formats:
        import_tokens(cache, dataset, f"P{f}", tmp / "tokens.npy", store_format=f)
    return spec, cache


def timed_fit(spec: str, cache: Path, out: Path, prior: str, epochs: int, budget: int | None) -> dict:
    cfg = FitConfig(
        cache_dir=cache,
        encoders=[prior],
        out=out,
        tasks=["classify:label"],
        epochs=epochs,
        batch_size=128,
        fuser_config=FuserConfig(dim=128, depth=1, heads=4, prior_tokens="all", head="pooled"),
        max_memory=budget,
        progress=False,
    )
    t0 = time.perf_counter()
    m = fit(load_dataset(spec), cfg).metrics
    with open(out / "history.csv") as f:
        rates = [float(r["samples_per_s"]) for r in csv.DictReader(f)]
    return {"seconds": time.perf_counter() - t0, "sps": float(np.mean(rates)), "streamed": m["streamed"]}


CHILD = """
import sys, json, threading, time
sys.path.insert(0, {root!r})
from etf.data import load_dataset
from etf.pipeline.fit.train import FitConfig, fit
from etf.pipeline.fit.fusers import FuserConfig
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
dataset = load_dataset({spec!r})
cfg = FitConfig(cache_dir={cache!r}, encoders=["Pzarr"], out={out!r}, tasks=["classify:label"], epochs=1, batch_size=128,
                fuser_config=FuserConfig(dim=128, depth=1, heads=4, prior_tokens="all", head="pooled"), max_memory={budget},
                progress=False)
base = rss()
threading.Thread(target=sample, daemon=True).start()
m = fit(dataset, cfg).metrics
print(json.dumps({{"grow": peak[0] - base, "streamed": m["streamed"]}}))
"""


def peak_growth(spec: str, cache: Path, out: Path, budget: int) -> dict:
    """Peak RSS of a fit above the RSS before it (after imports), in a fresh process.

    No warm-up fit: a finished fit leaves allocator pools behind that hide what the next
    one needs."""
    code = CHILD.format(root=str(ROOT), spec=spec, cache=str(cache), out=str(out), budget=budget)
    return json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec, cache = make_store(tmp, args.n, args.tokens, args.dim)
        size = args.n * args.tokens * args.dim * 2
        print(f"store: {args.n} x {args.tokens} x {args.dim} float16 = {size / 2**20:.0f} MiB")
        mem = timed_fit(spec, cache, tmp / "mem", "Pzarr", args.epochs, None)
        zarr_s = timed_fit(spec, cache, tmp / "zs", "Pzarr", args.epochs, size // 4)
        h5_s = timed_fit(spec, cache, tmp / "hs", "Phdf5", args.epochs, size // 4)
        assert not mem["streamed"] and zarr_s["streamed"] and h5_s["streamed"]
        print(f"in memory   : {mem['sps']:8.0f} samples/s in training, {mem['seconds']:.1f} s in all (load included)")
        for name, r in (("zarr stream", zarr_s), ("hdf5 stream", h5_s)):
            print(
                f"{name} : {r['sps']:8.0f} samples/s in training, {r['seconds']:.1f} s in all; "
                f"ratio to in-memory {r['sps'] / mem['sps']:.3f}"
            )
        budget = size // 4
        streamed = peak_growth(spec, cache, tmp / "c1", budget)
        # the same fit with the whole store in memory: less the store, what everything but
        # the data costs over the same steps (allocator pools grow with them)
        held = peak_growth(spec, cache, tmp / "c2", 2 * size)
        assert streamed["streamed"] and not held["streamed"]
        rest = held["grow"] - size
        data = streamed["grow"] - rest
        print(
            f"streamed fit, store {size / 2**20:.0f} MiB = 4x the budget of {budget / 2**20:.0f} MiB: peak RSS "
            f"+{streamed['grow'] / 2**20:.0f} MiB; in memory +{held['grow'] / 2**20:.0f} MiB, of which all but the "
            f"store +{rest / 2**20:.0f} MiB; so streaming the data +{data / 2**20:.0f} MiB = {data / budget:.2f} of the budget"
        )


if __name__ == "__main__":
    main()
