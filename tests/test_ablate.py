"""etf ablate: grids over encoder subsets from a tiny synthetic cache; resume, failures,
backends, the report and bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from etf.cli import main
from etf.errors import EtfError
from etf.pipeline.ablate import grid as ablate
from etf.pipeline.ablate.grid import Grid, load_toml, parse_subsets, plan_grid, run_grid
from etf.pipeline.fit.fusers import FUSERS
from etf.pipeline.fit.fusers.baselines import LinearProbe
from tests.synthetic import D, T, import_prior, make_csv_dataset, xor_cache
from tests.test_explain import _valid_png

REPORT = ("report.md", "results.csv", "results.json", "priors.png", "heatmap.png", "attention.png")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def xor(tmp_path_factory):
    return xor_cache(tmp_path_factory.mktemp("xor"), n=80)


def _grid(xor, out, **settings) -> Grid:
    _, spec, cache = xor
    base = {
        "data": spec,
        "cache": cache,
        "out": out,
        "encoders": "A,B",
        "tasks": ["classify:label"],
        "fusers": "etfuser,concat",
        "seeds": "0,1",
        "epochs": 2,
        "batch_size": 16,
        "dim": 16,
        "depth": 1,
        "heads": 2,
    }
    return Grid.from_settings({**base, **settings})


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _runs(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["runs"]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=float)


def test_two_encoder_two_seed_grid_reports_and_resumes(xor, tmp_path, monkeypatch):
    plan = plan_grid(_grid(xor, tmp_path, jobs=2))
    # subsets A, B, A+B; fusers etfuser, concat; plus the baselines A linear, B linear; two seeds
    assert len(plan.points) == 16 and len(plan.groups()) == 6
    first = run_grid(plan)
    assert (first.runs, first.reused, first.done, first.failed) == (16, 0, 16, [])
    for name in REPORT:
        if name.endswith(".png"):
            _valid_png(tmp_path / name)
            assert _pixels(tmp_path / name).std() > 10, name  # a drawing, not a blank canvas
    rows = _csv(tmp_path / "results.csv")
    assert len(rows) == 8 and all(r["seeds"] == "2" and r["split"] == "test" for r in rows)
    by_name = {r["configuration"]: r for r in rows}
    assert by_name["A linear"]["significant"] == "baseline"
    assert by_name["A+B etfuser"]["baseline"] == "A linear" and by_name["B concat"]["baseline"] == "B linear"
    # concat over one prior is the linear probe (same init, same training): no difference at all
    for single in ("A concat", "B concat"):
        r = by_name[single]
        assert (r["significant"], float(r["delta"]), float(r["p"])) == ("no", 0.0, 1.0)
        assert r["note"] == "identical results in every seed"
    # Δ is the mean over seeds of each run's test accuracy minus its baseline's, from the runs' files
    runs = {
        (r["labels"]["subset"], r["labels"]["fuser"], r["labels"]["seed"]): Path(r["path"]) for r in _runs(tmp_path)
    }
    accuracy = lambda key: json.loads((runs[key] / "metrics.json").read_text())["test"]["label"]["accuracy"]  # noqa: E731
    fused = by_name["A+B etfuser"]
    deltas = [accuracy(("A+B", "etfuser", s)) - accuracy(("A", "linear", s)) for s in (0, 1)]
    assert float(fused["delta"]) == pytest.approx(np.mean(deltas), abs=1e-9)
    assert float(fused["delta_ci_low"]) < float(fused["delta"]) < float(fused["delta_ci_high"])
    assert -1 <= float(fused["delta_ci_low"]) and float(fused["delta_ci_high"]) <= 1
    assert 0 <= float(fused["ci_low"]) and float(fused["ci_high"]) <= 1  # the mean's interval, clipped too
    # two epochs on 16 test samples: not enough to tell, and said so
    assert float(fused["p"]) > 0.05 and fused["significant"] == "no"
    assert float(fused["p_adjusted"]) >= float(fused["p"]) and int(fused["test_units"]) == 16
    # attention shares: the mean over seeds of each run's, which leave the ensemble token a part of its own
    shares = [json.loads((runs["A+B", "etfuser", s] / "metrics.json").read_text())["attention_share"] for s in (0, 1)]
    for prior in ("A", "B"):
        assert float(fused[f"share_{prior}"]) == pytest.approx(np.mean([sh[prior] for sh in shares]))
        assert 0 < float(fused[f"share_{prior}"]) < 1
    assert float(fused["share_A"]) + float(fused["share_B"]) < 1
    assert np.isnan(float(by_name["A concat"]["share_A"]))  # concat has no attention
    results = json.loads((tmp_path / "results.json").read_text())
    assert [c["configuration"] for c in results["configurations"]] == [r["configuration"] for r in rows]
    assert results["correction"] == "holm" and results["metric"]["splits"] == ["test"]
    report = (tmp_path / "report.md").read_text()
    assert "| A+B etfuser | 2 |" in report and "Holm's step-down correction" in report and "{" not in report
    assert "paired bootstrap (2000 draws) of the test samples, one draw shared by every seed" in report

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished run was fitted again")

    monkeypatch.setattr(ablate, "fit_many", no_fit)
    again = run_grid(plan_grid(_grid(xor, tmp_path, jobs=1)))
    assert (again.reused, again.done, again.groups) == (16, 0, 0)
    monkeypatch.undo()

    # an interrupted run (its directory written, done.json not yet) is fitted again, alone,
    # with the same result it had in its group (same threads per job: same arithmetic)
    point = next(p for p in plan.points if p.labels["subset"] == "A+B" and p.labels["fuser"] == "concat")
    model = (point.dir / "model.safetensors").read_bytes()
    (point.dir / "done.json").unlink()
    resumed = run_grid(plan_grid(_grid(xor, tmp_path, jobs=2)))
    assert (resumed.reused, resumed.done, resumed.groups) == (15, 1, 1)
    assert (point.dir / "model.safetensors").read_bytes() == model


def test_a_finished_run_whose_model_changed_is_fitted_again(xor, tmp_path):
    from safetensors.torch import load_file, save_file

    grid = _grid(xor, tmp_path, fusers="concat", seeds="0", subsets="k=1")
    plan = plan_grid(grid)
    assert run_grid(plan).done == len(plan.points)
    point = plan.points[0]
    model = point.dir / "model.safetensors"
    fitted = model.read_bytes()
    save_file({k: v * -37 for k, v in load_file(str(model)).items()}, str(model))
    lines: list[str] = []
    again = run_grid(plan_grid(grid), echo=lines.append)
    assert (again.reused, again.done, again.failed) == (len(plan.points) - 1, 1, [])
    assert f"  {point.dir}: model.safetensors does not match its SHA-256 in SHA256SUMS" in "\n".join(lines)
    assert model.read_bytes() == fitted  # fitted again, the same as before


class Explode(LinearProbe):
    """A fuser that fails while ``armed``."""

    armed = True

    def fuse(self, tokens):
        if Explode.armed:
            raise RuntimeError("boom")
        return super().fuse(tokens)


def test_a_failed_run_is_recorded_the_rest_finish_and_it_is_retried(xor, tmp_path, monkeypatch):
    monkeypatch.setitem(FUSERS, "explode", Explode)
    monkeypatch.setattr(Explode, "armed", True)
    grid = _grid(xor, tmp_path, fusers="etfuser,explode", seeds="0", subsets="k=2")
    first = run_grid(plan_grid(grid))
    assert first.done == 2  # A+B etfuser (trained alone after its group failed) and A linear
    assert [(p.labels["fuser"], msg) for p, msg in first.failed] == [("explode", "RuntimeError: boom")]
    failed = first.failed[0][0].dir / "failed.json"
    assert json.loads(failed.read_text())["attempts"] == 1
    assert "RuntimeError: boom" in (tmp_path / "report.md").read_text()

    second = run_grid(plan_grid(grid))  # still failing: retried, attempt counted
    assert (second.reused, second.done, len(second.failed)) == (2, 0, 1)
    assert json.loads(failed.read_text())["attempts"] == 2

    monkeypatch.setattr(Explode, "armed", False)
    third = run_grid(plan_grid(grid))
    assert (third.reused, third.done, third.failed) == (2, 1, [])
    assert not failed.exists()
    assert {r["seeds"] for r in _csv(tmp_path / "results.csv")} == {"1"}


def _children(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is ``pid``, from /proc."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found |= {int(c) for c in (task / "children").read_text().split()} if (task / "children").exists() else set()
    return {c for c in found if _alive(c)}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (FileNotFoundError, ProcessLookupError):
        return b""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from Linux's /proc")
def test_the_workers_of_a_killed_grid_exit(xor, tmp_path):
    """kill -9 of etf ablate: its loky workers stop fitting at once (no run finishes after the
    kill), so a re-run does not overlap them."""
    _, spec, cache = xor
    out = tmp_path / "grid"
    args = ["ablate", "--data", spec, "--cache", str(cache), "--encoders", "A,B", "--task", "classify:label",
            "--fusers", "etfuser,concat", "--seeds", "0,1,2,3", "--epochs", "40", "--batch-size", "2",
            "--jobs", "2", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    grid = subprocess.Popen([sys.executable, "-m", "etf.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    workers: set[int] = set()
    try:
        # both workers are fitting once a run has saved an epoch's state
        while not list((out / "runs").glob(".*.resume")) or len(workers) < 2:
            assert grid.poll() is None, "the grid ended before it could be killed"
            workers = {c for c in _children(grid.pid) if b"LokyProcess" in _cmdline(c)}  # not the trackers
            time.sleep(0.05)
        grid.send_signal(signal.SIGKILL)
        grid.wait()
        done = len(list(out.glob("runs/*/done.json")))
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = {pid: _cmdline(pid)[:200] for pid in workers if _alive(pid)}
        assert not alive, f"still running 10 s after their grid was killed: {alive}"
        assert len(list(out.glob("runs/*/done.json"))) == done
    finally:
        for pid in workers:  # only the processes this test's grid started, if any survived
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_dead_worker_stops_the_grid_but_keeps_what_finished(xor, tmp_path, monkeypatch):
    calls = []

    def dies_second(dataset, group, threads, jobs=1):
        calls.append(group)
        if len(calls) == 2:
            raise RuntimeError("A worker process managed by the executor was unexpectedly terminated.")
        return ablate._fit_group(dataset, group)

    monkeypatch.setattr(ablate, "run_group", dies_second)
    grid = _grid(xor, tmp_path, fusers="etfuser", seeds="0", subsets="k=2")
    outcome = run_grid(plan_grid(grid))
    assert outcome.stopped.startswith("RuntimeError: A worker process") and outcome.done == 1
    assert "1 done, 0 failed, 1 not run" in (tmp_path / "report.md").read_text()
    monkeypatch.undo()
    assert run_grid(plan_grid(grid)).done == 1


@pytest.fixture(scope="module")
def loky_grid(xor, tmp_path_factory) -> dict[str, dict]:
    """Run id -> metrics (without wall time) of a small grid run on loky with two workers: the
    reference every cluster backend must reproduce."""
    out = tmp_path_factory.mktemp("loky")
    outcome = run_grid(plan_grid(_grid(xor, out, fusers="etfuser", seeds="0", subsets="k=2", jobs=2)))
    assert (outcome.done, outcome.failed) == (2, [])
    return _grid_metrics(out)


def _grid_metrics(out: Path) -> dict[str, dict]:
    runs = {}
    for path in sorted((out / "runs").glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        metrics.pop("seconds")
        runs[path.parent.name] = metrics
    return runs


def test_dask_backend_on_a_two_process_cluster_matches_loky(xor, tmp_path, loky_grid):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        grid = _grid(
            xor, tmp_path, fusers="etfuser", seeds="0", subsets="k=2", backend="dask", jobs=2,
            scheduler=cluster.scheduler_address,
        )  # fmt: skip
        outcome = run_grid(plan_grid(grid))
    assert (outcome.done, outcome.failed) == (2, [])
    assert _grid_metrics(tmp_path) == loky_grid


def test_ray_backend_on_a_local_two_worker_instance_matches_loky(xor, tmp_path, loky_grid):
    pytest.importorskip("ray")
    _, spec, cache = xor
    toml = tmp_path / "grid.toml"
    toml.write_text(
        f'data = "{spec}"\nencoders = ["A", "B"]\nsubsets = "k=2"\nfusers = ["etfuser"]\nseeds = [0]\n'
        f'tasks = "classify:label"\nepochs = 2\nbatch_size = 16\ndim = 16\ndepth = 1\nheads = 2\n'
    )
    out = tmp_path / "grid"
    # no --scheduler: a local Ray instance of --jobs CPUs, in its own process group with a
    # deadline, so that a Ray that cannot start fails this test instead of hanging the suite
    cmd = [sys.executable, "-m", "etf.cli", "ablate", "--config", str(toml), "--cache", str(cache), "--out", str(out),
           "--backend", "ray", "--jobs", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("etf ablate --backend ray did not finish within 300 s")
    assert proc.returncode == 0, output
    assert "on 2 ray worker(s)" in output, output
    assert _grid_metrics(out) == loky_grid


@pytest.mark.parametrize("backend,extra", [("ray", "ray"), ("dask", "dask")])
def test_a_backend_that_is_not_installed_is_one_clear_error(xor, tmp_path, monkeypatch, backend, extra):
    monkeypatch.setitem(sys.modules, backend if backend == "ray" else "dask.distributed", None)  # import fails
    with pytest.raises(EtfError, match=f"pip install 'etf\\[{extra}\\]'"):
        run_grid(plan_grid(_grid(xor, tmp_path, fusers="etfuser", seeds="0", subsets="k=2", backend=backend)))


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("singles", [("A",), ("B",), ("C",)]),
        ("all", [("A",), ("B",), ("C",), ("A", "B"), ("A", "C"), ("B", "C"), ("A", "B", "C")]),
        ("leave-one-out", [("A", "B"), ("A", "C"), ("B", "C"), ("A", "B", "C")]),
        ("k=2", [("A", "B"), ("A", "C"), ("B", "C")]),
        ("k=2..3", [("A", "B"), ("A", "C"), ("B", "C"), ("A", "B", "C")]),
    ],
)
def test_subsets_keep_the_encoder_order(spec, expected):
    assert parse_subsets(spec, ["A", "B", "C"]) == expected


@pytest.mark.parametrize("spec", ["some", "k=0", "k=4", "k=3..2", "k=a"])
def test_bad_subsets_are_refused(spec):
    with pytest.raises(EtfError, match="--subsets"):
        parse_subsets(spec, ["A", "B", "C"])


def test_plan_canonical_prior_baselines_and_run_ids(xor, tmp_path):
    plan = plan_grid(
        _grid(xor, tmp_path / "x", encoders="B,A", fusers="etfuser,linear", seeds="0", attn="full,intra", subsets="k=2")
    )
    by = {(p.labels["subset"], p.labels["fuser"], p.labels["attn"]): p for p in plan.points}
    assert set(by) == {("B+A", "etfuser", "full"), ("B+A", "etfuser", "intra"), ("B", "linear", None)}
    assert by["B+A", "etfuser", "intra"].baseline == by["B", "linear", None].run_id
    # the run id is content: the same grid elsewhere has the same ids, another setting another id
    moved = plan_grid(
        _grid(xor, tmp_path / "y", encoders="B,A", fusers="etfuser", seeds="0", attn="full,intra", subsets="k=2")
    )
    assert {p.run_id for p in moved.points} == {p.run_id for p in plan.points}
    other = plan_grid(_grid(xor, tmp_path / "y", encoders="B,A", fusers="etfuser", seeds="0", subsets="k=2", lr=0.01))
    assert not {p.run_id for p in other.points} & {p.run_id for p in plan.points}


def test_toml_grid_with_command_line_overrides(xor, tmp_path):
    _, spec, cache = xor
    toml = tmp_path / "grid.toml"
    toml.write_text(
        f'data = "{spec}"\nencoders = ["A", "B"]\nsubsets = "k=2"\nfusers = ["etfuser"]\nseeds = [0, 1]\n'
        f'tasks = "classify:label"\nepochs = 1\nbatch_size = 16\ndim = 16\ndepth = 1\nheads = 2\n'
        f"lr = [0.001, 0.002]\n"
    )
    result = CliRunner().invoke(
        main, ["ablate", "--config", str(toml), "--cache", str(cache), "--seeds", "0", "--out", str(tmp_path / "grid")]
    )
    assert result.exit_code == 0, result.output
    rows = _csv(tmp_path / "grid" / "results.csv")
    # lr is an axis (a TOML list); the command line's --seeds 0 overrides the file's two seeds
    assert sorted(r["configuration"] for r in rows) == [
        "A linear lr=0.001",
        "A linear lr=0.002",
        "A+B etfuser lr=0.001",
        "A+B etfuser lr=0.002",
    ]
    assert {r["seeds"] for r in rows} == {"1"}
    assert f"report: {tmp_path / 'grid' / 'report.md'}" in result.output


def _bad(args: list[str]) -> str:
    result = CliRunner().invoke(main, ["ablate", *args])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_bad_input_is_one_clear_line(xor, tmp_path):
    _, spec, cache = xor
    common = ["--data", spec, "--cache", str(cache), "--out", str(tmp_path / "o"), "--task", "classify:label"]
    assert "--encoders: encoder 'C': no store" in _bad([*common, "--encoders", "A,C"])
    assert "--subsets 'pairs'" in _bad([*common, "--encoders", "A,B", "--subsets", "pairs"])
    assert "--fusers 'nope': unknown fuser" in _bad([*common, "--encoders", "A,B", "--fusers", "etfuser,nope"])
    assert "--mask 'half'" in _bad([*common, "--encoders", "A,B", "--mask", "none,half"])
    assert "'--correction': 'sidak' is not one of 'holm', 'bonferroni', 'fdr_bh'" in _bad(
        [*common, "--encoders", "A,B", "--correction", "sidak"]
    )
    assert "has its own test split(s) (test)" in _bad([*common, "--encoders", "A,B", "--test-split", "holdout:0.2"])
    dataset, spec_no_test = make_csv_dataset(
        tmp_path / "nt", {"label": np.resize([0.0, 1.0], 20)}, np.array(["train", "val"] * 10)
    )
    import_prior(tmp_path / "c", dataset, "A", np.ones((20, T, D), np.float32), tmp_path)
    no_test = ["--data", spec_no_test, "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--encoders", "A"]
    line = _bad([*no_test, "--task", "classify:label"])
    assert "has no test split, and val does not stand in for one: declare one with --test-split holdout:0.2" in line
    assert "etf ablate compares on a test split" in _bad([*no_test, "--task", "classify:label", "--test-split", "none"])
    assert "--encoders: required" in _bad(["--data", spec, "--cache", str(cache), "--out", str(tmp_path / "o")])
    toml = tmp_path / "bad.toml"
    toml.write_text('encoders = ["A", "B"]\nepochs = = 3\n')
    assert f"{toml}: malformed TOML" in (line := _bad(["--config", str(toml), *common])) and "line 2" in line
    toml.write_text('encoders = ["A", "B"]\nlearning_rate = 0.1\n')
    assert f"{toml}: unknown key 'learning_rate'" in _bad(["--config", str(toml), *common])
    toml.write_text('encoders = ["A", "B"]\nepochs = "many"\n')
    assert f"{toml}: epochs = 'many': expected int" in _bad(["--config", str(toml), *common])
    toml.write_text('encoders = ["A", "B"]\ncorrection = "sidak"\n')
    assert "--correction 'sidak': use one of holm, bonferroni, fdr_bh" in _bad(["--config", str(toml), *common])


@pytest.mark.parametrize("path", sorted((ROOT / "ablations").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_experiment_files_are_valid(path):
    settings = {"data": "lfw-subset", "out": "unused", **load_toml(path)}
    grid = Grid.from_settings(settings, where=str(path))
    assert len(grid.encoders) >= 2 and grid.axes["seed"]


def test_report_of_a_grid_where_nothing_finished(tmp_path):
    from etf.pipeline.ablate.report import Metric, Run, write_report

    labels = {"subset": "A+B", "priors": 2, "fuser": "etfuser", "attn": "full", "mask": "none", "seed": 0}
    runs = [
        Run("r1", labels, "r0", tmp_path / "r1", "failed", "RuntimeError: boom"),
        Run("r0", {**labels, "subset": "A", "priors": 1, "fuser": "linear"}, "r0", tmp_path / "r0", "pending"),
    ]
    report = write_report(runs, Metric("label", "classify", "accuracy", ("test",), True), tmp_path, "nothing")
    text = report.read_text()
    assert "0 done, 1 failed, 1 not run" in text and "| A+B etfuser | 0 (1 failed) | n/a ± n/a" in text
    assert not list(tmp_path.glob("*.png"))
    assert json.loads((tmp_path / "results.json").read_text())["configurations"][0]["mean"] is None


def test_the_fused_pair_is_found_better_and_a_noise_prior_is_not(tmp_path):
    """XOR: A+B together predict the label, each alone cannot; N is pure noise, so A+N and
    B+N know no more than their baseline. Three seeds, every comparison corrected."""
    dataset, spec, cache = xor_cache(tmp_path, n=400)
    import_prior(cache, dataset, "N", np.random.default_rng(9).normal(size=(400, T, D)).astype(np.float32), tmp_path)
    grid = Grid.from_settings(
        {
            "data": spec,
            "cache": cache,
            "out": tmp_path / "grid",
            "encoders": "A,B,N",
            "jobs": 2,  # one thread each: small batches do not wait on a second thread
            "subsets": "k=2",
            "tasks": ["classify:label"],
            "fusers": "etfuser",
            "seeds": "0,1,2",
            "epochs": 25,
            "batch_size": 64,
            "lr": 6e-3,
            "dim": 32,
            "depth": 1,
            "heads": 2,
        }
    )
    assert run_grid(plan_grid(grid)).failed == []
    rows = {r["configuration"]: r for r in _csv(tmp_path / "grid" / "results.csv")}
    fused = rows["A+B etfuser"]
    assert fused["significant"] == "yes (better)" and float(fused["delta"]) > 0.3
    for noise in ("A+N etfuser", "B+N etfuser"):
        assert rows[noise]["significant"] == "no", rows[noise]


def _fake_run(path: Path, splits: dict[str, list[tuple[str, np.ndarray, np.ndarray]]], norms: dict[str, float]) -> None:
    """A finished landmarks run: predictions.csv (two points per sample) and metrics.json with
    the NME of each split, as fit writes them."""
    from etf.pipeline.fit import metrics
    from etf.pipeline.fit.heads import Landmarks

    path.mkdir(parents=True)
    task = Landmarks(name="lm", columns=["lm0_x", "lm0_y", "lm1_x", "lm1_y"])
    (path / "config.json").write_text(json.dumps({"tasks": [task.state()]}))
    lines = [",".join(["id", "split", *(c for side in task.csv_columns() for c in side)])]
    result = {}
    for split, rows in splits.items():
        for sid, y, p in rows:
            lines.append(f"{sid},{split}," + ",".join(f"{v:.6g}" for v in [*y, *p]))
        y, p = np.array([r[1] for r in rows]).reshape(-1, 2, 2), np.array([r[2] for r in rows]).reshape(-1, 2, 2)
        norm = np.array([norms[r[0]] for r in rows])
        result[split] = {"lm": {"nme": float(metrics.nme(y, p, norm).mean())}}
    (path / "predictions.csv").write_text("\n".join(lines) + "\n")
    (path / "metrics.json").write_text(json.dumps(result))


def test_report_compares_nme_on_every_test_split(tmp_path):
    """Landmarks, as on 300W: the full test set and its two subsets each get a row per
    configuration; Δ is in NME (the dataset's normaliser), not in pixels."""
    from etf.pipeline.ablate.report import Metric, Run, write_report

    rng = np.random.default_rng(0)
    ids = {"test_common": [f"c{i}" for i in range(30)], "test_challenging": [f"h{i}" for i in range(10)]}
    norms = {i: float(rng.uniform(20, 60)) for group in ids.values() for i in group}
    truth = {i: rng.uniform(0, 100, 4) for i in norms}
    runs, nme = [], {}
    for seed in (0, 1, 2):
        for name, noise in (("base", 2.0), ("fused", 1.0)):
            per = {s: [(i, truth[i], truth[i] + rng.normal(0, noise, 4)) for i in group] for s, group in ids.items()}
            per["test"] = per["test_common"] + per["test_challenging"]
            _fake_run(tmp_path / f"{name}{seed}", per, norms)
            nme[name, seed] = json.loads((tmp_path / f"{name}{seed}" / "metrics.json").read_text())
        labels = {"subset": "A", "priors": 1, "fuser": "linear", "attn": "full", "mask": "none", "seed": seed}
        runs.append(Run(f"base{seed}", labels, f"base{seed}", tmp_path / f"base{seed}", "done"))
        fused = {**labels, "subset": "A+B", "priors": 2, "fuser": "etfuser"}
        runs.append(Run(f"fused{seed}", fused, f"base{seed}", tmp_path / f"fused{seed}", "done"))
    metric = Metric("lm", "landmarks", "nme", ("test", "test_common", "test_challenging"), False)
    write_report(runs, metric, tmp_path / "report", "landmarks", norms=norms)
    rows = {(r["split"], r["configuration"]): r for r in _csv(tmp_path / "report" / "results.csv")}
    assert len(rows) == 6
    for split, units in (("test", 40), ("test_common", 30), ("test_challenging", 10)):
        r = rows[split, "A+B etfuser"]
        want = np.mean([nme["fused", s][split]["lm"]["nme"] - nme["base", s][split]["lm"]["nme"] for s in range(3)])
        assert float(r["delta"]) == pytest.approx(want, rel=1e-4) and int(r["test_units"]) == units
        assert float(r["delta"]) < 0 and r["significant"] in ("yes (better)", "no")  # lower NME is better
    assert rows["test", "A+B etfuser"]["significant"] == "yes (better)"
    assert float(rows["test", "A+B etfuser"]["delta_ci_high"]) < 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert all(f"## {s}\n" in report for s in metric.splits) and "all 3 comparisons" in report


def test_unread_settings_merge_and_the_heatmap_says_what_each_cell_is(xor, tmp_path):
    from etf.pipeline.ablate.report import heatmap_figure

    grid = _grid(xor, tmp_path, subsets="k=2", attn="full,intra", mask="none,token:0.2")
    plan = plan_grid(grid)
    concat = [p for p in plan.points if p.labels["fuser"] == "concat"]
    assert len(concat) == 4 and {p.labels["attn"] for p in concat} == {None}  # one run per mask and seed
    outcome = run_grid(plan)
    assert outcome.done == len(plan.points) == 14 and not outcome.failed  # 8 etfuser + 4 concat + 2 baselines
    rows = _csv(tmp_path / "results.csv")
    merged = [r for r in rows if r["fuser"] == "concat"]
    assert sorted(r["configuration"] for r in merged) == ["A+B concat mask=none", "A+B concat mask=token:0.2"]
    assert all(r["seeds"] == "2" == r["seeds_tested"] for r in merged)
    assert float(merged[0]["ci_low"]) < float(merged[0]["ci_high"])  # test samples vary even when seeds agree
    metric = plan.metric
    typed = [
        {**r, **{k: float(r[k]) for k in ("mean", "ci_low", "ci_high", "delta")}, "priors": int(r["priors"]),
         "is_baseline": r["significant"] == "baseline"}
        for r in rows
    ]  # fmt: skip
    fig, k = heatmap_figure(typed, metric)
    assert k == 2
    title = fig._suptitle.get_text()
    assert "each cell one configuration, mean over its seeds [95% interval]" in title and "Δ vs its baseline" in title
    (ax,) = [a for a in fig.axes if a.get_title() == "A+B"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["etfuser attn=full", "etfuser attn=intra", "concat"]
    assert len(ax.texts) == 6  # one cell per configuration, no cell an average of several


def test_a_runs_identity_does_not_change_with_how_its_store_is_named(tmp_path):
    """A second store of encoder A makes ``A`` ambiguous; naming the first one ``A-HASHPREFIX``
    or by its path finds the runs already fitted, not new ones."""
    dataset, spec, cache = xor_cache(tmp_path, n=40)
    ids = {p.run_id for p in plan_grid(_grid((dataset, spec, cache), tmp_path / "g", seeds="0")).points}
    first_a = next(cache.glob("*/A-*.zarr"))
    rng = np.random.default_rng(1)
    import_prior(cache, dataset, "A", rng.normal(size=(len(dataset), T + 4, D)).astype(np.float32), tmp_path)
    with pytest.raises(EtfError, match="NAME-HASHPREFIX"):
        plan_grid(_grid((dataset, spec, cache), tmp_path / "g", seeds="0"))
    for name in (first_a.stem[:6], str(first_a)):
        plan = plan_grid(_grid((dataset, spec, cache), tmp_path / "g", seeds="0", encoders=f"{name},B"))
        assert {p.run_id for p in plan.points} == ids, name


def test_a_finished_run_with_damaged_metrics_is_fitted_again(xor, tmp_path):
    grid = _grid(xor, tmp_path, fusers="etfuser", seeds="0", subsets="k=2")
    assert run_grid(plan_grid(grid)).done == 2
    damaged = next(p for p in plan_grid(grid).points if p.labels["fuser"] == "etfuser")
    (damaged.dir / "metrics.json").write_bytes(b"\xff\x00 garbage")
    lines = []
    again = run_grid(plan_grid(grid), lines.append)
    assert (again.reused, again.done, again.failed) == (1, 1, [])
    said = [line for line in lines if "metrics.json" in line]
    assert len(said) == 1 and "fitting it again" in said[0], lines
    assert json.loads((damaged.dir / "metrics.json").read_text())["best_epoch"] >= 1


def test_a_worker_reads_each_store_once_across_groups(xor, tmp_path, monkeypatch):
    """Groups of different subsets share stores: one worker (jobs 1: this process) reads
    each store once and keeps its tokens resident for the next groups."""
    from etf.cache.store import TokenStore

    reads: list[str] = []
    real = TokenStore.read_layers

    def counted(self, *args, **kwargs):
        reads.append(self.path.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TokenStore, "read_layers", counted)
    plan = plan_grid(_grid(xor, tmp_path, fusers="etfuser", seeds="0", jobs=1))
    assert len(plan.groups()) >= 3  # A, B, A+B (and the linear baselines)
    outcome = run_grid(plan)
    assert outcome.done == len(plan.points) and not outcome.failed
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 2, reads
