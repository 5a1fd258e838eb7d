"""Shared fixtures: tiny random-init encoders and image datasets the tests make themselves."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network in tests
torch.set_num_threads(2)

TINY_VIT = "vit_tiny_patch16_224"
TINY_CNN = "resnet18"
IMG = 32  # tiny input: 2x2 ViT patches, fast on two cores


@pytest.fixture(scope="session", autouse=True)
def data_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("data_home")
    os.environ["ETF_DATA_HOME"] = str(home)
    return home


def make_image(path: Path, seed: int, size: int = 40, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_folder(root: Path, train: int, val: int = 3, test: int = 3) -> Path:
    """ROOT/{train,val,test}/{a,b}/<i>.png: small random images, distinct across splits."""
    for k, (split, n) in enumerate((("train", train), ("val", val), ("test", test))):
        for cls in ("a", "b"):
            for i in range(n):
                make_image(root / split / cls / f"{i}.png", seed=100 * k + 10 * (cls == "b") + i)
    return root


@pytest.fixture
def folder_dataset(tmp_path) -> Path:
    """ROOT/{train,val,test}/{a,b}/*.png: 24 small random images."""
    root = tmp_path / "faces"
    k = 0
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        for cls in ("a", "b"):
            for i in range(n):
                make_image(root / split / cls / f"{i:02d}.png", seed=k)
                k += 1
    return root


@pytest.fixture
def tiny_vit():
    from etf.pipeline.extract.encoders import create_encoder

    return create_encoder(TINY_VIT, pretrained=False, img_size=IMG)


@pytest.fixture
def tiny_cnn():
    from etf.pipeline.extract.encoders import create_encoder

    return create_encoder(TINY_CNN, pretrained=False, img_size=IMG)
