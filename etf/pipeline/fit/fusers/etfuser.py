"""ET-Fuser: a learned knowledge (ensemble) token over the priors, added into the canonical model.

The authors' formulation (repository ZombaSY/KT-Adaptor-pytorch at c1b3cfd, ``KTAdaptor``
and ``KTAdaptor_base``) is the default, ``--prior-tokens pooled --fuse add``:

1. each group (a prior's layer) gives one token, its pooled token
   (:class:`~etf.pipeline.fit.fusers.layers.PooledTokens`): the prior's own summary, the
   global average pool of a CNN's map as theirs (their priors are CNNs), the class token of
   a ViT (``--pool`` overrides it), zero-padded to the widest group;
2. a learnable knowledge token (uniform init, as theirs) goes first and a fixed code of the
   position (0 = knowledge token, 1..G = groups; ``--position-code``) is added to every token;
3. ``--depth`` pre-LN blocks of their kind run at the token width: no qkv bias, no output
   projection, dropout on the attention weights and in the FFN, FFN width = token width
   (``--mlp-ratio 1``), then a final LayerNorm;
4. the outputs at the knowledge token and at the canonical group go through one Linear to
   the canonical width (the identity when that is the token width, as theirs) and are averaged: t;
5. t is added to the canonical prior's pooled token, which classification and regression
   heads read (theirs add it to the map and pool: the same sum for an average pool), and for
   spatial tasks (landmarks) to its map, broadcast over the grid (``--head``); both are
   normalised first (``PooledInput``, ``MapInput``), as every etf fuser normalises what its
   heads read;
6. ``--infer canonical`` (``fuse_canonical``): the other priors are not in the sequence at
   all, which is [knowledge token, canonical token] with their own position codes.

The token-level model this project first built is ``--prior-tokens all --fuse gate``: every
token of every group through LayerNorm + Linear to ``--dim`` plus a learnable source
embedding, a trunc-normal ensemble token, ViT blocks (``--attn intra``: prior tokens attend
only within their prior), t the ensemble token's output through a Linear, joined through a
zero-initialised gate (:class:`Join`), ``h = LN(c) + g * t``, so that training starts at
the ``linear`` baseline. ``--aux recon:W`` (token-level only) adds the patch-level reconstruction objective.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from etf.cache.features import Group
from etf.errors import EtfError
from etf.pipeline.fit.fusers import register_fuser
from etf.pipeline.fit.fusers.base import Fuser, MapInput, PooledInput, add_onto
from etf.pipeline.fit.fusers.layers import (
    Block,
    PooledTokens,
    PriorTokens,
    TokenReconstruction,
    group_shares,
    keeping_attention,
)


def spread(weights: torch.Tensor, groups: list[Group], pools: list[str]) -> torch.Tensor:
    """(B, G) weights on pooled tokens to (B, S) weights on the groups' tokens: a pooled
    token stands for the tokens it was pooled from, so its weight goes to them alike (the
    class token alone under ``token`` pooling, half to it and half over the patches under
    ``token+avg``, the patches otherwise); shares per group stay exact."""
    parts = []
    for k, (g, pool) in enumerate(zip(groups, pools)):
        w = weights[:, k : k + 1]
        share = weights.new_zeros(weights.shape[0], g.tokens)
        half = 0.5 if pool == "token+avg" else 1.0
        if pool in ("token", "token+avg"):
            share[:, :1] = half * w
        if pool != "token":
            share[:, g.layout.prefix :] = half * w / (g.tokens - g.layout.prefix)
        parts.append(share)
    return torch.cat(parts, dim=1)


class Join(nn.Module):
    """t (B, width), or per query (B, Q, width), brought to the width of the canonical
    representation it joins (a Linear, or the identity where the widths agree and
    ``project`` is off: the authors' pooled model) and added to it (``gate`` off), or added
    through a zero-initialised gate, ``base + g * W t``, so that training starts at the
    ``linear`` baseline."""

    no_weight_decay: ClassVar[tuple[str, ...]] = ("gate",)

    def __init__(self, width: int, to: int, gate: bool, project: bool) -> None:
        super().__init__()
        self.out = nn.Linear(width, to) if project or width != to else nn.Identity()
        self.gate = nn.Parameter(torch.zeros(to)) if gate else None

    def forward(self, base: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = self.out(t)
        return add_onto(base, t if self.gate is None else self.gate * t)


@register_fuser("etfuser")
class ETFuser(Fuser):
    """Knowledge token over the priors' pooled tokens (or all their tokens), added (or gated)
    into the canonical prior's representation."""

    no_weight_decay: ClassVar[tuple[str, ...]] = ("ensemble",)

    aux_kinds = ("recon",)
    makes_maps = True

    def __init__(self, groups, tasks, cfg):
        super().__init__(groups, tasks, cfg)
        cfg = self.cfg
        self.pooled = cfg.prior_tokens == "pooled"
        canon = groups[self.canonical]
        if self.pooled:
            if self.aux_kind == "recon":
                raise EtfError("--aux recon: it reconstructs hidden prior tokens, so it needs --prior-tokens all")
            self.tokens_in = PooledTokens(groups, self.pools, cfg.position_code)
            self.width = self.tokens_in.width
            if self.width % cfg.heads:
                raise EtfError(
                    f"--heads {cfg.heads}: the pooled tokens' width {self.width} (the widest prior's) is not divisible by it"
                )
            self.ensemble = nn.Parameter(torch.rand(1, 1, self.width))
            kind = {"attn_drop": cfg.dropout, "proj": False, "qkv_bias": False}
        else:
            self.tokens_in = PriorTokens(groups, cfg.dim)
            self.width = cfg.dim
            self.ensemble = nn.Parameter(torch.zeros(1, 1, cfg.dim))
            nn.init.trunc_normal_(self.ensemble, std=0.02)
            kind = {}
        self.blocks = nn.ModuleList(
            Block(self.width, cfg.heads, cfg.mlp_ratio, cfg.dropout, **kind) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(self.width)
        gate = cfg.fuse == "gate"
        self.canonical_in = PooledInput(canon, self.pools[self.canonical], cfg.canonical_norm)
        self.join = Join(self.width, self.canonical_in.dim, gate, project=not self.pooled)
        if self.map_tasks:
            self.map_in = MapInput(canon, self.grid, cfg.canonical_norm)
            self.join_map = Join(self.width, canon.dim, gate, project=not self.pooled)
        #: the groups of the canonical prior: all the sequence holds under ``--infer canonical``
        self.canonical_groups = [i for i, g in enumerate(groups) if g.prior == 0]
        self.recon = TokenReconstruction(groups, cfg.dim, cfg.recon_ratio) if self.aux_kind == "recon" else None

    @property
    def out_dim(self) -> int:
        return self.canonical_in.dim

    @property
    def maps_over_patches(self) -> bool:
        """Whether its attention maps say where in the image it looks: not over pooled tokens,
        which stand for whole priors (their weight is only spread back onto the tokens)."""
        return not self.pooled

    def structure(self, owner: torch.Tensor) -> torch.Tensor:
        """(S, S) allowed attention pairs between positions owned by ``owner`` (their
        prior; -1: the ensemble token) before missing tokens are removed."""
        s = owner.numel()
        if self.cfg.attn == "full":
            return torch.ones(s, s, dtype=torch.bool, device=owner.device)
        same = owner[:, None] == owner[None, :]
        same[0, :] = True  # the ensemble token sees every prior
        return same

    def encode(
        self, tokens: list[torch.Tensor], which: list[int] | None = None, hidden: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised output sequence (B, 1 + S, width) over the groups ``which``
        (default: all), ensemble token first, and the (B, 1 + S) mask of positions that
        were attended to. ``hidden`` (B, S) replaces those prior tokens by reconstruction
        placeholders (all groups only)."""
        which = list(range(len(self.groups))) if which is None else which
        x, present = self.tokens_in(tokens, which)
        if hidden is not None:
            x = torch.where(hidden[..., None], self.recon.placeholder, x)
            present = present & ~hidden
        b = x.shape[0]
        first = self.ensemble + self.tokens_in.code[0] if self.pooled else self.ensemble
        x = torch.cat([first.expand(b, -1, -1), x], dim=1)
        present = torch.cat([present.new_ones(b, 1), present], dim=1)
        owner = torch.tensor(
            [-1] + [self.groups[i].prior for i in which for _ in range(self.tokens_in.counts[i])], device=x.device
        )
        allowed = self.structure(owner)[None] & present[:, None, :]
        # no empty rows; a float eye cast to bool: onnxruntime has no boolean EyeLike (etf export)
        allowed = allowed | torch.eye(x.shape[1], device=x.device).bool()
        allowed = allowed[:, None]
        for blk in self.blocks:
            x = blk(x, allowed)
        return self.norm(x), present

    def ensemble_output(self, seq: torch.Tensor, which: list[int] | None = None) -> torch.Tensor:
        """t (B, width): with pooled tokens the mean of the knowledge token's and the
        canonical group's outputs (the authors' average, taken before their shared Linear,
        which commutes with it); token-level, the ensemble token's."""
        if not self.pooled:
            return seq[:, 0]
        at = 1 + (self.canonical if which is None else which.index(self.canonical))
        return seq[:, [0, at]].mean(dim=1)

    def set_aux_loss(self, tokens: list[torch.Tensor]) -> None:
        """During training with ``--aux recon:W``: a second pass that reconstructs hidden tokens."""
        if self.training and self.recon is not None:
            present = torch.cat([(t != 0).any(dim=-1) for t in tokens], dim=1)
            hidden = self.recon.hide(present)
            out, _ = self.encode(tokens, hidden=hidden)
            self.aux_loss = self.aux_weight * self.recon.loss(out[:, 1:], tokens, hidden)

    def fuse_groups(
        self, tokens: list[torch.Tensor], which: list[int] | None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The representation from the sequence over the groups ``which`` (default: all)."""
        seq, _ = self.encode(tokens, which)
        t, c = self.ensemble_output(seq, which), tokens[self.canonical]
        return self.per_task(lambda: self.join(self.canonical_in(c), t), lambda: self.join_map(self.map_in(c), t))

    def fuse(self, tokens):
        self.set_aux_loss(tokens)
        return self.fuse_groups(tokens, None)

    def fuse_canonical(self, tokens):
        return self.fuse_groups(tokens, self.canonical_groups)

    def ensemble_map(self) -> dict[str, torch.Tensor]:
        """The last block's ensemble-token attention over the prior tokens (heads averaged),
        from a forward over all groups under ``keeping_attention(self.blocks[-1])``."""
        weights = self.blocks[-1].attention[:, :, 0, 1:].mean(dim=1)
        return {"ensemble": spread(weights, self.groups, self.pools) if self.pooled else weights}

    @torch.no_grad()
    def attention_maps(self, tokens):
        with keeping_attention(self.blocks[-1]):
            self.encode(tokens)
            return self.ensemble_map()

    def attention_shares(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """(B, priors): how the ensemble token's last-block attention splits over the priors."""
        shares = group_shares(self.attention_maps(tokens)["ensemble"], self.groups)
        return shares @ F.one_hot(torch.tensor([g.prior for g in self.groups]), self.num_priors).to(shares)
