"""Baselines over the same cache: the canonical prior alone, the mean and the concatenation.

Under spatial heads ``mean`` and ``concat`` work on maps, as the authors' ``ModelEnsemblePool``
(average of the feature maps) and ``ModelEnsembleCat`` (channel concatenation) do: every
group's grid is resampled to the canonical grid (a group without a grid repeats its pooled
token over it).
"""

from __future__ import annotations

import torch
from torch import nn

from etf.pipeline.fit.fusers import register_fuser
from etf.pipeline.fit.fusers.base import Fuser, GroupInput, channels


@register_fuser("linear")
class LinearProbe(Fuser):
    """The single-prior baseline: the canonical prior's grid, or its class/pooled token, only."""

    makes_maps = True

    def __init__(self, groups, tasks, cfg):
        super().__init__(groups, tasks, cfg)
        self.canonical_in = GroupInput(groups[self.canonical], self.grid)

    @property
    def out_dim(self) -> int:
        return self.groups[self.canonical].dim

    @property
    def reads(self) -> list[int]:
        return [0]

    def fuse(self, tokens):
        return self.canonical_in(tokens[self.canonical])


@register_fuser("mean")
class MeanFuser(Fuser):
    """Average of every group's pooled token (map) after a per-group projection to ``dim``."""

    makes_maps = True

    def __init__(self, groups, tasks, cfg):
        super().__init__(groups, tasks, cfg)
        self.inputs = nn.ModuleList(GroupInput(g, self.grid) for g in groups)
        self.proj = nn.ModuleList(nn.Linear(g.dim, cfg.dim) for g in groups)

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    def fuse(self, tokens):
        return torch.stack([channels(p, i(t)) for i, p, t in zip(self.inputs, self.proj, tokens)]).mean(0)


@register_fuser("concat")
class ConcatFuser(Fuser):
    """Concatenation of every group's normalised pooled token (map, along channels)."""

    makes_maps = True

    def __init__(self, groups, tasks, cfg):
        super().__init__(groups, tasks, cfg)
        self.inputs = nn.ModuleList(GroupInput(g, self.grid) for g in groups)

    @property
    def out_dim(self) -> int:
        return sum(g.dim for g in self.groups)

    def fuse(self, tokens):
        return torch.cat([i(t) for i, t in zip(self.inputs, tokens)], dim=1)
