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


def group_shares(weights: torch.Tensor, groups: list[Group]) -> torch.Tensor:
    """(B, S) weights over the groups' concatenated tokens to (B, groups) sums."""
    return torch.stack([w.sum(dim=-1) for w in weights.split([g.tokens for g in groups], dim=-1)], dim=-1)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, keep: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention over (B, H, S, dh) tensors, and its weights when ``keep``
    (the fused kernel, used otherwise, never materialises them)."""
    if not keep:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed), None
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    attn = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return attn @ v, attn.detach()


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
    is a decoder block: self-attention, cross-attention to a memory, then the MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, cross: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
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
        y, self.attention = attend(q, k, v, allowed, self.keep_attention)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, s, d)))
        if self.cross is not None:
            x = x + self.drop(self.cross(x, memory, memory_allowed))
        return x + self.drop(self.mlp(self.norm2(x)))


class PriorTokens(nn.Module):
    """Per-group LayerNorm + Linear to a common width, plus a learnable source embedding.

    A group is one layer of one prior. With ``share_layers`` the layers of a prior (of one
    width) share their projection, and only the source embedding tells them apart: Q-Face's
    stage embedding (multi-stage feature fusion)."""

    #: learned tokens, embeddings and gates: left out of weight decay (see ``fit._optimizer``)
    no_weight_decay: ClassVar[tuple[str, ...]] = ("embed",)

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

    def forward(self, tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, dim) projected tokens and the (B, S) mask of present (non-zero) tokens."""
        seq = [self.proj[j](t) + self.embed[i] for i, (j, t) in enumerate(zip(self.source, tokens))]
        present = [(t != 0).any(dim=-1) for t in tokens]
        return torch.cat(seq, dim=1), torch.cat(present, dim=1)


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
