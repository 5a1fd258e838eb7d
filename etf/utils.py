"""Small helpers shared by every stage: canonical hashing, atomic files, threads."""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
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
    even if the process is killed mid-write. The file is created with the umask's mode, as
    any Unix tool creates one (not ``mkstemp``'s 0600), so a lab can share what etf writes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


#: the mark etf leaves in each directory it makes as an output (a run, a grid, explain's and
#: --embed's folders): ``{"kind": ..., "files": [...]}``. Only a directory marked with the
#: same kind is written into again, and a run only replaced while it holds nothing but the
#: files its mark lists: nothing etf did not write is ever deleted.
OWNER_MARK = ".etf-owned.json"


def owner_mark(path: Path) -> dict[str, Any] | None:
    """The mark of directory ``path`` (None: etf did not make it)."""
    try:
        mark = json.loads((Path(path) / OWNER_MARK).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) and isinstance(mark.get("kind"), str) else None


def mark_owned(path: Path, kind: str, files: list[str] | None = None) -> None:
    """Make ``path`` (if need be) and mark it as etf's ``kind``, owning ``files`` besides
    those its mark already lists (a run lists what it wrote, a grid's run its records)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    listed = (owner_mark(path) or {}).get("files") or []
    write_json_atomic(path / OWNER_MARK, {"kind": kind, "files": sorted({*listed, *(files or [])})})


def _names(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def foreign(path: Path, kind: str) -> str | None:
    """Why etf may not write its ``kind`` output into ``path``, or None when it may: ``path``
    is new, an empty directory, or a directory etf marked as a ``kind``. A marked directory
    that lists its files (a run) must hold nothing else, since a run is replaced whole."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_dir():
        return "exists and is not a directory"
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return None
    mark = owner_mark(path)
    if mark is None:
        if any((path / e / "manifest.json").is_file() for e in entries):
            return "is a token cache"
        return f"holds files etf did not write ({_names(entries)})"
    if mark["kind"] != kind:
        return f"is an etf {mark['kind']} directory, not a {kind} directory"
    if mark.get("files"):
        extra = [e for e in entries if e != OWNER_MARK and e not in mark["files"]]
        if extra:
            return f"holds files etf did not write there ({_names(extra)})"
    return None


def claim_dir(path: Path, flag: str, kind: str) -> Path:
    """Refuse, before any work, an output directory ``path`` that etf may not write its ``kind``
    into (see :func:`foreign`) or cannot create."""
    path = writable_dir(path, flag)
    why = foreign(path, kind)
    if why:
        raise EtfError(f"{flag} {path}: {why}; choose a new or empty directory")
    return path


def _remove_owned(path: Path) -> None:
    """Remove a leftover of :func:`staged_dir` (a staging or replaced folder), only if etf
    marked it or it is empty."""
    import shutil

    if not path.exists():
        return
    if path.is_dir() and (owner_mark(path) is not None or not any(path.iterdir())):
        shutil.rmtree(path)
    else:
        raise EtfError(f"{path}: etf's staging name, but etf did not write it; move it away and re-run")


@contextmanager
def staged_dir(path: Path, kind: str = "run") -> Iterator[Path]:
    """Yield an empty staging directory beside ``path``; once the block succeeds it is marked
    as etf's ``kind`` owning the files written in it and replaces ``path`` (whatever was there
    is removed only then, and the caller checked with :func:`foreign` that etf may). A reader
    sees the old directory or the complete new one; a failed or killed write leaves only the
    hidden staging folder, marked from the start, which the next write to ``path`` clears."""
    import shutil

    path = Path(path)
    stage = path.with_name(f".{path.name}.partial")
    old = path.with_name(f".{path.name}.old")
    for leftover in (stage, old):
        _remove_owned(leftover)
    stage.mkdir(parents=True)
    try:
        mark_owned(stage, kind)
        yield stage
        mark_owned(stage, kind, [p.name for p in stage.iterdir() if p.name != OWNER_MARK])
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
    except UnicodeDecodeError as e:
        raise EtfError(f"{path}: not valid JSON (byte {e.start} is not UTF-8)") from None
    except OSError as e:
        raise EtfError(f"{path}: cannot be read ({e.strerror})") from None


def parse_size(text: str) -> int:
    """``8G``, ``512M``, ``1.5GiB`` or a byte count."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        size = int(float(num) * units[unit])
    except ValueError:
        raise EtfError(f"--max-memory {text!r}: expected a size like 8G or 512M") from None
    if size <= 0:
        raise EtfError(f"--max-memory {text!r}: must be a positive size like 8G or 512M")
    return size


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
