"""``csv:FILE``: columns ``path`` (relative to the file), optional ``split``, then labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from etf.data.base import Dataset, Sample, register_dataset
from etf.data.datasets._common import annotation_error, csv_rows
from etf.errors import EtfError


def _column_values(name: str, cells: list[str]) -> tuple[list[Any], list[str] | None]:
    """Numbers stay numbers (ints if all are ints); any other text is a class name."""
    present = [c for c in cells if c != ""]
    try:
        nums = [float(c) for c in present]
    except ValueError:
        classes = sorted(set(present))
        index = {c: i for i, c in enumerate(classes)}
        return [index[c] if c != "" else None for c in cells], classes
    if any(n != n or n in (float("inf"), float("-inf")) for n in nums):
        raise EtfError(f"label column {name!r} holds NaN or infinite values; leave the cell empty for a missing label")
    integral = all(n.is_integer() for n in nums)
    return [None if c == "" else (int(float(c)) if integral else float(c)) for c in cells], None


@register_dataset(
    "csv",
    description="a CSV manifest: path, split, then one column per label",
    layout="FILE.csv with header `path,split,<label>,...`; paths relative to the file",
    tasks=(),
    metric="",
)
def load_csv(file: Path) -> Dataset:
    header, rows = _read(file)
    if "path" not in header:
        raise EtfError(f"csv:{file}: no 'path' column (header: {','.join(header)})")
    base = file.parent
    label_cols = [c for c in header if c not in ("path", "split")]
    columns, classes = {}, {}
    for c in label_cols:
        columns[c], names = _column_values(c, [r[c].strip() for r in rows])
        if names is not None:
            classes[c] = names
    samples = [
        Sample(r["path"], base / r["path"], (r.get("split") or "train").strip(), {c: columns[c][i] for c in label_cols})
        for i, r in enumerate(rows)
    ]
    return Dataset("csv", file, samples, classes=classes)


def _read(file: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a manifest, refusing what would be read wrong later: a header
    cell that is empty, padded with spaces (``' split'`` would be a label) or repeated (the
    last would win), and a row with more or fewer fields than the header."""
    lines = csv_rows(file)
    if not lines:
        raise EtfError(f"csv:{file}: empty file")
    header = lines[0]
    for cell in header:
        if not cell.strip():
            raise annotation_error(file, 1, f"an empty column name (header: {','.join(header)})")
        if cell != cell.strip():
            raise annotation_error(file, 1, f"column name {cell!r} has spaces around it; write {cell.strip()!r}")
        if header.count(cell) > 1:
            raise annotation_error(file, 1, f"column {cell!r} appears {header.count(cell)} times")
    rows = []
    for line, row in enumerate(lines[1:], start=2):
        if not row:  # a blank line
            continue
        if len(row) != len(header):
            raise annotation_error(file, line, f"{len(row)} fields, but the header has {len(header)}")
        rows.append(dict(zip(header, row)))
    if not rows:
        raise EtfError(f"csv:{file}: no rows")
    return header, rows
