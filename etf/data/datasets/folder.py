"""``folder:ROOT``: one sub-folder per class, optionally inside train/ val/ test/ folders."""

from __future__ import annotations

from pathlib import Path

from etf.data.base import SPLITS, Dataset, Sample, register_dataset
from etf.data.images import find_images
from etf.errors import EtfError


@register_dataset(
    "folder",
    description="class sub-folders (ImageNet style); the folder name is the label",
    layout="ROOT/<class>/*.jpg, or ROOT/{train,val,test}/<class>/*.jpg",
    tasks=("classify:label",),
    metric="accuracy",
)
def load_folder(root: Path) -> Dataset:
    if not root.is_dir():
        raise EtfError(
            f"folder:{root}: not a directory (folder: takes ROOT/<class>/*.jpg; for a file list use csv:FILE)"
        )
    split_dirs = [s for s in SPLITS if (root / s).is_dir()]
    parts = [(s, root / s) for s in split_dirs] if split_dirs else [("train", root)]
    classes = sorted({d.name for _, base in parts for d in base.iterdir() if d.is_dir()})
    if not classes:
        raise EtfError(f"folder:{root}: no class sub-folders found (expected ROOT/<class>/*.jpg)")
    index = {c: i for i, c in enumerate(classes)}
    samples = [
        Sample(p.relative_to(root).as_posix(), p, split, {"label": index[cls.name]})
        for split, base in parts
        for cls in sorted(d for d in base.iterdir() if d.is_dir())
        for p in find_images(cls)
    ]
    if not samples:
        raise EtfError(f"folder:{root}: no images found under the class folders")
    return Dataset("folder", root, samples, classes={"label": classes})
