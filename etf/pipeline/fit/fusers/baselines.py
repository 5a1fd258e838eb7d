"""Baselines over the same cache: the canonical prior alone, the mean and the concatenation."""

from __future__ import annotations

import torch
from torch import nn

from etf.pipeline.fit.fusers import register_fuser
from etf.pipeline.fit.fusers.base import Fuser, canonical_token


@register_fuser("linear")
class LinearProbe(Fuser):
    """The single-prior baseline: the canonical prior's class/pooled token only."""

    def __init__(self, groups, tasks, cfg):
        super().__init__(groups, tasks, cfg)
        self.norm = nn.LayerNorm(groups[self.canonical].dim)

    @property
    def out_dim(self) -> int:
        return self.groups[self.canonical].dim

    def fuse(self, tokens):
        return self.norm(canonical_token(tokens[self.canonical], self.groups[self.canonical].layout))


@register_fuser("mean")
class MeanFuser(Fuser):
    """Average of every group's pooled token after a per-group projection to ``dim``."""

    def __init__(self, groups, tasks, cfg):
        super().__init__(groups, tasks, cfg)
        self.proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(g.dim), nn.Linear(g.dim, cfg.dim)) for g in groups)

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    def fuse(self, tokens):
        return torch.stack([p(canonical_token(t, g.layout)) for p, t, g in zip(self.proj, tokens, self.groups)]).mean(0)


@register_fuser("concat")
class ConcatFuser(Fuser):
    """Concatenation of every group's normalised pooled token."""

    def __init__(self, groups, tasks, cfg):
        super().__init__(groups, tasks, cfg)
        self.norms = nn.ModuleList(nn.LayerNorm(g.dim) for g in groups)

    @property
    def out_dim(self) -> int:
        return sum(g.dim for g in self.groups)

    def fuse(self, tokens):
        return torch.cat([n(canonical_token(t, g.layout)) for n, t, g in zip(self.norms, tokens, self.groups)], dim=1)
