"""Benchmark: an encoder-subset grid from the token cache vs the same grid re-extracting
features for every run, and vs online augmentation (the priors run on every batch).

Real images (lfw-subset: 200 LFW crops, resized to --img-size) through three small
random-init timm encoders. The cached grid reads stores extracted once (`etf ablate`); with
``--views K`` they hold K augmented views (``--augment face``) and the grid trains on a
random view per sample and epoch. Two baselines:

- re-extracting: every point of the same grid run as a script without a cache would: build
  its encoders, extract them over the data into a fresh cache, then fit the same FitConfig;
- online augmentation, what the method's authors' code runs: every batch of every epoch,
  the run's frozen priors forward freshly augmented training images. One such epoch is
  measured per encoder (decode, the ``face`` augmentation, the timm transform and the
  forward, batch 32, over the training images); a run costs ``--epochs`` of them for each
  of its priors plus its fit, which is taken as the cached grid's (the same fuser steps).
  This is a lower bound on the baseline: it leaves out the priors on the validation images
  each epoch, and that the fits' steps would wait for the forwards.

The grid runs `--jobs` fits at a time as `etf ablate` does (default: one per core), the
baselines one after another with all cores. Prints wall and CPU seconds (this process and
its finished children: decode and grid workers) and their ratios.

    python bench/ablate.py [--img-size 224] [--epochs 20] [--tokens pool:2] [--encoders A,B,C] [--views 4]
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from joblib.externals.loky import get_reusable_executor  # noqa: E402

from etf.data import load_dataset  # noqa: E402
from etf.pipeline.ablate.grid import Grid, plan_grid, run_grid  # noqa: E402
from etf.pipeline.extract.augment import Augmenter, parse_augment  # noqa: E402
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


def extract_all(dataset, cache: Path, names: list[str], img_size: int, views: int = 1) -> None:
    for name in names:
        encoder = create_encoder(name, pretrained=False, img_size=img_size)
        extract(
            dataset, encoder, cache, ExtractOptions(progress=False, views=views, augment="face" if views > 1 else None)
        )


def online_epoch(dataset, name: str, img_size: int, epoch: int) -> tuple[float, float]:
    """Wall and CPU seconds of one epoch of a prior under online augmentation: every
    training image decoded, freshly augmented (seeded by the epoch), transformed and
    forwarded, batch 32."""
    encoder = create_encoder(name, pretrained=False, img_size=img_size)
    layers = encoder.resolve_layers(None)
    augmenter, transform = Augmenter(parse_augment("face"), seed=epoch), encoder.transform()
    rows = [i for i, s in enumerate(dataset.splits) if s == "train"]
    wall, cpu = time.perf_counter(), cpu_seconds()
    for b in range(0, len(rows), 32):
        batch = [augmenter.view(dataset.load_image(i), dataset.ids[i], 1)[0] for i in rows[b : b + 32]]
        with torch.inference_mode():
            encoder.tokens(torch.stack([transform(img) for img in batch]), layers)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--tokens", help="read-time token selection of the fits, e.g. pool:2  [default: all]")
    ap.add_argument(
        "--encoders", default=",".join(ENCODERS), help="three timm models, random init  [default: %(default)s]"
    )
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="etf ablate --jobs  [default: the cores]")
    ap.add_argument("--views", type=int, default=1, help="views per sample in the cached stores  [default: 1]")
    ap.add_argument("--skip-reextract", action="store_true", help="leave out the re-extracting baseline")
    args = ap.parse_args()
    encoders = args.encoders.split(",")
    dataset = load_dataset("lfw-subset")
    root = Path(tempfile.mkdtemp(prefix="etf-bench-ablate-"))
    try:
        with clock(f"extract {len(encoders)} stores once ({args.views} view(s))") as once:
            extract_all(dataset, root / "cache", encoders, args.img_size, args.views)
        settings = {"data": "lfw-subset", "cache": root / "cache", "out": root / "grid", "encoders": encoders}
        settings |= {"fusers": "etfuser", "seeds": "0", "epochs": args.epochs, "tokens": args.tokens, "batch_size": 32}
        settings["jobs"] = args.jobs
        token_level = {"prior_tokens": "all", "head": "pooled"}  # the model the figures were measured with
        plan = plan_grid(Grid.from_settings({**settings, "lr": 2e-3, "dim": 64, "depth": 1, "heads": 4, **token_level}))
        runs = len(plan.points)
        print(
            f"grid: {runs} runs ({len(plan.groups())} one-pass groups): every subset of {', '.join(encoders)} with "
            f"etfuser, plus the linear baselines; {len(dataset)} images at {args.img_size} px, "
            f"{args.epochs} epochs, tokens {args.tokens or 'all'}, {args.jobs} job(s), {args.views} view(s)",
            flush=True,
        )
        with clock("grid from the cache", runs) as cached:
            outcome = run_grid(plan)
            get_reusable_executor().shutdown(wait=True)  # so that the workers' CPU time is counted
        assert outcome.done == runs and not outcome.failed
        epoch = {
            name: np.mean([online_epoch(dataset, name, args.img_size, e) for e in range(2)], axis=0)
            for name in encoders
        }
        forwards = sum(args.epochs * epoch[name] for p in plan.points for name in p.config.encoders)
        online = forwards + np.array(cached)
        print(
            "online augmentation, one epoch of each prior (wall, cpu): "
            + ", ".join(f"{name} {epoch[name][0]:.1f} s, {epoch[name][1]:.1f} s" for name in encoders)
            + f"; the grid: prior forwards {forwards[0]:.1f} s + the fits {cached[0]:.1f} s = {online[0]:.1f} s wall, "
            f"{online[1]:.1f} s cpu",
            flush=True,
        )
        for name, k in (("wall", 0), ("cpu", 1)):
            print(
                f"ratio ({name}): online augmentation / (extract once + cached) {online[k] / (once[k] + cached[k]):.1f}x, "
                f"online / cached {online[k] / cached[k]:.1f}x"
            )
        if args.skip_reextract:
            return
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
