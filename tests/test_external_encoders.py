"""Priors that are not timm models: ONNX files through onnxruntime and modules from a user's
factory give the tokens of the model they hold, and go through extract, fit and predict."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from etf.cache.store import TokenStore
from etf.cli import main
from etf.errors import EtfError
from etf.pipeline.extract.encoders import create_encoder
from etf.utils import sha256_file
from tests.conftest import IMG, TINY_CNN, TINY_VIT, make_folder

pytest.importorskip("onnxruntime")

TOL = 1e-4  # fp32: onnxruntime and torch run the same graph with different kernels


class TinyNet(nn.Module):
    """A body that gives a feature map and a head that gives one vector per image."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def tiny_factory() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    return TinyNet(), {"size": IMG, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def not_a_module() -> str:
    return "a string"


class Scalar(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((1, 2, 3))


def scalar_factory() -> nn.Module:
    return Scalar()


def export(model: nn.Module, path, size: int = IMG, dynamic: bool = True) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            torch.zeros(1, 3, size, size),
            str(path),
            dynamo=False,  # the TorchScript exporter needs no onnxscript
            input_names=["image"],
            output_names=["embedding"],
            dynamic_axes={"image": {0: "n"}, "embedding": {0: "n"}} if dynamic else None,
        )


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    """A tiny random-init timm CNN and its ONNX export (pooled output: one token)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(TINY_CNN, pretrained=False, num_classes=0).eval()
    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    export(model, path)
    return model, path


def test_onnx_prior_gives_the_models_tokens(cnn_onnx):
    model, path = cnn_onnx
    enc = create_encoder(f"onnx:{path}")  # size from the graph's static input
    assert (enc.name, enc.data_config["input_size"], enc.spec()["weights_file"]) == ("cnn", (3, IMG, IMG), "cnn.onnx")
    x = torch.randn(3, 3, IMG, IMG)
    ((tokens, layout),) = enc.tokens(x, enc.resolve_layers(None))
    assert tokens.shape == (3, 1, 512) and layout.prefix == 1 and layout.grid is None  # (N, D): one token
    torch.testing.assert_close(tokens[:, 0], model(x), atol=TOL, rtol=0)


def test_onnx_intermediate_output_by_node_name_is_the_feature_map(cnn_onnx):
    """?output= names a node inside the graph: the graph's outputs are extended to it."""
    import onnx

    model, path = cnn_onnx
    last_relu = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Relu"][-1].name
    enc = create_encoder(f"onnx:{path}?output={last_relu},embedding")
    x = torch.randn(2, 3, IMG, IMG)
    ((grid, layout), (pooled, _)) = enc.tokens(x, [1, 2])
    fmap = model.forward_features(x)
    assert layout.grid == tuple(fmap.shape[2:]) and layout.prefix == 0
    torch.testing.assert_close(grid, fmap.flatten(2).transpose(1, 2), atol=TOL, rtol=0)
    torch.testing.assert_close(pooled[:, 0], model(x), atol=TOL, rtol=0)


def test_onnx_flops_are_counted_from_the_graph_like_torchs_counter(cnn_onnx):
    from torch.utils.flop_counter import FlopCounterMode

    model, path = cnn_onnx
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, IMG, IMG))
    _, flops = create_encoder(f"onnx:{path}").probe([1])
    assert flops == counter.get_total_flops()


def test_onnx_preprocessing_options_reach_the_data_config(cnn_onnx):
    _, path = cnn_onnx
    enc = create_encoder(f"onnx:{path}?mean=127.5&std=127.5&channels=bgr&name=arc")
    assert enc.name == "arc" and enc.data_config["mean"] == (0.5, 0.5, 0.5)
    assert enc.data_config["std"] == (0.5, 0.5, 0.5) and enc.spec()["model"].startswith("onnx:cnn.onnx?")
    enc2 = create_encoder(f"onnx:{path}?mean=0.1,0.2,0.3&channels=bgr")
    assert enc2.data_config["mean"] == (0.3, 0.2, 0.1)  # given in the model's (BGR) order


