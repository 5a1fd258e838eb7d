"""ET-Fuser as its authors built it: the pooled formulation by hand, canonical-only inference,
spatial heads, Wing loss, a model soup, and the report's two inference modes."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from etf.cache.features import Group, PriorSet
from etf.cache.tokens import TokenLayout, select_tokens
from etf.cli import main
from etf.errors import EtfError
from etf.pipeline.fit.fusers import FuserConfig, create_fuser
from etf.pipeline.fit.heads import LandmarkHead, Landmarks, wing_loss
from etf.pipeline.fit.train import FusionModel
from tests.conftest import IMG, TINY_CNN, TINY_VIT, make_folder
from tests.synthetic import import_prior, make_csv_dataset, standard_splits, xor_cache
from tests.test_fit import _fit

LM = Landmarks("lm", ["lm0_x", "lm0_y"])


def _sinusoid(positions: int, dim: int) -> torch.Tensor:
    pos = torch.arange(float(positions))[:, None]
    angle = pos * 10000 ** (-torch.arange(0, dim, 2.0) / dim)
    code = torch.zeros(positions, dim)
    code[:, 0::2], code[:, 1::2] = torch.sin(angle), torch.cos(angle[:, : dim // 2])
    return code


def _authors_transformer(f, seq: torch.Tensor) -> torch.Tensor:
    """One of the authors' blocks and the final LayerNorm, written out from the weights:
    pre-LN attention without qkv bias or output projection, FFN at the token width."""
    blk, (b, s, d), h = f.blocks[0], seq.shape, f.cfg.heads
    x = F.layer_norm(seq, (d,), blk.norm1.weight, blk.norm1.bias)
    q, k, v = (t.reshape(b, s, h, d // h).transpose(1, 2) for t in (x @ blk.qkv.weight.T).chunk(3, dim=-1))  # no bias
    attn = ((q @ k.transpose(-1, -2)) / math.sqrt(d // h)).softmax(dim=-1) @ v
    seq = seq + attn.transpose(1, 2).reshape(b, s, d)
    x = F.layer_norm(seq, (d,), blk.norm2.weight, blk.norm2.bias)
    seq = seq + blk.mlp[3](F.gelu(blk.mlp[0](x)))
    return F.layer_norm(seq, (d,), f.norm.weight, f.norm.bias)


def test_pooled_formulation_by_hand():
    """Prior A (canonical): a class token and a 2x2 grid of width 4; prior B: a 3x3 CNN map of
    width 6. Each prior pooled as its model pools (A: its class token; B: the mean), zero-padded
    to 6, position codes added, one authors' block,
    the mean of the knowledge and canonical outputs through one Linear (6 -> 4) added over
    A's grid; canonical inference is that transformer over exactly [knowledge, A]."""
    groups = [Group(0, "A", 1, TokenLayout(1, (2, 2)), 4), Group(1, "B", 1, TokenLayout(0, (3, 3)), 6)]
    torch.manual_seed(0)
    f = create_fuser("etfuser", groups, [LM], FuserConfig(heads=2)).eval()
    resolved = {k: getattr(f.cfg, k) for k in ("prior_tokens", "fuse", "depth", "dropout", "mlp_ratio")}
    assert resolved == {"prior_tokens": "pooled", "fuse": "add", "depth": 1, "dropout": 0.2, "mlp_ratio": 1.0}
    assert (
        f.blocks[0].mlp[0].out_features == 6
        and isinstance(f.join_map.out, nn.Linear)
        and f.join_map.out.out_features == 4
    )
    assert 0 <= float(f.ensemble.detach().min()) and float(f.ensemble.detach().max()) < 1  # uniform, as theirs
    a, b = torch.randn(2, 5, 4), torch.randn(2, 9, 6)

    code = _sinusoid(3, 6)
    x, present = f.tokens_in([a, b])
    pooled = torch.stack([F.pad(a[:, 0], (0, 2)), b.mean(dim=1)], dim=1)  # A's class token, padded with zeros
    torch.testing.assert_close(x, pooled + code[1:])
    assert present.all()
    torch.testing.assert_close(x[:, 0, 4:], code[1, 4:].expand(2, 2))  # the padding holds the code alone

    knowledge = (f.ensemble[0, 0] + code[0]).expand(2, 1, 6)
    grid = a[:, 1:].transpose(1, 2).reshape(2, 4, 2, 2)  # token r * 2 + c at row r, column c
    grid = F.group_norm(grid, 1, f.map_in.norm.weight, f.map_in.norm.bias)  # over the whole map
    for infer, seq in (("all", torch.cat([knowledge, x], 1)), ("canonical", torch.cat([knowledge, x[:, :1]], 1))):
        out = _authors_transformer(f, seq)
        t = (f.join_map.out(out[:, 0]) + f.join_map.out(out[:, 1])) / 2  # the knowledge token's and A's outputs
        with torch.no_grad():
            torch.testing.assert_close(f([a, b], infer)["lm"], grid + t[..., None, None])
    with torch.no_grad():
        alone = f([a, b], "canonical")["lm"]
        torch.testing.assert_close(f([a, 7 * b], "canonical")["lm"], alone)  # B is not read at all
        torch.testing.assert_close(f([a, torch.zeros_like(b)])["lm"], alone)  # = B missing in the sequence
        assert not torch.allclose(f([a, b])["lm"], alone)
        # the knowledge token's attention on a pooled token goes to what was pooled: A's class
        # token alone, B's patches evenly
        weights = f.attention_maps([a, b])["ensemble"]
        assert weights.shape == (2, 5 + 9) and torch.all(weights[:, 1:5] == 0) and torch.all(weights[:, 0] > 0)
        torch.testing.assert_close(weights[:, 5:], weights[:, 5:6].expand(2, 9))
        assert float(weights.sum(dim=1).max()) < 1  # the rest is the knowledge token's own


