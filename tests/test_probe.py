"""etf probe: kNN and logreg as scikit-learn computes them, debiased CKA as defined, C chosen
on val alone, few-shot draws from train alone, bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.preprocessing import StandardScaler

from etf.cli import main
from etf.pipeline.fit.heads import parse_task
from etf.pipeline.probe import ProbeConfig, run_probe
from etf.pipeline.probe.cka import cka_gram, gram, pairwise_cka
from etf.pipeline.probe.knn import knn_predict
from etf.pipeline.probe.logreg import C_GRID, sweep
from etf.pipeline.probe.run import draw_shots
from tests.synthetic import D, T, import_prior, make_csv_dataset, standard_splits

TEMP = 0.07


def _clusters(rng, n: int, classes: int = 3, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(classes, size=n)
    centres = rng.normal(size=(classes, dim))
    return (centres[labels] + rng.normal(scale=1.5, size=(n, dim))).astype(np.float32), labels


def _vote_weights(distance: np.ndarray) -> np.ndarray:
    """sklearn's cosine distance is 1 - cos: exp(cos / T), dinov2's weights up to a constant."""
    return np.exp((1 - distance) / TEMP)


@pytest.mark.parametrize("budget", [1 << 26, 37])  # one chunk, and chunks of one query
def test_knn_equals_sklearn_with_temperature_weights(budget):
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, 300)
    q, _ = _clusters(np.random.default_rng(1), 50)
    target = x[:, :2] @ np.array([[1.0, -2.0], [0.5, 3.0]]) + rng.normal(size=(300, 2))
    classes = knn_predict(x, y, q, (10, 20), 3, budget=budget)
    values = knn_predict(x, target.astype(np.float32), q, (10, 20), None, budget=budget)
    for k in (10, 20):
        ref = KNeighborsClassifier(k, metric="cosine", weights=_vote_weights, algorithm="brute").fit(x, y)
        assert (classes[k][:, 0] == ref.predict(q)).all()
        reg = KNeighborsRegressor(k, metric="cosine", weights=_vote_weights, algorithm="brute").fit(x, target)
        np.testing.assert_allclose(values[k], reg.predict(q), rtol=1e-4, atol=1e-4)


def test_knn_mean_skips_neighbours_without_the_label():
    x = np.eye(4, dtype=np.float32)[[0, 0, 1, 1]] + 0.01
    y = np.array([[1.0], [5.0], [9.0], [9.0]], np.float32)
    m = np.array([[True], [False], [True], [True]])
    out = knn_predict(x, y, x[:1], (2,), None, m)
    assert out[2][0, 0] == pytest.approx(1.0)  # the unlabelled neighbour's 5 counts for nothing


def test_logreg_equals_sklearn_and_picks_c_on_val():
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, 400)
    vx, vy = _clusters(np.random.default_rng(1), 100)
    yy, m = y[:, None].astype(np.float32), np.ones((400, 1), bool)
    found, scaler = sweep("classify", (x, yy, m), vx, lambda p: float((p[:, 0] == vy).mean()))
    scores = {}
    for c in C_GRID:
        ref_scaler = StandardScaler().fit(x)
        ref = LogisticRegression(C=c, max_iter=1000).fit(ref_scaler.transform(x), y)
        scores[c] = (ref.predict(ref_scaler.transform(vx)) == vy).mean()
        if c == found.c:
            assert (found.probe.predict(scaler.transform(vx))[:, 0] == ref.predict(ref_scaler.transform(vx))).all()
    assert found.val_scores == pytest.approx(scores)
    assert found.c == max(sorted(scores), key=lambda c: scores[c])


def _gram_cka_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s debiased CKA: unbiased centring of each Gram (their ``center_gram``),
    then the normalised Frobenius product."""

    def centre(g: np.ndarray) -> np.ndarray:
        g = g.copy()
        n = len(g)
        np.fill_diagonal(g, 0)
        means = g.sum(0) / (n - 2) - g.sum() / (2 * (n - 1) * (n - 2))
        g -= means[:, None] + means[None, :]
        np.fill_diagonal(g, 0)
        return g

    kx, ky = centre(x @ x.T), centre(y @ y.T)
    return float((kx * ky).sum() / np.sqrt((kx * kx).sum() * (ky * ky).sum()))


def test_debiased_cka_matches_a_direct_implementation_and_its_limits():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 10))
    y = x[:, :4] @ rng.normal(size=(4, 7)) + rng.normal(size=(60, 7))
    got = float(cka_gram(gram(torch.from_numpy(x)), gram(torch.from_numpy(y))))
    assert got == pytest.approx(_gram_cka_direct(x, y), abs=1e-10)
    big = rng.normal(size=(600, 16)).astype(np.float32)
    rotation = np.linalg.qr(rng.normal(size=(16, 16)))[0].astype(np.float32)
    other = rng.normal(size=(600, 16)).astype(np.float32)
    pairs = pairwise_cka({"x": big, "rotated": 3 * big @ rotation + 1, "independent": other}, halves=50)
    assert pairs[("x", "rotated")].value == pytest.approx(1.0, abs=1e-5)
    independent = pairs[("x", "independent")]
    assert abs(independent.value) < 0.02
    assert independent.low <= 0 <= independent.high  # the interval covers the truth


