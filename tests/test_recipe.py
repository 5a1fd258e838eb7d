"""The authors' training one flag away: ``--recipe authors`` gives the settings a command leaves
unset the values of the authors' code, any option given still wins, and each piece computes
what theirs does."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from etf.cli import main
from etf.pipeline.fit.heads import AuthorsHead, Classify, Landmarks
from etf.pipeline.fit.train import _schedule
from tests.synthetic import xor_cache


@pytest.fixture(scope="module")
def xor(tmp_path_factory):
    return xor_cache(tmp_path_factory.mktemp("xor"), n=120)


def _fit(spec, cache, out, *extra) -> CliRunner:
    args = ["fit", "--data", spec, "--cache", str(cache), "--encoders", "A,B", "--out", str(out),
            "--task", "classify:label", "--heads", "2", "--no-progress", *extra]  # fmt: skip
    return CliRunner().invoke(main, args)


def test_recipe_authors_fills_what_is_unset_and_given_options_win(xor, tmp_path):
    _, spec, cache = xor
    res = _fit(spec, cache, tmp_path / "run", "--recipe", "authors", "--epochs", "2", "--lr", "1e-3")
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    got = {k: config[k] for k in ("recipe", "optimizer", "schedule", "early_stop", "select_by", "batch_size")}
    assert got == {
        "recipe": "authors",
        "optimizer": "adam",
        "schedule": "periodic:20",
        "early_stop": 100,
        "select_by": "f1-or-loss",
        "batch_size": 32,
    }
    assert (config["epochs"], config["lr"], config["weight_decay"]) == (2, 1e-3, 0.0)  # given: they win
    fuser = config["fuser_config"]
    assert (fuser["readout"], fuser["position_code"], fuser["canonical_norm"]) == ("authors", "single", False)

    plain = _fit(spec, cache, tmp_path / "etf", "--epochs", "2")
    assert plain.exit_code == 0, plain.output
    config = json.loads((tmp_path / "etf" / "config.json").read_text())
    assert (config["recipe"], config["optimizer"], config["schedule"], config["fuser_config"]["readout"]) == (
        "etf",
        "adamw",
        "cosine",
        "linear",
    )


def test_early_stop_ends_a_fit_that_stopped_improving(xor, tmp_path):
    """A learning rate too small to change any prediction: epoch 1 stays the best, so with a
    patience of 2 epochs the fit ends after epoch 3 of 20 and says so."""
    _, spec, cache = xor
    res = _fit(spec, cache, tmp_path / "run", "--epochs", "20", "--lr", "1e-12", "--early-stop", "2")
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["stopped_early"] == 3 and metrics["best_epoch"] == 1


def _authors_warmup_cosine(step: int, warmup: int, total: int, cycles: float) -> float:
    """The authors' WarmupCosineSchedule.lr_lambda, as they wrote it."""
    if step < warmup:
        return float(step) / float(max(1.0, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * progress)))


def test_periodic_schedule_is_the_authors_warm_restarts():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    warmup, total, cycles = 4, 44, 2.0
    sched = _schedule(opt, warmup, total, cycles)
    got = []
    for _ in range(total):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx([_authors_warmup_cosine(s, warmup, total, cycles) for s in range(total)])
    assert got[warmup] == got[warmup + 20] == pytest.approx(1.0)  # back at the peak after each period
    assert got[warmup + 10] == pytest.approx(0.0, abs=1e-12)

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = _schedule(opt, warmup, total)  # etf's: one half-period down to zero, no restart
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / warmup) and np.all(np.diff(lrs[warmup:]) <= 0)


def test_wing_on_the_error_norm_in_extent_units():
    """Two samples of two landmarks: the loss is Wing of each sample's error vector's norm,
    in units where the training landmarks' extent (the larger of width and height) is 1."""
    t = Landmarks("lm", ["x0", "y0", "x1", "y1"], criterion="wing-norm", units="extent")
    y = np.array([[10.0, 20.0, 110.0, 70.0], [30.0, 40.0, 60.0, 50.0]])
    t.fit_stats(y, np.ones_like(y, dtype=bool))
    assert (t.mean, t.std) == ([10.0, 20.0, 10.0, 20.0], [100.0] * 4)

    target = torch.tensor(y, dtype=torch.float32)
    norm = (target - torch.tensor(t.mean)) / torch.tensor(t.std)
    out = norm + torch.tensor([[0.03, 0.04, 0.0, 0.0], [0.3, 0.0, 0.0, 0.4]])  # error norms 0.05 and 0.5
    omega, eps = t.omega, t.epsilon
    small = omega * math.log(1 + 0.05 / eps)
    large = 0.5 - (omega - omega * math.log(1 + omega / eps))
    loss = t.loss(out, target, torch.ones_like(target, dtype=torch.bool))
    assert float(loss) == pytest.approx((small + large) / 2, rel=1e-5)


def test_authors_readout_heads():
    """Their classifier: ReLU, DropPath, BatchNorm1d, Linear; their regressor: Dropout,
    Linear to 256, Linear."""
    classifier = Classify("label", ["label"], ["a", "b", "c"]).make_head(8, readout="authors")
    kinds = [type(m).__name__ for m in classifier.modules()]
    assert kinds.index("ReLU") < kinds.index("DropPath") < kinds.index("BatchNorm1d") < kinds.index("Linear")
    regressor = AuthorsHead(8, 2, "regressor")
    widths = [(m.in_features, m.out_features) for m in regressor.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(8, 256), (256, 2)]


def test_ablate_recipe_authors_reaches_every_run(xor, tmp_path):
    _, spec, cache = xor
    args = ["ablate", "--data", spec, "--cache", str(cache), "--encoders", "A,B", "--out", str(tmp_path),
            "--task", "classify:label", "--subsets", "singles", "--fusers", "linear", "--recipe", "authors",
            "--epochs", "1", "--optimizer", "adamw"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    configs = [json.loads(p.read_text()) for p in tmp_path.rglob("config.json")]
    assert len(configs) == 2
    for config in configs:
        assert (config["recipe"], config["optimizer"], config["select_by"], config["epochs"]) == (
            "authors",
            "adamw",  # given: it wins
            "f1-or-loss",
            1,
        )
        assert config["fuser_config"]["readout"] == "authors"
