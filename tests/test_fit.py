"""etf fit: the ensemble token uses information split across priors; protocols; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from etf.errors import EtfError
from etf.pipeline.fit.fusers import FuserConfig
from etf.pipeline.fit.train import FitConfig, fit
from tests.synthetic import import_prior, make_csv_dataset, planted_tokens, standard_splits, xor_cache

#: the token-level model this project first built (every token, gated; heads read the class token)
SMALL = FuserConfig(dim=64, depth=2, heads=4, prior_tokens="all", head="pooled")


def _fit(dataset, cache, out, encoders, fuser="etfuser", epochs=40, **kw):
    kw.setdefault("tasks", ["classify:label"])
    cfg = FitConfig(
        cache_dir=cache,
        encoders=encoders,
        out=out,
        fuser=fuser,
        epochs=epochs,
        batch_size=32,
        lr=2e-3,
        fuser_config=kw.pop("fuser_config", SMALL),
        progress=False,
        **kw,
    )
    return fit(dataset, cfg).metrics


@pytest.fixture(scope="module")
def xor(tmp_path_factory):
    return xor_cache(tmp_path_factory.mktemp("xor"))


def test_ensemble_token_combines_information_split_across_priors(xor, tmp_path):
    dataset, _, cache = xor
    acc = lambda m: m["test"]["label"]["accuracy"]  # noqa: E731
    both = _fit(dataset, cache, tmp_path / "ab", ["A", "B"])
    only_a = _fit(dataset, cache, tmp_path / "a", ["A"])
    only_b = _fit(dataset, cache, tmp_path / "b", ["B"])
    linear = _fit(dataset, cache, tmp_path / "lin", ["A", "B"], fuser="linear")
    paper = _fit(dataset, cache, tmp_path / "paper", ["A", "B"], fuser_config=FuserConfig(heads=4))
    assert acc(both) > 0.9 and acc(paper) > 0.9  # the token-level model and the authors' (pooled tokens, added)
    for single in (only_a, only_b, linear):
        assert acc(single) < 0.65
    for fused in (both, paper):  # with prior B absent at test time (canonical inference) no model can do XOR
        assert fused["test:canonical"]["label"]["accuracy"] < 0.65
        assert 0 < fused["fuser_flops_canonical"] < fused["fuser_flops"]
    assert both["fuser_params"] > linear["fuser_params"] > 0
    assert both["fuser_flops"] > 0
    assert linear["priors"] == ["A"] and both["priors"] == ["A", "B"]
    assert linear["test:canonical"] == linear["test"]  # it reads the canonical prior only


def test_same_seed_same_run_bit_for_bit(xor, tmp_path):
    dataset, _, cache = xor
    runs = [tmp_path / "r1", tmp_path / "r2"]
    metrics = [_fit(dataset, cache, r, ["A", "B"], epochs=3, seed=7) for r in runs]
    for m in metrics:
        m.pop("seconds")
    assert metrics[0] == metrics[1]
    assert (runs[0] / "model.safetensors").read_bytes() == (runs[1] / "model.safetensors").read_bytes()
    other = _fit(dataset, cache, tmp_path / "r3", ["A", "B"], epochs=3, seed=8)
    assert (tmp_path / "r3" / "model.safetensors").read_bytes() != (runs[0] / "model.safetensors").read_bytes()
    assert other["splits"] == metrics[0]["splits"]


def test_run_directory_and_metrics_agree_with_sklearn(xor, tmp_path):
    import csv

    from sklearn.metrics import accuracy_score, f1_score

    dataset, _, cache = xor
    m = _fit(dataset, cache, tmp_path / "run", ["A", "B"], epochs=5)
    for name in (
        "config.json",
        "stores.json",
        "metrics.json",
        "model.safetensors",
        "history.csv",
        "predictions.csv",
        "summary.txt",
    ):
        assert (tmp_path / "run" / name).exists(), name
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == json.loads(json.dumps(m))
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "predictions.csv")) if r["split"] == "test"]
    truth = {sid: label for sid, label in zip(dataset.ids, dataset.column("label"))}
    classes = json.loads((tmp_path / "run" / "config.json").read_text())["tasks"][0]["classes"]
    y = [classes.index(r["label_true"]) for r in rows]  # class names, not indices
    assert y == [truth[r["id"]] for r in rows]  # predictions line up with the right samples
    p = [classes.index(r["label_pred"]) for r in rows]
    assert m["test"]["label"]["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["test"]["label"]["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    stores = json.loads((tmp_path / "run" / "stores.json").read_text())
    assert [s["name"] for s in stores] == ["A", "B"] and all(len(s["spec_hash"]) == 16 for s in stores)
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(history) == 6 and "val_label_accuracy" in history[0]


def test_prior_masking_keeps_accuracy_when_a_prior_is_zeroed(tmp_path):
    """A weak prior A and a strong prior B both carry the label. Zeroing B at test time
    hurts a fuser trained with every prior present more than one trained with prior:P."""

    from etf.cache.features import PriorSet
    from etf.pipeline.fit.predict import load_model

    rng = np.random.default_rng(1)
    n = 600
    s = rng.choice([-1.0, 1.0], n)
    dataset, _ = make_csv_dataset(tmp_path / "d", {"label": (s > 0).astype(float)}, standard_splits(n))
    cache = tmp_path / "cache"
    import_prior(cache, dataset, "A", planted_tokens(rng, s, 0.6), tmp_path)
    import_prior(cache, dataset, "B", planted_tokens(rng, s, 4.0), tmp_path)
    test = np.nonzero(np.array(dataset.splits) == "test")[0]
    priors = PriorSet(cache, dataset, ["A", "B"])
    tokens = priors.load(test)
    priors.close()
    y = (s[test] > 0).astype(int)

    def zeroed_b_accuracy(mask: str) -> float:
        out = tmp_path / mask.replace(":", "_")
        _fit(dataset, cache, out, ["A", "B"], epochs=30, fuser_config=FuserConfig(dim=64, depth=2, heads=4, mask=mask))
        _, _, _, model = load_model(out)
        with torch.no_grad():
            logits = model([tokens[0].float(), torch.zeros_like(tokens[1]).float()])["label"]
        return float((logits.argmax(1).numpy() == y).mean())

    assert zeroed_b_accuracy("prior:0.5") > zeroed_b_accuracy("none") + 0.05


def test_streamed_fit_matches_budget_and_learns(xor, tmp_path):
    dataset, _, cache = xor
    m = _fit(dataset, cache, tmp_path / "s", ["A", "B"], max_memory=4096)
    assert m["streamed"] is True
    assert m["test"]["label"]["accuracy"] > 0.85


def test_low_data_protocols(xor, tmp_path):
    dataset, _, cache = xor
    m = _fit(dataset, cache, tmp_path / "f", ["A"], epochs=1, train_fraction=0.25)
    assert m["splits"]["train"] == 75
    m = _fit(dataset, cache, tmp_path / "k", ["A"], epochs=1, shots=10)
    assert m["splits"]["train"] == 20
    with pytest.raises(EtfError, match="--shots 1000: class '0' has only"):
        _fit(dataset, cache, tmp_path / "k2", ["A"], epochs=1, shots=1000)


def test_multi_task_with_missing_labels(tmp_path):
    rng = np.random.default_rng(2)
    n = 400
    s, r = rng.choice([-1.0, 1.0], n), rng.normal(size=n)
    age = 30 + 10 * r
    age[rng.random(n) < 0.3] = np.nan  # a third of the samples lack the regression label
    dataset, _ = make_csv_dataset(tmp_path / "d", {"cls": (s > 0).astype(float), "age": age}, standard_splits(n))
    cache = tmp_path / "cache"
    tok = planted_tokens(rng, s, 3.0)
    tok[:, :, 1] += 2.0 * r[:, None]
    import_prior(cache, dataset, "A", tok, tmp_path)
    m = _fit(dataset, cache, tmp_path / "run", ["A"], tasks=["classify:cls", "regress:age"], epochs=30)
    assert m["test"]["cls"]["accuracy"] > 0.9
    assert m["test"]["age"]["mae"] < 6.0  # the spread of age is 10: the head must use the token


@pytest.mark.parametrize(
    "labels,task,message",
    [
        ({"label": [0, 1, -1]}, "classify:label", "outside 0..1"),
        ({"label": [0.5, 1.0, 2.0]}, "classify:label", "non-integer values"),
        ({"label": [0, 1, 2]}, "multilabel:label", "not binary"),
        ({"label": [0, 1, 1]}, "classify:missing", "no label column 'missing'"),
        ({"label": [0, 1, 1]}, "bogus:label", "KIND one of"),
    ],
)
def test_tasks_that_do_not_fit_the_labels(tmp_path, labels, task, message):
    n = 30
    col = np.resize(np.array(next(iter(labels.values())), dtype=float), n)
    dataset, _ = make_csv_dataset(tmp_path / "d", {"label": col}, standard_splits(n))
    import_prior(tmp_path / "c", dataset, "A", np.zeros((n, 5, 16), np.float32) + 1, tmp_path)
    with pytest.raises(EtfError, match=message):
        _fit(dataset, tmp_path / "c", tmp_path / "run", ["A"], tasks=[task], epochs=1)


def test_regress_on_a_categorical_column_is_refused(tmp_path):
    from etf.data import load_dataset

    (tmp_path / "img").mkdir()
    from PIL import Image

    lines = ["path,split,mood"]
    for i in range(12):
        Image.new("RGB", (4, 4)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{'train' if i < 8 else 'val'},{'happy' if i % 2 else 'sad'}")
    (tmp_path / "d.csv").write_text("\n".join(lines))
    dataset = load_dataset(f"csv:{tmp_path / 'd.csv'}")
    import_prior(tmp_path / "c", dataset, "A", np.ones((12, 5, 16), np.float32), tmp_path)
    with pytest.raises(EtfError, match="categorical"):
        _fit(dataset, tmp_path / "c", tmp_path / "run", ["A"], tasks=["regress:mood"], epochs=1)


def test_cache_problems_are_refused(xor, tmp_path):
    import shutil

    dataset, _, cache = xor
    with pytest.raises(EtfError, match="no store for this dataset"):
        _fit(dataset, cache, tmp_path / "r", ["C"], epochs=1)
    # a store of another sample set, passed by path
    other, _ = make_csv_dataset(tmp_path / "other", {"label": np.zeros(20)}, standard_splits(20))
    foreign = import_prior(cache, other, "F", np.ones((20, 5, 16), np.float32), tmp_path)
    with pytest.raises(EtfError, match="different sample set"):
        _fit(dataset, cache, tmp_path / "r", ["A", str(foreign)], epochs=1)
    # an incomplete store
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    store = next((copy / dataset.key).glob("B-*.zarr"))
    store.rename(store.with_name(store.name + ".partial"))
    with pytest.raises(EtfError, match="incomplete"):
        _fit(dataset, copy, tmp_path / "r", ["A", "B"], epochs=1)
    # a cached manifest that no longer matches --data
    manifest = copy / dataset.key / "manifest.json"
    m = json.loads(manifest.read_text())
    m["labels"]["label"][0] = 1 - m["labels"]["label"][0]
    manifest.write_text(json.dumps(m))
    with pytest.raises(EtfError, match="differs from --data .* in labels"):
        _fit(dataset, copy, tmp_path / "r", ["A"], epochs=1)


def test_empty_split_is_refused(tmp_path):
    n = 20
    label = np.resize([0.0, 1.0], n)
    label[np.array(standard_splits(n)) == "val"] = np.nan  # every val sample lacks the label
    dataset, _ = make_csv_dataset(tmp_path / "d", {"label": label}, standard_splits(n))
    import_prior(tmp_path / "c", dataset, "A", np.ones((n, 5, 16), np.float32), tmp_path)
    with pytest.raises(EtfError, match="val split has no usable samples"):
        _fit(dataset, tmp_path / "c", tmp_path / "run", ["A"], epochs=1)


def test_block_stream_visits_each_row_once_in_full_mixed_batches(xor):
    from etf.cache.features import BlockStream, PriorSet

    dataset, _, cache = xor
    priors = PriorSet(cache, dataset, ["A", "B"])
    rows = np.arange(3, len(dataset), 2)  # odd rows only, so blocks are partly wanted
    stream = BlockStream(priors, rows, batch_size=32, block_rows=45, shuffle=True, seed=0, pool_blocks=4)
    everything = priors.load(np.arange(len(dataset)))
    seen = []
    batches = list(stream.epoch(1))
    assert len(batches) == len(stream) == -(-len(rows) // 32)
    assert [len(i) for i, _, _ in batches[:-1]] == [32] * (len(batches) - 1)
    for idx, views, tokens in batches:
        assert not views.any(), "a store without views is read in the clean view"
        for full, got in zip(everything, tokens):
            assert np.array_equal(full[torch.from_numpy(idx)].numpy(), got.numpy())
        seen.extend(idx.tolist())
    assert sorted(seen) == rows.tolist()
    assert seen != sorted(seen)  # shuffled
    # a shuffled batch mixes several blocks of the pool, not one run of neighbours
    assert np.mean([len(np.unique(i // 45)) for i, _, _ in batches[:-1]]) >= 3
    assert [i.tolist() for i, _, _ in stream.epoch(1)] == [i.tolist() for i, _, _ in batches]  # seeded
    in_order = BlockStream(priors, rows, batch_size=32, block_rows=45, shuffle=False, seed=0, pool_blocks=4)
    assert np.concatenate([i for i, _, _ in in_order.epoch()]).tolist() == rows.tolist()
    priors.close()


@pytest.mark.parametrize(
    "dataset, task, expected",
    [
        ("celeba", "multilabel", "mean_accuracy"),  # the attribute protocol: mean accuracy, not the task's mean F1
        ("au", "multilabel", "mean_f1"),
        ("celeba", "classify", "accuracy"),
        ("lfw-subset", "regress", "mae"),  # a metric the task does not report: its primary
        ("csv", "classify", "accuracy"),
    ],
)
def test_selection_metric_follows_the_dataset_protocol(dataset, task, expected):
    from types import SimpleNamespace

    from etf.pipeline.fit.heads import TASKS, selection_metric

    t = TASKS[task]("t", ["a", "b"]) if task != "classify" else TASKS[task]("t", ["a"], ["x", "y"])
    assert selection_metric(t, SimpleNamespace(name=dataset)) == expected


# ---------------------------------------------------------------------------- splits


def _grouped(n_subjects: int = 12, frames: int = 5, splits: tuple[str, ...] = ("train",)):
    """A dataset of ``frames`` samples per subject, subjects dealt round robin to ``splits``."""
    from pathlib import Path

    from etf.data.base import Dataset, Sample
    from etf.pipeline.fit.heads import Classify

    samples = [
        Sample(f"s{s:02d}/{f}.png", Path("x.png"), splits[s % len(splits)], {"label": (s + f) % 2}, group=f"s{s:02d}")
        for s in range(n_subjects)
        for f in range(frames)
    ]
    dataset = Dataset("csv", Path("."), samples, classes={"label": ["a", "b"]}, group_by="subject")
    task = Classify("label", ["label"], ["a", "b"])
    y = np.array([[s.labels["label"]] for s in samples], dtype=np.float32)
    return dataset, task, y


def _splits(dataset, task, y, **kw):
    from etf.pipeline.fit.train import make_splits

    cfg = FitConfig(cache_dir="c", encoders=["A"], out="o", **kw)
    return make_splits(dataset, np.ones(len(dataset), bool), cfg, task, y)


def _subjects(dataset, rows) -> set[str]:
    return {dataset.samples[i].group for i in rows}


def test_hold_outs_keep_whole_subjects(tmp_path):
    dataset, task, y = _grouped(splits=("train", "train", "test"))
    s = _splits(dataset, task, y, val_fraction=0.25)
    assert not _subjects(dataset, s.train) & _subjects(dataset, s.val)
    assert len(_subjects(dataset, s.val)) == 2  # a quarter of the 8 training subjects, whole
    assert s.held_out == {"val": "25% of train by subject, seed 0"}
    low = _splits(dataset, task, y, val_fraction=0.25, train_fraction=0.5)
    assert len(low.train) == 15 and all(
        {i for i in range(len(dataset)) if dataset.samples[i].group == g} <= set(low.train)
        for g in _subjects(dataset, low.train)
    )  # whole subjects kept
    shots = _splits(dataset, task, y, val_fraction=0.25, shots=3)
    assert len(shots.train) == 6 and not set(shots.train) & set(shots.val)  # val is outside the K-shot pool
    assert not _subjects(dataset, shots.train) & _subjects(dataset, shots.val)


def test_no_test_split_is_refused_and_a_declared_one_is_named(tmp_path):
    dataset, task, y = _grouped(splits=("train", "train", "val"))
    with pytest.raises(
        EtfError, match="has no test split, and val does not stand in for one: declare one with --test-split"
    ):
        _splits(dataset, task, y)
    held = [_splits(dataset, task, y, test_split="holdout:0.25", seed=seed) for seed in (0, 1)]
    assert list(held[0].tests) == ["test_holdout"] and len(_subjects(dataset, held[0].tests["test_holdout"])) == 2
    # the test hold-out has its own seed: the same samples for every run of a grid
    assert held[0].tests["test_holdout"].tolist() == held[1].tests["test_holdout"].tolist()
    assert not _subjects(dataset, held[0].train) & _subjects(dataset, held[0].tests["test_holdout"])
    assert held[0].held_out["test_holdout"] == "25% of train by subject, seed 0"
    other = _splits(dataset, task, y, test_split="holdout:0.25:7")
    assert other.tests["test_holdout"].tolist() != held[0].tests["test_holdout"].tolist()
    as_test = _splits(dataset, task, y, test_split="val")
    val_rows = [i for i, s in enumerate(dataset.samples) if s.split == "val"]
    assert as_test.tests["test_val"].tolist() == val_rows and not set(as_test.val) & set(val_rows)
    assert "val" in as_test.held_out  # selection's val is a hold-out of train
    assert _splits(dataset, task, y, test_split="none").tests == {}
    for bad in ("holdout:1.5", "holdout:x", "half"):
        with pytest.raises(EtfError, match=f"--test-split '{bad}': use holdout:F"):
            _splits(dataset, task, y, test_split=bad)
    tested, task, y = _grouped(splits=("train", "test"))
    with pytest.raises(EtfError, match="--test-split holdout:0.2: .* has its own test split"):
        _splits(tested, task, y, test_split="holdout:0.2")


def test_several_test_subsets_are_also_evaluated_together():
    dataset, task, y = _grouped(splits=("train", "test_common", "train", "test_challenging"))
    s = _splits(dataset, task, y)
    assert list(s.tests) == ["test", "test_common", "test_challenging"]
    assert s.tests["test"].tolist() == sorted([*s.tests["test_common"], *s.tests["test_challenging"]])


def test_a_nan_val_score_never_stays_the_best():
    from etf.cache.features import Group
    from etf.cache.tokens import TokenLayout
    from etf.pipeline.fit.heads import Classify
    from etf.pipeline.fit.train import _Member, _score

    task = Classify("label", ["label"], ["a", "b"])
    cfg = FitConfig(cache_dir="c", encoders=["A"], out="o", fuser="linear", epochs=3)
    member = _Member(cfg, [Group(0, "A", 1, TokenLayout(1, (2, 2)), 8)], [task], 1, torch.device("cpu"))
    for epoch, accuracy in enumerate([float("nan"), 0.6, 0.5]):
        val = {"label": {"accuracy": accuracy}}
        member.end_epoch(epoch, 1, 1.0, val, (np.arange(2), {}), _score(task, "accuracy", val))
    assert member.best_val[0]["label"]["accuracy"] == 0.6


def test_fit_without_a_test_split_refuses_in_one_line_and_names_a_declared_one(tmp_path):
    import csv

    from click.testing import CliRunner

    from etf.cli import main

    n = 60
    rng = np.random.default_rng(0)
    s = rng.choice([-1.0, 1.0], n)
    dataset, spec = make_csv_dataset(tmp_path / "d", {"label": (s > 0).astype(float)}, np.array(["train", "val"] * 30))
    import_prior(tmp_path / "c", dataset, "A", planted_tokens(rng, s, 3.0), tmp_path)
    args = ["fit", "--data", spec, "--cache", str(tmp_path / "c"), "--encoders", "A", "--task", "classify:label"]
    args += ["--epochs", "1", "--dim", "16", "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "r0")])
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1 and len(errors) == 1 and "--test-split holdout:0.2" in errors[0]
    assert not (tmp_path / "r0").exists()
    result = CliRunner().invoke(main, [*args, "--test-split", "holdout:0.25", "--out", str(tmp_path / "r1")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "r1" / "metrics.json").read_text())
    assert "test" not in metrics and metrics["test_holdout"]["label"]["accuracy"] >= 0
    assert metrics["held_out"] == {"test_holdout": "25% of train by sample, seed 0"}
    assert metrics["splits"]["test_holdout"] == 8  # a quarter of the 30 training samples
    with open(tmp_path / "r1" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["split"] for r in rows} == {"val", "test_holdout", "test_holdout:canonical"}
    held = [r for r in rows if r["split"] == "test_holdout"]
    assert len(held) == 8  # the metric is over exactly the held-out samples' predictions
    assert metrics["test_holdout"]["label"]["accuracy"] == pytest.approx(
        np.mean([r["label_true"] == r["label_pred"] for r in held])
    )
    assert "test_holdout" in result.output and "held out test_holdout: 25% of train by sample, seed 0" in result.output
