"""An encoder's input preprocessing, split so that decode workers send uint8 and the rest
runs where the forward pass does.

:class:`Preprocess` describes what an encoder wants (size, mean, std, interpolation,
crop), whatever kind of encoder it is. Two decode paths share it:

- ``cpu``: workers decode with PIL and resize and crop with PIL, exactly as timm's eval
  transform does, and send the uint8 result; :meth:`Preprocess.normalize` finishes on the
  device. The tokens are those of timm's float transform, bit for bit.
- ``device``: workers read JPEG bytes (other formats, and JPEGs PIL must rotate or convert,
  they decode to uint8); :func:`decode_images` decodes the batch on the device (nvjpeg on
  CUDA, libjpeg-turbo on the CPU) and :meth:`Preprocess.resize_crop` resizes and crops
  there with torch's antialiased kernels. Its tokens differ slightly from the ``cpu``
  path's, so a store records ``decode: device`` in its spec (tests/test_preprocess.py
  bounds the difference).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from etf.errors import EtfError

DECODES = ("auto", "cpu", "device")
DEFAULT_CROP_PCT = 0.875


def resolve_decode(decode: str, device: torch.device) -> str:
    """``auto``: ``device`` on CUDA (nvjpeg), ``cpu`` elsewhere (PIL in the workers)."""
    if decode not in DECODES:
        raise EtfError(f"--decode {decode!r}: use one of {', '.join(DECODES)}")
    if decode == "auto":
        return "device" if device.type == "cuda" else "cpu"
    return decode


@dataclass(frozen=True)
class Preprocess:
    """What an encoder's input must look like: (H, W), per-channel mean and std of 0..1
    pixels, the resize interpolation, and the crop (timm's ``crop_pct`` and ``crop_mode``)."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = "center"

    @classmethod
    def from_data_config(cls, config: dict[str, Any]) -> Preprocess:
        """From timm's resolved data config (``input_size``, ``mean``, ``std``, ...)."""
        return cls(
            size=(int(config["input_size"][1]), int(config["input_size"][2])),
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
            interpolation=config.get("interpolation") or "bilinear",
            crop_pct=float(config.get("crop_pct") or DEFAULT_CROP_PCT),
            crop_mode=config.get("crop_mode") or "center",
        )

    @property
    def scale_size(self) -> tuple[int, int]:
        return (math.floor(self.size[0] / self.crop_pct), math.floor(self.size[1] / self.crop_pct))

    @functools.cached_property
    def pil_transform(self) -> Any:
        """PIL image -> uint8 (C, H, W): timm's eval transform without its float conversion
        (built once per preprocessing)."""
        from timm.data import create_transform

        return create_transform(
            input_size=(3, *self.size),
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            crop_mode=self.crop_mode,
            is_training=False,
            normalize=False,
        )

    def why_not_on_device(self) -> str | None:
        """Why :meth:`resize_crop` cannot reproduce this preprocessing (None: it can)."""
        if self.crop_mode == "squash":
            return None
        if self.crop_mode != "center":
            return f"crop mode {self.crop_mode!r}"
        if self.scale_size[0] != self.scale_size[1]:
            return f"non-square input {self.size[0]}x{self.size[1]}"
        return None

    def resize_crop(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, h, w) -> uint8 (..., C, H, W) on the image's device: the resize and
        centre crop of timm's eval transform, with torch's antialiased kernels."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        mode = InterpolationMode(self.interpolation)
        size = list(self.scale_size) if self.crop_mode == "squash" else [self.scale_size[0]]  # else: shorter side
        return F.center_crop(F.resize(image, size, interpolation=mode, antialias=True), list(self.size))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) -> float32 model input, with the same operations as
        torchvision's ``ToTensor`` then ``Normalize`` (so the same values)."""
        return x.float().div_(255).sub_(_per_channel(self.mean, x.device)).div_(_per_channel(self.std, x.device))