def test_position_codes_and_the_output_map():
    groups = [Group(0, "A", 1, TokenLayout(0, (2, 2)), 8), Group(1, "B", 1, TokenLayout(1, None), 8)]
    single = create_fuser("etfuser", groups, [LM], FuserConfig(position_code="single"))
    pos = torch.arange(3.0)[:, None]
    torch.testing.assert_close(single.tokens_in.code[:, 0::2], torch.sin(pos).expand(3, 4))  # one frequency
    torch.testing.assert_close(single.tokens_in.code[:, 1::2], torch.cos(pos).expand(3, 4))
    standard = create_fuser("etfuser", groups, [LM], FuserConfig())
    torch.testing.assert_close(standard.tokens_in.code, _sinusoid(3, 8))
    assert isinstance(standard.join.out, nn.Identity)  # token width = canonical width: no Linear (theirs too)
    b = torch.randn(3, 1, 8)
    x, _ = standard.tokens_in([torch.randn(3, 4, 8), b])
    torch.testing.assert_close(x[:, 1], b[:, 0] + _sinusoid(3, 8)[2])  # a class-token store: that token


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"heads": 3}, "--heads 3: the pooled tokens' width 8"),
        ({"aux": "recon:1"}, "needs --prior-tokens all"),
        ({"head": "spatial"}, "--head spatial: the canonical prior A's tokens have no patch grid"),
    ],
)
def test_paper_settings_that_cannot_work_are_refused(kw, message):
    groups = [Group(0, "A", 1, TokenLayout(1, None if "head" in kw else (2, 2)), 8)]
    with pytest.raises(EtfError, match=message):
        create_fuser("etfuser", groups, [LM], FuserConfig(dim=24, **kw))


@pytest.mark.parametrize("bad", [{"prior_tokens": "some"}, {"fuse": "mul"}, {"head": "conv"}, {"dropout": 1.0}])
def test_bad_formulation_values_name_their_flag(bad):
    flag = "--" + next(iter(bad)).replace("_", "-")
    with pytest.raises(EtfError, match=flag):
        FuserConfig(**bad)


