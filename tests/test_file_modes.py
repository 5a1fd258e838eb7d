"""Files and folders etf writes follow the umask, as any Unix tool's do, so a lab can share a
cache and its runs (group-readable under 022, group-writable under 002)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from click.testing import CliRunner

from etf.cache.importer import import_tokens
from etf.cli import main
from tests.synthetic import xor_cache


@pytest.fixture
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


@pytest.mark.parametrize("umask", [0o022, 0o002], indirect=True, ids=["022", "002"])
def test_every_file_and_folder_follows_the_umask(tmp_path, umask):
    work = tmp_path / "work"
    work.mkdir(mode=0o777 & ~umask)
    dataset, spec, cache = xor_cache(work, n=40)  # two Zarr stores and the manifest
    np.save(work / "c.npy", np.zeros((len(dataset), 5, 16), np.float32))
    import_tokens(cache, dataset, "C", work / "c.npy", store_format="hdf5")
    common = ["--data", spec, "--cache", cache, "--task", "classify:label", "--epochs", "1", "--no-progress"]
    for args in (
        ["fit", "--encoders", "A,B", "--dim", "16", "--heads", "2", "--out", work / "run"],
        ["ablate", "--encoders", "A,C", "--fusers", "linear", "--out", work / "grid"],
    ):
        res = CliRunner().invoke(main, [str(a) for a in [*args, *common]])
        assert res.exit_code == 0, res.output
    seen = {"dir": 0, "file": 0}
    for path in work.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        kind = "dir" if path.is_dir() else "file"
        want = (0o777 if kind == "dir" else 0o666) & ~umask
        assert mode == want, f"{path.relative_to(work)}: {mode:o}, expected {want:o} under umask {umask:03o}"
        seen[kind] += 1
    names = {p.name for p in work.rglob("*")}
    for written in ("manifest.json", "config.json", "metrics.json", "model.safetensors", "done.json", "results.json"):
        assert written in names
    assert any(n.endswith(".h5") for n in names) and any(n.endswith(".zarr") for n in names)
