"""The encoder registry: short aliases for timm models, and one token API for ViTs and CNNs.

``create_encoder("vit_b")`` gives a frozen :class:`Encoder` whose ``tokens(x, layers)``
returns, per requested layer, a (B, T, D) sequence of prefix tokens followed by patch
tokens, and whose ``spec()`` is what the token store's key hashes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch import nn

from etf.cache.tokens import TokenLayout, module_pool
from etf.errors import EtfError
from etf.pipeline.extract.checkpoints import LoadReport, adapt_state_dict, load_into, read_state_dict, soup
from etf.pipeline.extract.preprocess import Preprocess


@dataclass(frozen=True)
class Alias:
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)


#: Short names used throughout the papers; each maps to a timm model with a pretrained tag.
ALIASES: dict[str, Alias] = {
    "vit_t": Alias("vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
    "vit_s": Alias("vit_small_patch16_224.augreg_in21k_ft_in1k"),
    "vit_b": Alias("vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    "vit_l": Alias("vit_large_patch16_224.augreg_in21k_ft_in1k"),
    "dinov2_s": Alias("vit_small_patch14_dinov2.lvd142m", {"img_size": 224}),
    "dinov2_b": Alias("vit_base_patch14_dinov2.lvd142m", {"img_size": 224}),
    "clip_b16": Alias("vit_base_patch16_clip_quickgelu_224.openai"),  # OpenAI CLIP is QuickGELU natively
    "mae_b": Alias("vit_base_patch16_224.mae"),
    "convnext_t": Alias("convnext_tiny.fb_in22k_ft_in1k"),
    "resnet50": Alias("resnet50.a1_in1k"),
}

HOW_TO_FIX_PRETRAINED = (
    "connect to the Hugging Face hub once (or point HF_HOME at a populated cache and set HF_HUB_OFFLINE=1), "
    "or pass --weights FILE for a local checkpoint, or --no-pretrained for a random init"
)
HUB_PROBE_SECONDS = 3.0


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) accepts a connection, asked once with a
    short time-out; False in offline mode (``HF_HUB_OFFLINE=1``)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def hub_offline_unless_reachable() -> Iterator[bool]:
    """Offline mode while building a pretrained model when the hub cannot be reached: weights
    in the local cache still load, and missing ones fail at once instead of after a minute of
    retries. Yields whether the hub was reachable."""
    from huggingface_hub import constants

    reachable = hub_reachable()
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or not reachable
    try:
        yield reachable
    finally:
        constants.HF_HUB_OFFLINE = before


def resolve_name(name: str) -> tuple[str, dict[str, Any]]:
    """Alias or timm name to (timm name with tag, default create_model kwargs)."""
    if name in ALIASES:
        return ALIASES[name].model, dict(ALIASES[name].kwargs)
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise EtfError(
            f"--encoder {name!r}: unknown encoder (aliases: {', '.join(ALIASES)}; or any timm model name, "
            "onnx:FILE.onnx, py:package.module:factory, or an etf.encoders entry point)"
        )
    return name, {}


def state_sha256(model: nn.Module) -> str:
    """Hash of every tensor in the model: identifies the weights whatever file they came from."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Encoder:
    """A frozen timm model plus everything needed to reproduce its tokens."""

    name: str
    model: nn.Module
    model_name: str
    pretrained: str | None
    weights_file: str | None
    init_seed: int | None
    data_config: dict[str, Any]
    weights_sha256: str
    load_report: LoadReport | None = None
    #: a soup's sources, in order: each file's name and the weights_sha256 it alone gives
    soup: list[dict[str, str]] | None = None
    #: the model's own pooling (timm's ``global_pool``, see ``etf.cache.tokens.module_pool``;
    #: empty: the layout default) and why it differs from what the model does, if it does
    pool: str = ""
    pool_note: str | None = None
    #: what made the tokens (the store spec's ``source``): timm, onnx, py
    source: str = "timm"
    #: the one precision the encoder computes in whatever ``--precision`` says (None: any)
    fixed_precision: str | None = None

    @property
    def is_vit(self) -> bool:
        return "return_prefix_tokens" in inspect.signature(self.model.forward_intermediates).parameters

    @property
    def num_layers(self) -> int:
        return len(self.model.feature_info)

    @property
    def layer_kind(self) -> str:
        return "blocks" if self.is_vit else "feature stages"

    @property
    def device(self) -> torch.device:
        return next(iter([*self.model.parameters(), *self.model.buffers()]), torch.empty(0)).device

    def resolve_layers(self, layers: list[int] | None) -> list[int]:
        """1-based layer numbers (ViT blocks, CNN stages); negatives count from the end."""
        n = self.num_layers
        out = []
        for layer in layers or [-1]:
            if not (1 <= layer <= n or -n <= layer <= -1):
                raise EtfError(f"--layers {layer}: {self.name} has {n} {self.layer_kind} (1..{n}, or -1 for the last)")
            out.append(layer if layer > 0 else n + 1 + layer)
        if len(set(out)) != len(out):
            raise EtfError(f"--layers {','.join(map(str, layers or []))}: a layer is repeated")
        return out

    def transform(self):
        return create_transform(**self.data_config, is_training=False)

    @functools.cached_property
    def preprocess(self) -> Preprocess:
        """What the model's input must look like (size, mean, std, interpolation, crop): what
        both decode paths of extraction, and prediction, prepare images by."""
        return Preprocess.from_data_config(self.data_config)

    @torch.inference_mode()
    def tokens(self, x: torch.Tensor, layers: list[int], norm: bool = True) -> list[tuple[torch.Tensor, TokenLayout]]:
        """Per layer, the (B, T, D) token sequence and its layout (prefix count, patch grid).
        Blocks after the last requested layer are not run."""
        idx = [layer - 1 for layer in layers]
        if self.is_vit:
            feats = self.model.forward_intermediates(
                x,
                indices=idx,
                norm=norm,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=True,
            )
            grid = tuple(self.model.patch_embed.dynamic_feat_size(x.shape[-2:]))
            out = []
            for patches, prefix in feats:
                if prefix is None:
                    prefix = patches[:, :0]
                out.append((torch.cat([prefix, patches], dim=1), TokenLayout(prefix.shape[1], grid, self.pool)))
            return out
        feats = self.model.forward_intermediates(x, indices=idx, norm=norm, stop_early=True, intermediates_only=True)
        return [(f.flatten(2).transpose(1, 2), TokenLayout(0, (f.shape[2], f.shape[3]), self.pool)) for f in feats]

    def probe(self, layers: list[int], norm: bool = True) -> tuple[list[tuple[torch.Tensor, TokenLayout]], int]:
        """Tokens of one blank image (their shapes plan a store) and the forward FLOPs they
        took (multiply-add = 2 FLOPs), from a single forward."""
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, *self.data_config["input_size"], device=self.device)
        with FlopCounterMode(display=False) as counter:
            out = self.tokens(x, layers, norm)
        return out, int(counter.get_total_flops())

    def spec(self) -> dict[str, Any]:
        """The encoder's part of a store spec: what determines its tokens, nothing else (a
        soup's sources too; absent otherwise, so that other specs keep their hashes)."""
        spec = {
            "model": self.model_name,
            "pretrained": self.pretrained,
            "weights_file": self.weights_file,
            "init_seed": self.init_seed,
            "weights_sha256": self.weights_sha256,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
        }
        return {**spec, "soup": self.soup} if self.soup else spec