def test_wing_loss_against_its_formula():
    x = torch.tensor([-3.0, -0.1, -0.05, 0.0, 0.02, 0.0999, 0.1, 0.5, 2.0])
    w, e = 0.1, 2.0
    c = w - w * math.log(1 + w / e)
    expected = [w * math.log(1 + abs(v) / e) if abs(v) < w else abs(v) - c for v in x.tolist()]
    assert wing_loss(x, w, e).tolist() == pytest.approx(expected, rel=1e-6)
    assert float(wing_loss(torch.tensor(w - 1e-6), w, e)) == pytest.approx(
        float(wing_loss(torch.tensor(w), w, e)), abs=1e-7
    )  # continuous
    task = Landmarks("lm", ["lm0_x", "lm0_y"], mean=[1.0, 2.0], std=[2.0, 4.0])  # default: Wing, 0.1, 2
    out, y, m = torch.tensor([[0.1, -0.5]]), torch.tensor([[1.0, 4.0]]), torch.tensor([[True, True]])
    standardised_err = out - torch.tensor([[0.0, 0.5]])
    assert float(task.loss(out, y, m)) == pytest.approx(float(wing_loss(standardised_err, w, e).mean()))
    l1 = Landmarks("lm", ["lm0_x", "lm0_y"], mean=[1.0, 2.0], std=[2.0, 4.0], criterion="l1")
    assert float(l1.loss(out, y, m)) == pytest.approx(float(standardised_err.abs().mean()))
    with pytest.raises(EtfError, match="--loss 'l2'"):
        Landmarks("lm", ["lm0_x", "lm0_y"], criterion="l2")


@pytest.mark.parametrize(
    "model,tokens,size,layout",
    [
        (TINY_VIT, "all", IMG, TokenLayout(1, (2, 2))),  # class token + patch grid
        (TINY_VIT, "patch", IMG, TokenLayout(0, (2, 2))),  # the grid alone
        (TINY_CNN, "all", 2 * IMG, TokenLayout(0, (2, 2))),  # a CNN's last feature map
    ],
)
def test_spatial_heads_read_the_canonical_grid(model, tokens, size, layout):
    from etf.pipeline.extract.encoders import create_encoder

    encoder = create_encoder(model, pretrained=False, img_size=IMG if "vit" in model else None)
    [(x, stored)] = encoder.tokens(torch.randn(3, 3, size, size), encoder.resolve_layers(None))
    x, got = select_tokens(x, stored, tokens)
    assert got == layout
    groups = [Group(0, "P", 1, layout, x.shape[-1])]
    for fuser in ("linear", "etfuser"):
        torch.manual_seed(0)
        model_ = FusionModel(create_fuser(fuser, groups, [LM], FuserConfig()), [LM]).eval()
        assert isinstance(model_.heads["lm"], LandmarkHead) and model_.fuser.grid == (2, 2)
        with torch.no_grad():
            rep = model_.fuser([x])["lm"]
            assert rep.shape == (3, x.shape[-1], 2, 2) and model_([x])["lm"].shape == (3, 2)
            if fuser == "linear":  # the canonical grid alone, position (r, c) from token r * w + c
                norm = model_.fuser.canonical_in.norm
                patches = x[:, layout.prefix :]
                mean, std = patches.mean(dim=(1, 2)), patches.std(dim=(1, 2), correction=0)
                expected = (patches[:, 2] - mean[:, None]) / (std[:, None] ** 2 + norm.eps).sqrt()
                torch.testing.assert_close(rep[:, :, 1, 0], expected * norm.weight + norm.bias)
                if layout.prefix:  # prefix tokens are not on the grid
                    shifted = x.clone()
                    shifted[:, 0] += 5
                    torch.testing.assert_close(model_([shifted])["lm"], model_([x])["lm"])
    pooled = FusionModel(create_fuser("linear", groups, [LM], FuserConfig(head="pooled")), [LM])
    assert not isinstance(pooled.heads["lm"], LandmarkHead) and pooled.fuser.grid is None


