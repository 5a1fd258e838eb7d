"""etf explain: attention overlays for images and attention-share charts for a split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from etf.cli import main
from tests.conftest import IMG, TINY_CNN, TINY_VIT, make_folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two layers of a tiny ViT and a tiny CNN, extracted from images; two fusers fitted."""
    tmp = tmp_path_factory.mktemp("explain")
    root = make_folder(tmp / "faces", train=8)
    args = ["--data", f"folder:{root}", "--cache", str(tmp / "cache")]
    r = CliRunner()
    res = r.invoke(
        main,
        [
            "extract",
            *args,
            "--encoder",
            TINY_VIT,
            "--encoder",
            TINY_CNN,
            "--layers",
            "4,5",
            "--no-pretrained",
            "--img-size",
            str(IMG),
            "--workers",
            "0",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    for fuser, aux in (("etfuser+qface", "recon:0.5"), ("fra", "sinkhorn:0.1")):
        res = r.invoke(
            main,
            [
                "fit",
                *args,
                "--encoders",
                f"{TINY_VIT},{TINY_CNN}",
                "--fuser",
                fuser,
                "--layers",
                "all",
                "--aux",
                aux,
                "--out",
                str(tmp / fuser),
                "--epochs",
                "2",
                "--dim",
                "32",
                "--regions",
                "3",
                "--no-progress",
            ],
        )
        assert res.exit_code == 0, res.output
        config = json.loads((tmp / fuser / "config.json").read_text())
        assert config["fuser_config"]["aux"] == aux  # --regions is fra's alone: recorded as null elsewhere
        assert config["fuser_config"]["regions"] == (3 if fuser == "fra" else None)
    return tmp, root


def _spans(pixels: np.ndarray, axis: int) -> list[tuple[int, int]]:
    """(start, stop) of the runs of rows (axis 1) or columns (axis 0) mostly covered by
    drawing, not white: the panels, without the titles and gaps between them."""
    drawn = (pixels < 250).any(axis=2).mean(axis=axis) > 0.5
    edges = np.flatnonzero(np.diff(np.r_[0, drawn.astype(int), 0]))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]) if b - a > 50]


def _differ(a: np.ndarray, b: np.ndarray) -> bool:
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    return float(np.abs(a[:h, :w] - b[:h, :w]).mean()) > 1


def _valid_png(path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


@pytest.mark.parametrize("fuser,rows", [("etfuser+qface", 2), ("fra", 3)])
def test_overlays_for_images(runs, fuser, rows):
    tmp, root = runs
    images = [str(p) for p in sorted(root.glob("test/*/*.png"))[:2]]
    res = CliRunner().invoke(
        main, ["explain", "--run", str(tmp / fuser), *images, "--out", str(tmp / f"x_{fuser}"), "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    written = res.output.split()
    assert len(written) == 2
    panels = []
    for path in written:
        w, h = _valid_png(path)
        assert w > h  # one column per group with a patch grid (4 of them), one row per map
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=float)
        panels.append(
            [[pixels[r0:r1, c0:c1] for c0, c1 in _spans(pixels[r0:r1], 0)[:4]] for r0, r1 in _spans(pixels, 1)]
        )
    for image in panels:
        assert [len(row) for row in image] == [4] * rows  # a panel per group and map
        for col in range(4):
            assert all(row[col].std() > 5 for row in image)  # drawn, not blank
            for row in image[1:]:  # each map lays its own weights over the same view
                assert _differ(row[col], image[0][col]), (fuser, col)
    assert _differ(panels[0][0][0], panels[1][0][0])  # the two images' panels differ


@pytest.mark.parametrize(
    "fuser,maps", [("etfuser+qface", ["ensemble", "label"]), ("fra", ["region1", "region2", "region3"])]
)
def test_attention_shares_over_a_split(runs, fuser, maps):
    tmp, _ = runs
    out = tmp / f"s_{fuser}"
    res = CliRunner().invoke(
        main, ["explain", "--run", str(tmp / fuser), "--split", "test", "--out", str(out), "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    _valid_png(out / "shares_test.png")
    shares = json.loads((out / "shares_test.json").read_text())
    assert shares["samples"] == 6
    assert shares["groups"] == [f"{TINY_VIT} L4", f"{TINY_VIT} L5", f"{TINY_CNN} L4", f"{TINY_CNN} L5"]
    assert list(shares["shares"]) == maps
    for name, values in shares["shares"].items():
        assert all(0 <= v <= 1 for v in values) and sum(values) <= 1 + 1e-5
        if name != "ensemble":  # queries and regions spread all their weight over the groups
            assert sum(values) == pytest.approx(1, abs=1e-5)


def test_explain_needs_images_or_a_split(runs):
    tmp, root = runs
    res = CliRunner().invoke(main, ["explain", "--run", str(tmp / "fra"), "--out", str(tmp / "n")])
    assert res.exit_code == 2 and "IMAGE... or --split" in res.output
    res = CliRunner().invoke(main, ["explain", "--run", str(tmp / "fra"), "--split", "nope", "--out", str(tmp / "n")])
    assert res.exit_code == 1 and "--split nope" in res.output
