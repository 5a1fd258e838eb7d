"""``cfp:ROOT``: Celebrities in Frontal-Profile (CFP-FP, CFP-FF) verification pairs.

ROOT is the ``cfp-dataset`` folder. ``Protocol/Pair_list_F.txt`` and ``Pair_list_P.txt``
map an index to an image path (relative to ``Protocol/``, e.g.
``../Data/Images/001/frontal/01.jpg``); ``Protocol/Split/<FP|FF>/01..10/same.txt`` and
``diff.txt`` list comma-separated index pairs (FP: frontal index, profile index; FF: two
frontal indices). Every image that a pair of the chosen protocol names is a test sample,
labelled ``identity`` by its person folder; the ten split folders are the ten folds.
CFP has no training split: evaluate a run trained elsewhere with ``etf predict --data``.
"""

from __future__ import annotations

import os
from pathlib import Path

from etf.data.base import Dataset, Sample, register_dataset
from etf.data.datasets._common import annotation_error, integer, read_rows
from etf.errors import EtfError

PROTOCOLS = {"FP": ("F", "P"), "FF": ("F", "F")}
FOLDS = 10


def read_pair_list(root: Path, kind: str) -> dict[int, str]:
    """``Protocol/Pair_list_<kind>.txt``: index -> sample id (the image path relative to ROOT)."""
    path = root / "Protocol" / f"Pair_list_{kind}.txt"
    out = {}
    for line, fields in read_rows(path):
        if len(fields) != 2:
            raise annotation_error(path, line, "expected 'INDEX PATH'")
        sid = Path(os.path.normpath(Path("Protocol") / fields[1])).as_posix()
        if not (root / sid).is_file():
            raise annotation_error(path, line, f"image {sid} not found")
        out[integer(fields[0], path, line)] = sid
    return out


def read_fold_file(
    path: Path, lists: tuple[dict[int, str], dict[int, str]], names: tuple[str, str]
) -> list[tuple[str, str]]:
    """``same.txt`` / ``diff.txt``: ``i,j`` lines, ``i`` from the first list, ``j`` from the second."""
    pairs = []
    for line, fields in read_rows(path):
        fields = "".join(fields).split(",")
        if len(fields) != 2:
            raise annotation_error(path, line, "expected 'INDEX,INDEX'")
        ids = []
        for index, table, name in zip((integer(f, path, line) for f in fields), lists, names):
            if index not in table:
                raise annotation_error(path, line, f"index {index} is not in Pair_list_{name}.txt")
            ids.append(table[index])
        pairs.append((ids[0], ids[1]))
    return pairs


@register_dataset(
    "cfp",
    description="CFP-FP / CFP-FF frontal-profile verification: ten folds of 350 matched + 350 mismatched pairs (test only)",
    layout="ROOT/Protocol/{Pair_list_F.txt,Pair_list_P.txt,Split/FP|FF/01..10/{same,diff}.txt}, ROOT/Data/Images/<id>/...",
    tasks=("verify:identity",),
    metric="accuracy_10fold",
)
def load_cfp(root: Path, protocol: str = "FP") -> Dataset:
    if protocol not in PROTOCOLS:
        raise EtfError(f"cfp:{root}: protocol={protocol}: use FP (frontal-profile) or FF (frontal-frontal)")
    names = PROTOCOLS[protocol]
    lists = tuple(read_pair_list(root, k) for k in names)
    a, b, same, fold = [], [], [], []
    expected: tuple[Path, int] | None = None
    for k in range(FOLDS):
        for kind, match in (("same", 1), ("diff", 0)):
            path = root / "Protocol" / "Split" / protocol / f"{k + 1:02d}" / f"{kind}.txt"
            pairs = read_fold_file(path, lists, names)
            expected = expected or (path, len(pairs))
            if len(pairs) != expected[1]:
                raise EtfError(
                    f"{path}: {len(pairs)} pairs, but {expected[0]} has {expected[1]}; every fold's same.txt and diff.txt hold as many"
                )
            a += [p[0] for p in pairs]
            b += [p[1] for p in pairs]
            same += [match] * len(pairs)
            fold += [k] * len(pairs)
    ids = sorted(set(a) | set(b))
    people = sorted({sid.split("/")[-3] for sid in ids})
    index = {p: i for i, p in enumerate(people)}
    samples = [
        Sample(sid, root / sid, "test", {"identity": index[sid.split("/")[-3]]}, group=sid.split("/")[-3])
        for sid in ids
    ]
    pairs = {"test": {"a": a, "b": b, "same": same, "fold": fold}}
    return Dataset("cfp", root, samples, classes={"identity": people}, pairs=pairs, group_by="identity")
