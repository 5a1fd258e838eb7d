"""etf predict: real images end to end give the predictions the run recorded."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from etf.cli import main
from etf.pipeline.fit.checksums import write_sums
from tests.conftest import IMG, TINY_VIT


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.conftest import make_image

    tmp = tmp_path_factory.mktemp("predict")
    root = tmp / "faces"
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        for cls in ("a", "b"):
            for i in range(n):
                make_image(
                    root / split / cls / f"{i}.png",
                    seed=100 * (split == "val") + 200 * (split == "test") + 10 * (cls == "b") + i,
                )
    r = CliRunner()
    args = ["--data", f"folder:{root}", "--cache", str(tmp / "cache")]
    res = r.invoke(
        main,
        [
            "extract",
            *args,
            "--encoder",
            TINY_VIT,
            "--encoder",
            "resnet18",
            "--no-pretrained",
            "--img-size",
            str(IMG),
            "--workers",
            "0",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    res = r.invoke(
        main,
        [
            "fit",
            *args,
            "--encoders",
            f"{TINY_VIT},resnet18",
            "--out",
            str(tmp / "run"),
            "--epochs",
            "3",
            "--dim",
            "32",
            "--tokens",
            "pool:1",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "MFLOPs/sample" in res.output
    return tmp, root


def test_predict_reproduces_the_runs_own_predictions(run):
    tmp, root = run
    rows = [r for r in csv.DictReader(open(tmp / "run" / "predictions.csv")) if r["split"] == "test"]
    images = [str(root / r["id"]) for r in rows]
    out = CliRunner().invoke(
        main, ["predict", "--run", str(tmp / "run"), *images, "--json", str(tmp / "p.json"), "--device", "cpu"]
    )
    assert out.exit_code == 0, out.output
    got = json.loads((tmp / "p.json").read_text())
    assert [g["label"] for g in got] == [r["label_pred"] for r in rows]  # both name the class
    assert all(0.5 <= g["label_confidence"] <= 1.0 for g in got)
    # the probabilities are the trained model's on the cached tokens (predict recomputes
    # them from the images; the store keeps them in float16)
    import numpy as np
    import torch

    from etf.cache.features import PriorSet
    from etf.data import load_dataset
    from etf.pipeline.fit.predict import load_model

    config, _, _, model = load_model(tmp / "run")
    dataset = load_dataset(f"folder:{root}")
    priors = PriorSet(tmp / "cache", dataset, config["encoders"], config["layers"], config["tokens"])
    index = np.array([dataset.ids.index(r["id"]) for r in rows])
    tokens = priors.load(np.sort(index))
    priors.close()
    with torch.no_grad():
        probs = model([t.float() for t in tokens])["label"].softmax(-1).max(-1).values.numpy()
    expected = dict(zip(np.sort(index), probs))
    assert [g["label_confidence"] for g in got] == pytest.approx([expected[i] for i in index], abs=2e-3)


def test_predict_refuses_encoders_whose_weights_changed(run, tmp_path):
    import shutil

    tmp, root = run
    copy = tmp_path / "run"
    shutil.copytree(tmp / "run", copy)
    stores = json.loads((copy / "stores.json").read_text())
    stores[1]["spec"]["weights_sha256"] = "0" * 64
    (copy / "stores.json").write_text(json.dumps(stores))
    write_sums(copy)  # the run as if fitted on a cache of other weights
    out = CliRunner().invoke(main, ["predict", "--run", str(copy), str(next(root.rglob("*.png")))])
    assert out.exit_code == 1
    assert "prior 'resnet18': the loaded weights" in out.output and "differ" in out.output


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_a_tampered_model_is_refused_with_one_line(run, tmp_path, command):
    """A model multiplied by -37 has the same size and shape and predicts something else:
    its SHA-256, recorded when the run was published, no longer matches."""
    import shutil

    from safetensors.torch import load_file, save_file

    tmp, root = run
    copy = tmp_path / "run"
    shutil.copytree(tmp / "run", copy)
    assert "  model.safetensors" in (copy / "SHA256SUMS").read_text()
    weights = load_file(str(copy / "model.safetensors"))
    save_file({k: v * -37 for k, v in weights.items()}, str(copy / "model.safetensors"))
    image = str(next(root.rglob("*.png")))
    args = (
        ["predict", "--run", str(copy), image]
        if command == "predict"
        else ["explain", "--run", str(copy), "--out", str(tmp_path / "maps"), image]
    )
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 1 and "Traceback" not in out.output
    (line,) = [line for line in out.output.splitlines() if line.startswith("Error:")]
    assert f"--run {copy}: model.safetensors does not match its SHA-256 in SHA256SUMS" in line
    assert not (tmp_path / "maps").exists()
