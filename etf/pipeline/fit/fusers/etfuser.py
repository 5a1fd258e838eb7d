"""ET-Fuser, token-level: the model this project first built (every choice a flag, see ``FuserConfig``):

1. each token group (a prior's layer) is mapped by LayerNorm + Linear to width ``dim`` and
   marked by a learnable embedding of the prior (and layer) it came from;
2. a learnable ensemble token is prepended and ``depth`` pre-norm self-attention blocks run
   over the whole sequence (``attn=intra``: prior tokens attend only within their prior;
   the ensemble token attends to all);
3. the canonical representation ``c`` (the first prior's class/pooled token, i.e. the
   single-prior model) is fused with the ensemble token ``t`` through a zero-initialised
   gate, ``h = LN(c) + g * W t``, so training starts exactly at the ``linear`` baseline;
4. task heads read ``h``.

``--aux recon:W`` adds the patch-level reconstruction objective (``TokenReconstruction``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from etf.pipeline.fit.fusers import register_fuser
from etf.pipeline.fit.fusers.base import Fuser, canonical_token
from etf.pipeline.fit.fusers.layers import Block, PriorTokens, TokenReconstruction, group_shares, keeping_attention


@register_fuser("etfuser")
class ETFuser(Fuser):
    """Learned ensemble token over all priors' tokens, gated into the canonical representation."""

    no_weight_decay: ClassVar[tuple[str, ...]] = ("ensemble", "gate")

    aux_kinds = ("recon",)

    def __init__(self, groups, tasks, cfg):
        super().__init__(groups, tasks, cfg)
        self.tokens_in = PriorTokens(groups, cfg.dim)
        self.ensemble = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        nn.init.trunc_normal_(self.ensemble, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        c_dim = groups[self.canonical].dim
        self.canonical_norm = nn.LayerNorm(c_dim)
        self.out = nn.Linear(cfg.dim, c_dim)
        self.gate = nn.Parameter(torch.zeros(c_dim))
        owner = torch.cat([torch.full((1,), -1)] + [torch.full((g.tokens,), g.prior) for g in groups])
        self.register_buffer("owner", owner, persistent=False)  # prior of each position; -1: ensemble
        self.recon = TokenReconstruction(groups, cfg.dim, cfg.recon_ratio) if self.aux_kind == "recon" else None

    @property
    def out_dim(self) -> int:
        return self.groups[self.canonical].dim

    def structure(self) -> torch.Tensor:
        """(S, S) allowed attention pairs before missing tokens are removed."""
        s = self.owner.numel()
        if self.cfg.attn == "full":
            return torch.ones(s, s, dtype=torch.bool, device=self.owner.device)
        same = self.owner[:, None] == self.owner[None, :]
        same[0, :] = True  # the ensemble token sees every prior
        return same

    def encode(
        self, tokens: list[torch.Tensor], hidden: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised output sequence (B, 1 + S, dim), ensemble token first, and the
        (B, 1 + S) mask of positions that were attended to. ``hidden`` (B, S) replaces those
        prior tokens by reconstruction placeholders."""
        x, present = self.tokens_in(tokens)
        if hidden is not None:
            x = torch.where(hidden[..., None], self.recon.placeholder, x)
            present = present & ~hidden
        b = x.shape[0]
        x = torch.cat([self.ensemble.expand(b, -1, -1), x], dim=1)
        present = torch.cat([present.new_ones(b, 1), present], dim=1)
        allowed = self.structure()[None] & present[:, None, :]
        allowed = allowed | torch.eye(x.shape[1], dtype=torch.bool, device=x.device)  # no empty rows
        allowed = allowed[:, None]
        for blk in self.blocks:
            x = blk(x, allowed)
        return self.norm(x), present

    def ensemble_token(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        return self.encode(tokens)[0][:, 0]

    def canonical_rep(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """The normalised canonical representation ``c``: the single-prior model's input."""
        return self.canonical_norm(canonical_token(tokens[self.canonical], self.groups[self.canonical].layout))

    def set_aux_loss(self, tokens: list[torch.Tensor]) -> None:
        """During training with ``--aux recon:W``: a second pass that reconstructs hidden tokens."""
        if self.training and self.recon is not None:
            present = torch.cat([(t != 0).any(dim=-1) for t in tokens], dim=1)
            hidden = self.recon.hide(present)
            out, _ = self.encode(tokens, hidden)
            self.aux_loss = self.aux_weight * self.recon.loss(out[:, 1:], tokens, hidden)

    def fuse(self, tokens):
        self.set_aux_loss(tokens)
        return self.canonical_rep(tokens) + self.gate * self.out(self.ensemble_token(tokens))

    def ensemble_map(self) -> dict[str, torch.Tensor]:
        """The last block's ensemble-token attention over the prior tokens (heads averaged),
        from a forward run under ``keeping_attention(self.blocks[-1])``."""
        return {"ensemble": self.blocks[-1].attention[:, :, 0, 1:].mean(dim=1)}

    @torch.no_grad()
    def attention_maps(self, tokens):
        with keeping_attention(self.blocks[-1]):
            self.encode(tokens)
            return self.ensemble_map()

    def attention_shares(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """(B, priors): how the ensemble token's last-block attention splits over the priors."""
        shares = group_shares(self.attention_maps(tokens)["ensemble"], self.groups)
        return shares @ F.one_hot(torch.tensor([g.prior for g in self.groups]), self.num_priors).to(shares)
