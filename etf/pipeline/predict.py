"""``etf predict``: new images through the recorded encoders, the fuser and the heads.

Everything is rebuilt from the run directory: each prior's encoder from its store spec
(refused if the loaded weights hash differs from the one the cache was made with), the
preprocessing from the recorded data config, the token selection and storage rounding
as at extraction, then the fuser and heads from ``model.safetensors``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from etf.cache.features import Group
from etf.cache.store import decode_tokens
from etf.cache.tokens import TokenLayout, select_tokens
from etf.data.images import load_rgb
from etf.errors import EtfError
from etf.pipeline.encoders import Encoder, create_encoder
from etf.pipeline.extract import ExtractOptions, autocast_for, compute_tokens, resolve_device
from etf.pipeline.fit import FusionModel, build_model, load_run
from etf.pipeline.fusers import FuserConfig
from etf.pipeline.heads import Classify, Task


@dataclass
class Predictor:
    """A trained run, ready to score images."""

    run: Path
    config: dict[str, Any]
    stores: list[dict[str, Any]]
    encoders: list[Encoder]
    tasks: list[Task]
    groups: list[Group]
    model: FusionModel
    device: torch.device


def load_model(run: Path) -> tuple[dict[str, Any], list[Task], list[Group], FusionModel]:
    """The run's fuser and heads with their trained weights (no encoders)."""
    config = load_run(run)
    tasks = [Task.from_state(s) for s in config["tasks"]]
    groups = [Group.from_json(g) for g in config["groups"]]
    model = build_model(config["fuser"], groups, tasks, FuserConfig(**config["fuser_config"]), config["seed"])
    model.load_state_dict(load_file(str(Path(run) / "model.safetensors")))
    return config, tasks, groups, model.eval()


def _encoder_for(spec: dict[str, Any], weights: dict[str, Path], device: torch.device) -> Encoder:
    name = spec["name"]
    if spec.get("source") == "import":
        raise EtfError(f"prior {name!r} was imported with etf cache import; predict cannot compute its tokens for new images")
    if spec.get("weights_file") and name not in weights:
        raise EtfError(f"prior {name!r} was extracted with --weights {spec['weights_file']}; pass --weights {name}=FILE")
    encoder = create_encoder(
        spec["model"],
        pretrained=spec.get("pretrained") is not None,
        weights=weights.get(name),
        seed=spec.get("init_seed") or 0,
        img_size=spec["data_config"]["input_size"][-1],
        allow_partial=True,
        device=device,
    )
    encoder.name = name
    if encoder.weights_sha256 != spec["weights_sha256"]:
        raise EtfError(
            f"prior {name!r}: the loaded weights (sha256 {encoder.weights_sha256[:12]}) differ from those the cache was "
            f"extracted with ({spec['weights_sha256'][:12]}); predictions would not match the trained fuser"
        )
    recorded = spec["data_config"]
    resolved = encoder.spec()["data_config"]
    if resolved != recorded:
        raise EtfError(f"prior {name!r}: preprocessing {resolved} differs from the recorded {recorded}")
    return encoder


def load_predictor(run: str | Path, weights: dict[str, Path] | None = None, device: str = "auto") -> Predictor:
    run = Path(run)
    config, tasks, groups, model = load_model(run)
    stores = json.loads((run / "stores.json").read_text())
    dev = resolve_device(device)
    encoders = [_encoder_for(s["spec"], weights or {}, dev) for s in stores]
    return Predictor(run, config, stores, encoders, tasks, groups, model.to(dev), dev)


@torch.no_grad()
def prior_tokens(p: Predictor, images: list[Path]) -> list[torch.Tensor]:
    """The fuser's input for ``images``: as the cache holds it, then the run's selection."""
    stored = []
    for encoder, entry in zip(p.encoders, p.stores):
        spec = entry["spec"]
        opts = ExtractOptions(tokens=spec["tokens"], norm=spec["norm"], dtype=spec["dtype"])
        tf = encoder.transform()
        x = torch.stack([tf(load_rgb(path)) for path in images]).to(p.device)
        stored.append(compute_tokens(encoder, x, spec["layers"], opts, [str(i) for i in images], autocast_for(spec["precision"], p.device)))
    out = []
    for g in p.groups:
        entry = p.stores[g.prior]
        x = torch.from_numpy(decode_tokens(stored[g.prior][g.layer], entry["spec"]["dtype"]).astype(np.float32))
        if p.config.get("tokens"):
            x = select_tokens(x, TokenLayout.from_json(entry["layouts"][str(g.layer)]), p.config["tokens"])[0]
        out.append(x.to(p.device))
    return out


@torch.no_grad()
def predict(p: Predictor, images: list[Path]) -> list[dict[str, Any]]:
    """One record per image: per task the prediction (class name and probability, values)."""
    missing = [i for i in images if not Path(i).is_file()]
    if missing:
        raise EtfError(f"{missing[0]}: image not found")
    out = p.model(prior_tokens(p, images))
    records = [{"image": str(i)} for i in images]
    for t in p.tasks:
        logits = out[t.name]
        values = t.decode(logits)
        for r, v, row in zip(records, values, logits):
            if isinstance(t, Classify):
                r[t.name] = t.classes[int(v[0])]
                r[f"{t.name}_prob"] = round(float(row.softmax(-1).max()), 4)
            else:
                r[t.name] = [round(float(x), 4) for x in v] if len(v) > 1 else round(float(v[0]), 4)
    return records
