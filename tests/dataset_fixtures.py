"""Writers for tiny copies of face datasets in their official on-disk formats.

Each writes the real file names, header lines and label encodings, with small random
images, so the adapters are tested on exactly what they read in the wild.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io

from tests.conftest import make_image

SIDE = 16


def _img(path: Path, seed: int = 0) -> Path:
    return make_image(path, seed=seed, size=SIDE)


def write_rafdb(root: Path, entries: Sequence[tuple[str, int]], original: bool = False) -> Path:
    """``EmoLabel/list_patition_label.txt`` plus aligned (and original, with manual landmarks) images."""
    (root / "EmoLabel").mkdir(parents=True)
    lines = [f"{name} {label}" for name, label in entries]
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for k, (name, _) in enumerate(entries):
        stem = name[:-4]
        _img(root / "Image" / "aligned" / f"{stem}_aligned.jpg", k)
        if original:
            _img(root / "Image" / "original" / name, k)
            manual = root / "Annotation" / "manual" / f"{stem}_manu_attri.txt"
            manual.parent.mkdir(parents=True, exist_ok=True)
            points = "\n".join(f"{4 + i}.5\t{5 + i}.25" for i in range(5))
            manual.write_text(f"{points}\n0\n2\n1\n")
    return root


AFFECTNET_HEADER = (
    "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
)


def affectnet_row(k: int, expression: int, valence: float = 0.5, arousal: float = -0.25) -> str:
    points = ";".join(f"{2 + (i % 10)}.5;{3 + (i // 10)}.5" for i in range(68))
    return f'{k % 3}/img{k:04d}.jpg,1,2,10,12,"{points}",{expression},{valence},{arousal}'


def write_affectnet(root: Path, train: Sequence[str], validation: Sequence[str], val_header: bool = False) -> Path:
    """``Manually_Annotated_file_lists/{training,validation}.csv`` (validation without a header, as some copies ship)."""
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True)
    (lists / "training.csv").write_text("\n".join([AFFECTNET_HEADER, *train]) + "\n")
    (lists / "validation.csv").write_text("\n".join([AFFECTNET_HEADER] * val_header + list(validation)) + "\n")
    for k, row in enumerate([*train, *validation]):
        _img(root / "Manually_Annotated_Images" / row.split(",")[0], k)
    return root


FER_USAGE = ("Training", "PublicTest", "PrivateTest")


def fer_pixels(k: int) -> str:
    return " ".join(str((k * 7 + i) % 256) for i in range(48 * 48))


def write_fer2013(root: Path, rows: Sequence[tuple[int, str]]) -> Path:
    """``fer2013.csv``: emotion, 48x48 pixels as text, Usage."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "fer2013.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        for k, (emotion, usage) in enumerate(rows):
            w.writerow([emotion, fer_pixels(k), usage])
    return path


FERPLUS_HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"


def write_ferplus(root: Path, rows: Sequence[tuple[str, bool, Sequence[int]]]) -> Path:
    """``fer2013new.csv`` (Usage, image name or empty, 10 vote counts) plus a matching ``fer2013.csv``."""
    write_fer2013(root, [(0, usage) for usage, _, _ in rows])
    lines = [FERPLUS_HEADER]
    for k, (usage, named, votes) in enumerate(rows):
        lines.append(f"{usage},{f'fer{k:07d}.png' if named else ''},{','.join(map(str, votes))}")
    (root / "fer2013new.csv").write_text("\n".join(lines) + "\n")
    return root


def celeba_attrs(k: int) -> list[int]:
    return [1 if (k + i) % 3 == 0 else -1 for i in range(40)]


