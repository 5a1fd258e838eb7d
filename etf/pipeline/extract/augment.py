"""Augmented views at extraction: what online augmentation gives, computed once.

``--augment SPEC`` names torchvision (``transforms.v2``) augmentations and their strengths,
``flip,crop:0.8,rotate:10,color:0.3`` or the preset ``face``. View ``v`` of a sample is the
sample's image through those transforms with the torch RNG seeded by (seed, sample id, v),
so a view is the same in every run, worker and resume. The geometric part of each view is
recorded as the 3x3 matrix that maps image coordinates before the augmentation to after
it: torchvision moves four reference points (the image corners, as ``tv_tensors.KeyPoints``)
with the image, and the homography through them is exactly what was applied (flips, crops,
affine and perspective warps alike). Labels that live in the image (landmarks, boxes, the
NME normaliser, head-pose signs) follow the views from that matrix (:mod:`etf.data.geometry`).

Views are taken before the encoder's own (timm) evaluation transform, which every view then
goes through as the clean image does.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from etf.errors import EtfError

if TYPE_CHECKING:  # parsing a spec (on the command line) loads neither torch nor PIL
    from PIL import Image

#: name -> (default strength, kind); geometric parts run before photometric ones
PARTS: dict[str, tuple[float, str]] = {
    "flip": (0.5, "geometric"),  # probability of a horizontal mirror (1 when flip is the only part)
    "crop": (0.8, "geometric"),  # smallest kept area fraction of a square-ish random crop, resized back
    "rotate": (10.0, "geometric"),  # degrees, either way
    "shift": (0.08, "geometric"),  # translation, fraction of the side
    "scale": (0.1, "geometric"),  # zoom in [1 - s, 1 + s]
    "perspective": (0.2, "geometric"),  # distortion scale, applied to half the views
    "color": (0.3, "photometric"),  # brightness, contrast, saturation jitter (hue a quarter of it)
    "equalize": (0.2, "photometric"),  # probability of histogram equalisation (a CLAHE stand-in)
    "blur": (1.5, "photometric"),  # largest Gaussian sigma, applied to half the views
    "noise": (0.03, "photometric"),  # Gaussian noise sigma on [0, 1] pixels
    "jpeg": (40.0, "photometric"),  # lowest JPEG quality
    "erase": (0.2, "photometric"),  # largest area of one erased rectangle (coarse dropout), half the views
}
#: the default of ``--augment face``: what face-analysis training recipes (the authors' among them) use
FACE = "flip,crop:0.85,rotate:10,shift:0.05,color:0.3,blur:1.0,jpeg:50,erase:0.15"
#: parts that rotate or skew the face (they change head roll, which no label rule follows)
ROTATING = ("rotate", "perspective")


@dataclass(frozen=True)
class AugmentSpec:
    """A parsed ``--augment``: (part, strength) in the order they run."""

    parts: tuple[tuple[str, float], ...]

    def __str__(self) -> str:
        return ",".join(f"{n}:{v:g}" for n, v in self.parts)

    @property
    def rotates(self) -> bool:
        return any(n in ROTATING for n, _ in self.parts)


def parse_augment(text: str) -> AugmentSpec:
    """``--augment`` to its canonical spec (equal specs, equal store keys)."""
    text = FACE if text.strip() == "face" else text
    parts: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        m = re.fullmatch(r"([a-z]+)(?::([0-9.eE+-]+))?", item)
        if not m or m[1] not in PARTS:
            raise EtfError(f"--augment {text!r}: unknown part {item!r} (parts: {', '.join(PARTS)}, or the preset face)")
        if m[1] in parts:
            raise EtfError(f"--augment {text!r}: {m[1]} is given twice")
        try:
            value = float(m[2]) if m[2] is not None else PARTS[m[1]][0]
        except ValueError:
            raise EtfError(f"--augment {text!r}: {item!r}: the strength is not a number") from None
        parts[m[1]] = value
    if not parts:
        raise EtfError("--augment: name at least one part, e.g. flip or face")
    if list(parts) == ["flip"] and "flip:" not in text:
        parts["flip"] = 1.0  # flip alone: the view is the mirror image
    _check_ranges(parts, text)
    order = [n for n in PARTS if n in parts]  # geometric first, in PARTS order
    return AugmentSpec(tuple((n, parts[n]) for n in order))


def check_view_options(views: int, augment: str | None) -> None:
    """``--views`` and ``--augment`` together, before any work."""
    if views < 1:
        raise EtfError(f"--views {views}: must be at least 1 (1: the clean image only)")
    if augment is not None and views == 1:
        raise EtfError(f"--augment {augment}: needs --views K with K >= 2 (view 0 is the clean image)")
    if views > 1:
        parse_augment(augment or "face")


def _check_ranges(parts: dict[str, float], text: str) -> None:
    limits = {
        "flip": (0, 1),
        "crop": (0.05, 1),
        "rotate": (0, 180),
        "shift": (0, 0.5),
        "scale": (0, 0.9),
        "perspective": (0, 1),
        "color": (0, 1),
        "equalize": (0, 1),
        "blur": (0.1, 20),
        "noise": (0, 1),
        "jpeg": (1, 100),
        "erase": (0.01, 0.9),
    }
    for name, value in parts.items():
        lo, hi = limits[name]
        if not lo <= value <= hi:
            raise EtfError(f"--augment {text!r}: {name}:{value:g} is outside [{lo:g}, {hi:g}]")


def _pipeline(spec: AugmentSpec, size: tuple[int, int]) -> Any:
    """The torchvision v2 pipeline of ``spec`` for images of ``size`` (height, width)."""
    import torch
    from torchvision.transforms import v2

    p = dict(spec.parts)
    steps: list[Any] = []
    if "flip" in p:
        steps.append(v2.RandomHorizontalFlip(p["flip"]))
    if "crop" in p:
        steps.append(v2.RandomResizedCrop(size, scale=(p["crop"], 1.0), ratio=(0.9, 1.1), antialias=True))
    if {"rotate", "shift", "scale"} & p.keys():
        shift = p.get("shift", 0.0)
        zoom = p.get("scale", 0.0)
        steps.append(
            v2.RandomAffine(
                degrees=p.get("rotate", 0.0),
                translate=(shift, shift) if shift else None,
                scale=(1 - zoom, 1 + zoom) if zoom else None,
            )
        )
    if "perspective" in p:
        steps.append(v2.RandomPerspective(p["perspective"], p=0.5))
    if "color" in p:
        c = p["color"]
        steps.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c, hue=min(0.5, c / 4)))
    if "equalize" in p:
        steps.append(v2.RandomEqualize(p["equalize"]))
    if "blur" in p:
        steps.append(v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, p["blur"]))], p=0.5))
    if "jpeg" in p:
        steps.append(v2.JPEG((int(p["jpeg"]), 100)))
    tensor_steps = []
    if "noise" in p:
        tensor_steps.append(v2.GaussianNoise(sigma=p["noise"], clip=True))
    if "erase" in p:
        tensor_steps.append(v2.RandomErasing(p=0.5, scale=(0.01, p["erase"]), value=0))
    if tensor_steps:  # noise and erasing work on tensors: round-trip through [0, 1] floats
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), *tensor_steps, v2.ToPILImage()]
    return v2.Compose(steps)


def view_seed(seed: int, sample_id: str, view: int) -> int:
    """The RNG seed of one view: independent of worker, batch and resume order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}:{view}".encode()).digest()[:8], "little") >> 1


