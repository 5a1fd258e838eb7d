"""Token selections (``all``, ``cls``, ``patch``, ``pool:G``), used at extraction and at read
time, and a prior's pooled representation (its own pooling, :func:`pool_tokens`).

A token sequence is ``prefix`` tokens (class/register tokens; none for CNNs) followed by an
``h x w`` grid of patch tokens. Every selection keeps that shape description true, so a
store's tokens can be re-selected later (e.g. ``pool:2`` at fit time from an ``all`` store).

A prior summarises an image its own way: a supervised ViT, CLIP, DINOv2 or FaRL in its class
token (timm's ``global_pool='token'``), a CNN in the mean of its map (``avg``). The layout
records that pooling, so that every fuser and head reads the representation the model was
trained to produce, never the patch mean of a class-token model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from etf.cache.format import POOL_OVERRIDES, POOLS
from etf.errors import EtfError

if TYPE_CHECKING:
    import torch


def default_pool(prefix: int) -> str:
    """The pooling of a layout that does not state one: the class token where there is a
    prefix (timm's ViT default), else the map mean (CNNs)."""
    return "token" if prefix else "avg"


@dataclass(frozen=True)
class TokenLayout:
    """``prefix`` leading tokens, then a ``grid`` of patch tokens (``None`` when there are
    none), and the prior's own ``pool`` (:data:`POOLS`; default :func:`default_pool`)."""

    prefix: int
    grid: tuple[int, int] | None
    pool: str = ""

    def __post_init__(self) -> None:
        pool = self.pool or default_pool(self.prefix)
        if pool not in POOLS:
            raise EtfError(f"pooling {pool!r}: use {', '.join(POOLS)}")
        if pool == "token" and not self.prefix:
            pool = "avg"  # no class token to read
        if pool != "token" and self.grid is None:
            pool = "token"  # no patches: the prefix tokens are all there is (a cls store)
        object.__setattr__(self, "pool", pool)

    @property
    def count(self) -> int:
        return self.prefix + (self.grid[0] * self.grid[1] if self.grid else 0)

    def to_json(self) -> dict:
        return {"prefix": self.prefix, "grid": list(self.grid) if self.grid else None, "pool": self.pool}

    @classmethod
    def from_json(cls, d: dict) -> TokenLayout:
        """A stored layout; one written before layouts recorded their pooling gets the default."""
        return cls(int(d["prefix"]), tuple(d["grid"]) if d.get("grid") else None, d.get("pool", ""))


def module_pool(model: Any) -> tuple[str, str | None]:
    """The pooling a timm model applies before its classifier (``global_pool``: a name on
    ViTs, a ``SelectAdaptivePool2d`` on CNNs), as one of :data:`POOLS`, and a note when it
    has no equivalent over cached tokens (``map``, attention pooling, falls back to the
    class token). An empty name is the layout's default."""
    pool = getattr(model, "global_pool", None)
    if not isinstance(pool, str):
        pool = next((m.pool_type for m in model.modules() if isinstance(getattr(m, "pool_type", None), str)), "")
    pool = pool.removeprefix("fast")
    if pool in ("", *POOLS):
        return pool, None
    fallback = "token" if getattr(model, "num_prefix_tokens", 0) else "avg"
    return fallback, f"its own pooling {pool!r} has no equivalent over cached tokens; {fallback} is used"


def legacy_pool(model_name: str | None, prefix: int) -> str:
    """The pooling of a store written before layouts recorded it: what timm's ``model_name``
    applies (built on the meta device: no weights, no memory), else the layout default."""
    if model_name:
        try:
            import timm
            import torch

            with torch.device("meta"):
                return module_pool(timm.create_model(model_name.split(".")[0], pretrained=False))[0] or ""
        except Exception:  # an architecture this timm no longer has: the default below
            pass
    return default_pool(prefix)


def parse_pool(value: str) -> str:
    """Validate a ``--pool`` value."""
    if value not in POOL_OVERRIDES:
        raise EtfError(f"--pool {value!r}: use {', '.join(POOL_OVERRIDES)} (default: each prior's own)")
    return value


def resolve_pool(layout: TokenLayout, override: str | None) -> str:
    """What a prior's pooled token is: its own pooling, or ``override`` where the tokens allow
    it (``token`` without a class token is the patch mean; a store without patches has only
    its prefix token)."""
    if override is None:
        return layout.pool
    if layout.grid is None:
        return "token"
    if not layout.prefix and override in ("token", "token+avg"):
        return "avg"
    return override


def pooled_width(dim: int, pool: str) -> int:
    """The width of a pooled token of ``dim``-wide tokens."""
    return 2 * dim if pool == "token+avg" else dim


def pool_tokens(x: torch.Tensor, layout: TokenLayout, pool: str) -> torch.Tensor:
    """(B, T, D) tokens laid out as ``layout`` to one (B, pooled_width) token by ``pool``
    (see :func:`resolve_pool`). Patch tokens that are exactly zero are missing (dropped in
    training, a skipped sample) and are left out; none present gives zero."""
    import torch

    if pool == "token":
        return x[:, 0]
    if pool == "token+avg":
        return torch.cat([x[:, 0], pool_tokens(x, layout, "avg")], dim=-1)
    patches = x[:, layout.prefix :]
    present = (patches != 0).any(dim=-1, keepdim=True)
    avg = (patches * present).sum(dim=1) / present.sum(dim=1).clamp(min=1).to(x.dtype)
    if pool == "avg":
        return avg
    top = patches.masked_fill(~present, float("-inf")).amax(dim=1)
    top = torch.where(present.any(dim=1), top, torch.zeros_like(top))
    return top if pool == "max" else 0.5 * (avg + top)


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

    ``cls`` is the prior's pooled token (:func:`pool_tokens` by its own pooling: the class
    token of a ViT, the patch mean of a CNN), so it is always one "pooled" token. ``patch``
    drops the prefix, so a class-token prior's pooling becomes the patch mean there.
    """
    import torch
    import torch.nn.functional as F  # here, not at import: the store format is read without torch

    if x.shape[1] != layout.count:
        raise EtfError(f"token count {x.shape[1]} does not match the layout {layout}")
    prefix, patches = x[:, : layout.prefix], x[:, layout.prefix :]
    if mode == "all":
        return x, layout
    if mode == "cls":
        return pool_tokens(x, layout, layout.pool)[:, None], TokenLayout(1, None)
    if layout.grid is None:
        raise EtfError(f"--tokens {mode}: these tokens have no patch grid (they were stored as 'cls')")
    if mode == "patch":
        return patches, TokenLayout(0, layout.grid, "avg" if layout.pool == "token" else layout.pool)
    g = int(mode.split(":")[1])
    h, w = layout.grid
    if g > min(h, w):
        raise EtfError(f"--tokens {mode}: the patch grid is only {h}x{w}")
    grid = patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    pooled = F.adaptive_avg_pool2d(grid.float(), g).to(x.dtype).flatten(2).transpose(1, 2)
    return torch.cat([prefix, pooled], dim=1), TokenLayout(layout.prefix, (g, g), layout.pool)


def encode_tokens(x: torch.Tensor, dtype: str, ids: list[str]) -> np.ndarray:
    """Tokens (B, T, D) to the storage dtype, refusing non-finite values (naming the sample).

    Overflow shows here: a float16 store turns activations above 65504 into inf.
    """
    cast, finite = cast_tokens(x, dtype)
    return host_tokens(cast.cpu(), finite.cpu(), dtype, ids)


def cast_tokens(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens in the storage dtype and whether each sample's are finite, where ``x`` is: the
    device half of :func:`encode_tokens`, which extraction copies to the host without waiting."""
    import torch

    cast = x.to({"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype])
    return cast, torch.isfinite(cast).flatten(1).all(dim=1)


def host_tokens(cast: torch.Tensor, finite: torch.Tensor, dtype: str, ids: list[str]) -> np.ndarray:
    """The host half of :func:`encode_tokens`: refuse non-finite samples, view as stored."""
    import torch

    if not bool(finite.all()):
        bad = [ids[i] for i in torch.nonzero(~finite).flatten().tolist()]
        raise EtfError(f"non-finite token values for sample(s) {', '.join(bad[:5])} (as {dtype}); try --dtype float32")
    return cast.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else cast.numpy()
