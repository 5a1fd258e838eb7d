"""Baselines over the same cache: the canonical prior alone, the mean and the concatenation.

Each works on the priors' pooled tokens (each prior's own summary); for spatial tasks under
spatial heads ``mean`` and ``concat`` work on maps, as the authors' ``ModelEnsemblePool``
(average of the feature maps) and ``ModelEnsembleCat`` (channel concatenation) do: every
group's grid is resampled to the canonical grid (a group without a grid repeats its token
over it).
"""

from __future__ import annotations

import torch
from torch import nn

from etf.pipeline.fit.fusers import register_fuser
from etf.pipeline.fit.fusers.base import Fuser, MapInput, PooledInput, channels


@register_fuser("linear")
class LinearProbe(Fuser):
    """The single-prior baseline: the canonical prior's pooled token (its class token for a
    ViT), or its grid for spatial tasks, only."""

    makes_maps = True

    def __init__(self, groups, tasks, cfg):
        super().__init__(groups, tasks, cfg)
        norm = self.cfg.canonical_norm
        self.canonical_in = PooledInput(groups[self.canonical], self.pools[self.canonical], norm)
        if self.map_tasks:
            self.map_in = MapInput(groups[self.canonical], self.grid, norm)

    @property
    def out_dim(self) -> int:
        return self.pooled_dim(self.canonical)

    @property
    def reads(self) -> list[int]:
        return [0]

    def fuse(self, tokens):
        c = tokens[self.canonical]
        return self.per_task(lambda: self.canonical_in(c), lambda: self.map_in(c))


@register_fuser("mean")
class MeanFuser(Fuser):
    """Average of every group's pooled token (map) after a per-group projection to ``dim``."""

    makes_maps = True

    def __init__(self, groups, tasks, cfg):
        super().__init__(groups, tasks, cfg)
        self.inputs = nn.ModuleList(PooledInput(g, p) for g, p in zip(groups, self.pools))
        self.proj = nn.ModuleList(nn.Linear(i.dim, cfg.dim) for i in self.inputs)
        if self.map_tasks:
            self.map_inputs = nn.ModuleList(MapInput(g, self.grid) for g in groups)
            self.map_proj = nn.ModuleList(nn.Linear(g.dim, cfg.dim) for g in groups)

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    @property
    def map_dim(self) -> int:
        return self.cfg.dim

    def fuse(self, tokens):
        def average(inputs: nn.ModuleList, proj: nn.ModuleList) -> torch.Tensor:
            return torch.stack([channels(p, i(t)) for i, p, t in zip(inputs, proj, tokens)]).mean(0)

        return self.per_task(lambda: average(self.inputs, self.proj), lambda: average(self.map_inputs, self.map_proj))


@register_fuser("concat")
class ConcatFuser(Fuser):
    """Concatenation of every group's normalised pooled token (map, along channels)."""

    makes_maps = True

    def __init__(self, groups, tasks, cfg):
        super().__init__(groups, tasks, cfg)
        self.inputs = nn.ModuleList(PooledInput(g, p) for g, p in zip(groups, self.pools))
        if self.map_tasks:
            self.map_inputs = nn.ModuleList(MapInput(g, self.grid) for g in groups)

    @property
    def out_dim(self) -> int:
        return sum(i.dim for i in self.inputs)

    @property
    def map_dim(self) -> int:
        return sum(g.dim for g in self.groups)

    def fuse(self, tokens):
        def concat(inputs: nn.ModuleList) -> torch.Tensor:
            return torch.cat([i(t) for i, t in zip(inputs, tokens)], dim=1)

        return self.per_task(lambda: concat(self.inputs), lambda: concat(self.map_inputs))
