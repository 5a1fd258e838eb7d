"""The two decode paths of extraction: PIL in the workers (``cpu``) and decoding, resizing and
cropping where the model runs (``device``; on a CPU-only machine the same torch ops on CPU
tensors, on CUDA nvjpeg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from etf.cache.store import TokenStore
from etf.data import load_dataset
from etf.pipeline.extract.preprocess import Preprocess, decode_images, device_batch, jpeg_bytes, pil_uint8
from etf.pipeline.extract.run import ExtractOptions, extract, plan_decode

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: mean |difference| in 0..255 levels between the paths' pixels: libjpeg-turbo (torchvision)
#: against libjpeg-turbo (PIL) differs only by the resize kernels; nvjpeg also by its IDCT
#: and chroma upsampling
MEAN_LEVELS = 2.0 if DEVICE.type == "cuda" else 0.1


def _smooth(seed: int, h: int, w: int) -> np.ndarray:
    """A photo-like image: gradients and soft blobs (noise would measure the codec, not the paths)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([xx * 200, yy * 180, (xx + yy) * 90], -1)
    for _ in range(4):
        cy, cx, r = rng.random(3) * [h, w, max(h, w) / 3]
        img += (
            rng.integers(-80, 80, 3)
            * np.exp(-(((np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2) / (r * r + 1)))[
                ..., None
            ]
        )
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def photos(tmp_path) -> Path:
    """JPEGs of several sizes, a PNG, a greyscale JPEG and an EXIF-rotated JPEG."""
    root = tmp_path / "photos"
    for k, (h, w) in enumerate([(50, 50), (50, 50), (60, 44), (40, 70), (50, 50), (64, 64)]):
        d = root / "train" / ("a" if k % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_smooth(k, h, w)).save(d / f"{k}.jpg", quality=92)
    Image.fromarray(_smooth(10, 48, 48)).save(root / "train" / "a" / "png.png")
    Image.fromarray(_smooth(11, 48, 48)).convert("L").save(root / "train" / "b" / "grey.jpg", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(_smooth(12, 40, 56)).save(root / "train" / "b" / "rotated.jpg", quality=92, exif=exif)
    return root


def test_cpu_path_sends_uint8_and_gives_timms_float_input_exactly(photos, tiny_vit):
    dataset = load_dataset(f"folder:{photos}")
    pre = tiny_vit.preprocess
    timm_tf, u8 = tiny_vit.transform(), pre.pil_transform
    for i in range(len(dataset)):
        img = dataset.load_image(i)
        sent = u8(img)
        assert sent.dtype == torch.uint8 and tuple(sent.shape) == (3, *pre.size)
        assert torch.equal(pre.normalize(sent), timm_tf(img)), dataset.ids[i]


def test_device_path_matches_the_cpu_path_within_the_bound(photos, tiny_vit):
    dataset = load_dataset(f"folder:{photos}")
    pre = tiny_vit.preprocess
    paths = [s.path for s in dataset.samples]
    items = [jpeg_bytes(p) for p in paths]
    # JPEGs go to the device as bytes; the PNG and the rotated JPEG are PIL's to decode
    sent_raw = {Path(p).name for p, x in zip(paths, items) if x is not None}
    assert "png.png" not in sent_raw and "rotated.jpg" not in sent_raw and {"0.jpg", "grey.jpg"} <= sent_raw
    items = [x if x is not None else pil_uint8(dataset.load_image(i)) for i, x in enumerate(items)]
    on_device = device_batch(pre, decode_images(items, DEVICE)).cpu()
    u8 = pre.pil_transform
    on_cpu = torch.stack([u8(dataset.load_image(i)) for i in range(len(dataset))])
    diff = (on_device.int() - on_cpu.int()).abs().float()
    per_image = diff.mean(dim=(1, 2, 3))
    assert float(per_image.max()) <= MEAN_LEVELS, dict(zip(dataset.ids, per_image.tolist()))


def test_a_bad_jpeg_is_that_samples_error_not_the_batchs(photos, tmp_path):
    good = jpeg_bytes(str(next(photos.rglob("0.jpg"))))
    bad = good.clone()[: len(good) // 3]
    out = decode_images([good, bad, good], DEVICE)
    assert isinstance(out[1], str) and out[1]
    assert isinstance(out[0], torch.Tensor) and torch.equal(out[0].cpu(), out[2].cpu())


def test_decode_paths_have_different_store_keys_and_close_tokens(photos, tmp_path, tiny_vit):
    dataset = load_dataset(f"folder:{photos}")
    opts = dict(workers=0, progress=False, layers=[2])
    cpu = extract(dataset, tiny_vit, tmp_path / "c", ExtractOptions(decode="cpu", **opts))
    dev = extract(dataset, tiny_vit, tmp_path / "c", ExtractOptions(decode="device", device=DEVICE.type, **opts))
    assert cpu.complete and dev.complete and cpu.path != dev.path
    with TokenStore.open(cpu.path) as a, TokenStore.open(dev.path) as b:
        assert "decode" not in a.spec and b.spec["decode"] == "device"  # cpu: the key every older store has
        ta, tb = a.read(2).astype(np.float32), b.read(2).astype(np.float32)
    assert np.abs(ta - tb).mean() < 0.1 * np.abs(ta).mean()


def test_crops_and_views_fall_back_to_cpu_decoding_per_dataset(photos, tiny_vit):
    plain = load_dataset(f"folder:{photos}")
    assert plan_decode(plain, tiny_vit, ExtractOptions(decode="device"), DEVICE) == ("device", None)
    assert plan_decode(plain, tiny_vit, ExtractOptions(decode="cpu"), DEVICE) == ("cpu", None)
    decode, note = plan_decode(plain, tiny_vit, ExtractOptions(decode="device", views=2, augment="flip"), DEVICE)
    assert decode == "cpu" and "augmented views" in note
    auto = plan_decode(plain, tiny_vit, ExtractOptions(), DEVICE)[0]
    assert auto == ("device" if DEVICE.type == "cuda" else "cpu")


def test_device_resize_follows_the_preprocessing_description():
    pre = Preprocess(
        size=(8, 12), mean=(0.0,) * 3, std=(1.0,) * 3, interpolation="bilinear", crop_pct=1.0, crop_mode="squash"
    )
    assert pre.why_not_on_device() is None
    out = pre.resize_crop(torch.full((2, 3, 30, 17), 200, dtype=torch.uint8))
    assert out.shape == (2, 3, 8, 12) and bool((out == 200).all())
    assert "crop mode" in Preprocess(size=(8, 8), mean=(0,) * 3, std=(1,) * 3, crop_mode="border").why_not_on_device()
