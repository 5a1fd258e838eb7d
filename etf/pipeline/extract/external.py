"""Priors that are not timm models: an ONNX file run by onnxruntime (``onnx:PATH?...``) and any
PyTorch module made by the user's own factory (``py:package.module:factory?...``, or an alias a
package registers in the ``etf.encoders`` entry-point group).

Both behave like a timm encoder: their preprocessing is a timm data config (so either input
pipeline can apply it), their outputs become tokens by shape, and their spec hashes what
determines those tokens (the ONNX file's bytes, the module's weights, the options). Query
options, shared by both kinds:

- ``size=S`` or ``size=HxW``: input size (an ONNX graph's static size when not given);
- ``mean=``/``std=``: one value or three, in the model's channel order; on the 0-255 scale
  when any exceeds 1 (``mean=127.5&std=127.5``), else on the 0-1 scale; ``scale=1|255`` says
  which explicitly;
- ``channels=rgb|bgr``, ``layout=nchw|nhwc``: what the model's input expects;
- ``output=A,B``: tensors to read (ONNX: any tensor or node of the graph, whose outputs are
  extended to it; py: submodules, read by a forward hook, an empty name the module's own
  output, as in ``output=body,``; default the model's own output);
  ``--layers`` picks among them by position (default the last);
- ``prefix=K``: leading tokens of an (N, T, D) output that are not a square patch grid;
- ``name=``: the prior's name in the cache (default the file's stem, or the factory's name);
- ``input=``: the ONNX graph input to feed (default its only one).

Output shapes map to tokens: (N, D) is one token; (N, C, H, W) an H x W grid of C-wide tokens;
(N, T, D) T tokens (after ``prefix``, a square grid when there is one).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch
from torch import nn

from etf.cache.tokens import TokenLayout
from etf.errors import EtfError
from etf.pipeline.extract.checkpoints import LoadReport, load_into, read_state_dict
from etf.pipeline.extract.encoders import Encoder, state_sha256
from etf.utils import sha256_file

PREFIXES = ("onnx:", "py:")
ENTRY_POINT_GROUP = "etf.encoders"
COMMON_OPTIONS = ("size", "mean", "std", "scale", "channels", "layout", "output", "prefix", "name")
OPTIONS = {"onnx": (*COMMON_OPTIONS, "input"), "py": COMMON_OPTIONS}
#: timm's ImageNet normalisation, for a factory that states none
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def is_external(name: str) -> bool:
    return name.startswith(PREFIXES)


def entry_point_aliases() -> dict[str, str]:
    """``etf.encoders`` entry points: alias -> ``package.module:factory``."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def split_spec(name: str) -> tuple[str, str, dict[str, str]]:
    """``kind:target?k=v&...`` to (kind, target, options); unknown options are refused."""
    kind, _, rest = name.partition(":")
    target, _, query = rest.partition("?")
    if not target:
        raise EtfError(f"--encoder {name!r}: expected {kind}:{'PATH' if kind == 'onnx' else 'package.module:factory'}")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise EtfError(f"--encoder {name!r}: options go as ?key=value&key=value") from None
    options = dict(pairs)
    unknown = sorted(set(options) - set(OPTIONS[kind]))
    if unknown or len(options) != len(pairs):
        bad = ", ".join(unknown) or "an option given twice"
        raise EtfError(f"--encoder {name!r}: {bad}: not a {kind}: option (use {', '.join(OPTIONS[kind])})")
    return kind, target, options


def canonical(kind: str, target: str, options: dict[str, str]) -> str:
    """The spec's ``model``: what rebuilds the encoder, options sorted, the name left out."""
    kept = sorted((k, v) for k, v in options.items() if k != "name")
    return f"{kind}:{target}" + ("?" + "&".join(f"{k}={v}" for k, v in kept) if kept else "")


@dataclass(frozen=True)
class InputOrder:
    """What a model expects beyond a timm data config (its ``Encoder.preprocess``): its
    channel order and layout, applied to the normalised batch."""

    channels: str = "rgb"
    layout: str = "nchw"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels == "bgr":
            x = x.flip(1)
        return x.permute(0, 2, 3, 1) if self.layout == "nhwc" else x


