"""Token selections (``all``, ``cls``, ``patch``, ``pool:G``), used at extraction and at read time.

A token sequence is ``prefix`` tokens (class/register tokens; none for CNNs) followed by an
``h x w`` grid of patch tokens. Every selection keeps that shape description true, so a
store's tokens can be re-selected later (e.g. ``pool:2`` at fit time from an ``all`` store).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from etf.errors import EtfError


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
