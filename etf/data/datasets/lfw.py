"""``lfw:ROOT``: Labeled Faces in the Wild with its verification protocols.

ROOT holds the images as ``<images>/<Name>/<Name>_0001.jpg`` (``<images>`` is ``lfw``,
``lfw_funneled`` or ``lfw-deepfunneled``, or ROOT itself) and the protocol files beside
them or inside ``<images>``. scikit-learn's data home works as ROOT too, as
``~/scikit_learn_data`` or its ``lfw_home`` (``lfw_funneled/`` + ``pairs.txt``, ...).

- ``view=2`` (default; the protocol papers report): the test split is every image that
  ``pairs.txt`` names, with its ten folds of 300 matched (``name n1 n2``) and 300
  mismatched (``name1 n1 name2 n2``) pairs. Train is every image of the people no pair
  names, so it shares no identity with the test; other images of pair-named people are
  left out. Most of those people have one image: train on an outside set (``folder:``)
  for real numbers.
- ``view=1`` (development): train is the people of ``peopleDevTrain.txt``, test those of
  ``peopleDevTest.txt`` (``count`` line, then ``name count``); test pairs come from
  ``pairsDevTest.txt`` when present, else verification draws them from the identities.

Sample ids are paths relative to ROOT, so funneled and original images never share a key.
The identity is each image's group (hold-outs of train keep a person's images together).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from etf.data.base import Dataset, Sample, register_dataset
from etf.data.datasets._common import annotation_error, integer, read_rows
from etf.data.images import IMAGE_SUFFIXES
from etf.errors import EtfError

IMAGE_DIRS = ("lfw", "lfw_funneled", "lfw-deepfunneled")


@dataclass(frozen=True)
class Pair:
    """One line of a pairs file: the two sample ids, whether they match, the fold and the line."""

    a: str
    b: str
    same: int
    fold: int
    line: int


class LfwLayout:
    """Where the images and protocol files of one LFW copy are, and image ids by name and number."""

    def __init__(self, root: Path) -> None:
        self.base = root / "lfw_home" if (root / "lfw_home").is_dir() else root
        found = [self.base / d for d in IMAGE_DIRS if (self.base / d).is_dir()]
        if len(found) > 1:
            raise EtfError(
                f"lfw:{root}: several image folders ({', '.join(p.name for p in found)}); pass ROOT/<one of them> with its protocol files"
            )
        self.images = found[0] if found else self.base

    def file(self, name: str) -> Path | None:
        for folder in (self.base, self.images):
            if (folder / name).is_file():
                return folder / name
        return None

    def require(self, name: str, why: str) -> Path:
        path = self.file(name)
        if path is None:
            raise EtfError(f"lfw:{self.base}: no {name} ({why}); looked in {self.base} and {self.images}")
        return path

    def image(self, name: str, number: int, path: Path, line: int) -> str:
        """The sample id of image ``number`` of ``name``, which must exist."""
        file = self.images / name / f"{name}_{number:04d}.jpg"
        if not file.is_file():
            raise annotation_error(path, line, f"image {file.relative_to(self.base).as_posix()} not found")
        return file.relative_to(self.base).as_posix()

    def person(self, name: str) -> list[str]:
        folder = self.images / name
        return sorted(
            p.relative_to(self.base).as_posix() for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        )

    def people(self) -> list[str]:
        return sorted(d.name for d in self.images.iterdir() if d.is_dir())


def read_pairs(path: Path, layout: LfwLayout) -> list[Pair]:
    """A pairs file: header ``FOLDS PER`` (or ``PER`` for one fold), then per fold ``PER``
    matched and ``PER`` mismatched pairs, each naming existing images."""
    rows = read_rows(path)
    if not rows or len(rows[0][1]) not in (1, 2):
        raise annotation_error(
            path, rows[0][0] if rows else 1, "expected a header 'FOLDS<tab>PAIRS' (e.g. 10 300) or 'PAIRS'"
        )
    head = [integer(f, path, rows[0][0]) for f in rows[0][1]]
    folds, per = head if len(head) == 2 else (1, head[0])
    body, expected = rows[1:], 2 * folds * per
    pairs = []
    for k, (line, fields) in enumerate(body[:expected]):
        fold, r = divmod(k, 2 * per)
        matched = r < per
        if len(fields) != (3 if matched else 4):
            shape = "matched pair (name n1 n2)" if matched else "mismatched pair (name1 n1 name2 n2)"
            raise annotation_error(
                path,
                line,
                f"expected a {shape}, pair {r % per + 1} of fold {fold + 1}; the header says "
                f"{folds} folds of {per} matched then {per} mismatched pairs",
            )
        second = [fields[0], fields[2]] if matched else fields[2:]
        a, b = (layout.image(n, integer(i, path, line), path, line) for n, i in (fields[:2], second))
        pairs.append(Pair(a, b, int(matched), fold, line))
    if len(body) != expected:
        raise EtfError(
            f"{path}: the header says {folds} folds of {per} matched + {per} mismatched pairs "
            f"({expected} lines) but the file has {len(body)} pair lines"
        )
    return pairs


def read_people(path: Path, layout: LfwLayout) -> list[tuple[int, str, list[str]]]:
    """A people file (``COUNT``, then ``name count`` lines): line, name and image ids of each person."""
    rows = read_rows(path)
    if not rows:
        raise EtfError(f"{path}: empty")
    declared = integer(rows[0][1][0], path, rows[0][0])
    if declared != len(rows) - 1:
        raise annotation_error(path, rows[0][0], f"says {declared} people but the file lists {len(rows) - 1}")
    people = []
    for line, fields in rows[1:]:
        if len(fields) != 2:
            raise annotation_error(path, line, "expected 'name<tab>count'")
        count = integer(fields[1], path, line)
        people.append((line, fields[0], [layout.image(fields[0], n, path, line) for n in range(1, count + 1)]))
    return people


def _identity(sample_id: str) -> str:
    return sample_id.split("/")[-2]


def _dataset(root: Path, layout: LfwLayout, split_of: dict[str, str], pairs: list[Pair] | None) -> Dataset:
    names = sorted({_identity(s) for s in split_of})
    index = {n: i for i, n in enumerate(names)}
    samples = [
        Sample(s, layout.base / s, split_of[s], {"identity": index[_identity(s)]}, group=_identity(s))
        for s in sorted(split_of)
    ]
    protocol = None
    if pairs:
        protocol = {"test": {"a": [p.a for p in pairs], "b": [p.b for p in pairs], "same": [p.same for p in pairs]}}
        if len({p.fold for p in pairs}) > 1:
            protocol["test"]["fold"] = [p.fold for p in pairs]
    return Dataset("lfw", root, samples, classes={"identity": names}, pairs=protocol, group_by="identity")


def _dev_view(root: Path, layout: LfwLayout) -> Dataset:
    """View 1: people-disjoint train and test lists, and pairsDevTest.txt when present."""
    why = "view=1 needs peopleDevTrain.txt and peopleDevTest.txt (scikit-learn's data home has only pair lists: use view=2)"
    train_file, test_file = (layout.require(f, why) for f in ("peopleDevTrain.txt", "peopleDevTest.txt"))
    train, test = read_people(train_file, layout), read_people(test_file, layout)
    train_people = {name for _, name, _ in train}
    for line, name, _ in test:
        if name in train_people:
            raise annotation_error(
                test_file, line, f"{name} is also in {train_file.name}; the dev view's people are disjoint"
            )
    split_of = {s: split for split, people in (("train", train), ("test", test)) for _, _, ids in people for s in ids}
    pairs_file = layout.file("pairsDevTest.txt")
    pairs = read_pairs(pairs_file, layout) if pairs_file else None
    for p in pairs or ():
        if split_of.get(p.a) != "test" or split_of.get(p.b) != "test":
            raise annotation_error(pairs_file, p.line, f"names an image that is not one of {test_file.name}'s people")
    return _dataset(root, layout, split_of, pairs)


@register_dataset(
    "lfw",
    description="Labeled Faces in the Wild: identity labels and the 10-fold pairs protocol (view=2) or the dev view (view=1)",
    layout="ROOT/{lfw,lfw_funneled,lfw-deepfunneled}/<Name>/<Name>_0001.jpg + pairs.txt (peopleDevTrain/Test.txt, pairsDevTest.txt for view=1); or scikit-learn's lfw_home",
    tasks=("verify:identity",),
    metric="accuracy_10fold",
)
def load_lfw(root: Path, view: int = 2) -> Dataset:
    layout = LfwLayout(root)
    if view == 2:
        pairs = read_pairs(layout.require("pairs.txt", "the view 2 protocol"), layout)
        test = sorted({s for p in pairs for s in (p.a, p.b)})
        named = {_identity(s) for s in test}
        train = [s for person in layout.people() if person not in named for s in layout.person(person)]
        return _dataset(root, layout, {**dict.fromkeys(train, "train"), **dict.fromkeys(test, "test")}, pairs)
    if view == 1:
        return _dev_view(root, layout)
    raise EtfError(f"lfw:{root}: view={view}: use 1 (development) or 2 (the 10-fold pairs protocol)")
