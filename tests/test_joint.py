"""Joint fits over several datasets (Q-Face's unified model): transfer through a shared
latent factor, no harm without one, the run directory, the sampler, grids and bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from etf.cli import main
from etf.errors import EtfError
from etf.pipeline.fit.fusers import FuserConfig
from etf.pipeline.fit.joint import Selection, fit_joint
from etf.pipeline.fit.mixing import JointConfig, memory_shares, mix_probabilities, step_plan
from etf.pipeline.fit.train import FitConfig, fit
from tests.synthetic import D, T, import_prior, make_csv_dataset

SMALL = FuserConfig(dim=32, depth=1, heads=2, prior_tokens="all", head="pooled")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not fight the other test jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _splits(train: int, val: int, test: int) -> np.ndarray:
    return np.array(["train"] * train + ["val"] * val + ["test"] * test)


def _xor(z: np.ndarray) -> np.ndarray:
    return (z[:, 0] != z[:, 1]).astype(float)


def make_pair(tmp: Path, shared: bool, n_b: int, seed: int = 0, strength: float = 2.0):
    """Dataset A (classify:expression, 240 training samples) and dataset B (multilabel:AU1,
    ``n_b`` training samples), each label the XOR of two latent signs planted along fixed
    directions of prior P's tokens. ``shared``: B's latent directions are A's (A teaches
    the fuser the feature B needs); else B's are independent of A's."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(4, D))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    sizes = {"a": (240, 60, 100), "b": (n_b, 40, 200)}
    z = {k: rng.choice([-1.0, 1.0], (sum(v), 2)) for k, v in sizes.items()}
    dirs = {"a": u[:2], "b": u[:2] if shared else u[2:]}
    a, spec_a = make_csv_dataset(tmp / "a", {"expression": _xor(z["a"])}, _splits(*sizes["a"]))
    b, spec_b = make_csv_dataset(tmp / "b", {"AU1": _xor(z["b"])}, _splits(*sizes["b"]))
    cache = tmp / "cache"
    for name, dataset in (("a", a), ("b", b)):
        x = rng.normal(size=(len(dataset), T, D)) + strength * np.einsum("nj,jd->nd", z[name], dirs[name])[:, None]
        import_prior(cache, dataset, "P", x.astype(np.float32), tmp / name)
    return a, spec_a, b, spec_b, cache


def _cfg(cache, out, tasks, epochs, **kw):
    return FitConfig(
        cache_dir=cache,
        encoders=["P"],
        out=out,
        tasks=tasks,
        fuser_config=SMALL,
        epochs=epochs,
        batch_size=32,
        lr=3e-3,
        progress=False,
        **kw,
    )


def _singles_and_joint(tmp: Path, shared: bool, n_b: int, b_epochs: int):
    a, _, b, _, cache = make_pair(tmp, shared, n_b)
    single_a = fit(a, _cfg(cache, tmp / "a_run", ["classify:expression"], 12)).metrics
    single_b = fit(b, _cfg(cache, tmp / "b_run", ["multilabel:AU1"], b_epochs)).metrics
    tasks = ["1=classify:expression", "2=multilabel:AU1"]
    both = fit_joint([a, b], [_cfg(cache, tmp / "joint", tasks, 12)], JointConfig(mix="balanced"))[0].metrics
    return single_a, single_b, both


def _acc(m: dict) -> float:
    return m["test"]["expression"]["accuracy"]


def _au(m: dict) -> float:
    return m["test"]["AU1"]["mean_accuracy"]


def test_a_shared_latent_factor_transfers_to_the_small_dataset(tmp_path):
    """B's 12 samples cannot teach XOR; A's 240 can. B alone, given 25 times as many steps
    as it has batches in the joint fit's epochs, stays far below the joint fit, which reads
    the feature A taught the shared fuser."""
    single_a, single_b, both = _singles_and_joint(tmp_path, shared=True, n_b=12, b_epochs=300)
    joint_a, joint_b = both["datasets"]["csv1"], both["datasets"]["csv2"]
    assert _au(joint_b) > _au(single_b) + 0.1
    assert _acc(joint_a) > 0.9 and _acc(single_a) > 0.9


