"""``wflw:ROOT``: WFLW 98-point landmarks with its six test subsets.

Files as distributed: ``WFLW_annotations/list_98pt_rect_attr_train_test/
list_98pt_rect_attr_{train,test}.txt`` and ``WFLW_images/``. Each line: 196 coordinates
(x0 y0 ... x97 y97), the face rectangle (x_min y_min x_max y_max), six 0/1 flags (pose,
expression, illumination, make-up, occlusion, blur), then the image path relative to
``WFLW_images/``. One image can hold several annotated faces, so the sample id is
``WFLW_images/<path>#<k>``, k counting that image's faces in file order (train, then test).

Splits: ``train`` (7500) and ``test`` (2500, the full test set). The subsets overlap (a
face can be both occluded and blurred), so they cannot be splits: the flags are label
columns ``subset_pose``, ``subset_expression``, ``subset_illumination``,
``subset_makeup``, ``subset_occlusion``, ``subset_blur`` (on train samples too), and a
subset's metric is the metric over the test samples whose flag is 1. ``val`` holds out a
seeded fraction of train.

Labels: ``lm<i>_x``, ``lm<i>_y`` (i = 0..97) and ``nme_norm`` = inter-ocular distance
between the outer eye corners, points 60 and 72. ``meta["box"]`` is the annotated
rectangle; ``meta["landmarks5"]`` the pupils (96, 97), nose tip (54), mouth corners (76, 82)
of the ground truth, so ``--crop align5`` is refused unless ``?landmarks5=FILE`` gives
detector landmarks. An image is the group of its faces (hold-outs keep them together).
"""

from __future__ import annotations

from pathlib import Path

from etf.data.base import Dataset, MetaSource, Sample, register_dataset
from etf.data.datasets._common import (
    FIVE_FROM_98,
    annotation_error,
    find,
    five_points,
    hold_out,
    landmark_labels,
    numbers,
    points_array,
    read_rows,
)
from etf.data.labels import SUBSET_PREFIX

LISTS = "WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_{}.txt"
SUBSETS = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")
OUTER_EYE_CORNERS = (60, 72)
FIELDS = 196 + 4 + len(SUBSETS) + 1
SOURCES = {
    "box": MetaSource("WFLW's face rectangle"),
    "landmarks5": MetaSource("five points of the ground-truth landmarks", ground_truth=True),
}


@register_dataset(
    "wflw",
    description="WFLW 98-point landmarks: train 7500, test 2500; subset flags subset_pose, ... as labels",
    layout="ROOT/WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_{train,test}.txt, ROOT/WFLW_images/",
    tasks=("landmarks:lm",),
    metric="nme",
)
def load_wflw(root: Path, val: float = 0.0, seed: int = 0) -> Dataset:
    images = find(root, ["WFLW_images"], "image folder", "wflw")
    faces: dict[str, int] = {}
    samples = []
    for split in ("train", "test"):
        path = find(root, [LISTS.format(split)], f"{split} annotation list", "wflw")
        for line, fields in read_rows(path):
            if len(fields) != FIELDS:
                raise annotation_error(
                    path,
                    line,
                    f"expected {FIELDS} fields (196 coordinates, 4 box, 6 flags, image path), got {len(fields)}",
                )
            values = numbers(fields[:200], path, line)
            flags = numbers(fields[200:206], path, line, int)
            if any(f not in (0, 1) for f in flags):
                raise annotation_error(path, line, f"attribute flags must be 0 or 1, got {' '.join(fields[200:206])}")
            points = points_array(values[:196], path, line, 98)
            labels = landmark_labels(points, OUTER_EYE_CORNERS)
            labels.update({f"{SUBSET_PREFIX}{name}": flag for name, flag in zip(SUBSETS, flags)})
            meta = {"box": values[196:200], "landmarks5": five_points(points, FIVE_FROM_98)}
            image = images / fields[206]
            rel = image.relative_to(root).as_posix()
            k = faces[rel] = faces.get(rel, -1) + 1
            samples.append(Sample(f"{rel}#{k}", image, split, labels, meta, rel))
    samples = hold_out(samples, val, seed, f"wflw:{root}")
    return Dataset("wflw", root, samples, group_by="image", meta_sources=dict(SOURCES))
