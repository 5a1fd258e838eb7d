"""Augmented views in the cache: bytes a streamed epoch reads, and what views do for accuracy.

    python bench/views.py [--views 4] [--epochs 30] [--n 120]

1. Bytes: the same streamed fit (a --max-memory far below the tokens) from a store without
   views and from a K-view store of the same images; the bytes of tokens each epoch reads
   (counted at the store's read, ``TokenStore.read_layers``), and their ratio (target 1.0:
   one view of each block per epoch, whatever K).
2. Accuracy: a fixture where augmentation matters. Synthetic faces (five coloured dots:
   eyes, nose, mouth corners) with 5-point landmark labels; train and val hold upright faces
   at one place, test holds the same kind of faces mirrored (labels mirrored and relabelled
   by the 5-point map) and shifted. One random-init ViT, extracted once with K views of
   ``flip,shift`` (plus a clean store); test NME of ``--views clean``, ``--views random``,
   ``--feature-aug`` alone and both, each over 3 seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import etf.cache.store  # noqa: E402
from etf.data import load_dataset  # noqa: E402
from etf.data.geometry import MIRROR_5  # noqa: E402
from etf.pipeline.extract.encoders import create_encoder  # noqa: E402
from etf.pipeline.extract.run import ExtractOptions, extract  # noqa: E402
from etf.pipeline.fit.config import FitConfig, FuserConfig  # noqa: E402
from etf.pipeline.fit.train import fit  # noqa: E402

SIZE = 64
FACE = np.array([[22.0, 26.0], [42.0, 26.0], [32.0, 36.0], [24.0, 46.0], [40.0, 46.0]])
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255]])
AUGMENT = "flip:0.5,shift:0.15"
ENCODER = "vit_tiny_patch16_224"


def face(points: np.ndarray, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    a = rng.integers(0, 60, (SIZE, SIZE, 3)).astype(np.uint8)
    for (x, y), c in zip(points, COLOURS):
        a[(xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= 3.5**2] = c
    return Image.fromarray(a)


def make_fixture(root: Path, n: int) -> object:
    """n train, n/4 val (upright, in place), n/2 test (mirrored and shifted) dot faces."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    lines = ["path,split," + ",".join(f"lm{k}_x,lm{k}_y" for k in range(5)) + ",nme_norm"]
    for i, split in enumerate(["train"] * n + ["val"] * (n // 4) + ["test"] * (n // 2)):
        pts = FACE + rng.uniform(-2, 2, FACE.shape)
        image_pts = pts
        if split == "test":
            shift = rng.uniform(-9, 9, 2)
            image_pts = pts + shift
            if i % 2:  # mirrored: the dots swap sides, the labels follow the mirror map
                image_pts = np.c_[SIZE - image_pts[:, 0], image_pts[:, 1]]
        face(image_pts, rng).save(root / "img" / f"{i}.png")
        labels = image_pts[list(MIRROR_5)] if split == "test" and i % 2 else image_pts
        cells = ",".join(f"{v:.3f}" for v in labels.ravel())
        lines.append(f"img/{i}.png,{split},{cells},{np.hypot(*(labels[0] - labels[1])):.3f}")
    (root / "d.csv").write_text("\n".join(lines) + "\n")
    return dataclasses.replace(load_dataset(f"csv:{root / 'd.csv'}"), mirrors={"lm": MIRROR_5})


class CountedReads:
    """Bytes of tokens the stores hand out, counted at ``TokenStore.read_layers``."""

    def __init__(self) -> None:
        self.bytes = 0
        real = etf.cache.store.TokenStore.read_layers

        def counted(store, *args, **kwargs):
            out = real(store, *args, **kwargs)
            self.bytes += sum(a.nbytes for a in out.values())
            return out

        etf.cache.store.TokenStore.read_layers = counted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--n", type=int, default=120, help="training faces")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="etf-bench-views-"))
    dataset = make_fixture(root / "data", args.n)
    encoder = create_encoder(ENCODER, pretrained=False, img_size=SIZE)
    opts = ExtractOptions(progress=False, chunk_rows=16)
    t0 = time.perf_counter()
    extract(dataset, encoder, root / "clean", opts)
    clean_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    extract(dataset, encoder, root / "views", dataclasses.replace(opts, views=args.views, augment=AUGMENT))
    views_s = time.perf_counter() - t0
    print(f"{len(dataset)} images at {SIZE} px: extract clean {clean_s:.1f} s, {args.views} views {views_s:.1f} s")

    base = dict(encoders=[ENCODER], tasks=["landmarks:lm"], fuser="concat", progress=False, batch_size=32)
    base |= dict(fuser_config=FuserConfig(dim=128), lr=2e-3)
    counter = CountedReads()
    read = {}
    for name in ("clean", "views"):
        counter.bytes = 0
        cfg = FitConfig(cache_dir=root / name, out=root / f"bytes-{name}", epochs=2, max_memory=1 << 16, **base)
        res = fit(dataset, cfg)
        assert res.metrics["streamed"]
        read[name] = counter.bytes
    print(
        f"streamed fit, 2 epochs (train reads + val/test evaluation): {read['clean'] / 2**20:.2f} MiB from the clean "
        f"store, {read['views'] / 2**20:.2f} MiB from the {args.views}-view store: ratio {read['views'] / read['clean']:.3f}"
    )

    print(f"test NME (mirrored and shifted faces), {args.epochs} epochs, mean over seeds 0-2:")
    for label, cache, extra in (
        ("clean cache", "clean", {}),
        (f"--views clean ({args.views}-view cache)", "views", {"views": "clean"}),
        ("--views random", "views", {}),
        ("--feature-aug drop:0.1,scale:0.1,noise:0.1", "clean", {"feature_aug": "drop:0.1,scale:0.1,noise:0.1"}),
        ("--views random + --feature-aug", "views", {"feature_aug": "drop:0.1,scale:0.1,noise:0.1"}),
    ):
        nme, seconds = [], 0.0
        for seed in range(3):
            out = root / f"fit-{cache}-{len(extra)}-{extra.get('views', '')}-{seed}"
            cfg = FitConfig(cache_dir=root / cache, out=out, epochs=args.epochs, seed=seed, **base, **extra)
            res = fit(dataset, cfg)
            nme.append(res.metrics["test"]["lm"]["nme"])
            seconds += res.metrics["seconds"]
        print(f"  {label:<44} NME {np.mean(nme):.4f} (+- {np.std(nme):.4f})   fit {seconds / 3:.1f} s")


if __name__ == "__main__":
    main()