@functools.lru_cache(maxsize=32)
def _per_channel(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(C, 1, 1) constants on ``device``, made once: not a host-to-device copy per batch."""
    return torch.tensor(values, device=device).view(-1, 1, 1)


def jpeg_bytes(path: str) -> torch.Tensor | None:
    """The file's bytes as a 1-D uint8 tensor when it is a JPEG the device decoder reproduces
    (RGB or greyscale, no EXIF rotation); None when PIL must decode it. The file is read once;
    PIL parses only its header from the bytes."""
    import io

    from PIL import Image

    with open(path, "rb") as f:
        data = bytearray(f.read())
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "JPEG" or img.mode not in ("RGB", "L") or img.getexif().get(0x0112, 1) != 1:
            return None
    return torch.frombuffer(data, dtype=torch.uint8)


def pil_uint8(image: Any) -> torch.Tensor:
    """A decoded RGB PIL image as uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_images(items: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | str]:
    """Each item, a 1-D tensor of JPEG bytes or an already decoded uint8 (3, H, W), as a
    uint8 (3, H, W) on ``device``. The JPEGs decode in one batched call (nvjpeg on CUDA); if
    that fails, one by one, and an image that cannot be decoded becomes its error string."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | str] = [x.to(device, non_blocking=True) if x.dim() == 3 else "" for x in items]
    jpegs = [k for k, x in enumerate(items) if x.dim() == 1]
    if not jpegs:
        return out
    try:
        decoded = decode_jpeg([items[k] for k in jpegs], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = []
        for k in jpegs:
            try:
                decoded.append(decode_jpeg(items[k], mode=ImageReadMode.RGB, device=device))
            except RuntimeError as e:
                decoded.append(f"RuntimeError: {e}")
    for k, img in zip(jpegs, decoded):
        out[k] = img
    return out


def device_batch(pre: Preprocess, images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 (3, h, w) images of any sizes -> uint8 (B, 3, H, W): images of one size are
    resized together, in one call."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape), []).append(k)
    if len(by_shape) == 1:
        return pre.resize_crop(torch.stack(images))
    out = torch.empty((len(images), 3, *pre.size), dtype=torch.uint8, device=images[0].device)
    for ks in by_shape.values():
        out[ks] = pre.resize_crop(torch.stack([images[k] for k in ks]))
    return out


def model_input(
    pre: Preprocess, x: Any, errors: list[str], decode: str, device: torch.device
) -> tuple[torch.Tensor, list[str]]:
    """A batch as (B, K, C, H, W) model input on ``device``, and each sample's error: ``cpu``
    decoding gives uint8 (B, K, C, H, W); ``device`` decoding gives a list of JPEG bytes or
    decoded images (:func:`decode_images`), whose errors it adds."""
    if decode == "cpu":
        return pre.normalize(x.to(device, non_blocking=True)), errors
    images = decode_images(x, device)
    errors = [e or (img if isinstance(img, str) else "") for e, img in zip(errors, images)]
    ok = [k for k, e in enumerate(errors) if not e]
    if len(ok) == len(images):
        return pre.normalize(device_batch(pre, images)).unsqueeze(1), errors
    out = torch.zeros((len(images), 1, 3, *pre.size), device=device)
    if ok:
        out[ok, 0] = pre.normalize(device_batch(pre, [images[k] for k in ok]))
    return out, errors


def prepare_files(pre: Preprocess, paths: list[Any], decode: str, device: torch.device) -> torch.Tensor:
    """Model input (B, C, H, W) on ``device`` for image files a user names, prepared by the
    decode path a store was extracted with (``etf predict`` must match it)."""
    from etf.data.images import read_image

    if decode == "cpu":
        tf = pre.pil_transform
        x: Any = torch.stack([tf(read_image(p)) for p in paths])[:, None]
    else:
        x = [jpeg_bytes(str(p)) for p in paths]
        x = [b if b is not None else pil_uint8(read_image(p)) for b, p in zip(x, paths)]
    x, errors = model_input(pre, x, [""] * len(paths), decode, device)
    for p, e in zip(paths, errors):
        if e:
            raise EtfError(f"{p}: unreadable image ({e})")
    return x[:, 0]