def test_onnx_graph_of_batch_one_runs_image_by_image(tmp_path):
    torch.manual_seed(0)
    net = TinyNet().eval()
    export(net, tmp_path / "fixed.onnx", dynamic=False)
    enc = create_encoder(f"onnx:{tmp_path / 'fixed.onnx'}?channels=bgr")
    x = torch.randn(3, 3, IMG, IMG)
    ((tokens, _),) = enc.tokens(x, [1])
    torch.testing.assert_close(tokens[:, 0], net(x.flip(1)), atol=TOL, rtol=0)


def test_py_prior_gives_its_forward_and_a_hooked_submodules_output():
    net, _ = tiny_factory()
    enc = create_encoder("py:tests.test_external_encoders:tiny_factory?output=body,")
    assert enc.name == "tiny_factory" and enc.data_config["input_size"] == (3, IMG, IMG)
    assert enc.spec()["model"] == "py:tests.test_external_encoders:tiny_factory?output=body,"
    assert enc.spec()["code_sha256"] == sha256_file(__file__)  # an edit of the factory's file: a new store
    x = torch.randn(2, 3, IMG, IMG)
    ((body, layout), (out, _)) = enc.tokens(x, [1, 2])
    assert layout.grid == (IMG // 2, IMG // 2)
    torch.testing.assert_close(body, net.body(x).flatten(2).transpose(1, 2))
    torch.testing.assert_close(out[:, 0], net(x))
    assert enc.spec()["weights_sha256"] == create_encoder("py:tests.test_external_encoders:tiny_factory").weights_sha256


def vit_factory() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(TINY_VIT, pretrained=False, img_size=IMG, num_classes=0)


def test_py_prior_of_sequence_tokens_maps_a_prefix_and_a_grid(tiny_vit, tmp_path):
    """(N, T, D) with prefix=1: the class token, then a square grid; the same tokens as the
    timm encoder of the same weights (its last block, before the final norm)."""
    torch.save(tiny_vit.model.state_dict(), tmp_path / "vit.pt")
    spec = f"py:tests.test_external_encoders:vit_factory?output=blocks.11&prefix=1&size={IMG}"
    enc = create_encoder(spec, weights=tmp_path / "vit.pt")
    x = torch.randn(2, 3, IMG, IMG)
    ((tokens, layout),) = enc.tokens(x, [1])
    assert (layout.prefix, layout.grid, layout.pool) == (1, (IMG // 16, IMG // 16), "token")
    assert enc.weights_sha256 == tiny_vit.weights_sha256
    ((want, _),) = tiny_vit.tokens(x, [12], norm=False)
    torch.testing.assert_close(tokens, want)


def test_py_prior_loads_weights_and_hashes_them(tmp_path):
    net = TinyNet()
    torch.nn.init.constant_(net.head.weight, 0.5)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    enc = create_encoder("py:tests.test_external_encoders:tiny_factory", weights=tmp_path / "w.pt")
    assert enc.spec()["weights_file"] == "w.pt"
    assert enc.weights_sha256 != create_encoder("py:tests.test_external_encoders:tiny_factory").weights_sha256
    x = torch.randn(1, 3, IMG, IMG)
    torch.testing.assert_close(enc.tokens(x, [1])[0][0][:, 0], net.eval()(x))


def test_entry_point_alias_names_a_factory(tmp_path, monkeypatch):
    dist = tmp_path / "facenets-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: facenets\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[etf.encoders]\ntinynet = tests.test_external_encoders:tiny_factory\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    enc = create_encoder("tinynet?output=body")
    assert enc.name == "tinynet" and enc.source == "py"
    assert enc.spec()["model"] == "py:tests.test_external_encoders:tiny_factory?output=body"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("onnx:{tmp}/missing.onnx", "ONNX file .* not found"),
        ("onnx:{tmp}/junk.onnx", "is not a valid ONNX model"),
        ("onnx:{cnn}?output=no_such_node", "output=no_such_node: no tensor or node of that name"),
        ("onnx:{cnn}?colour=bgr", "colour: not a onnx: option"),
        ("onnx:{cnn}?size=64", "size=64 but .* takes 32x32"),
        ("py:tests.test_external_encoders:not_a_module?size=8", r"returned str, not a torch.nn.Module"),
        ("py:tests.test_external_encoders:scalar_factory?size=8", r"has shape \(1,\): etf maps"),
        ("py:tests.test_external_encoders:tiny_factory?output=neck", "has no submodule 'neck'"),
        ("py:tests.no_such_module:f", "cannot import tests.no_such_module"),
    ],
)
def test_bad_external_encoders_are_one_clear_line(spec, message, cnn_onnx, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(EtfError, match=message) as e:
        create_encoder(spec.format(tmp=tmp_path, cnn=cnn_onnx[1]))
    assert "\n" not in str(e.value)


def test_onnx_prior_extracts_fits_and_predicts_again(cnn_onnx, tmp_path):
    """The store is keyed by the file's bytes; predict recomputes the prior from the file."""
    _, path = cnn_onnx
    root = make_folder(tmp_path / "faces", train=6)
    args = ["--data", f"folder:{root}", "--cache", str(tmp_path / "cache")]
    r = CliRunner()
    res = r.invoke(main, ["extract", *args, "--encoder", f"onnx:{path}?name=cnnx", "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    (store,) = (tmp_path / "cache").glob("*/cnnx-*.zarr")
    with TokenStore.open(store) as s:
        spec, flops = s.spec, s.attrs["info"]["flops_per_image"]
    assert flops > 0
    assert (spec["source"], spec["precision"], spec["weights_file"]) == ("onnx", "fp32", "cnn.onnx")
    out = tmp_path / "run"
    res = r.invoke(main, ["fit", *args, "--encoders", "cnnx", "--out", str(out), "--epochs", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = [row for row in csv.DictReader(open(out / "predictions.csv")) if row["split"] == "test"]
    images = [str(root / row["id"]) for row in rows]
    res = r.invoke(main, ["predict", "--run", str(out), *images, "--device", "cpu"])
    assert res.exit_code != 0 and "--weights cnnx=FILE" in res.output
    pred = tmp_path / "p.json"
    res = r.invoke(main, ["predict", "--run", str(out), *images, "--weights", f"cnnx={path}", "--json", str(pred)])
    assert res.exit_code == 0, res.output
    assert [g["label"] for g in json.loads(pred.read_text())] == [row["label_pred"] for row in rows]


def test_onnx_prior_in_shards_with_views_equals_one_process(cnn_onnx, tmp_path):
    """Like any encoder: two --shard processes with --views write what one process writes."""
    _, path = cnn_onnx
    root = make_folder(tmp_path / "faces", train=4, val=1, test=1)
    r = CliRunner()
    base = ["extract", "--data", f"folder:{root}", "--encoder", f"onnx:{path}", "--views", "2", "--workers", "0"]
    for cache, shards in (("one", [None]), ("two", ["0/2", "1/2"])):
        for shard in shards:
            extra = ["--shard", shard] if shard else []
            res = r.invoke(main, [*base, "--cache", str(tmp_path / cache), "--no-progress", *extra])
            assert res.exit_code == 0, res.output
    (a,), (b,) = ((tmp_path / c).glob("*/cnn-*.zarr") for c in ("one", "two"))
    assert a.name == b.name
    with TokenStore.open(a) as sa, TokenStore.open(b) as sb:
        assert sa.spec["views"]["count"] == 2
        assert set(sa._arrays) >= {"tokens", "views"}
        for name, arr in sa._arrays.items():
            assert (np.asarray(arr[:]) == np.asarray(sb._arrays[name][:])).all(), name
    res = r.invoke(main, ["cache", "info", str(a)])
    assert res.exit_code == 0 and "onnx:cnn.onnx" in res.output, res.output
