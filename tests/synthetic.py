"""Synthetic caches: label information planted in prior tokens, imported with cache import.

The images exist only so the dataset is a real ``csv:`` dataset; the tokens are made
here and imported, so the tests control exactly which prior knows what.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from etf.cache.importer import import_tokens
from etf.data import Dataset, load_dataset

T, D = 5, 16  # one class token + a 2x2 patch grid


def make_csv_dataset(root: Path, labels: dict[str, np.ndarray], splits: np.ndarray) -> tuple[Dataset, str]:
    """N tiny images and a CSV with one column per label (NaN -> empty cell = missing)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    n = len(splits)
    pixel = np.zeros((4, 4), np.uint8)
    lines = ["path,split," + ",".join(labels)]
    for i in range(n):
        Image.fromarray(pixel + i % 255, "L").save(root / "img" / f"{i:04d}.png")
        cells = [
            "" if np.isnan(v[i]) else (str(int(v[i])) if float(v[i]).is_integer() else f"{v[i]:.6f}")
            for v in labels.values()
        ]
        lines.append(f"img/{i:04d}.png,{splits[i]}," + ",".join(cells))
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    spec = f"csv:{root / 'data.csv'}"
    return load_dataset(spec), spec


def standard_splits(n: int) -> np.ndarray:
    return np.array(["train"] * (n * 6 // 10) + ["val"] * (n * 2 // 10) + ["test"] * (n - n * 6 // 10 - n * 2 // 10))


def planted_tokens(rng: np.random.Generator, signal: np.ndarray, strength: float, noise: float = 1.0) -> np.ndarray:
    """(N, T, D) noise with ``signal`` (N,) in {-1, +1} written along a fixed random direction
    into every token."""
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    x = rng.normal(scale=noise, size=(len(signal), T, D))
    return (x + strength * signal[:, None, None] * direction).astype(np.float32)


def import_prior(
    cache: Path, dataset: Dataset, name: str, tokens: np.ndarray, tmp: Path, pool: str | None = "avg"
) -> Path:
    """``tokens`` as the store ``name``. :func:`planted_tokens` carry their signal in every
    token, so by default the prior states the patch mean as its pooling (the less noisy
    summary); ``pool=None`` leaves it to the import's default (the class token)."""
    path = tmp / f"{name}.npy"
    np.save(path, tokens)
    return import_tokens(cache, dataset, name, path, pool=pool)


def xor_cache(tmp: Path, n: int = 500, seed: int = 0) -> tuple[Dataset, str, Path]:
    """label = a XOR b; prior A knows only a, prior B only b: neither alone can do better
    than chance, together they can do it perfectly."""
    rng = np.random.default_rng(seed)
    a, b = rng.choice([-1.0, 1.0], n), rng.choice([-1.0, 1.0], n)
    label = (a != b).astype(float)
    dataset, spec = make_csv_dataset(tmp / "xor", {"label": label}, standard_splits(n))
    cache = tmp / "cache"
    import_prior(cache, dataset, "A", planted_tokens(rng, a, 3.0), tmp)
    import_prior(cache, dataset, "B", planted_tokens(rng, b, 3.0), tmp)
    return dataset, spec, cache
