"""Benchmark: `etf probe` of every prior alone vs `etf ablate --subsets singles` over the same
priors, from the same cache.

    python bench/probe.py [--n 10000] [--priors 5] [--tokens 5] [--dim 384] [--epochs 30] [--jobs 1]

A synthetic cached dataset: N samples (60/20/20 train/val/test), a 3-class label, and
``--priors`` stores of (T, D) float16 tokens (a class token and a patch grid) in which prior
k carries the label with its own strength, and some priors share a common component (so
their CKA is high). The probe runs kNN (k = 10, 20, 100, 200) and the val-swept logistic
regression (8 Cs) on each prior, CKA of every pair with its 100 half-sample interval, and
the error overlap, on the CPU. The baseline is the grid a researcher would otherwise run to
learn the same thing: `etf ablate --subsets singles` (the ET-Fuser on each prior alone, with
the linear baseline, ``--epochs``, one seed). Prints wall and CPU seconds and their ratio.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/ablate.py: no spinning threads on a shared machine

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from etf.cache.importer import import_tokens  # noqa: E402
from etf.data import load_dataset  # noqa: E402
from etf.pipeline.ablate.grid import Grid, plan_grid, run_grid  # noqa: E402
from etf.pipeline.probe import ProbeConfig, run_probe  # noqa: E402
from tests.synthetic import make_csv_dataset, standard_splits  # noqa: E402


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_cache(tmp: Path, n: int, priors: int, t: int, d: int) -> tuple[str, Path, list[str]]:
    """The dataset and ``priors`` stores; prior k's label signal grows with k, and every
    second prior shares one common component."""
    rng = np.random.default_rng(0)
    label = rng.integers(3, size=n)
    _, spec = make_csv_dataset(tmp / "data", {"label": label.astype(float)}, standard_splits(n))
    dataset = load_dataset(spec)
    shared = rng.normal(size=(n, 1, d)).astype(np.float32)
    names = []
    for k in range(priors):
        centres = rng.normal(size=(3, d)).astype(np.float32) * (0.05 + 0.05 * k)
        tokens = rng.normal(size=(n, t, d)).astype(np.float32) + centres[label][:, None]
        if k % 2 == 0:
            tokens += 2 * shared
        np.save(tmp / "tokens.npy", tokens.astype(np.float16))
        names.append(f"P{k}")
        import_tokens(tmp / "cache", dataset, names[-1], tmp / "tokens.npy")
    return spec, tmp / "cache", names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--priors", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=5, help="tokens per sample: 1 class token + a square grid")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--epochs", type=int, default=30, help="of the ablate baseline (etf fit's default: 30)")
    ap.add_argument("--jobs", type=int, default=1, help="of the ablate baseline")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        spec, cache, names = make_cache(tmp, args.n, args.priors, args.tokens, args.dim)
        print(
            f"cache: {args.n} samples x {args.priors} priors of ({args.tokens}, {args.dim}) in {time.perf_counter() - t0:.1f} s"
        )
        dataset = load_dataset(spec)

        w0, c0 = time.perf_counter(), cpu_seconds()
        record = run_probe(dataset, ProbeConfig(cache, names, tmp / "probe", ["classify:label"], device="cpu"))
        probe_wall, probe_cpu = time.perf_counter() - w0, cpu_seconds() - c0
        per = {s["method"]: 0.0 for s in record["selections"]}
        for s in record["selections"]:
            per[s["method"]] += s["seconds"]
        print(
            f"etf probe (knn + logreg, CKA of {len(record['cka'])} pairs): {probe_wall:.1f} s wall, {probe_cpu:.1f} s CPU"
            f" ({', '.join(f'{m} {v:.1f} s' for m, v in per.items())})"
        )
        for s in record["selections"]:
            row = next(
                r
                for r in record["results"]
                if (r["prior"], r["method"], r["config"], r["split"]) == (s["prior"], s["method"], "chosen", "test")
            )
            print(f"  {s['prior']} {s['method']:<6} {s['chosen'][0]:<8} test accuracy {row['metrics']['accuracy']:.4f}")

        w0, c0 = time.perf_counter(), cpu_seconds()
        grid = Grid.from_settings(
            {
                "data": spec,
                "cache": str(cache),
                "out": str(tmp / "ablate"),
                "encoders": names,
                "subsets": "singles",
                "tasks": ["classify:label"],
                "epochs": args.epochs,
                "jobs": args.jobs,
                "device": "cpu",
            }
        )
        outcome = run_grid(plan_grid(grid))
        ablate_wall, ablate_cpu = time.perf_counter() - w0, cpu_seconds() - c0
        print(
            f"etf ablate --subsets singles ({outcome.runs} runs, {args.epochs} epochs, {args.jobs} job(s)): "
            f"{ablate_wall:.1f} s wall, {ablate_cpu:.1f} s CPU"
        )
        print(f"ratio ablate / probe: {ablate_wall / probe_wall:.1f}x wall, {ablate_cpu / probe_cpu:.1f}x CPU")


if __name__ == "__main__":
    main()
