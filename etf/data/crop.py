"""Face crops recorded in the dataset spec, so a different crop makes a different cache key.

- ``none``: the image as stored.
- ``bbox[:MARGIN]``: the square of side ``max(w, h) * (1 + 2 * MARGIN)`` centred on
  ``meta["box"]``, its corner rounded to whole pixels, so the crop is a pure translation
  (no resampling). Squared because encoders take square inputs: a non-square crop would be
  stretched by the resize. Parts outside the image are black.
- ``align5[:SIZE]``: the similarity transform (rotation, uniform scale, translation; least
  squares, Umeyama) taking ``meta["landmarks5"]`` onto the ArcFace 112x112 five-point
  template scaled to SIZE x SIZE (default 112).

Where ``box`` and ``landmarks5`` come from is the adapter's (``Dataset.meta_sources``) and is
recorded as the ``crop_source`` option, so it is part of the dataset key. ``align5`` refuses
landmarks derived from the ground truth the model is evaluated on (300W, WFLW: their five
points are picked from the landmark labels); ``?landmarks5=FILE`` gives five points per
sample from elsewhere, e.g. a face detector's (a CSV ``id,x1,y1,...,x5,y5`` in source pixels,
in the order above), and replaces the adapter's for every sample.

Both are one 2x3 affine matrix from source to crop coordinates (:func:`crop_geometry`). The
image is warped with it and landmark label columns are mapped with it, in one place
(:func:`crop_labels`, called by ``load_dataset``), so labels always describe the image the
model sees. Coordinates are continuous, pixel ``i`` spanning ``[i, i + 1)`` as in PIL.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from etf.data.base import Dataset, MetaSource, Sample
from etf.data.labels import NME_NORM, point_columns
from etf.errors import EtfError

ALIGN_SIZE = 112
# ArcFace template for 112x112 crops: left eye, right eye, nose tip, left and right mouth
# corners, "left" meaning the image's left.
ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def parse_crop(value: str) -> str:
    """Validate a ``--crop`` value and return its canonical spelling (equal crops, equal keys)."""
    value = value.strip()
    if value in ("", "none"):
        return "none"
    m = re.fullmatch(r"(bbox|align5)(?::([^:]+))?", value)
    if m and m[1] == "bbox":
        margin = _number(m[2], float, 0.0)
        if margin is not None and 0 <= margin <= 4:
            return f"bbox:{margin:g}" if margin else "bbox"
    if m and m[1] == "align5":
        size = _number(m[2], int, ALIGN_SIZE)
        if size is not None and 16 <= size <= 4096:
            return f"align5:{size}" if size != ALIGN_SIZE else "align5"
    raise EtfError(
        f"--crop {value!r}: use none, bbox[:MARGIN] (MARGIN a fraction of the box, 0 to 4) or align5[:SIZE] (16 to 4096)"
    )


def _number(text: str | None, kind: type, default: float) -> float | None:
    if text is None:
        return default
    try:
        return kind(text)
    except ValueError:
        return None


def _needs(crop: str) -> str:
    return "box" if crop.startswith("bbox") else "landmarks5"


def crop_source(dataset: Dataset, crop: str, where: str) -> str:
    """What ``crop`` reads from ``dataset`` (recorded with it); refuses to align faces by
    landmarks derived from the labels under evaluation."""
    key = _needs(crop)
    source = dataset.meta_sources.get(key, MetaSource(f"{dataset.name}'s meta[{key!r}]"))
    if key == "landmarks5" and source.ground_truth:
        raise EtfError(
            f"{where}: --crop {crop} would align every face, test faces too, by {source.what}, the labels it is "
            "evaluated on; give landmarks from a face detector with ?landmarks5=FILE (CSV id,x1,y1,...,x5,y5), "
            "or use --crop bbox"
        )
    return source.what


LANDMARKS5_HEADER = ["id", *(f"{c}{k}" for k in range(1, 6) for c in "xy")]


def read_landmarks5(path: Path, samples: Sequence[Sample], where: str) -> list[Sample]:
    """``samples`` with ``meta["landmarks5"]`` from ``path`` (header ``id,x1,y1,...,x5,y5``);
    samples the file does not list lose the adapter's, so nothing else is aligned by."""
    from etf.data.datasets._common import annotation_error, csv_rows, numbers

    try:
        rows = csv_rows(path)
    except OSError as e:
        raise EtfError(f"{where}: landmarks5={path}: {e.strerror or e}") from None
    if not rows or [c.strip() for c in rows[0]] != LANDMARKS5_HEADER:
        raise annotation_error(path, 1, f"expected the header {','.join(LANDMARKS5_HEADER)}")
    known = {s.id for s in samples}
    points: dict[str, list[list[float]]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(LANDMARKS5_HEADER):
            raise annotation_error(path, line, f"expected {len(LANDMARKS5_HEADER)} fields, got {len(row)}")
        sid = row[0].strip()
        if sid not in known:
            raise annotation_error(path, line, f"{sid!r} is not a sample of the dataset")
        if sid in points:
            raise annotation_error(path, line, f"{sid!r} appears twice")
        values = numbers(row[1:], path, line)
        points[sid] = [values[i : i + 2] for i in range(0, 10, 2)]
    out = []
    for s in samples:
        meta = {k: v for k, v in s.meta.items() if k != "landmarks5"}
        if s.id in points:
            meta["landmarks5"] = points[s.id]
        out.append(replace(s, meta=meta))
    return out


def crop_geometry(sample: Sample, crop: str) -> tuple[np.ndarray, tuple[int, int]]:
    """The 2x3 matrix mapping source pixels to crop pixels, and the crop's (width, height)."""
    key = _needs(crop)
    value = sample.meta.get(key)
    if value is None:
        raise EtfError(f"sample {sample.id!r}: --crop {crop} needs meta[{key!r}], which this sample lacks")
    kind, _, arg = crop.partition(":")
    if kind == "bbox":
        x0, y0, x1, y1 = (float(v) for v in value)
        if not (x1 > x0 and y1 > y0):
            raise EtfError(f"sample {sample.id!r}: face box {list(value)} is empty (expected x0 < x1, y0 < y1)")
        side = max(x1 - x0, y1 - y0) * (1 + 2 * float(arg or 0))
        size = max(1, round(side))
        left, top = round((x0 + x1 - size) / 2), round((y0 + y1 - size) / 2)
        return np.array([[1.0, 0.0, -left], [0.0, 1.0, -top]]), (size, size)
    size = int(arg or ALIGN_SIZE)
    src = np.asarray(value, dtype=np.float64)
    if src.shape != (5, 2):
        raise EtfError(f"sample {sample.id!r}: meta['landmarks5'] must be five [x, y] points, got shape {src.shape}")
    return similarity(src, ARCFACE_112 * (size / ALIGN_SIZE)), (size, size)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991) taking points ``src`` onto ``dst``, as 2x3."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var = (s**2).sum() / len(src)
    if var <= 0:
        raise EtfError("align5: the five landmarks coincide")
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rot = u @ sign @ vt
    scale = (sig * np.diag(sign)).sum() / var
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def apply_crop(img: Image.Image, sample: Sample, crop: str) -> Image.Image:
    """``img`` warped by the sample's crop geometry (bilinear; an integer shift copies pixels)."""
    if crop == "none":
        return img
    matrix, size = crop_geometry(sample, crop)
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    return img.transform(size, Image.Transform.AFFINE, tuple(inverse.ravel()), resample=Image.Resampling.BILINEAR)