def _floats(name: str, key: str, value: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in value.split(","))
    except ValueError:
        vals = ()
    if len(vals) not in (1, 3):
        raise EtfError(f"--encoder {name!r}: {key}={value}: one number or three, comma-separated")
    return vals * 3 if len(vals) == 1 else vals


def parse_size(name: str, value: str) -> tuple[int, int]:
    h, _, w = value.lower().partition("x")
    try:
        size = (int(h), int(w or h))
    except ValueError:
        size = (0, 0)
    if min(size) < 1:
        raise EtfError(f"--encoder {name!r}: size={value}: expected S or HxW in pixels")
    return size


def data_config(
    name: str, options: dict[str, str], size: tuple[int, int], defaults: dict[str, Any] | None = None
) -> tuple[dict[str, Any], InputOrder]:
    """The timm data config (RGB order, 0-1 scale) and the channel order and layout."""
    defaults = defaults or {}
    channels = options.get("channels", "rgb").lower()
    layout = options.get("layout", "nchw").lower()
    if channels not in ("rgb", "bgr"):
        raise EtfError(f"--encoder {name!r}: channels={channels}: use rgb or bgr")
    if layout not in ("nchw", "nhwc"):
        raise EtfError(f"--encoder {name!r}: layout={layout}: use nchw or nhwc")
    mean = _floats(name, "mean", options["mean"]) if "mean" in options else tuple(defaults.get("mean", IMAGENET_MEAN))
    std = _floats(name, "std", options["std"]) if "std" in options else tuple(defaults.get("std", IMAGENET_STD))
    scale = options.get("scale") or ("255" if max(*mean, *std) > 1 else "1")
    if scale not in ("1", "255"):
        raise EtfError(f"--encoder {name!r}: scale={scale}: use 1 (0-1 pixels) or 255 (0-255 pixels)")
    if min(std) <= 0:
        raise EtfError(f"--encoder {name!r}: std must be positive")
    div = float(scale)
    mean, std = (tuple(v / div for v in vals) for vals in (mean, std))
    if channels == "bgr":  # given in the model's order; the transform works in RGB
        mean, std = mean[::-1], std[::-1]
    config = {
        "input_size": (3, *size),
        "interpolation": "bilinear",
        "mean": mean,
        "std": std,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    return config, InputOrder(channels, layout)


def to_tokens(name: str, output: str, t: torch.Tensor, prefix: int) -> tuple[torch.Tensor, TokenLayout]:
    """An output tensor as (N, T, D) tokens and their layout, by its shape."""
    label = f"--encoder {name!r}: output {output or '(the model output)'}"
    if t.ndim == 2:
        return t[:, None], TokenLayout(1, None)
    if t.ndim == 4:
        return t.flatten(2).transpose(1, 2), TokenLayout(0, (t.shape[2], t.shape[3]))
    if t.ndim == 3:
        side = math.isqrt(max(t.shape[1] - prefix, 0))
        if prefix > t.shape[1]:
            raise EtfError(f"{label} has {t.shape[1]} tokens, fewer than prefix={prefix}")
        if side and side * side == t.shape[1] - prefix:
            return t, TokenLayout(prefix, (side, side))
        return t, TokenLayout(t.shape[1], None)
    raise EtfError(
        f"{label} has shape {tuple(t.shape)}: etf maps (N, D), (N, C, H, W) or (N, T, D) to tokens; "
        "name another with ?output="
    )


@dataclass
class ExternalEncoder(Encoder):
    """An encoder whose outputs (``outputs``, read by position as layers) are mapped to tokens
    by shape; ``spec()`` adds the options that shape them."""

    outputs: list[str] = field(default_factory=list)
    prefix: int = 0
    order: InputOrder = field(default_factory=InputOrder)

    @property
    def layer_kind(self) -> str:
        return "outputs (?output=)"

    @property
    def num_layers(self) -> int:
        return len(self.outputs)

    def run(self, x: torch.Tensor, wanted: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.inference_mode()
    def tokens(self, x: torch.Tensor, layers: list[int], norm: bool = True) -> list[tuple[torch.Tensor, TokenLayout]]:
        wanted = [self.outputs[layer - 1] for layer in layers]
        got = self.run(self.order.apply(x), wanted)
        return [to_tokens(self.name, o, got[o].float(), self.prefix) for o in wanted]

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "outputs": self.outputs}


class OnnxModule(nn.Module):
    """An onnxruntime session behind ``nn.Module``: ``.to(device)`` picks its provider (CUDA
    when the device is a GPU and onnxruntime has it, else the CPU)."""

    def __init__(self, graph: bytes, input_name: str, dtype: np.dtype, batch_one: bool) -> None:
        super().__init__()
        self.graph, self.input_name, self.dtype, self.batch_one = graph, input_name, dtype, batch_one
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # follows .to(device)
        self._sessions: dict[str, Any] = {}

    def session(self) -> Any:
        import onnxruntime as ort

        cuda = self.anchor.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        key = "cuda" if cuda else "cpu"
        if key not in self._sessions:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
            self._sessions[key] = ort.InferenceSession(self.graph, providers=providers)
        return self._sessions[key]

    def forward(self, x: torch.Tensor, wanted: list[str]) -> dict[str, torch.Tensor]:
        sess = self.session()
        arr = x.detach().float().cpu().numpy().astype(self.dtype, copy=False)
        batches = [arr[i : i + 1] for i in range(len(arr))] if self.batch_one else [arr]
        runs = [sess.run(wanted, {self.input_name: b}) for b in batches]
        return {o: torch.from_numpy(np.concatenate([r[k] for r in runs])).to(x.device) for k, o in enumerate(wanted)}


@dataclass
class OnnxEncoder(ExternalEncoder):
    source: str = "onnx"
    #: from the graph (:func:`graph_flops`); None: unknown
    flops: int | None = None
    #: onnxruntime computes in the graph's own precision, never under torch's autocast
    fixed_precision: str | None = "fp32"

    def run(self, x: torch.Tensor, wanted: list[str]) -> dict[str, torch.Tensor]:
        return self.model(x, wanted)

    def probe(self, layers: list[int], norm: bool = True) -> tuple[list[tuple[torch.Tensor, TokenLayout]], int | None]:
        x = torch.zeros(1, *self.data_config["input_size"], device=self.model.anchor.device)
        return self.tokens(x, layers, norm), self.flops


@dataclass
class ModuleEncoder(ExternalEncoder):
    source: str = "py"
    #: SHA-256 of the file that defines the factory: an edit of the user's code is a new store
    code_sha256: str = ""

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "code_sha256": self.code_sha256}

    def run(self, x: torch.Tensor, wanted: list[str]) -> dict[str, torch.Tensor]:
        modules = dict(self.model.named_modules())
        got: dict[str, Any] = {}
        hooks = [
            modules[o].register_forward_hook(lambda _m, _i, out, o=o: got.__setitem__(o, out)) for o in wanted if o
        ]
        try:
            out = self.model(x)
        finally:
            for h in hooks:
                h.remove()
        got[""] = out
        for o in wanted:
            if not isinstance(got.get(o), torch.Tensor):
                what = f"submodule {o!r}" if o else "the module"
                raise EtfError(
                    f"--encoder {self.name!r}: {what} gives {type(got.get(o)).__name__}, not a tensor; "
                    "name a submodule that gives one with ?output="
                )
        return {o: got[o] for o in wanted}


