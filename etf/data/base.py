"""Datasets as ordered lists of samples, and the registry of on-disk formats.

An adapter turns a dataset as distributed (folders, annotation files) into a
:class:`Dataset`: ordered :class:`Sample` records with an id, an image path, a split and
labels. Everything downstream (the cache key, extraction, fitting) sees only this.
Adding a dataset means writing one function and decorating it with :func:`register_dataset`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from etf.errors import EtfError
from etf.utils import spec_hash

SPLITS = ("train", "val", "test")
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    ``id`` is the sample's stable name (its path relative to the dataset root, or the
    ``path`` column of a CSV as written); ``labels`` maps a label column to a number, a list
    of numbers, or ``None`` when the label is missing (column and task conventions:
    :mod:`etf.data.labels`); ``meta`` carries what crops need, in source pixels: ``box`` as
    x0, y0, x1, y1, and ``landmarks5`` as five [x, y] points, the image-left eye, image-right
    eye, nose tip, left and right mouth corners. ``group`` is what a hold-out must not cut
    (the subject, identity or source image), or None where the dataset has no such unit.
    """

    id: str
    path: Path
    split: str
    labels: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    group: str | None = None


@dataclass(frozen=True)
class MetaSource:
    """Where a crop's metadata (``box``, ``landmarks5``) comes from, as recorded with the
    crop; ``ground_truth``: derived from the labels a model is evaluated on (a crop aligned
    by them would hand the test its answer)."""

    what: str
    ground_truth: bool = False


