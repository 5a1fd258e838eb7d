"""The fuser base class: cached prior tokens to a task representation.

Every fuser reads the same cached token groups (one layer of one prior each), so they compare on equal terms.
Tokens that are exactly zero are missing (skipped samples, dropped priors) and are never
attended to; training-time masking (``token:P``, ``prior:P``) uses that same rule by
zeroing tokens, so a prior zeroed at test time is handled as it was in training.

Heads of classification and regression tasks read the canonical prior's pooled token (its
own summary: the class token of a ViT, CLIP, DINOv2 or FaRL, the map mean of a CNN; ``--pool``
overrides it) with the fused information added. Heads of spatial tasks (landmarks) read the
canonical prior's patch grid, a (B, C, h, w) map with the fused information added
(``--head spatial``), or the pooled token too (``--head pooled``); ``auto`` is spatial
wherever the canonical tokens have a grid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from etf.cache.features import Group
from etf.cache.tokens import TokenLayout, pool_tokens, pooled_width, resolve_pool
from etf.errors import EtfError
from etf.pipeline.fit.config import FuserConfig, parse_aux, parse_mask, resolve


def grid_map(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """A group's patch tokens (B, T, C) as its (B, C, h, w) map (prefix tokens left out)."""
    h, w = layout.grid
    return x[:, layout.prefix :].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def as_map(x: torch.Tensor, layout: TokenLayout, size: tuple[int, int]) -> torch.Tensor:
    """A group's tokens as a (B, C, *size) map: its grid resampled (bilinear, anti-aliased)
    where sizes differ, or its one token repeated where it has no grid."""
    if layout.grid is None:
        return pool_tokens(x, layout, layout.pool)[..., None, None].expand(-1, -1, *size)
    m = grid_map(x, layout)
    return m if tuple(layout.grid) == tuple(size) else F.interpolate(m, size=size, mode="bilinear", antialias=True)


def add_onto(base: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (B, C) or per query (B, Q, C) added to a canonical representation: broadcast
    over a (B, C, h, w) map's positions, or over the queries. Per-query outputs never feed a
    map (a landmarks task has one query), so a map under them is pooled first."""
    if base.dim() == 4 and t.dim() == 2:
        return base + t[..., None, None]
    if base.dim() == 4:
        base = base.mean(dim=(2, 3))
    return base[:, None] + t if t.dim() == 3 else base + t


class PooledInput(nn.Module):
    """A group's pooled token (:func:`~etf.cache.tokens.pool_tokens` by ``pool``: the prior's
    own summary, its class token for a ViT), layer-normalised unless ``norm`` is off: what
    the heads of vector tasks read of a prior."""

    def __init__(self, group: Group, pool: str, norm: bool = True) -> None:
        super().__init__()
        self.layout, self.pool = group.layout, pool
        self.dim = pooled_width(group.dim, pool)
        self.norm = nn.LayerNorm(self.dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(pool_tokens(x, self.layout, self.pool))


class MapInput(nn.Module):
    """A group's patch grid resampled to ``grid`` (:func:`as_map`), a (B, C, h, w) map
    normalised over the whole map (GroupNorm with one group, so that positions keep their
    relative strength, which a per-position LayerNorm would erase) unless ``norm`` is off:
    what the heads of spatial tasks (landmarks) read of a prior."""

    def __init__(self, group: Group, grid: tuple[int, int], norm: bool = True) -> None:
        super().__init__()
        self.layout, self.grid = group.layout, grid
        self.norm = nn.GroupNorm(1, group.dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(as_map(x, self.layout, self.grid))


def channels(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear`` over the channels of a (B, C) vector or a (B, C, h, w) map."""
    return linear(x) if x.dim() == 2 else linear(x.movedim(1, -1)).movedim(-1, 1)


