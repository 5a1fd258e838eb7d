"""Never train on wrong tokens: a store with a missing or damaged chunk is refused by every
reader with one line, and stores open by dimension name in xarray."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from etf.cache.store import TokenStore
from etf.cli import main
from etf.errors import EtfError
from tests.conftest import IMG, TINY_CNN, TINY_VIT
from tests.synthetic import xor_cache


def etf(*args: str | Path):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def xor(tmp_path):
    dataset, spec, cache = xor_cache(tmp_path, n=80)
    store = next(cache.glob("*/A-*.zarr"))
    return spec, cache, store


def _fit(spec: str, cache: Path, out: Path, *extra):
    return etf("fit", "--data", spec, "--cache", cache, "--encoders", "A,B", "--task", "classify:label",
               "--fuser", "concat", "--epochs", "1",
               "--out", out, "--no-progress", *extra)  # fmt: skip


def test_a_deleted_chunk_is_refused_by_fit_and_shown_by_ls(xor, tmp_path):
    spec, cache, store = xor
    with TokenStore.open(store) as s:
        assert s.chunk_rows == 10  # 80 samples: at least eight chunks, so a resume keeps its work
    (store / "tokens" / "c" / "2" / "0" / "0" / "0").unlink()
    line = error_line(_fit(spec, cache, tmp_path / "run"))
    assert str(store) in line and "1 of 8 chunks missing" in line and "etf cache verify" in line
    assert not (tmp_path / "run").exists()
    listing = etf("cache", "ls", cache)
    assert listing.exit_code == 0
    row = next(line for line in listing.output.splitlines() if store.name in line)
    assert "damaged" in row and "complete" not in row
    with pytest.raises(EtfError, match="damaged store"):
        TokenStore.open(store)


def test_a_truncated_chunk_is_refused_before_training(xor, tmp_path):
    spec, cache, store = xor
    chunk = store / "tokens" / "c" / "5" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    line = error_line(_fit(spec, cache, tmp_path / "run"))
    assert str(store) in line and "wrong size" in line


def test_a_corrupt_compressed_chunk_is_one_error_when_read(folder_dataset, tmp_path):
    """Compressed chunks have no fixed size: the damage shows when reading (the chunk's
    checksum, which covers the compressed bytes, fails first), as one line."""
    cache = tmp_path / "cache"
    res = etf("extract", "--data", f"folder:{folder_dataset}", "--encoder", TINY_VIT, "--no-pretrained",
              "--img-size", IMG, "--codec", "zstd", "--cache", cache, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    store = next(cache.glob("*/*.zarr"))
    chunk = store / "tokens" / "c" / "1" / "0" / "0" / "0"
    chunk.write_bytes(b"\x00" * 40)
    with TokenStore.open(store) as s, pytest.raises(EtfError, match="fail their checksum.*etf cache verify"):
        s.read(12)
    line = error_line(
        etf(
            "fit",
            "--data",
            f"folder:{folder_dataset}",
            "--cache",
            cache,
            "--encoders",
            TINY_VIT,
            "--epochs",
            "1",
            "--out",
            tmp_path / "run",
            "--no-progress",
        )  # fmt: skip
    )
    assert str(store) in line and "fail their checksum" in line


def test_xarray_opens_stores_by_dimension_name(folder_dataset, tmp_path):
    xr = pytest.importorskip("xarray")
    cache = tmp_path / "cache"
    for encoder, layers in ((TINY_VIT, "12"), (TINY_CNN, "3,4")):
        res = etf("extract", "--data", f"folder:{folder_dataset}", "--encoder", encoder, "--no-pretrained",
                  "--img-size", IMG, "--layers", layers, "--cache", cache, "--no-progress")  # fmt: skip
        assert res.exit_code == 0, res.output
    vit, cnn = (next(cache.glob(f"*/{name}-*.zarr")) for name in (TINY_VIT, TINY_CNN))
    ds = xr.open_zarr(vit)
    assert ds["tokens"].dims == ("sample", "layer", "token", "channel")
    with TokenStore.open(vit) as s:
        np.testing.assert_array_equal(ds["tokens"].values[:, 0], s.read(12))
    ds = xr.open_zarr(cnn)  # stages of other shapes: one array each, with their own axes
    assert ds["tokens_3"].dims == ("sample", "token_3", "channel_3")
    assert (ds.sizes["token_3"], ds.sizes["token_4"], ds.sizes["channel_4"]) == (16, 4, 256)  # 4x4, 2x2 maps
    assert ds.attrs["etf"]["complete"] is True


def test_a_store_written_with_other_library_versions_is_reported_not_rebuilt(xor, tmp_path):
    import zarr

    spec, cache, store = xor
    group = zarr.open_group(str(store), mode="r+")
    attrs = dict(group.attrs["etf"])
    attrs["info"] = {**attrs.get("info", {}), "versions": {"etf": "0.0.1", "torch": "1.13.0+cpu", "timm": "0.9.2"}}
    group.attrs["etf"] = attrs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(store))
    mismatch = r"written with etf 0\.0\.1 \(now .*torch 1\.13\.0\+cpu .*timm 0\.9\.2.*used as stored"
    with pytest.warns(UserWarning, match=mismatch):
        TokenStore.open(store).close()
    with pytest.warns(UserWarning, match=mismatch):  # fit reads it, saying so: the spec has not changed
        res = _fit(spec, cache, tmp_path / "run")
    assert res.exit_code == 0, res.output


def _scramble_chunk(chunk: Path, seed: int = 0) -> None:
    """Overwrite a chunk's float16 values with other finite ones of the same size, keeping
    whatever else the object holds (its stored checksum): damage no size or NaN check sees."""
    raw = bytearray(chunk.read_bytes())
    values = np.random.default_rng(seed).standard_normal((len(raw) - 4) // 2).astype(np.float16)
    raw[: values.nbytes] = values.tobytes()
    chunk.write_bytes(bytes(raw))


@pytest.mark.parametrize("max_memory", [None, "1K"], ids=["in-memory", "streamed"])
def test_a_same_size_corrupted_chunk_is_refused_by_every_reader(xor, tmp_path, max_memory):
    spec, cache, store = xor
    chunk = store / "tokens" / "c" / "3" / "0" / "0" / "0"
    size = chunk.stat().st_size
    _scramble_chunk(chunk)
    assert chunk.stat().st_size == size
    with TokenStore.open(store) as s:  # the listing sees nothing wrong; the read does
        with pytest.raises(EtfError, match=r"rows 20:40 of tokens fail their checksum; run etf cache verify"):
            s.read(1, 20, 40)
    run = tmp_path / "run"
    res = _fit(spec, cache, run, *(["--max-memory", max_memory] if max_memory else []))
    line = error_line(res)
    assert str(store) in line and "fail their checksum" in line
    assert not run.exists()
    res = etf("cache", "verify", store)
    assert res.exit_code == 1 and "tokens: rows 30:40 fail their checksum" in res.output


def test_a_same_size_corrupted_hdf5_chunk_is_refused(folder_dataset, tmp_path):
    import h5py

    cache = tmp_path / "cache"
    res = etf("extract", "--data", f"folder:{folder_dataset}", "--encoder", TINY_VIT, "--no-pretrained",
              "--img-size", IMG, "--store", "hdf5", "--cache", cache, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    store = next(cache.glob("*/*.h5"))
    assert etf("cache", "verify", store).output.strip() == f"{store}: ok"
    with h5py.File(store, "r") as f:
        assert f["tokens"].fletcher32
        chunk = f["tokens"].id.get_chunk_info(0)
    raw = bytearray(store.read_bytes())
    values = np.random.default_rng(0).standard_normal((chunk.size - 4) // 2).astype(np.float16).tobytes()
    raw[chunk.byte_offset : chunk.byte_offset + len(values)] = values
    store.write_bytes(bytes(raw))
    with TokenStore.open(store) as s, pytest.raises(EtfError, match="fail their checksum"):
        s.read(12)
    res = etf("cache", "verify", store)
    assert res.exit_code == 1 and "fail their checksum" in res.output


def _as_format_version_1(store: Path) -> None:
    """Rewrite a store as etf wrote it before chunks carried checksums: the same values and
    chunking without the crc32c codec, and format version 1."""
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    for name, arr in list(group.arrays()):
        values, chunks, dims = arr[:], arr.chunks, arr.metadata.dimension_names
        del group[name]
        group.create_array(name, shape=values.shape, chunks=chunks, dtype=values.dtype, compressors=None,
                           fill_value=0, dimension_names=dims)[:] = values  # fmt: skip
    group.attrs["etf"] = {**group.attrs["etf"], "format_version": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(store))


def test_a_store_without_checksums_stays_readable_and_verify_says_so(xor, tmp_path):
    spec, cache, store = xor
    with TokenStore.open(store) as s:
        assert s.checksums
        before = s.read(1)
    _as_format_version_1(store)
    with TokenStore.open(store) as s:
        assert not s.checksums
        np.testing.assert_array_equal(s.read(1), before)
    res = etf("cache", "verify", store)
    assert res.exit_code == 0, res.output
    assert "ok, but its chunks carry no checksums" in res.output and "format version 1" in res.output
    assert "checksums" in etf("cache", "info", store).output
    assert _fit(spec, cache, tmp_path / "run").exit_code == 0
    (store / "tokens" / "c" / "4" / "0" / "0" / "0").write_bytes(b"\0")  # size checks still hold without a CRC
    assert "wrong size" in etf("cache", "verify", store).output
