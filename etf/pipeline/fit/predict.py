"""``etf predict``: new images through the recorded encoders, the fuser and the heads.

Everything is rebuilt from the run directory: each prior's encoder from its store spec
(refused if the loaded weights hash differs from the one the cache was made with), the
preprocessing from the recorded data config, the token selection and storage rounding
as at extraction, then the fuser and heads from ``model.safetensors``. Only the encoders
the prediction needs are built: those the fuser reads, or with ``infer="canonical"`` the
canonical prior's alone (the others, e.g. imported stores, need not be rebuildable).

A run with a ``verify`` task also gives identity embeddings: of new images, or of a cached
dataset's samples (no encoders run; its stores must match the run's priors), whose pair
protocols (LFW, CFP) are then evaluated, e.g. for a run trained on another face set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from etf.cache.catalog import CacheDir
from etf.cache.features import Batches, Group, PriorSet, default_memory_budget
from etf.cache.format import DATASET_FIELDS, VIEW_FIELDS
from etf.cache.store import decode_tokens
from etf.cache.tokens import TokenLayout, select_tokens
from etf.data.base import Dataset
from etf.data.images import require_readable
from etf.errors import EtfError
from etf.pipeline.extract.encoders import Encoder, create_encoder
from etf.pipeline.extract.preprocess import prepare_files
from etf.pipeline.extract.run import ExtractOptions, autocast_for, compute_tokens, resolve_device
from etf.pipeline.fit.config import INFER_MODES, FuserConfig
from etf.pipeline.fit.heads import Classify, Task
from etf.pipeline.fit.train import FusionModel, build_model, check_finite, load_run, predict_rows
from etf.pipeline.fit.verification import Verify, pair_metrics, write_embeddings
from etf.utils import mark_owned, read_json, write_json_atomic


@dataclass
class Predictor:
    """A trained run, ready to score images."""

    run: Path
    config: dict[str, Any]
    stores: list[dict[str, Any]]
    #: the encoders built, by prior index
    encoders: dict[int, Encoder]
    tasks: list[Task]
    groups: list[Group]
    model: FusionModel
    device: torch.device
    infer: str = "all"


def load_model(run: Path) -> tuple[dict[str, Any], list[Task], list[Group], FusionModel]:
    """The run's fuser and heads with their trained weights (no encoders)."""
    config = load_run(run)
    try:
        tasks = [Task.from_state(s) for s in config["tasks"]]
        groups = [Group.from_json(g) for g in config["groups"]]
        fuser_config = FuserConfig(**config["fuser_config"])
    except (KeyError, TypeError, ValueError) as e:  # edited by hand, or written by another etf
        raise EtfError(
            f"--run {run}: config.json does not describe a model ({type(e).__name__}: {e}); fit it again"
        ) from None
    model = build_model(config["fuser"], groups, tasks, fuser_config, config["seed"])
    try:
        weights = load_file(str(Path(run) / "model.safetensors"))
    except (OSError, SafetensorError) as e:  # missing, truncated or not a safetensors file at all
        raise EtfError(f"--run {run}: model.safetensors cannot be read ({e}); fit it again") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError:  # a run of an etf whose model had other parts (before the authors' ET-Fuser)
        raise EtfError(
            f"--run {run}: model.safetensors does not hold the model config.json describes "
            f"(fitted by etf {config.get('etf_version', '?')} with another model layout?); fit it again"
        ) from None
    return config, tasks, groups, model.eval()


