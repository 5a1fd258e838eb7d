"""``etf export``: a run's canonical inference as one deployable file (ONNX or TorchScript).

The file holds what ``etf predict --infer canonical`` runs: the canonical prior's encoder
(with its ``--weights`` or soup), the rounding of its tokens to the store dtype, the token
selection of extraction and of the run, the fuser at canonical inference and the heads. Its
input is a batch of uint8 RGB images already at the store's input size (NHWC by default);
normalisation is inside. Its outputs are named per task: class probabilities (classify),
label probabilities (multilabel), values and landmarks in label units (regress, landmarks),
identity embeddings (verify). A JSON card beside it says all of that for a deployment.
"""

from __future__ import annotations

import platform
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from etf.cache.tokens import TokenLayout, select_tokens
from etf.errors import EtfError
from etf.pipeline.fit.heads import Classify, MultiLabel, Regress, Task
from etf.pipeline.fit.predict import Predictor, load_predictor
from etf.pipeline.fit.verification import Verify
from etf.utils import read_json, sha256_file, write_json_atomic

FORMATS = ("onnx", "torchscript")
LAYOUTS = ("nhwc", "nchw")
INPUT_NAME = "images"
_STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
OPSET = 17


def task_output(task: Task, out: Any) -> torch.Tensor:
    """A head's output as a deployment reads it (what ``etf predict`` reports, before naming
    classes): probabilities, values in label units, embeddings."""
    if isinstance(task, Verify):
        return out.embedding
    if isinstance(task, Classify):
        return out.softmax(-1)
    if isinstance(task, MultiLabel):
        return out.sigmoid()
    if isinstance(task, Regress):  # and Landmarks: label units
        mean, std = task._scale(out)
        return out * std + mean
    raise EtfError(f"etf export: task {task.name!r} of kind {task.kind} has no exported output")


class Deployable(nn.Module):
    """uint8 images to per-task outputs through the canonical prior alone."""

    def __init__(self, p: Predictor, layout: str) -> None:
        super().__init__()
        self.encoder = p.encoders[0]
        self.backbone = self.encoder.model  # its tensors are this module's
        self.model = p.model
        self.tasks = p.tasks
        self.groups = p.groups
        self.layout = layout
        spec = p.stores[0]["spec"]
        self.layers, self.norm = list(spec["layers"]), spec["norm"]
        self.extract_tokens, self.store_dtype = spec["tokens"], _STORE_DTYPES[spec["dtype"]]
        self.run_tokens = p.config.get("tokens")
        self.layouts = {
            g.layer: TokenLayout.from_json(p.stores[0]["layouts"][str(g.layer)]) for g in p.groups if g.prior == 0
        }
        cfg = self.encoder.data_config
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images.permute(0, 3, 1, 2) if self.layout == "nhwc" else images
        x = (x.float() - self.mean) / self.std
        outs = self.encoder.tokens.__wrapped__(self.encoder, x, self.layers, self.norm)  # no inference mode: traced
        stored = {
            layer: select_tokens(t, lay, self.extract_tokens)[0].to(self.store_dtype).float()
            for layer, (t, lay) in zip(self.layers, outs)
        }
        tokens = []
        for g in self.groups:
            if g.prior != 0:
                tokens.append(x.new_zeros(x.shape[0], g.tokens, g.dim))  # absent, as at canonical inference
                continue
            t = stored[g.layer]
            if self.run_tokens:
                t = select_tokens(t, self.layouts[g.layer], self.run_tokens)[0]
            tokens.append(t)
        out = self.model(tokens, "canonical")
        return tuple(task_output(t, out[t.name]) for t in self.tasks)


def export_run(
    run: str | Path,
    out: Path,
    fmt: str = "onnx",
    layout: str = "nhwc",
    weights: dict[str, list[Path]] | None = None,
) -> dict[str, Any]:
    """Write the run's canonical model to ``out`` and its card to ``out`` + ``.json``; the card."""
    if fmt not in FORMATS:
        raise EtfError(f"--format {fmt!r}: use {' or '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise EtfError(f"--layout {layout!r}: use {' or '.join(LAYOUTS)}")
    check_replaceable(out)
    run = Path(run)
    spec = read_json(run / "stores.json")[0]["spec"]
    name = spec["name"]
    if spec.get("source") == "import":
        raise EtfError(
            f"etf export: the canonical prior {name!r} of {run} was imported with etf cache import; "
            "no encoder to export (fit with a canonical prior etf extracted)"
        )
    if spec.get("source") == "onnx":
        raise EtfError(
            f"etf export: the canonical prior {name!r} of {run} is an ONNX file run by onnxruntime; "
            "a torch graph cannot hold it (fit with a timm or py: canonical prior)"
        )
    p = load_predictor(run, weights, "cpu", "canonical")
    module = Deployable(p, layout).eval()
    size = tuple(p.encoders[0].data_config["input_size"][1:])
    example = torch.zeros(2, *size, 3, dtype=torch.uint8)
    if layout == "nchw":
        example = example.permute(0, 3, 1, 2).contiguous()
    names = [t.name for t in p.tasks]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                torch.onnx.export(
                    module,
                    (example,),
                    str(partial),
                    dynamo=False,  # the TorchScript-based exporter needs no onnxscript
                    opset_version=OPSET,
                    input_names=[INPUT_NAME],
                    output_names=names,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}},
                )
                _check_runs(partial)
            else:
                torch.jit.save(torch.jit.trace(module, example, check_trace=False), str(partial))
    except EtfError:
        partial.unlink(missing_ok=True)
        raise
    except Exception as e:
        partial.unlink(missing_ok=True)
        first = (str(e).strip().splitlines() or [""])[0][:240]
        raise EtfError(f"etf export: cannot export {run} to {fmt} ({type(e).__name__}: {first})") from None
    partial.replace(out)
    card = model_card(run, p, out, fmt, layout, size, module)
    write_json_atomic(card_path(out), card)
    return card


