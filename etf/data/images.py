"""Image decoding that turns every format a face dataset ships into 8-bit RGB."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".gif"})


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette, alpha and 16/32-bit images to 8-bit RGB.

    PIL's plain ``convert("RGB")`` clips 16-bit data to white, so high-bit-depth images are
    rescaled by their type's range first; alpha is composited onto black.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255) else 255.0
        if img.mode == "F":
            top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully (truncation shows here, not later) with EXIF orientation applied."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def read_image(path: str | os.PathLike):
    """:func:`load_rgb` for an image a user names on the command line: a missing, non-image or
    truncated file is one error naming it."""
    from etf.errors import EtfError

    try:
        return load_rgb(path)
    except FileNotFoundError:
        raise EtfError(f"{path}: image not found") from None
    except UnidentifiedImageError:
        raise EtfError(f"{path}: not an image") from None
    except Exception as e:  # truncated or corrupt pixel data, of many exception types
        raise EtfError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def require_readable(paths: list[Path]) -> None:
    """Header-check images a user named, before any model is built: one error for the first
    that is missing or not an image, and how many more are."""
    from etf.errors import EtfError

    bad = [(p, why) for p in paths if (why := check_image(Path(p)))]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise EtfError(f"{bad[0][0]}: {bad[0][1]}{more}")


def check_image(path: Path) -> str | None:
    """Cheap header check before extraction: the reason ``path`` is unusable, or None.

    Catches missing, empty, non-image and header-corrupt files without decoding pixels;
    truncated pixel data is caught when the image is decoded.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            img.verify()
    except FileNotFoundError:
        return "file not found"
    except UnidentifiedImageError:
        return "not an image"
    except Exception as e:  # PIL raises many types for corrupt headers
        return f"corrupt image ({type(e).__name__}: {e})"
    return None
