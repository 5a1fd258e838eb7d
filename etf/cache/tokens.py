"""Token selections (``all``, ``cls``, ``patch``, ``pool:G``), used at extraction and at read time.

A token sequence is ``prefix`` tokens (class/register tokens; none for CNNs) followed by an
``h x w`` grid of patch tokens. Every selection keeps that shape description true, so a
store's tokens can be re-selected later (e.g. ``pool:2`` at fit time from an ``all`` store).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from etf.errors import EtfError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TokenLayout:
    """``prefix`` leading tokens, then a ``grid`` of patch tokens (``None`` when there are none)."""

    prefix: int
    grid: tuple[int, int] | None

    @property
    def count(self) -> int:
        return self.prefix + (self.grid[0] * self.grid[1] if self.grid else 0)

    def to_json(self) -> dict:
        return {"prefix": self.prefix, "grid": list(self.grid) if self.grid else None}

    @classmethod
    def from_json(cls, d: dict) -> TokenLayout:
        return cls(int(d["prefix"]), tuple(d["grid"]) if d.get("grid") else None)


def parse_tokens(mode: str) -> str:
    """Validate a ``--tokens`` value and return its canonical spelling."""
    if mode in ("all", "cls", "patch"):
        return mode
    m = re.fullmatch(r"pool:(\d+)", mode)
    if m and int(m.group(1)) >= 1:
        return f"pool:{int(m.group(1))}"
    raise EtfError(f"--tokens {mode!r}: use all, cls, patch or pool:G (G >= 1)")


def select_tokens(x: torch.Tensor, layout: TokenLayout, mode: str) -> tuple[torch.Tensor, TokenLayout]:
    """Apply ``mode`` to tokens ``x`` of shape (B, T, D) laid out as ``layout``.

    ``cls`` is the first prefix token, or the mean of the patch tokens when there is no
    prefix (CNNs, class-token-free ViTs), so it is always one "pooled" token.
    """
    import torch
    import torch.nn.functional as F  # here, not at import: the store format is read without torch

    if x.shape[1] != layout.count:
        raise EtfError(f"token count {x.shape[1]} does not match the layout {layout}")
    prefix, patches = x[:, : layout.prefix], x[:, layout.prefix :]
    if mode == "all":
        return x, layout
    if mode == "cls":
        tok = prefix[:, :1] if layout.prefix else patches.mean(dim=1, keepdim=True)
        return tok, TokenLayout(1, None)
    if layout.grid is None:
        raise EtfError(f"--tokens {mode}: these tokens have no patch grid (they were stored as 'cls')")
    if mode == "patch":
        return patches, TokenLayout(0, layout.grid)
    g = int(mode.split(":")[1])
    h, w = layout.grid
    if g > min(h, w):
        raise EtfError(f"--tokens {mode}: the patch grid is only {h}x{w}")
    grid = patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    pooled = F.adaptive_avg_pool2d(grid.float(), g).to(x.dtype).flatten(2).transpose(1, 2)
    return torch.cat([prefix, pooled], dim=1), TokenLayout(layout.prefix, (g, g))


def encode_tokens(x: torch.Tensor, dtype: str, ids: list[str]) -> np.ndarray:
    """Tokens (B, T, D) to the storage dtype, refusing non-finite values (naming the sample).

    Overflow shows here: a float16 store turns activations above 65504 into inf.
    """
    import torch

    cast = x.to({"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype])
    finite = torch.isfinite(cast).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = [ids[i] for i in torch.nonzero(~finite).flatten().tolist()]
        raise EtfError(f"non-finite token values for sample(s) {', '.join(bad[:5])} (as {dtype}); try --dtype float32")
    cast = cast.cpu()
    return cast.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else cast.numpy()
