"""``au:FILE``: facial action units (BP4D, DISFA) from one frame-level CSV, 3-fold protocol.

Neither dataset ships a frame list in one agreed format (BP4D has per-sequence occurrence
CSVs, DISFA per-AU intensity text files), so this reads a documented CSV you write once:

    path,subject,AU1,AU2,AU4,...[,fold]
    F001/T1/0001.jpg,F001,0,1,0,...

``path`` is relative to the CSV; ``subject`` the subject id; one column per AU, named
``AU<n>`` (extra AU columns are ignored). ``dataset`` picks the AUs and the value coding:

- ``bp4d``: AUs 1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24, occurrence 0/1; 9 or empty =
  unknown (missing);
- ``disfa``: AUs 1, 2, 4, 6, 9, 12, 25, 26, intensity 0..5; occurrence = intensity >= 2
  (the usual rule); empty = missing.

Labels: ``AU<n>`` as 0/1 for the selected AUs. Protocol: 3-fold subject-independent
cross-validation; fold ``fold`` (1..3) is the test set, the other two train. Subjects go
to folds by sorted subject id, round robin (the i-th, from 0, to fold i % 3 + 1), so no
subject is in two folds. To reproduce a paper's exact subject lists, add a ``fold``
column (1..3, the same for all of a subject's frames), which then wins. The subject is each
frame's group: hold-outs of train (``etf fit``'s val) keep a subject's frames together.
"""

from __future__ import annotations

import csv
from pathlib import Path

from etf.data.base import Dataset, Sample, register_dataset
from etf.data.datasets._common import annotation_error, not_utf8
from etf.errors import EtfError

AUS = {
    "bp4d": (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24),
    "disfa": (1, 2, 4, 6, 9, 12, 25, 26),
}
FOLDS = 3
UNKNOWN = {"bp4d": {"", "9"}, "disfa": {""}}
VALID = {"bp4d": {"0", "1"}, "disfa": {str(i) for i in range(6)}}


def task(dataset: str) -> str:
    return "multilabel:" + ",".join(f"AU{n}" for n in AUS[dataset])


def assign_folds(subjects: list[str]) -> dict[str, int]:
    """Sorted subject ids dealt round robin to folds 1..3."""
    return {s: i % FOLDS + 1 for i, s in enumerate(sorted(set(subjects)))}


@register_dataset(
    "au",
    description="action units (BP4D 12 AUs or DISFA 8, intensity >= 2) from a CSV; 3-fold subject-independent",
    layout="FILE.csv with header `path,subject,AU1,AU2,...[,fold]`; paths relative to the file",
    tasks=(task("bp4d"),),
    metric="mean_f1",
)
def load_au(file: Path, dataset: str = "bp4d", fold: int = 1) -> Dataset:
    if dataset not in AUS:
        raise EtfError(f"au:{file}: dataset={dataset!r}; use {' or '.join(AUS)}")
    if not 1 <= fold <= FOLDS:
        raise EtfError(f"au:{file}: fold={fold}; use 1, 2 or 3")
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
    except UnicodeDecodeError:
        raise not_utf8(file) from None
    if not rows:
        raise EtfError(f"au:{file}: no rows")
    columns = [f"AU{n}" for n in AUS[dataset]]
    missing = [c for c in ("path", "subject", *columns) if c not in header]
    if missing:
        raise annotation_error(
            file, 1, f"no column {missing[0]!r} ({dataset} needs path, subject, {', '.join(columns)})"
        )
    ragged = next((n for n, r in enumerate(rows, start=2) if None in r or None in r.values()), None)
    if ragged:  # csv.DictReader marks too many fields with a None key, too few with None values
        raise annotation_error(file, ragged, f"expected {len(header)} columns ({','.join(header)})")
    folds = assign_folds([r["subject"] for r in rows]) if "fold" not in header else _given_folds(file, rows)
    samples = []
    for line, r in enumerate(rows, start=2):
        labels = {}
        for c in columns:
            v = r[c].strip()
            if v not in VALID[dataset] | UNKNOWN[dataset]:
                raise annotation_error(
                    file, line, f"{c} = {v!r} (expected {' or '.join(sorted(VALID[dataset]))}, or empty for unknown)"
                )
            labels[c] = None if v in UNKNOWN[dataset] else int(int(v) >= (2 if dataset == "disfa" else 1))
        split = "test" if folds[r["subject"]] == fold else "train"
        samples.append(Sample(r["path"], file.parent / r["path"], split, labels, group=r["subject"]))
    return Dataset("au", file, samples, tasks=[task(dataset)], group_by="subject")


def _given_folds(file: Path, rows: list[dict[str, str]]) -> dict[str, int]:
    folds: dict[str, int] = {}
    for line, r in enumerate(rows, start=2):
        value = r["fold"].strip()
        if value not in {str(k) for k in range(1, FOLDS + 1)}:
            raise annotation_error(file, line, f"fold {value!r} is not 1, 2 or 3")
        if folds.setdefault(r["subject"], int(value)) != int(value):
            raise annotation_error(
                file, line, f"subject {r['subject']!r} is in fold {folds[r['subject']]} and fold {value}"
            )
    return folds
