"""Local checkpoint files to a state dict that fits a timm model, with a report of the fit.

Face-pretrained priors come as ``.pth``/``.pt``/``.bin``/``.safetensors`` files saved by
other code bases; this module unwraps their containers (``read_state_dict``), converts their
layouts (``adapt_state_dict``: torchvision ResNets, MAE/MIM ViTs, OpenAI-CLIP towers such as
FaRL's), averages same-architecture checkpoints into one (``soup``) and reports what fitted
(``load_into``).
"""

from __future__ import annotations

import pickle
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from etf.errors import EtfError

WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module", "net")
STRIP_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a checkpoint file; ``torch.load`` only with ``weights_only=True``."""
    if not path.is_file():
        raise EtfError(f"--weights {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch explains weights_only in paragraphs; this is what they say
        raise EtfError(
            f"--weights {path}: cannot read checkpoint: not a file of tensors (torch.load with weights_only=True "
            "refused it: it is not a torch file, or it holds Python objects that are not tensors)"
        ) from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise EtfError(f"--weights {path}: cannot read checkpoint ({type(e).__name__}: {first})") from None
    while isinstance(obj, dict):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise EtfError(f"--weights {path}: no tensors found in the checkpoint")
    for prefix in STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


@dataclass
class LoadReport:
    """What a checkpoint set in the model, and what it left random or could not use."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    loaded_fraction: float = 0.0

    def summary(self) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        parts = [f"loaded {len(self.loaded)} tensors ({self.loaded_fraction:.1%} of parameters)"]
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {few(self.missing)}")
        if self.unexpected:
            parts.append(f"unused {len(self.unexpected)}: {few(self.unexpected)}")
        if self.mismatched:
            parts.append(f"shape mismatch {len(self.mismatched)}: {few(self.mismatched)}")
        return "; ".join(parts)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, allow_partial: bool) -> LoadReport:
    """Copy matching tensors of ``state`` into ``model`` and report the rest.

    Refuses (unless ``allow_partial``) a checkpoint that leaves more than half of the
    model's parameters at their random initialisation, or that has a tensor of the right
    name but the wrong shape: both mean the file was made for another architecture.
    """
    own = model.state_dict()
    report = LoadReport()
    usable = {}
    for k, v in state.items():
        if k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            report.mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
        else:
            usable[k] = v
    report.loaded = sorted(usable)
    report.missing = sorted(k for k in own if k not in usable)
    total = sum(t.numel() for t in own.values() if t.is_floating_point()) or 1
    report.loaded_fraction = sum(own[k].numel() for k in usable if own[k].is_floating_point()) / total
    if not allow_partial and (report.mismatched or report.loaded_fraction < 0.5):
        raise EtfError(
            f"--weights {path}: does not fit {type(model).__name__}: {report.summary()} (use --allow-partial to load anyway)"
        )
    model.load_state_dict(usable, strict=False)
    return report


#: prefixes preferred when several fit the model equally well: MoCo's query encoder over its
#: momentum copy, a wrapper's encoder or backbone over its other parts
PREFERRED_PREFIXES = ("", "encoder.", "backbone.", "encoder_q.", "module.encoder_q.", "online_encoder.", "student.")


def adapt_state_dict(
    state: dict[str, torch.Tensor], model: nn.Module, path: Path | None = None
) -> dict[str, torch.Tensor]:
    """Rename a foreign checkpoint's keys to the model's layout (identity for timm's own).

    Recognised: OpenAI-CLIP visual towers (``visual.conv1``, ``visual.transformer.resblocks``:
    FaRL) through timm's own converter; any prefix in front of the model's key names
    (``encoder.``, ``backbone.``, ``module.encoder_q.``: torchvision ResNets, MAE/MIM ViTs),
    the one under which most keys fit; for ViTs, ``fc_norm`` where the model has ``norm`` (or
    the reverse). Then timm's own converter for the architecture (original DINOv2 and
    ConvNeXt layouts, position embeddings resampled to the model's input size, ...). Keys
    that fit nothing keep their names, so that ``load_into`` reports them as unused.
    """
    from timm.models.vision_transformer import VisionTransformer

    own = model.state_dict()
    if isinstance(model, VisionTransformer):
        state = _from_openai_clip(state, model)
    state = _strip_prefix(state, own)
    if isinstance(model, VisionTransformer):
        state = _swap_final_norm(state, own)
    return _timm_convert(state, model, path)


