"""Content digests of image files: the dataset key covers what the images hold, not only
their names, so an image edited in place can never be served its old tokens.

Each file is hashed once (BLAKE2b, 128 bits, over its bytes). The digest is remembered in
an SQLite file under the data home (``$ETF_DATA_HOME/digests.sqlite``), keyed by the
file's absolute path and checked against its size, modification time, inode-change time
and inode: later loads of a dataset only stat its files. Any write to a file changes its
inode-change time (which, unlike the modification time, no tool can set back), so an edit
in place is hashed again.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

#: the digest recorded for a file that cannot be read (``etf data check`` still gives a key)
UNREADABLE = "unreadable"
_BATCH = 500  # paths per SQL query (SQLite binds at most 999 parameters)


def _database() -> Path:
    from etf.data.datasets._common import data_home

    home = data_home()
    home.mkdir(parents=True, exist_ok=True)
    return home / "digests.sqlite"


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _hash(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _absolute(paths: Sequence[Path]) -> list[str]:
    """Each path made absolute with its folder's symlinks resolved, each folder resolved once:
    ``Path.resolve`` per file walks every component of every path (most of a warm load)."""
    folders: dict[str, str] = {}
    out = []
    for p in paths:
        head, tail = os.path.split(os.fspath(p))
        if (real := folders.get(head)) is None:
            real = folders[head] = os.path.realpath(head or ".")
        out.append(os.path.join(real, tail))
    return out


def file_digests(paths: Sequence[Path], workers: int = 8) -> list[str]:
    """The content digest of each file, hashing only files not seen unchanged before."""
    names = _absolute(paths)
    unique = list(dict.fromkeys(names))
    stamps: dict[str, tuple[int, int, int, int] | None] = {}
    for name in unique:
        try:
            stamps[name] = _stamp(os.stat(name))
        except OSError:
            stamps[name] = None
    digests: dict[str, str] = {n: UNREADABLE for n, s in stamps.items() if s is None}
    present = [n for n in unique if stamps[n] is not None]
    db = _open_memo()
    try:
        if db is not None:
            digests.update(_remembered(db, present, stamps))
        todo = [n for n in present if n not in digests]
        if todo:
            with ThreadPoolExecutor(max_workers=workers) as pool:  # file reads and hashlib release the GIL
                fresh = list(pool.map(_safe_hash, todo))
            if db is not None:
                _remember(db, [(n, *stamps[n], d) for n, d in zip(todo, fresh) if d != UNREADABLE])
            digests.update(zip(todo, fresh))
    finally:
        if db is not None:
            db.close()
    return [digests[n] for n in names]


_COLUMNS = ("path", "size", "mtime", "ctime", "inode", "digest")


def _open_memo() -> sqlite3.Connection | None:
    """The digest memo. It is only a cache: one that is damaged or has another layout is
    rebuilt, one that cannot be opened is done without (every file is hashed); either with
    one warning. None where it is done without."""
    try:
        path = _database()
    except OSError as e:
        return _without(f"{e}")
    try:
        return _connect(path)
    except sqlite3.OperationalError as e:  # cannot be opened or read (permissions, locked): not its bytes
        return _without(f"{path}: {e}")
    except sqlite3.DatabaseError as e:  # not a database, malformed, or another layout
        try:
            path.unlink()
            db = _connect(path)
        except (OSError, sqlite3.DatabaseError) as again:
            return _without(f"{path}: {e}, and it cannot be rebuilt ({again})")
        _warn(f"{path}: {e}; rebuilt it (it only remembers file digests)")
        return db


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60)
    try:
        db.execute(
            "CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER,"
            " ctime INTEGER, inode INTEGER, digest TEXT)"
        )
        columns = tuple(row[1] for row in db.execute("PRAGMA table_info(digests)"))
        if columns != _COLUMNS:
            raise sqlite3.DatabaseError(f"another layout (columns {', '.join(columns)})")
    except BaseException:
        db.close()
        raise
    return db


def _without(why: str) -> None:
    _warn(f"{why}; file digests are not remembered, so every file is hashed")
    return None


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _remembered(db: sqlite3.Connection, names: list[str], stamps: dict[str, Any]) -> dict[str, str]:
    """The digests the memo holds for ``names`` whose stamp is unchanged."""
    found = {}
    try:
        for start in range(0, len(names), _BATCH):
            part = names[start : start + _BATCH]
            rows = db.execute(
                f"SELECT path, size, mtime, ctime, inode, digest FROM digests WHERE path IN ({','.join('?' * len(part))})",
                part,
            )
            for path, *stamp, digest in rows:
                if tuple(stamp) == stamps[path]:
                    found[path] = digest
    except sqlite3.DatabaseError as e:  # damaged past its header: hash everything this time
        _warn(f"digests.sqlite cannot be read ({e}); every file is hashed")
        return {}
    return found


def _remember(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    try:
        with db:
            db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)", rows)
    except sqlite3.DatabaseError as e:  # read-only, full disk: the digests are simply not kept
        _warn(f"digests.sqlite cannot be written ({e}); file digests are not remembered")


def _safe_hash(path: str) -> str:
    try:
        return _hash(path)
    except OSError:
        return UNREADABLE


def content_digest(paths: Sequence[Path]) -> str:
    """One digest of every file's content, in order: what a dataset key hashes."""
    h = hashlib.sha256()
    for d in file_digests(paths):
        h.update(d.encode())
        h.update(b"\n")
    return h.hexdigest()[:32]