def _probe_data(tmp: Path, test_labels: np.ndarray | None = None, n: int = 300):
    """label (3 classes) planted in prior A, age (real) planted in B; C is noise."""
    rng = np.random.default_rng(0)
    label = rng.integers(3, size=n).astype(float)
    age = rng.normal(40, 10, size=n)
    splits = standard_splits(n)
    if test_labels is not None:
        label[splits == "test"] = test_labels
    dataset, _ = make_csv_dataset(tmp / "data", {"label": label, "age": age}, splits)
    cache = tmp / "cache"
    planted = np.random.default_rng(1)
    centres = planted.normal(size=(3, D)) * 2
    a = planted.normal(size=(n, T, D)) + centres[label.astype(int)][:, None]
    b = planted.normal(size=(n, T, D)) + ((age - 40) / 10)[:, None, None] * planted.normal(size=D)
    c = planted.normal(size=(n, T, D))
    for name, tokens in (("A", a), ("B", b), ("C", c)):
        import_prior(cache, dataset, name, tokens.astype(np.float32), tmp)
    return dataset, cache, splits, label


def test_probe_reports_each_prior_in_the_fit_metrics_and_finds_the_planted_signal(tmp_path):
    dataset, cache, _, _ = _probe_data(tmp_path)
    cfg = ProbeConfig(cache, ["A", "B", "C"], tmp_path / "probe", ["classify:label", "regress:age"], ks=(10, 20))
    record = run_probe(dataset, cfg)

    def test_score(task, prior, method, metric):
        (row,) = [
            r
            for r in record["results"]
            if (r["task"], r["prior"], r["method"], r["config"], r["split"]) == (task, prior, method, "chosen", "test")
        ]
        return row["metrics"][metric]

    for method in ("knn", "logreg"):
        assert test_score("label", "A", method, "accuracy") > 0.8 > test_score("label", "C", method, "accuracy")
        assert test_score("age", "B", method, "mae") < 0.8 * test_score("age", "C", method, "mae")
    assert {"accuracy", "mean_class_accuracy", "macro_f1"} <= set(
        next(r for r in record["results"] if r["task"] == "label")["metrics"]
    )
    saved = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert saved["suggested_subsets"]["order"][0][0] == "A" and "heuristic" in saved["suggested_subsets"]["note"]
    assert {(e["a"], e["b"]) for e in saved["cka"]} == {("A", "B"), ("A", "C"), ("B", "C")}
    assert (tmp_path / "probe" / "cka.png").exists() and (tmp_path / "probe" / "score_vs_cka.png").exists()
    assert all(0 <= o["both_wrong"] + o["one_wrong"] <= 1 for o in saved["overlap"])


def test_the_chosen_c_never_depends_on_test_labels(tmp_path):
    n = 300
    test = standard_splits(n) == "test"
    chosen = []
    for k, perm in enumerate((None, np.random.default_rng(5).permutation(int(test.sum())))):
        labels = np.random.default_rng(0).integers(3, size=n).astype(float)[test]
        dataset, cache, _, _ = _probe_data(tmp_path / str(k), None if perm is None else labels[perm], n)
        cfg = ProbeConfig(cache, ["A", "C"], tmp_path / str(k) / "probe", ["classify:label"], methods=("logreg",))
        record = run_probe(dataset, cfg)
        chosen.append([(s["chosen"], s["val_scores"]) for s in record["selections"]])
    assert chosen[0] == chosen[1]


def test_few_shot_draws_are_seeded_and_from_train_only(tmp_path):
    dataset, cache, splits, label = _probe_data(tmp_path)
    task = parse_task("classify:label", dataset)
    y = task.targets(dataset)[0]
    train = np.nonzero(splits == "train")[0]
    draws = draw_shots(task, y, train, 4, seed=0, tries=3)
    assert [d.tolist() for d in draws] == [d.tolist() for d in draw_shots(task, y, train, 4, seed=0, tries=3)]
    assert len({tuple(d) for d in draws}) == 3  # each try its own draw
    for d in draws:
        assert set(d) <= set(train) and np.bincount(label[d].astype(int)).tolist() == [4, 4, 4]
    cfg = ProbeConfig(cache, ["A"], tmp_path / "probe", ["classify:label"], ks=(5, 10), shots=4, tries=3)
    row = next(r for r in run_probe(dataset, cfg)["results"] if r["config"] == "chosen" and r["split"] == "test")
    assert row["tries"] == 3 and set(row["std"]) == set(row["metrics"])


def _etf(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--task", "regress:age", "--method", "knn", "--k", "500"], "fewer than the smallest k"),
        (["--task", "classify:label", "--shots", "500"], "--shots 500: class"),
        (["--task", "classify:label", "--encoders", "A,missing"], "missing"),
        (["--task", "regress:age", "--shots", "2"], "need classify tasks"),
        (["--task", "classify:label", "--method", "knn,svm"], "--method"),
    ],
)
def test_bad_probe_input_is_one_line(tmp_path, extra, named):
    dataset, cache, _, _ = _probe_data(tmp_path)
    encoders = [] if "--encoders" in extra else ["--encoders", "A"]
    result = _etf("probe", "--data", dataset.describe(), "--cache", cache, *encoders, "--out", tmp_path / "p", *extra)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and named in lines[0], result.output
    assert not (tmp_path / "p" / "probe.json").exists()


