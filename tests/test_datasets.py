"""Face dataset adapters on generated copies of each official format."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from etf.cli import main
from etf.data import Dataset, Sample, get_adapter, load_dataset
from etf.data.check import check_dataset
from etf.data.datasets.au import assign_folds
from etf.data.datasets.ferplus import resolve
from etf.data.labels import parse_task
from etf.errors import EtfError
from tests import dataset_fixtures as fx


def by_split(dataset) -> dict[str, int]:
    return dict(Counter(dataset.splits))


def one_line_error(spec: str, *parts: str) -> str:
    with pytest.raises(EtfError) as e:
        load_dataset(spec)
    msg = str(e.value)
    assert "\n" not in msg
    for p in parts:
        assert p in msg
    return msg


# --- RAF-DB ----------------------------------------------------------------------------


def test_rafdb_labels_splits_and_paths(tmp_path):
    root = fx.write_rafdb(tmp_path / "RAF", [("train_00001.jpg", 4), ("train_00002.jpg", 1), ("test_0001.jpg", 7)])
    ds = load_dataset(f"rafdb:{root}")
    assert by_split(ds) == {"train": 2, "test": 1}
    first = ds.samples[0]
    assert ds.classes["expression"][first.labels["expression"]] == "Happiness"
    assert [ds.classes["expression"][v] for v in ds.column("expression")] == ["Happiness", "Surprise", "Neutral"]
    assert first.id == "Image/aligned/train_00001_aligned.jpg" and first.path.is_file()
    assert ds.tasks == ["classify:expression"] and get_adapter("rafdb").metric == "accuracy"


def test_rafdb_original_images_carry_manual_landmarks(tmp_path):
    root = fx.write_rafdb(tmp_path / "RAF", [("train_00001.jpg", 2), ("test_0001.jpg", 3)], original=True)
    ds = load_dataset(f"rafdb:{root}?aligned=false")
    assert ds.samples[0].id == "Image/original/train_00001.jpg"
    assert ds.samples[0].meta["landmarks5"][0] == [4.5, 5.25]
    assert load_dataset(f"rafdb:{root}?aligned=false", crop="align5").key != ds.key


def test_rafdb_malformed_line_is_one_clear_error(tmp_path):
    root = fx.write_rafdb(tmp_path / "RAF", [("train_00001.jpg", 4)])
    with open(root / "EmoLabel" / "list_patition_label.txt", "a") as f:
        f.write("train_00002.jpg 9\n")
    one_line_error(f"rafdb:{root}", "list_patition_label.txt: line 2:", "outside 1..7")


# --- AffectNet -------------------------------------------------------------------------


def test_affectnet_class_filtering_and_valence(tmp_path):
    train = [fx.affectnet_row(k, code) for k, code in enumerate([0, 1, 6, 7, 8, 9, 10])]
    train.append(fx.affectnet_row(7, 2, valence=-2, arousal=-2))
    val = [fx.affectnet_row(100 + k, code) for k, code in enumerate([3, 7, 10])]
    root = fx.write_affectnet(tmp_path / "AffectNet", train, val)
    seven = load_dataset(f"affectnet:{root}")
    assert by_split(seven) == {"train": 4, "test": 1}
    assert seven.column("expression") == [0, 1, 6, 2, 3]
    assert seven.classes["expression"][-1] == "Anger"
    eight = load_dataset(f"affectnet:{root}?classes=8")
    assert by_split(eight) == {"train": 5, "test": 2}
    assert eight.classes["expression"][7] == "Contempt" and eight.column("expression").count(7) == 2
    invalid = seven.samples[3]
    assert invalid.labels["valence"] is None and invalid.labels["arousal"] is None
    assert seven.samples[0].labels["valence"] == 0.5
    assert seven.samples[0].meta["box"] == [1, 2, 11, 14]
    assert len(seven.samples[0].meta["landmarks5"]) == 5
    one_line_error(f"affectnet:{root}?classes=9", "classes=9")


def test_affectnet_headerless_validation_and_val_hold_out(tmp_path):
    train = [fx.affectnet_row(k, k % 7) for k in range(10)]
    root = fx.write_affectnet(tmp_path / "A", train, [fx.affectnet_row(50, 1)], val_header=False)
    ds = load_dataset(f"affectnet:{root}?val=0.2&seed=3")
    assert by_split(ds) == {"train": 8, "val": 2, "test": 1}
    again = load_dataset(f"affectnet:{root}?val=0.2&seed=3")
    assert again.splits == ds.splits and again.key == ds.key


def test_affectnet_short_row_names_file_and_line(tmp_path):
    root = fx.write_affectnet(tmp_path / "A", [fx.affectnet_row(0, 1), "0/x.jpg,1,2,3"], [fx.affectnet_row(5, 1)])
    one_line_error(f"affectnet:{root}", "training.csv: line 3:", "expected 9 columns")


# --- FER2013 / FER+ --------------------------------------------------------------------


def test_fer2013_writes_pngs_once_with_usage_splits(tmp_path, data_home):
    fx.write_fer2013(tmp_path / "fer", [(3, "Training"), (0, "PublicTest"), (6, "PrivateTest"), (5, "Training")])
    ds = load_dataset(f"fer2013:{tmp_path / 'fer'}")
    assert ds.splits == ["train", "val", "test", "train"]
    assert ds.classes["expression"][ds.samples[0].labels["expression"]] == "Happy"
    assert ds.ids[2] == "fer0000002.png"
    first = ds.samples[1].path
    assert first.is_relative_to(data_home) and (first.parent / "complete.json").is_file()
    img = np.asarray(Image.open(first))
    assert img.shape == (48, 48) and img.ravel()[:3].tolist() == [7, 8, 9]
    stamp = first.stat().st_mtime_ns
    assert load_dataset(f"fer2013:{tmp_path / 'fer' / 'fer2013.csv'}").key == ds.key  # the file itself works too
    assert first.stat().st_mtime_ns == stamp  # not rewritten


def test_fer2013_bad_pixels_name_the_line(tmp_path):
    path = fx.write_fer2013(tmp_path / "fer", [(1, "Training"), (2, "Training")])
    lines = path.read_text().splitlines()
    lines[2] = '2,"1 2 3",Training'
    path.write_text("\n".join(lines) + "\n")
    one_line_error(f"fer2013:{path}", "fer2013.csv: line 3:", "2304 integers")


@pytest.mark.parametrize(
    ("votes", "majority", "plurality"),
    [
        ([0, 10, 0, 0, 0, 0, 0, 0, 0, 0], 1, 1),  # unanimous happiness
        ([4, 3, 0, 0, 0, 0, 0, 0, 3, 0], None, 0),  # 4 of 10 is no majority
        ([6, 1, 1, 1, 1, 0, 0, 0, 0, 0], 0, 0),  # single votes are outliers: 6 of 6
        ([0, 0, 0, 0, 0, 0, 0, 0, 7, 3], None, None),  # unknown wins
        ([0, 0, 0, 0, 0, 0, 0, 2, 0, 8], None, None),  # not a face
        ([0] * 10, None, None),  # no votes
        ([0, 0, 3, 3, 0, 0, 0, 0, 0, 0], None, 2),  # a tie: no majority; plurality takes the first
        ([0, 0, 0, 0, 0, 0, 0, 6, 0, 4], 7, 7),  # contempt
    ],
)
def test_ferplus_vote_resolution(votes, majority, plurality):
    assert resolve(list(votes), "majority") == majority
    assert resolve(list(votes), "plurality") == plurality


def test_ferplus_dataset(tmp_path):
    rows = [
        ("Training", True, [0, 9, 0, 0, 0, 0, 1, 0, 0, 0]),
        ("Training", False, [10, 0, 0, 0, 0, 0, 0, 0, 0, 0]),  # no image name: removed by FER+
        ("Training", True, [0, 0, 0, 0, 0, 0, 0, 0, 2, 8]),  # not a face
        ("PublicTest", True, [0, 0, 0, 0, 0, 0, 0, 10, 0, 0]),
        ("PrivateTest", True, [0, 0, 7, 3, 0, 0, 0, 0, 0, 0]),
    ]
    root = fx.write_ferplus(tmp_path / "ferplus", rows)
    ds = load_dataset(f"ferplus:{root}")
    assert ds.ids == ["fer0000000.png", "fer0000003.png", "fer0000004.png"]
    assert ds.splits == ["train", "val", "test"]
    assert [ds.classes["expression"][v] for v in ds.column("expression")] == ["happiness", "contempt", "surprise"]
    assert np.asarray(Image.open(ds.samples[2].path)).ravel()[0] == 4 * 7 % 256
    one_line_error(f"ferplus:{root}?vote=mean", "vote='mean'")


def test_ferplus_rows_out_of_step_are_an_error(tmp_path):
    root = fx.write_ferplus(tmp_path / "fp", [("Training", True, [1] * 10), ("PublicTest", True, [1] * 10)])
    text = (root / "fer2013new.csv").read_text().replace("PublicTest", "PrivateTest")
    (root / "fer2013new.csv").write_text(text)
    one_line_error(f"ferplus:{root}", "fer2013new.csv: line 3:", "disagrees")


# --- CelebA ----------------------------------------------------------------------------


def test_celeba_attributes_partition_and_landmarks(tmp_path):
    root = fx.write_celeba(tmp_path / "CelebA", [0, 0, 0, 1, 2])
    ds = load_dataset(f"celeba:{root}")
    assert by_split(ds) == {"train": 3, "val": 1, "test": 1}
    assert ds.ids[0] == "Img/img_align_celeba/000001.jpg"
    assert len(ds.label_columns) == 40 and ds.label_columns[0] == "5_o_Clock_Shadow"
    want = [int(v > 0) for v in fx.celeba_attrs(1)]
    assert [ds.samples[1].labels[c] for c in ds.label_columns] == want
    assert set(ds.column("Young")) == {0, 1}
    task = parse_task(ds.tasks[0])
    assert task.kind == "multilabel" and len(task.names) == 40
    assert ds.samples[0].meta == {
        "landmarks5": [[5, 6], [11, 6], [8, 9], [6, 12], [10, 12]]
    }  # no box: it is for img_celeba


def test_celeba_flat_layout_and_in_the_wild_boxes(tmp_path):
    root = fx.write_celeba(tmp_path / "celeba", [0, 2], flat=True, aligned=False)
    ds = load_dataset(f"celeba:{root}?aligned=false")
    assert ds.ids == ["img_celeba/000001.jpg", "img_celeba/000002.jpg"]
    assert ds.samples[1].meta["box"] == [1, 2, 9, 11]
    assert "landmarks5" not in ds.samples[1].meta  # list_landmarks_celeba.txt (in the wild) is absent


def test_celeba_bad_attribute_value_and_count(tmp_path):
    root = fx.write_celeba(tmp_path / "c", [0, 1])
    attr = root / "Anno" / "list_attr_celeba.txt"
    good = attr.read_text()
    attr.write_text(good.replace("000002.jpg  -1", "000002.jpg   0", 1))
    one_line_error(f"celeba:{root}", "list_attr_celeba.txt: line 4:", "value 0 (expected -1 or 1)")
    attr.write_text("3\n" + "\n".join(good.splitlines()[1:]) + "\n")
    one_line_error(f"celeba:{root}", "list_attr_celeba.txt: line 1:", "says 3 images")


# --- UTKFace / AgeDB -------------------------------------------------------------------


def test_utkface_names_malformed_and_seeded_split(tmp_path):
    names = [f"{20 + k}_{k % 2}_{k % 5}_2017011617452{k % 10}{k:03d}.jpg.chip.jpg" for k in range(20)]
    bad = ["39_1_20170116174525125.jpg.chip.jpg", "61_3_x.jpg.chip.jpg"]
    root = fx.write_named(tmp_path / "UTKFace", names + bad)
    with pytest.warns(UserWarning, match=r"skipped .*39_1_20170116174525125.* \(and 1 more\)"):
        ds = load_dataset(f"utkface:{root}")
    assert len(ds) == 20 and len(ds.skipped) == 2 and ds.skipped[0]["reason"]
    assert by_split(ds) == {"train": 16, "val": 2, "test": 2}
    s = next(s for s in ds.samples if s.id == names[3])
    assert s.labels == {"age": 23, "gender": 1, "race": 3}
    assert ds.classes["race"][3] == "Indian" and ds.tasks == ["regress:age"]
    with pytest.warns(UserWarning):
        other = load_dataset(f"utkface:{root}?seed=1")
    assert other.splits != ds.splits and by_split(other) == by_split(ds)


def test_agedb_split_is_subject_disjoint(tmp_path):
    names = [f"{k}_Person{k % 7}_{30 + k}_{'mf'[k % 2]}.jpg" for k in range(28)]
    root = fx.write_named(tmp_path / "AgeDB", names)
    ds = load_dataset(f"agedb:{root}?val=0.15&test=0.15")
    assert ds.samples[0].labels == {"age": 30, "gender": 0}
    subject_splits: dict[str, set[str]] = {}
    for s in ds.samples:
        subject_splits.setdefault(s.id.split("_")[1], set()).add(s.split)
    assert all(len(v) == 1 for v in subject_splits.values())
    assert Counter(next(iter(v)) for v in subject_splits.values()) == {"train": 5, "val": 1, "test": 1}
    # the subject is each image's group, also when the adapter splits by image
    by_image = load_dataset(f"agedb:{root}?by_subject=false")
    assert by_image.group_by == "subject" and by_image.groups == [i.split("_")[1] for i in by_image.ids]


# --- 300W / WFLW -----------------------------------------------------------------------


def test_300w_splits_points_and_normaliser(tmp_path):
    root = fx.write_300w(tmp_path / "300W")
    ds = load_dataset(f"300w:{root}")
    assert by_split(ds) == {"train": 5, "test_common": 3, "test_challenging": 1}
    s = ds.samples[0]
    assert s.id == "lfpw/trainset/image_0000.png"
    pts = fx.face_points(68, 0)
    assert (s.labels["lm36_x"], s.labels["lm36_y"]) == tuple(pts[36])
    assert math.isclose(s.labels["nme_norm"], float(np.linalg.norm(pts[36] - pts[45])), rel_tol=1e-9)
    assert s.meta["box"] == [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()]
    assert parse_task(ds.tasks[0]).columns(ds.label_columns)[:2] == ["lm0_x", "lm0_y"]
    assert get_adapter("300w").metric == "nme"


def test_300w_groups_the_faces_of_one_photograph(tmp_path):
    root = fx.write_300w(tmp_path / "300W")
    for name, k in (("1051618982_1", 0), ("1051618982_2", 1), ("2233_1", 2)):  # AFW names a photograph's faces
        fx._img(root / "afw" / f"{name}.jpg", k)
        fx.write_pts(root / "afw" / f"{name}.pts", fx.face_points(68, k))
    ds = load_dataset(f"300w:{root}?val=0.5&seed=3")
    group = dict(zip(ds.ids, ds.groups))
    assert group["afw/1051618982_1.jpg"] == group["afw/1051618982_2.jpg"] == "afw/1051618982"
    assert (
        group["afw/2233_1.jpg"] == "afw/2233"
        and group["lfpw/trainset/image_0000.png"] == "lfpw/trainset/image_0000.png"
    )
    split = dict(zip(ds.ids, ds.splits))
    assert split["afw/1051618982_1.jpg"] == split["afw/1051618982_2.jpg"]  # the val hold-out keeps them together
    assert ds.group_by == "photograph"


def test_300w_malformed_pts(tmp_path):
    root = fx.write_300w(tmp_path / "300W")
    pts = root / "afw" / "image_0000.pts"
    lines = pts.read_text().splitlines()
    lines[10] = "12.5"
    pts.write_text("\n".join(lines) + "\n")
    one_line_error(f"300w:{root}", "image_0000.pts: line 11:", "expected 'x y'")


def test_wflw_subset_flags_repeated_images_and_normaliser(tmp_path):
    train = [
        fx.wflw_line(0, "51--Dancing/a.jpg", [0, 0, 0, 0, 0, 0]),
        fx.wflw_line(1, "51--Dancing/a.jpg", [1, 0, 0, 0, 0, 0]),
    ]
    test = [fx.wflw_line(2, "2--Demo/b.jpg", [1, 0, 0, 0, 1, 1]), fx.wflw_line(3, "2--Demo/c.jpg", [0, 1, 0, 0, 0, 0])]
    root = fx.write_wflw(tmp_path / "WFLW", train, test)
    ds = load_dataset(f"wflw:{root}")
    assert ds.ids == [
        "WFLW_images/51--Dancing/a.jpg#0",
        "WFLW_images/51--Dancing/a.jpg#1",
        "WFLW_images/2--Demo/b.jpg#0",
        "WFLW_images/2--Demo/c.jpg#0",
    ]
    assert ds.splits == ["train", "train", "test", "test"]
    assert ds.column("subset_pose") == [0, 1, 1, 0] and ds.column("subset_blur") == [0, 0, 1, 0]
    pts = fx.face_points(98, 2).round(6)
    s = ds.samples[2]
    assert math.isclose(s.labels["nme_norm"], float(np.linalg.norm(pts[60] - pts[72])), rel_tol=1e-9)
    assert s.meta["box"] == [1, 2, 13, 14] and s.meta["landmarks5"][0] == [round(pts[96, 0], 3), round(pts[96, 1], 3)]
    assert ds.groups[:2] == ["WFLW_images/51--Dancing/a.jpg"] * 2  # the faces of one image
    bad = tmp_path / "bad"
    fx.write_wflw(
        bad, [fx.wflw_line(0, "x/a.jpg", [0] * 6)], [" ".join(fx.wflw_line(1, "x/b.jpg", [0] * 6).split()[1:])]
    )
    one_line_error(f"wflw:{bad}", "list_98pt_rect_attr_test.txt: line 1:", "expected 207 fields")


# --- head pose -------------------------------------------------------------------------


def _pose_root(root: Path) -> Path:
    pt2d = np.array([[2.0, 10.0, -1.0, 6.0], [3.0, 12.0, -1.0, 5.0]])  # -1: an invisible point
    fx.write_pose(root / "AFLW2000", "image00002", math.radians(10), math.radians(-45), math.radians(5), pt2d)
    fx.write_pose(root / "AFLW2000", "image00004", math.radians(120), 0.1, 0.0)  # pitch beyond 99 degrees
    for k, subset in enumerate(["AFW", "AFW_Flip", "HELEN", "HELEN_Flip", "IBUG", "IBUG_Flip", "LFPW", "LFPW_Flip"]):
        fx.write_pose(root / "300W_LP" / subset, f"{subset}_{k}_0", 0.1 * k, -0.1 * k, 0.05)
    return root


def test_aflw2000_protocol_degrees_and_filter(tmp_path):
    root = _pose_root(tmp_path / "pose")
    ds = load_dataset(f"aflw2000:{root}")
    assert by_split(ds) == {"train": 8, "test": 1}
    test = ds.samples[-1]
    assert test.id == "AFLW2000/image00002.jpg"
    assert (
        test.labels["yaw"] == pytest.approx(-45)
        and test.labels["pitch"] == pytest.approx(10)
        and test.labels["roll"] == pytest.approx(5)
    )
    assert test.meta["box"] == [2, 3, 10, 12]
    assert ds.tasks == ["regress:yaw,pitch,roll"] and get_adapter("aflw2000").metric == "mae"
    task = parse_task(ds.tasks[0])
    assert task.kind == "regress" and task.columns(ds.label_columns) == ["yaw", "pitch", "roll"]
    alone = load_dataset(f"aflw2000:{root / 'AFLW2000'}?train=false")
    assert alone.ids == ["image00002.jpg"] and alone.splits == ["test"]
    lp = load_dataset(f"300w-lp:{root}?val=0.25")
    assert by_split(lp) == {"train": 6, "val": 2} and lp.ids[1].startswith("300W_LP/AFW_Flip/")


def test_300w_lp_groups_flips_and_views_of_one_photograph(tmp_path):
    root = tmp_path / "pose"
    for subset in ["AFW", "AFW_Flip", "HELEN", "HELEN_Flip", "IBUG", "IBUG_Flip", "LFPW", "LFPW_Flip"]:
        base = subset.removesuffix("_Flip")
        for name in ("134212_1", "134212_2", "9_1") if base != "LFPW" else ("image_train_0001", "image_train_0002"):
            for view in range(3):
                fx.write_pose(root / "300W_LP" / subset, f"{base}_{name}_{view}", 0.1 * view, 0.2, 0.05)
    ds = load_dataset(f"300w-lp:{root}?val=0.3")
    group = dict(zip(ds.ids, ds.groups))
    afw = {
        group[f"300W_LP/{sub}/AFW_134212_{face}_{view}.jpg"]
        for sub in ("AFW", "AFW_Flip")
        for face in (1, 2)
        for view in range(3)
    }
    assert afw == {"AFW/AFW_134212"}  # its mirror, every view and every face of the photograph
    assert group["300W_LP/LFPW_Flip/LFPW_image_train_0002_1.jpg"] == "LFPW/LFPW_image_train_0002"
    assert len(set(ds.groups)) == 8 and ds.group_by == "source image"
    split_of: dict[str, set[str]] = {}
    for g, split in zip(ds.groups, ds.splits):
        split_of.setdefault(g, set()).add(split)
    assert all(len(v) == 1 for v in split_of.values()) and by_split(ds)["val"] > 0


def test_aflw2000_needs_300w_lp_and_no_align5(tmp_path):
    root = tmp_path / "pose"
    fx.write_pose(root / "AFLW2000", "image00002", 0.1, 0.2, 0.3)
    one_line_error(f"aflw2000:{root}", "no 300W_LP/", "train=false")
    with pytest.raises(EtfError, match="five face landmarks"):
        load_dataset(f"aflw2000:{root}?train=false", crop="align5")


# --- action units ----------------------------------------------------------------------


def test_au_folds_are_subject_disjoint_and_cover_everyone(tmp_path):
    subjects = [f"F{i:03d}" for i in range(1, 6)] + [f"M{i:03d}" for i in range(1, 5)]
    aus = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
    rows = [(f"{s}/T1/{f}.jpg", s, {f"AU{n}": str((f + n) % 2) for n in aus}) for s in subjects for f in range(2)]
    rows[0][2]["AU1"] = "9"
    path = fx.write_au(tmp_path / "bp4d" / "labels.csv", rows, aus)
    tested: list[str] = []
    for fold in (1, 2, 3):
        ds = load_dataset(f"au:{path}?fold={fold}")
        split_of: dict[str, set[str]] = {}
        for s in ds.samples:
            split_of.setdefault(s.id.split("/")[0], set()).add(s.split)
        assert all(len(v) == 1 for v in split_of.values())  # no subject on both sides
        tested += [subj for subj, v in split_of.items() if v == {"test"}]
    assert sorted(tested) == sorted(subjects)  # each subject is tested in exactly one fold
    folds = assign_folds(subjects)
    assert folds["F001"] == 1 and folds["F002"] == 2 and folds["M001"] == 3
    assert ds.group_by == "subject" and ds.groups == [s.id.split("/")[0] for s in ds.samples]
    ds = load_dataset(f"au:{path}")
    assert ds.samples[0].labels["AU1"] is None and ds.samples[1].labels["AU1"] == 0
    assert ds.tasks == ["multilabel:AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU14,AU15,AU17,AU23,AU24"]


def test_au_disfa_intensity_rule_and_given_folds(tmp_path):
    aus = (1, 2, 4, 6, 9, 12, 25, 26)
    rows = [
        (f"SN00{k}/{k}.png", f"SN00{k}", {**{f"AU{n}": str(k % 6) for n in aus}, "fold": str(k % 3 + 1)})
        for k in range(6)
    ]
    path = fx.write_au(tmp_path / "disfa.csv", rows, aus, fold=True)
    ds = load_dataset(f"au:{path}?dataset=disfa&fold=2")
    assert ds.column("AU1") == [0, 0, 1, 1, 1, 1]  # intensity >= 2
    assert [s.split for s in ds.samples] == ["train", "test", "train", "train", "test", "train"]
    assert ds.tasks == ["multilabel:AU1,AU2,AU4,AU6,AU9,AU12,AU25,AU26"]
    one_line_error(f"au:{path}", "no column 'AU7'")
    text = path.read_text().splitlines()
    text[2] = text[2].replace(",1,1,1,1,1,1,1,1,", ",1,7,1,1,1,1,1,1,")
    path.write_text("\n".join(text) + "\n")
    one_line_error(f"au:{path}?dataset=disfa", "disfa.csv: line 3:", "AU2 = '7'")
    path.write_text("\n".join([*text[:4], "SN009/x.png,SN009,1"]) + "\n")
    one_line_error(f"au:{path}?dataset=disfa", "disfa.csv: line 5:", "expected 11 columns")


# --- registry and CLI ------------------------------------------------------------------


def test_data_list_shows_every_face_format():
    out = CliRunner().invoke(main, ["data", "list"]).output
    for name in (
        "rafdb",
        "affectnet",
        "fer2013",
        "ferplus",
        "celeba",
        "utkface",
        "agedb",
        "300w",
        "wflw",
        "aflw2000",
        "300w-lp",
        "au",
    ):
        assert f"\n{name} " in f"\n{out}"
    assert "multilabel:5_o_Clock_Shadow,...,Young (40 columns)" in out


def test_data_check_counts_and_bad_files(tmp_path):
    entries = [("train_00001.jpg", 4), ("train_00002.jpg", 4), ("train_00003.jpg", 1), ("test_0001.jpg", 7)]
    root = fx.write_rafdb(tmp_path / "RAF", entries)
    runner = CliRunner()
    good = runner.invoke(main, ["data", "check", f"rafdb:{root}"])
    assert good.exit_code == 0 and good.output.rstrip().endswith("ok")
    assert "samples  4: train 3, test 1" in good.output
    assert "Happiness        2        0" in good.output and "Fear             0        0  (no sample)" in good.output
    (root / "Image" / "aligned" / "train_00002_aligned.jpg").unlink()
    (root / "Image" / "aligned" / "test_0001_aligned.jpg").write_bytes(b"not an image")
    bad = runner.invoke(main, ["data", "check", f"rafdb:{root}"])
    assert bad.exit_code == 1
    assert "4 checked: 1 missing, 1 unreadable" in bad.output and "2 problem(s):" in bad.output
    assert "unreadable  Image/aligned/test_0001_aligned.jpg: not an image" in bad.output
    one_line_error(f"rafdb:{root}", "image not found for sample 'Image/aligned/train_00002_aligned.jpg'")


def test_data_check_label_sanity(tmp_path):
    path = fx.make_image(tmp_path / "a.png", 0)
    samples = [
        Sample("a", path, "train", {"cls": 0, "y": float("nan"), "z": None}),
        Sample("b", path, "test", {"cls": 5, "y": 1.0, "z": None}),
    ]
    ds = Dataset("csv", tmp_path / "x.csv", samples, classes={"cls": ["p", "q"]}, tasks=["classify:cls", "regress:w"])
    report = check_dataset(ds, images=False)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "'cls': 1 value(s) outside the 2 classes (first: sample 'b' has 5)" in text
    assert "'y': 1 NaN or infinite value(s)" in text
    assert "'z' has no value for any sample" in text
    assert "task regress:w: no label column 'w'" in text


def test_task_strings():
    assert parse_task("regress:yaw,pitch,roll").names == ("yaw", "pitch", "roll")
    assert str(parse_task("landmarks:lm")) == "landmarks:lm"
    for bad in ("classify:a,b", "landmarks:", "segment:x", "regress"):
        with pytest.raises(EtfError, match="task"):
            parse_task(bad)


def test_csv_saved_with_a_byte_order_mark(tmp_path):
    from tests.conftest import make_image

    make_image(tmp_path / "x.png", seed=0)
    (tmp_path / "bom.csv").write_bytes("\ufeffpath,split,label\nx.png,train,1\n".encode())
    dataset = load_dataset(f"csv:{tmp_path / 'bom.csv'}")
    assert dataset.ids == ["x.png"] and dataset.column("label") == [1]


def test_file_digests_are_the_bytes_hash_whatever_the_path_spelling(tmp_path, monkeypatch):
    """A relative path, an absolute one and one through a symlinked folder name one file:
    one digest (BLAKE2b of its bytes), remembered once; a missing file is unreadable."""
    import hashlib
    import sqlite3

    from etf.data.content import UNREADABLE, file_digests

    monkeypatch.setenv("ETF_DATA_HOME", str(tmp_path / "home"))
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.png").write_bytes(b"pixels")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    paths = [tmp_path / "real" / "a.png", Path("link/a.png"), Path("real/a.png"), Path("real/missing.png")]
    digest = hashlib.blake2b(b"pixels", digest_size=16).hexdigest()
    assert file_digests(paths) == [digest] * 3 + [UNREADABLE]
    with sqlite3.connect(tmp_path / "home" / "digests.sqlite") as db:
        assert db.execute("SELECT path FROM digests").fetchall() == [(str(tmp_path.resolve() / "real" / "a.png"),)]


def _garbage(db: Path) -> None:
    db.write_bytes(b"not a database " * 100)


def _other_layout(db: Path) -> None:
    import sqlite3

    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE digests (path TEXT, sha TEXT)")


def _read_only(db: Path) -> None:
    import sqlite3

    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE digests (path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, ctime INTEGER,"
                  " inode INTEGER, digest TEXT)")  # fmt: skip
    db.chmod(0o444)


def _a_folder(db: Path) -> None:
    db.mkdir()


@pytest.mark.parametrize("damage", [_garbage, _other_layout, _read_only, _a_folder])
def test_a_broken_digest_memo_is_rebuilt_or_done_without(tmp_path, damage):
    """$ETF_DATA_HOME/digests.sqlite is a cache: garbage or another layout is rebuilt, one that
    cannot be opened or written is done without, with one warning line; the command works.
    (Run as root, a read-only file is written anyway: then there is nothing to warn about.)"""
    import os
    import subprocess
    import sys

    from tests.conftest import make_folder

    root = make_folder(tmp_path / "faces", train=2, val=1, test=1)
    home = tmp_path / "home"
    home.mkdir()
    damage(home / "digests.sqlite")
    env = {**os.environ, "ETF_DATA_HOME": str(home)}
    keys = []
    for attempt in range(2):
        res = subprocess.run([sys.executable, "-m", "etf.cli", "data", "check", f"folder:{root}"],
                             capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
        warned = [line for line in res.stderr.splitlines() if line.strip()]
        rebuilt = damage in (_garbage, _other_layout)
        if attempt == 1 and rebuilt:
            assert warned == [], "a rebuilt memo works the next time"
        elif damage is not _read_only or os.geteuid() != 0:
            assert len(warned) == 1 and warned[0].startswith("Warning:") and "digests.sqlite" in warned[0], warned
        keys.append(next(line for line in res.stdout.splitlines() if "key" in line))
    assert keys[0] == keys[1]
