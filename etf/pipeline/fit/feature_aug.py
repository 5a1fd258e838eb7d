"""Feature-space augmentation of cached tokens (``--feature-aug``), the cheap extra to views.

As FroFA does for frozen features: parts ``drop:P`` (each token zeroed with probability P),
``scale:S`` (each sample's channels multiplied by 1 + S * N(0, 1)) and ``noise:S`` (Gaussian
noise of S times the tokens' RMS), comma-separated, applied to every training batch with
the model's own torch RNG stream (so :func:`~etf.pipeline.fit.train.fit_many` members stay
independent). Evaluation sees the tokens as stored.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from etf.errors import EtfError

if TYPE_CHECKING:  # parsing (in FitConfig, on the command line) loads no torch
    import torch

#: part -> (default strength, upper bound)
PARTS = {"drop": (0.1, 0.9), "scale": (0.1, 1.0), "noise": (0.1, 2.0)}


def parse_feature_aug(text: str) -> dict[str, float]:
    """``none`` or ``drop:P,scale:S,noise:S`` to {part: strength}."""
    if text.strip() in ("", "none"):
        return {}
    parts: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        m = re.fullmatch(r"([a-z]+)(?::([0-9.eE+-]+))?", item)
        if not m or m[1] not in PARTS or m[1] in parts:
            raise EtfError(
                f"--feature-aug {text!r}: {item!r} is not one of {', '.join(f'{k}:S' for k in PARTS)} (each once), or none"
            )
        try:
            value = float(m[2]) if m[2] is not None else PARTS[m[1]][0]
        except ValueError:
            value = -1.0
        if not 0 < value <= PARTS[m[1]][1]:
            raise EtfError(f"--feature-aug {text!r}: {m[1]} must be in (0, {PARTS[m[1]][1]:g}]")
        parts[m[1]] = value
    return parts


def feature_augment(tokens: list[torch.Tensor], parts: dict[str, float]) -> list[torch.Tensor]:
    """Each (B, T, D) group of a training batch, augmented by ``parts``."""
    import torch

    out = []
    for x in tokens:
        y = x.float()
        if "drop" in parts:
            y = y * (torch.rand(y.shape[:2], device=y.device) >= parts["drop"]).unsqueeze(-1)
        if "scale" in parts:
            y = y * (1 + parts["scale"] * torch.randn(y.shape[0], 1, y.shape[2], device=y.device))
        if "noise" in parts:
            y = y + parts["noise"] * y.pow(2).mean().sqrt() * torch.randn_like(y)
        out.append(y.to(x.dtype))
    return out
