"""``300w:ROOT``: 300W 68-point landmarks, the common/challenging protocol.

Layout as the iBUG site distributes the re-annotated sets: ``lfpw/trainset``,
``lfpw/testset``, ``helen/trainset``, ``helen/testset``, ``afw`` and ``ibug`` under ``ROOT``,
each image (``.jpg``/``.png``) next to its ``.pts`` file (``version: 1``, ``n_points: 68``,
``{``, 68 lines ``x y``, ``}``). Splits: train = lfpw/trainset + helen/trainset + afw (3148);
``test_common`` = lfpw/testset + helen/testset (554); ``test_challenging`` = ibug (135).
The full set is the two together: as NME is a per-sample mean, its value is the
sample-weighted mean of the two splits'. ``val`` holds out a seeded fraction of train.

Labels: ``lm<i>_x``, ``lm<i>_y`` (i = 0..67, as written in the ``.pts``, no 1-based shift)
and ``nme_norm`` = the inter-ocular distance, between the outer eye corners (points 36
and 45, 0-based). ``meta["box"]`` is the landmarks' tight box and ``meta["landmarks5"]``
the eye centres, nose tip and mouth corners. The images are whole scenes: use a crop
(``--crop bbox:0.1`` or so) for landmark fitting. Both come from the ground-truth landmarks,
so ``--crop align5`` is refused (it would align every test face by its own answer) unless
``?landmarks5=FILE`` gives detector landmarks; the box crop stays, recorded as what it is.

AFW and HELEN name a photograph's faces ``<image>_<k>``: the photograph is their group, so a
hold-out of train keeps its faces on one side.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from etf.data.base import Dataset, MetaSource, Sample, register_dataset
from etf.data.datasets._common import (
    FIVE_FROM_68,
    annotation_error,
    box_of,
    find,
    five_points,
    hold_out,
    landmark_labels,
    numbers,
    points_array,
    read_rows,
)
from etf.errors import EtfError

SUBSETS = {
    "lfpw/trainset": "train",
    "helen/trainset": "train",
    "afw": "train",
    "lfpw/testset": "test_common",
    "helen/testset": "test_common",
    "ibug": "test_challenging",
}
OUTER_EYE_CORNERS = (36, 45)
SOURCES = {
    "box": MetaSource("the tight box of the ground-truth landmarks", ground_truth=True),
    "landmarks5": MetaSource("five points of the ground-truth landmarks", ground_truth=True),
}
#: ``<image>_<k>``: face k of a photograph (AFW, HELEN)
_FACE = re.compile(r"^(\d+)_\d+$")


def read_pts(path: Path) -> np.ndarray:
    """The points of an iBUG ``.pts`` file."""
    rows = read_rows(path)
    head = [" ".join(f) for _, f in rows[:3]]
    if len(rows) < 4 or not head[0].startswith("version:") or not head[1].startswith("n_points:") or head[2] != "{":
        raise annotation_error(
            path, rows[0][0] if rows else 1, "expected 'version: 1', 'n_points: N', '{' header lines"
        )
    (count,) = numbers([head[1].partition(":")[2].strip()], path, rows[1][0], int)
    body = rows[3:]
    if len(body) != count + 1 or body[-1][1] != ["}"]:
        raise annotation_error(path, body[-1][0], f"expected {count} 'x y' lines and a closing '}}'")
    values = []
    for line, fields in body[:-1]:
        if len(fields) != 2:
            raise annotation_error(path, line, f"expected 'x y', got {' '.join(fields)!r}")
        values += numbers(fields, path, line)
    return points_array(values, path, body[0][0], count)


def _image(pts: Path) -> Path:
    for suffix in (".jpg", ".png", ".jpeg", ".JPG", ".PNG"):
        if pts.with_suffix(suffix).is_file():
            return pts.with_suffix(suffix)
    return pts.with_suffix(".jpg")


@register_dataset(
    "300w",
    description="300W 68-point landmarks: train 3148, test_common 554, test_challenging 135",
    layout="ROOT/{lfpw/trainset,lfpw/testset,helen/trainset,helen/testset,afw,ibug}/*.jpg|png + *.pts",
    tasks=("landmarks:lm",),
    metric="nme",
)
def load_300w(root: Path, val: float = 0.0, seed: int = 0) -> Dataset:
    samples = []
    for folder, split in SUBSETS.items():
        base = find(root, [folder], f"{folder}/ folder", "300w")
        files = sorted(base.glob("*.pts"))
        if not files:
            raise EtfError(f"300w:{root}: no .pts files in {folder}/")
        for pts in files:
            points = read_pts(pts)
            if len(points) != 68:
                raise annotation_error(pts, 2, f"expected 68 points, got {len(points)}")
            image = _image(pts)
            meta = {"box": box_of(points), "landmarks5": five_points(points, FIVE_FROM_68)}
            labels = landmark_labels(points, OUTER_EYE_CORNERS)
            face = _FACE.match(pts.stem)
            group = f"{folder}/{face[1]}" if face else None
            samples.append(Sample(image.relative_to(root).as_posix(), image, split, labels, meta, group))
    samples = hold_out(samples, val, seed, f"300w:{root}")
    return Dataset("300w", root, samples, group_by="photograph", meta_sources=dict(SOURCES))
