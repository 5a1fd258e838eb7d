"""Bad input: one clear error line naming the file, sample or flag, a non-zero exit, nothing
half-written that a later command would trust, and nothing already written lost."""

from __future__ import annotations

import io
import json
import os
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


# --- one line for each listed bad input, found where it is read (issue 22, items 5 and 6) ---


def _csv(tmp_path: Path, text: str | bytes) -> str:
    make_image(tmp_path / "a.png", seed=1)
    make_image(tmp_path / "b.png", seed=2)
    path = tmp_path / "data.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return f"csv:{path}"


@pytest.mark.parametrize(
    "text, named",
    [
        ("path,split,label\na.png,train,caf\xe9\nb.png,test,x\n".encode("latin-1"), ["line 2", "0xe9", "cp1252"]),
        ("path,split,label,label\na.png,train,1,2\nb.png,test,0,1\n", ["'label' appears 2 times"]),
        ("path, split,label\na.png,train,1\nb.png,test,0\n", ["' split'", "spaces"]),
        ("path,split,label\na.png,train\nb.png,test,0\n", ["line 2", "2 fields"]),
        ("path,split,label\na.png,train,1,extra\nb.png,test,0\n", ["line 2", "4 fields"]),
    ],
    ids=["latin-1", "duplicate-column", "spaced-header", "short-row", "long-row"],
)
def test_a_csv_read_wrong_later_is_one_line_now(tmp_path, text, named):
    spec = _csv(tmp_path, text)
    line = error_line(etf("data", "check", spec))
    assert "data.csv" in line and all(n in line for n in named), line


def test_non_utf8_file_names_and_one_class_folders_are_problems(tmp_path):
    root = tmp_path / "faces"
    make_image(root / "a" / "1.png", seed=1)
    make_image(root / "a" / "2.png", seed=2)
    res = etf("data", "check", f"folder:{root}")
    assert res.exit_code == 1 and "a classifier needs two or more" in res.output, res.output
    make_image(Path(os.fsdecode(bytes(root / "b") + b"/caf\xe9.png")), seed=3)
    line = error_line(etf("data", "check", f"folder:{root}"))
    assert "caf\\xe9.png" in line and "not UTF-8" in line, line


def test_an_empty_imported_array_writes_nothing(tmp_path):
    spec = _csv(tmp_path, "path,split,label\na.png,train,1\nb.png,test,0\n")
    np.save(tmp_path / "t.npy", np.zeros((2, 0, 8), np.float32))
    cache = tmp_path / "cache"
    line = error_line(
        etf("cache", "import", "--data", spec, "--name", "E", "--array", tmp_path / "t.npy", "--cache", cache)
    )
    assert "empty array" in line, line
    assert not list(cache.rglob("*.partial")) and not list(cache.rglob("E-*"))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[Path, str, Path]:
    from tests.synthetic import xor_cache

    tmp = tmp_path_factory.mktemp("run")
    _, spec, cache = xor_cache(tmp, n=40)
    res = etf("fit", "--data", spec, "--cache", cache, "--encoders", "A", "--fuser", "linear", "--epochs", "1",
              "--task", "classify:label", "--out", tmp / "run", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    return tmp / "run", spec, cache


def _copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    (to / "SHA256SUMS").unlink(missing_ok=True)  # as a run fitted before checksums: only the reader is left
    return to


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_model_file_is_one_line(small_run, tmp_path, damage):
    run, spec, cache = small_run
    copy = _copy_run(run, tmp_path / "copy")
    model = copy / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100] if damage == "truncated" else b"garbage" * 50)
    line = error_line(etf("explain", "--run", copy, "--split", "test", "--out", tmp_path / "maps"))
    assert "model.safetensors" in line, line


def test_a_run_config_without_a_key_and_a_staging_folder_are_one_line(small_run, tmp_path):
    run, spec, cache = small_run
    copy = _copy_run(run, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    del config["groups"]
    (copy / "config.json").write_text(json.dumps(config))
    image = make_image(tmp_path / "x.png", seed=4)
    assert "'groups'" in error_line(etf("predict", "--run", copy, image))
    assert "'groups'" in error_line(etf("explain", "--run", copy, "--split", "test", "--out", tmp_path / "maps"))
    staging = _copy_run(run, tmp_path / ".run.partial")
    assert "not a run" in error_line(etf("predict", "--run", staging, image))


@pytest.mark.parametrize(
    "toml, named",
    [
        ("epochs = 0", "--epochs"),
        ("batch_size = 0", "--batch-size"),
        ("lr = -0.1", "--lr"),
        ("max_memory = 0", "--max-memory"),
        ("max_memory = '-1G'", "--max-memory"),
        ("batch-size = 8\nbatch_size = 16", "batch-size"),
    ],
)
def test_toml_settings_that_would_fail_every_run_fail_the_dry_run(small_run, tmp_path, toml, named):
    _, spec, cache = small_run
    config = tmp_path / "grid.toml"
    config.write_text(toml + "\n")
    line = error_line(etf("ablate", "--config", config, "--data", spec, "--cache", cache, "--encoders", "A",
                          "--task", "classify:label", "--dry-run"))  # fmt: skip
    assert named in line, line


@pytest.mark.parametrize("size", ["0", "-1G"])
def test_a_memory_budget_of_nothing_is_refused(small_run, tmp_path, size):
    _, spec, cache = small_run
    line = error_line(etf("fit", "--data", spec, "--cache", cache, "--encoders", "A", "--out", tmp_path / "r",
                          "--task", "classify:label", "--max-memory", size))  # fmt: skip
    assert "--max-memory" in line and not (tmp_path / "r").exists()


def test_a_full_disk_while_a_run_is_published_is_one_line(small_run, tmp_path):
    """The file size limit (RLIMIT_FSIZE) fails a write as a full disk does: one line, exit 1,
    and no run that a later command would read."""
    import resource
    import subprocess
    import sys

    _, spec, cache = small_run

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    res = subprocess.run(
        [sys.executable, "-m", "etf.cli", "fit", "--data", spec, "--cache", str(cache), "--encoders", "A",
         "--fuser", "linear", "--epochs", "1", "--task", "classify:label", "--out", str(tmp_path / "run"),
         "--no-progress", "--device", "cpu"],  # a GPU's driver writes caches of its own
        capture_output=True, text=True, preexec_fn=limit, timeout=300,
    )  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "File too large" in errors[0], res.stderr
    assert not (tmp_path / "run").exists()