@pytest.mark.parametrize("fuser", ["mean", "concat", "etfuser+qface", "qface", "fra"])
def test_every_fuser_gives_the_landmark_head_the_canonical_map(fuser):
    """A 2x2 ViT grid (canonical) and a 3x3 CNN map: mean and concat resample B's map to
    A's grid; the vector fusers add their representation over A's map, starting at linear's."""
    from etf.pipeline.fit.heads import Classify

    groups = [Group(0, "A", 1, TokenLayout(1, (2, 2)), 16), Group(1, "B", 1, TokenLayout(0, (3, 3)), 24)]
    tasks = [LM, Classify("label", ["label"], ["a", "b"])]
    tokens = [torch.randn(3, 5, 16), torch.randn(3, 9, 24)]
    torch.manual_seed(0)
    model = FusionModel(create_fuser(fuser, groups, tasks, FuserConfig(dim=32)), tasks).eval()
    linear = create_fuser("linear", groups, tasks, FuserConfig()).eval()
    assert isinstance(model.heads["lm"], LandmarkHead)
    with torch.no_grad():
        reps = model.fuser(tokens)
        assert reps["lm"].shape == (3, model.fuser.map_dim, 2, 2) and reps["label"].dim() == 2
        assert model.fuser.map_dim == {"mean": 32, "concat": 16 + 24}.get(fuser, 16)
        if fuser not in ("mean", "concat"):
            torch.testing.assert_close(reps["lm"], linear(tokens)["lm"])


def test_landmark_head_downsamples_like_the_authors_on_large_maps():
    head = LandmarkHead(16, (7, 7), 10)  # their 7x7 MobileOne map: 7 -> 4 -> 2
    assert head.linear.in_features == 128 * 2 * 2 and head(torch.randn(2, 16, 7, 7)).shape == (2, 10)
    assert LandmarkHead(16, (14, 14), 10).linear.in_features == 128 * 3 * 3  # a ViT-B/16 grid
    assert LandmarkHead(16, (1, 1), 10).linear.in_features == 128  # pool:1


def test_spatial_head_finds_where_a_landmark_lights_up(tmp_path):
    """Each of two landmarks lies in one cell of a 4x4 grid, and its feature lights up in that
    cell's token: pooling the grid keeps that the features are there, not where."""
    rng = np.random.default_rng(0)
    n, side, d = 400, 4, 16
    cells = rng.integers(0, side, size=(n, 2, 2))  # (sample, point, row/col)
    coords = cells + 0.5 + rng.uniform(-0.2, 0.2, size=cells.shape)
    labels = {f"lm{k}_{axis}": coords[:, k, 1 - j] for k in range(2) for j, axis in enumerate("xy")}
    dataset, _ = make_csv_dataset(tmp_path / "d", {**labels, "nme_norm": np.full(n, float(side))}, standard_splits(n))
    directions = np.linalg.qr(rng.normal(size=(d, 2)))[0].T
    tokens = rng.normal(scale=0.2, size=(n, side * side, d))
    for k in range(2):
        tokens[np.arange(n), cells[:, k, 0] * side + cells[:, k, 1]] += 3 * directions[k]
    import_prior(tmp_path / "cache", dataset, "G", tokens.astype(np.float32), tmp_path)
    nme = {}
    for head in ("spatial", "pooled"):
        m = _fit(
            dataset, tmp_path / "cache", tmp_path / head, ["G"], tasks=["landmarks:lm"], epochs=10,
            fuser_config=FuserConfig(head=head),
        )  # fmt: skip
        nme[head] = m["test"]["lm"]["nme"]
    print(f"NME on the test split: spatial head {nme['spatial']:.3f}, pooled head {nme['pooled']:.3f}")
    assert nme["spatial"] < 0.5 * nme["pooled"]