def test_b_nothing_shared_the_joint_fit_matches_the_single_fits(tmp_path):
    """Independent latents and enough data in each dataset: sharing the fuser neither helps
    nor hurts beyond noise."""
    single_a, single_b, both = _singles_and_joint(tmp_path, shared=False, n_b=240, b_epochs=12)
    joint_a, joint_b = both["datasets"]["csv1"], both["datasets"]["csv2"]
    assert _acc(joint_a) == pytest.approx(_acc(single_a), abs=0.05)
    assert _au(joint_b) == pytest.approx(_au(single_b), abs=0.05)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"), shared=True, n_b=40)


def test_run_directory_groups_by_dataset_and_agrees_with_sklearn(pair, tmp_path):
    from sklearn.metrics import accuracy_score

    a, _, b, _, cache = pair
    joint = JointConfig(mix="temperature:2", task_weights={"AU1": 2.0}, uncertainty=True, steps_per_epoch=5)
    cfg = _cfg(cache, tmp_path / "run", ["csv1=classify:expression", "2=multilabel:AU1"], 3, fuser="qface")
    m = fit_joint([a, b], [cfg], joint)[0].metrics
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(m))
    assert set(m["datasets"]) == {"csv1", "csv2"} and m["steps_per_epoch"] == 5
    assert m["mix"]["csv1"] == pytest.approx(math.sqrt(240) / (math.sqrt(240) + math.sqrt(40)))
    assert m["datasets"]["csv1"]["tasks"] == ["expression"] and set(m["datasets"]["csv1"]["test"]) == {"expression"}
    assert set(m["datasets"]["csv2"]["val"]) == {"AU1"} and m["task_weights"] == {"expression": 1.0, "AU1": 2.0}
    assert set(m["log_variance"]) == {"expression", "AU1"} and any(v != 0 for v in m["log_variance"].values())
    assert m["datasets"]["csv2"]["splits"] == {"train": 40, "val": 40, "test": 200}
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    truth = dict(zip(a.ids, a.column("expression")))
    test_a = [r for r in rows if r["dataset"] == "csv1" and r["split"] == "test"]
    assert len(test_a) == 100 and all(r["AU1_true"] == r["AU1_pred"] == "" for r in test_a)
    y = [int(r["expression_true"]) for r in test_a]
    assert y == [truth[r["id"]] for r in test_a]  # a sample's own dataset's labels, nothing else
    p = [int(r["expression_pred"]) for r in test_a]
    assert m["datasets"]["csv1"]["test"]["expression"]["accuracy"] == pytest.approx(accuracy_score(y, p))
    history = list(csv.DictReader(open(run / "history.csv")))
    assert len(history) == 3 and float(history[0]["selection_score"]) == 0.0  # the first epoch is the reference
    config = json.loads((run / "config.json").read_text())
    assert [d["label"] for d in config["datasets"]] == ["csv1", "csv2"] and config["joint"]["mix"] == "temperature:2"
    assert "csv2" in (run / "summary.txt").read_text()


def test_a_joint_run_predicts_from_the_cache(pair, tmp_path):
    """predict rebuilds the joint model from config.json (every dataset's heads)."""
    from etf.pipeline.fit.predict import load_model

    a, _, b, _, cache = pair
    fit_joint([a, b], [_cfg(cache, tmp_path / "run", ["1=classify:expression", "2=multilabel:AU1"], 1)], JointConfig())
    _, tasks, _, model = load_model(tmp_path / "run")
    assert [t.name for t in tasks] == ["expression", "AU1"] and set(model.heads) == {"expression", "AU1"}


def test_each_dataset_streams_within_its_share_of_the_memory(pair, tmp_path):
    a, _, b, _, cache = pair
    row = T * D * 2  # float16 tokens of one prior
    budget = row * (280 + 300)  # an equal half holds all of B's 280 samples; A's 400 get the 300 left
    cfg = _cfg(cache, tmp_path / "run", ["1=classify:expression", "2=multilabel:AU1"], 1, max_memory=budget)
    m = fit_joint([a, b], [cfg], JointConfig())[0].metrics
    assert m["datasets"]["csv2"]["memory_share"] == row * 280
    assert m["datasets"]["csv1"]["memory_share"] == budget - row * 280
    assert not m["datasets"]["csv2"]["streamed"] and m["datasets"]["csv1"]["streamed"]


