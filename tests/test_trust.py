"""Numbers a reviewer can trust: a diverged fit is a failure, never a result; a run reads the
stores it was fitted on, never another store that now has a prior's name."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from etf.cli import main
from etf.errors import EtfError
from etf.pipeline.ablate.grid import Grid, plan_grid, run_grid
from etf.pipeline.fit.predict import load_model, run_priors
from etf.pipeline.fit.train import check_finite
from tests.synthetic import import_prior, planted_tokens, xor_cache


@pytest.fixture(scope="module")
def xor(tmp_path_factory):
    return xor_cache(tmp_path_factory.mktemp("xor"), n=120)


def _fit_args(spec, cache, out, *extra) -> list[str]:
    return ["fit", "--data", spec, "--cache", str(cache), "--encoders", "A,B", "--out", str(out),
            "--task", "classify:label", "--epochs", "2", "--dim", "16", "--heads", "2", "--no-progress", *extra]  # fmt: skip


def test_a_diverged_fit_stops_with_one_line_and_writes_no_run(xor, tmp_path):
    _, spec, cache = xor
    res = CliRunner().invoke(main, _fit_args(spec, cache, tmp_path / "run", "--lr", "1e30"))
    assert res.exit_code == 1
    (line,) = res.output.strip().splitlines()
    assert "training diverged: the loss was nan in epoch 1 at a peak learning rate of 1e+30 (--lr)" in line
    assert not (tmp_path / "run").exists()


def test_a_diverged_grid_run_is_a_failure_never_a_row(xor, tmp_path):
    _, spec, cache = xor
    grid = Grid.from_settings(
        {
            "data": spec,
            "cache": cache,
            "out": tmp_path,
            "encoders": "A,B",
            "subsets": "k=2",
            "fusers": "etfuser",
            "seeds": "0,1",
            "tasks": ["classify:label"],
            "epochs": 2,
            "batch_size": 16,
            "dim": 16,
            "heads": 2,
            "lr": [2e-3, 1e30],
        }  # fmt: skip
    )
    outcome = run_grid(plan_grid(grid))
    failed = {(p.labels["lr"], p.labels["fuser"]) for p, _ in outcome.failed}
    assert failed == {(1e30, "etfuser"), (1e30, "linear")}  # each seed's diverged models (with their baselines)
    assert outcome.done == 4 and all("training diverged" in msg for _, msg in outcome.failed)
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    diverged = [r for r in rows if r["lr"] == "1e+30"]
    assert diverged and all(r["seeds"] == "0" and r["mean"] in ("", "nan") for r in diverged)
    assert all(r["seeds"] == "2" for r in rows if r["lr"] == "0.002")


def test_non_finite_outputs_are_refused(xor, tmp_path):
    _, spec, cache = xor
    res = CliRunner().invoke(main, _fit_args(spec, cache, tmp_path / "run"))
    assert res.exit_code == 0, res.output
    _, _, _, model = load_model(tmp_path / "run")
    tokens = [torch.randn(2, 5, 16), torch.randn(2, 5, 16)]
    check_finite(model(tokens), tmp_path / "run")  # a sound model passes
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(EtfError, match=r"--run .*run: the model's label output is not finite"):
        check_finite(model(tokens), tmp_path / "run")


def test_a_run_reads_only_the_stores_it_was_fitted_on(tmp_path):
    dataset, spec, cache = xor_cache(tmp_path, n=60)
    run = tmp_path / "run"
    res = CliRunner().invoke(main, _fit_args(spec, cache, run))
    assert res.exit_code == 0, res.output
    args = ["explain", "--run", str(run), "--split", "test", "--device", "cpu"]
    assert CliRunner().invoke(main, [*args, "--out", str(tmp_path / "ok")]).exit_code == 0
    # another store of A (other tokens: as from another seed) beside the run's: the run still reads its own
    rng = np.random.default_rng(9)
    import_prior(cache, dataset, "A", planted_tokens(rng, rng.choice([-1.0, 1.0], 60), 3.0), tmp_path)
    assert CliRunner().invoke(main, [*args, "--out", str(tmp_path / "still")]).exit_code == 0
    # the run's store gone: refused, naming it, not read from the other store named A
    config, *_ = load_model(run)
    (store,) = [p for p in cache.glob("*/A-*.zarr") if p.name.startswith(f"A-{_hash(run, 'A')}")]
    shutil.rmtree(store)
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "gone")])
    assert res.exit_code == 1
    (line,) = res.output.strip().splitlines()
    assert f"--run {run}: the stores it was fitted on (A-{_hash(run, 'A')}" in line
    with pytest.raises(EtfError, match="are not all in"):
        run_priors(run, config, dataset)


def _hash(run, name: str) -> str:
    import json

    return next(s["spec_hash"] for s in json.loads((run / "stores.json").read_text()) if s["name"] == name)
