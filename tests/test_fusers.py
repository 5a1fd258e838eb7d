"""The related fusers over the same cache: Q-Face, FRA, ET-Fuser + Q-Face, the recon objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from etf.cache.features import Group, PriorSet
from etf.cache.tokens import TokenLayout
from etf.errors import EtfError
from etf.pipeline.fit.fusers import FuserConfig, create_fuser
from etf.pipeline.fit.fusers.fra import sinkhorn
from etf.pipeline.fit.fusers.layers import group_shares, keeping_attention
from etf.pipeline.fit.heads import Classify, MultiLabel
from etf.pipeline.fit.predict import load_model
from etf.pipeline.fit.train import FusionModel, build_model
from tests.synthetic import D, T, import_prior, make_csv_dataset, standard_splits, xor_cache
from tests.test_fit import _fit

SMALL = FuserConfig(dim=64, depth=2, heads=4)
GROUPS = [Group(0, "A", 12, TokenLayout(1, (2, 2)), D), Group(1, "B", 12, TokenLayout(1, (2, 2)), D)]
acc = lambda m, task="label": m["test"][task]["accuracy"]  # noqa: E731


#: each fuser fitted on the XOR cache, with the auxiliary objective it offers where it has one
FITTED = {"linear": "none", "qface": "none", "etfuser+qface": "recon:0.5", "fra": "sinkhorn:0.1"}


@pytest.fixture(scope="module")
def xor_runs(tmp_path_factory):
    """The two-prior XOR cache, with linear and every new fuser fitted on it once."""
    tmp = tmp_path_factory.mktemp("xor_fusers")
    dataset, _, cache = xor_cache(tmp)
    runs = {}
    for fuser, aux in FITTED.items():
        cfg = FuserConfig(dim=64, depth=2, heads=4, aux=aux)
        runs[fuser] = (
            tmp / fuser,
            _fit(dataset, cache, tmp / fuser, ["A", "B"], fuser=fuser, epochs=8, fuser_config=cfg),
        )
    return dataset, cache, runs


@pytest.mark.parametrize("fuser", ["qface", "etfuser+qface", "fra"])
def test_fuser_combines_information_split_across_priors(xor_runs, fuser):
    _, _, runs = xor_runs
    metrics, linear = runs[fuser][1], runs["linear"][1]
    assert acc(linear) < 0.65
    assert acc(metrics) > 0.85
    assert metrics["fuser_params"] > linear["fuser_params"] and metrics["fuser_flops"] > 0


def test_fra_heatmaps_are_distributions_over_tokens_that_differ(xor_runs):
    dataset, cache, runs = xor_runs
    _, _, groups, model = load_model(runs["fra"][0])
    priors = PriorSet(cache, dataset, ["A", "B"])
    tokens = [t.float() for t in priors.load(np.arange(64))]
    priors.close()
    with torch.no_grad():
        heat = model.fuser.heatmaps(tokens)
    assert heat.shape == (64, 8, sum(g.tokens for g in groups))
    torch.testing.assert_close(heat.sum(dim=-1), torch.ones(64, 8))
    assert heat.std(dim=-1).mean() > 0.01  # not uniform over tokens
    assert (heat[:, 0] - heat[:, 1]).abs().max() > 0.01  # regions differ
    maps = model.fuser.attention_maps(tokens)
    assert list(maps) == [f"region{k}" for k in range(1, 9)]


def test_sinkhorn_balances_regions():
    torch.manual_seed(0)
    tokens = F.normalize(torch.randn(200, 8) + torch.tensor([2.0] + [0.0] * 7), dim=1)
    cos = tokens @ F.normalize(torch.randn(4, 8), dim=1).T
    assert F.softmax(cos / 0.05, dim=1).sum(dim=0).min() < 20  # unbalanced as they are
    q = sinkhorn(cos)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(200))
    torch.testing.assert_close(q.sum(dim=0), torch.full((4,), 50.0), rtol=0.1, atol=0)


def _tokens(b: int = 6) -> list[torch.Tensor]:
    return [torch.randn(b, g.tokens, g.dim) for g in GROUPS]


@pytest.mark.parametrize("fuser,aux", [("etfuser", "recon:0.5"), ("etfuser+qface", "recon:1"), ("fra", "sinkhorn:0.1")])
def test_auxiliary_loss_only_in_training_and_it_reaches_the_fuser(fuser, aux):
    torch.manual_seed(0)
    cfg = FuserConfig(dim=32, heads=4, aux=aux, prior_tokens="all" if aux.startswith("recon") else None)
    f = create_fuser(fuser, GROUPS, [Classify("label", ["label"], ["a", "b"])], cfg)
    tokens = _tokens()
    tokens[1][:2] = 0  # prior B missing for two samples: never a reconstruction target
    f.train()
    f(tokens)
    assert f.aux_loss is not None and f.aux_loss.item() > 0
    f.aux_loss.backward()
    trained = f.recon.pred if fuser != "fra" else f.key
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())
    f.eval()
    f(tokens)
    assert f.aux_loss is None


@pytest.mark.parametrize(
    "fuser,cfg,message",
    [
        ("qface", FuserConfig(aux="recon:1"), "the qface fuser offers no auxiliary objective"),
        ("etfuser", FuserConfig(aux="sinkhorn:1"), "the etfuser fuser offers recon:W"),
    ],
)
def test_auxiliary_objective_a_fuser_lacks_is_refused(fuser, cfg, message):
    with pytest.raises(EtfError, match=message):
        create_fuser(fuser, GROUPS, [Classify("label", ["label"], ["a", "b"])], cfg)


def test_fusers_without_attention_say_so():
    with pytest.raises(EtfError, match="the linear fuser has no attention maps"):
        create_fuser("linear", GROUPS, [Classify("label", ["label"], ["a", "b"])], SMALL).attention_maps(_tokens())


@pytest.mark.parametrize(
    "kw",
    [
        {"aux": "recon"},
        {"aux": "recon:0"},
        {"aux": "blur:1"},
        {"queries": "all"},
        {"regions": 0},
        {"temperature": 0.0},
        {"recon_ratio": 1.0},
    ],
)
def test_bad_fuser_options_are_refused(kw):
    with pytest.raises(EtfError):
        FuserConfig(**kw)


@pytest.mark.parametrize("fuser", ["qface", "etfuser+qface"])
def test_label_queries_per_label_or_per_task(fuser):
    tasks = [MultiLabel("attrs", ["smile", "glasses", "beard"]), Classify("expr", ["expr"], ["a", "b", "c"])]
    for queries, shape in (("label", (6, 3)), ("task", (6,))):
        torch.manual_seed(0)
        f = create_fuser(fuser, GROUPS, tasks, FuserConfig(dim=32, heads=4, queries=queries))
        model = FusionModel(f, tasks).eval()
        reps = f(_tokens())
        assert reps["attrs"].shape == (*shape, f.out_dim) and reps["expr"].shape == (6, f.out_dim)
        out = model(_tokens())
        assert out["attrs"].shape == (6, 3) and out["expr"].shape == (6, 3)
        names = [n for n in f.attention_maps(_tokens()) if n != "ensemble"]
        assert names == (
            ["attrs:smile", "attrs:glasses", "attrs:beard", "expr"] if queries == "label" else ["attrs", "expr"]
        )


def test_etfuser_qface_starts_at_the_single_prior_baseline():
    torch.manual_seed(0)
    tasks = [Classify("label", ["label"], ["a", "b"])]
    tokens = _tokens()
    both = create_fuser("etfuser+qface", GROUPS, tasks, SMALL).eval()
    linear = create_fuser("linear", GROUPS, tasks, SMALL).eval()
    torch.testing.assert_close(both(tokens)["label"], linear(tokens)["label"])


def test_qface_queries_move_to_the_stage_that_holds_their_task(tmp_path):
    """Two tasks, two layers of one prior, each layer holding one task's label along the same
    feature direction (and a third of t2's labels missing): a query that reads both layers
    alike sees s1 + s2 and can do neither task, so each task's query must come to read its
    own stage. One head and one decoder block, so that the choice shows in the query's
    attention (several heads could each take a stage); ``linear`` (the last layer) fails t1."""
    rng = np.random.default_rng(3)
    n = 500
    s1, s2 = rng.choice([-1.0, 1.0], n), rng.choice([-1.0, 1.0], n)
    t2 = (s2 > 0).astype(float)
    t2[rng.random(n) < 0.3] = np.nan
    dataset, _ = make_csv_dataset(tmp_path / "d", {"t1": (s1 > 0).astype(float), "t2": t2}, standard_splits(n))
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    layer = lambda s: rng.normal(size=(n, T, D)) + 1.5 * s[:, None, None] * direction  # noqa: E731
    cache = tmp_path / "cache"
    import_prior(
        cache, dataset, "P", np.stack([layer(s1), layer(s2)], axis=1).astype(np.float32), tmp_path
    )  # (N, L, T, D)
    tasks = ["classify:t1", "classify:t2"]
    cfg = FuserConfig(dim=64, depth=1, heads=1)
    m = _fit(
        dataset, cache, tmp_path / "q", ["P"], fuser="qface", layers="all", tasks=tasks, epochs=15, fuser_config=cfg
    )
    assert acc(m, "t1") > 0.9 and acc(m, "t2") > 0.9
    assert acc(_fit(dataset, cache, tmp_path / "lin", ["P"], fuser="linear", tasks=tasks, epochs=5), "t1") < 0.65

    config, task_objs, groups, model = load_model(tmp_path / "q")
    assert [g.layer for g in groups] == [1, 2]
    priors = PriorSet(cache, dataset, ["P"], layers="all")
    tokens = [t.float() for t in priors.load(np.nonzero(np.array(dataset.splits) == "test")[0])]
    priors.close()
    untrained = build_model("qface", groups, task_objs, cfg, config["seed"]).eval()
    before, after = (
        {k: group_shares(w, groups).mean(dim=0) for k, w in mod.fuser.attention_maps(tokens).items()}
        for mod in (untrained, model)
    )
    assert abs(before["t1"][0] - 0.5) < 0.05 and abs(before["t2"][1] - 0.5) < 0.05
    assert after["t1"][0] > 0.75 and after["t2"][1] > 0.75, after


@pytest.mark.parametrize("fuser", ["etfuser", "etfuser:pooled", "etfuser+qface", "qface", "fra"])
def test_weight_decay_spares_tokens_embeddings_gates_norms_and_biases(fuser):
    from etf.pipeline.fit.train import _optimizer

    tasks = [Classify("label", ["label"], ["a", "b"])]
    fuser, _, tokens = fuser.partition(":")  # etfuser: the token-level model with recon; :pooled the authors'
    recon = "etfuser" in fuser and not tokens
    cfg = FuserConfig(dim=32, depth=1, heads=2, aux="recon:0.5" if recon else "none", prior_tokens=tokens or "all")
    model = build_model(fuser, GROUPS, tasks, cfg, seed=0)
    decay, no_decay = _optimizer(model, 1e-3, 0.05).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert spared | decayed == set(names.values()) and not spared & decayed
    learned = {
        "etfuser": ["ensemble", "gate", "embed", "position", "placeholder"] if recon else ["ensemble"],
        "etfuser+qface": ["ensemble", "queries", "embed", "position"],
        "qface": ["queries", "embed", "position"],
        "fra": ["masks", "embed", "position"],
    }[fuser]
    for leaf in learned:
        assert any(n.endswith("." + leaf) for n in spared) and not any(n.endswith("." + leaf) for n in decayed), leaf
    assert all(n.endswith(("bias", "weight")) for n in decayed) and not any(n.endswith("bias") for n in decayed)
    assert any("blocks" in n or "decoder" in n or "key" in n for n in decayed)  # attention/MLP weights still decay


# ---------------------------------------------------------------------------- the token-level ET-Fuser
# Built from its class with an explicit config, so that these hold whatever ``--fuser etfuser`` defaults to.


def _token_level(**kw):
    from etf.pipeline.fit.fusers.etfuser import ETFuser

    torch.manual_seed(0)
    return ETFuser(
        GROUPS,
        [Classify("label", ["label"], ["a", "b"])],
        FuserConfig(dim=32, depth=2, heads=4, prior_tokens="all", fuse="gate", **kw),
    )


@pytest.mark.parametrize("attn", ["intra", "full"])
def test_intra_attention_keeps_each_prior_to_itself(attn):
    """attn=intra: prior A's tokens attend only to A's, through every block, so changing B's
    tokens leaves A's outputs exactly as they were; the ensemble token still reads both.
    attn=full: A's outputs move with B's tokens."""
    f = _token_level(attn=attn).eval()
    tokens = _tokens()
    other = [tokens[0], tokens[1] + torch.randn_like(tokens[1])]
    with torch.no_grad(), keeping_attention(*f.blocks):
        out, _ = f.encode(tokens)
        weights = [blk.attention for blk in f.blocks]
        moved, _ = f.encode(other)
    a = slice(1, 1 + GROUPS[0].tokens)  # A's positions, after the ensemble token
    b = slice(a.stop, None)
    assert not torch.allclose(out[:, 0], moved[:, 0])  # the ensemble token sees B
    assert all(w[:, :, 0, b].sum() > 0 for w in weights)
    if attn == "intra":
        torch.testing.assert_close(out[:, a], moved[:, a], rtol=0, atol=0)
        for w in weights:  # no weight from A's tokens to B's, nor to the ensemble token
            assert w[:, :, a, b].abs().max() == 0 and w[:, :, a, 0].abs().max() == 0
            torch.testing.assert_close(w[:, :, a, a].sum(dim=-1), torch.ones(6, 4, GROUPS[0].tokens))
    else:
        assert not torch.allclose(out[:, a], moved[:, a]) and all(w[:, :, a, b].sum() > 0 for w in weights)


def test_token_masking_drops_tokens_at_the_rate_in_training_only():
    """mask=token:0.3 zeroes each token with probability 0.3 while training (zero tokens are
    missing: never attended to), none at evaluation; mask=prior:0.3 zeroes whole priors."""
    seen = []

    def record(tokens):
        seen.append([t.clone() for t in tokens])
        return torch.zeros(tokens[0].shape[0], 1)

    for mask in ("token:0.3", "prior:0.3"):
        f = _token_level(mask=mask)
        f.fuse = record
        tokens = [torch.randn(4000, g.tokens, g.dim) + 3 for g in GROUPS]  # no token is zero
        f.train()
        f(tokens)
        f.eval()
        f(tokens)
        train, evaluation = seen[-2:]
        zero = [(t == 0).all(dim=-1) for t in train]  # (B, T) per group
        rate = torch.cat(zero, dim=1).float().mean().item()
        assert abs(rate - 0.3) < 0.02, (mask, rate)
        assert all(torch.equal(t, u) for t, u in zip(evaluation, tokens))  # nothing dropped at eval
        kept = [~z for z in zero]
        assert all(torch.equal(t[k], u[k]) for t, u, k in zip(train, tokens, kept))  # the rest untouched
        whole = all(bool(((z.all(dim=1)) | (~z).all(dim=1)).all()) for z in zero)
        assert whole == (mask == "prior:0.3")  # prior:P drops a prior's tokens together, token:P one by one


def test_plain_etfuser_starts_exactly_at_the_linear_probe():
    """The gate is zero at init: h = LN(c) + 0 * W t is the linear probe's LN(c), so with the
    same head weights the two models give the same logits before any training."""
    from etf.pipeline.fit.fusers.baselines import LinearProbe

    tasks = [Classify("label", ["label"], ["a", "b"])]
    etf = FusionModel(_token_level(), tasks).eval()
    linear = FusionModel(LinearProbe(GROUPS, tasks, SMALL), tasks).eval()
    linear.heads.load_state_dict(etf.heads.state_dict())
    assert etf.fuser.join.gate.abs().max() == 0
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(etf.fuser(tokens)["label"], linear.fuser(tokens)["label"], rtol=0, atol=0)
        torch.testing.assert_close(etf(tokens)["label"], linear(tokens)["label"], rtol=0, atol=0)
        assert (
            etf.fuser.ensemble_output(etf.fuser.encode(tokens)[0]).abs().sum() > 0
        )  # the ensemble token is there, gated off


def test_pooled_maps_cover_the_tokens_each_pooled_token_stands_for():
    """A pooled ET-Fuser's maps are over whole priors: spread back onto the tokens they pool
    (the class token under token pooling, the patches under avg), never drawn as a map."""
    tasks = [MultiLabel("au", ["a", "b"])]
    groups = [GROUPS[0], Group(1, "B", 12, TokenLayout(0, (2, 2)), D)]  # a ViT (class token) and a CNN (avg)
    model = build_model("etfuser+qface", groups, tasks, FuserConfig(dim=32, heads=4, prior_tokens="pooled"), seed=0)
    assert not model.fuser.maps_over_patches
    tokens = [torch.randn(3, g.tokens, g.dim) for g in groups]
    model.eval()
    for name, w in model.fuser.attention_maps(tokens).items():
        assert w.shape == (3, sum(g.tokens for g in groups)), name
        a, b = w.split([g.tokens for g in groups], dim=1)
        assert (a[:, 1:] == 0).all() and (b[:, 1:] == b[:, :1]).all()  # the class token; the patches alike
    assert build_model(
        "etfuser", groups, tasks, FuserConfig(dim=32, heads=4, prior_tokens="all"), 0
    ).fuser.maps_over_patches
