"""``rafdb:ROOT``: RAF-DB basic emotion set, 7 classes, its official train/test partition.

``EmoLabel/list_patition_label.txt`` (the official spelling) holds ``train_00001.jpg 5``;
the prefix gives the split, the label 1..7 maps to class index 0..6 in RAF-DB's order
(Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral), so label 4 is Happiness.
Images: ``Image/aligned/<stem>_aligned.jpg`` (100x100, already aligned: the default) or
``Image/original/<stem>.jpg`` with ``aligned=false``. For original images the five manual
landmarks of ``Annotation/manual/<stem>_manu_attri.txt`` (assumed: its first five lines
are ``x y`` for the eyes, nose and mouth corners, as distributed) become
``meta["landmarks5"]``, so ``--crop align5`` works. RAF-DB has no val split: ``val``
moves a seeded fraction of train there.
"""

from __future__ import annotations

import re
from pathlib import Path

from etf.data.base import Dataset, MetaSource, Sample, register_dataset
from etf.data.datasets._common import annotation_error, find, hold_out, numbers, read_rows

CLASSES = ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]
LIST = "EmoLabel/list_patition_label.txt"
_NAME = re.compile(r"^(train|test)_\d+\.jpg$")


@register_dataset(
    "rafdb",
    description="RAF-DB basic expressions (7 classes), official train/test",
    layout="ROOT/EmoLabel/list_patition_label.txt, ROOT/Image/aligned/*_aligned.jpg (or Image/original/)",
    tasks=("classify:expression",),
    metric="accuracy",
)
def load_rafdb(root: Path, aligned: bool = True, val: float = 0.0, seed: int = 0) -> Dataset:
    labels_file = find(root, [LIST], "label list", "rafdb")
    images = find(root, ["Image/aligned" if aligned else "Image/original"], "image folder", "rafdb")
    samples = []
    for line, fields in read_rows(labels_file):
        if len(fields) != 2 or not _NAME.match(fields[0]):
            raise annotation_error(labels_file, line, f"expected 'train_00001.jpg LABEL', got {' '.join(fields)!r}")
        (label,) = numbers(fields[1:], labels_file, line, int)
        if not 1 <= label <= len(CLASSES):
            raise annotation_error(labels_file, line, f"label {label} is outside 1..{len(CLASSES)}")
        stem = fields[0][:-4]
        path = images / (f"{stem}_aligned.jpg" if aligned else fields[0])
        meta = {} if aligned else _landmarks5(root / "Annotation" / "manual" / f"{stem}_manu_attri.txt")
        split = stem.split("_")[0]
        samples.append(Sample(path.relative_to(root).as_posix(), path, split, {"expression": label - 1}, meta))
    samples = hold_out(samples, val, seed, f"rafdb:{root}")
    sources = {"landmarks5": MetaSource("RAF-DB's manual five landmarks (Annotation/manual)")}
    return Dataset("rafdb", root, samples, classes={"expression": list(CLASSES)}, meta_sources=sources)


def _landmarks5(path: Path) -> dict[str, list[list[float]]]:
    if not path.is_file():
        return {}
    rows = read_rows(path)[:5]
    if len(rows) < 5 or any(len(f) != 2 for _, f in rows):
        raise annotation_error(path, rows[-1][0] if rows else 1, "expected five 'x y' landmark lines first")
    return {"landmarks5": [numbers(f, path, n) for n, f in rows]}