def test_mixes_step_plans_and_memory_shares():
    assert mix_probabilities("balanced", [900, 100]).tolist() == [0.5, 0.5]
    assert mix_probabilities("proportional", [900, 100]).tolist() == [0.9, 0.1]
    assert mix_probabilities("temperature:2", [900, 100]) == pytest.approx([0.75, 0.25])
    plan = step_plan(np.array([0.9, 0.1]), 20, seed=0, epoch=0)
    assert np.bincount(plan).tolist() == [18, 2] and not (plan == step_plan(np.array([0.9, 0.1]), 20, 0, 1)).all()
    assert np.bincount(step_plan(np.array([0.99, 0.01]), 5, 0, 0)).tolist() == [4, 1]  # every dataset gets a step
    assert memory_shares([10, 100, 1000], 600) == [10, 100, 490]
    assert memory_shares([300, 400], 600) == [300, 300]


def test_selection_is_the_mean_signed_relative_change(pair):
    from etf.pipeline.fit.heads import Classify, Regress
    from etf.pipeline.fit.joint import Part

    a, _, b, _, _ = pair
    acc, mae = Classify("expression", ["expression"]), Regress("age", ["age"])
    parts = [Part("csv1", a, [acc], None, {}, None, {}), Part("csv2", b, [mae], None, {}, None, {})]
    select = Selection(parts, None)
    assert select({"expression": {"accuracy": 0.5}, "age": {"mae": 10.0}}) == 0.0
    # accuracy +20% relative, MAE 10 -> 9 (-10%, lower is better: +10%)
    assert select({"expression": {"accuracy": 0.6}, "age": {"mae": 9.0}}) == pytest.approx(0.15)
    assert select({"expression": {"accuracy": math.nan}, "age": {"mae": 9.0}}) == -math.inf
    assert Selection(parts, "age")({"expression": {"accuracy": 0.9}, "age": {"mae": 9.0}}) == -9.0
    with pytest.raises(EtfError, match="--select 'pose': no such task"):
        Selection(parts, "pose")


# ---------------------------------------------------------------------------- the command line


def _etf(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error(result) -> str:
    from tests.test_cli_validation import error_line

    return error_line(result)


def _joint_args(pair, out, *extra):
    _, spec_a, _, spec_b, cache = pair
    return ["fit", "--cache", cache, "--data", spec_a, "--data", spec_b, "--encoders", "P", "--out", out, *extra]


def test_the_command_line_fits_jointly(pair, tmp_path):
    args = ["--task", "1=classify:expression", "--task", "csv2=multilabel:AU1", "--epochs", "1", "--dim", "16"]
    extra = ["--mix", "balanced", "--select", "AU1", "--precision", "bf16", "--no-progress"]
    result = _etf(*_joint_args(pair, tmp_path / "run", *args, *extra))
    assert result.exit_code == 0, result.output
    assert "jointly on csv1, csv2" in result.output and "by val AU1 mean_f1" in result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["mix"] == {"csv1": 0.5, "csv2": 0.5} and metrics["precision"] == "bf16"  # autocast as in one fit
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["cache_dir"] == str(Path(pair[4]).resolve()) and config["dataset"]["name"] == "csv"  # as one fit's


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "classify:expression"], "with several --data, say which dataset it is for: 1=classify:expression"),
        (["--task", "1=multilabel:AU1"], "csv1 has no such column .* csv2 has it: write --task 2=multilabel:AU1"),
        (["--task", "3=multilabel:AU1"], "'3' names no dataset; use a position 1..2 or a name \\(csv1, csv2\\)"),
        (["--task", "1=classify:expression", "--task", "2=multilabel:AU1", "--mix", "even"], "--mix 'even': use"),
        (
            ["--task", "1=classify:expression", "--task", "2=multilabel:AU1", "--task-weight", "AU2=1"],
            "--task-weight AU2: no such task",
        ),
        (["--task", "1=classify:expression", "--task", "2=multilabel:AU1", "--select", "AU9"], "--select 'AU9'"),
        (["--task", "1=classify:expression"], "csv2 .* has no default task; give e.g. --task 2=classify:COLUMN"),
        (
            ["--task", "1=classify:expression", "--task", "2=multilabel:AU1", "--views", "random"],
            "--views random: a joint fit trains on each store's clean view",
        ),
    ],
)
def test_bad_joint_input_is_one_line_before_any_work(pair, tmp_path, extra, message):
    import re

    line = _error(_etf(*_joint_args(pair, tmp_path / "run", *extra)))
    assert re.search(message, line), line
    assert not (tmp_path / "run").exists()