def create_external(
    name: str,
    *,
    weights: list[Path],
    img_size: int | None,
    allow_partial: bool,
    device: str | torch.device,
    alias: str | None = None,
) -> ExternalEncoder:
    """An ``onnx:`` or ``py:`` encoder (``alias``: the entry-point name it was asked by)."""
    kind, target, options = split_spec(name)
    label = alias or name
    if img_size is not None:
        if "size" in options and parse_size(label, options["size"]) != (img_size, img_size):
            raise EtfError(f"--img-size {img_size}: differs from size={options['size']} of --encoder {label}")
        options.setdefault("size", str(img_size))
    try:
        prefix = int(options.get("prefix", "0"))
    except ValueError:
        prefix = -1
    if prefix < 0:
        raise EtfError(f"--encoder {label!r}: prefix={options['prefix']}: a count of tokens (0 or more)")
    outputs = options["output"].split(",") if options.get("output") else None  # py: "" is the module's own
    build = _onnx if kind == "onnx" else _module
    return build(label, target, options, outputs, prefix, weights, allow_partial, device, alias)


def _onnx(
    label: str,
    target: str,
    options: dict[str, str],
    outputs: list[str] | None,
    prefix: int,
    weights: list[Path],
    allow_partial: bool,
    device: str | torch.device,
    alias: str | None,
) -> OnnxEncoder:
    try:
        import onnx
    except ImportError:
        raise EtfError(f"--encoder {label!r}: needs onnx and onnxruntime (pip install 'etf[onnx]')") from None
    if len(weights) > 1:
        raise EtfError(f"--encoder {label!r}: one ONNX file, not a soup of {len(weights)}")
    path = weights[0] if weights else Path(target)  # etf predict passes the file the prior was made with
    if not path.is_file():
        raise EtfError(f"--encoder {label!r}: ONNX file {path} not found")
    try:
        graph = onnx.load(str(path))
        onnx.checker.check_model(graph)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise EtfError(f"--encoder {label!r}: {path} is not a valid ONNX model ({type(e).__name__}: {first})") from None
    inputs = [i for i in graph.graph.input if i.name not in {t.name for t in graph.graph.initializer}]
    if "input" in options:
        inputs = [i for i in inputs if i.name == options["input"]]
        if not inputs:
            raise EtfError(f"--encoder {label!r}: input={options['input']}: {path} has no such graph input")
    elif len(inputs) != 1:
        raise EtfError(
            f"--encoder {label!r}: {path} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); pick one with ?input="
        )
    inp = inputs[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    layout = options.get("layout", "nchw").lower()
    if len(dims) != 4:
        raise EtfError(
            f"--encoder {label!r}: input {inp.name} of {path} has {len(dims)} dimensions, not an image batch"
        )
    static = (dims[1], dims[2]) if layout == "nhwc" else (dims[2], dims[3])
    if "size" in options:
        size = parse_size(label, options["size"])
        if None not in static and tuple(static) != size:
            raise EtfError(f"--encoder {label!r}: size={options['size']} but {path} takes {static[0]}x{static[1]}")
    elif None in static:
        raise EtfError(f"--encoder {label!r}: {path} takes any input size; give it with ?size=")
    else:
        size = tuple(static)
    config, pre = data_config(label, options, size)

    produced = {o for n in graph.graph.node for o in n.output}
    by_node = {n.name: n.output[0] for n in graph.graph.node if n.name and n.output}
    graph_outputs = [o.name for o in graph.graph.output]
    outputs = outputs or graph_outputs[:1]
    resolved = []
    for o in outputs:
        if o not in produced and o not in graph_outputs and o not in by_node:
            near = ", ".join(graph_outputs[:3])
            raise EtfError(
                f"--encoder {label!r}: output={o}: no tensor or node of that name in {path} (outputs: {near})"
            )
        resolved.append(o if (o in produced or o in graph_outputs) else by_node[o])
    extended = onnx.ModelProto()
    extended.CopyFrom(graph)
    for o in resolved:
        if o not in graph_outputs:
            extended.graph.output.append(onnx.ValueInfoProto(name=o))
    data = extended.SerializeToString()
    from onnx.helper import tensor_dtype_to_np_dtype

    dtype = tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    module = OnnxModule(data, inp.name, dtype, dims[0] == 1).to(device)
    stem = options.get("name") or alias or path.stem
    enc = OnnxEncoder(
        name=stem,
        model=module,
        model_name=canonical("onnx", path.name, options),
        pretrained=None,
        weights_file=path.name,
        init_seed=None,
        data_config=config,
        weights_sha256=sha256_file(path),
        outputs=resolved,
        prefix=prefix,
        order=pre,
    )
    enc.flops = graph_flops(extended, inp.name, pre.apply(torch.zeros(1, *config["input_size"])).shape)
    try:
        enc.probe([enc.num_layers])
    except EtfError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise EtfError(f"--encoder {label!r}: onnxruntime cannot run {path}: {type(e).__name__}: {first}") from None
    for layer in range(1, enc.num_layers):  # every output must map to tokens, not only the last
        enc.probe([layer])
    return enc


def graph_flops(graph: Any, input_name: str, shape: tuple[int, ...]) -> int | None:
    """FLOPs of one image (multiply-add = 2) in the graph's Conv, Gemm and MatMul nodes (what
    torch's counter counts). The shapes are those of one run of the graph on zeros of
    ``shape``, every operand made an output; None when that run fails."""
    import onnx
    import onnxruntime as ort
    from onnx.helper import tensor_dtype_to_np_dtype

    nodes = [n for n in graph.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    shapes: dict[str, tuple[int, ...]] = {t.name: tuple(t.dims) for t in graph.graph.initializer}
    shapes[input_name] = tuple(shape)
    wanted = list(dict.fromkeys(t for n in nodes for t in (n.output[0], *n.input[:2]) if t not in shapes))
    g = onnx.ModelProto()
    g.CopyFrom(graph)
    del g.graph.output[:]
    g.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted)
    inp = next(i for i in g.graph.input if i.name == input_name)
    zeros = np.zeros(shape, tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))
    try:
        sess = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
        shapes.update({t: v.shape for t, v in zip(wanted, sess.run(wanted, {input_name: zeros}))})
    except Exception:  # a graph onnxruntime cannot run alone on the CPU: unknown
        return None
    total = 0
    for n in nodes:
        out, a, b = shapes[n.output[0]], shapes[n.input[0]], shapes[n.input[1]]
        if n.op_type == "Conv":
            inner = math.prod(b[1:])
        elif n.op_type == "Gemm":
            inner = a[0] if any(at.name == "transA" and at.i for at in n.attribute) else a[-1]
        else:
            inner = a[-1]
        total += 2 * math.prod(out) * inner
    return total


