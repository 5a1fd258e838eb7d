"""``utkface:ROOT``: UTKFace age (0-116), gender and race, labelled by file name.

``ROOT`` is the folder of one UTKFace variant: ``UTKFace/`` (aligned and cropped,
``<age>_<gender>_<race>_<datetime>.jpg.chip.jpg``) or the in-the-wild ``part1..3/``
(``....jpg``); images are found recursively. Gender 0 male, 1 female; race 0 White,
1 Black, 2 Asian, 3 Indian, 4 Others. A few distributed names are malformed (a missing
field): they are skipped, listed in ``Dataset.skipped`` and reported in one warning.

UTKFace has no official split: image names are sorted and shuffled with ``seed``, then
cut into ``test`` and ``val`` fractions (default 10% each), the rest train. UTKFace has no
identity labels, so neither this split nor any hold-out can keep a person's images on one
side: a person photographed twice may be in train and test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from etf.data.base import Dataset, Sample, register_dataset
from etf.data.datasets._common import labels_from_names, seeded_split

GENDERS = ["male", "female"]
RACES = ["White", "Black", "Asian", "Indian", "Others"]


def parse_name(name: str) -> dict[str, Any]:
    fields = name.split(".")[0].split("_")
    if len(fields) != 4 or not all(f.isdigit() for f in fields):
        raise ValueError(f"expected AGE_GENDER_RACE_DATETIME.jpg, got {name!r}")
    age, gender, race = (int(f) for f in fields[:3])
    if not (0 <= age <= 130 and gender < len(GENDERS) and race < len(RACES)):
        raise ValueError(f"age {age}, gender {gender} or race {race} out of range in {name!r}")
    return {"age": age, "gender": gender, "race": race}


@register_dataset(
    "utkface",
    description="UTKFace: age (regression), gender, race from file names; seeded 80/10/10 split",
    layout="ROOT/<age>_<gender>_<race>_<datetime>.jpg.chip.jpg (the UTKFace/ folder), searched recursively",
    tasks=("regress:age",),
    metric="mae",
)
def load_utkface(root: Path, seed: int = 0, val: float = 0.1, test: float = 0.1) -> Dataset:
    parsed, skipped = labels_from_names("utkface", root, parse_name)
    split = seeded_split((i for i, _, _ in parsed), seed, val, test, f"utkface:{root}")
    samples = [Sample(i, path, split[i], labels) for i, path, labels in parsed]
    return Dataset("utkface", root, samples, classes={"gender": GENDERS, "race": RACES}, skipped=skipped)