def crop_labels(samples: Sequence[Sample], crop: str, where: str) -> list[Sample]:
    """``samples`` with landmark columns and ``nme_norm`` in crop coordinates.

    Also the point where a crop that needs boxes or landmarks meets a dataset without them:
    one error naming the first sample that lacks them and how many do.
    """
    if crop == "none":
        return list(samples)
    key = _needs(crop)
    lacking = [s.id for s in samples if s.meta.get(key) is None]
    if lacking:
        more = f" ({len(lacking)} of {len(samples)} samples lack it)" if len(lacking) > 1 else ""
        raise EtfError(
            f"{where}: --crop {crop} needs {'a face box' if key == 'box' else 'five face landmarks'} "
            f"(meta[{key!r}]), and sample {lacking[0]!r} has none{more}"
        )
    columns = {c for s in samples for c in s.labels}
    pairs = [p for points in point_columns(columns).values() for p in points]
    if not pairs and NME_NORM not in columns:
        return list(samples)
    return [_map_labels(s, crop_geometry(s, crop)[0], pairs) for s in samples]


def _map_labels(sample: Sample, matrix: np.ndarray, pairs: list[tuple[str, str]]) -> Sample:
    labels: dict[str, Any] = dict(sample.labels)
    for cx, cy in pairs:
        x, y = labels.get(cx), labels.get(cy)
        if x is not None and y is not None:
            labels[cx], labels[cy] = (float(v) for v in matrix[:, :2] @ (x, y) + matrix[:, 2])
    if labels.get(NME_NORM) is not None:
        labels[NME_NORM] = float(labels[NME_NORM] * np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    return replace(sample, labels=labels)