def write_celeba(root: Path, partition: Sequence[int], flat: bool = False, aligned: bool = True) -> Path:
    """``Anno/``, ``Eval/`` and ``Img/img_align_celeba/`` (or all flat in ``root``, torchvision style)."""
    from etf.data.datasets.celeba import ATTRIBUTES

    anno, ev, img = (root, root, root) if flat else (root / "Anno", root / "Eval", root / "Img")
    for d in (anno, ev):
        d.mkdir(parents=True, exist_ok=True)
    names = [f"{k + 1:06d}.jpg" for k in range(len(partition))]
    rows = [f"{n}  " + " ".join(f"{v:2d}" for v in celeba_attrs(k)) for k, n in enumerate(names)]
    (anno / "list_attr_celeba.txt").write_text("\n".join([str(len(names)), " ".join(ATTRIBUTES) + " ", *rows]) + "\n")
    (ev / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, partition)))
    header = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    marks = [f"{n} 5 6 11 6 8 9 6 12 10 12" for n in names]
    (anno / "list_landmarks_align_celeba.txt").write_text("\n".join([str(len(names)), header, *marks]) + "\n")
    boxes = [f"{n}    {k}   2   8   9" for k, n in enumerate(names)]
    (anno / "list_bbox_celeba.txt").write_text(
        "\n".join([str(len(names)), "image_id x_1 y_1 width height", *boxes]) + "\n"
    )
    for k, n in enumerate(names):
        _img(img / ("img_align_celeba" if aligned else "img_celeba") / n, k)
    return root


def write_named(root: Path, names: Sequence[str]) -> Path:
    """Images whose file names are their labels (UTKFace, AgeDB)."""
    for k, n in enumerate(names):
        _img(root / n, k)
    return root


def write_pts(path: Path, points: np.ndarray) -> None:
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in points)
    path.write_text(f"version: 1\nn_points:  {len(points)}\n{{\n{body}\n}}\n")


def face_points(n: int, k: int) -> np.ndarray:
    """``n`` distinct points inside a 16x16 image, varying with ``k``."""
    rng = np.random.default_rng(k)
    return rng.uniform(1, SIDE - 1, size=(n, 2)).round(3)


W300_COUNTS = {"lfpw/trainset": 2, "helen/trainset": 2, "afw": 1, "lfpw/testset": 1, "helen/testset": 2, "ibug": 1}


def write_300w(root: Path) -> Path:
    k = 0
    for folder, n in W300_COUNTS.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            suffix = ".png" if folder.startswith("lfpw") else ".jpg"
            _img(root / folder / f"image_{i:04d}{suffix}", k)
            write_pts(root / folder / f"image_{i:04d}.pts", face_points(68, k))
            k += 1
    return root


def wflw_line(k: int, image: str, flags: Sequence[int]) -> str:
    coords = " ".join(f"{v:.6f}" for v in face_points(98, k).ravel())
    return f"{coords} 1 2 13 14 {' '.join(map(str, flags))} {image}"


def write_wflw(root: Path, train: Sequence[str], test: Sequence[str]) -> Path:
    lists = root / "WFLW_annotations" / "list_98pt_rect_attr_train_test"
    lists.mkdir(parents=True)
    (lists / "list_98pt_rect_attr_train.txt").write_text("\n".join(train) + "\n")
    (lists / "list_98pt_rect_attr_test.txt").write_text("\n".join(test) + "\n")
    for k, line in enumerate([*train, *test]):
        _img(root / "WFLW_images" / line.split()[-1], k)
    return root


def write_pose(folder: Path, name: str, pitch: float, yaw: float, roll: float, pt2d: np.ndarray | None = None) -> None:
    """``name.jpg`` + ``name.mat`` as 3DDFA writes them: ``Pose_Para`` (1x7, radians first), ``pt2d`` (2xN)."""
    folder.mkdir(parents=True, exist_ok=True)
    _img(folder / f"{name}.jpg")
    mat = {"Pose_Para": np.array([[pitch, yaw, roll, 0.1, 0.2, 0.3, 0.001]], dtype=np.float32)}
    if pt2d is not None:
        mat["pt2d"] = pt2d
    scipy.io.savemat(folder / f"{name}.mat", mat)


def write_au(
    path: Path, rows: Sequence[tuple[str, str, dict[str, str]]], aus: Sequence[int], fold: bool = False
) -> Path:
    """The documented AU CSV: path, subject, AU columns (and optionally fold)."""
    cols = ["path", "subject", *[f"AU{n}" for n in aus], *(["fold"] if fold else [])]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for k, (rel, subject, values) in enumerate(rows):
            _img(path.parent / rel, k)
            w.writerow({"path": rel, "subject": subject, **values})
    return path
