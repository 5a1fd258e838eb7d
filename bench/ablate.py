"""Benchmark: an encoder-subset grid from the token cache vs the same grid re-extracting
features for every run.

Real images (lfw-subset: 200 LFW crops, resized to --img-size) through three small
random-init timm encoders. The cached grid reads stores extracted once (`etf ablate`); the
baseline runs every point of the same grid as a script without a cache would: build its
encoders, extract them over the data into a fresh cache, then fit the same FitConfig.
The grid runs `--jobs` fits at a time as `etf ablate` does (default: one per core), the
baseline one after another with all cores. Prints wall and CPU seconds (this process and its
finished children: decode and grid workers) and their ratios.

    python bench/ablate.py [--img-size 224] [--epochs 20] [--tokens pool:2] [--encoders A,B,C]
    python bench/ablate.py --encoders vit_base_patch16_224,resnet50,convnext_tiny   # base-size priors
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared machine, spinning threads of
# small training steps burn several times the CPU of the work itself (measured here: a
# 64 px fit took 13.7 s CPU with the default policy, 2.1 s with this one). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from joblib.externals.loky import get_reusable_executor  # noqa: E402

from etf.data import load_dataset  # noqa: E402
from etf.pipeline.ablate.grid import Grid, plan_grid, run_grid  # noqa: E402
from etf.pipeline.extract.encoders import create_encoder  # noqa: E402
from etf.pipeline.extract.run import ExtractOptions, extract  # noqa: E402
from etf.pipeline.fit.train import fit  # noqa: E402

ENCODERS = ["vit_t", "resnet18", "convnext_atto"]


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextmanager
def clock(label: str, runs: int = 1) -> Iterator[list[float]]:
    """Wall and CPU seconds of the block, printed and left in the yielded list."""
    seconds: list[float] = []
    wall, cpu = time.perf_counter(), cpu_seconds()
    yield seconds
    seconds += [time.perf_counter() - wall, cpu_seconds() - cpu]
    per_run = f"   ({seconds[0] / runs:.1f} s/run)" if runs > 1 else ""
    print(f"{label:<36} wall {seconds[0]:7.1f} s   cpu {seconds[1]:7.1f} s{per_run}", flush=True)


def extract_all(dataset, cache: Path, names: list[str], img_size: int) -> None:
    for name in names:
        encoder = create_encoder(name, pretrained=False, img_size=img_size)
        extract(dataset, encoder, cache, ExtractOptions(progress=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--tokens", help="read-time token selection of the fits, e.g. pool:2  [default: all]")
    ap.add_argument(
        "--encoders", default=",".join(ENCODERS), help="three timm models, random init  [default: %(default)s]"
    )
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="etf ablate --jobs  [default: the cores]")
    args = ap.parse_args()
    encoders = args.encoders.split(",")
    dataset = load_dataset("lfw-subset")
    root = Path(tempfile.mkdtemp(prefix="etf-bench-ablate-"))
    try:
        with clock(f"extract {len(encoders)} stores once") as once:
            extract_all(dataset, root / "cache", encoders, args.img_size)
        settings = {"data": "lfw-subset", "cache": root / "cache", "out": root / "grid", "encoders": encoders}
        settings |= {"fusers": "etfuser", "seeds": "0", "epochs": args.epochs, "tokens": args.tokens, "batch_size": 32}
        settings["jobs"] = args.jobs
        token_level = {"prior_tokens": "all", "head": "pooled"}  # the model the figures were measured with
        plan = plan_grid(Grid.from_settings({**settings, "lr": 2e-3, "dim": 64, "depth": 1, "heads": 4, **token_level}))
        runs = len(plan.points)
        print(
            f"grid: {runs} runs ({len(plan.groups())} one-pass groups): every subset of {', '.join(encoders)} with "
            f"etfuser, plus the linear baselines; {len(dataset)} images at {args.img_size} px, "
            f"{args.epochs} epochs, tokens {args.tokens or 'all'}, {args.jobs} job(s)",
            flush=True,
        )
        with clock("grid from the cache", runs) as cached:
            outcome = run_grid(plan)
            get_reusable_executor().shutdown(wait=True)  # so that the workers' CPU time is counted
        assert outcome.done == runs and not outcome.failed
        with clock("grid re-extracting for every run", runs) as naive:
            for p in plan.points:
                cache = root / "per-run" / p.run_id
                extract_all(dataset, cache, p.config.encoders, args.img_size)
                fit(dataset, replace(p.config, cache_dir=cache, out=root / "per-run-out" / p.run_id))
                shutil.rmtree(cache)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name, k in (("wall", 0), ("cpu", 1)):
        print(
            f"ratio ({name}): re-extracting / cached {naive[k] / cached[k]:.1f}x, "
            f"re-extracting / (extract once + cached) {naive[k] / (once[k] + cached[k]):.1f}x"
        )


if __name__ == "__main__":
    main()