def _from_openai_clip(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """An OpenAI-CLIP layout visual tower (under any prefix) in timm's names; the rest (a text
    tower) is kept as it is."""
    from timm.models.vision_transformer import _convert_openai_clip

    key = next((k for k in state if k.endswith("visual.class_embedding")), None)
    if key is None:
        return state
    prefix = key[: -len("class_embedding")]
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return {**rest, **_convert_openai_clip(state, model, prefix=prefix)}


def _strip_prefix(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the key prefix under which most keys are the model's own names."""
    counts: Counter[str] = Counter()
    for k in state:
        counts.update(k[: i + 1] for i, ch in enumerate(k) if ch == "." and k[i + 1 :] in own)
        if k in own:
            counts[""] += 1
    if not counts:
        return state
    best = max(counts, key=lambda p: (counts[p], p in PREFERRED_PREFIXES))
    if not best:
        return state
    rest = {k: v for k, v in state.items() if not k.startswith(best)}
    return {**rest, **{k[len(best) :]: v for k, v in state.items() if k.startswith(best)}}


def _swap_final_norm(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MAE fine-tuning keeps the final LayerNorm as ``fc_norm`` (after pooling); a token model
    has it as ``norm``, or the reverse: use the checkpoint's under the model's name."""
    for have, want in (("fc_norm.", "norm."), ("norm.", "fc_norm.")):
        present = {k[len(have) :] for k in state if k.startswith(have)}
        if (
            present
            and not any(k.startswith(want) for k in state)
            and all(want + k in own for k in present)
            and not any(have + k in own for k in present)
        ):
            return {(want + k[len(have) :] if k.startswith(have) else k): v for k, v in state.items()}
    return state


def _timm_convert(state: dict[str, torch.Tensor], model: nn.Module, path: Path | None) -> dict[str, torch.Tensor]:
    """``state`` through timm's ``checkpoint_filter_fn`` for the model's architecture;
    unchanged where timm has none."""
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is None:
        return state
    try:
        return convert(state, model)
    except Exception as e:  # converters index and reshape freely; any failure means a foreign layout
        raise EtfError(
            f"--weights {path or 'checkpoint'}: cannot convert it for {type(model).__name__} ({type(e).__name__}: {e})"
        ) from None


def soup(states: list[tuple[Path, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The uniform average of same-architecture checkpoints (a model soup; the authors'
    ``ModelSoupsAverage`` baseline): every floating-point tensor is the mean of the sources'
    (computed in float64, stored in the first source's dtype), the others (BatchNorm's
    ``num_batches_tracked``) the first source's. Their averaging is pairwise, 0.5/0.5 in
    turn, which weighs a third checkpoint twice; this one weighs every source alike.
    Sources whose keys or shapes differ are refused: their tensors do not correspond.
    """
    (first_path, first), rest = states[0], states[1:]
    for path, state in rest:
        if state.keys() != first.keys():
            key = sorted(state.keys() ^ first.keys())[0]
            where = first_path.name if key in first else path.name
            raise EtfError(
                f"--soup: {first_path.name} and {path.name} hold different tensors ({key!r} only in {where}); "
                "a soup averages checkpoints of one architecture"
            )
        for k, v in state.items():
            if v.shape != first[k].shape:
                raise EtfError(
                    f"--soup: {k!r} is {tuple(first[k].shape)} in {first_path.name} but {tuple(v.shape)} in {path.name}; "
                    "a soup averages checkpoints of one architecture"
                )
    return {
        k: torch.stack([s[k].double() for _, s in states]).mean(dim=0).to(v.dtype) if v.is_floating_point() else v
        for k, v in first.items()
    }