def _check_runs(path: Path) -> None:
    """Refuse a graph onnxruntime cannot load (an operator it lacks), naming it."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        why = str(e).split(" : ")[-1].strip().splitlines()[0][:240]
        raise EtfError(f"etf export: onnxruntime cannot run the exported graph: {why}") from None


def check_replaceable(out: Path) -> None:
    """Refuse an ``--out`` that exists and is not a model etf exported (its card beside it,
    naming it with the file's SHA-256): nothing etf did not write is replaced."""
    out, card = Path(out), card_path(Path(out))
    if not out.exists() and not card.exists():
        return
    try:
        recorded = read_json(card)
        mine = recorded.get("file") == out.name and recorded.get("sha256") == sha256_file(out)
    except (EtfError, OSError, AttributeError):  # no card, not JSON, not a card
        mine = False
    if not mine:
        held = out if out.exists() else card
        raise EtfError(f"--out {out}: {held} exists and is not a model etf exported there; choose a new file name")


def card_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def model_card(
    run: Path, p: Predictor, out: Path, fmt: str, layout: str, size: tuple[int, int], module: Deployable
) -> dict[str, Any]:
    """What a deployment needs to know about the exported file."""
    import timm

    import etf

    metrics = read_json(run / "metrics.json") if (run / "metrics.json").exists() else {}
    spec = p.stores[0]["spec"]
    cfg = p.encoders[0].data_config
    shape = ["batch", *size, 3] if layout == "nhwc" else ["batch", 3, *size]
    versions = {"etf": etf.__version__, "torch": torch.__version__, "timm": timm.__version__}
    versions["python"] = platform.python_version()
    flops = None
    if fmt == "onnx":
        import onnx

        from etf.pipeline.extract.external import graph_flops

        versions["onnx"] = onnx.__version__
        flops = graph_flops(onnx.load(str(out)), INPUT_NAME, (1, *shape[1:]))
    return {
        "format": fmt,
        "file": out.name,
        "sha256": sha256_file(out),
        "run": str(run),
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": layout.upper(),
            "shape": shape,
            "channels": "RGB",
            "preprocessing": (
                "inside the model: x / 255, then (x - mean) / std. Bring each image to the input size as "
                "etf does: resize (interpolation below) so that the shorter side is size / crop_pct, then "
                "crop the centre"
            ),
            "mean": list(cfg["mean"]),
            "std": list(cfg["std"]),
            "interpolation": cfg.get("interpolation"),
            "crop_pct": cfg.get("crop_pct"),
        },
        "outputs": [_task_card(t) for t in p.tasks],
        "inference": "canonical: the canonical prior's encoder, the fuser with the other priors absent, the heads",
        "precision": {"model": "fp32", "store": spec["precision"]},
        "canonical_prior": {k: spec.get(k) for k in ("name", "source", "model", "weights_file", "weights_sha256")},
        "priors": [{"name": s["spec"]["name"], "spec_hash": s.get("spec_hash")} for s in p.stores],
        "fuser": p.config.get("fuser"),
        "metrics": {k: v for k, v in metrics.items() if k.startswith("test")},
        "flops_per_image": flops,
        "versions": versions,
    }


def _task_card(t: Task) -> dict[str, Any]:
    card: dict[str, Any] = {"name": t.name, "kind": t.kind, "columns": t.columns}
    if isinstance(t, Verify):
        card["value"] = "identity embedding (compare by cosine similarity)"
    elif isinstance(t, Classify):
        card.update(value="class probabilities", classes=t.classes)
    elif isinstance(t, MultiLabel):
        card["value"] = "probability of each label (column)"
    else:
        card["value"] = "values in the labels' units" + (
            " (x, y pairs in the pixels of the image etf was given: the face crop before its resize to the input)"
            if t.kind == "landmarks"
            else ""
        )
    return card


def describe(card: dict[str, Any]) -> str:
    """One line per output, for the command's report."""
    lines = [f"input {card['input']['name']}: uint8 {card['input']['layout']} {card['input']['shape']} RGB"]
    lines += [f"output {o['name']}: {o['value']}" for o in card["outputs"]]
    return "\n".join([*lines, f"sha256 {card['sha256']}"])
