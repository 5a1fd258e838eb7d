"""Each prior is read by its own pooling: a ViT's class token is never thrown away."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from sklearn.linear_model import LogisticRegression

from etf.cache.features import PriorSet
from etf.cache.importer import import_tokens
from etf.cache.store import TokenStore
from etf.cache.tokens import TokenLayout, legacy_pool, module_pool, pool_tokens, resolve_pool, select_tokens
from etf.errors import EtfError
from etf.pipeline.fit.config import FitConfig, FuserConfig
from etf.pipeline.fit.joint import fit_joint
from etf.pipeline.fit.mixing import JointConfig
from tests.synthetic import D, T, import_prior, make_csv_dataset, standard_splits
from tests.test_fit import _fit

N = 800
SMALL = FuserConfig(dim=64, heads=4)


@pytest.fixture(scope="module")
def class_token(tmp_path_factory):
    """Prior A holds the label only in its class token (its patches are noise); prior B is
    noise. Imported with the default pooling, which is the class token where there is one."""
    tmp = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    s = rng.choice([-1.0, 1.0], N)
    splits = standard_splits(N)
    dataset, spec = make_csv_dataset(tmp / "d", {"label": (s > 0).astype(float)}, splits)
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    a = rng.normal(size=(N, T, D)).astype(np.float32)
    a[:, 0] += (2.0 * s[:, None] * direction).astype(np.float32)
    cache = tmp / "cache"
    import_prior(cache, dataset, "A", a, tmp, pool=None)
    import_prior(cache, dataset, "B", rng.normal(size=(N, T, D)).astype(np.float32), tmp, pool=None)
    train, test = splits == "train", splits == "test"
    probe = LogisticRegression().fit(a[train, 0], s[train]).score(a[test, 0], s[test])
    return dataset, spec, cache, probe, tmp


def _acc(m: dict, split: str = "test") -> float:
    return m[split]["label"]["accuracy"]


@pytest.mark.parametrize("fuser", ["linear", "etfuser", "concat", "qface"])
def test_fusers_learn_a_signal_carried_only_by_the_class_token(class_token, tmp_path, fuser):
    dataset, _, cache, probe, _ = class_token
    priors = PriorSet(cache, dataset, ["A", "B"])
    priors.close()
    assert [g.layout.pool for g in priors.groups] == ["token", "token"]  # stated by the import: the class token
    m = _fit(dataset, cache, tmp_path / fuser, ["A", "B"], fuser=fuser, epochs=20, fuser_config=SMALL)
    assert probe > 0.95
    assert _acc(m) >= probe - 0.04, (fuser, _acc(m), probe)


def test_pool_override_reads_what_it_names(class_token, tmp_path):
    """--pool avg reads the noise patches (chance); token+avg holds the class token again."""
    dataset, _, cache, probe, _ = class_token
    cfg = FuserConfig(dim=64, heads=4, pool="avg")
    avg = _fit(dataset, cache, tmp_path / "avg", ["A"], fuser="linear", epochs=10, fuser_config=cfg)
    both = FuserConfig(dim=64, heads=4, pool="token+avg")
    joined = _fit(dataset, cache, tmp_path / "both", ["A"], fuser="linear", epochs=20, fuser_config=both)
    assert _acc(avg) < 0.65 and _acc(joined) >= probe - 0.05
    assert joined["fuser_params"] > avg["fuser_params"]  # a head over 2D, not D


def test_joint_fit_learns_the_class_token(class_token, tmp_path):
    dataset, spec, cache, probe, tmp = class_token
    rng = np.random.default_rng(1)
    s = rng.choice([-1.0, 1.0], N)
    other, _ = make_csv_dataset(tmp / "e", {"flag": (s > 0).astype(float)}, standard_splits(N))
    tokens = rng.normal(size=(N, T, D)).astype(np.float32)
    tokens[:, 0, 0] += 2.0 * s.astype(np.float32)
    import_prior(cache, other, "A", tokens, tmp, pool=None)
    import_prior(cache, other, "B", rng.normal(size=(N, T, D)).astype(np.float32), tmp, pool=None)
    cfg = FitConfig(
        cache_dir=cache,
        encoders=["A", "B"],
        out=tmp_path / "joint",
        tasks=["1=classify:label", "2=classify:flag"],
        epochs=20,
        batch_size=32,
        lr=2e-3,
        fuser_config=SMALL,
        progress=False,
    )
    (result,) = fit_joint([dataset, other], [cfg], JointConfig())
    by = result.checked().metrics["datasets"]
    assert by["csv1"]["test"]["label"]["accuracy"] >= probe - 0.04
    assert by["csv2"]["test"]["flag"]["accuracy"] > 0.9


def test_pool_tokens_by_pooling():
    x = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, -2.0], [0.0, 0.0], [5.0, 6.0]]])  # class + 2x2, one dropped
    layout = TokenLayout(1, (2, 2))
    assert layout.pool == "token"  # the default with a prefix
    torch.testing.assert_close(pool_tokens(x, layout, "token"), torch.tensor([[9.0, 9.0]]))
    torch.testing.assert_close(pool_tokens(x, layout, "avg"), torch.tensor([[3.0, 2.0]]))  # the zero token is absent
    torch.testing.assert_close(pool_tokens(x, layout, "max"), torch.tensor([[5.0, 6.0]]))
    torch.testing.assert_close(pool_tokens(x, layout, "avgmax"), torch.tensor([[4.0, 4.0]]))
    torch.testing.assert_close(pool_tokens(x, layout, "token+avg"), torch.tensor([[9.0, 9.0, 3.0, 2.0]]))
    torch.testing.assert_close(pool_tokens(torch.zeros(1, 5, 2), layout, "max"), torch.zeros(1, 2))
    # what a layout allows: no class token to read on a CNN, only the prefix token in a cls store
    assert TokenLayout(0, (2, 2)).pool == "avg" and TokenLayout(1, None, "avg").pool == "token"
    assert resolve_pool(TokenLayout(0, (2, 2)), "token+avg") == "avg"
    assert resolve_pool(TokenLayout(1, (2, 2), "avg"), None) == "avg"
    assert resolve_pool(TokenLayout(1, (2, 2)), "max") == "max"
    # read-time selections keep the pooling true: cls is the pooled token, patch has no class token
    cls, cls_layout = select_tokens(x, TokenLayout(1, (2, 2), "avg"), "cls")
    torch.testing.assert_close(cls[:, 0], torch.tensor([[3.0, 2.0]]))
    assert cls_layout == TokenLayout(1, None)
    assert select_tokens(x, layout, "patch")[1].pool == "avg"
    assert select_tokens(x, layout, "pool:1")[1].pool == "token"


def test_a_models_own_pooling_is_read_from_timm():
    assert module_pool(timm.create_model("vit_tiny_patch16_224", pretrained=False)) == ("token", None)
    assert module_pool(timm.create_model("resnet18", pretrained=False)) == ("avg", None)
    gap = timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="avg")
    assert module_pool(gap) == ("avg", None)
    pool, note = module_pool(timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="map"))
    assert pool == "token" and "'map'" in note  # attention pooling: the class token, and it says so
    assert legacy_pool("beit_base_patch16_224.in22k_ft_in22k_in1k", 1) == "avg"  # BEiT pools its patches
    assert legacy_pool("vit_base_patch16_224.augreg2_in21k_ft_in1k", 1) == "token"
    assert legacy_pool(None, 1) == "token" and legacy_pool("no_such_model", 0) == "avg"


def test_import_states_its_pooling_and_old_stores_get_their_encoders_default(tmp_path):
    rng = np.random.default_rng(0)
    dataset, _ = make_csv_dataset(tmp_path / "d", {"y": rng.choice([0.0, 1.0], 20)}, standard_splits(20))
    np.save(tmp_path / "t.npy", rng.normal(size=(20, T, D)).astype(np.float32))
    token = import_tokens(tmp_path / "c", dataset, "x", tmp_path / "t.npy")
    avg = import_tokens(tmp_path / "c", dataset, "x", tmp_path / "t.npy", pool="avg")
    with TokenStore.open(token) as a, TokenStore.open(avg) as b:
        assert a.layouts[1].pool == "token" and b.layouts[1].pool == "avg"
        assert a.attrs["spec_hash"] != b.attrs["spec_hash"]  # the pooling is part of what was imported
    np.save(tmp_path / "three.npy", rng.normal(size=(20, 3, D)).astype(np.float32))  # no square grid: all prefix
    with pytest.raises(EtfError, match="--pool avg: these tokens have 3 prefix token.s. and no patch grid"):
        import_tokens(tmp_path / "c", dataset, "z", tmp_path / "three.npy", pool="avg")
    # a store written before layouts said how they pool: its encoder's pooling (timm's BEiT: avg)
    with TokenStore.open(token) as store:
        attrs = {
            **store.attrs,
            "spec": {**store.attrs["spec"], "model": "beit_base_patch16_224"},
            "layouts": {"1": {"prefix": 1, "grid": [2, 2]}},
        }
        arrays = store._arrays
    old = TokenStore(store.path, attrs, arrays)
    assert old.layouts[1].pool == "avg" and old.attrs["layouts"]["1"]["pool"] == "avg"
