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
    file = _landmarks5_file(tmp_path / "detected.csv", plain)  # as a detector would find them
    aligned = load_dataset(f"300w:{root}?landmarks5={file}", crop="align5")
    s = aligned.samples[0]
    for i, want in zip((36, 45, 30, 48, 54), ARCFACE_112):
        assert (s.labels[f"lm{i}_x"], s.labels[f"lm{i}_y"]) == pytest.approx(
            tuple(want), abs=0.02
        )  # .pts keeps 3 decimals
    assert s.labels["nme_norm"] == pytest.approx(plain.samples[0].labels["nme_norm"] * 10, rel=1e-3)
    assert aligned.options["crop"] == "align5" and aligned.key != plain.key
    assert aligned.options["crop_source"] == "detected.csv (landmarks5=)"
    assert aligned.samples[0].meta == plain.samples[0].meta  # meta stays in source pixels
    boxed = load_dataset(f"300w:{root}", crop="bbox:0.5")
    b = plain.samples[1]
    matrix, _ = crop_geometry(b, "bbox:0.5")
    assert boxed.samples[1].labels["lm7_x"] == pytest.approx(b.labels["lm7_x"] + matrix[0, 2])
    assert boxed.samples[1].labels["nme_norm"] == pytest.approx(b.labels["nme_norm"])
    assert boxed.load_image(1).size == crop_geometry(b, "bbox:0.5")[1]
    assert boxed.options["crop_source"] == "the tight box of the ground-truth landmarks"
    assert load_dataset(f"300w:{root}", **boxed.options).key == boxed.key  # rebuilt from what a run records


def _landmarks5_file(path, dataset, skip: int = 0):
    lines = ["id," + ",".join(f"{c}{k}" for k in range(1, 6) for c in "xy")]
    for s in dataset.samples[skip:]:
        lines.append(s.id + "," + ",".join(f"{v:.3f}" for p in s.meta["landmarks5"] for v in p))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["300w", "wflw"])
def test_align5_by_the_ground_truth_it_is_evaluated_on_is_refused(tmp_path, fmt):
    if fmt == "300w":
        root = fx.write_300w(tmp_path / "data")
    else:
        root = fx.write_wflw(
            tmp_path / "data", [fx.wflw_line(0, "a/x.jpg", [0] * 6)], [fx.wflw_line(1, "a/y.jpg", [0] * 6)]
        )
    with pytest.raises(EtfError) as e:
        load_dataset(f"{fmt}:{root}", crop="align5")
    msg = str(e.value)
    assert "--crop align5 would align every face" in msg and "ground-truth landmarks" in msg and "\n" not in msg
    assert "?landmarks5=FILE" in msg
    plain = load_dataset(f"{fmt}:{root}")
    # a file that leaves a sample out: that sample has nothing to be aligned by (not its ground truth)
    partial = _landmarks5_file(tmp_path / "partial.csv", plain, skip=1)
    with pytest.raises(EtfError, match=f"sample {plain.ids[0]!r} has none"):
        load_dataset(f"{fmt}:{root}?landmarks5={partial}", crop="align5")


def test_landmarks5_file_errors_are_one_line(tmp_path):
    root = fx.write_300w(tmp_path / "300W")
    plain = load_dataset(f"300w:{root}")
    file = _landmarks5_file(tmp_path / "l5.csv", plain)
    with pytest.raises(EtfError, match="landmarks5= gives the five points of --crop align5"):
        load_dataset(f"300w:{root}?landmarks5={file}")
    lines = file.read_text().splitlines()
    file.write_text("\n".join([lines[0], "nope" + lines[1][lines[1].index(",") :]]) + "\n")
    with pytest.raises(EtfError, match="l5.csv: line 2: 'nope' is not a sample"):
        load_dataset(f"300w:{root}?landmarks5={file}", crop="align5")
    file.write_text("\n".join([lines[0], lines[1].replace(",", ",x", 1)]) + "\n")
    with pytest.raises(EtfError, match="l5.csv: line 2: 'x"):
        load_dataset(f"300w:{root}?landmarks5={file}", crop="align5")
    file.write_text("path,x1\n")
    with pytest.raises(EtfError, match="l5.csv: line 1: expected the header id,x1,y1"):
        load_dataset(f"300w:{root}?landmarks5={file}", crop="align5")


def test_crop_without_boxes_is_a_clear_error(folder_dataset):
    with pytest.raises(EtfError) as e:
        load_dataset(f"folder:{folder_dataset}", crop="bbox")
    msg = str(e.value)
    assert (
        "needs a face box" in msg and "'train/a/00.png' has none (24 of 24 samples lack it)" in msg and "\n" not in msg
    )
