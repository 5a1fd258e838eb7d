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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

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
    with closing(sqlite3.connect(_database(), timeout=60)) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER,"
            " ctime INTEGER, inode INTEGER, digest TEXT)"
        )
        present = [n for n in unique if stamps[n] is not None]
        for start in range(0, len(present), _BATCH):
            part = present[start : start + _BATCH]
            rows = db.execute(
                f"SELECT path, size, mtime, ctime, inode, digest FROM digests WHERE path IN ({','.join('?' * len(part))})",
                part,
            )
            for path, *stamp, digest in rows:
                if tuple(stamp) == stamps[path]:
                    digests[path] = digest
        todo = [n for n in present if n not in digests]
        if todo:
            with ThreadPoolExecutor(max_workers=workers) as pool:  # file reads and hashlib release the GIL
                fresh = list(pool.map(_safe_hash, todo))
            with db:
                db.executemany(
                    "INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)",
                    [(n, *stamps[n], d) for n, d in zip(todo, fresh) if d != UNREADABLE],
                )
            digests.update(zip(todo, fresh))
    return [digests[n] for n in names]


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