def _encoder_for(spec: dict[str, Any], weights: dict[str, list[Path]], device: torch.device) -> Encoder:
    name = spec["name"]
    if spec.get("source") == "import":
        raise EtfError(
            f"prior {name!r} was imported with etf cache import; predict cannot compute its tokens for new images"
            " (--infer canonical needs only the canonical prior's encoder)"
        )
    if spec.get("weights_file") and name not in weights:
        sources = [s["file"] for s in spec.get("soup") or [{"file": spec["weights_file"]}]]
        raise EtfError(
            f"prior {name!r} was extracted with --weights {', '.join(sources)}; pass "
            + " ".join(f"--weights {name}=FILE" for _ in sources)
            + (" (the soup's sources, in that order)" if len(sources) > 1 else "")
        )
    encoder = create_encoder(
        spec["model"],
        pretrained=spec.get("pretrained") is not None,
        weights=weights.get(name),
        seed=spec.get("init_seed") or 0,
        img_size=spec["data_config"]["input_size"][-1] if spec.get("source", "timm") == "timm" else None,
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


def load_predictor(
    run: str | Path, weights: dict[str, list[Path]] | None = None, device: str = "auto", infer: str = "all"
) -> Predictor:
    """The run's model and the encoders that ``infer`` needs."""
    if infer not in INFER_MODES:
        raise EtfError(f"--infer {infer!r}: use {' or '.join(INFER_MODES)}")
    run = Path(run)
    config, tasks, groups, model = load_model(run)
    stores = read_json(run / "stores.json")
    dev = resolve_device(device)
    needed = [0] if infer == "canonical" else model.fuser.reads
    encoders = {p: _encoder_for(stores[p]["spec"], weights or {}, dev) for p in needed}
    return Predictor(run, config, stores, encoders, tasks, groups, model.to(dev), dev, infer)


@torch.no_grad()
def prior_tokens(p: Predictor, images: list[Path]) -> list[torch.Tensor]:
    """The fuser's input for ``images``: as the cache holds it, then the run's selection;
    zeros (absent, the missing rule) for the priors whose encoder was not built."""
    stored = {}
    for prior, encoder in p.encoders.items():
        spec = p.stores[prior]["spec"]
        opts = ExtractOptions(tokens=spec["tokens"], norm=spec["norm"], dtype=spec["dtype"])
        x = prepare_files(encoder.preprocess, images, spec.get("decode", "cpu"), p.device)
        stored[prior] = compute_tokens(
            encoder, x, spec["layers"], opts, [str(i) for i in images], autocast_for(spec["precision"], p.device)
        )
    out = []
    for g in p.groups:
        if g.prior not in stored:
            out.append(torch.zeros(len(images), g.tokens, g.dim, device=p.device))
            continue
        entry = p.stores[g.prior]
        x = torch.from_numpy(decode_tokens(stored[g.prior][g.layer], entry["spec"]["dtype"]).astype(np.float32))
        if p.config.get("tokens"):
            x = select_tokens(x, TokenLayout.from_json(entry["layouts"][str(g.layer)]), p.config["tokens"])[0]
        out.append(x.to(p.device))
    return out


@torch.no_grad()
def predict(p: Predictor, images: list[Path]) -> list[dict[str, Any]]:
    """One record per image: per task the prediction (class name and probability, values)."""
    return _records(p, images, _forward(p, images))


@torch.no_grad()
def _forward(p: Predictor, images: list[Path]) -> dict[str, Any]:
    return check_finite(p.model(prior_tokens(p, images), p.infer), p.run)


def _verify_tasks(tasks: list[Task], run: Path) -> list[Verify]:
    found = [t for t in tasks if isinstance(t, Verify)]
    if not found:
        raise EtfError(f"--embed: {run} has no verify task, so no identity embedding")
    return found


def predict_all(p: Predictor, images: list[Path], batch_size: int, embed: Path | None = None) -> list[dict[str, Any]]:
    """:func:`predict` in batches; with ``embed``, also each verify task's embeddings of
    ``images`` written to that directory."""
    require_readable(images)
    verify = _verify_tasks(p.tasks, p.run) if embed else []
    if not embed and all(isinstance(t, Verify) for t in p.tasks):
        raise EtfError(f"{p.run}: its tasks give embeddings only; pass --embed DIR")
    records, embeddings = [], {t.name: [] for t in verify}
    for b in range(0, len(images), batch_size):
        batch = images[b : b + batch_size]
        out = _forward(p, batch)
        records += _records(p, batch, out)
        for t in verify:
            embeddings[t.name].append(t.decode(out[t.name]))
    if verify:
        mark_owned(embed, "embed")
    for t in verify:
        write_embeddings(embed, t.name, [str(i) for i in images], np.concatenate(embeddings[t.name]))
    return records


def _records(p: Predictor, images: list[Path], out: dict[str, Any]) -> list[dict[str, Any]]:
    records = [{"image": str(i)} for i in images]
    for t in p.tasks:
        if not t.pred_columns:  # an embedding: written by --embed, not a table cell
            continue
        logits = out[t.name]
        values = t.decode(logits)
        for r, v, row in zip(records, values, logits):
            if isinstance(t, Classify):
                r[t.name] = t.classes[int(v[0])]
                r[f"{t.name}_confidence"] = round(float(row.softmax(-1).max()), 4)  # of the predicted class
            else:
                r[t.name] = [round(float(x), 4) for x in v] if len(v) > 1 else round(float(v[0]), 4)
    return records


def run_priors(run: Path, config: dict[str, Any], dataset: Dataset, cache_dir: CacheDir | None = None) -> PriorSet:
    """The run's priors over ``dataset`` (in ``cache_dir``, default the run's cache): on the
    data it was fitted on, exactly the stores it read, found by their spec hashes (never
    another store that now has a prior's name); on other data, the stores of the same
    names, which must have been extracted alike."""
    recorded = read_json(run / "stores.json")
    cache_dir = cache_dir or config["cache_dir"]
    if dataset.key == config["dataset"]["key"]:
        located = [f"{s['spec']['name']}-{s['spec_hash']}" for s in recorded]
        try:
            priors = PriorSet(cache_dir, dataset, located, config["layers"], config["tokens"], config["encoders"])
        except EtfError as e:
            raise EtfError(
                f"--run {run}: the stores it was fitted on ({', '.join(located)}) are not all in {cache_dir}: {e}"
            ) from None
    else:
        priors = PriorSet(cache_dir, dataset, config["encoders"], config["layers"], config["tokens"])
    try:
        _check_priors(run, config, recorded, priors)
    except EtfError:
        priors.close()
        raise
    return priors


def _check_priors(run: Path, config: dict[str, Any], recorded: list[dict[str, Any]], priors: PriorSet) -> None:
    """The dataset's stores must hold what the run's priors held for its training data."""
    for old, new in zip(recorded, priors.specs()):
        a, b = ({k: v for k, v in s["spec"].items() if k not in DATASET_FIELDS + VIEW_FIELDS} for s in (old, new))
        if a != b:
            differs = ", ".join(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))
            raise EtfError(
                f"prior {old['name']!r}: {new['path']} was extracted differently from the run's {old['path']} ({differs})"
            )
    if [g.to_json() for g in priors.groups] != config["groups"]:
        raise EtfError(
            f"--data {priors.dataset.describe()}: the stores' token groups differ from those {run} was trained on"
        )