# ---------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
    """A tiny ViT extracted from images and a second prior imported as tokens; the authors'
    ET-Fuser fitted over both."""
    tmp = tmp_path_factory.mktemp("canonical")
    root = make_folder(tmp / "faces", train=6)
    args = ["--data", f"folder:{root}", "--cache", str(tmp / "cache")]
    r = CliRunner()
    res = r.invoke(
        main,
        ["extract", *args, "--encoder", TINY_VIT, "--no-pretrained", "--img-size", str(IMG), "--workers", "0"],
    )
    assert res.exit_code == 0, res.output
    from etf.data import load_dataset

    dataset = load_dataset(f"folder:{root}")
    rng = np.random.default_rng(0)
    import_prior(tmp / "cache", dataset, "B", rng.normal(size=(len(dataset), 5, 24)).astype(np.float32), tmp)
    res = r.invoke(
        main, ["fit", *args, "--encoders", f"{TINY_VIT},B", "--out", str(tmp / "run"), "--epochs", "2", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert "canonical prior alone:" in res.output and f"etfuser over {TINY_VIT}, B" in res.output
    return tmp, root, dataset


def test_predict_infer_canonical_runs_only_the_canonical_encoder(imported_run):
    from etf.pipeline.fit.predict import load_model

    tmp, root, dataset = imported_run
    rows = [r for r in csv.DictReader(open(tmp / "run" / "predictions.csv")) if r["split"] == "test:canonical"]
    images = [str(root / r["id"]) for r in rows]
    run = ["predict", "--run", str(tmp / "run"), *images, "--device", "cpu"]
    refused = CliRunner().invoke(main, run)
    assert (
        refused.exit_code == 1 and "prior 'B' was imported" in refused.output and "--infer canonical" in refused.output
    )
    out = CliRunner().invoke(main, [*run, "--infer", "canonical", "--json", str(tmp / "p.json")])
    assert out.exit_code == 0, out.output
    got = json.loads((tmp / "p.json").read_text())
    config, _, _, model = load_model(tmp / "run")
    assert [g["label"] for g in got] == [r["label_pred"] for r in rows]  # class names, as predict
    priors = PriorSet(tmp / "cache", dataset, config["encoders"])
    index = np.array([dataset.ids.index(r["id"]) for r in rows])
    rows_sorted = np.sort(index)
    at = torch.from_numpy(np.searchsorted(rows_sorted, index))
    tokens = [t[at] for t in priors.load(rows_sorted)]
    priors.close()
    with torch.no_grad():
        probs = model([t.float() for t in tokens], "canonical")["label"].softmax(-1).max(-1).values
    assert [g["label_confidence"] for g in got] == pytest.approx(probs.tolist(), abs=2e-3)
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    stores = json.loads((tmp / "run" / "stores.json").read_text())
    assert "test:canonical" in metrics and metrics["priors"] == [TINY_VIT, "B"]
    assert metrics["canonical_encoder_flops"] == stores[0]["info"]["flops_per_image"] > 0
    assert 0 < metrics["fuser_flops_canonical"] < metrics["fuser_flops"]


def test_a_run_whose_weights_are_another_model_is_one_line(imported_run, tmp_path):
    import shutil

    from etf.pipeline.fit.checksums import write_sums

    tmp, root, _ = imported_run
    shutil.copytree(tmp / "run", tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["fuser_config"]["prior_tokens"] = "all"  # as a run of the token-level model would say
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    write_sums(tmp_path / "run")  # as if fitted so: the files agree with their sums, not with each other
    out = CliRunner().invoke(
        main, ["predict", "--run", str(tmp_path / "run"), "--infer", "canonical", str(next(root.rglob("*.png")))]
    )
    assert out.exit_code == 1 and "model.safetensors does not hold the model config.json describes" in out.output


# ---------------------------------------------------------------------------- soup


@pytest.fixture
def checkpoints(tmp_path):
    import timm

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = timm.create_model(TINY_CNN, num_classes=0)
        model(torch.randn(2, 3, IMG, IMG))  # train-mode BatchNorm statistics, so they differ
        paths.append(tmp_path / f"task{seed}.pth")
        torch.save(model.state_dict(), paths[-1])
    return paths


def test_soup_is_the_uniform_average_and_records_every_source(checkpoints, folder_dataset, tmp_path):
    from etf.pipeline.extract.encoders import create_encoder

    souped = create_encoder(TINY_CNN, weights=checkpoints, img_size=IMG)
    a, b = (torch.load(p, weights_only=True) for p in checkpoints)
    for k, v in souped.model.state_dict().items():
        expected = (a[k] + b[k]) / 2 if v.is_floating_point() else a[k]  # num_batches_tracked: the first's
        torch.testing.assert_close(v, expected.to(v.dtype), rtol=0, atol=1e-6)
    singles = [create_encoder(TINY_CNN, weights=p, img_size=IMG).weights_sha256 for p in checkpoints]
    assert (
        souped.spec()["soup"] == [{"file": p.name, "weights_sha256": h} for p, h in zip(checkpoints, singles)]
        and souped.weights_sha256 not in singles
    )
    assert "soup" not in create_encoder(TINY_CNN, weights=checkpoints[0], img_size=IMG).spec()  # hashes unchanged

    base = ["extract", "--data", f"folder:{folder_dataset}", "--cache", str(tmp_path / "c"), "--encoder", TINY_CNN]
    weights = [w for p in checkpoints for w in ("--weights", str(p))]
    args = [*base, *weights, "--img-size", str(IMG), "--workers", "0"]
    twice = CliRunner().invoke(main, args)
    assert twice.exit_code == 2 and "--soup to average them" in twice.output
    res = CliRunner().invoke(main, [*args, "--soup"])
    assert res.exit_code == 0, res.output
    assert "soup source task1.pth" in res.output
    [store] = (tmp_path / "c").glob("*/resnet18-*.zarr")
    from etf.cache.store import TokenStore

    with TokenStore.open(store) as s:
        assert s.spec["soup"] == souped.spec()["soup"] and s.spec["weights_sha256"] == souped.weights_sha256


def test_soup_of_checkpoints_that_differ_is_refused(checkpoints, tmp_path):
    from etf.pipeline.extract.encoders import create_encoder

    state = torch.load(checkpoints[1], weights_only=True)
    key = "layer1.0.conv1.weight"
    for name, change in (("fewer", lambda s: s.pop(key)), ("wider", lambda s: s.update({key: torch.zeros(2, 2)}))):
        other = dict(state)
        change(other)
        torch.save(other, tmp_path / f"{name}.pth")
        with pytest.raises(
            EtfError, match="--soup: .*" + ("hold different tensors" if name == "fewer" else "is \\(64")
        ):
            create_encoder(TINY_CNN, weights=[checkpoints[0], tmp_path / f"{name}.pth"], img_size=IMG)


# ---------------------------------------------------------------------------- ablate


def test_grid_compares_the_formulations_and_both_inference_modes(tmp_path):
    from etf.pipeline.ablate.grid import Grid, plan_grid, run_grid

    _, spec, cache = xor_cache(tmp_path, n=80)
    settings = {
        "data": spec,
        "cache": cache,
        "out": tmp_path / "grid",
        "encoders": "A,B",
        "subsets": "k=2",
        "tasks": ["classify:label"],
        "fusers": "etfuser,concat",
        "prior_tokens": "pooled,all",
        "seeds": "0",
        "epochs": 2,
        "batch_size": 16,
        "dim": 16,
        "heads": 2,
        "metric_infer": "canonical",
    }
    plan = plan_grid(Grid.from_settings(settings))
    # the two ET-Fuser formulations, concat once (it reads neither), the linear baseline
    labels = sorted((p.labels["fuser"], str(p.labels["prior_tokens"])) for p in plan.points)
    assert labels == [("concat", "None"), ("etfuser", "all"), ("etfuser", "pooled"), ("linear", "None")]
    run_grid(plan)
    text = (tmp_path / "grid" / "report.md").read_text()
    assert "test label accuracy, canonical prior alone" in text and "## Inference modes" in text
    rows = {r["configuration"]: r for r in csv.DictReader(open(tmp_path / "grid" / "results.csv"))}
    pooled = rows["A+B etfuser prior_tokens=pooled"]
    assert float(pooled["mean"]) == pytest.approx(float(pooled["mean_all"]) + float(pooled["canonical_minus_all"]))
    assert float(rows["A linear"]["canonical_minus_all"]) == 0
