"""Face crops: canonical spellings, geometry, pixels and landmark labels moved together."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from etf.data import Sample, load_dataset
from etf.data.crop import ARCFACE_112, apply_crop, crop_geometry, parse_crop
from etf.errors import EtfError
from tests import dataset_fixtures as fx


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("none", "none"),
        ("", "none"),
        ("bbox", "bbox"),
        ("bbox:0", "bbox"),
        ("bbox:0.10", "bbox:0.1"),
        ("align5", "align5"),
        ("align5:112", "align5"),
        ("align5:224", "align5:224"),
    ],
)
def test_parse_crop_canonical(given, canonical):
    assert parse_crop(given) == canonical


@pytest.mark.parametrize("bad", ["bbox:x", "bbox:-0.1", "align5:8", "align5:1.5", "center", "bbox:0.1:2"])
def test_parse_crop_rejects(bad):
    with pytest.raises(EtfError, match="--crop"):
        parse_crop(bad)


def test_bbox_is_a_square_integer_shift_with_black_outside():
    arr = np.random.default_rng(0).integers(1, 256, size=(50, 40, 3), dtype=np.uint8)
    sample = Sample("s", None, "train", meta={"box": [10, 20, 30, 60]})  # 20 x 40
    matrix, size = crop_geometry(sample, "bbox:0.25")  # side 40 * 1.5 = 60, centred on (20, 40)
    assert size == (60, 60) and matrix.tolist() == [[1, 0, 10], [0, 1, -10]]
    out = np.asarray(apply_crop(Image.fromarray(arr), sample, "bbox:0.25"))
    assert out.shape == (60, 60, 3)
    np.testing.assert_array_equal(out[:40, 10:50], arr[10:50, :])  # pixels copied, not resampled
    assert out[:, :10].max() == 0 and out[40:].max() == 0


def _similar_to_template(angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """Five source points that a known similarity transform takes onto the ArcFace template."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return (ARCFACE_112 @ rot.T) * scale + np.array(shift)


def test_align5_puts_a_known_point_where_the_template_says():
    src = _similar_to_template(math.radians(30), 1.6, (60.0, 10.0))
    sample = Sample("s", None, "train", meta={"landmarks5": src.tolist()})
    matrix, size = crop_geometry(sample, "align5:224")
    assert size == (224, 224)
    np.testing.assert_allclose(src @ matrix[:, :2].T + matrix[:, 2], ARCFACE_112 * 2, atol=1e-9)
    img = np.zeros((260, 260), dtype=np.uint8)
    nx, ny = src[2]
    img[round(ny) - 2 : round(ny) + 3, round(nx) - 2 : round(nx) + 3] = 255  # a bright dot on the nose
    nose = (np.array([round(nx), round(ny)]) + 0.5) @ matrix[:, :2].T + matrix[:, 2]  # the dot's centre
    out = np.asarray(apply_crop(Image.fromarray(img).convert("RGB"), sample, "align5:224"))[..., 0].astype(float)
    ys, xs = np.nonzero(out)
    centroid = np.array([(xs * out[ys, xs]).sum(), (ys * out[ys, xs]).sum()]) / out.sum() + 0.5
    np.testing.assert_allclose(centroid, nose, atol=0.05)
    assert np.linalg.norm(nose - ARCFACE_112[2] * 2) < 3 * 1.25  # within the rounding of the dot's position


def test_landmark_labels_follow_the_crop(tmp_path):
    root = fx.write_300w(tmp_path / "300W")
    pts = fx.face_points(68, 0) * 0 + 5.0  # rewrite one face so its five points are a known similarity image
    src = _similar_to_template(math.radians(-20), 0.1, (3.0, 2.0))
    for (lo, hi), p in zip(((36, 42), (42, 48), (30, 31), (48, 49), (54, 55)), src):
        pts[lo:hi] = p
    fx.write_pts(root / "lfpw/trainset/image_0000.pts", pts)
    plain = load_dataset(f"300w:{root}")
    aligned = load_dataset(f"300w:{root}", crop="align5")
    s = aligned.samples[0]
    for i, want in zip((36, 45, 30, 48, 54), ARCFACE_112):
        assert (s.labels[f"lm{i}_x"], s.labels[f"lm{i}_y"]) == pytest.approx(
            tuple(want), abs=0.02
        )  # .pts keeps 3 decimals
    assert s.labels["nme_norm"] == pytest.approx(plain.samples[0].labels["nme_norm"] * 10, rel=1e-3)
    assert aligned.options["crop"] == "align5" and aligned.key != plain.key
    assert aligned.samples[0].meta == plain.samples[0].meta  # meta stays in source pixels
    boxed = load_dataset(f"300w:{root}", crop="bbox:0.5")
    b = plain.samples[1]
    matrix, _ = crop_geometry(b, "bbox:0.5")
    assert boxed.samples[1].labels["lm7_x"] == pytest.approx(b.labels["lm7_x"] + matrix[0, 2])
    assert boxed.samples[1].labels["nme_norm"] == pytest.approx(b.labels["nme_norm"])
    assert boxed.load_image(1).size == crop_geometry(b, "bbox:0.5")[1]


def test_crop_without_boxes_is_a_clear_error(folder_dataset):
    with pytest.raises(EtfError) as e:
        load_dataset(f"folder:{folder_dataset}", crop="bbox")
    msg = str(e.value)
    assert (
        "needs a face box" in msg and "'train/a/00.png' has none (24 of 24 samples lack it)" in msg and "\n" not in msg
    )
