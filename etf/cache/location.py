"""Where a cache lives: a local directory or any fsspec URL (``s3://bucket/prefix``, ``gs://``, ...).

Everything in :mod:`etf.cache` reaches its files through a :class:`Location`, so a cache on
object storage behaves as one on a local disk, with the same guarantees. What differs is
said once, by the two implementations:

- :class:`LocalLocation`: files written beside and renamed into place, an ``fcntl`` lock,
  directories renamed whole (a store is published by one rename).
- :class:`RemoteLocation`: objects through fsspec; one ``PUT`` is already all-or-nothing,
  but there is no rename and no lock, so a store is published by writing its root
  metadata last (see :mod:`etf.cache.store`).

Storage options (endpoint, credentials, region, ...) come from fsspec's own sources (the
usual ``AWS_*`` variables for S3, ``AWS_ENDPOINT_URL`` included), ``ETF_STORAGE_OPTIONS``
(a JSON object) and ``--storage-option KEY=VALUE``. A location remembers them so that it
pickles into worker processes with them, but ``str()`` is the bare URL: options are never
written into a store, a manifest or a run. Nothing here imports fsspec or zarr until used.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from etf.errors import EtfError
from etf.utils import json_text, parse_json, writable_dir, write_json_atomic

#: environment variable holding default fsspec storage options, as a JSON object
OPTIONS_ENV = "ETF_STORAGE_OPTIONS"
_cli_options: dict[str, Any] = {}


def set_storage_options(options: dict[str, Any]) -> None:
    """Storage options given on the command line (``--storage-option``), for this process."""
    _cli_options.clear()
    _cli_options.update(options)


def parse_storage_options(values: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as fsspec keyword arguments; a value that parses as JSON
    (``true``, ``3``, ``{"region_name": "eu-west-1"}``) is taken as such, else as a string."""
    out: dict[str, Any] = {}
    for v in values:
        key, sep, raw = v.partition("=")
        if not sep or not key:
            raise EtfError(f"--storage-option {v!r}: expected KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def storage_options() -> dict[str, Any]:
    """``ETF_STORAGE_OPTIONS`` overridden by the command line's ``--storage-option``."""
    raw = os.environ.get(OPTIONS_ENV)
    env: Any = {}
    if raw:
        try:
            env = json.loads(raw)
        except json.JSONDecodeError as e:
            raise EtfError(f"{OPTIONS_ENV}: not a JSON object ({e})") from None
        if not isinstance(env, dict):
            raise EtfError(f"{OPTIONS_ENV}: expected a JSON object of fsspec options, got {type(env).__name__}")
    return {**env, **_cli_options}


def cache_location(where: str | os.PathLike | Location, options: dict[str, Any] | None = None) -> Location:
    """The location of ``where``: a URL with a scheme (``s3://...``) is remote, anything else
    (a path, ``file://``) local. Options default to :func:`storage_options`."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    scheme, sep, rest = text.partition("://")
    if not sep or scheme == "file":
        return LocalLocation(Path(rest if sep else text).expanduser())
    return RemoteLocation(text, storage_options() if options is None else options)


class Location(ABC):
    """A file or directory of a cache, local or remote; joins like a ``Path``."""

    #: whether a directory can be renamed into place in one step (publication by rename)
    renames: bool

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def parent(self) -> Location: ...

    @abstractmethod
    def __truediv__(self, part: str) -> Location: ...

    @abstractmethod
    def exists(self) -> bool: ...

    @abstractmethod
    def is_dir(self) -> bool: ...

    @abstractmethod
    def children(self) -> list[str]:
        """Names of the entries of a directory (empty when it does not exist)."""

    @abstractmethod
    def read_bytes(self) -> bytes: ...

    @abstractmethod
    def write_json(self, obj: Any) -> None:
        """Write strict JSON whole: a reader sees the old content or the new, never a part."""

    @abstractmethod
    def remove(self) -> None:
        """Remove a file, or a directory and everything under it (nothing when neither exists)."""

    @abstractmethod
    def size(self) -> int:
        """Bytes of a file, or of everything under a directory."""

    @abstractmethod
    def zarr_store(self, read_only: bool = False) -> Any:
        """A zarr 3 store rooted here."""

    @property
    @abstractmethod
    def local_path(self) -> Path:
        """The local file system path (an error naming the URL for remote locations)."""

    @abstractmethod
    def lock(self) -> Any:
        """A context manager serialising publication between processes where the file system
        can (remote locations rely on idempotent publication instead)."""

    @abstractmethod
    def absolute(self) -> str:
        """What a run records: an absolute path or the URL."""

    @abstractmethod
    def check_writable(self, flag: str) -> None:
        """Refuse, before any work, a directory that cannot be written (where that can be told
        without writing: object stores answer at the first write)."""

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind(".") :] if "." in name.lstrip(".") else ""

    def with_name(self, name: str) -> Location:
        return self.parent / name

    def glob(self, pattern: str) -> list[str]:
        """Names of the entries of this directory that match ``pattern``."""
        return sorted(n for n in self.children() if fnmatch.fnmatchcase(n, pattern))

    def read_json(self) -> Any:
        try:
            data = self.read_bytes()
        except FileNotFoundError:
            raise EtfError(f"{self}: file not found") from None
        return parse_json(data.decode(), str(self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class LocalLocation(Location):
    """A path on a local (or shared, POSIX) file system."""

    renames = True

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def parent(self) -> LocalLocation:
        return LocalLocation(self.path.parent)

    def __truediv__(self, part: str) -> LocalLocation:
        return LocalLocation(self.path / part)

    def exists(self) -> bool:
        return self.path.exists()

    def is_dir(self) -> bool:
        return self.path.is_dir()

    def children(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def write_json(self, obj: Any) -> None:
        write_json_atomic(self.path, obj)

    def remove(self) -> None:
        if self.path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)

    def size(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def zarr_store(self, read_only: bool = False) -> Any:
        from zarr.storage import LocalStore

        return LocalStore(self.path, read_only=read_only)

    @property
    def local_path(self) -> Path:
        return self.path

    @contextmanager
    def lock(self) -> Iterator[None]:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def absolute(self) -> str:
        return str(self.path.resolve())

    def check_writable(self, flag: str) -> None:
        writable_dir(self.path, flag)

    def rename(self, target: Location) -> None:
        os.rename(self.path, target.local_path)


class RemoteLocation(Location):
    """An fsspec URL; its storage options travel with it (pickled) but never into ``str()``."""

    renames = False

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = url.rstrip("/")
        self.options = dict(options)
        self.protocol = url.partition("://")[0]

    def __str__(self) -> str:
        return self.url

    def _fs(self) -> Any:
        """The fsspec file system (fsspec keeps one instance per protocol and options)."""
        import fsspec

        try:
            return fsspec.filesystem(self.protocol, **self.options)
        except ImportError as e:
            raise EtfError(f"{self.url}: {e}") from None
        except ValueError as e:
            raise EtfError(
                f"{self.url}: {e} (a cache is a local path or an fsspec URL such as s3://bucket/prefix)"
            ) from None
        except TypeError as e:
            raise EtfError(f"{self.url}: bad storage option ({e}); see --storage-option") from None

    @contextmanager
    def _io(self) -> Iterator[Any]:
        """The file system, with a failure of the remote end as one line naming the URL."""
        fs = self._fs()
        try:
            yield fs
        except (FileNotFoundError, EtfError):
            raise
        except Exception as e:  # network, credentials, permissions: whatever the backend raises
            raise EtfError(f"{self.url}: {type(e).__name__}: {str(e)[:200]}") from None

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemoteLocation:
        return RemoteLocation(self.url.rsplit("/", 1)[0], self.options)

    def __truediv__(self, part: str) -> RemoteLocation:
        return RemoteLocation(f"{self.url}/{part}", self.options)

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["options"])

    def exists(self) -> bool:
        with self._io() as fs:
            fs.invalidate_cache(self.url)  # not a listing cached before another process wrote it
            return fs.exists(self.url)

    def is_dir(self) -> bool:
        with self._io() as fs:
            fs.invalidate_cache(self.url)
            return fs.isdir(self.url)

    def children(self) -> list[str]:
        with self._io() as fs:
            fs.invalidate_cache(self.url)  # other processes (shards) write here too: list afresh
            try:
                entries = fs.ls(self.url, detail=False)
            except FileNotFoundError:
                return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})

    def read_bytes(self) -> bytes:
        with self._io() as fs:
            return fs.cat_file(self.url)

    def write_json(self, obj: Any) -> None:
        with self._io() as fs:
            fs.pipe_file(self.url, json_text(obj).encode())

    def remove(self) -> None:
        with self._io() as fs:
            try:
                fs.rm(self.url, recursive=True)
            except FileNotFoundError:
                pass

    def size(self) -> int:
        with self._io() as fs:
            return int(fs.du(self.url))

    def zarr_store(self, read_only: bool = False) -> Any:
        from zarr.storage import FsspecStore

        self._fs()  # an unknown protocol or a missing package: one line
        return FsspecStore.from_url(self.url, storage_options=self.options, read_only=read_only)

    @property
    def local_path(self) -> Path:
        raise EtfError(f"{self.url}: needs a local file system path")

    def lock(self) -> Any:
        return nullcontext()

    def absolute(self) -> str:
        return self.url

    def check_writable(self, flag: str) -> None:
        return None