class Fuser(nn.Module):
    """Base: training-time token/prior dropping, then ``fuse``; one output per task.

    ``forward`` returns ``{task name: representation}``: (B, out_dim) for fusers shared by
    all tasks, (B, Q, out_dim) for per-query fusers (Q-Face, one query per label), and for
    the tasks in ``map_tasks`` (landmarks under spatial heads) a (B, map_dim, h, w) map of
    the canonical grid. Fusers that build on the canonical prior (``makes_maps``) give those
    maps themselves (:meth:`per_task`); the others have their vector added onto the
    normalised canonical map through a zero-initialised linear layer, so they too start at
    the ``linear`` map.
    """

    fuser_name = ""
    #: the ``--aux`` objectives this fuser implements
    aux_kinds: tuple[str, ...] = ()
    #: fusers that make the maps of spatial tasks themselves, from the canonical map
    makes_maps = False

    def __init__(self, groups: list[Group], tasks: list[Any], cfg: FuserConfig) -> None:
        super().__init__()
        #: an auxiliary training loss a fuser may set during a training forward; fit adds it
        self.aux_loss: torch.Tensor | None = None
        if not groups:
            raise EtfError("a fuser needs at least one prior")
        cfg = resolve(self.fuser_name, cfg, [t.kind for t in tasks])
        self.groups, self.cfg = groups, cfg
        self.task_names = [t.name for t in tasks]
        self.num_priors = max(g.prior for g in groups) + 1
        self.mask_kind, self.mask_p = parse_mask(cfg.mask)
        self.aux_kind, self.aux_weight = parse_aux(cfg.aux)
        if self.aux_kind != "none" and self.aux_kind not in self.aux_kinds:
            offered = " or ".join(f"{k}:W" for k in self.aux_kinds) or "no auxiliary objective"
            raise EtfError(f"--aux {cfg.aux}: the {self.fuser_name} fuser offers {offered}")
        #: each group's pooled token: its prior's own pooling, or ``--pool`` where the tokens allow it
        self.pools = [resolve_pool(g.layout, cfg.pool) for g in groups]
        # the canonical representation: the last layer of the first prior
        self.canonical = max((i for i, g in enumerate(groups) if g.prior == 0), key=lambda i: groups[i].layer)
        canon = groups[self.canonical]
        spatial_tasks = [t.name for t in tasks if t.spatial]
        if cfg.head == "spatial" and spatial_tasks and canon.layout.grid is None:
            raise EtfError(
                f"--head spatial: the canonical prior {canon.name}'s tokens have no patch grid (stored or read as cls); "
                "extract or read them with --tokens all, patch or pool:G, or use --head pooled"
            )
        spatial = cfg.head != "pooled" and canon.layout.grid is not None
        #: the canonical grid that spatial heads read (None: pooled heads), and the tasks whose heads read it
        self.grid: tuple[int, int] | None = tuple(canon.layout.grid) if spatial and spatial_tasks else None
        self.map_tasks = spatial_tasks if self.grid else []
        if self.map_tasks and not self.makes_maps:
            self.map_in = MapInput(canon, self.grid)
            self.to_map = nn.Linear(self.out_dim, canon.dim)
            nn.init.zeros_(self.to_map.weight)
            nn.init.zeros_(self.to_map.bias)

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    @property
    def map_dim(self) -> int:
        """Channels of the maps spatial heads read: the canonical prior's."""
        return self.groups[self.canonical].dim

    def pooled_dim(self, i: int) -> int:
        """The width of group ``i``'s pooled token."""
        return pooled_width(self.groups[i].dim, self.pools[i])

    @property
    def reads(self) -> list[int]:
        """The priors this fuser reads (what its inputs cost): all of them, unless it says less."""
        return list(range(self.num_priors))

    def fuse(self, tokens: list[torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        raise NotImplementedError

    def fuse_canonical(self, tokens: list[torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        """``fuse`` with only the canonical prior: the others are absent (zero, the missing
        rule). ET-Fuser overrides it to leave them out of its sequence altogether."""
        return self.fuse([t if g.prior == 0 else torch.zeros_like(t) for t, g in zip(tokens, self.groups)])

    def per_task(
        self, vector: Callable[[], torch.Tensor], maps: Callable[[], torch.Tensor]
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """A ``makes_maps`` fuser's output: ``vector()`` for every task, or where some tasks
        read maps, ``maps()`` for those (each computed only when a task reads it)."""
        if not self.map_tasks:
            return vector()
        m = maps()
        v = vector() if len(self.map_tasks) < len(self.task_names) else None
        return {name: m if name in self.map_tasks else v for name in self.task_names}

    def forward(self, tokens: list[torch.Tensor], infer: str = "all") -> dict[str, torch.Tensor]:
        """Per task representations; ``infer="canonical"``: as if only the canonical prior were there."""
        self.aux_loss = None
        if self.training and self.mask_p > 0:
            tokens = self._drop(tokens)
        tokens = [t.float() for t in tokens]
        out = self.fuse_canonical(tokens) if infer == "canonical" else self.fuse(tokens)
        reps = out if isinstance(out, dict) else dict.fromkeys(self.task_names, out)
        return {name: self._for_head(name, r, tokens) for name, r in reps.items()}

    def _for_head(self, name: str, rep: torch.Tensor, tokens: list[torch.Tensor]) -> torch.Tensor:
        if name not in self.map_tasks or rep.dim() == 4:
            return rep
        return add_onto(self.map_in(tokens[self.canonical]), self.to_map(rep))

    def attention_maps(self, tokens: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named (B, S) weights over the groups' concatenated tokens: where the fuser looks
        (what ``etf explain`` draws). Call in eval mode."""
        raise EtfError(
            f"the {self.fuser_name} fuser has no attention maps (etfuser, etfuser+qface, qface and fra have)"
        )

    def _drop(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        b = tokens[0].shape[0]
        if self.mask_kind == "prior":
            keep_prior = torch.rand(b, self.num_priors, device=tokens[0].device) >= self.mask_p
            return [t * keep_prior[:, g.prior, None, None].to(t.dtype) for t, g in zip(tokens, self.groups)]
        return [t * (torch.rand(t.shape[:2], device=t.device) >= self.mask_p)[..., None].to(t.dtype) for t in tokens]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


#: FLOPs per sample already counted in this process, by architecture (see flops_per_sample)
_FLOPS: dict[str, int] = {}


def flops_per_sample(model: nn.Module, tokens: list[torch.Tensor], infer: str = "all") -> int:
    """Forward FLOPs of ``model`` on one sample in inference mode ``infer`` (multiply-add =
    2), measured by torch once per architecture in a process: the module tree with every
    layer's shape, the fuser's settings and the input shapes identify it, so a grid's runs
    that differ in seed, optimisation or data alone do not count it again."""
    from torch.utils.flop_counter import FlopCounterMode

    settings = getattr(getattr(model, "fuser", None), "cfg", None)
    key = repr((str(model), repr(settings), [tuple(t.shape[1:]) for t in tokens], infer))
    if key in _FLOPS:
        return _FLOPS[key]
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model([t[:1].float() for t in tokens], infer=infer)
    model.train(was)
    _FLOPS[key] = int(counter.get_total_flops())
    return _FLOPS[key]
