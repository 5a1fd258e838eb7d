"""``celeba:ROOT``: CelebA's 40 binary attributes, official train/val/test partition.

Files as distributed on the CelebA site: ``Anno/list_attr_celeba.txt`` (line 1 the image
count, line 2 the 40 attribute names, then ``000001.jpg  -1  1 ...``; -1/1 become 0/1),
``Eval/list_eval_partition.txt`` (``000001.jpg 0``; 0 train, 1 val, 2 test) and
``Img/img_align_celeba/``. Each file may also sit directly in ``ROOT`` (as torchvision and
some mirrors lay it out), and images in ``ROOT/img_align_celeba/``.

Crop metadata: the aligned images get ``meta["landmarks5"]`` from
``list_landmarks_align_celeba.txt`` when present. CelebA's boxes
(``list_bbox_celeba.txt``) and unaligned landmarks (``list_landmarks_celeba.txt``) are
coordinates in the *in-the-wild* images, so they are used only with ``aligned=false``,
which reads ``Img/img_celeba/``. Label columns are the attribute names as in the file.
"""

from __future__ import annotations

from pathlib import Path

from etf.data.base import Dataset, MetaSource, Sample, register_dataset
from etf.data.datasets._common import annotation_error, find, numbers, read_rows
from etf.errors import EtfError

ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
PARTITION = {0: "train", 1: "val", 2: "test"}


def _file(root: Path, folder: str, name: str, required: bool = True) -> Path | None:
    return find(root, [f"{folder}/{name}", name], name, "celeba", required)


def read_table(path: Path, width: int, allowed: set[int] | None = None) -> tuple[list[str], dict[str, list[float]]]:
    """A CelebA annotation table: count line, header line, then ``name v1 .. v<width>`` rows."""
    rows = read_rows(path)
    if len(rows) < 2 or len(rows[0][1]) != 1 or not rows[0][1][0].isdigit():
        raise annotation_error(path, 1, "expected the image count on line 1 and column names on line 2")
    header = rows[1][1][1:] if rows[1][1][0] == "image_id" else rows[1][1]
    if len(header) != width:
        raise annotation_error(path, rows[1][0], f"expected {width} column names, got {len(header)}")
    table = {}
    for line, fields in rows[2:]:
        if len(fields) != width + 1:
            raise annotation_error(path, line, f"expected an image name and {width} values, got {len(fields)} fields")
        table[fields[0]] = numbers(fields[1:], path, line)
        bad = [v for v in table[fields[0]] if allowed is not None and v not in allowed]
        if bad:
            raise annotation_error(path, line, f"value {bad[0]:g} (expected {' or '.join(map(str, sorted(allowed)))})")
    if len(table) != int(rows[0][1][0]):
        raise annotation_error(path, 1, f"says {rows[0][1][0]} images but the file lists {len(table)}")
    return header, table


@register_dataset(
    "celeba",
    description="CelebA: 40 binary face attributes, official train/val/test partition",
    layout="ROOT/Anno/list_attr_celeba.txt, ROOT/Eval/list_eval_partition.txt, ROOT/Img/img_align_celeba/",
    tasks=(f"multilabel:{','.join(ATTRIBUTES)}",),
    metric="mean_accuracy",
)
def load_celeba(root: Path, aligned: bool = True) -> Dataset:
    names, attrs = read_table(_file(root, "Anno", "list_attr_celeba.txt"), len(ATTRIBUTES), {-1, 1})
    partition_file = _file(root, "Eval", "list_eval_partition.txt")
    partition = {}
    for line, fields in read_rows(partition_file):
        split = numbers(fields[1:], partition_file, line, int) if len(fields) == 2 else None
        if not split or split[0] not in PARTITION:
            raise annotation_error(partition_file, line, f"expected 'NAME 0|1|2', got {' '.join(fields)!r}")
        partition[fields[0]] = PARTITION[split[0]]
    folder = "img_align_celeba" if aligned else "img_celeba"
    images = find(
        root,
        [f"Img/{folder}", folder],
        f"image folder {folder}/ (unpack {folder}.zip if that is what you have)",
        "celeba",
    )
    meta = _meta(root, aligned)
    samples = []
    for name, values in attrs.items():
        if name not in partition:
            raise EtfError(f"celeba:{root}: {name} is in list_attr_celeba.txt but not in {partition_file.name}")
        labels = {a: int(v > 0) for a, v in zip(names, values)}
        path = images / name
        samples.append(Sample(path.relative_to(root).as_posix(), path, partition[name], labels, meta.get(name, {})))
    sources = {
        "landmarks5": MetaSource(f"CelebA's list_landmarks{'_align' if aligned else ''}_celeba.txt"),
        "box": MetaSource("CelebA's list_bbox_celeba.txt"),
    }
    return Dataset("celeba", root, samples, tasks=[f"multilabel:{','.join(names)}"], meta_sources=sources)


def _meta(root: Path, aligned: bool) -> dict[str, dict]:
    """Per image name: ``landmarks5`` and, for in-the-wild images, ``box``, from the files present."""
    meta: dict[str, dict] = {}
    points = _file(root, "Anno", f"list_landmarks{'_align' if aligned else ''}_celeba.txt", required=False)
    if points:
        for name, v in read_table(points, 10)[1].items():
            meta.setdefault(name, {})["landmarks5"] = [v[i : i + 2] for i in range(0, 10, 2)]
    boxes = None if aligned else _file(root, "Anno", "list_bbox_celeba.txt", required=False)
    if boxes:
        for name, (x, y, w, h) in read_table(boxes, 4)[1].items():
            meta.setdefault(name, {})["box"] = [x, y, x + w, y + h]
    return meta
