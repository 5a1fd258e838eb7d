"""Joint fits over several datasets (Q-Face's unified model): transfer through a shared
latent factor, no harm without one, the run directory, the sampler, grids and bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from etf.cli import main
from etf.errors import EtfError
from etf.pipeline.fit.fusers import FuserConfig
from etf.pipeline.fit.joint import Selection, fit_joint
from etf.pipeline.fit.mixing import JointConfig, memory_shares, mix_probabilities, step_plan
from etf.pipeline.fit.train import FitConfig, fit
from tests.synthetic import D, T, import_prior, make_csv_dataset

SMALL = FuserConfig(dim=32, depth=1, heads=2, prior_tokens="all", head="pooled")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not fight the other test jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _splits(train: int, val: int, test: int) -> np.ndarray:
    return np.array(["train"] * train + ["val"] * val + ["test"] * test)


def _xor(z: np.ndarray) -> np.ndarray:
    return (z[:, 0] != z[:, 1]).astype(float)


def make_pair(tmp: Path, shared: bool, n_b: int, seed: int = 0, strength: float = 2.0):
    """Dataset A (classify:expression, 240 training samples) and dataset B (multilabel:AU1,
    ``n_b`` training samples), each label the XOR of two latent signs planted along fixed
    directions of prior P's tokens. ``shared``: B's latent directions are A's (A teaches
    the fuser the feature B needs); else B's are independent of A's."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(4, D))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    sizes = {"a": (240, 60, 100), "b": (n_b, 40, 200)}
    z = {k: rng.choice([-1.0, 1.0], (sum(v), 2)) for k, v in sizes.items()}
    dirs = {"a": u[:2], "b": u[:2] if shared else u[2:]}
    a, spec_a = make_csv_dataset(tmp / "a", {"expression": _xor(z["a"])}, _splits(*sizes["a"]))
    b, spec_b = make_csv_dataset(tmp / "b", {"AU1": _xor(z["b"])}, _splits(*sizes["b"]))
    cache = tmp / "cache"
    for name, dataset in (("a", a), ("b", b)):
        x = rng.normal(size=(len(dataset), T, D)) + strength * np.einsum("nj,jd->nd", z[name], dirs[name])[:, None]
        import_prior(cache, dataset, "P", x.astype(np.float32), tmp / name)
    return a, spec_a, b, spec_b, cache


def _cfg(cache, out, tasks, epochs, **kw):
    return FitConfig(
        cache_dir=cache,
        encoders=["P"],
        out=out,
        tasks=tasks,
        fuser_config=SMALL,
        epochs=epochs,
        batch_size=32,
        lr=3e-3,
        progress=False,
        **kw,
    )


def _singles_and_joint(tmp: Path, shared: bool, n_b: int, b_epochs: int, joint=JointConfig(mix="balanced")):
    a, _, b, _, cache = make_pair(tmp, shared, n_b)
    single_a = fit(a, _cfg(cache, tmp / "a_run", ["classify:expression"], 12)).metrics
    single_b = fit(b, _cfg(cache, tmp / "b_run", ["multilabel:AU1"], b_epochs)).metrics
    tasks = ["1=classify:expression", "2=multilabel:AU1"]
    both = fit_joint([a, b], [_cfg(cache, tmp / "joint", tasks, 12)], joint)[0].metrics
    return single_a, single_b, both


def _acc(m: dict) -> float:
    return m["test"]["expression"]["accuracy"]


def _au(m: dict) -> float:
    return m["test"]["AU1"]["mean_accuracy"]


def test_a_shared_latent_factor_transfers_to_the_small_dataset(tmp_path):
    """B's 12 samples cannot teach XOR; A's 240 can. B alone, given 25 times as many steps
    as it has batches in the joint fit's epochs, stays far below the joint fit, which reads
    the feature A taught the shared fuser."""
    single_a, single_b, both = _singles_and_joint(tmp_path, shared=True, n_b=12, b_epochs=300)
    joint_a, joint_b = both["datasets"]["csv1"], both["datasets"]["csv2"]
    assert _au(joint_b) > _au(single_b) + 0.1
    assert _acc(joint_a) > 0.9 and _acc(single_a) > 0.9


def test_b_nothing_shared_the_joint_fit_matches_the_single_fits(tmp_path):
    """Independent latents and enough data in each dataset: sharing the fuser neither helps
    nor hurts beyond noise."""
    single_a, single_b, both = _singles_and_joint(tmp_path, shared=False, n_b=240, b_epochs=12)
    joint_a, joint_b = both["datasets"]["csv1"], both["datasets"]["csv2"]
    assert _acc(joint_a) == pytest.approx(_acc(single_a), abs=0.05)
    assert _au(joint_b) == pytest.approx(_au(single_b), abs=0.05)
