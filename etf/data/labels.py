"""Label-column conventions shared by adapters, crops, ``etf data check`` and fitting.

Task strings name the label columns a head predicts:

- ``classify:COL``: one categorical column (integer class indices, names in ``classes[COL]``);
- ``multilabel:COL1,COL2,...``: several 0/1 columns;
- ``regress:COL`` or ``regress:COL1,COL2,...``: one or several numeric columns;
- ``verify:COL``: one identity column (face recognition; pair protocols from ``Dataset.pairs``);
- ``landmarks:PREFIX``: K points stored as flat columns ``PREFIX<i>_x``, ``PREFIX<i>_y``
  (i = 0..K-1) in pixel coordinates of the image the model sees (after ``--crop``).

Landmark datasets also carry ``nme_norm``, the per-sample distance that normalises the
point error for NME (inter-ocular for 300W and WFLW); crops rescale it with the points.
A 0/1 column ``subset_<name>`` marks the test samples of an overlapping evaluation subset
(WFLW's pose, expression, ...): the subset's metric is the metric over test samples with 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from etf.errors import EtfError

TASK_KINDS = ("classify", "multilabel", "regress", "landmarks", "verify")
NME_NORM = "nme_norm"
SUBSET_PREFIX = "subset_"
_POINT = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)_x$")


@dataclass(frozen=True)
class Task:
    """A parsed task string: its kind and what follows the colon (columns, or a prefix)."""

    kind: str
    names: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.kind}:{','.join(self.names)}"

    def columns(self, available: Sequence[str]) -> list[str]:
        """The label columns this task reads, checked against ``available``."""
        if self.kind == "landmarks":
            points = point_columns(available).get(self.names[0])
            if not points:
                raise EtfError(f"task {self}: no columns {self.names[0]}0_x, {self.names[0]}0_y, ...")
            return [c for pair in points for c in pair]
        missing = [c for c in self.names if c not in available]
        if missing:
            raise EtfError(f"task {self}: no label column {missing[0]!r} (columns: {', '.join(available) or 'none'})")
        return list(self.names)


def parse_task(text: str) -> Task:
    """``KIND:ARGS`` to a :class:`Task`; ``landmarks`` takes one prefix, ``classify`` one column."""
    kind, sep, rest = text.partition(":")
    names = tuple(n.strip() for n in rest.split(",")) if rest else ()
    if kind not in TASK_KINDS or not sep or not names or any(not n for n in names):
        raise EtfError(f"task {text!r}: expected KIND:COLUMNS with KIND one of {', '.join(TASK_KINDS)}")
    if kind in ("classify", "landmarks") and len(names) > 1:
        raise EtfError(f"task {text!r}: {kind} takes one {'column' if kind == 'classify' else 'prefix'}")
    return Task(kind, names)


def point_columns(columns: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """Landmark prefixes in ``columns``: prefix -> [(x column, y column)] for i = 0, 1, ...

    A prefix counts only when its points are numbered 0..K-1 without gaps, each with both
    coordinates, so an unrelated column that happens to end in ``_x`` is not mistaken for one.
    """
    cols = set(columns)
    found: dict[str, set[int]] = {}
    for c in cols:
        m = _POINT.match(c)
        if m and f"{c[:-2]}_y" in cols:
            found.setdefault(m["prefix"], set()).add(int(m["index"]))
    return {
        p: [(f"{p}{i}_x", f"{p}{i}_y") for i in range(len(idx))]
        for p, idx in sorted(found.items())
        if idx == set(range(len(idx)))
    }
