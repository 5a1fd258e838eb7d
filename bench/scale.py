"""Cost growth with the number of samples: time per sample of every step must stay flat.

For each N, a ``csv:`` dataset of N tiny PNGs with an imported store of small tokens (one
class token + a 2x2 grid, D=32) per prior, then, each timed on its own:

- manifest load: ``load_dataset`` + the dataset key (digests already remembered; the first,
  cold load that hashes every image is timed too);
- ``cache verify`` of one store;
- one in-memory fit epoch and one streamed fit epoch (``--max-memory`` 4 MiB whatever N,
  below the tokens of every N), each a whole ``etf fit`` of the ``concat`` fuser (cheap, so that bookkeeping
  shows): splits, training, evaluation, the run directory;
- ``etf ablate --dry-run`` planning of a grid over two priors, two fusers, three seeds.

Peak memory of the streamed fit is measured in a subprocess per N (``ru_maxrss``), above
the same process after loading the dataset, against the ``--max-memory`` budget.

    python bench/scale.py [--sizes 10000,30000,100000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T, D = 5, 32
#: the streamed fits' --max-memory, the same for every N (below the smallest store's tokens):
#: a streamed fit's peak memory must then stay flat as N grows
BUDGET = 4 << 20


def png_bytes() -> bytes:
    """One 4x4 grey PNG: every image file holds these bytes, so making 100k files is only writes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4, 4), 128).save(buf, format="PNG")
    return buf.getvalue()


def make_images(root: Path, n: int) -> float:
    """N image files under ``root/img`` (1000 per folder); seconds taken."""
    t = time.perf_counter()
    png = png_bytes()
    for i in range(n):
        folder = root / "img" / f"{i // 1000:03d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.png").write_bytes(png)
    return time.perf_counter() - t