@torch.no_grad()
def embed_dataset(
    run: str | Path, dataset: Dataset, cache_dir: CacheDir, embed: Path, batch_size: int = 256, device: str = "auto"
) -> dict[str, Any]:
    """Each verify task's embeddings of ``dataset``'s cached samples, written to ``embed``, and
    the dataset's pair protocols evaluated on them (also written, as ``embed/metrics.json``)."""
    run = Path(run)
    config, tasks, _, model = load_model(run)
    verify = _verify_tasks(tasks, run)
    dev = resolve_device(device)
    priors = run_priors(run, config, dataset, cache_dir)
    try:
        rows = np.nonzero(priors.valid)[0]
        batches = Batches(priors, rows, default_memory_budget(), batch_size, seed=0)
        order, (preds,) = predict_rows([model.to(dev)], verify, batches, rows, dev)
    finally:
        priors.close()
    results = {}
    mark_owned(embed, "embed")
    for t in verify:
        write_embeddings(embed, t.name, [dataset.ids[i] for i in order], preds[t.name])
        full = np.zeros((len(dataset), preds[t.name].shape[1]), np.float32)
        full[order] = preds[t.name]
        results[t.name] = pair_metrics(dataset, full, priors.valid)
    write_json_atomic(embed / "metrics.json", results)
    return results
