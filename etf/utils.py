"""Small helpers shared by every stage: canonical hashing, atomic files, threads."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from etf.errors import EtfError

KEY_LENGTH = 16


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal specs give equal bytes, hence equal keys."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def spec_hash(obj: Any, length: int = KEY_LENGTH) -> str:
    """Content address of a spec: sha256 of its canonical JSON, shortened."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A reader therefore sees either the old file or the complete new one, never a partial one,
    even if the process is killed mid-write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside ``path``; once the block succeeds it replaces
    ``path`` (whatever was there is removed only then). A reader sees the old directory or
    the complete new one; a failed or killed write leaves only the hidden staging folder,
    which the next write to ``path`` clears."""
    import shutil

    path = Path(path)
    stage = path.with_name(f".{path.name}.partial")
    old = path.with_name(f".{path.name}.old")
    for leftover in (stage, old):
        shutil.rmtree(leftover, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
        if path.exists():
            os.rename(path, old)
        os.rename(stage, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None: what strict JSON can hold."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_text(obj: Any) -> str:
    """Strict JSON (NaN and infinities as null), sorted keys: how etf writes every JSON file."""
    return json.dumps(finite(obj), indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """:func:`json_text`, written beside and renamed into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(obj))


def parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EtfError(f"{where}: not valid JSON ({e})") from None


def read_json(path: str | os.PathLike) -> Any:
    try:
        return parse_json(Path(path).read_text(), str(path))
    except FileNotFoundError:
        raise EtfError(f"{path}: file not found") from None


def parse_size(text: str) -> int:
    """``8G``, ``512M``, ``1.5GiB`` or a byte count."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        return int(float(num) * units[unit])
    except ValueError:
        raise EtfError(f"--max-memory {text!r}: expected a size like 8G or 512M") from None


def writable_dir(path: Path, flag: str) -> Path:
    """Refuse, before any work, an output directory that cannot be created: a path through a
    file, or a parent without write permission."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EtfError(f"{flag} {path}: exists and is not a directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise EtfError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EtfError(f"{flag} {path}: {parent} is not writable")
    return path
