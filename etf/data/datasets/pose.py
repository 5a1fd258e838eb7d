"""Head pose: ``aflw2000:ROOT`` (train 300W-LP, test AFLW2000) and ``300w-lp:ROOT`` alone.

Both ship ``<name>.jpg`` next to ``<name>.mat`` (3DDFA fits). ``Pose_Para``'s first three
values are pitch, yaw, roll in radians; the labels ``yaw``, ``pitch``, ``roll`` are in
degrees. Samples with any angle beyond +-99 degrees are left out (the usual filter: 1969
of AFLW2000's 2000 images remain). ``meta["box"]`` is the box around the 2-D landmarks
(``pt2d``, points at negative coordinates being invisible ones; ``pt3d_68`` when there is
no usable ``pt2d``), so ``--crop bbox:0.2`` gives the customary loose face crop. No
``landmarks5`` is offered: an aligning crop rotates the face and would change roll.

- ``aflw2000:ROOT``: ``ROOT/AFLW2000/`` is the test set and ``ROOT/300W_LP/`` the train set,
  the standard protocol; ``train=false`` reads AFLW2000 alone (``ROOT`` may then be the
  AFLW2000 folder itself), e.g. to evaluate elsewhere-trained models.
- ``300w-lp:ROOT``: ``ROOT/300W_LP/`` (or ``ROOT`` itself) alone, all train, with a seeded
  ``val`` hold-out; its eight subsets AFW, HELEN, IBUG, LFPW and their ``_Flip`` mirrors
  (whose ``.mat`` files hold the mirrored pose) are all required.

A 300W-LP image's group is the 300W photograph it was synthesised from
(``AFW_134212_1_0.jpg``: image 134212, face 1, view 0): its ``_Flip`` mirror, every view and,
for AFW, HELEN and IBUG, every face of that photograph. Hold-outs of train keep a group
together, so no view of a validation face is trained on.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.io

from etf.data.base import Dataset, MetaSource, Sample, register_dataset
from etf.data.datasets._common import box_of, hold_out
from etf.errors import EtfError

LP_SUBSETS = ("AFW", "AFW_Flip", "HELEN", "HELEN_Flip", "IBUG", "IBUG_Flip", "LFPW", "LFPW_Flip")
MAX_ANGLE = 99.0
TASK = "regress:yaw,pitch,roll"
#: subsets whose 300W names carry a face index before the view index
FACE_INDEXED = ("AFW", "HELEN", "IBUG")
BOX = {"box": MetaSource("the tight box of the 3DDFA fit's 2-D landmarks (pt2d)")}
_NUMBER = re.compile(r"_\d+$")


def source_image(subset: str, stem: str) -> str:
    """The 300W photograph a 300W-LP image was synthesised from: the subset without
    ``_Flip`` and the name without its view (and face) index."""
    base = subset.removesuffix("_Flip")
    stem = _NUMBER.sub("", stem)
    return f"{base}/{_NUMBER.sub('', stem) if base in FACE_INDEXED else stem}"


def read_pose(path: Path) -> tuple[dict[str, float], list[float] | None]:
    """(yaw, pitch, roll in degrees; the landmark box or None) from a 3DDFA ``.mat`` file."""
    try:
        mat = scipy.io.loadmat(path, variable_names=["Pose_Para", "pt2d", "pt3d_68"])
    except Exception as e:  # scipy raises several types for non-MAT or truncated files
        raise EtfError(f"{path}: not a readable .mat file ({type(e).__name__}: {e})") from None
    pose = np.asarray(mat.get("Pose_Para", []), dtype=np.float64).ravel()
    if pose.size < 3 or not np.isfinite(pose[:3]).all():
        raise EtfError(f"{path}: Pose_Para must hold at least three finite values (pitch, yaw, roll)")
    pitch, yaw, roll = (math.degrees(v) for v in pose[:3])
    return {"yaw": yaw, "pitch": pitch, "roll": roll}, _box(mat)


def _box(mat: dict) -> list[float] | None:
    for key in ("pt2d", "pt3d_68"):
        pts = np.asarray(mat.get(key, np.empty((2, 0))), dtype=np.float64)
        if pts.ndim == 2 and pts.shape[0] in (2, 3):
            pts = pts[:2].T
            pts = pts[(pts >= 0).all(1)]
            if len(pts) >= 2 and np.ptp(pts, 0).min() > 0:
                return box_of(pts)
    return None


def pose_samples(root: Path, folder: Path, split: str) -> list[Sample]:
    """Every ``.jpg`` + ``.mat`` pair in ``folder`` within the angle range."""
    files = sorted(folder.glob("*.mat"))
    if not files:
        raise EtfError(f"{folder}: no .mat files (expected <name>.jpg with <name>.mat)")
    samples = []
    for mat in files:
        angles, box = read_pose(mat)
        if max(abs(a) for a in angles.values()) <= MAX_ANGLE:
            image = mat.with_suffix(".jpg")
            samples.append(
                Sample(image.relative_to(root).as_posix(), image, split, angles, {"box": box} if box else {})
            )
    return samples


def lp_samples(root: Path, base: Path) -> list[Sample]:
    missing = [s for s in LP_SUBSETS if not (base / s).is_dir()]
    if missing:
        raise EtfError(f"{base}: 300W-LP subset folder {missing[0]}/ not found (expected {', '.join(LP_SUBSETS)})")
    return [
        replace(s, group=source_image(name, s.path.stem))
        for name in LP_SUBSETS
        for s in pose_samples(root, base / name, "train")
    ]


@register_dataset(
    "aflw2000",
    description="head pose: train 300W-LP, test AFLW2000 (yaw, pitch, roll in degrees, |angle| <= 99)",
    layout="ROOT/AFLW2000/*.jpg+.mat and ROOT/300W_LP/{AFW,HELEN,IBUG,LFPW}{,_Flip}/*.jpg+.mat",
    tasks=(TASK,),
    metric="mae",
)
def load_aflw2000(root: Path, train: bool = True, val: float = 0.0, seed: int = 0) -> Dataset:
    test_dir = root / "AFLW2000" if (root / "AFLW2000").is_dir() or train else root
    if train and not (root / "300W_LP").is_dir():
        raise EtfError(
            f"aflw2000:{root}: no 300W_LP/ folder (the training set); add it, or use ?train=false for AFLW2000 alone"
        )
    samples = lp_samples(root, root / "300W_LP") if train else []
    samples += pose_samples(root, test_dir, "test")
    samples = hold_out(samples, val, seed, f"aflw2000:{root}")
    return Dataset("aflw2000", root, samples, group_by="source image", meta_sources=dict(BOX))


@register_dataset(
    "300w-lp",
    description="300W-LP head pose (with flips), all train; seeded val hold-out",
    layout="ROOT/300W_LP/{AFW,HELEN,IBUG,LFPW}{,_Flip}/*.jpg+.mat (or ROOT = the 300W_LP folder)",
    tasks=(TASK,),
    metric="mae",
)
def load_300w_lp(root: Path, val: float = 0.0, seed: int = 0) -> Dataset:
    base = root / "300W_LP" if (root / "300W_LP").is_dir() else root
    samples = hold_out(lp_samples(root, base), val, seed, f"300w-lp:{root}")
    return Dataset("300w-lp", root, samples, group_by="source image", meta_sources=dict(BOX))
