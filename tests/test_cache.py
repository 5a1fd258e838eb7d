"""``etf cache import``, ``verify``, ``ls`` and ``info``: imported rows land at their manifest
position, and verify catches every kind of damage a store can take on disk."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from etf.cache import store as store_mod
from etf.cache.audit import verify_store
from etf.cache.catalog import read_manifest
from etf.cache.importer import import_tokens
from etf.cache.store import TokenStore
from etf.cache.tokens import TokenLayout
from etf.cli import main
from etf.data import load_dataset


def etf(*args: str | Path):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def dataset(folder_dataset):
    return load_dataset(f"folder:{folder_dataset}")


def _tokens(tmp_path: Path, shape: tuple[int, ...], name: str = "tokens.npy") -> tuple[Path, np.ndarray]:
    arr = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    np.save(tmp_path / name, arr)
    return tmp_path / name, arr


def _ids(tmp_path: Path, ids: list[str]) -> Path:
    (tmp_path / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    return tmp_path / "ids.txt"


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("shape", [(24, 10, 8), (24, 3, 10, 8)], ids=["NTD", "NLTD"])
def test_import_in_manifest_order(tmp_path, dataset, shape, fmt):
    npy, arr = _tokens(tmp_path, shape)
    path = import_tokens(tmp_path / "c", dataset, "arcface", npy, store_format=fmt)
    want = arr if arr.ndim == 4 else arr[:, None]
    with TokenStore.open(path) as store:
        assert store.n == 24 and store.layers == list(range(1, want.shape[1] + 1))
        assert store.layouts[1] == TokenLayout(1, (3, 3))  # 10 tokens: a class token and a 3x3 grid
        for k, layer in enumerate(store.layers):
            np.testing.assert_array_equal(store.read(layer), want[:, k].astype(np.float16))
    assert read_manifest(tmp_path / "c", dataset.key)["ids"] == dataset.ids
    assert verify_store(path) == []


def test_import_ids_put_each_row_at_its_sample(tmp_path, dataset):
    order = np.random.default_rng(0).permutation(24)
    npy, arr = _tokens(tmp_path, (24, 4, 8))
    path = import_tokens(tmp_path / "c", dataset, "arcface", npy, _ids(tmp_path, [dataset.ids[i] for i in order]))
    with TokenStore.open(path) as store:
        got = store.read(1)
    for row, sample in enumerate(order):  # row `row` of the file belongs to sample `sample`
        np.testing.assert_array_equal(got[sample], arr[row].astype(np.float16))


def test_import_prefix_is_part_of_the_store(tmp_path, dataset):
    npy, _ = _tokens(tmp_path, (24, 10, 8))
    guessed = import_tokens(tmp_path, dataset, "x", npy)
    explicit = import_tokens(tmp_path, dataset, "x", npy, prefix=6)
    assert guessed != explicit
    with TokenStore.open(explicit) as store:
        assert store.layouts[1] == TokenLayout(6, (2, 2))


@pytest.mark.parametrize(
    "case,want",
    [
        ("unknown", "line 3: 'nobody.png' is not a sample"),
        ("duplicate", "line 2: id '{0}' appears twice"),
        ("count", "23 ids for 24 rows"),
        ("missing", "1 samples of the dataset have no row (first: '{23}')"),
        ("no-ids", "--array has 23 rows but folder:"),
    ],
)
def test_import_refuses_ids_that_do_not_match(tmp_path, dataset, case, want):
    ids = list(dataset.ids)
    rows = 24
    if case == "unknown":
        ids[2] = "nobody.png"
    elif case == "duplicate":
        ids[1] = ids[0]
    elif case == "count":
        ids = ids[:23]
    elif case in ("missing", "no-ids"):
        ids, rows = ids[:23], 23
    npy, _ = _tokens(tmp_path, (rows, 4, 8))
    args = [
        "cache",
        "import",
        "--data",
        f"folder:{dataset.root}",
        "--name",
        "arcface",
        "--array",
        npy,
        "--cache",
        tmp_path / "c",
    ]
    result = etf(*args) if case == "no-ids" else etf(*args, "--ids", _ids(tmp_path, ids))
    assert result.exit_code == 1
    assert want.format(*dataset.ids) in result.output
    assert not list((tmp_path / "c").glob("*/*.zarr*"))


def test_import_refuses_non_finite_values_naming_the_sample(tmp_path, dataset):
    npy, arr = _tokens(tmp_path, (24, 4, 8))
    arr[7, 1, 2] = np.inf
    np.save(npy, arr)
    result = etf(
        "cache", "import", "--data", f"folder:{dataset.root}", "--name", "x", "--array", npy, "--cache", tmp_path
    )
    assert result.exit_code == 1 and f"non-finite token values for sample(s) {dataset.ids[7]}" in result.output
    assert not list(tmp_path.glob("*/*.zarr"))


@pytest.fixture(params=["zarr", "hdf5"])
def store_path(request, tmp_path, dataset) -> Path:
    """A complete imported store: 24 samples of 40 KiB, 4 per chunk."""
    npy, _ = _tokens(tmp_path, (24, 5, 4096))
    chunk = 4 * 5 * 4096 * 2
    with mock.patch.multiple(store_mod, ZARR_CHUNK_BYTES=chunk, HDF5_CHUNK_BYTES=chunk, MIN_CHUNKS=1):
        return Path(import_tokens(tmp_path / "c", dataset, "x", npy, store_format=request.param))


def test_verify_passes_a_sound_store(store_path):
    assert verify_store(store_path) == []
    result = etf("cache", "verify", store_path)
    assert result.exit_code == 0 and result.output.strip().endswith(": ok")


def test_verify_catches_a_renamed_store(store_path):
    moved = store_path.rename(store_path.with_name(f"x-0123456789abcdef{store_path.suffix}"))
    problems = verify_store(moved)
    assert len(problems) == 1 and "does not match the file name" in problems[0]
    result = etf("cache", "verify", moved)
    assert result.exit_code == 1 and "does not match the file name" in result.output


def test_verify_catches_nan_in_a_chunk(store_path, dataset):
    if store_path.suffix == ".h5":
        with h5py.File(store_path, "r+") as f:
            f["tokens"][9, 0, 3, 5] = np.nan
    else:
        zarr.open_group(str(store_path), mode="r+")["tokens"][9, 0, 3, 5] = np.nan
    assert verify_store(store_path) == [f"layer 1: non-finite values for {dataset.ids[9]}"]


def test_verify_catches_a_deleted_chunk(store_path):
    if store_path.suffix == ".h5":
        pytest.skip("HDF5 chunks live inside one file")
    chunk = store_path / "tokens" / "c" / "2" / "0" / "0" / "0"
    chunk.unlink()
    problems = verify_store(store_path)
    assert problems == ["tokens: 1 of 6 chunks missing (first: rows 8:12)"]


def test_verify_reports_an_unreadable_chunk(store_path):
    if store_path.suffix == ".h5":
        pytest.skip("HDF5 chunks live inside one file")
    chunk = store_path / "tokens" / "c" / "1" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    problems = verify_store(store_path)
    assert problems == [
        "tokens: 1 chunk(s) of the wrong size (first: chunk 1, 100 bytes of 163844)",  # values and a CRC-32C
        "tokens: rows 4:8 fail their checksum (changed bytes)",
    ]


def test_ls_and_info(store_path, dataset):
    cache = store_path.parent.parent
    listing = etf("cache", "ls", cache)
    assert listing.exit_code == 0
    assert dataset.key in listing.output and f"{store_path.name}" in listing.output and "complete" in listing.output
    info = etf("cache", "info", store_path)
    assert info.exit_code == 0
    assert "samples     24" in info.output and "tokens (24, 1, 5, 4096)" in info.output
    assert "4 samples per chunk" in info.output


def test_default_chunks_are_balanced(tmp_path, dataset):
    """24 samples at a 10-sample target: 3 chunks of 8, not 10 + 10 + 4 stored as 10."""
    npy, _ = _tokens(tmp_path, (24, 5, 8))
    with mock.patch.multiple(store_mod, ZARR_CHUNK_BYTES=10 * 5 * 8 * 2, MIN_CHUNKS=1):
        path = import_tokens(tmp_path, dataset, "x", npy)
    with TokenStore.open(path) as store:
        assert store.chunk_rows == 8


def test_a_small_store_still_has_several_chunks(tmp_path, dataset):
    """24 small samples fit one 8 MiB chunk; the resume unit needs at least eight."""
    npy, _ = _tokens(tmp_path, (24, 5, 8))
    with TokenStore.open(import_tokens(tmp_path, dataset, "x", npy)) as store:
        assert store.chunk_rows == 3 and -(-store.n // store.chunk_rows) == 8
