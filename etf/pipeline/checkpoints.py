"""Local checkpoint files to a state dict that fits a timm model, with a report of the fit.

Face-pretrained priors come as ``.pth``/``.pt``/``.bin``/``.safetensors`` files saved by
other code bases; this module unwraps their containers and prefixes so timm can load them.
"""

from __future__ import annotations

import sys
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
    except Exception as e:
        raise EtfError(f"--weights {path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
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
        raise EtfError(f"--weights {path}: does not fit {type(model).__name__}: {report.summary()} (use --allow-partial to load anyway)")
    model.load_state_dict(usable, strict=False)
    return report


def adapt_state_dict(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Rename and reshape a checkpoint for ``model`` with timm's own converter for the
    architecture (OpenAI CLIP layouts such as FaRL's, original DINOv2, ...; position
    embeddings resampled to the model's input size); unchanged where timm has none."""
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is None:
        return state
    try:
        return convert(state, model)
    except Exception as e:  # converters index and reshape freely; any failure means a foreign layout
        raise EtfError(f"--weights {path}: cannot convert it for {type(model).__name__} ({type(e).__name__}: {e})") from None
