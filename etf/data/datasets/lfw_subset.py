"""``lfw-subset``: the 200 real 25x25 LFW crops that scikit-image ships (100 faces, 100 non-faces).

Written out as PNG files with a ``manifest.csv`` on first use, so it goes through the same
path as any on-disk dataset. Splits are fixed and stratified: 60/20/20 per class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from etf.data.base import Dataset, register_dataset
from etf.data.datasets._common import data_home
from etf.data.datasets.csvfile import load_csv
from etf.utils import atomic_path


def _materialise(root: Path) -> Path:
    manifest = root / "manifest.csv"
    if manifest.exists():
        return manifest
    from skimage.data import lfw_subset

    images = lfw_subset()  # (200, 25, 25) float in [0, 1]; the first 100 are faces
    rng = np.random.default_rng(0)
    lines = ["path,split,face"]
    for label, offset in ((1, 0), (0, 100)):
        order = rng.permutation(100)
        split = np.empty(100, dtype=object)
        split[order[:60]], split[order[60:80]], split[order[80:]] = "train", "val", "test"
        for k in range(100):
            rel = f"{'face' if label else 'nonface'}/{offset + k:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            pixels = np.round(images[offset + k] * 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / rel)
            lines.append(f"{rel},{split[k]},{label}")
    with atomic_path(manifest) as tmp:  # written last: its presence means the images are complete
        tmp.write_text("\n".join(lines) + "\n")
    return manifest


@register_dataset(
    "lfw-subset",
    description="200 real LFW crops from scikit-image (face vs non-face), embedded and offline",
    layout="(embedded; written to $ETF_DATA_HOME/lfw-subset on first use)",
    tasks=("classify:face",),
    metric="accuracy",
    embedded=True,
)
def load_lfw_subset() -> Dataset:
    root = data_home() / "lfw-subset"
    dataset = load_csv(_materialise(root))
    dataset.name = "lfw-subset"
    dataset.root = root
    dataset.classes = {"face": ["non-face", "face"]}
    return dataset
