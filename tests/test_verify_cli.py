"""The recognition workflow end to end: train verify on an identity-per-folder set, evaluate
on LFW's pairs from the cache, and embed new images with the encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from etf.cli import main
from tests.conftest import IMG, TINY_VIT, make_image
from tests.test_lfw import write_lfw


def _ok(args: list[str]) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify_cli")
    faces = tmp / "casia"
    for person in range(12):
        for n in range(5):
            make_image(faces / f"id{person:02d}" / f"{n}.png", seed=100 * person + n)
    lfw = write_lfw(tmp / "lfw")
    cache = ["--cache", str(tmp / "cache")]
    for data in (f"folder:{faces}", f"lfw:{lfw}"):
        _ok(
            [
                "extract",
                "--data",
                data,
                *cache,
                "--encoder",
                TINY_VIT,
                "--no-pretrained",
                "--img-size",
                str(IMG),
                "--workers",
                "0",
                "--no-progress",
            ]
        )
    out = _ok(
        [
            "fit",
            "--data",
            f"folder:{faces}",
            *cache,
            "--encoders",
            TINY_VIT,
            "--task",
            "verify:label",
            "--margin",
            "cosface",
            "--embed-dim",
            "8",
            "--epochs",
            "2",
            "--val-fraction",
            "0.3",
            "--test-split",
            "none",  # tested on LFW's pairs by etf predict
            "--dim",
            "32",
            "--tokens",
            "pool:1",
            "--out",
            str(tmp / "run"),
            "--no-progress",
        ]
    )
    assert "val      label        accuracy_10fold" in out
    return tmp, lfw, cache


def test_fit_records_the_margin_flags(run):
    tmp, _, _ = run
    task = json.loads((tmp / "run" / "config.json").read_text())["tasks"][0]
    assert (task["margin"], task["dim"], task["m"], task["s"]) == ("cosface", 8, 0.35, 64.0)
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    assert metrics["splits"]["val"] == 20  # whole identities: 4 of 12, 5 images each


def test_a_run_trained_elsewhere_is_evaluated_on_lfw_pairs(run):
    tmp, lfw, cache = run
    out = _ok(["predict", "--run", str(tmp / "run"), "--data", f"lfw:{lfw}", *cache, "--embed", str(tmp / "lfw_emb")])
    assert out.startswith("test     label        accuracy_10fold")
    metrics = json.loads((tmp / "lfw_emb" / "metrics.json").read_text())["label"]["test"]
    assert metrics["pairs"] == 20 and len(metrics["fold_accuracy"]) == 10
    ids = (tmp / "lfw_emb" / "embeddings-label.txt").read_text().split()
    cached = np.load(tmp / "lfw_emb" / "embeddings-label.npy")
    assert cached.shape == (len(ids), 8)

    images = [str(lfw / sid) for sid in ids[:3]]
    _ok(["predict", "--run", str(tmp / "run"), "--embed", str(tmp / "new"), "--device", "cpu", *images])
    assert (tmp / "new" / "embeddings-label.txt").read_text().split() == images
    new = np.load(tmp / "new" / "embeddings-label.npy")
    precision = json.loads((tmp / "run" / "stores.json").read_text())[0]["spec"]["precision"]
    if precision == "fp32":  # extracted on the CPU: the same computation, to float error
        assert np.allclose(new, cached[:3], atol=1e-3)
    else:  # extracted on a GPU under bf16 autocast, recomputed under the CPU's: unit vectors within rounding
        assert np.linalg.norm(new - cached[:3], axis=1).max() < 0.05


def test_predict_without_embed_on_a_verify_run_says_what_to_do(run):
    tmp, lfw, _ = run
    image = str(next(lfw.rglob("*.jpg")))
    res = CliRunner().invoke(main, ["predict", "--run", str(tmp / "run"), "--device", "cpu", image])
    assert res.exit_code == 1 and "its tasks give embeddings only; pass --embed DIR" in res.output
    res = CliRunner().invoke(main, ["predict", "--run", str(tmp / "run"), "--data", f"lfw:{lfw}"])
    assert res.exit_code == 2 and "needs --embed DIR" in res.output


def test_stores_extracted_differently_from_the_runs_are_refused(run, tmp_path):
    tmp, lfw, _ = run
    other = ["--cache", str(tmp_path / "cache")]
    _ok(
        [
            "extract",
            "--data",
            f"lfw:{lfw}",
            *other,
            "--encoder",
            TINY_VIT,
            "--no-pretrained",
            "--img-size",
            "48",
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    res = CliRunner().invoke(
        main, ["predict", "--run", str(tmp / "run"), "--data", f"lfw:{lfw}", *other, "--embed", str(tmp_path / "e")]
    )
    assert res.exit_code == 1
    assert (
        f"prior '{TINY_VIT}'" in res.output
        and "was extracted differently" in res.output
        and "data_config" in res.output
    )
