"""Where things live in a cache (a directory or a URL): manifests per dataset key, stores per encoder."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from etf.cache.location import Location, cache_location
from etf.cache.store import is_complete
from etf.errors import EtfError

CacheDir = str | os.PathLike | Location

STORE_RE = re.compile(r"^(?P<name>.+)-(?P<hash>[0-9a-f]{16})\.(?P<ext>zarr|h5)(?P<partial>\.partial)?$")


def store_name(path: str) -> str:
    """The encoder name a store was written under, from its path (``.../vit_b-<hash>.zarr``)."""
    tail = str(path).rstrip("/").rsplit("/", 1)[-1]
    m = STORE_RE.match(tail)
    return m.group("name") if m else tail


def dataset_dir(cache_dir: CacheDir, key: str) -> Location:
    return cache_location(cache_dir) / key


def write_manifest(cache_dir: CacheDir, dataset: Any, skipped: dict[str, str] | None = None) -> Location:
    """Write ``manifest.json`` for ``dataset`` (atomic), merging newly skipped sample ids.

    Skipped entries are those the adapter could not use (kept from ``Dataset.skipped``) and
    samples whose image could not be decoded under ``--on-error skip``, which every store of
    the dataset leaves out when read.
    """
    path = dataset_dir(cache_dir, dataset.key) / "manifest.json"
    manifest = dataset.manifest()
    old = path.read_json() if path.exists() else {}
    known = {s["id"]: s for s in [*manifest["skipped"], *old.get("skipped", [])]}
    paths = dict(zip(dataset.ids, (str(s.path) for s in dataset.samples)))
    for sid, why in (skipped or {}).items():
        known.setdefault(sid, {"id": sid, "path": paths.get(sid, ""), "reason": why})
    manifest["skipped"] = sorted(known.values(), key=lambda s: s["id"])
    if manifest != old:
        path.write_json(manifest)
    return path


def read_manifest(cache_dir: CacheDir, key: str) -> dict[str, Any]:
    return (dataset_dir(cache_dir, key) / "manifest.json").read_json()


@dataclass(frozen=True)
class StoreEntry:
    """One store of a cache: ``path`` is the store, or its staging folder while incomplete."""

    path: Location
    dataset_key: str
    name: str
    spec_hash: str
    complete: bool

    @property
    def label(self) -> str:
        return f"{self.name}-{self.spec_hash}"


def list_stores(cache_dir: CacheDir, dataset_key: str | None = None) -> list[StoreEntry]:
    """Every store (complete or partial) under ``cache_dir``, optionally for one dataset.

    On object storage a store being filled has both its staging folder and its arrays in
    place: it is listed once, as incomplete, until its root metadata is written."""
    root = cache_location(cache_dir)
    keys = [dataset_key] if dataset_key else [k for k in root.children() if (root / k).is_dir()]
    out = []
    for key in keys:
        d = root / key
        names = d.children()
        labels = dict.fromkeys(m.group("name", "hash", "ext") for m in map(STORE_RE.match, names) if m)
        for name, h, ext in labels:
            path, staged = d / f"{name}-{h}.{ext}", f"{name}-{h}.{ext}.partial"
            complete = path.name in names and is_complete(path)
            out.append(StoreEntry(path if complete or staged not in names else d / staged, key, name, h, complete))
    return out


def find_store(cache_dir: CacheDir, dataset_key: str, name: str) -> Location:
    """Resolve ``name`` (``vit_b``, or ``vit_b-<hash prefix>``) to one complete store.

    Refuses ambiguity: several complete stores for one encoder (different layers, tokens)
    must be told apart by a hash prefix.
    """
    entries = list_stores(cache_dir, dataset_key)
    matches = [e for e in entries if e.name == name or (e.label.startswith(name) and "-" in name)]
    done = [e for e in matches if e.complete]
    if len(done) == 1:
        return done[0].path
    if len(done) > 1:
        raise EtfError(
            f"encoder {name!r}: {len(done)} stores in {dataset_dir(cache_dir, dataset_key)} "
            f"({', '.join(e.label for e in done)}); name one as NAME-HASHPREFIX"
        )
    if matches:
        raise EtfError(
            f"encoder {name!r}: the store is incomplete ({matches[0].path.name}); re-run etf extract to finish it"
        )
    raise EtfError(
        f"encoder {name!r}: no store for this dataset in {cache_dir} (dataset key {dataset_key}); run etf extract first"
    )
