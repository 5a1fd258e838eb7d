"""The authors' ET-Fuser over three ViT-B-sized priors: its cost at canonical inference
against one ViT-B forward, and its fit throughput next to the token-level model's.

    python bench/paper_fuser.py [--n 512] [--epochs 3] [--batch-size 64]

1. FLOPs, counted by torch's FlopCounterMode in this run: one forward of a random-init
   ViT-B/16 (``vit_base_patch16_224``) at 224 px, and one sample through the fused model
   (fuser and a classification head) of three priors of ViT-B's shape (a class token and a
   14x14 grid of width 768), under ``--infer canonical`` (the knowledge token and the
   canonical token only: the paper's one-backbone inference) and ``--infer all``. The
   paper's model must cost at most 1% of the ViT-B forward at canonical inference.
2. Throughput: the same fit (same cache, seed, splits and batches, tokens in memory) of
   the paper's model (the defaults: pooled tokens at width 768, depth 1, 4 heads, t added
   over the canonical grid) and of the token-level model (``--prior-tokens all --fuse
   gate --head pooled``, dim 256, depth 1): training samples/s of each.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from etf.cache.importer import import_tokens  # noqa: E402
from etf.data import load_dataset  # noqa: E402
from etf.pipeline.fit.fusers import FuserConfig  # noqa: E402
from etf.pipeline.fit.train import FitConfig, fit  # noqa: E402
from tests.synthetic import make_csv_dataset, planted_tokens, standard_splits  # noqa: E402

PRIORS, TOKENS, WIDTH = ("P1", "P2", "P3"), 197, 768
MODELS = {
    "paper (pooled, add)": FuserConfig(),
    "token-level (all, gate)": FuserConfig(dim=256, depth=1, prior_tokens="all", fuse="gate", head="pooled"),
}


def vit_b_flops() -> int:
    """Forward FLOPs of one 224 px image through a random-init ViT-B/16 (multiply-add = 2)."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 224, 224))
    return int(counter.get_total_flops())


def make_cache(tmp: Path, n: int) -> tuple[str, Path]:
    """A labelled dataset of ``n`` samples and three stores of (197, 768) float16 tokens;
    the label is planted (weakly) in every prior."""
    rng = np.random.default_rng(0)
    s = rng.choice([-1.0, 1.0], n)
    dataset, spec = make_csv_dataset(tmp / "data", {"label": (s > 0).astype(float)}, standard_splits(n))
    cache = tmp / "cache"
    for name in PRIORS:
        tokens = rng.normal(size=(n, TOKENS, WIDTH)).astype(np.float16)
        tokens[:, :, :16] += planted_tokens(rng, s, 1.0)[:, :1, :].astype(np.float16)
        np.save(tmp / f"{name}.npy", tokens)
        import_tokens(cache, dataset, name, tmp / f"{name}.npy")
        (tmp / f"{name}.npy").unlink()
    return spec, cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    vit = vit_b_flops()
    print(f"ViT-B/16 forward at 224 px: {vit / 1e9:.2f} GFLOPs")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec, cache = make_cache(tmp, args.n)
        print(f"cache: {len(PRIORS)} priors x {args.n} samples x {TOKENS} x {WIDTH} float16")
        rows = []
        for name, fuser_config in MODELS.items():
            out = tmp / name.split()[0]
            cfg = FitConfig(
                cache_dir=cache,
                encoders=list(PRIORS),
                out=out,
                tasks=["classify:label"],
                epochs=args.epochs,
                batch_size=args.batch_size,
                fuser_config=fuser_config,
                progress=False,
            )
            m = fit(load_dataset(spec), cfg).metrics
            with open(out / "history.csv") as f:
                rates = [float(r["samples_per_s"]) for r in csv.DictReader(f)]
            rows.append((name, m, float(np.mean(rates[1:] or rates))))
        print()
        print("| model | parameters | MFLOPs, canonical | % of ViT-B | MFLOPs, all priors | fit samples/s |")
        print("|---|---|---|---|---|---|")
        for name, m, sps in rows:
            print(
                f"| {name} | {m['fuser_params'] / 1e6:.2f} M | {m['fuser_flops_canonical'] / 1e6:.2f} | "
                f"{100 * m['fuser_flops_canonical'] / vit:.3f}% | {m['fuser_flops'] / 1e6:.2f} | {sps:.0f} |"
            )
        paper = rows[0][1]["fuser_flops_canonical"] / vit
        print(
            f"\nthe paper's fuser at canonical inference: {100 * paper:.3f}% of one ViT-B forward "
            f"(target <= 1%: {'met' if paper <= 0.01 else 'NOT met'}); fit throughput paper / token-level: "
            f"{rows[0][2] / rows[1][2]:.2f}"
        )


if __name__ == "__main__":
    main()
