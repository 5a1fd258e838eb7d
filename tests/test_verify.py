"""verify: identity embeddings from priors that each know half of an identity; the k-fold
protocol against a direct computation; run outputs, predict --embed, and bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from etf.errors import EtfError
from etf.pipeline.fit.fusers import FuserConfig
from etf.pipeline.fit.metrics import verification_metrics
from etf.pipeline.fit.predict import embed_dataset
from etf.pipeline.fit.train import FitConfig, fit
from etf.pipeline.fit.verification import with_options
from tests.synthetic import D, T, import_prior, make_csv_dataset

TASK = "verify:identity?dim=32&s=30&m=0.3"
PER_ID = 8


def identity_splits(n_ids: int) -> np.ndarray:
    """60 training identities, then 10 val and the rest test: disjoint by construction."""
    identity = np.arange(n_ids * PER_ID) // PER_ID
    return np.where(identity < 60, "train", np.where(identity < 70, "val", "test"))


def identity_cache(tmp, n_ids: int = 100, noise: float = 0.6, seed: int = 0):
    """Each identity has a fixed 16-d code; prior A's tokens carry its first quarter, prior B's
    the rest, each along its own random orthonormal basis, plus per-token noise: the
    canonical prior A alone tells identities apart only roughly."""
    rng = np.random.default_rng(seed)
    identity = np.arange(n_ids * PER_ID) // PER_ID
    dataset, _ = make_csv_dataset(tmp / "ids", {"identity": identity.astype(float)}, identity_splits(n_ids))
    code = rng.normal(size=(n_ids, D))
    cache, tokens = tmp / "cache", {}
    for name, part in (("A", code[:, : D // 4]), ("B", code[:, D // 4 :])):
        basis = np.linalg.qr(rng.normal(size=(D, part.shape[1])))[0].T
        noisy = (part[identity] @ basis)[:, None, :] + rng.normal(scale=noise, size=(len(identity), T, D))
        tokens[name] = noisy.astype(np.float32)
        import_prior(cache, dataset, name, tokens[name], tmp)
    return dataset, cache, tokens


def _fit(dataset, cache, out, encoders=("A", "B"), fuser="etfuser", epochs=20, tasks=(TASK,), **kw):
    cfg = FitConfig(
        cache_dir=cache,
        encoders=list(encoders),
        out=out,
        fuser=fuser,
        epochs=epochs,
        batch_size=64,
        lr=3e-3,
        fuser_config=FuserConfig(dim=64, depth=2, heads=4, prior_tokens="all", head="pooled"),  # token-level
        progress=False,
        tasks=list(tasks),
        **kw,
    )
    return fit(dataset, cfg).metrics


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    return identity_cache(tmp_path_factory.mktemp("ids"))


# ---------------------------------------------------------------------------- the protocol


def _direct_fold_accuracy(scores, same, folds):
    """The LFW protocol by brute force: every training score as a threshold, ties to the highest."""
    out = []
    for k in range(10):
        train, test = folds != k, folds == k
        candidates = np.sort(np.unique(scores[train]))[::-1]
        accuracy = [np.mean((scores[train] >= t) == same[train]) for t in candidates]
        t = candidates[int(np.argmax(accuracy))]
        out.append(np.mean((scores[test] >= t) == same[test]))
    return out


def _direct_tar(scores, same, far):
    """TAR at FAR from the sorted mismatched scores: accept above the (k+1)-th highest, k = floor(far * n)."""
    negatives = np.sort(scores[same == 0])[::-1]
    allowed = int(np.floor(far * len(negatives)))
    return np.mean(scores[same == 1] > negatives[allowed])


def _pairs(rng, matched, mismatched, decimals=None):
    same = np.r_[np.ones(matched, int), np.zeros(mismatched, int)]
    scores = np.where(same == 1, rng.normal(1.5, 1.0, len(same)), rng.normal(0.0, 1.0, len(same)))
    folds = np.r_[np.arange(matched) % 10, np.arange(mismatched) % 10]
    return (scores if decimals is None else scores.round(decimals)), same, folds


def test_k_fold_protocol_matches_a_brute_force_search():
    scores, same, folds = _pairs(np.random.default_rng(0), 300, 300, decimals=1)  # rounded: ties included
    m = verification_metrics(scores, same, folds)
    direct = _direct_fold_accuracy(scores, same, folds)
    assert m["fold_accuracy"] == pytest.approx(direct)
    assert m["accuracy_10fold"] == pytest.approx(np.mean(direct))
    assert m["accuracy_10fold_std"] == pytest.approx(np.std(direct))
    assert m["auc"] == pytest.approx(roc_auc_score(same, scores))
    assert m["pairs"] == 600 and "tar@far=1e-3" not in m  # 300 mismatched pairs cannot resolve 1e-3


@pytest.mark.parametrize("mismatched", [3000, 20000])
def test_tar_at_far_matches_the_sorted_mismatched_scores(mismatched):
    scores, same, folds = _pairs(np.random.default_rng(1), 3000, mismatched)
    m = verification_metrics(scores, same, folds)
    assert m["tar@far=1e-3"] == pytest.approx(_direct_tar(scores, same, 1e-3))
    fpr, tpr, _ = roc_curve(same, scores)
    assert m["tar@far=1e-3"] == pytest.approx(np.interp(1e-3, fpr, tpr), abs=0.02)
    assert ("tar@far=1e-4" in m) == (mismatched >= 10000)  # reported only when resolved
    if "tar@far=1e-4" in m:
        assert m["tar@far=1e-4"] == pytest.approx(_direct_tar(scores, same, 1e-4))


def test_margins_shift_only_the_target_logit():
    import torch

    from etf.pipeline.fit.verification import margin_logits

    cos = torch.tensor([[0.8, 0.1, -0.3], [-0.95, 0.2, 0.4]])
    labels = torch.tensor([0, 0])
    arc = margin_logits(cos, labels, "arcface", s=10.0, m=0.5)
    assert arc[0, 0] == pytest.approx(10 * np.cos(np.arccos(0.8) + 0.5), rel=1e-5)
    assert arc[1, 0] == pytest.approx(10 * (-0.95 - 0.5 * np.sin(0.5)), rel=1e-5)  # past pi - m: stays monotonic
    cosface = margin_logits(cos, labels, "cosface", s=10.0, m=0.35)
    assert cosface[:, 0].tolist() == pytest.approx([10 * 0.45, 10 * -1.3])
    for logits in (arc, cosface):
        assert torch.allclose(logits[:, 1:], 10 * cos[:, 1:])


# ---------------------------------------------------------------------------- fitting


def test_ensemble_token_joins_identity_halves_from_two_priors(ids, tmp_path):
    dataset, cache, _ = ids
    both = _fit(dataset, cache, tmp_path / "etf")
    linear = _fit(dataset, cache, tmp_path / "lin", fuser="linear")
    acc = lambda m: m["test"]["identity"]["accuracy_10fold"]  # noqa: E731
    print(f"10-fold accuracy: etfuser {acc(both):.3f}, linear {acc(linear):.3f}")
    assert acc(both) > 0.9
    assert acc(both) > acc(linear) + 0.05
    assert both["test"]["identity"]["auc"] > linear["test"]["identity"]["auc"]
    folds = both["test"]["identity"]["fold_accuracy"]
    assert len(folds) == 10 and np.mean(folds) == pytest.approx(acc(both))

    run = tmp_path / "etf"
    embeddings = np.load(run / "embeddings-identity.npy")
    names = (run / "embeddings-identity.txt").read_text().split()
    splits = dict(zip(dataset.ids, dataset.splits))
    assert embeddings.shape == (len(names), 32) and all(splits[n] in ("val", "test") for n in names)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert open(run / "predictions.csv").readline().strip() == "id,split,identity_true"
    task = json.loads((run / "config.json").read_text())["tasks"][0]
    assert (task["kind"], task["dim"], task["margin"], task["s"], task["m"], task["identities"]) == (
        "verify",
        32,
        "arcface",
        30.0,
        0.3,
        60,
    )
    assert "accuracy_10fold" in (run / "summary.txt").read_text()


def test_protocol_pairs_drive_the_test_and_predict_reproduces_them(ids, tmp_path):
    """Test pairs given by the dataset are the ones evaluated; embedding the cached dataset
    with the trained run (as for a run trained on another set) gives the same numbers."""
    dataset, cache, tokens = ids
    test = [i for i, s in enumerate(dataset.splits) if s == "test"]
    rng = np.random.default_rng(1)
    a, b = rng.choice(test, 400), rng.choice(test, 400)
    labels = dataset.column("identity")
    pairs = {
        "a": [dataset.ids[i] for i in a],
        "b": [dataset.ids[i] for i in b],
        "same": [int(labels[i] == labels[j]) for i, j in zip(a, b)],
    }
    pairs["same"][:20] = [1] * 20
    pairs["b"][:20] = pairs["a"][:20]  # identical images: matched for sure, and at least ten of them
    with_pairs = dataclasses.replace(dataset, pairs={"test": pairs})
    assert with_pairs.key != dataset.key
    for name in ("A", "B"):
        import_prior(cache, with_pairs, name, tokens[name], tmp_path)
    m = _fit(with_pairs, cache, tmp_path / "run", epochs=3)
    assert m["test"]["identity"]["pairs"] == 400
    got = embed_dataset(tmp_path / "run", with_pairs, cache, tmp_path / "emb", device="cpu")
    want, have = m["test"]["identity"], got["identity"]["test"]
    assert have.pop("fold_accuracy") == pytest.approx(want.pop("fold_accuracy"))
    assert have == pytest.approx(want)
    assert json.loads((tmp_path / "emb" / "metrics.json").read_text())["identity"]["test"]["pairs"] == 400
    assert len(np.load(tmp_path / "emb" / "embeddings-identity.npy")) == len(dataset)


def test_val_is_held_out_by_whole_identities(ids, tmp_path):
    dataset, _, tokens = ids
    no_val = np.where(np.array(dataset.splits) == "val", "train", dataset.splits)
    data, _ = make_csv_dataset(tmp_path / "d", {"identity": np.array(dataset.column("identity"), float)}, no_val)
    import_prior(tmp_path / "c", data, "A", tokens["A"], tmp_path)
    m = _fit(data, tmp_path / "c", tmp_path / "run", encoders=["A"], epochs=1, val_fraction=0.2)
    assert m["splits"]["val"] == 14 * PER_ID  # 20% of 70 training identities, each whole
    assert m["val"]["identity"]["accuracy_10fold"] > 0
    assert len(m["val"]["identity"]["fold_accuracy"]) == 10 and m["val"]["identity"]["pairs"] >= 20


# ---------------------------------------------------------------------------- bad input


def _tiny(tmp_path, identity, splits, pairs=None):
    data, _ = make_csv_dataset(tmp_path / "d", {"identity": np.asarray(identity, float)}, np.asarray(splits))
    if pairs is not None:
        data = dataclasses.replace(data, pairs=pairs)
    rng = np.random.default_rng(0)
    import_prior(tmp_path / "c", data, "A", rng.normal(size=(len(splits), T, D)).astype(np.float32), tmp_path)
    return data


def _refused(data, tmp_path, message, task=TASK):
    with pytest.raises(EtfError, match=message):
        _fit(data, tmp_path / "c", tmp_path / "run", encoders=["A"], epochs=1, tasks=[task])


def test_identity_shared_by_train_and_test_is_refused(tmp_path):
    identity = np.arange(240) // 8
    splits = np.where(identity < 20, "train", np.where(identity < 25, "val", "test"))
    splits[-1] = "train"  # one image of a test identity in train
    _refused(_tiny(tmp_path, identity, splits), tmp_path, r"identity '29' is in both train and test \(1 shared\)")


def test_single_image_identities_only_is_refused(tmp_path):
    identity = np.r_[np.arange(100), 100 + np.arange(80) // 4]  # 100 one-image training identities
    splits = np.r_[["train"] * 100, ["val"] * 40, ["test"] * 40]
    _refused(_tiny(tmp_path, identity, splits), tmp_path, "every training identity has a single sample")


def test_split_too_small_for_ten_folds_is_refused(tmp_path):
    identity = np.r_[np.arange(80) // 4, 20 + np.arange(6) // 3]
    splits = np.r_[["train"] * 80, ["val"] * 6]
    data = _tiny(tmp_path, identity, splits)
    message = "val split: 4 matched and 4 mismatched pairs; the 10-fold protocol needs at least 10"
    with pytest.raises(EtfError, match=message):
        _fit(data, tmp_path / "c", tmp_path / "run", encoders=["A"], epochs=1, test_split="none")


def test_protocol_pair_without_a_usable_sample_is_refused(tmp_path):
    identity = (np.arange(160) // 4).astype(float)
    splits = np.r_[["train"] * 80, ["val"] * 40, ["test"] * 40]
    ids = [f"img/{i:04d}.png" for i in range(160)]  # make_csv_dataset's naming
    pairs = {"test": {"a": ids[120:140], "b": ids[140:160], "same": [0, 1] * 10, "fold": list(range(10)) * 2}}
    identity[125] = np.nan  # an unlabelled sample that the protocol needs
    data = _tiny(tmp_path, identity, splits, pairs)
    _refused(
        data, tmp_path, r"test split: pair 6 of its protocol names 'img/0125.png', which .* has no 'identity' label"
    )


def test_pair_naming_a_sample_outside_its_split_is_refused(tmp_path):
    with pytest.raises(
        EtfError, match=r"pairs of split 'test': pair 1 names 'img/0000.png', which is not a test sample"
    ):
        _tiny(
            tmp_path,
            np.arange(20) // 2,
            identity_splits(3)[:20],
            {"test": {"a": ["img/0000.png"], "b": ["img/0019.png"], "same": [0]}},
        )


@pytest.mark.parametrize(
    "task,message",
    [
        ("verify:identity?margin=softmax", "margin 'softmax': use arcface or cosface"),
        ("verify:identity?dim=x", "option dim='x' is not a valid int"),
        ("verify:identity?scale=3", "verify has no option 'scale' .options: dim, margin, s, m."),
        ("classify:identity?dim=3", "classify has no option 'dim'$"),
        ("verify:identity?s=-1", "need dim >= 1, s > 0 and m >= 0"),
    ],
)
def test_bad_task_options_are_refused(tmp_path, task, message):
    _refused(_tiny(tmp_path, np.arange(40) // 4, identity_splits(5)[:40]), tmp_path, message, task=task)


def test_margin_flags_apply_to_verify_tasks_only():
    assert with_options(["verify:id", "classify:x"], dim=8, margin="cosface", s=None, m=None) == [
        "verify:id?dim=8&margin=cosface",
        "classify:x",
    ]
    assert with_options(["verify:id?dim=4"], dim=8, margin=None, s=None, m=None) == ["verify:id?dim=4"]
    with pytest.raises(EtfError, match="apply to verify tasks; none in classify:x"):
        with_options(["classify:x"], dim=8)


def test_ablate_compares_verify_runs_by_their_fold_accuracies(ids, tmp_path):
    """etf ablate on a verify task: the metric is the 10-fold accuracy, and the comparison
    pairs each seed's ten fold accuracies with its baseline's: the folds are the test units
    of the bootstrap (the same folds in every seed), the seeds a level of their own; folds of
    different seeds are never pooled as if independent."""
    from etf.pipeline.ablate.grid import Grid, plan_grid, run_grid
    from etf.pipeline.ablate.stats import compare

    dataset, cache, _ = ids
    spec = f"csv:{cache.parent / 'ids' / 'data.csv'}"  # where identity_cache wrote it
    grid = Grid.from_settings(
        {
            "data": spec,
            "cache": cache,
            "out": tmp_path,
            "encoders": "A,B",
            "jobs": 2,  # one thread each: small batches do not wait on a second thread
            "subsets": "k=2",
            "tasks": [TASK],
            "fusers": "etfuser",
            "seeds": "0,1,2",
            "epochs": 12,
            "batch_size": 64,
            "lr": 3e-3,
            "dim": 64,
            "depth": 2,
            "heads": 4,
            "prior_tokens": "all",  # the token-level model, its heads on the class token
            "head": "pooled",
        }
    )
    plan = plan_grid(grid)
    assert (plan.metric.name, plan.metric.kind) == ("accuracy_10fold", "verify")
    assert run_grid(plan).failed == []
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["configuration"]: r for r in results["configurations"]}
    fused = rows["A+B etfuser"]
    folds = {}
    for r in results["runs"]:
        m = json.loads((Path(r["path"]) / "metrics.json").read_text())
        folds[(r["labels"]["subset"], r["labels"]["fuser"], r["labels"]["seed"])] = m["test"]["identity"][
            "fold_accuracy"
        ]
    terms = lambda acc: np.stack([acc, np.ones(len(acc))], axis=1)  # noqa: E731
    a = [terms(folds[("A+B", "etfuser", s)]) for s in (0, 1, 2)]
    b = [terms(folds[("A", "linear", s)]) for s in (0, 1, 2)]  # the baseline: the canonical prior, linear
    want = compare(a, b, lambda x: x[..., 0] / x[..., 1], bounds=(-1, 1))
    assert fused["test_units"] == 10 and fused["p"] == pytest.approx(want.p)
    assert fused["delta"] == pytest.approx(np.mean([x[:, 0] for x in a]) - np.mean([x[:, 0] for x in b]))
    assert fused["delta"] > 0.05 and fused["significant"] == "yes (better)"
    assert "the ten folds of the pair protocol" in (tmp_path / "report.md").read_text()