def test_mismatched_priors_empty_and_unusable_datasets_are_refused(pair, tmp_path):
    from etf.cache.importer import import_tokens

    a, spec_a, _, _, cache = pair
    rng = np.random.default_rng(5)
    c, spec_c = make_csv_dataset(tmp_path / "c", {"AU1": rng.choice([0.0, 1.0], 40)}, _splits(20, 10, 10))
    np.save(tmp_path / "c.npy", rng.normal(size=(40, T, D)).astype(np.float32))
    import_tokens(cache, c, "P", tmp_path / "c.npy", dtype="float32", pool="avg")  # A's P is float16
    base = ["fit", "--cache", cache, "--data", spec_a, "--encoders", "P", "--out", tmp_path / "run"]
    tasks = ["--task", "1=classify:expression", "--task", "2=multilabel:AU1"]
    line = _error(_etf(*base, "--data", spec_c, *tasks))
    assert "--encoders P: the store of csv2" in line and "another spec" in line and "in dtype" in line
    empty = tmp_path / "empty.csv"
    empty.write_text("path,split,AU1\n")
    assert _error(_etf(*base, "--data", f"csv:{empty}", *tasks)).endswith("empty.csv: no rows")
    unlabelled, spec_u = make_csv_dataset(tmp_path / "u", {"AU1": np.full(40, np.nan)}, _splits(20, 10, 10))
    import_tokens(cache, unlabelled, "P", tmp_path / "c.npy", pool="avg")
    line = _error(_etf(*base, "--data", spec_u, *tasks))
    assert line.startswith("Error: csv2: ") and "the train split has no usable samples" in line
    single = _error(_etf(*base, "--mix", "balanced", "--uncertainty"))
    assert "--mix, --uncertainty: for a joint fit over several --data; this fit has one" in single


def test_a_joint_grid_puts_mixes_on_an_axis_and_reports_every_task(pair, tmp_path):
    from etf.pipeline.ablate.grid import Grid, plan_grid, run_grid

    _, spec_a, _, spec_b, cache = pair
    settings = {
        "data": [spec_a, spec_b],
        "cache": cache,
        "out": tmp_path,
        "encoders": "P",
        "tasks": ["1=classify:expression", "2=multilabel:AU1"],
        "fusers": "etfuser",
        "mix": "balanced,proportional",
        "seeds": "0,1",
        "epochs": 1,
        "dim": 16,
    }
    plan = plan_grid(Grid.from_settings(settings))
    assert len(plan.points) == 8 and len(plan.groups()) == 4  # (etfuser, linear) x 2 mixes x 2 seeds
    assert {p.labels["mix"] for p in plan.points} == {"balanced", "proportional"}
    outcome = run_grid(plan)
    assert outcome.done == 8 and not outcome.failed
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {(r["dataset"], r["task"], r["metric"]) for r in rows} == {
        ("csv1", "expression", "accuracy"),
        ("csv2", "AU1", "mean_f1"),
    }
    compared = [r for r in rows if r["significant"] != "baseline"]
    assert len(compared) == 4 and all(r["p_adjusted"] not in ("", "nan") for r in compared)
    assert {r["configuration"] for r in compared} == {"P etfuser mix=balanced", "P etfuser mix=proportional"}
    report = (tmp_path / "report.md").read_text()
    assert "## csv1 test expression accuracy" in report and "## csv2 test AU1 mean_f1" in report
    with pytest.raises(EtfError, match="--mix: for a joint grid over several --data"):
        Grid.from_settings({**settings, "data": spec_a})
