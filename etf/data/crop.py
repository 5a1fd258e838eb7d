"""Face crops recorded in the dataset spec, so a different crop makes a different cache key."""

from __future__ import annotations

from PIL import Image

from etf.data.base import Sample
from etf.errors import EtfError

CROPS = ("none",)


def parse_crop(value: str) -> str:
    """Validate a ``--crop`` value and return its canonical spelling."""
    if value in ("", "none"):
        return "none"
    raise EtfError(f"--crop {value!r}: unknown crop (choose from {', '.join(CROPS)})")


def apply_crop(img: Image.Image, sample: Sample, crop: str) -> Image.Image:
    if crop == "none":
        return img
    raise EtfError(f"sample {sample.id!r}: unknown crop {crop!r}")
