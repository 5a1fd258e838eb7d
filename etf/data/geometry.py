"""Labels that follow an augmented view's geometry.

A view is recorded as the 3x3 matrix that maps the clean image's pixel coordinates to the
view's (:mod:`etf.pipeline.extract.augment`). Here the labels that live in the image follow
it: landmark points are mapped by the matrix; when the matrix mirrors the image (negative
determinant) each point also takes its mirror partner's place (a left eye corner becomes a
right eye corner), by the permutation the dataset declares for its point scheme; the NME
normaliser scales with the view's local zoom at the face; head-pose yaw and roll change
sign under a mirror. A landmark dataset without a mirror map, and a pose dataset under a
view that rotates the face (roll would change by an angle no label rule follows), are
refused rather than trained on wrong targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from etf.data.labels import NME_NORM, point_columns
from etf.errors import EtfError

# Mirror partners, 0-based: point i of a mirrored face is point MIRROR[i] of the original.
#: iBUG 68 (300W): jaw, brows, nose, eyes, outer and inner mouth
MIRROR_68 = (
    *range(16, -1, -1),
    *range(26, 16, -1),
    27, 28, 29, 30,
    35, 34, 33, 32, 31,
    45, 44, 43, 42, 47, 46,
    39, 38, 37, 36, 41, 40,
    54, 53, 52, 51, 50, 49, 48,
    59, 58, 57, 56, 55,
    64, 63, 62, 61, 60,
    67, 66, 65,
)  # fmt: skip
#: WFLW 98: contour, brows (upper then lower), nose, eyes, outer and inner mouth, pupils
MIRROR_98 = (
    *range(32, -1, -1),
    46, 45, 44, 43, 42, 50, 49, 48, 47,
    37, 36, 35, 34, 33, 41, 40, 39, 38,
    51, 52, 53, 54,
    59, 58, 57, 56, 55,
    72, 71, 70, 69, 68, 75, 74, 73,
    64, 63, 62, 61, 60, 67, 66, 65,
    82, 81, 80, 79, 78, 77, 76, 87, 86, 85, 84, 83,
    92, 91, 90, 89, 88, 95, 94, 93,
    97, 96,
)  # fmt: skip
#: the five points of ``meta["landmarks5"]``: eyes, nose tip, mouth corners
MIRROR_5 = (1, 0, 2, 4, 3)
#: by number of points, for datasets that declare their scheme by size
MIRRORS = {68: MIRROR_68, 98: MIRROR_98, 5: MIRROR_5}


def is_mirror(matrix: np.ndarray) -> np.ndarray:
    """Whether the view mirrors the image (its linear part reverses orientation), for one
    3x3 matrix or a stack of them."""
    return np.linalg.det(matrix[..., :2, :2]) < 0


def rotation_degrees(matrix: np.ndarray) -> float:
    """The in-plane rotation of a view's linear part, mirror removed, in degrees."""
    a = matrix[:2, :2] / matrix[2, 2]
    if is_mirror(matrix):
        a = a @ np.diag([-1.0, 1.0])
    return float(np.degrees(np.arctan2(a[1, 0], a[0, 0])))


def _zoom(matrix: np.ndarray, at: np.ndarray) -> float:
    """The view's linear scale at point ``at`` (the square root of its Jacobian's determinant)."""
    x, y = at
    h = matrix
    w = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    u = (h[0, 0] * x + h[0, 1] * y + h[0, 2]) / w
    v = (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / w
    jac = np.array(
        [
            [(h[0, 0] - u * h[2, 0]) / w, (h[0, 1] - u * h[2, 1]) / w],
            [(h[1, 0] - v * h[2, 0]) / w, (h[1, 1] - v * h[2, 1]) / w],
        ]
    )
    return float(np.sqrt(abs(np.linalg.det(jac))))


def apply_homography(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(K, 2) points through a 3x3 projective matrix."""
    p = np.c_[points, np.ones(len(points))] @ matrix.T
    return p[:, :2] / p[:, 2:3]


def view_labels(
    labels: dict[str, Any],
    matrix: np.ndarray,
    mirrors: dict[str, Sequence[int]],
    flip_sign: Sequence[str] = (),
) -> dict[str, Any]:
    """One sample's labels as they are in a view (``matrix``: clean -> view pixels).

    ``mirrors`` maps a landmark prefix to its mirror permutation; ``flip_sign`` names the
    columns (head-pose yaw and roll) whose sign a mirror reverses.
    """
    out = dict(labels)
    mirrored = is_mirror(matrix)
    centre = None
    for prefix, pairs in point_columns(labels).items():
        xs = [labels.get(cx) for cx, _ in pairs]
        ys = [labels.get(cy) for _, cy in pairs]
        if any(v is None for v in xs + ys):
            continue
        pts = apply_homography(matrix, np.c_[xs, ys].astype(np.float64))
        if mirrored:
            pts = pts[list(mirrors[prefix])]
        for (cx, cy), (x, y) in zip(pairs, pts):
            out[cx], out[cy] = float(x), float(y)
        centre = np.mean(np.c_[xs, ys].astype(np.float64), axis=0) if centre is None else centre
    if labels.get(NME_NORM) is not None:
        out[NME_NORM] = float(labels[NME_NORM]) * _zoom(matrix, centre if centre is not None else np.zeros(2))
    if mirrored:
        for col in flip_sign:
            if labels.get(col) is not None:
                out[col] = -float(labels[col])
    return out


def check_views(
    columns: Sequence[str],
    matrices: np.ndarray,
    mirrors: dict[str, Sequence[int]],
    rotation_sensitive: Sequence[str],
    where: str,
) -> None:
    """Refuse views whose geometry these label columns cannot follow (before any training).

    ``matrices`` (N, V, 3, 3): every sample's views.
    """
    flat = matrices.reshape(-1, 3, 3)
    mirrored = np.linalg.det(flat[:, :2, :2]) < 0
    for prefix, pairs in point_columns(columns).items():
        if mirrored.any() and prefix not in mirrors:
            raise EtfError(
                f"{where}: views mirror the faces, but the dataset declares no left/right mirror map for landmarks "
                f"{prefix!r} ({len(pairs)} points); extract views without flip, or give the dataset its mirror map"
            )
        if prefix in mirrors and len(mirrors[prefix]) != len(pairs):
            raise EtfError(
                f"{where}: the mirror map of {prefix!r} has {len(mirrors[prefix])} points, the labels {len(pairs)}"
            )
    turning = [c for c in rotation_sensitive if c in columns]
    if turning:
        angles = np.array([abs(rotation_degrees(m)) for m in flat])
        if (angles > 0.5).any():
            raise EtfError(
                f"{where}: views rotate the faces by up to {angles.max():.0f} degrees, which changes {', '.join(turning)}; "
                "extract views for head pose without rotate and perspective"
            )


def view_samples(
    samples: list[Any], matrices: np.ndarray, mirrors: dict[str, Sequence[int]], flip_sign: Sequence[str]
) -> list[Any]:
    """``samples`` with labels as in one view each (``matrices`` (N, 3, 3), one per sample)."""
    return [replace(s, labels=view_labels(dict(s.labels), m, mirrors, flip_sign)) for s, m in zip(samples, matrices)]
