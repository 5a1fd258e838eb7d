"""fit_many: K models over one pass of the data, each bit-identical to its own fit."""

from __future__ import annotations

import csv
import dataclasses

import pytest

from etf.errors import EtfError
from etf.pipeline.fit.fusers import FuserConfig
from etf.pipeline.fit.train import FitConfig, fit, fit_many
from tests.synthetic import xor_cache

FILES = ("model.safetensors", "predictions.csv")


def _history(run):
    """history.csv without its timing column."""
    rows = list(csv.DictReader(open(run / "history.csv")))
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def _configs(cache, root):
    base = FitConfig(
        cache_dir=cache,
        encoders=["A", "B"],
        out=root,
        tasks=["classify:label"],
        epochs=3,
        batch_size=32,
        seed=3,
        progress=False,
    )
    variants = [
        (
            "etf_drop",
            dict(fuser="etfuser", fuser_config=FuserConfig(dim=32, depth=1, heads=2, dropout=0.1, mask="prior:0.3")),
        ),
        (
            "etf_intra",
            dict(
                fuser="etfuser",
                lr=3e-3,
                fuser_config=FuserConfig(dim=32, depth=1, heads=2, attn="intra", mask="token:0.2"),
            ),
        ),
        ("concat", dict(fuser="concat", weight_decay=0.0)),
        ("linear", dict(fuser="linear")),
    ]
    return [dataclasses.replace(base, out=root / name, **kw) for name, kw in variants]


def test_fit_many_equals_separate_fits_bit_for_bit(tmp_path):
    dataset, _, cache = xor_cache(tmp_path, n=120)
    together = fit_many(dataset, _configs(cache, tmp_path / "many"))
    for cfg, grouped in zip(_configs(cache, tmp_path / "one"), together):
        alone = fit(dataset, cfg)
        for name in FILES:
            assert (grouped.out / name).read_bytes() == (alone.out / name).read_bytes(), (cfg.fuser, name)
        a, b = dict(grouped.metrics), dict(alone.metrics)
        a.pop("seconds"), b.pop("seconds")
        assert a == b
        assert _history(grouped.out) == _history(alone.out)
    shares = together[0].metrics["attention_share"]
    assert set(shares) == {"A", "B"} and 0 < sum(shares.values()) <= 1  # the rest: the token itself
    assert "attention_share" not in together[2].metrics


def test_fit_many_refuses_configs_that_do_not_share_the_data(tmp_path):
    dataset, _, cache = xor_cache(tmp_path, n=60)
    a, b = _configs(cache, tmp_path)[:2]
    with pytest.raises(EtfError, match="differs from .* in seed"):
        fit_many(dataset, [a, dataclasses.replace(b, seed=4)])
