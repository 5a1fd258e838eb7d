"""Q-Face (task-adaptive multi-task decoder) over cached tokens, alone and with ET-Fuser.

``qface``: every group (each layer of each prior, e.g. ``--layers all`` over a store
extracted with ``--layers 4,8,12``) is projected to width ``dim`` by its prior's projection
and marked by its stage embedding (``PriorTokens(share_layers=True)``); learnable label queries, one per task or one per label of a
multi-label task (``queries=label``), run ``depth`` decoder blocks of query self-attention
and cross-attention to those tokens; each task's head reads its own queries.

``etfuser+qface``: the ET-Fuser sequence is the decoder's memory and the ensemble token is
an extra query the label queries can read; each task's query output joins the canonical
representation (the canonical prior's pooled token, or its map for a spatial task) as
ET-Fuser's t does. Its defaults are the token-level formulation (``--prior-tokens all --fuse
gate``: ``h = LN(c) + g * W q`` through a zero-initialised gate, so training starts at the
single-prior baseline); the pooled sequence works too.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from etf.cache.features import Group
from etf.pipeline.fit.config import FuserConfig
from etf.pipeline.fit.fusers import register_fuser
from etf.pipeline.fit.fusers.base import Fuser
from etf.pipeline.fit.fusers.etfuser import ETFuser, spread
from etf.pipeline.fit.fusers.layers import Block, PriorTokens, keeping_attention


class QueryDecoder(nn.Module):
    """Learnable label queries and the decoder blocks that let them read a memory."""

    no_weight_decay: ClassVar[tuple[str, ...]] = ("queries",)

    def __init__(self, tasks: list[Any], cfg: FuserConfig, dim: int | None = None) -> None:
        """``dim``: the memory's width (default ``cfg.dim``)."""
        super().__init__()
        dim = dim or cfg.dim
        #: per task, its query positions and the names of the labels they stand for
        self.spans: dict[str, slice] = {}
        self.labels: list[str] = []
        for t in tasks:
            per_label = cfg.queries == "label" and t.kind == "multilabel"
            names = [f"{t.name}:{c}" for c in t.columns] if per_label else [t.name]
            self.spans[t.name] = slice(len(self.labels), len(self.labels) + len(names))
            self.labels += names
        self.queries = nn.Parameter(torch.zeros(1, len(self.labels), dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, cross=True) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, memory: torch.Tensor, present: torch.Tensor, extra: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per task, (B, dim) for a single query or (B, Q, dim) for per-label queries.

        ``memory`` (B, S, dim) normalised tokens, ``present`` (B, S) their mask; ``extra``
        (B, dim) an additional query (the ensemble token) placed after the label queries.
        """
        b = memory.shape[0]
        q = self.queries.repeat(b, 1, 1)  # a copy: torch's FLOP counter rejects a bare view of a parameter
        if extra is not None:
            q = torch.cat([q, extra[:, None]], dim=1)
        every = torch.ones(1, 1, q.shape[1], q.shape[1], dtype=torch.bool, device=q.device)
        readable = (present | ~present.any(dim=1, keepdim=True))[
            :, None, None
        ]  # a sample with no tokens reads them all
        for blk in self.blocks:
            q = blk(q, every, memory, readable)
        q = self.norm(q)
        return {name: q[:, s] if s.stop - s.start > 1 else q[:, s.start] for name, s in self.spans.items()}

    def query_maps(self) -> dict[str, torch.Tensor]:
        """Each label query's last-block cross-attention over the memory (heads averaged), from
        a forward run under ``keeping_attention(self.blocks[-1].cross)``."""
        attn = self.blocks[-1].cross.attention.mean(dim=1)
        return {name: attn[:, i] for i, name in enumerate(self.labels)}


@register_fuser("qface")
class QFace(Fuser):
    """Multi-stage tokens with stage embeddings, read by label queries through a decoder."""

    def __init__(self, groups: list[Group], tasks: list[Any], cfg: FuserConfig) -> None:
        super().__init__(groups, tasks, cfg)
        self.tokens_in = PriorTokens(groups, cfg.dim, share_layers=True)
        self.memory_norm = nn.LayerNorm(cfg.dim)
        self.decoder = QueryDecoder(tasks, self.cfg)

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    def fuse(self, tokens):
        x, present = self.tokens_in(tokens)
        return self.decoder(self.memory_norm(x), present)

    @torch.no_grad()
    def attention_maps(self, tokens):
        with keeping_attention(self.decoder.blocks[-1].cross):
            self.fuse(tokens)
            return self.decoder.query_maps()


@register_fuser("etfuser+qface")
class ETQFace(ETFuser):
    """ET-Fuser's sequence as Q-Face's memory and its ensemble token as an extra query."""

    def __init__(self, groups: list[Group], tasks: list[Any], cfg: FuserConfig) -> None:
        super().__init__(groups, tasks, cfg)
        self.decoder = QueryDecoder(tasks, self.cfg, self.width)

    def fuse_groups(self, tokens, which):
        seq, present = self.encode(tokens, which)
        reps = self.decoder(seq[:, 1:], present[:, 1:], extra=seq[:, 0])
        c = tokens[self.canonical]
        vector = self.canonical_in(c) if len(self.map_tasks) < len(reps) else None
        maps = self.map_in(c) if self.map_tasks else None
        return {
            name: self.join_map(maps, r) if name in self.map_tasks else self.join(vector, r) for name, r in reps.items()
        }

    @torch.no_grad()
    def attention_maps(self, tokens):
        with keeping_attention(self.blocks[-1], self.decoder.blocks[-1].cross):
            self.fuse(tokens)
            queries = self.decoder.query_maps()  # over the memory: pooled tokens stand for whole priors
            if self.pooled:
                queries = {name: spread(w, self.groups, self.pools) for name, w in queries.items()}
            return {**self.ensemble_map(), **queries}