@dataclass
class Dataset:
    """An ordered, immutable list of samples plus what describes them.

    ``key`` hashes everything that defines the data (adapter name, options, ids, splits,
    labels, the images' content, crop metadata, pairs) but not the root directory, so a
    moved dataset keeps its cache, while a changed image, label or pair list makes a new one.

    ``pairs`` holds verification protocols per split: ``{split: {"a": [ids], "b": [ids],
    "same": [1 or 0], "fold": [k]}}`` (``fold`` optional); both samples of a pair belong
    to that split. ``group_by`` names what the samples' ``group`` is (``subject``, ...);
    ``meta_sources`` says where each kind of crop metadata comes from.

    What augmented views need to carry the labels (:mod:`etf.data.geometry`): ``mirrors``
    maps each landmark prefix to its left/right mirror permutation (a landmark dataset
    without one cannot train on flipped views); ``flip_sign`` names the columns whose sign
    a mirror reverses (head-pose yaw and roll); ``rotation_sensitive`` those an in-plane
    rotation changes (the pose angles), so that rotating views are refused for them.
    """

    name: str
    root: Path
    samples: list[Sample]
    options: dict[str, Any] = field(default_factory=dict)
    classes: dict[str, list[str]] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    pairs: dict[str, Any] | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    group_by: str | None = None
    meta_sources: dict[str, MetaSource] = field(default_factory=dict)
    mirrors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    flip_sign: tuple[str, ...] = ()
    rotation_sensitive: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.samples:
            raise EtfError(f"{self.describe()}: the dataset has no samples")
        seen: set[str] = set()
        for s in self.samples:
            if s.id in seen:
                raise EtfError(f"{self.describe()}: sample id {s.id!r} appears twice")
            seen.add(s.id)
            if s.split not in SPLITS and not s.split.startswith("test_"):
                raise EtfError(
                    f"{self.describe()}: sample {s.id!r} has split {s.split!r} (use train, val, test or test_<subset>)"
                )
        if self.pairs is not None:
            self._check_pairs()

    def _check_pairs(self) -> None:
        split_of = {s.id: s.split for s in self.samples}
        for split, p in self.pairs.items():
            where = f"{self.describe()}: pairs of split {split!r}"
            keys = ["a", "b", "same", *(["fold"] if "fold" in p else [])]
            if len({len(p.get(k, ())) for k in keys}) != 1 or not p.get("a"):
                raise EtfError(f"{where}: need non-empty lists {', '.join(keys)} of equal length")
            for k, sid in enumerate(p["a"] + p["b"]):
                if split_of.get(sid) != split:
                    raise EtfError(
                        f"{where}: pair {k % len(p['a']) + 1} names {sid!r}, which is not a {split} sample of the dataset"
                    )
            if not set(p["same"]) <= {0, 1}:
                raise EtfError(f"{where}: 'same' must hold 1 (match) or 0 (mismatch)")

    def describe(self) -> str:
        return f"{self.name}:{self.root}"

    def __len__(self) -> int:
        return len(self.samples)

    @cached_property
    def ids(self) -> list[str]:
        """Cached like ``key``: callers index it per sample, and a fresh list per access made
        extraction quadratic in N. (Crops relabel samples; they keep ids and splits.)"""
        return [s.id for s in self.samples]

    @cached_property
    def splits(self) -> list[str]:
        return [s.split for s in self.samples]

    @property
    def groups(self) -> list[str] | None:
        """Per sample, the unit a hold-out keeps whole (a sample without a group is its own);
        None when no sample has a group."""
        if all(s.group is None for s in self.samples):
            return None
        return [s.id if s.group is None else s.group for s in self.samples]

    @cached_property
    def label_columns(self) -> list[str]:
        cols: dict[str, None] = {}
        for s in self.samples:
            cols.update(dict.fromkeys(s.labels))
        return list(cols)

    def column(self, name: str) -> list[Any]:
        """One label column in sample order (``None`` where a sample lacks it)."""
        if name not in self.label_columns:
            raise EtfError(
                f"{self.describe()}: no label column {name!r} (columns: {', '.join(self.label_columns) or 'none'})"
            )
        return [s.labels.get(name) for s in self.samples]

    @cached_property
    def content(self) -> str:
        """A digest of every sample's image bytes, in order (:mod:`etf.data.content`): an
        image changed in place under the same name gives a new dataset key."""
        from etf.data.content import content_digest

        return content_digest([s.path for s in self.samples])

    def spec(self) -> dict[str, Any]:
        """The canonical description whose hash is the dataset key."""
        spec: dict[str, Any] = {
            "name": self.name,
            "options": self.options,
            "ids": self.ids,
            "splits": self.splits,
            "labels": {c: self.column(c) for c in self.label_columns},
            "classes": self.classes,
            "content": self.content,
        }
        if any(s.meta for s in self.samples):
            spec["meta"] = [dict(s.meta) for s in self.samples]
        if any(s.group is not None for s in self.samples):
            spec["groups"] = [s.group for s in self.samples]
        if self.pairs is not None:
            spec["pairs"] = self.pairs
        return spec

    @cached_property
    def key(self) -> str:
        return spec_hash(self.spec())

    def manifest(self) -> dict[str, Any]:
        """What ``manifest.json`` holds: the spec, plus where it was read from and what was skipped."""
        return {
            "etf_manifest": MANIFEST_VERSION,
            "key": self.key,
            "root": str(self.root),
            "tasks": self.tasks,
            "skipped": self.skipped,
            **({"group_by": self.group_by} if self.group_by else {}),
            **self.spec(),
        }

    def load_image(self, index: int):
        """The RGB image of sample ``index``, cropped as the dataset's ``crop`` option says."""
        from etf.data.crop import apply_crop
        from etf.data.images import load_rgb

        sample = self.samples[index]
        return apply_crop(load_rgb(sample.path), sample, self.options.get("crop", "none"))


@dataclass(frozen=True)
class Adapter:
    """A registered dataset format: the loader function and what ``etf data list`` shows."""

    name: str
    load: Callable[..., Dataset]
    description: str
    layout: str
    tasks: tuple[str, ...]
    metric: str
    embedded: bool

    @property
    def options(self) -> dict[str, inspect.Parameter]:
        params = list(inspect.signature(self.load).parameters.values())
        return {p.name: p for p in params[0 if self.embedded else 1 :]}


_REGISTRY: dict[str, Adapter] = {}


