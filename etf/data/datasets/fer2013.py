"""``fer2013:ROOT``: FER2013 (Kaggle/ICML 2013), 7 expressions on 48x48 grayscale faces.

``ROOT`` is ``fer2013.csv`` or a folder holding it (also ``ROOT/fer2013/fer2013.csv``, as
the Kaggle archive unpacks), columns ``emotion,pixels,Usage``. ``Usage`` gives the split:
Training -> train, PublicTest -> val, PrivateTest -> test (the usual protocol). Emotion
codes 0..6 are the class indices (Angry, Disgust, Fear, Happy, Sad, Surprise, Neutral).

The pixels live in the CSV, so they are written out once as PNG files under
``$ETF_DATA_HOME/fer2013/<sha256 of the CSV>/`` (a read-only dataset folder stays
untouched), ``complete.json`` written last so an interrupted write is redone. Sample ids
are ``fer0000000.png`` by row, the names FER+ gives the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from etf.data.base import Dataset, Sample, register_dataset
from etf.data.datasets._common import annotation_error, csv_rows, data_home, find
from etf.errors import EtfError
from etf.utils import atomic_path, sha256_file

CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
HEADER = ["emotion", "pixels", "Usage"]
SIDE = 48


def locate_csv(root: Path, fmt: str) -> Path:
    return root if root.is_file() else find(root, ["fer2013.csv", "fer2013/fer2013.csv"], "fer2013.csv", fmt)


def read_fer2013(path: Path) -> list[tuple[int, str, str]]:
    """(emotion, Usage, pixels) per row, checked; an error names the first bad line."""
    rows = csv_rows(path)
    if not rows or rows[0] != HEADER:
        raise annotation_error(path, 1, f"expected header {','.join(HEADER)}")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 3:
            raise annotation_error(path, line, f"expected 3 columns ({','.join(HEADER)}), got {len(row)}")
        emotion, pixels, usage = row
        if emotion not in {str(i) for i in range(len(CLASSES))}:
            raise annotation_error(path, line, f"emotion {emotion!r} is not one of 0..{len(CLASSES) - 1}")
        if usage not in USAGE:
            raise annotation_error(path, line, f"Usage {usage!r} is not one of {', '.join(USAGE)}")
        out.append((int(emotion), USAGE[usage], pixels))
    return out


def image_name(row: int) -> str:
    return f"fer{row:07d}.png"


def pixel_images(path: Path, rows: list[tuple[int, str, str]]) -> Path:
    """The folder of one PNG per CSV row, written on first use."""
    folder = data_home() / "fer2013" / sha256_file(path)[:16]
    marker = folder / "complete.json"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, (_, _, pixels) in enumerate(rows):
        try:
            values = np.array(pixels.split(), dtype=np.int64)
        except ValueError:
            values = np.array([-1])
        if values.size != SIDE * SIDE or values.min() < 0 or values.max() > 255:
            raise annotation_error(path, i + 2, f"pixels must be {SIDE * SIDE} integers in 0..255 separated by spaces")
        Image.fromarray(values.astype(np.uint8).reshape(SIDE, SIDE), "L").save(folder / image_name(i))
    with atomic_path(marker) as tmp:  # written last: its presence means every image is there
        tmp.write_text(json.dumps({"source": str(path), "images": len(rows)}) + "\n")
    return folder


@register_dataset(
    "fer2013",
    description="FER2013, 7 expressions, 48x48 grayscale; Training/PublicTest/PrivateTest = train/val/test",
    layout="ROOT/fer2013.csv (emotion,pixels,Usage); images written once under $ETF_DATA_HOME/fer2013/",
    tasks=("classify:expression",),
    metric="accuracy",
)
def load_fer2013(root: Path) -> Dataset:
    path = locate_csv(root, "fer2013")
    rows = read_fer2013(path)
    if not rows:
        raise EtfError(f"fer2013:{path}: no rows")
    folder = pixel_images(path, rows)
    samples = [
        Sample(image_name(i), folder / image_name(i), split, {"expression": emotion})
        for i, (emotion, split, _) in enumerate(rows)
    ]
    return Dataset("fer2013", root, samples, classes={"expression": list(CLASSES)})
