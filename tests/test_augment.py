"""Augmented views: seeded torchvision transforms whose recorded geometry carries the labels
exactly where the image content went, mirror maps included."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from etf.data.geometry import MIRROR_5, MIRROR_68, MIRROR_98, apply_homography, check_views, is_mirror, view_labels
from etf.errors import EtfError
from etf.pipeline.extract.augment import Augmenter, parse_augment

H, W = 96, 80
# five points of a face (eyes, nose, mouth corners) in a 80x96 image
POINTS = np.array([[28.0, 38.0], [52.0, 38.0], [40.0, 52.0], [30.0, 68.0], [50.0, 68.0]])


def dot(x: float, y: float) -> Image.Image:
    yy, xx = np.mgrid[0:H, 0:W]
    a = np.zeros((H, W), np.uint8)
    a[(xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= 2.5**2] = 255
    return Image.fromarray(a).convert("RGB")


def found(img: Image.Image) -> np.ndarray | None:
    """Where the dot went (its brightness-weighted centroid), or None when it left the image."""
    a = np.asarray(img)[..., 0].astype(float)
    if a.max() < 60:
        return None
    w = a * (a > 0.3 * a.max())
    yy, xx = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
    return np.array([(w * xx).sum() / w.sum() + 0.5, (w * yy).sum() / w.sum() + 0.5])


def labels_of(points: np.ndarray) -> dict[str, float]:
    out = {}
    for i, (x, y) in enumerate(points):
        out[f"lm{i}_x"], out[f"lm{i}_y"] = float(x), float(y)
    return out


@pytest.mark.parametrize("spec", ["flip", "flip:0.5,crop:0.7,rotate:20,shift:0.1,scale:0.15,perspective:0.3"])
def test_each_landmark_target_lands_on_its_own_dot_in_the_view(spec):
    """After a mirror, target i (say, the image-left eye) is the dot that was point
    MIRROR_5[i] (the other eye) before it: mapped by the matrix and relabelled."""
    aug = Augmenter(parse_augment(spec), seed=3)
    mirrored, checked = 0, 0
    for s in range(24):
        # one image per point: the same sample id and view give the same transform whatever the pixels
        views = [aug.view(dot(*p), f"sample{s}", 1) for p in POINTS]
        matrix = views[0][1]
        assert all(np.array_equal(m, matrix) for _, m in views)
        moved = view_labels(labels_of(POINTS), matrix, {"lm": MIRROR_5})
        mirrored += is_mirror(matrix)
        for i in range(5):
            source = MIRROR_5[i] if is_mirror(matrix) else i
            at = found(views[source][0])
            if at is None:
                continue
            checked += 1
            assert np.hypot(*(at - [moved[f"lm{i}_x"], moved[f"lm{i}_y"]])) < 1.2, (s, i, spec)
    assert checked > 80 and mirrored > 0
    if spec == "flip":
        assert mirrored == 24, "flip alone: every view is the mirror image"


def test_views_are_seeded_per_sample_and_view():
    aug = Augmenter(parse_augment("face"), seed=0)
    img = dot(*POINTS[0])
    a, ma = aug.view(img, "x", 1)
    b, mb = aug.view(img, "x", 1)
    c, mc = aug.view(img, "x", 2)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(ma, mb)
    assert not np.allclose(ma, mc)
    d, md = Augmenter(parse_augment("face"), seed=1).view(img, "x", 1)
    assert not np.allclose(ma, md)


def test_pose_signs_and_nme_norm_follow_a_mirror_and_a_zoom():
    mirror = np.array([[-1.0, 0, W], [0, 1, 0], [0, 0, 1]])
    zoom = np.array([[2.0, 0, -40], [0, 2.0, -48], [0, 0, 1]])
    pose = {"yaw": 30.0, "pitch": -10.0, "roll": 5.0}
    assert view_labels(pose, mirror, {}, ("yaw", "roll")) == {"yaw": -30.0, "pitch": -10.0, "roll": -5.0}
    assert view_labels(pose, zoom, {}, ("yaw", "roll")) == pose
    labels = {**labels_of(POINTS), "nme_norm": 24.0}
    assert view_labels(labels, zoom, {"lm": MIRROR_5})["nme_norm"] == pytest.approx(48.0)
    assert view_labels(labels, mirror, {"lm": MIRROR_5})["nme_norm"] == pytest.approx(24.0)
    flipped = view_labels(labels, mirror, {"lm": MIRROR_5})
    assert (flipped["lm0_x"], flipped["lm1_x"]) == (W - 52.0, W - 28.0)  # the eyes swap names


@pytest.mark.parametrize("perm", [MIRROR_5, MIRROR_68, MIRROR_98])
def test_mirror_maps_are_involutions_that_keep_the_midline(perm):
    assert sorted(perm) == list(range(len(perm)))
    assert all(perm[perm[i]] == i for i in range(len(perm)))
    fixed = {i for i in range(len(perm)) if perm[i] == i}
    known = {5: {2}, 68: {8, 27, 28, 29, 30, 33, 51, 57, 62, 66}, 98: {16, 51, 52, 53, 54, 57, 79, 85, 90, 94}}
    assert fixed == known[len(perm)]


def test_views_a_dataset_cannot_follow_are_refused():
    mirror = np.array([[-1.0, 0, W], [0, 1, 0], [0, 0, 1]])[None, None]
    columns = [*labels_of(POINTS), "roll"]
    with pytest.raises(EtfError, match="no left/right mirror map for landmarks 'lm'"):
        check_views(columns, mirror, {}, (), "views")
    check_views(columns, mirror, {"lm": MIRROR_5}, ("roll",), "views")  # a mirror keeps roll's size
    turn = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])[None, None]
    with pytest.raises(EtfError, match="rotate the faces by up to 17 degrees, which changes roll"):
        check_views(columns, turn, {"lm": MIRROR_5}, ("roll",), "views")


@pytest.mark.parametrize(
    "text, message",
    [
        ("flip,spin", "unknown part 'spin'"),
        ("rotate:500", "outside"),
        ("flip,flip", "given twice"),
        ("", "at least one"),
    ],
)
def test_bad_augment_specs_are_one_line(text, message):
    with pytest.raises(EtfError, match=message):
        parse_augment(text)


def test_specs_are_canonical():
    assert str(parse_augment("rotate:10, flip")) == str(parse_augment("flip:0.5,rotate:10"))
    assert str(parse_augment("flip")) == "flip:1"
    assert parse_augment("face").rotates
    assert apply_homography(np.eye(3), POINTS).tolist() == POINTS.tolist()
