"""GPU figures, each beside a baseline from the same run (``bench/gpu.sh`` runs this unattended,
in under 8 minutes on one H200).

1. Extraction: ``etf extract`` end to end (JPEG files, decode workers or nvjpeg, resize,
   forward under autocast, token selection, chunked Zarr writes, publication) with
   ``--tokens all`` and ``--tokens pool:1``, each with ``--decode device`` and ``cpu``,
   against the bare ``forward_intermediates`` of the same model over the same images
   already preprocessed on the device (same batch size and precision), and against the
   disk's write bandwidth measured here: ``--tokens all`` is bounded by min(forward, disk).
   Also: how far the device decode path's pixels are from PIL's, and img/s per decode
   worker with uint8 against float32 batches.
2. Fit: samples/s of ``etf fit`` epochs with the tokens resident on the device and streamed
   from the store (``--max-memory`` a quarter of them), against the bare training step.
3. Grid: every subset of three priors with etfuser plus the linear baselines, from the cache
   (extract once + ``etf ablate``), against two online baselines that pay the priors every
   epoch: forward-only over preprocessed images on the device (a lower bound on the
   authors' loop) and the realistic loop (a DataLoader with one worker per core decoding
   and applying the ``face`` augmentation, then the frozen priors' eval forward). Also a
   run's fixed cost: from grids of 1- and 2-epoch runs, (2 T1 - T2) / runs.

Random-init weights and synthetic images made here; nothing is downloaded.

    python bench/gpu.py                      # the defaults bench/gpu.sh uses
    python bench/gpu.py --device cpu --images 64 --batch-size 16 --fit-n 512 --model vit_tiny_patch16_224 \\
        --grid-encoders vit_tiny_patch16_224,resnet18 --grid-images 96 --grid-epochs 2   # a smoke test
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.extract import make_faces, worker_rates  # noqa: E402
from bench.fit import make_store  # noqa: E402
from etf.cache.store import TokenStore  # noqa: E402
from etf.data import load_dataset  # noqa: E402
from etf.pipeline.ablate.grid import Grid, plan_grid, run_grid  # noqa: E402
from etf.pipeline.extract.augment import Augmenter, parse_augment  # noqa: E402
from etf.pipeline.extract.encoders import create_encoder  # noqa: E402
from etf.pipeline.extract.preprocess import decode_images, device_batch, jpeg_bytes  # noqa: E402
from etf.pipeline.extract.run import ExtractOptions, autocast_for, extract  # noqa: E402
from etf.pipeline.fit.config import FitConfig, FuserConfig  # noqa: E402
from etf.pipeline.fit.heads import parse_task  # noqa: E402
from etf.pipeline.fit.train import _Member, fit  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def disk_write_rate(work: Path, nbytes: int) -> float:
    """Bytes/s of a sequential write of ``nbytes`` to ``work``, flushed to the disk (fsync)."""
    block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
    path = work / "disk-probe"
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    written = path.stat().st_size
    path.unlink()
    return written / seconds


def bare_forward(encoder, x: torch.Tensor, batch: int, autocast) -> None:
    with torch.inference_mode(), autocast:
        for b in range(0, len(x), batch):
            encoder.model.forward_intermediates(
                x[b : b + batch], indices=[encoder.num_layers - 1], norm=True, output_fmt="NLC", intermediates_only=True
            )


def extraction(args: argparse.Namespace, device: torch.device, work: Path, data: Path) -> None:
    dataset = load_dataset(f"folder:{data}")
    encoder = create_encoder(args.model, pretrained=False)
    pre = encoder.preprocess
    tf = encoder.transform()
    x = torch.stack([tf(dataset.load_image(i)) for i in range(len(dataset))]).to(device)
    encoder.model.to(device).eval()
    autocast = autocast_for(args.precision, device)
    n = len(dataset)

    bare_forward(encoder, x, args.batch_size, autocast)  # warm-up: kernels chosen, memory pools grown
    forward = min(
        clock(lambda: bare_forward(encoder, x, args.batch_size, autocast), device) for _ in range(args.repeats)
    )
    x = None  # device memory back for the extractions

    runs: dict[tuple[str, str], float] = {}
    per_image: dict[str, int] = {}
    k = 0
    for tokens in ("all", "pool:1"):
        for decode in ("device", "cpu"):
            best = float("inf")
            for _ in range(args.repeats if decode == "device" else 1):
                k += 1
                opts = ExtractOptions(
                    batch_size=args.batch_size, precision=args.precision, device=str(device), progress=False,
                    tokens=tokens, decode=decode,
                )  # fmt: skip
                seconds = clock(lambda o=opts, k=k: extract(dataset, encoder, work / f"cache-{k}", o), device)
                best = min(best, seconds)
            runs[tokens, decode] = best
            store = next((work / f"cache-{k}").glob("*/*.zarr"))
            with TokenStore.open(store) as s:
                per_image[tokens] = s.chunk_bytes // s.chunk_rows
                assert s.spec.get("decode", "cpu") == decode, s.spec.get("decode")
            for old in range(k - (args.repeats if decode == "device" else 1) + 1, k + 1):
                _remove(work / f"cache-{old}")
    disk = disk_write_rate(work, max(1 << 30, n * per_image["all"]))

    images = [jpeg_bytes(s.path) for s in dataset.samples[:64]]
    on_device = device_batch(pre, decode_images(images, device)).cpu().int()
    u8 = pre.pil_transform
    on_cpu = torch.stack([u8(dataset.load_image(i)) for i in range(len(images))]).int()
    levels = (on_device - on_cpu).abs().float()
    rates = worker_rates(
        dataset, encoder, args.decode_workers, args.batch_size, pin=device.type == "cuda", n=args.decode_workers * 256
    )

    fwd = n / forward
    disk_img = disk / per_image["all"]
    print(f"\nextraction: {args.model}, {n} JPEG 250x250 -> 224 px, batch {args.batch_size}, {args.precision}")
    print(f"  bare forward_intermediates (preprocessed, on the device)  {fwd:9.1f} img/s  1.000")
    print(
        f"  disk write, fsync'd: {disk / 1e9:.2f} GB/s = {disk_img:.0f} img/s of --tokens all "
        f"({per_image['all'] / 1e3:.0f} kB/img); bound for --tokens all: {min(fwd, disk_img):.1f} img/s"
    )
    for (tokens, decode), seconds in runs.items():
        bound = min(fwd, disk_img) if tokens == "all" else fwd
        label = f"etf extract --tokens {tokens} --decode {decode}"
        print(
            f"  {label:<57} {n / seconds:9.1f} img/s  {n / seconds / fwd:.3f}  of the bound: {n / seconds / bound:.3f}"
        )
    print(
        f"  device decode vs PIL, uint8 levels over 64 images: mean {levels.mean():.2f}, "
        f"p99 {levels.flatten().quantile(0.99):.0f}, max {levels.max():.0f}"
    )
    print(
        f"  one of {args.decode_workers} decode workers: float32 batches {rates['float32']:.0f} img/s, "
        f"uint8 {rates['uint8']:.0f} img/s ({rates['uint8'] / rates['float32']:.2f}x)"
    )


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def bare_step_rate(spec: str, cache: Path, cfg: FitConfig, device: torch.device, steps: int) -> float:
    """Samples/s of the training step alone: one fit's model, optimiser and precision on
    random tokens and labels already on the device."""
    from etf.cache.features import PriorSet

    dataset = load_dataset(spec)
    priors = PriorSet(cache, dataset, cfg.encoders)
    priors.close()
    tasks = [parse_task(t, dataset) for t in cfg.tasks]
    b = cfg.batch_size
    targets = {}
    for task in tasks:
        y, m = task.targets(dataset)
        task.fit_stats(y, m)
        targets[task.name] = (torch.from_numpy(y[:b]).to(device), torch.from_numpy(m[:b]).to(device))
    member = _Member(cfg, priors.groups, tasks, steps, device, cfg.precision)
    tokens = [torch.randn(b, g.tokens, g.dim, device=device, dtype=torch.float16) for g in priors.groups]
    member.model.train()
    member.step(tokens, targets, tasks)
    seconds = clock(lambda: [member.step(tokens, targets, tasks) for _ in range(steps)], device)
    return steps * b / seconds


def fitting(args: argparse.Namespace, device: torch.device, work: Path) -> None:
    t, d = 197, 384
    spec, cache = make_store(work / "fit", args.fit_n, t, d, formats=("zarr",))
    size = args.fit_n * t * d * 2
    runs = {}
    for name, budget in (("tokens resident on the device", None), ("streamed, --max-memory 1/4", size // 4)):
        cfg = FitConfig(
            cache_dir=cache, encoders=["Pzarr"], out=work / f"run-{len(runs)}", tasks=["classify:label"],
            epochs=args.epochs, batch_size=args.fit_batch, fuser_config=FuserConfig(dim=128, depth=1, heads=4),
            max_memory=budget, device=str(device), precision=args.precision, progress=False,
        )  # fmt: skip
        metrics = fit(load_dataset(spec), cfg).metrics
        with open(cfg.out / "history.csv") as f:
            rates = [float(r["samples_per_s"]) for r in csv.DictReader(f)][1:] or [0.0]  # epoch 1 warms up
        runs[name] = (float(np.mean(rates)), metrics["streamed"])
    base = bare_step_rate(spec, cache, cfg, device, steps=max(10, args.fit_n // args.fit_batch))
    resident = runs["tokens resident on the device"][0]
    print(
        f"\nfit: etfuser (default formulation) over {args.fit_n} x {t} x {d} float16 ({size / 2**20:.0f} MiB), batch {args.fit_batch}, {args.precision}"
    )
    print(f"  bare training step (random tokens on the device)          {base:9.0f} samples/s  1.000")
    for name, (rate, streamed) in runs.items():
        flag = "" if streamed == ("stream" in name) else " (!)"
        print(f"  etf fit, {name:<48} {rate:9.0f} samples/s  {rate / base:.3f}{flag}")
    print(f"  streamed / resident: {runs['streamed, --max-memory 1/4'][0] / resident:.3f}")


def _grid(spec: str, cache: Path, out: Path, encoders: list[str], epochs: int, args, device) -> tuple[float, object]:
    settings = {
        "data": spec, "cache": cache, "out": out, "encoders": encoders, "fusers": "etfuser", "seeds": "0",
        "epochs": epochs, "batch_size": args.grid_batch, "device": str(device), "precision": args.precision,
        "test_split": "holdout:0.2", "tasks": ["classify:label"], "jobs": 1,
    }  # fmt: skip
    plan = plan_grid(Grid.from_settings(settings))
    outcome = []
    seconds = clock(lambda: outcome.append(run_grid(plan)), device)
    if outcome[0].failed or outcome[0].stopped:
        raise RuntimeError(f"grid runs failed: {outcome[0].stopped or outcome[0].failed[0][1]}")
    return seconds, plan


def _train_rows(plan) -> int:
    for p in plan.points:
        metrics = p.dir / "metrics.json"
        if metrics.exists():
            return int(json.loads(metrics.read_text())["splits"]["train"])
    raise RuntimeError("no run of the grid finished: nothing to compare")


def _online_rates(dataset, encoders: list[str], rows: int, args, device) -> tuple[dict[str, float], dict[str, float]]:
    """img/s per prior: the forward alone over preprocessed images on the device, and the
    realistic loop (DataLoader workers decode + ``face`` augmentation + transform, then
    the forward), each over ``rows`` images (the realistic one over at most
    ``--online-images``)."""
    autocast = autocast_for(args.precision, device)
    workers = max(1, (os.cpu_count() or 2) - 1) if device.type == "cuda" else 1

    class Augmented(torch.utils.data.Dataset):
        def __init__(self, tf, n: int) -> None:
            self.tf, self.n, self.aug = tf, n, Augmenter(parse_augment("face"), seed=1)

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> torch.Tensor:
            return self.tf(self.aug.view(dataset.load_image(i), dataset.ids[i], 1)[0])

    forward, realistic = {}, {}
    for name in encoders:
        enc = create_encoder(name, pretrained=False)
        tf, layers = enc.transform(), enc.resolve_layers(None)
        enc.model.to(device).eval()
        x = torch.stack([tf(dataset.load_image(i)) for i in range(min(len(dataset), args.grid_batch * 2))]).to(device)

        def epoch(x=x, enc=enc, layers=layers) -> None:
            with torch.inference_mode(), autocast:
                for b in range(0, rows, args.grid_batch):
                    k = (b // args.grid_batch) % 2
                    enc.tokens(x[k * args.grid_batch : (k + 1) * args.grid_batch][: rows - b], layers)

        epoch()
        forward[name] = rows / clock(epoch, device)
        n = min(len(dataset), args.online_images)
        loader = torch.utils.data.DataLoader(
            Augmented(tf, n), batch_size=args.grid_batch, num_workers=workers, pin_memory=device.type == "cuda",
            prefetch_factor=4,
        )  # fmt: skip

        def online(loader=loader, enc=enc, layers=layers) -> None:
            with torch.inference_mode(), autocast:
                for batch in loader:
                    enc.tokens(batch.to(device, non_blocking=True), layers)

        realistic[name] = n / clock(online, device)
        del x, enc
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return forward, realistic


def grids(args: argparse.Namespace, device: torch.device, work: Path, data: Path) -> None:
    spec = f"folder:{data}"
    dataset = load_dataset(spec)
    encoders = args.grid_encoders.split(",")
    cache = work / "grid-cache"

    def extract_all() -> None:
        for name in encoders:
            enc = create_encoder(name, pretrained=False)
            opts = ExtractOptions(
                batch_size=args.grid_batch, precision=args.precision, device=str(device), progress=False
            )
            assert extract(dataset, enc, cache, opts).complete

    once = clock(extract_all, device)
    grid, plan = _grid(spec, cache, work / "grid", encoders, args.grid_epochs, args, device)
    runs, rows = len(plan.points), _train_rows(plan)
    one, _ = _grid(spec, cache, work / "grid-1", encoders, 1, args, device)
    two, _ = _grid(spec, cache, work / "grid-2", encoders, 2, args, device)
    forward, realistic = _online_rates(dataset, encoders, rows, args, device)
    priors = [p.config.encoders for p in plan.points]
    lower = sum(args.grid_epochs * rows / forward[e] for ps in priors for e in ps) + grid
    real = sum(args.grid_epochs * rows / realistic[e] for ps in priors for e in ps) + grid
    cached = once + grid

    print(
        f"\ngrid: every subset of {', '.join(encoders)} with etfuser + linear baselines ({runs} runs), "
        f"{args.grid_epochs} epochs, {len(dataset)} images ({rows} training rows), {args.precision}"
    )
    print(f"  cached: extract once {once:.1f} s + grid {grid:.1f} s ({grid / runs:.2f} s/run) = {cached:.1f} s")
    for name in encoders:
        print(
            f"  {name}: forward {forward[name]:.0f} img/s; realistic online loop {realistic[name]:.0f} img/s "
            f"({max(1, (os.cpu_count() or 2) - 1) if device.type == 'cuda' else 1} workers, face augmentation)"
        )
    print(
        f"  online, forward only (lower bound): {lower:.1f} s   ratio online / cached {lower / cached:.2f}x (goal 10x)"
    )
    print(f"  online, realistic loop:             {real:.1f} s   ratio online / cached {real / cached:.2f}x (goal 20x)")
    print(
        f"  fixed cost per run: grids of 1 and 2 epochs {one:.1f} s and {two:.1f} s -> "
        f"(2 T1 - T2) / runs = {(2 * one - two) / runs:.2f} s (goal <= 0.3 s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--decode-workers", type=int, default=4, help="workers of the uint8/float32 figure")
    ap.add_argument("--fit-n", type=int, default=16384)
    ap.add_argument("--fit-batch", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--grid-encoders", default="vit_base_patch16_224,convnext_base,resnet50")
    ap.add_argument("--grid-images", type=int, default=4096)
    ap.add_argument("--grid-epochs", type=int, default=10)
    ap.add_argument("--grid-batch", type=int, default=256)
    ap.add_argument("--online-images", type=int, default=2048, help="images of each realistic online epoch timed")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: extract, fit, grid")
    args = ap.parse_args()
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}; {os.cpu_count()} cores; torch {torch.__version__}; random-init weights, synthetic data", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="etf-bench-gpu-") as tmp:
        work = Path(tmp)
        data = make_faces(work / "faces", args.images)
        grid_data = data if args.grid_images == args.images else make_faces(work / "grid-faces", args.grid_images)
        for part, fn in (
            ("extract", lambda: extraction(args, device, work, data)),
            ("fit", lambda: fitting(args, device, work)),
            ("grid", lambda: grids(args, device, work, grid_data)),
        ):
            if part not in skip:
                t = time.perf_counter()
                fn()
                print(f"  ({part}: {time.perf_counter() - t:.0f} s)", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
