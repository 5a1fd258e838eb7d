"""The GPU paths of fit, exercised on the CPU: mixed precision (autocast, the loss in fp32,
fp16 with a loss scaler) and tokens resident on the device or streamed to it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from etf.cache.features import Batches, PriorSet
from etf.pipeline.fit.config import FitConfig, FuserConfig
from etf.pipeline.fit.train import _fp32, fit
from tests.synthetic import import_prior, make_csv_dataset, planted_tokens, standard_splits


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """label = the sign prior A carries; prior B is noise."""
    tmp = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    sign = rng.choice([-1.0, 1.0], 200)
    dataset, spec = make_csv_dataset(tmp / "data", {"label": (sign > 0).astype(float)}, standard_splits(200))
    import_prior(tmp / "cache", dataset, "A", planted_tokens(rng, sign, 3.0), tmp)
    import_prior(tmp / "cache", dataset, "B", planted_tokens(rng, np.zeros(200), 0.0), tmp)
    return dataset, spec, tmp / "cache"


def _fit(planted, out, **kw):
    dataset, _, cache = planted
    settings = {"epochs": 4, "batch_size": 32, "fuser_config": FuserConfig(dim=32, depth=1, heads=2), **kw}
    cfg = FitConfig(cache_dir=cache, encoders=["A", "B"], out=out, tasks=["classify:label"], progress=False, **settings)
    return fit(dataset, cfg).metrics


def test_bf16_autocast_fit_is_finite_and_close_to_fp32(planted, tmp_path):
    fp32 = _fit(planted, tmp_path / "fp32", precision="fp32")
    bf16 = _fit(planted, tmp_path / "bf16", precision="bf16")
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    a, b = fp32["test"]["label"]["accuracy"], bf16["test"]["label"]["accuracy"]
    assert math.isfinite(b) and abs(a - b) <= 0.1, (a, b)
    assert min(a, b) >= 0.8, "the fixture is learnable: both must learn it"


def test_fp16_fit_scales_its_loss_and_stays_finite(planted, tmp_path):
    metrics = _fit(planted, tmp_path / "fp16", precision="fp16")
    assert metrics["precision"] == "fp16" and math.isfinite(metrics["val"]["label"]["accuracy"])


def test_auto_precision_is_bf16_on_a_gpu_that_has_it_else_fp32(planted, tmp_path):
    assert _fit(planted, tmp_path / "cpu", epochs=1, device="cpu")["precision"] == "fp32"
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()  # --device auto picks the GPU
    assert _fit(planted, tmp_path / "auto", epochs=1)["precision"] == ("bf16" if gpu_bf16 else "fp32")


def test_resident_streamed_and_in_memory_batches_are_identical(planted):
    dataset, _, cache = planted
    priors = PriorSet(cache, dataset, ["A", "B"])
    rows = np.arange(0, len(dataset), 3)
    big = 1 << 30
    try:
        memory = Batches(priors, rows, big, 16, seed=0)
        resident = Batches(priors, rows, big, 16, seed=0, device=torch.device("cpu"), device_budget=big)
        streamed = Batches(priors, rows, priors.row_bytes() * 40, 16, seed=0, device=torch.device("cpu"))
        assert (memory.resident, resident.resident, streamed.streamed) == (False, True, True)
        runs = [list(b.iterate(rows, shuffle=False)) for b in (memory, resident, streamed)]
        assert len(runs[0]) == -(-len(rows) // 16)
        for batches in runs[1:]:
            assert len(batches) == len(runs[0])
            for (idx, tokens), (ref_idx, ref_tokens) in zip(batches, runs[0]):
                np.testing.assert_array_equal(idx, ref_idx)
                for t, r in zip(tokens, ref_tokens):
                    assert torch.equal(t, r)
    finally:
        priors.close()


def test_head_outputs_reach_the_losses_in_fp32():
    from etf.pipeline.fit.verification import Embedded

    half = torch.ones(2, 3, dtype=torch.bfloat16)
    out = _fp32(Embedded(half, None))
    assert isinstance(out, Embedded) and out.embedding.dtype == torch.float32 and out.cosine is None
    assert _fp32(half).dtype == torch.float32 and _fp32(torch.ones(2, dtype=torch.long)).dtype == torch.long


def test_streamed_and_in_memory_fits_give_the_same_metrics(planted, tmp_path):
    """One full batch per epoch: streaming changes only the order of the rows within it (the
    mean loss does not care), so the same seed must give the same model and metrics; a
    streamed reader that loses, repeats or mismatches rows would not."""
    kw = {"epochs": 3, "batch_size": 512, "fuser_config": FuserConfig(dim=32, depth=1, heads=2, dropout=0.0)}
    memory = _fit(planted, tmp_path / "memory", **kw)
    streamed = _fit(planted, tmp_path / "streamed", max_memory=4096, **kw)
    assert (memory["streamed"], streamed["streamed"]) == (False, True)
    for split in ("val", "test"):
        a, b = memory[split]["label"], streamed[split]["label"]
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (split, k)
