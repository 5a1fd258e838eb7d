"""Caches on object storage, against a real local S3 server (moto's server mode, started
once for this module): extract, verify, fit and ablate from s3://, a killed-and-resumed
extraction, two shards into one store, damage refused, HDF5 refused, nothing secret
written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from etf.cache.location import cache_location, set_storage_options  # noqa: E402
from etf.cache.store import TokenStore  # noqa: E402
from etf.cli import main  # noqa: E402
from etf.errors import EtfError  # noqa: E402
from etf.pipeline.ablate.grid import Grid, plan_grid, run_grid  # noqa: E402
from tests.s3 import S3Server  # noqa: E402
from tests.synthetic import import_prior, make_csv_dataset, planted_tokens, standard_splits  # noqa: E402

#: a secret that must never appear in anything etf writes
SECRET = "etf-test-secret-never-written"
EXTRACT = [
    "--encoder",
    "vit_tiny_patch16_224",
    "--no-pretrained",
    "--img-size",
    "32",
    "--workers",
    "0",
    "--no-progress",
]


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def fs(s3):
    import s3fs

    return s3fs.S3FileSystem(**s3.storage_options)


def etf(*args: object) -> object:
    result = CliRunner().invoke(main, [str(a) for a in args])
    set_storage_options({})  # the command line's options are per process: do not leak them into other tests
    return result


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "etf.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _read_all(path) -> np.ndarray:
    with TokenStore.open(path) as store:
        return store.read(max(store.layers))


def _stores(fs, url: str) -> list[str]:
    return sorted(p for p in fs.find(url.removeprefix("s3://"), withdirs=True) if p.endswith(".zarr"))


def test_extract_verify_fit_from_s3_writes_no_secret(s3, fs, folder_dataset, tmp_path, monkeypatch):
    cache = s3.url("flow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")  # the secret comes from --storage-option only
    secret = ["--storage-option", f"secret={SECRET}", "--storage-option", "key=testing"]
    data = ["--data", f"folder:{folder_dataset}"]
    out = etf("extract", *data, *EXTRACT, "--chunk-rows", "4", "--cache", cache, *secret)
    assert out.exit_code == 0, out.output
    assert not Path("s3:").exists(), "a URL is never a local folder"
    (store,) = _stores(fs, cache)
    url = f"s3://{store}"
    listed = etf("cache", "ls", cache, *secret)
    assert listed.exit_code == 0 and "complete" in listed.output and "vit_tiny" in listed.output, listed.output
    info = etf("cache", "info", url, *secret)
    assert info.exit_code == 0 and "24" in info.output, info.output
    verified = etf("cache", "verify", url, *secret)
    assert verified.exit_code == 0 and verified.output.strip().endswith(": ok"), verified.output

    run = tmp_path / "run"
    fitted = etf(
        "fit", *data, "--cache", cache, *secret, "--encoders", "vit_tiny_patch16_224", "--fuser", "linear",
        "--epochs", "2", "--batch-size", "4", "--max-memory", "20K", "--out", run,
    )  # fmt: skip
    assert fitted.exit_code == 0, fitted.output
    assert "streamed from the stores" in fitted.output
    config = (run / "config.json").read_text()
    assert f'"cache_dir": "{cache}"' in config
    written = [fs.cat_file(p) for p in fs.find(cache.removeprefix("s3://"))]
    written += [p.read_bytes() for p in run.rglob("*") if p.is_file()]
    assert written and not any(SECRET.encode() in b or str(s3.port).encode() in b for b in written)


def test_a_killed_extraction_on_s3_resumes_to_identical_arrays(s3, fs, tmp_path):
    args = ["extract", "--data", "lfw-subset", *EXTRACT, "--img-size", "64", "--chunk-rows", "8", "--batch-size", "4"]
    subprocess.run(_cli(*args, "--cache", str(tmp_path / "ref")), check=True, env=_env(), capture_output=True)
    reference = _read_all(next((tmp_path / "ref").glob("*/*.zarr")))

    cache = s3.url("killed")
    proc = subprocess.Popen(
        _cli(*args, "--cache", cache), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    done = []
    while time.time() < deadline and len(done) < 3:
        done = fs.glob(f"{cache.removeprefix('s3://')}/*/*.partial/done/*.json")
        fs.invalidate_cache()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (partial,) = fs.glob(f"{cache.removeprefix('s3://')}/*/*.zarr.partial")
    store = f"s3://{partial.removesuffix('.partial')}"
    assert 3 <= len(fs.ls(f"{partial}/done")) < 25, "the kill must land mid-extraction"
    assert not fs.exists(f"{store.removeprefix('s3://')}/zarr.json"), "no root metadata before every chunk is written"
    with pytest.raises(EtfError, match="incomplete store"):
        TokenStore.open(store)
    assert "incomplete" in etf("cache", "ls", cache).output

    out = subprocess.run(_cli(*args, "--cache", cache), check=True, env=_env(), capture_output=True, text=True)
    assert "img/s" in out.stdout
    fs.invalidate_cache()
    assert not fs.exists(partial)
    np.testing.assert_array_equal(_read_all(store), reference)


def test_two_shards_fill_one_s3_store(s3, fs, tmp_path):
    args = ["extract", "--data", "lfw-subset", *EXTRACT, "--chunk-rows", "16", "--batch-size", "8"]
    subprocess.run(_cli(*args, "--cache", str(tmp_path / "one")), check=True, env=_env(), capture_output=True)
    one = next((tmp_path / "one").glob("*/*.zarr"))
    cache = s3.url("shards")
    procs = [
        subprocess.Popen(_cli(*args, "--cache", cache, "--shard", f"{i}/2"), env=_env(), stderr=subprocess.PIPE)
        for i in range(2)
    ]
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()
    fs.invalidate_cache()
    (store,) = _stores(fs, cache)
    assert store.endswith(one.name) and not fs.glob(f"{cache.removeprefix('s3://')}/*/*.partial")
    np.testing.assert_array_equal(_read_all(f"s3://{store}"), _read_all(one))


def _imported(s3, tmp_path, name: str) -> tuple[str, str]:
    """A synthetic two-prior cache on s3 (A imported through the API, B by ``etf cache
    import``), and its --data spec."""
    n = 40
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, n).astype(float)
    dataset, spec = make_csv_dataset(tmp_path / "data", {"label": label}, standard_splits(n))
    cache = s3.url(name)
    import_prior(cache_location(cache), dataset, "A", planted_tokens(rng, 2 * label - 1, 3.0), tmp_path)
    np.save(tmp_path / "B.npy", planted_tokens(rng, 2 * label - 1, 3.0))
    imported = etf("cache", "import", "--cache", cache, "--data", spec, "--name", "B", "--array", tmp_path / "B.npy")
    assert imported.exit_code == 0 and f"{cache}/" in imported.output, imported.output
    return cache, spec


def test_a_damaged_s3_store_is_refused(s3, fs, tmp_path):
    cache, spec = _imported(s3, tmp_path, "damaged")
    (store, _) = _stores(fs, cache)
    chunks = sorted(fs.find(f"{store}/tokens/c"))
    fs.rm(chunks[1])
    with pytest.raises(EtfError, match=r"damaged store \(tokens: 1 of \d+ chunks missing"):
        TokenStore.open(f"s3://{store}")
    verified = etf("cache", "verify", f"s3://{store}")
    assert verified.exit_code == 1 and "chunks missing" in verified.output
    assert "damaged" in etf("cache", "ls", cache).output
    fitted = etf(
        "fit",
        "--data",
        spec,
        "--cache",
        cache,
        "--encoders",
        "A",
        "--task",
        "classify:label",
        "--out",
        tmp_path / "run",
    )
    assert fitted.exit_code == 1 and len(fitted.output.strip().splitlines()) == 1 and "damaged store" in fitted.output


def test_ablate_from_s3_matches_a_local_cache(s3, tmp_path):
    cache, spec = _imported(s3, tmp_path, "grid")
    settings = {"data": spec, "encoders": "A,B", "tasks": ["classify:label"], "fusers": "concat", "seeds": "0",
                "subsets": "k=2", "epochs": 1, "batch_size": 8, "dim": 16, "depth": 1, "heads": 2}  # fmt: skip
    remote = run_grid(plan_grid(Grid.from_settings({**settings, "cache": cache, "out": tmp_path / "remote"})))
    assert (remote.done, remote.failed) == (2, [])
    metrics = sorted((tmp_path / "remote" / "runs").glob("*/metrics.json"))
    assert len(metrics) == 2 and '"test"' in metrics[0].read_text()


def test_hdf5_on_object_storage_is_refused_in_one_line(s3, fs, folder_dataset):
    cache = s3.url("h5")
    out = etf("extract", "--data", f"folder:{folder_dataset}", *EXTRACT, "--store", "hdf5", "--cache", cache)
    assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1, out.output
    assert "--store hdf5: HDF5 needs a local --cache" in out.output
    assert not fs.exists(cache.removeprefix("s3://"))


def test_bad_urls_and_options_are_one_line(s3, folder_dataset):
    data = ["--data", f"folder:{folder_dataset}"]
    unknown = etf("cache", "ls", "nosuch://bucket/x")
    assert unknown.exit_code == 1 and "nosuch://bucket/x" in unknown.output and len(unknown.output.splitlines()) == 1
    bad = etf("extract", *data, *EXTRACT, "--cache", s3.url("x"), "--storage-option", "endpoint_url")
    assert bad.exit_code == 1 and "--storage-option 'endpoint_url': expected KEY=VALUE" in bad.output
    missing = etf("cache", "ls", "s3://no-such-bucket-etf/x")
    assert missing.exit_code == 1 and "no such cache directory" in missing.output
