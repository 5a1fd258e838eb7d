"""Parsing and protocol helpers that several dataset adapters share.

Annotation errors are one line, ``FILE: line N: what is wrong``. Seeded splits shuffle
*sorted* units (sample ids or subjects) with numpy's PCG64 generator, so they depend only
on the names and the seed, never on directory listing order.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from etf.data.base import Sample
from etf.data.images import find_images
from etf.data.labels import NME_NORM
from etf.errors import EtfError

# Five points (image-left eye, image-right eye, nose tip, left and right mouth corners) from
# the 68-point iBUG scheme (eye centres as the mean of each eye's six points) and from WFLW's
# 98 points (its two pupil points).
FIVE_FROM_68 = ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47), (30,), (48,), (54,))
FIVE_FROM_98 = ((96,), (97,), (54,), (76,), (82,))


def data_home() -> Path:
    """Where derived data (embedded sets, decoded pixels) goes: ``$ETF_DATA_HOME`` or ``~/.cache/etf/data``."""
    return Path(os.environ.get("ETF_DATA_HOME", Path.home() / ".cache" / "etf" / "data"))


def find(root: Path, candidates: Sequence[str], what: str, fmt: str, required: bool = True) -> Path | None:
    """The first of ``candidates`` (paths relative to ``root``) that exists."""
    for c in candidates:
        if (root / c).exists():
            return root / c
    if required:
        raise EtfError(f"{fmt}:{root}: no {what} (looked for {', '.join(candidates)})")
    return None


def annotation_error(path: Path, line: int, message: str) -> EtfError:
    return EtfError(f"{path}: line {line}: {message}")


def not_utf8(path: Path) -> EtfError:
    """The error for a text file that is not UTF-8: its first such byte and line, and the
    encoding its bytes suggest converting from."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        try:
            data.decode("cp1252")
            guess = "cp1252"  # Excel's on Windows
        except UnicodeDecodeError:
            guess = "latin-1"
        return EtfError(
            f"{path}: line {line}: byte 0x{data[e.start]:02x} (offset {e.start}) is not UTF-8; "
            f"save the file as UTF-8 (it may be {guess}: iconv -f {guess} -t utf-8)"
        )
    return EtfError(f"{path}: not UTF-8 text")


def csv_rows(path: Path) -> list[list[str]]:
    """The rows of a UTF-8 CSV file (a byte-order mark is not part of its first cell)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.reader(f))
    except FileNotFoundError:
        raise EtfError(f"{path}: not found") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def read_rows(path: Path, skip: int = 0) -> list[tuple[int, list[str]]]:
    """Whitespace-separated fields of each non-blank line after the first ``skip``, with 1-based line numbers."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise EtfError(f"{path}: not found") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1) if n > skip and line.strip()]


def integer(text: str, path: Path, line: int) -> int:
    return numbers([text], path, line, int)[0]


def numbers(fields: Sequence[str], path: Path, line: int, kind: type = float) -> list[Any]:
    """``fields`` as numbers, or an error naming the first that is not one."""
    out = []
    for f in fields:
        try:
            v = kind(f)
        except ValueError:
            raise annotation_error(path, line, f"{f!r} is not a{'n integer' if kind is int else ' number'}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise annotation_error(path, line, f"{f!r} is not a finite number")
        out.append(v)
    return out


def seeded_split(units: Iterable[str], seed: int, val: float, test: float, where: str) -> dict[str, str]:
    """Assign each unit to train, val or test: sorted, shuffled by ``seed``, then cut.

    The first ``round(test * n)`` shuffled units are test, the next ``round(val * n)`` val.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise EtfError(f"{where}: val={val} and test={test} must be fractions in [0, 1) summing to less than 1")
    keys = sorted(set(units))
    order = np.random.default_rng(seed).permutation(len(keys))
    n_test, n_val = round(test * len(keys)), round(val * len(keys))
    split = {}
    for rank, i in enumerate(order):
        split[keys[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split


def hold_out(samples: list[Sample], val: float, seed: int, where: str) -> list[Sample]:
    """Move a seeded fraction ``val`` of the train samples to val (for formats without a val
    split), by whole groups (subjects, source images) where samples have one: the fraction
    is of the groups."""
    if val == 0:
        return samples
    unit = {s.id: s.id if s.group is None else s.group for s in samples if s.split == "train"}
    split = seeded_split(unit.values(), seed, val, 0.0, where)
    return [replace(s, split=split[unit[s.id]]) if s.id in unit else s for s in samples]


def points_array(values: Sequence[float], path: Path, line: int, count: int) -> np.ndarray:
    """``count`` points from a flat x, y, x, y, ... list."""
    if len(values) != 2 * count:
        raise annotation_error(
            path, line, f"expected {count} points ({2 * count} coordinates), got {len(values)} values"
        )
    return np.asarray(values, dtype=np.float64).reshape(count, 2)


def five_points(points: np.ndarray, scheme: Sequence[Sequence[int]]) -> list[list[float]]:
    return [[round(float(v), 3) for v in points[list(idx)].mean(0)] for idx in scheme]


def box_of(points: np.ndarray) -> list[float]:
    """The tight box around ``points`` as x0, y0, x1, y1."""
    (x0, y0), (x1, y1) = points.min(0), points.max(0)
    return [round(float(v), 3) for v in (x0, y0, x1, y1)]


def landmark_labels(points: np.ndarray, norm_pair: tuple[int, int], prefix: str = "lm") -> dict[str, float]:
    """Flat ``lm<i>_x``, ``lm<i>_y`` columns plus ``nme_norm``, the distance between two points."""
    labels = {}
    for i, (x, y) in enumerate(points):
        labels[f"{prefix}{i}_x"], labels[f"{prefix}{i}_y"] = float(x), float(y)
    labels[NME_NORM] = float(np.linalg.norm(points[norm_pair[0]] - points[norm_pair[1]]))
    return labels


def report_skipped(fmt: str, root: Path, skipped: list[dict[str, str]]) -> None:
    """One warning for entries an adapter could not use (they are also kept in ``Dataset.skipped``)."""
    if skipped:
        first = skipped[0]
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        warnings.warn(f"{fmt}:{root}: skipped {first['id']!r}: {first['reason']}{more}", stacklevel=3)


def labels_from_names(
    fmt: str, root: Path, parse: Callable[[str], dict[str, Any]]
) -> tuple[list[tuple[str, Path, dict[str, Any]]], list[dict[str, str]]]:
    """(id, path, labels) for each image under ``root`` whose file name ``parse`` accepts.

    ``parse`` raises ``ValueError(reason)`` for a malformed name; such images are returned
    as skipped entries (id, path, reason) and reported in one warning, not fatal: datasets
    labelled by file name ship a few broken names.
    """
    parsed, skipped = [], []
    for path in find_images(root):
        rel = path.relative_to(root).as_posix()
        try:
            parsed.append((rel, path, parse(path.name)))
        except ValueError as e:
            skipped.append({"id": rel, "path": str(path), "reason": str(e)})
    report_skipped(fmt, root, skipped)
    if not parsed:
        raise EtfError(
            f"{fmt}:{root}: no image with a well-formed name found"
            + (f" ({len(skipped)} malformed)" if skipped else "")
        )
    return parsed, skipped