def _module(
    label: str,
    target: str,
    options: dict[str, str],
    outputs: list[str] | None,
    prefix: int,
    weights: list[Path],
    allow_partial: bool,
    device: str | torch.device,
    alias: str | None,
) -> ModuleEncoder:
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise EtfError(f"--encoder {label!r}: expected py:package.module:factory")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except ImportError as e:
        raise EtfError(f"--encoder {label!r}: cannot import {mod_name} ({e})") from None
    except AttributeError:
        raise EtfError(f"--encoder {label!r}: {mod_name} has no {attr}") from None
    if not callable(factory):
        raise EtfError(f"--encoder {label!r}: {target} is not callable")
    made = factory()
    model, pre = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not isinstance(model, nn.Module):
        raise EtfError(f"--encoder {label!r}: {target}() returned {type(model).__name__}, not a torch.nn.Module")
    pre = dict(pre or {})
    modules = dict(model.named_modules())
    outputs = outputs or [""]
    for o in outputs:
        if o not in modules:
            near = ", ".join(n for n, _ in list(model.named_children())[:5])
            raise EtfError(f"--encoder {label!r}: output={o}: {target}() has no submodule {o!r} (children: {near})")
    if "size" in options:
        size = parse_size(label, options["size"])
    elif "size" in pre:
        size = (pre["size"], pre["size"]) if isinstance(pre["size"], int) else tuple(pre["size"])
    else:
        raise EtfError(f"--encoder {label!r}: give the input size with ?size= (or return it from {attr})")
    config, order = data_config(label, options, size, pre)
    report: LoadReport | None = None
    if len(weights) > 1:
        raise EtfError(f"--encoder {label!r}: one --weights file for a py: prior")
    if weights:
        report = load_into(model, read_state_dict(weights[0]), weights[0], allow_partial)
    model.eval().requires_grad_(False)
    enc = ModuleEncoder(
        name=options.get("name") or alias or attr,
        model=model.to(device),
        model_name=canonical("py", target, options),
        pretrained=None,
        weights_file=weights[0].name if weights else None,
        init_seed=None,
        data_config=config,
        weights_sha256=state_sha256(model),
        load_report=report,
        outputs=outputs,
        prefix=prefix,
        order=order,
        code_sha256=_source_sha256(factory),
    )
    for layer in range(1, enc.num_layers + 1):  # every output must map to tokens before any work
        enc.probe([layer])
    return enc


def _source_sha256(factory: Any) -> str:
    """SHA-256 of the file defining ``factory`` (empty when it has none, e.g. a builtin)."""
    import inspect

    try:
        path = inspect.getsourcefile(factory)
    except TypeError:
        path = None
    return sha256_file(path) if path else ""