def register_dataset(
    name: str,
    *,
    description: str,
    layout: str,
    tasks: Sequence[str] = (),
    metric: str = "",
    embedded: bool = False,
) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Register ``load(root, **options) -> Dataset`` (``load(**options)`` when embedded).

    Keyword parameters of ``load`` with defaults are the dataset's options; their
    annotations (int, float, str, bool) say how ``?key=value`` strings convert.
    """

    def deco(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} registered twice")
        _REGISTRY[name] = Adapter(name, fn, description, layout, tuple(tasks), metric, embedded)
        return fn

    return deco


def list_datasets() -> list[Adapter]:
    _import_adapters()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_adapter(name: str) -> Adapter:
    _import_adapters()
    if name not in _REGISTRY:
        raise EtfError(f"unknown dataset format {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def _import_adapters() -> None:
    import etf.data.datasets  # noqa: F401  (registers every adapter)


def _convert(value: str, param: inspect.Parameter, where: str) -> Any:
    kind = param.annotation if param.annotation is not inspect.Parameter.empty else str
    if isinstance(kind, str):  # postponed annotations
        kind = {"int": int, "float": float, "bool": bool, "str": str}.get(kind.split("|")[0].strip(), str)
    try:
        if kind is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        return kind(value)
    except ValueError:
        raise EtfError(f"{where}: option {param.name}={value!r} is not a valid {kind.__name__}") from None


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """Split ``NAME:ROOT?key=value&...`` (or an embedded ``NAME?...``) into its parts."""
    head, _, query = spec.partition("?")
    name, sep, root = head.partition(":")
    if not name:
        raise EtfError(f"--data {spec!r}: expected FORMAT:PATH or an embedded dataset name")
    return name, (root if sep else None), dict(parse_qsl(query, keep_blank_values=True))


GENERIC_OPTIONS = ("crop", "landmarks5")


def load_dataset(spec: str, *, require_files: bool = True, **overrides: Any) -> Dataset:
    """Load ``--data SPEC``; ``overrides`` (e.g. from ``--crop``) win over ``?key=value`` options.

    ``crop`` and ``landmarks5`` (a file of five points per sample for ``--crop align5``)
    apply to every format; the other options are the adapter's own. A crop also maps
    landmark labels into crop coordinates, here, for every format, and records what it read
    (``crop_source``). Missing image files are an error unless ``require_files`` is false
    (``etf data check`` reports them instead).
    """
    from etf.data.crop import crop_labels, crop_source, parse_crop, read_landmarks5

    name, root, options = parse_spec(spec)
    adapter = get_adapter(name)
    options.update({k: str(v) for k, v in overrides.items() if v is not None})
    crop = parse_crop(options.pop("crop", "none"))
    landmarks5 = options.pop("landmarks5", None)
    options.pop("crop_source", None)  # what a crop read: recorded in the options, recomputed here
    known = adapter.options
    for key in options:
        if key not in known:
            accepted = ", ".join([*known, *GENERIC_OPTIONS])
            raise EtfError(f"--data {spec!r}: {name} has no option {key!r} (options: {accepted})")
    kwargs = {k: _convert(v, known[k], f"--data {spec!r}") for k, v in options.items()}
    if adapter.embedded:
        if root:
            raise EtfError(f"--data {spec!r}: {name} is embedded and takes no path")
        dataset = adapter.load(**kwargs)
    else:
        if not root:
            raise EtfError(f"--data {spec!r}: {name} needs a path, e.g. {name}:/data/{name}")
        path = Path(os.path.expanduser(root))
        if not path.exists():
            raise EtfError(f"--data {spec!r}: {path} does not exist")
        dataset = adapter.load(path, **kwargs)
    dataset.options = {**{k: v.default for k, v in known.items()}, **kwargs}
    where = f"--data {spec!r}"
    if landmarks5 is not None:
        if not crop.startswith("align5"):
            raise EtfError(f"{where}: landmarks5= gives the five points of --crop align5, which is not set")
        file = Path(os.path.expanduser(landmarks5))
        dataset.samples = read_landmarks5(file, dataset.samples, where)
        dataset.meta_sources["landmarks5"] = MetaSource(f"{file.name} (landmarks5=)")
    if crop != "none":
        dataset.options["crop"] = crop
        dataset.options["crop_source"] = crop_source(dataset, crop, where)
        dataset.samples = crop_labels(dataset.samples, crop, where)
    require_utf8_names(dataset)
    if require_files:
        require_images(dataset)
    if not dataset.tasks:
        dataset.tasks = list(adapter.tasks)
    return dataset


def require_utf8_names(dataset: Dataset) -> None:
    """Sample ids go into manifests and keys as UTF-8: a file name in another encoding (which
    Python carries as surrogates) is one error naming it, not a failure at the first write."""
    for s in dataset.samples:
        try:
            s.id.encode("utf-8")
        except UnicodeEncodeError:
            shown = s.id.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise EtfError(
                f"{dataset.describe()}: the file name '{shown}' is not UTF-8; rename it "
                "(convmv -f latin1 -t utf8 renames a folder's names)"
            ) from None


def require_images(dataset: Dataset) -> None:
    """One error naming the first sample whose image file is missing, and how many are."""
    missing = [s for s in dataset.samples if not s.path.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise EtfError(f"{dataset.describe()}: image not found for sample {missing[0].id!r}: {missing[0].path}{more}")