def write_csv(root: Path, n: int) -> str:
    rng = np.random.default_rng(n)
    split = np.array(["train"] * (n * 6 // 10) + ["val"] * (n * 2 // 10) + ["test"] * (n - n * 8 // 10))
    label = rng.integers(0, 2, n)
    lines = ["path,split,label"] + [f"img/{i // 1000:03d}/{i:06d}.png,{split[i]},{label[i]}" for i in range(n)]
    path = root / f"data-{n}.csv"
    path.write_text("\n".join(lines) + "\n")
    return f"csv:{path}"


def timed(fn: Callable[[int], object], repeats: int = 1) -> tuple[float, object]:
    """The fastest of ``repeats`` calls ``fn(k)`` (seconds) and a result; the share of the CPU
    other processes took during that call goes to ``LOAD`` (this machine is shared)."""
    from bench.extract import fastest
    from bench.extract import timed as run_timed

    results: list[object] = []
    runs = [run_timed(lambda k=k: results.append(fn(k))) for k in range(repeats)]
    best = fastest(runs)
    LOAD.append(best.others)
    return best.seconds, results[-1]


LOAD: list[float] = []


def fit_config(cache: Path, out: Path, budget: int | None, epochs: int = 1):
    from etf.pipeline.fit.config import FitConfig, FuserConfig

    return FitConfig(
        cache_dir=cache, encoders=["A", "B"], out=out, tasks=["classify:label"], epochs=epochs, batch_size=256,
        fuser="concat", fuser_config=FuserConfig(dim=32, depth=1, heads=2), max_memory=budget, progress=False,
    )  # fmt: skip


def rss_child(spec: str, cache: Path, out: Path, budget: int) -> None:
    """In a subprocess: peak RSS of a streamed fit above the process after loading the data."""
    from etf.data import load_dataset
    from etf.pipeline.fit.train import fit

    dataset = load_dataset(spec)
    _ = dataset.key
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
    base = _status_kib("VmRSS")
    result = fit(dataset, fit_config(cache, out, budget))
    print(json.dumps({"base_kib": base, "peak_kib": _status_kib("VmHWM"), "streamed": result.metrics["streamed"]}))


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def one_size(work: Path, n: int, repeats: int) -> dict[str, float]:
    import torch

    from etf.cache.audit import verify_store
    from etf.cache.importer import import_tokens
    from etf.data import load_dataset
    from etf.pipeline.ablate.grid import Grid, plan_grid
    from etf.pipeline.fit.train import fit

    torch.set_num_threads(2)
    os.environ["ETF_DATA_HOME"] = str(work / f"data_home-{n}")  # the cold load hashes all N images
    spec = write_csv(work, n)
    cold, dataset = timed(lambda k: (d := load_dataset(spec), d.key)[0])
    warm, dataset = timed(lambda k: (d := load_dataset(spec), d.key)[0], repeats)
    cache = work / f"cache-{n}"
    rng = np.random.default_rng(0)
    label = np.array(dataset.column("label"), dtype=float)
    stores = []
    for name in ("A", "B"):
        tokens = rng.normal(size=(n, T, D)).astype(np.float32) + (2 * label - 1)[:, None, None] * (name == "A")
        np.save(work / f"{name}.npy", tokens)
        stores.append(import_tokens(cache, dataset, name, work / f"{name}.npy"))
    verify, problems = timed(lambda k: verify_store(stores[0]), repeats)
    assert problems == [], problems
    store_bytes = 2 * n * T * D * 2
    budget = BUDGET
    memory, res = timed(lambda k: fit(dataset, fit_config(cache, work / f"run-mem-{n}-{k}", None)), repeats)
    assert not res.metrics["streamed"]
    streamed, res = timed(lambda k: fit(dataset, fit_config(cache, work / f"run-str-{n}-{k}", budget)), repeats)
    assert res.metrics["streamed"]
    grid = Grid.from_settings(
        {"data": spec, "cache": cache, "encoders": "A,B", "fusers": "etfuser,concat", "seeds": "0,1,2",
         "tasks": ["classify:label"]}, dry_run=True,
    )  # fmt: skip
    plan, p = timed(lambda k: plan_grid(grid), repeats)
    code = (
        "import sys; sys.path[:0] = [sys.argv[1]]; from bench.scale import rss_child; "
        "rss_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))"
    )
    root = str(Path(__file__).resolve().parents[1])
    rss = {}
    for what, limit in (("streamed", budget), ("in memory", 1 << 40)):
        out = subprocess.run(
            [sys.executable, "-c", code, root, spec, str(cache), str(work / f"run-rss-{n}-{limit}"), str(limit)],
            check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"},
        )  # fmt: skip
        got = json.loads(out.stdout.strip().splitlines()[-1])
        rss[what] = (got["peak_kib"] - got["base_kib"]) / 1024
    load = dict(
        zip(
            (
                "cold load",
                "manifest load",
                "cache verify",
                "fit epoch, in memory",
                "fit epoch, streamed",
                "ablate --dry-run",
            ),
            LOAD[-6:],
        )
    )
    return {
        "load": load,
        "n": n,
        "cold load": cold,
        "manifest load": warm,
        "cache verify": verify,
        "fit epoch, in memory": memory,
        "fit epoch, streamed": streamed,
        "ablate --dry-run": plan,
        "runs planned": len(p.points),
        "budget MiB": budget / 2**20,
        "tokens MiB": store_bytes / 2**20,
        "streamed peak": rss["streamed"],
        "in-memory peak": rss["in memory"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,30000,100000")
    ap.add_argument("--repeats", type=int, default=1, help="the fastest of this many runs of each step")
    ap.add_argument("--work", type=Path, help="keep the files here (default: a temporary folder)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="etf-bench-scale-"))
    made = make_images(work, max(sizes))
    print(
        f"{max(sizes)} image files (4x4 PNG, one per sample) written in {made:.1f} s; the fastest of {args.repeats} runs per step"
    )
    try:
        rows = [one_size(work, n, args.repeats) for n in sizes]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    steps = list(rows[0]["load"])  # the timed steps, in order
    print("\nseconds (µs per sample; share of the CPU other processes took meanwhile)")
    print("\n| step | " + " | ".join(f"N = {r['n']:,}" for r in rows) + " | per sample, last / first |")
    print("|---|" + "---|" * (len(rows) + 1))
    for step in steps:
        per = [r[step] / r["n"] * 1e6 for r in rows]
        cells = " | ".join(f"{r[step]:.2f} s ({p:.1f} µs; {r['load'][step]:.0%})" for r, p in zip(rows, per))
        print(f"| {step} | {cells} | {per[-1] / per[0]:.2f} |")
    print("\npeak RSS of a fit above the process after loading the dataset (MiB)")
    print("\n| N | runs planned | tokens | --max-memory | streamed fit | in-memory fit |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['runs planned']} | {r['tokens MiB']:.1f} | {r['budget MiB']:.1f} | "
            f"{r['streamed peak']:.1f} | {r['in-memory peak']:.1f} |"
        )


if __name__ == "__main__":
    main()
