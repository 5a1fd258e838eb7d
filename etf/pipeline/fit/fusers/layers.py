"""Building blocks the fusers share: attention that can report its weights, transformer
blocks, per-prior token projections and the token-reconstruction objective."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from etf.cache.features import Group
from etf.cache.tokens import pool_tokens, pooled_width


def group_shares(weights: torch.Tensor, groups: list[Group]) -> torch.Tensor:
    """(B, S) weights over the groups' concatenated tokens to (B, groups) sums."""
    return torch.stack([w.sum(dim=-1) for w in weights.split([g.tokens for g in groups], dim=-1)], dim=-1)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, keep: bool, dropout: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention over (B, H, S, dh) tensors, with ``dropout`` on the
    attention weights, and the weights when ``keep`` (the fused kernel, used otherwise,
    never materialises them)."""
    if not keep:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout), None
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    attn = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return F.dropout(attn, dropout) @ v, attn.detach()


@contextmanager
def keeping_attention(*modules: nn.Module) -> Iterator[None]:
    """Let attention modules (``Block``, ``CrossAttention``) keep their last weights, for
    the duration of the block only."""
    for m in modules:
        m.keep_attention = True
    try:
        yield
    finally:
        for m in modules:
            m.keep_attention, m.attention = False, None


class CrossAttention(nn.Module):
    """Multi-head attention from (pre-normed) queries to a memory sequence (the decoder's
    read of the fused tokens); the memory is normalised by its producer."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention: torch.Tensor | None = None
        self.keep_attention = False

    def forward(self, x: torch.Tensor, memory: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``allowed`` (B, 1, 1, S): True where the memory position may be read."""
        (b, n, d), s, h = x.shape, memory.shape[1], self.heads
        q = self.q(self.norm(x)).reshape(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(memory).reshape(b, s, 2, h, d // h).permute(2, 0, 3, 1, 4)
        y, self.attention = attend(q, k, v, allowed, self.keep_attention)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block whose attention can report its weights. With ``cross`` it
    is a decoder block: self-attention, cross-attention to a memory, then the MLP.

    The defaults are a ViT block (qkv bias, output projection with dropout); the authors'
    ET-Fuser block has ``qkv_bias=False``, ``proj=False`` (no output projection and so no
    dropout after attention) and ``attn_drop`` on the attention weights.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
        cross: bool = False,
        attn_drop: float = 0.0,
        proj: bool = True,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout)) if proj else nn.Identity()
        self.cross = CrossAttention(dim, heads) if cross else None
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)
        self.attention: torch.Tensor | None = None
        self.keep_attention = False

    def forward(
        self,
        x: torch.Tensor,
        allowed: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``allowed`` (B, 1, S, S): True where a query may attend to a key."""
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y, self.attention = attend(q, k, v, allowed, self.keep_attention, self.attn_drop if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, d))
        if self.cross is not None:
            x = x + self.drop(self.cross(x, memory, memory_allowed))
        return x + self.drop(self.mlp(self.norm2(x)))