class Augmenter:
    """Views of images under one spec; ``view`` returns the augmented image and its matrix."""

    def __init__(self, spec: AugmentSpec, seed: int = 0) -> None:
        self.spec, self.seed = spec, seed
        self._pipelines: dict[tuple[int, int], Any] = {}

    def view(self, img: Image.Image, sample_id: str, view: int) -> tuple[Image.Image, np.ndarray]:
        """View ``view`` (>= 1) of ``img``: the augmented image, the same size, and the 3x3
        matrix mapping pixel coordinates of ``img`` to those of the view."""
        import torch
        from torchvision import tv_tensors

        w, h = img.size
        pipeline = self._pipelines.get((h, w))
        if pipeline is None:  # built once per image size, not per view
            pipeline = self._pipelines[(h, w)] = _pipeline(self.spec, (h, w))
        corners = np.array([[0.0, 0.0], [w, 0.0], [0.0, h], [w, h]])
        # torchvision places keypoints on pixel indices (pixel i centred at i), labels here are
        # continuous (pixel i spans [i, i + 1)): shift by half a pixel into its frame and back
        points = tv_tensors.KeyPoints(torch.tensor(corners - 0.5, dtype=torch.float64), canvas_size=(h, w))
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # erasing is photometric: torchvision's note that it passes keypoints through is moot
            warnings.filterwarnings("ignore", message="RandomErasing.*KeyPoints")
            torch.manual_seed(view_seed(self.seed, sample_id, view))
            out, moved = pipeline(img, points)
        return out, homography(corners, np.asarray(moved, dtype=np.float64) + 0.5)


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 projective matrix taking four points ``src`` onto ``dst`` (direct linear
    transform), normalised so that its last entry is 1."""
    rows = []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    _, _, vt = np.linalg.svd(np.asarray(rows))
    m = vt[-1].reshape(3, 3)
    return m / m[2, 2]
