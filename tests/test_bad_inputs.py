"""Bad input: one clear error line naming the file, sample or flag, a non-zero exit, nothing
half-written that a later command would trust, and nothing already written lost."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from etf.cache.audit import verify_store
from etf.cache.catalog import read_manifest
from etf.cache.store import TokenStore
from etf.cli import main
from etf.data import load_dataset
from etf.data.images import load_rgb
from etf.errors import EtfError
from etf.pipeline.extract.encoders import create_encoder
from etf.pipeline.extract.run import ExtractOptions, extract
from tests.conftest import IMG, TINY_CNN, TINY_VIT, make_image

OPTS = dict(workers=0, progress=False)
TINY = ["--encoder", TINY_VIT, "--no-pretrained", "--img-size", str(IMG), "--workers", "0", "--no-progress"]


def etf(*args: str | Path):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result) -> str:
    """The one ``Error:`` line a failed command prints (asserting there is exactly one)."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_bad(path: Path, kind: str) -> Path:
    """A file that is not a usable image; ``truncated`` passes the header check and fails decoding."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "corrupt":  # a PNG whose pixel data fails its checksum
        buf = io.BytesIO()
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, "PNG")
        data = bytearray(buf.getvalue())
        data[data.index(b"IDAT") + 6] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "truncated":
        data = jpeg_bytes(len(path.name))
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not an image\n")
    return path


HEADER_BAD = {"a/0_corrupt.png": "corrupt", "a/1_empty.jpg": "empty", "a/2_text.jpg": "text"}


@pytest.fixture
def bad_folder(tmp_path) -> Path:
    """12 samples in chunks of 3: [3 header-bad] [3 truncated] [6 good]."""
    root = tmp_path / "faces"
    for rel, kind in HEADER_BAD.items():
        write_bad(root / rel, kind)
    for i in range(3):
        write_bad(root / f"a/3_trunc{i}.jpg", "truncated")
    for i in range(6):
        make_image(root / f"b/{i}.png", seed=i)
    return root


def test_fail_lists_every_unreadable_file_and_writes_nothing(bad_folder, tmp_path):
    cache = tmp_path / "cache"
    line = error_line(etf("extract", "--data", f"folder:{bad_folder}", *TINY, "--cache", cache))
    for rel in HEADER_BAD:
        assert rel in line
    assert "empty file" in line and "not an image" in line and "corrupt image" in line
    assert "--on-error skip" in line
    assert not list(cache.glob("*/*.zarr*")), "a refused run leaves no store, not even a partial one"


def test_truncated_image_stops_the_run_keeping_finished_chunks(tmp_path):
    root = tmp_path / "faces"
    for i in range(8):
        make_image(root / f"a/{i}.png", seed=i)
    write_bad(root / "b/cut.jpg", "truncated")  # row 8: the third chunk of 3 rows
    cache = tmp_path / "cache"
    args = ["extract", "--data", f"folder:{root}", *TINY, "--cache", cache, "--chunk-rows", "3", "--batch-size", "3"]
    line = error_line(etf(*args))
    assert "b/cut.jpg" in line and "truncated" in line and "--on-error skip" in line
    partial = next(cache.glob("*/*.zarr.partial"))
    assert sorted(p.name for p in partial.glob("done/*.json")) == ["0.json", "1.json"]
    assert not list(cache.glob("*/*.zarr")), "no complete store after a failed run"
    listing = etf("cache", "ls", cache)
    assert listing.exit_code == 0 and "incomplete (2/3 chunks)" in listing.output

    resumed = etf(*args, "--on-error", "skip")
    assert resumed.exit_code == 0, resumed.output
    assert "3 images" in resumed.output and "skipped 1 unreadable" in resumed.output  # only the last chunk ran
    path = next(cache.glob("*/*.zarr"))
    with TokenStore.open(path) as store:
        assert store.skipped == ["b/cut.jpg"]
        tokens = store.read(12)
    assert not tokens[8].any() and all(tokens[i].any() for i in range(8))


def test_skip_records_unreadable_images_and_keeps_the_rest(bad_folder, tmp_path):
    dataset = load_dataset(f"folder:{bad_folder}")
    opts = dict(chunk_rows=3, batch_size=3, on_error="skip", **OPTS)
    res = extract(dataset, create_encoder(TINY_VIT, pretrained=False, img_size=IMG), tmp_path, ExtractOptions(**opts))
    bad = sorted([*HEADER_BAD, *(f"a/3_trunc{i}.jpg" for i in range(3))])
    assert res.complete and res.skipped == bad
    with TokenStore.open(res.path) as store:
        assert store.skipped == bad
        tokens = store.read(12)
    assert not tokens[:6].any(), "skipped rows hold zeros"
    assert all(tokens[i].any() for i in range(6, 12))
    skipped = read_manifest(tmp_path, dataset.key)["skipped"]
    assert [s["id"] for s in skipped] == bad
    reasons = {s["id"]: s["reason"] for s in skipped}  # the decoder's or the header check's own words
    assert all("truncated" in reasons[f"a/3_trunc{i}.jpg"] for i in range(3)), reasons
    assert len(set(reasons.values())) > 2 and "unreadable image" not in reasons.values()
    assert verify_store(res.path) == [], "a chunk of skipped rows only is still a sound chunk"

    again = extract(dataset, create_encoder(TINY_VIT, pretrained=False, img_size=IMG), tmp_path, ExtractOptions(**opts))
    assert again.path == res.path and again.samples_done == 0 and again.skipped == bad
    assert [s["id"] for s in read_manifest(tmp_path, dataset.key)["skipped"]] == bad


def test_every_image_unreadable_is_an_error_even_with_skip(tmp_path):
    root = tmp_path / "faces"
    for i, kind in enumerate(["empty", "text"]):
        write_bad(root / f"a/{i}.jpg", kind)
    with pytest.raises(EtfError, match="every image of folder:.* is unreadable"):
        extract(
            load_dataset(f"folder:{root}"),
            create_encoder(TINY_VIT, pretrained=False, img_size=IMG),
            tmp_path / "c",
            ExtractOptions(on_error="skip", **OPTS),
        )
    assert not list((tmp_path / "c").glob("*/*.zarr*"))


def test_image_deleted_after_loading_is_named(folder_dataset, tmp_path, tiny_vit):
    dataset = load_dataset(f"folder:{folder_dataset}")
    dataset.samples[5].path.unlink()
    with pytest.raises(EtfError, match=f"{dataset.ids[5]}: file not found"):
        extract(dataset, tiny_vit, tmp_path, ExtractOptions(**OPTS))


def _save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def test_every_image_mode_becomes_8bit_rgb(tmp_path):
    d = tmp_path / "modes" / "a"
    gray = _save(Image.new("L", (8, 8), 77), d / "gray.png")
    cmyk = _save(Image.new("RGB", (8, 8), (200, 120, 40)).convert("CMYK"), d / "cmyk.jpg")
    rgba = Image.new("RGBA", (8, 8), (200, 100, 50, 255))
    rgba.putpixel((0, 0), (200, 100, 50, 0))
    rgba = _save(rgba, d / "rgba.png")
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30, 250, 250, 250])
    pal = _save(palette, d / "palette.png")
    palette.info["transparency"] = 1
    pal_t = _save(palette, d / "palette_alpha.png")
    deep = _save(Image.fromarray(np.array([[0, 32768, 65535]] * 3, np.uint16)), d / "deep16.png")
    assert Image.open(deep).mode == "I;16" and Image.open(cmyk).mode == "CMYK"

    def px(path: Path, xy=(1, 1)) -> tuple:
        img = load_rgb(path)
        assert img.mode == "RGB"
        return img.getpixel(xy)

    assert px(gray) == (77, 77, 77)
    assert np.abs(np.subtract(px(cmyk), (200, 120, 40))).max() <= 6  # JPEG is lossy
    assert px(rgba) == (200, 100, 50) and px(rgba, (0, 0)) == (0, 0, 0)  # alpha over black
    assert px(pal) == (10, 20, 30) and px(pal_t) == (0, 0, 0)
    assert [px(deep, (x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]

    res = extract(
        load_dataset(f"folder:{tmp_path / 'modes'}"),
        create_encoder(TINY_VIT, pretrained=False, img_size=IMG),
        tmp_path / "c",
        ExtractOptions(**OPTS),
    )
    assert res.complete and res.skipped == [] and res.samples_done == 6


def test_missing_file_in_csv(tmp_path):
    make_image(tmp_path / "x.png", seed=0)
    (tmp_path / "m.csv").write_text("path,split,label\nx.png,train,1\ngone.png,train,0\n")
    line = error_line(etf("extract", "--data", f"csv:{tmp_path / 'm.csv'}", *TINY, "--cache", tmp_path / "c"))
    assert "m.csv" in line and "sample 'gone.png'" in line and "not found" in line


@pytest.mark.parametrize("layout", ["folder", "csv"])
def test_empty_dataset(tmp_path, layout):
    if layout == "folder":
        (tmp_path / "d" / "a").mkdir(parents=True)
        (tmp_path / "d" / "b").mkdir()
        spec = f"folder:{tmp_path / 'd'}"
    else:
        (tmp_path / "m.csv").write_text("path,split,label\n")
        spec = f"csv:{tmp_path / 'm.csv'}"
    line = error_line(etf("extract", "--data", spec, *TINY, "--cache", tmp_path / "c"))
    assert spec.split(":", 1)[1] in line
    assert not (tmp_path / "c").exists()


def test_unknown_encoder(folder_dataset, tmp_path):
    line = error_line(
        etf(
            "extract",
            "--data",
            f"folder:{folder_dataset}",
            "--encoder",
            "vit_nope",
            "--no-pretrained",
            "--cache",
            tmp_path,
        )
    )
    assert "--encoder 'vit_nope'" in line and "unknown encoder" in line


@pytest.mark.parametrize(
    "model,layers,want", [(TINY_VIT, "4,13", "has 12 blocks"), (TINY_CNN, "0", "has 5 feature stages")]
)
def test_layer_the_model_does_not_have(folder_dataset, tmp_path, model, layers, want):
    args = ["--encoder", model, "--no-pretrained", "--img-size", str(IMG), "--layers", layers]
    line = error_line(etf("extract", "--data", f"folder:{folder_dataset}", *args, "--cache", tmp_path))
    assert "--layers" in line and want in line


def test_weights_for_another_architecture(folder_dataset, tmp_path, tiny_cnn):
    ckpt = tmp_path / "resnet.pth"
    torch.save(tiny_cnn.model.state_dict(), ckpt)
    args = ["extract", "--data", f"folder:{folder_dataset}", *TINY, "--weights", ckpt, "--cache", tmp_path / "c"]
    line = error_line(etf(*args))
    assert f"--weights {ckpt}" in line and "does not fit" in line and "--allow-partial" in line
    assert not (tmp_path / "c").exists()

    partial = etf(*args, "--allow-partial")
    assert partial.exit_code == 0, partial.output
    assert "loaded 0 tensors (0.0% of parameters)" in partial.output and "unused" in partial.output


@pytest.mark.parametrize("content", [b"not a checkpoint", b""], ids=["text", "empty"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_that_is_not_a_checkpoint(folder_dataset, tmp_path, suffix, content):
    ckpt = tmp_path / f"prior{suffix}"
    ckpt.write_bytes(content)
    line = error_line(
        etf("extract", "--data", f"folder:{folder_dataset}", *TINY, "--weights", ckpt, "--cache", tmp_path / "c")
    )
    assert f"--weights {ckpt}: cannot read checkpoint" in line


def test_weights_without_tensors(folder_dataset, tmp_path):
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, tmp_path / "prior.pth")
    line = error_line(
        etf(
            "extract",
            "--data",
            f"folder:{folder_dataset}",
            *TINY,
            "--weights",
            tmp_path / "prior.pth",
            "--cache",
            tmp_path / "c",
        )
    )
    assert "no tensors found" in line


def test_pretrained_weights_offline_say_how_to_fix(folder_dataset, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    line = error_line(
        etf("extract", "--data", f"folder:{folder_dataset}", "--encoder", "vit_t", "--cache", tmp_path / "c")
    )
    assert "cannot load pretrained weights" in line and "vit_tiny_patch16_224.augreg_in21k_ft_in1k" in line
    assert "--weights" in line and "--no-pretrained" in line and "HF_HOME" in line


def test_manifest_is_json_after_a_refused_run(bad_folder, tmp_path):
    """The dataset manifest is written before the image checks; it must stay valid JSON
    with no skipped entries from a run that was refused."""
    etf("extract", "--data", f"folder:{bad_folder}", *TINY, "--cache", tmp_path)
    manifest = next(tmp_path.glob("*/manifest.json"))
    assert json.loads(manifest.read_text())["skipped"] == []