class PriorTokens(nn.Module):
    """Per-group LayerNorm + Linear to a common width, plus a learnable source embedding and
    a learnable embedding of each token's position.

    A group is one layer of one prior. With ``share_layers`` the layers of a prior (of one
    width) share their projection, and only the source embedding tells them apart: Q-Face's
    stage embedding (multi-stage feature fusion). The position embedding (DETR's memory
    positions) lets attention find a token by where it is, not only by what it holds: the
    class token among the patches, a patch of the eye region."""

    #: learned tokens, embeddings and gates: left out of weight decay (see ``fit._optimizer``)
    no_weight_decay: ClassVar[tuple[str, ...]] = ("embed", "position")

    def __init__(self, groups: list[Group], dim: int, share_layers: bool = False) -> None:
        super().__init__()
        keys = [(g.prior, g.dim) if share_layers else i for i, g in enumerate(groups)]
        first: dict[Any, Group] = {}
        for k, g in zip(keys, groups):
            first.setdefault(k, g)
        self.source = [list(first).index(k) for k in keys]  # the projection of each group
        self.proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(g.dim), nn.Linear(g.dim, dim)) for g in first.values())
        self.embed = nn.Parameter(torch.zeros(len(groups), dim))
        nn.init.trunc_normal_(self.embed, std=0.02)
        self.counts = [g.tokens for g in groups]
        self.position = nn.Parameter(torch.zeros(sum(self.counts), dim))
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, tokens: list[torch.Tensor], which: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, dim) projected tokens of the groups ``which`` (default: all) and the (B, S)
        mask of present (non-zero) tokens."""
        which = range(len(tokens)) if which is None else which
        position = self.position.split(self.counts)
        seq = [self.proj[self.source[i]](tokens[i]) + self.embed[i] + position[i] for i in which]
        present = [(tokens[i] != 0).any(dim=-1) for i in which]
        return torch.cat(seq, dim=1), torch.cat(present, dim=1)


def position_code(positions: int, dim: int, kind: str) -> torch.Tensor:
    """(positions, dim) fixed code of each position: ``sinusoidal`` is Vaswani et al.'s
    (channel pair i at frequency 10000^(-2i/dim)); ``single`` is the authors' code, whose
    frequency list has one entry (1), so every even channel is sin(pos) and every odd one cos(pos)."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    if kind == "sinusoidal":
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    else:
        freq = torch.ones(1, dtype=torch.float64)
    angle = pos * freq
    code = torch.zeros(positions, dim, dtype=torch.float64)
    code[:, 0::2] = torch.sin(angle)
    code[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return code.float()


class PooledTokens(nn.Module):
    """The authors' prior tokens: one per group, its pooled token (``pools``: each prior's own
    summary, see :func:`~etf.cache.tokens.pool_tokens`), zero-padded to the widest, plus a
    fixed code of its position (1..G; 0 is the knowledge token's)."""

    def __init__(self, groups: list[Group], pools: list[str], code: str) -> None:
        super().__init__()
        self.layouts, self.pools = [g.layout for g in groups], pools
        self.width = max(pooled_width(g.dim, p) for g, p in zip(groups, pools))
        self.register_buffer("code", position_code(len(groups) + 1, self.width, code), persistent=False)
        self.counts = [1] * len(groups)

    def forward(self, tokens: list[torch.Tensor], which: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, width) pooled, padded and position-coded tokens of the groups ``which``
        (default: all), and the (B, S) mask of present ones (a missing prior pools to zero)."""
        which = list(range(len(tokens))) if which is None else which
        pooled = [pool_tokens(tokens[i], self.layouts[i], self.pools[i]) for i in which]
        x = torch.stack([F.pad(p, (0, self.width - p.shape[-1])) for p in pooled], dim=1)
        return x + self.code[[i + 1 for i in which]], (x != 0).any(dim=-1)


class TokenReconstruction(nn.Module):
    """Patch-level auxiliary task of face-prior representation learning, on cached tokens.

    A fraction of the present prior tokens is hidden (not attended to); each hidden position
    enters the sequence as a learnable per-position placeholder, and its output predicts the
    hidden token, layer-normalised as MAE's normalised-pixel target. The loss is the mean
    squared error over hidden tokens.
    """

    no_weight_decay: ClassVar[tuple[str, ...]] = ("placeholder",)

    def __init__(self, groups: list[Group], dim: int, ratio: float) -> None:
        super().__init__()
        self.groups, self.ratio = groups, ratio
        self.placeholder = nn.Parameter(torch.zeros(sum(g.tokens for g in groups), dim))
        nn.init.trunc_normal_(self.placeholder, std=0.02)
        self.pred = nn.ModuleList(nn.Linear(dim, g.dim) for g in groups)

    def hide(self, present: torch.Tensor) -> torch.Tensor:
        """(B, S) random choice of present tokens to hide."""
        return present & (torch.rand(present.shape, device=present.device) < self.ratio)

    def loss(self, out: torch.Tensor, tokens: list[torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        """``out`` (B, S, dim): the fused sequence at the prior positions."""
        errors = []
        for pred, o, t, h in zip(
            self.pred,
            out.split([g.tokens for g in self.groups], dim=1),
            tokens,
            hidden.split([g.tokens for g in self.groups], dim=1),
        ):
            target = F.layer_norm(t[h], t.shape[-1:])
            errors.append((pred(o[h]) - target).pow(2).mean(dim=-1))
        errors = torch.cat(errors)
        return errors.mean() if errors.numel() else out.sum() * 0