def test_cka_interval_is_the_spread_of_half_sample_estimates():
    """The quadratic forms of the interval equal CKA recomputed on each half-sample's own Grams."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    y = x[:, :2] @ rng.normal(size=(2, 3)) + rng.normal(size=(40, 3))
    got = pairwise_cka({"x": x, "y": y}, seed=0, halves=5)[("x", "y")]
    draws = np.random.default_rng([0, 0xC4A])  # the draws pairwise_cka makes: the subset, then the halves
    rows = np.sort(draws.choice(40, 40, replace=False))
    halves = [draws.choice(40, 20, replace=False) for _ in range(5)]
    direct = np.array(
        [float(cka_gram(gram(torch.from_numpy(x[rows][h])), gram(torch.from_numpy(y[rows][h])))) for h in halves]
    )
    assert [got.low, got.high] == pytest.approx(got.value + np.percentile(direct - direct.mean(), [2.5, 97.5]))


def test_ablate_probe_puts_the_probes_and_solo_scores_into_the_report(tmp_path):
    dataset, cache, _, _ = _probe_data(tmp_path, n=200)
    out = tmp_path / "grid"
    result = _etf(
        "ablate", "--data", dataset.describe(), "--cache", cache, "--encoders", "A,C", "--subsets", "all",
        "--task", "classify:label", "--epochs", "2", "--probe", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "probe" / "probe.json").exists() and (out / "probe" / "cka.png").exists()
    report = (out / "report.md").read_text()
    section = report[report.index("## Probes: A, C") :]
    assert "![probe/cka.png](probe/cka.png)" in section
    rows = [line for line in section.splitlines() if line.startswith("| A+C")]
    record = json.loads((out / "probe" / "probe.json").read_text())
    solo = {
        r["prior"]: r["metrics"]["accuracy"]
        for r in record["results"]
        if (r["config"], r["split"], r["method"]) == ("chosen", "test", "knn")
    }
    assert rows and all(f"A {solo['A']:.4f}" in r and f"C {solo['C']:.4f}" in r for r in rows)


def test_features_are_each_prior_pooled_its_own_way_or_by_the_patch_mean(tmp_path):
    from etf.cache.features import PriorSet
    from etf.pipeline.probe.features import pooled_features

    n = 20
    dataset, _ = make_csv_dataset(tmp_path / "data", {"label": np.arange(n) % 2.0}, standard_splits(n))
    tokens = np.random.default_rng(0).normal(size=(n, T, D)).astype(np.float32)
    import_prior(tmp_path / "cache", dataset, "vit", tokens, tmp_path, pool=None)  # the class token
    import_prior(tmp_path / "cache", dataset, "cnn", tokens, tmp_path, pool="avg")
    rows = np.array([1, 4, 19])
    priors = PriorSet(tmp_path / "cache", dataset, ["vit", "cnn"])
    own, mean = pooled_features(priors, rows), pooled_features(priors, rows, "avg")
    priors.close()
    stored = tokens[rows].astype(np.float16).astype(np.float32)  # imported as float16
    np.testing.assert_allclose(own["vit"], stored[:, 0])
    np.testing.assert_allclose(own["cnn"], stored[:, 1:].mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean["vit"], own["cnn"])


def test_multilabel_probes_read_each_label_where_it_is_given(tmp_path):
    n = 240
    rng = np.random.default_rng(0)
    smile, glasses = rng.integers(2, size=n).astype(float), rng.integers(2, size=n).astype(float)
    glasses[rng.random(n) < 0.3] = np.nan  # a third unlabelled
    dataset, _ = make_csv_dataset(tmp_path / "data", {"smile": smile, "glasses": glasses}, standard_splits(n))
    signal = np.stack([2 * smile - 1, 2 * np.nan_to_num(glasses) - 1], axis=1)
    a = rng.normal(size=(n, T, D)) + 2 * (signal @ rng.normal(size=(2, D)))[:, None]
    import_prior(tmp_path / "cache", dataset, "A", a.astype(np.float32), tmp_path)
    import_prior(tmp_path / "cache", dataset, "C", rng.normal(size=(n, T, D)).astype(np.float32), tmp_path)
    cfg = ProbeConfig(tmp_path / "cache", ["A", "C"], tmp_path / "probe", ["multilabel:smile,glasses"], ks=(10, 20))
    record = run_probe(dataset, cfg)
    score = {
        (r["prior"], r["method"]): r["metrics"]["mean_accuracy"]
        for r in record["results"]
        if r["config"] == "chosen" and r["split"] == "test"
    }
    for method in ("knn", "logreg"):
        assert score[("A", method)] > 0.85 > 0.7 > score[("C", method)]
