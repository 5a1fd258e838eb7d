"""GPU figures, each beside a baseline from the same run (``bench/gpu.sh`` runs this unattended).

1. Extraction: ``etf extract`` end to end (JPEG files, decode workers, preprocessing,
   forward under autocast, token selection, chunked Zarr writes, publication) against the
   bare ``forward_intermediates`` of the same model over the same images already
   preprocessed on the device, same batch size and precision.
2. Fit: samples/s of ``etf fit`` training epochs with the tokens resident on the device and
   streamed from the store (``--max-memory`` a quarter of it), against the bare training
   step (the same model, optimiser and precision on random tokens already on the device).

Random-init weights and synthetic images made here; nothing is downloaded.

    python bench/gpu.py                      # the defaults bench/gpu.sh uses
    python bench/gpu.py --device cpu --images 64 --batch-size 16 --fit-n 512 --model vit_tiny_patch16_224
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.extract import make_faces  # noqa: E402
from bench.fit import make_store  # noqa: E402
from etf.data import load_dataset  # noqa: E402
from etf.pipeline.extract.encoders import create_encoder  # noqa: E402
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


def extraction(args: argparse.Namespace, device: torch.device, work: Path) -> None:
    data = make_faces(work / "faces", args.images)
    dataset = load_dataset(f"folder:{data}")
    encoder = create_encoder(args.model, pretrained=False)
    tf = encoder.transform()
    x = torch.stack([tf(dataset.load_image(i)) for i in range(len(dataset))]).to(device)
    encoder.model.to(device).eval()
    autocast = autocast_for(args.precision, device)
    last = [encoder.num_layers - 1]

    def bare() -> None:
        with torch.inference_mode(), autocast:
            for b in range(0, len(x), args.batch_size):
                encoder.model.forward_intermediates(
                    x[b : b + args.batch_size], indices=last, norm=True, output_fmt="NLC", intermediates_only=True
                )

    def run(k: int) -> None:
        opts = ExtractOptions(batch_size=args.batch_size, precision=args.precision, device=str(device), progress=False)
        assert extract(dataset, encoder, work / f"cache-{k}", opts).complete

    bare()  # warm-up: kernels chosen, memory pools grown
    forward = min(clock(bare, device) for _ in range(args.repeats))
    run(0)
    ext = min(clock(lambda k=k: run(k), device) for k in range(1, args.repeats + 1))
    n = len(dataset)
    print(f"\nextraction: {args.model}, {n} JPEG 250x250 -> 224 px, batch {args.batch_size}, {args.precision}")
    print(f"  bare forward_intermediates (preprocessed, on the device)  {n / forward:9.1f} img/s  1.000")
    print(f"  etf extract, end to end                                   {n / ext:9.1f} img/s  {forward / ext:.3f}")


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
    print(
        f"\nfit: etfuser (default formulation) over {args.fit_n} x {t} x {d} float16 ({size / 2**20:.0f} MiB), batch {args.fit_batch}, {args.precision}"
    )
    print(f"  bare training step (random tokens on the device)          {base:9.0f} samples/s  1.000")
    for name, (rate, streamed) in runs.items():
        print(
            f"  etf fit, {name:<48} {rate:9.0f} samples/s  {rate / base:.3f}{'' if streamed == ('stream' in name) else ' (!)'}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--fit-n", type=int, default=16384)
    ap.add_argument("--fit-batch", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}; torch {torch.__version__}; random-init weights, synthetic data")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="etf-bench-gpu-") as tmp:
        extraction(args, device, Path(tmp))
        fitting(args, device, Path(tmp))
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
