"""Extraction stopped part-way (Ctrl-C, a failed write) keeps every finished chunk and
resumes to the same arrays; shard and format edge cases."""

from __future__ import annotations

import errno
import weakref
from pathlib import Path

import numpy as np
import pytest

import etf.cache.location
import etf.pipeline.extract.run
from etf.cache.store import TokenStore
from etf.data import load_dataset
from etf.errors import EtfError
from etf.pipeline.extract.encoders import create_encoder
from etf.pipeline.extract.run import ExtractOptions, extract
from tests.conftest import IMG, TINY_VIT, make_image

OPTS = dict(workers=0, progress=False, chunk_rows=4, batch_size=4)  # 24 samples: 6 chunks of one batch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    for i in range(24):
        make_image(root / "ab"[i % 2] / f"{i:02d}.png", seed=i)
    return load_dataset(f"folder:{root}")


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> np.ndarray:
    """Tokens of an uninterrupted run."""
    encoder = create_encoder(TINY_VIT, pretrained=False, img_size=IMG)
    res = extract(dataset, encoder, tmp_path_factory.mktemp("ref"), ExtractOptions(**OPTS))
    with TokenStore.open(res.path) as store:
        return store.read(12)


def _count_batches(monkeypatch, fail_at: int | None = None, exc: BaseException | None = None) -> list[int]:
    """Count the batches the extraction loop computes, optionally raising ``exc`` at batch ``fail_at``."""
    calls: list[int] = []
    real = etf.pipeline.extract.run._launch

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(etf.pipeline.extract.run, "_launch", counted)
    return calls


def _done(cache: Path) -> list[int]:
    return sorted(int(p.stem) for p in cache.glob("*/*.partial/done/*.json"))


def test_ctrl_c_keeps_finished_chunks_and_resumes_identically(dataset, tiny_vit, tmp_path, reference, monkeypatch):
    _count_batches(monkeypatch, fail_at=4, exc=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        extract(dataset, tiny_vit, tmp_path / "c", ExtractOptions(**OPTS))
    assert _done(tmp_path / "c") == [0, 1, 2], "chunks handed to the writer are finished before the interrupt leaves"
    assert not list((tmp_path / "c").glob("*/*.zarr"))

    monkeypatch.undo()
    res = extract(dataset, tiny_vit, tmp_path / "c", ExtractOptions(**OPTS))
    assert res.complete and res.samples_done == 12
    with TokenStore.open(res.path) as store:
        np.testing.assert_array_equal(store.read(12), reference)


def test_failed_write_stops_the_run_and_resumes_identically(dataset, tiny_vit, tmp_path, reference, monkeypatch):
    calls = _count_batches(monkeypatch)
    real = etf.cache.location.write_json_atomic

    def disk_full(path, obj):
        if Path(path).name == "1.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj)

    monkeypatch.setattr(etf.cache.location, "write_json_atomic", disk_full)
    with pytest.raises(EtfError, match=r"cannot write chunk 1 \(.*No space left on device\); fix that and re-run"):
        extract(dataset, tiny_vit, tmp_path / "c", ExtractOptions(**OPTS))
    assert len(calls) < 6, "a failed write stops the run within two chunks"
    assert 1 not in _done(tmp_path / "c") and 0 in _done(tmp_path / "c")
    assert not list((tmp_path / "c").glob("*/*.zarr"))

    done = _done(tmp_path / "c")
    monkeypatch.undo()
    calls = _count_batches(monkeypatch)
    res = extract(dataset, tiny_vit, tmp_path / "c", ExtractOptions(**OPTS))
    assert res.complete and len(calls) == 6 - len(done), "only the chunks not yet written are computed again"
    with TokenStore.open(res.path) as store:
        np.testing.assert_array_equal(store.read(12), reference)


def test_chunk_buffers_exist_only_while_they_are_filled(dataset, tiny_vit, tmp_path, monkeypatch):
    """Memory follows the batches in flight, not the size of the dataset."""
    live: weakref.WeakSet = weakref.WeakSet()
    most = [0]

    class Counted(etf.pipeline.extract.run._ChunkBuffer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            live.add(self)
            most[0] = max(most[0], len(live))

    monkeypatch.setattr(etf.pipeline.extract.run, "_ChunkBuffer", Counted)
    assert extract(dataset, tiny_vit, tmp_path, ExtractOptions(**OPTS)).complete
    assert 1 <= most[0] <= 2, f"{most[0]} of 6 chunk buffers alive at once"


def test_more_shards_than_chunks(dataset, tiny_vit, tmp_path, reference, monkeypatch):
    """6 chunks over 8 shards: chunk c goes to shard c * 8 // 6, so shards 3 and 7 have
    nothing to do and report the store as not yet complete."""
    calls = _count_batches(monkeypatch)
    results = {
        i: extract(dataset, tiny_vit, tmp_path, ExtractOptions(shard=(i, 8), **OPTS)) for i in (3, 0, 1, 2, 4, 5, 7, 6)
    }
    assert len(calls) == 6, "every chunk computed exactly once"
    assert [i for i, r in results.items() if r.samples_done == 0] == [3, 7]
    assert [i for i, r in results.items() if r.complete] == [6], "the shard finishing the last chunk publishes"
    assert sum(r.samples_done for r in results.values()) == 24
    with TokenStore.open(results[6].path) as store:
        np.testing.assert_array_equal(store.read(12), reference)
    assert not list(tmp_path.glob("*/*.partial"))
    again = extract(dataset, tiny_vit, tmp_path, ExtractOptions(shard=(3, 8), **OPTS))
    assert again.complete and again.samples_done == 0


def test_hdf5_with_shards_is_refused_before_anything_is_written(dataset, tiny_vit, tmp_path):
    with pytest.raises(EtfError, match="--shard with --store hdf5"):
        extract(dataset, tiny_vit, tmp_path, ExtractOptions(store="hdf5", shard=(0, 2), **OPTS))
    assert not list(tmp_path.glob("*/*.h5*"))
