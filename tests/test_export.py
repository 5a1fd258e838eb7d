"""etf export: the exported file gives what ``etf predict --infer canonical`` gives."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from etf.cli import main
from etf.pipeline.fit.export import card_path
from etf.utils import sha256_file
from tests.conftest import IMG, TINY_VIT

ort = pytest.importorskip("onnxruntime")


class SingularValues(torch.nn.Module):
    """A prior whose op (an SVD) the ONNX exporter does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(self.conv(x).flatten(2))


def svd_factory() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    return SingularValues(), {"size": IMG}


TOL = 1e-4  # fp32; the tokens' float16 rounding is inside the graph too, as at extraction
N_IMAGES = 24


def invoke(*args: str) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-prior run on lfw-subset: a tiny random ViT (canonical) and a CNN."""
    tmp = tmp_path_factory.mktemp("export")
    data = ["--data", "lfw-subset", "--cache", tmp / "cache"]
    invoke(
        "extract",
        *data,
        "--encoder",
        TINY_VIT,
        "--encoder",
        "resnet18",
        "--no-pretrained",
        "--img-size",
        IMG,
        "--workers",
        0,
    )
    invoke("fit", *data, "--encoders", f"{TINY_VIT},resnet18", "--out", tmp / "run", "--epochs", "2", "--dim", "32")
    return tmp


def images_and_expected(run_dir):
    """lfw-subset images, their uint8 inputs at the input size (etf's resize and crop), and
    ``etf predict --infer canonical``'s per-task outputs."""
    from etf.data.base import load_dataset
    from etf.data.images import read_image
    from etf.pipeline.fit.export import task_output
    from etf.pipeline.fit.predict import _forward, load_predictor

    dataset = load_dataset("lfw-subset")
    images = [dataset.samples[i].path for i in range(0, len(dataset), len(dataset) // N_IMAGES)][:N_IMAGES]
    p = load_predictor(run_dir, device="cpu", infer="canonical")
    to_uint8 = p.encoders[0].preprocess.pil_transform  # etf's resize and crop, before normalising
    pixels = [to_uint8(read_image(path)).permute(1, 2, 0).numpy() for path in images]
    with torch.no_grad():
        out = _forward(p, images)
        expected = {t.name: task_output(t, out[t.name]).numpy() for t in p.tasks}
    return images, np.stack(pixels), expected, p


def test_onnx_export_equals_predict_canonical(run, tmp_path):
    images, pixels, expected, p = images_and_expected(run / "run")
    model = tmp_path / "model.onnx"
    out = invoke("export", "--run", run / "run", "--out", model)
    assert f"output {p.tasks[0].name}: class probabilities" in out
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": pixels})))
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert np.abs(got[name] - want).max() <= TOL, name
    card = json.loads((tmp_path / "model.onnx.json").read_text())
    assert card["sha256"] == sha256_file(model)
    assert card["input"]["shape"] == ["batch", IMG, IMG, 3] and pixels.shape[1:] == (IMG, IMG, 3)
    assert card["outputs"][0]["classes"] == p.tasks[0].classes
    assert {"test", "test:canonical"} <= set(card["metrics"])
    assert [q["name"] for q in card["priors"]] == [TINY_VIT, "resnet18"]
    assert card["flops_per_image"] > 0

    invoke("export", "--run", run / "run", "--out", model)  # its own export: replaced
    thesis = tmp_path / "thesis.tex"
    thesis.write_text("chapter 1")
    res = CliRunner().invoke(main, ["export", "--run", str(run / "run"), "--out", str(thesis)])
    assert res.exit_code == 1 and "is not a model etf exported there" in res.output
    assert thesis.read_text() == "chapter 1" and not card_path(thesis).exists()


def test_torchscript_export_equals_predict_canonical_in_nchw(run, tmp_path):
    _, pixels, expected, _ = images_and_expected(run / "run")
    model = tmp_path / "model.pt"
    invoke("export", "--run", run / "run", "--out", model, "--format", "torchscript", "--layout", "nchw")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; the format stays
        loaded = torch.jit.load(str(model))
    with torch.no_grad():
        got = loaded(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
    for t, g in zip(expected, got):
        assert np.abs(g.numpy() - expected[t]).max() <= TOL, t


def test_export_refuses_a_run_whose_canonical_prior_was_imported(run, tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "imp.npy", rng.standard_normal((200, 1, 8)).astype(np.float32))
    data = ["--data", "lfw-subset", "--cache", run / "cache"]
    invoke("cache", "import", *data, "--name", "imp", "--array", tmp_path / "imp.npy")
    invoke("fit", *data, "--encoders", f"imp,{TINY_VIT}", "--out", tmp_path / "run", "--epochs", "1", "--dim", "16")
    res = CliRunner().invoke(main, ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1 and "canonical prior 'imp'" in res.output and "imported" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def test_export_refuses_an_op_onnx_lacks_in_one_line(run, tmp_path):
    data = ["--data", "lfw-subset", "--cache", run / "cache"]
    invoke("extract", *data, "--encoder", "py:tests.test_export:svd_factory?name=svd", "--workers", 0)
    invoke("fit", *data, "--encoders", "svd", "--out", tmp_path / "run", "--epochs", "1", "--dim", "16")
    res = CliRunner().invoke(main, ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1 and "aten::linalg_svdvals" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not list(tmp_path.glob("m.onnx*"))
