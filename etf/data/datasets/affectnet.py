"""``affectnet:ROOT``: AffectNet's manually annotated set; 7 or 8 expressions, valence, arousal.

Files as distributed: ``training.csv`` and ``validation.csv`` (in ``ROOT`` or
``ROOT/Manually_Annotated_file_lists/``), columns ``subDirectory_filePath, face_x, face_y,
face_width, face_height, facial_landmarks, expression, valence, arousal``; a file without
the header row (some copies of ``validation.csv``) is read in that order. Images under
``ROOT/Manually_Annotated_Images/`` (or ``ROOT/Manually_Annotated/Manually_Annotated_Images/``).

Protocol: the validation set is the test set (AffectNet's test set is not public). Train
is the whole training set by default, as in the literature; ``val`` holds out a seeded
fraction of it. Expression codes 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust,
6 Anger, 7 Contempt, 8 None, 9 Uncertain, 10 No-Face: rows with 8, 9, 10 are dropped, and
7 too when ``classes=7``; codes 0..6 (0..7) are the class indices. ``valence`` and
``arousal`` are regression columns; -2 (invalid) becomes missing. The face box becomes
``meta["box"]`` and the 68 landmarks ``meta["landmarks5"]`` (for ``--crop``).
"""

from __future__ import annotations

from pathlib import Path

from etf.data.base import Dataset, MetaSource, Sample, register_dataset
from etf.data.datasets._common import (
    FIVE_FROM_68,
    annotation_error,
    csv_rows,
    find,
    five_points,
    hold_out,
    numbers,
    points_array,
)
from etf.errors import EtfError

CLASSES = ["Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt"]
COLUMNS = [
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
]
INVALID = -2.0


@register_dataset(
    "affectnet",
    description="AffectNet manually annotated: 7 (or 8) expressions, valence/arousal; validation = test",
    layout="ROOT/{training,validation}.csv (or in Manually_Annotated_file_lists/), ROOT/Manually_Annotated_Images/",
    tasks=("classify:expression",),
    metric="accuracy",
)
def load_affectnet(root: Path, classes: int = 7, val: float = 0.0, seed: int = 0) -> Dataset:
    if classes not in (7, 8):
        raise EtfError(f"affectnet:{root}: classes={classes}; use 7 or 8 (8 adds contempt)")
    lists = ["", "Manually_Annotated_file_lists/"]
    images = find(
        root, ["Manually_Annotated_Images", "Manually_Annotated/Manually_Annotated_Images"], "image folder", "affectnet"
    )
    samples = []
    for name, split in (("training.csv", "train"), ("validation.csv", "test")):
        samples += _read(find(root, [p + name for p in lists], name, "affectnet"), images, split, classes)
    samples = hold_out(samples, val, seed, f"affectnet:{root}")
    sources = {
        "box": MetaSource("AffectNet's face box (face_x, face_y, face_width, face_height)"),
        "landmarks5": MetaSource("five points of AffectNet's 68 facial_landmarks"),
    }
    return Dataset("affectnet", root, samples, classes={"expression": CLASSES[:classes]}, meta_sources=sources)


def _read(path: Path, images: Path, split: str, classes: int) -> list[Sample]:
    rows = csv_rows(path)
    start = 2 if rows and rows[0][:1] == COLUMNS[:1] else 1
    if start == 2 and rows[0] != COLUMNS:
        raise annotation_error(path, 1, f"expected header {','.join(COLUMNS)}")
    samples = []
    for line, row in enumerate(rows[start - 1 :], start=start):
        if not row:
            continue
        if len(row) != len(COLUMNS):
            raise annotation_error(path, line, f"expected {len(COLUMNS)} columns ({','.join(COLUMNS)}), got {len(row)}")
        x, y, w, h = numbers(row[1:5], path, line)
        (code,) = numbers(row[6:7], path, line, int)
        valence, arousal = numbers(row[7:9], path, line)
        if not 0 <= code <= 10:
            raise annotation_error(path, line, f"expression {code} is outside 0..10")
        if code >= classes:
            continue
        meta = {"box": [x, y, x + w, y + h]}
        if row[5].strip():
            coords = numbers(row[5].strip().strip(";").split(";"), path, line)
            meta["landmarks5"] = five_points(points_array(coords, path, line, 68), FIVE_FROM_68)
        labels = {
            "expression": code,
            "valence": None if valence == INVALID else valence,
            "arousal": None if arousal == INVALID else arousal,
        }
        samples.append(Sample(row[0], images / row[0], split, labels, meta))
    return samples
