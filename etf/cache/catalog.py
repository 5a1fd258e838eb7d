"""Where things live in a cache directory: manifests per dataset key, stores per encoder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etf.errors import EtfError
from etf.utils import read_json, write_json_atomic

STORE_RE = re.compile(r"^(?P<name>.+)-(?P<hash>[0-9a-f]{16})\.(?P<ext>zarr|h5)(?P<partial>\.partial)?$")


def dataset_dir(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / key


def write_manifest(cache_dir: Path, dataset: Any, skipped: dict[str, str] | None = None) -> Path:
    """Write ``manifest.json`` for ``dataset`` (atomic), merging newly skipped sample ids.

    Skipped entries are those the adapter could not use (kept from ``Dataset.skipped``) and
    samples whose image could not be decoded under ``--on-error skip``, which every store of
    the dataset leaves out when read.
    """
    path = dataset_dir(cache_dir, dataset.key) / "manifest.json"
    manifest = dataset.manifest()
    old = read_json(path) if path.exists() else {}
    known = {s["id"]: s for s in [*manifest["skipped"], *old.get("skipped", [])]}
    paths = dict(zip(dataset.ids, (str(s.path) for s in dataset.samples)))
    for sid, why in (skipped or {}).items():
        known.setdefault(sid, {"id": sid, "path": paths.get(sid, ""), "reason": why})
    manifest["skipped"] = sorted(known.values(), key=lambda s: s["id"])
    if manifest != old:
        write_json_atomic(path, manifest)
    return path


def read_manifest(cache_dir: Path, key: str) -> dict[str, Any]:
    return read_json(dataset_dir(cache_dir, key) / "manifest.json")


@dataclass(frozen=True)
class StoreEntry:
    path: Path
    dataset_key: str
    name: str
    spec_hash: str
    complete: bool

    @property
    def label(self) -> str:
        return f"{self.name}-{self.spec_hash}"


def list_stores(cache_dir: Path, dataset_key: str | None = None) -> list[StoreEntry]:
    """Every store (complete or partial) under ``cache_dir``, optionally for one dataset."""
    root = Path(cache_dir)
    dirs = (
        [root / dataset_key]
        if dataset_key
        else sorted(p for p in root.iterdir() if p.is_dir())
        if root.is_dir()
        else []
    )
    out = []
    for d in dirs:
        for p in sorted(d.iterdir()) if d.is_dir() else []:
            m = STORE_RE.match(p.name)
            if m:
                out.append(StoreEntry(p, d.name, m["name"], m["hash"], m["partial"] is None))
    return out


def find_store(cache_dir: Path, dataset_key: str, name: str) -> Path:
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
