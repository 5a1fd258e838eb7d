"""``agedb:ROOT``: AgeDB age estimation (1-101), 568 subjects, labelled by file name.

Names are ``<id>_<Name>_<age>_<gender>.jpg`` (``0_MariaCallas_35_f.jpg``), found
recursively under ``ROOT``; gender m/f becomes 0/1 (male, female, as for UTKFace).
Malformed names are skipped and reported, as for UTKFace.

AgeDB has no official age-estimation split. This one is seeded and, by default,
subject-disjoint (``by_subject``): subject names are sorted, shuffled with ``seed`` and cut
into ``test`` and ``val`` fractions (default 10% each), so no person's other ages leak
from train into test. ``by_subject=false`` splits images instead. The subject is each
image's group, so hold-outs of train keep a person's images together either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from etf.data.base import Dataset, Sample, register_dataset
from etf.data.datasets._common import labels_from_names, seeded_split

GENDERS = {"m": 0, "f": 1}


def parse_name(name: str) -> dict[str, Any]:
    stem = name.rsplit(".", 1)[0]
    fields = stem.split("_")
    if len(fields) < 4 or not fields[0].isdigit() or not fields[-2].isdigit() or fields[-1].lower() not in GENDERS:
        raise ValueError(f"expected ID_Name_AGE_m|f.jpg, got {name!r}")
    return {"age": int(fields[-2]), "gender": GENDERS[fields[-1].lower()], "subject": "_".join(fields[1:-2])}


@register_dataset(
    "agedb",
    description="AgeDB: age (regression) and gender from file names; seeded subject-disjoint 80/10/10 split",
    layout="ROOT/<id>_<Name>_<age>_<m|f>.jpg, searched recursively",
    tasks=("regress:age",),
    metric="mae",
)
def load_agedb(root: Path, seed: int = 0, val: float = 0.1, test: float = 0.1, by_subject: bool = True) -> Dataset:
    parsed, skipped = labels_from_names("agedb", root, parse_name)
    subject = {i: labels.pop("subject") for i, _, labels in parsed}
    unit = subject if by_subject else {i: i for i in subject}
    split = seeded_split(unit.values(), seed, val, test, f"agedb:{root}")
    samples = [Sample(i, path, split[unit[i]], labels, group=subject[i]) for i, path, labels in parsed]
    return Dataset("agedb", root, samples, classes={"gender": ["male", "female"]}, skipped=skipped, group_by="subject")