def create_encoder(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | Path | Sequence[str | Path] | None = None,
    seed: int = 0,
    img_size: int | None = None,
    allow_partial: bool = False,
    device: str | torch.device = "cpu",
) -> Encoder:
    """Build a frozen encoder.

    Weights come from exactly one place: ``weights`` (a local file, or several files of one
    architecture averaged into a soup), timm's pretrained tag (``pretrained=True``), or a
    random init from ``seed``. A pretrained download that fails is an error with the fix,
    never a silent random init.
    """
    files = [Path(weights)] if isinstance(weights, (str, Path)) else [Path(w) for w in weights or []]
    external = _external_target(name)
    if external is not None:
        from etf.pipeline.extract.external import create_external

        spec, alias = external
        return create_external(
            spec, weights=files, img_size=img_size, allow_partial=allow_partial, device=device, alias=alias
        )
    model_name, kwargs = resolve_name(name)
    if img_size is not None:
        kwargs["img_size"] = img_size
    arch = model_name.split(".")[0]
    use_hub = pretrained and not files
    torch.manual_seed(seed)
    reachable = True
    try:
        with hub_offline_unless_reachable() if use_hub else nullcontext(True) as reachable:
            model = _create(model_name, use_hub, kwargs)
    except EtfError:
        raise
    except Exception as e:
        if use_hub:
            why = (
                "the Hugging Face hub cannot be reached (or HF_HUB_OFFLINE is set) and they are not in the local cache"
                if not reachable
                else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            raise EtfError(
                f"--encoder {name}: cannot load pretrained weights for {model_name} ({why}); fix: {HOW_TO_FIX_PRETRAINED}"
            ) from None
        raise EtfError(f"--encoder {name}: cannot build {model_name}: {e}") from None
    if not hasattr(model, "forward_intermediates"):
        raise EtfError(f"--encoder {name}: {arch} has no forward_intermediates in timm {timm.__version__}")
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if img_size is not None and patch is not None and any(img_size % p for p in patch):
        raise EtfError(
            f"--img-size {img_size}: not a multiple of {name}'s patch size {patch[0]} "
            f"(the last {img_size % patch[0]} pixels would be cut off); use {img_size - img_size % patch[0] or patch[0]}"
        )
    pool, pool_note = module_pool(model)  # before reset_classifier, which may reset it
    model.reset_classifier(0)
    report, sources = None, None
    if files:
        states = [(path, adapt_state_dict(read_state_dict(path), model, path)) for path in files]
        state = soup(states) if len(states) > 1 else states[0][1]  # refuses sources that do not correspond
        if len(states) > 1:
            sources = []
            for path, source in states:  # what each source alone gives (same keys: same init elsewhere)
                load_into(model, source, path, allow_partial)
                sources.append({"file": path.name, "weights_sha256": state_sha256(model)})
        label = files[0] if len(files) == 1 else Path(" + ".join(map(str, files)))
        report = load_into(model, state, label, allow_partial)
    model.eval().requires_grad_(False)
    overrides = {"input_size": (3, img_size, img_size)} if img_size else {}
    if "img_size" in kwargs and not overrides:
        overrides = {"input_size": (3, kwargs["img_size"], kwargs["img_size"])}
    data_config = resolve_data_config(overrides, model=model)
    return Encoder(
        name=name,
        model=model.to(device),
        model_name=model_name,
        pretrained=model_name if use_hub else None,
        weights_file="+".join(f.name for f in files) if files else None,
        init_seed=None if (use_hub or files) else seed,
        data_config=data_config,
        weights_sha256=state_sha256(model),
        load_report=report,
        soup=sources,
        pool=pool,
        pool_note=pool_note,
    )


def _external_target(name: str) -> tuple[str, str | None] | None:
    """``onnx:``/``py:`` specs as given, and an ``etf.encoders`` entry-point alias (``alias?opts``)
    as the ``py:`` spec it stands for with its name; None for timm names."""
    from etf.pipeline.extract.external import entry_point_aliases, is_external

    if is_external(name):
        return name, None
    alias, sep, query = name.partition("?")
    if alias in ALIASES or (not sep and timm.is_model(alias.split(".")[0])):
        return None
    target = entry_point_aliases().get(alias)
    return (f"py:{target}{sep}{query}", alias) if target else None


def _create(model_name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model``, dropping ``img_size`` for models (CNNs) that take any size."""
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if "img_size" in kwargs and "img_size" in str(e):
            kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
            return timm.create_model(model_name, pretrained=pretrained, **kwargs)
        raise
