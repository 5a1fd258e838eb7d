"""Each fuser reads the settings its table says, and no other: an unread setting merges grid
points (one row, one member of the correction's family), a read one never does."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch

from etf.cache.features import Group
from etf.cache.tokens import TokenLayout
from etf.pipeline.fit.config import FUSER_READS, FuserConfig, fuser_reads, resolve
from etf.pipeline.fit.heads import Classify, Landmarks, MultiLabel
from etf.pipeline.fit.train import build_model

D = 16
GROUPS = [Group(0, "A", 12, TokenLayout(1, (2, 2)), D), Group(1, "B", 12, TokenLayout(1, (2, 2)), D)]
TASKS = [
    Classify("label", ["label"], ["a", "b"]),
    MultiLabel("au", ["au1", "au2", "au3"]),
    Landmarks("pts", [f"p{i}_{c}" for i in range(2) for c in "xy"], mean=[0.0] * 4, std=[1.0] * 4),
]
BASE = FuserConfig(dim=32, heads=2)
#: two values of every setting; a model is built with the one it does not already have
#: (aux is checked where it is refused or used, not here)
VALUES = {
    "dim": (32, 64),
    "depth": (1, 3),
    "heads": (2, 4),
    "mlp_ratio": (1.0, 3.0),
    "dropout": (0.0, 0.3),
    "attn": ("full", "intra"),
    "mask": ("none", "token:0.5"),
    "prior_tokens": ("pooled", "all"),
    "fuse": ("add", "gate"),
    "position_code": ("sinusoidal", "single"),
    "head": ("auto", "pooled"),
    "pool": (None, "avg"),
    "canonical_norm": (True, False),
    "queries": ("label", "task"),
    "regions": (8, 3),
    "temperature": (0.1, 0.5),
    "recon_ratio": (0.5, 0.25),
    "readout": ("linear", "authors"),
}


#: each fuser as the table names it, with the base settings that select its formulation
MODELS = {
    "linear": ("linear", {}),
    "mean": ("mean", {}),
    "concat": ("concat", {}),
    "etfuser:pooled": ("etfuser", {}),
    "etfuser:all": ("etfuser", {"prior_tokens": "all", "aux": "recon:0.5"}),
    "etfuser+qface:pooled": ("etfuser+qface", {"prior_tokens": "pooled"}),
    "etfuser+qface:all": ("etfuser+qface", {"aux": "recon:0.5"}),
    "qface": ("qface", {}),
    "fra": ("fra", {}),
}


def _outputs(fuser: str, cfg: FuserConfig) -> tuple[dict, dict, torch.Tensor | None]:
    """A model's parameter shapes, and its training-mode outputs and auxiliary loss on fixed tokens."""
    model = build_model(fuser, GROUPS, TASKS, cfg, seed=0).train()
    tokens = [torch.randn(4, g.tokens, g.dim, generator=torch.Generator().manual_seed(g.prior)) for g in GROUPS]
    torch.manual_seed(1)
    out = model(tokens)
    aux = model.fuser.aux_loss
    return {k: v.shape for k, v in model.state_dict().items()}, out, aux


def _differ(a: tuple, b: tuple) -> bool:
    if a[0] != b[0]:
        return True
    if any(not torch.equal(a[1][k], b[1][k]) for k in a[1]):
        return True
    return (a[2] is None) != (b[2] is None) or (a[2] is not None and not torch.equal(a[2], b[2]))


@pytest.mark.parametrize("name", list(MODELS))
def test_a_fuser_reads_exactly_the_settings_of_its_table(name):
    fuser, base = MODELS[name]
    cfg = replace(BASE, **base)
    reads = set(fuser_reads(fuser, cfg)) - {"aux"}
    resolved = resolve(fuser, cfg)
    reference = _outputs(fuser, cfg)
    changed = set()
    if name.endswith(":all"):  # switching to the pooled formulation is the pooled entry's (it refuses recon)
        reads.discard("prior_tokens")
    for k, values in VALUES.items():
        if k == "prior_tokens" and name.endswith(":all"):
            continue
        now = getattr(resolved, k) if getattr(resolved, k) is not None else getattr(cfg, k)
        if _differ(reference, _outputs(fuser, replace(cfg, **{k: next(v for v in values if v != now)}))):
            changed.add(k)
    assert changed == reads, (name, sorted(changed ^ reads))


def test_settings_no_task_reads_and_unread_settings_resolve_to_null():
    assert set(VALUES) | {"aux"} == {f.name for f in fields(FuserConfig)}
    assert set(FUSER_READS) == set(MODELS)
    classify = ["classify"]
    concat = resolve("concat", replace(BASE, attn="intra", dim=8, heads=2), classify)
    assert concat.attn is None and concat.dim is None and concat.head is None  # no spatial task reads --head
    assert resolve("concat", BASE, classify) == concat  # so the two grid points are one
    assert resolve("qface", BASE, ["multilabel"]).queries == "label"
    assert resolve("qface", BASE, classify).queries is None
    assert resolve("etfuser", BASE, ["landmarks"]).head == "auto"
