"""lfw and cfp adapters on generated fixtures in the official layouts, and their bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from etf.data import load_dataset
from etf.errors import EtfError

# people named by the pairs (test), and people only in train; name -> image count
PAIRED = {"Ann_A": 2, "Bob_B": 3, "Cy_C": 1, "Dee_D": 2}
UNPAIRED = {"Eve_E": 2, "Fay_F": 1}


def _images(folder: Path, people: dict[str, int]) -> None:
    for name, count in people.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for n in range(1, count + 1):
            Image.new("RGB", (4, 4), (n, 0, 0)).save(folder / name / f"{name}_{n:04d}.jpg")


def _fold(k: int) -> list[str]:
    """One matched then one mismatched pair, varying with the fold."""
    matched = ["Ann_A\t1\t2", "Bob_B\t1\t3", "Dee_D\t2\t1"][k % 3]
    mismatched = ["Ann_A\t1\tCy_C\t1", "Bob_B\t2\tDee_D\t1", "Cy_C\t1\tDee_D\t2"][k % 3]
    return [matched, mismatched]


def write_lfw(root: Path, images: str = "lfw", pairs: list[str] | None = None) -> Path:
    _images(root / images, {**PAIRED, **UNPAIRED})
    lines = pairs if pairs is not None else ["10\t1", *(line for k in range(10) for line in _fold(k))]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root


def _refused(spec: str, message: str) -> None:
    with pytest.raises(EtfError, match=message):
        load_dataset(spec)


def test_lfw_view_2_reads_the_official_layout(tmp_path):
    d = load_dataset(f"lfw:{write_lfw(tmp_path)}")
    pairs = d.pairs["test"]
    assert len(pairs["a"]) == len(pairs["b"]) == 20
    assert pairs["same"] == [1, 0] * 10
    assert pairs["fold"] == [k for k in range(10) for _ in range(2)]
    assert pairs["a"][:2] == ["lfw/Ann_A/Ann_A_0001.jpg", "lfw/Ann_A/Ann_A_0001.jpg"]
    assert pairs["b"][:2] == ["lfw/Ann_A/Ann_A_0002.jpg", "lfw/Cy_C/Cy_C_0001.jpg"]
    split = dict(zip(d.ids, d.splits))
    assert sorted(s for s, v in split.items() if v == "train") == [
        "lfw/Eve_E/Eve_E_0001.jpg",
        "lfw/Eve_E/Eve_E_0002.jpg",
        "lfw/Fay_F/Fay_F_0001.jpg",
    ]
    assert {split[s] for s in pairs["a"] + pairs["b"]} == {"test"}
    assert "lfw/Bob_B/Bob_B_0002.jpg" in split  # named by a mismatched pair
    assert d.classes["identity"] == sorted({**PAIRED, **UNPAIRED})
    assert d.tasks == ["verify:identity"]
    names = d.classes["identity"]
    assert all(names[lab] == sid.split("/")[1] for sid, lab in zip(d.ids, d.column("identity")))
    assert d.group_by == "identity" and d.groups == [sid.split("/")[1] for sid in d.ids]


def test_data_check_states_the_pair_protocol(tmp_path):
    from click.testing import CliRunner

    from etf.cli import main

    out = CliRunner().invoke(main, ["data", "check", f"lfw:{write_lfw(tmp_path)}"]).output
    assert "protocol test: 20 pairs (10 matched, 10 mismatched), 10 folds" in out


def test_changed_pairs_make_a_new_dataset_key(tmp_path):
    root = write_lfw(tmp_path)
    key = load_dataset(f"lfw:{root}").key
    text = (root / "pairs.txt").read_text()
    (root / "pairs.txt").write_text(text.replace("Ann_A\t1\t2", "Ann_A\t2\t1", 1))
    assert load_dataset(f"lfw:{root}").key != key


def test_lfw_from_the_scikit_learn_data_home(tmp_path):
    home = tmp_path / "scikit_learn_data"
    write_lfw(home / "lfw_home", images="lfw_funneled")
    for spec in (f"lfw:{home}", f"lfw:{home / 'lfw_home'}"):
        d = load_dataset(spec)
        assert d.pairs["test"]["a"][0] == "lfw_funneled/Ann_A/Ann_A_0001.jpg"
        assert d.samples[0].path.is_file()


def test_lfw_view_1_uses_the_people_lists(tmp_path):
    root = write_lfw(tmp_path)
    (root / "peopleDevTrain.txt").write_text("2\nAnn_A\t2\nBob_B\t3\n")
    (root / "peopleDevTest.txt").write_text("3\nCy_C\t1\nDee_D\t2\nEve_E\t2\n")
    d = load_dataset(f"lfw:{root}?view=1")
    assert d.splits.count("train") == 5 and d.splits.count("test") == 5
    assert d.pairs is None  # no pairsDevTest.txt: verification draws pairs from the identities
    (root / "pairsDevTest.txt").write_text("1\nDee_D\t1\t2\nCy_C\t1\tEve_E\t2\n")
    d = load_dataset(f"lfw:{root}?view=1")
    assert d.pairs == {
        "test": {
            "a": ["lfw/Dee_D/Dee_D_0001.jpg", "lfw/Cy_C/Cy_C_0001.jpg"],
            "b": ["lfw/Dee_D/Dee_D_0002.jpg", "lfw/Eve_E/Eve_E_0002.jpg"],
            "same": [1, 0],
        }
    }
    (root / "peopleDevTest.txt").write_text("3\nCy_C\t1\nDee_D\t2\nAnn_A\t2\n")
    _refused(f"lfw:{root}?view=1", r"peopleDevTest.txt: line 4: Ann_A is also in peopleDevTrain.txt")
    (root / "peopleDevTest.txt").write_text("4\nCy_C\t1\nDee_D\t2\nEve_E\t2\n")
    _refused(f"lfw:{root}?view=1", r"peopleDevTest.txt: line 1: says 4 people but the file lists 3")


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda fold: ["Ann_A\t1\t3", fold[1]], r"pairs.txt: line 2: image lfw/Ann_A/Ann_A_0003.jpg not found"),
        (lambda fold: [fold[0], "Ann_A\t1\tNobody\t1"], r"line 3: image lfw/Nobody/Nobody_0001.jpg not found"),
        (
            lambda fold: [fold[0], "Bob_B\t1\t2", fold[1]],
            r"pairs.txt: line 3: expected a mismatched pair \(name1 n1 name2 n2\), pair 1 of fold 1",
        ),
        (lambda fold: fold[1:], r"pairs.txt: line 2: expected a matched pair \(name n1 n2\), pair 1 of fold 1"),
        (lambda fold: [fold[0], "Ann_A\tone\tCy_C\t1"], r"pairs.txt: line 3: 'one' is not an integer"),
    ],
)
def test_bad_pairs_files_name_the_line(tmp_path, edit, message):
    folds = [edit(_fold(0))] + [_fold(k) for k in range(1, 10)]
    write_lfw(tmp_path, pairs=["10\t1", *(line for fold in folds for line in fold)])
    _refused(f"lfw:{tmp_path}", message)


def test_pairs_file_shorter_than_its_header_is_refused(tmp_path):
    write_lfw(tmp_path, pairs=["10\t1", *(line for k in range(9) for line in _fold(k))])
    _refused(
        f"lfw:{tmp_path}",
        r"pairs.txt: the header says 10 folds of 1 matched \+ 1 mismatched pairs \(20 lines\) but the file has 18",
    )


def test_missing_protocol_files_are_named(tmp_path):
    write_lfw(tmp_path)
    (tmp_path / "pairs.txt").unlink()
    _refused(f"lfw:{tmp_path}", r"no pairs.txt \(the view 2 protocol\)")
    _refused(f"lfw:{tmp_path}?view=1", r"no peopleDevTrain.txt")
    _refused(f"lfw:{tmp_path}?view=3", "view=3: use 1")


# ---------------------------------------------------------------------------- CFP


def write_cfp(root: Path, people: int = 4, per_fold: int = 2) -> Path:
    """``people`` identities with 2 frontal and 2 profile images; each fold's same.txt and
    diff.txt hold ``per_fold`` index pairs."""
    f_lines, p_lines = [], []
    for i in range(1, people + 1):
        for kind, lines in (("frontal", f_lines), ("profile", p_lines)):
            for n in (1, 2):
                path = root / "Data" / "Images" / f"{i:03d}" / kind / f"{n:02d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4)).save(path)
                lines.append(f"{len(lines) + 1} ../Data/Images/{i:03d}/{kind}/{n:02d}.jpg")
    (root / "Protocol").mkdir(parents=True, exist_ok=True)
    (root / "Protocol" / "Pair_list_F.txt").write_text("\n".join(f_lines) + "\n")
    (root / "Protocol" / "Pair_list_P.txt").write_text("\n".join(p_lines) + "\n")
    rng = np.random.default_rng(0)
    for protocol in ("FP", "FF"):
        for k in range(1, 11):
            folder = root / "Protocol" / "Split" / protocol / f"{k:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            person = rng.integers(people, size=per_fold)
            other = (person + 1) % people
            (folder / "same.txt").write_text("".join(f"{2 * p + 1},{2 * p + 2}\n" for p in person))
            (folder / "diff.txt").write_text("".join(f"{2 * p + 1},{2 * o + 1}\n" for p, o in zip(person, other)))
    return root


@pytest.mark.parametrize("protocol", ["FP", "FF"])
def test_cfp_reads_ten_folds_of_pairs(tmp_path, protocol):
    d = load_dataset(f"cfp:{write_cfp(tmp_path)}?protocol={protocol}")
    pairs = d.pairs["test"]
    assert len(pairs["a"]) == 40 and pairs["same"] == ([1] * 2 + [0] * 2) * 10
    assert pairs["fold"] == [k for k in range(10) for _ in range(4)]
    assert all(a.split("/")[-2] == "frontal" for a in pairs["a"])
    assert {b.split("/")[-2] for b in pairs["b"]} == {"FP": {"profile"}, "FF": {"frontal"}}[protocol]
    same = [(a, b) for a, b, s in zip(pairs["a"], pairs["b"], pairs["same"]) if s]
    assert all(a.split("/")[2] == b.split("/")[2] for a, b in same)  # same person folder
    assert set(d.splits) == {"test"} and d.classes["identity"] == ["001", "002", "003", "004"]


def test_cfp_bad_input_names_file_and_line(tmp_path):
    root = write_cfp(tmp_path)
    diff = root / "Protocol" / "Split" / "FP" / "03" / "diff.txt"
    diff.write_text(diff.read_text() + "1,99\n")
    _refused(f"cfp:{root}", r"03/diff.txt: line 3: index 99 is not in Pair_list_P.txt")
    diff.write_text("1,2\n")
    _refused(f"cfp:{root}", r"03/diff.txt: 1 pairs, but .*01/same.txt has 2")
    (root / "Data" / "Images" / "002" / "profile" / "01.jpg").unlink()
    _refused(f"cfp:{root}", r"Pair_list_P.txt: line 3: image Data/Images/002/profile/01.jpg not found")
    _refused(f"cfp:{root}?protocol=PP", "protocol=PP: use FP")
