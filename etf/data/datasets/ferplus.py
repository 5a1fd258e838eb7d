"""``ferplus:ROOT``: FER+ relabelling of FER2013, 8 expressions from 10 annotators' votes.

Layout (the one the FER+ repository documents): ``ROOT/fer2013new.csv`` next to the
original ``ROOT/fer2013.csv`` (or ``ROOT/fer2013/fer2013.csv``); row i of one is row i of
the other, and the pixels come from ``fer2013.csv``, written out once as for ``fer2013``
(the FER2013Train/Valid/Test PNG folders are not read). Columns: ``Usage, Image name,
neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF``;
``Usage`` gives train/val/test as for FER2013; rows with an empty image name (not faces
per FER+) are left out.

Label resolution (``vote``): ``majority`` (default) is the FER+ reference code's rule:
single votes are discarded as outliers, then the top column must hold more than half of
the remaining votes. ``plurality`` takes the top column (ties to the first, in column
order). Either way the label is the winning emotion's index 0..7, and a row is dropped when
the winner is ``unknown`` or ``NF``, no column wins, or there are no votes.
"""

from __future__ import annotations

from pathlib import Path

from etf.data.base import Dataset, Sample, register_dataset
from etf.data.datasets._common import annotation_error, csv_rows, find, numbers
from etf.data.datasets.fer2013 import USAGE, image_name, locate_csv, pixel_images, read_fer2013
from etf.errors import EtfError

CLASSES = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]
HEADER = ["Usage", "Image name", *CLASSES, "unknown", "NF"]
VOTES = ("majority", "plurality")


def resolve(votes: list[int], vote: str = "majority") -> int | None:
    """The winning emotion's index (0..7), or None when the row has no usable label."""
    if vote == "majority":
        votes = [v if v > 1 else 0 for v in votes]
    total, top = sum(votes), max(votes)
    if total == 0 or (vote == "majority" and 2 * top <= total):
        return None
    winner = votes.index(top)
    return winner if winner < len(CLASSES) else None


@register_dataset(
    "ferplus",
    description="FER+ (FER2013 relabelled by 10 voters), 8 expressions; Training/PublicTest/PrivateTest",
    layout="ROOT/fer2013new.csv and ROOT/fer2013.csv (the original pixels)",
    tasks=("classify:expression",),
    metric="accuracy",
)
def load_ferplus(root: Path, vote: str = "majority") -> Dataset:
    if vote not in VOTES:
        raise EtfError(f"ferplus:{root}: vote={vote!r}; use {' or '.join(VOTES)}")
    votes_file = find(root, ["fer2013new.csv"], "FER+ votes file", "ferplus")
    pixels_file = locate_csv(root, "ferplus")
    rows = csv_rows(votes_file)
    if not rows or [c.strip() for c in rows[0]] != HEADER:
        raise annotation_error(votes_file, 1, f"expected header {','.join(HEADER)}")
    fer = read_fer2013(pixels_file)
    if len(rows) - 1 != len(fer):
        raise EtfError(
            f"ferplus:{root}: {votes_file.name} has {len(rows) - 1} rows but {pixels_file.name} has {len(fer)}; they must match row for row"
        )
    folder = pixel_images(pixels_file, fer)
    samples = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(HEADER):
            raise annotation_error(votes_file, line, f"expected {len(HEADER)} columns, got {len(row)}")
        usage, name = row[0], row[1].strip()
        if USAGE.get(usage) != fer[line - 2][1]:
            raise annotation_error(
                votes_file, line, f"Usage {usage!r} disagrees with line {line} of {pixels_file.name}"
            )
        if not name:
            continue
        votes = numbers(row[2:], votes_file, line, int)
        if min(votes) < 0:
            raise annotation_error(votes_file, line, "vote counts must not be negative")
        label = resolve(votes, vote)
        if label is not None:
            path = folder / image_name(line - 2)
            samples.append(Sample(name, path, USAGE[usage], {"expression": label}))
    return Dataset("ferplus", root, samples, classes={"expression": list(CLASSES)})
