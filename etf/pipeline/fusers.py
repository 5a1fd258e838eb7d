"""Fusers: cached prior tokens to a task representation. One registry, ``create_fuser``.

ET-Fuser as this project defines it (every choice a flag, see ``FuserConfig``):

1. each token group (a prior's layer) is mapped by LayerNorm + Linear to width ``dim`` and
   marked by a learnable embedding of the prior (and layer) it came from;
2. a learnable ensemble token is prepended and ``depth`` pre-norm self-attention blocks run
   over the whole sequence (``attn=intra``: prior tokens attend only within their prior;
   the ensemble token attends to all);
3. the canonical representation ``c`` (the first prior's class/pooled token, i.e. the
   single-prior model) is fused with the ensemble token ``t`` through a zero-initialised
   gate, ``h = LN(c) + g * W t``, so training starts exactly at the ``linear`` baseline;
4. task heads read ``h``.

Tokens that are exactly zero are missing (skipped samples, dropped priors) and are never
attended to; training-time masking (``token:P``, ``prior:P``) uses that same rule by
zeroing tokens, so a prior zeroed at test time is handled as it was in training.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from etf.cache.features import Group
from etf.cache.tokens import TokenLayout
from etf.errors import EtfError


@dataclass
class FuserConfig:
    """Fuser hyper-parameters; each fuser reads the ones it uses."""

    dim: int = 256
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    attn: str = "full"
    mask: str = "none"

    def __post_init__(self) -> None:
        if self.attn not in ("full", "intra"):
            raise EtfError(f"--attn {self.attn!r}: use full or intra")
        parse_mask(self.mask)
        if self.dim % self.heads:
            raise EtfError(f"--dim {self.dim} is not divisible by --heads {self.heads}")


def parse_mask(mask: str) -> tuple[str, float]:
    """``none``, ``token:P`` or ``prior:P`` (0 <= P < 1)."""
    if mask == "none":
        return "none", 0.0
    m = re.fullmatch(r"(token|prior):([0-9.]+)", mask)
    if not m or not 0.0 <= float(m.group(2)) < 1.0:
        raise EtfError(f"--mask {mask!r}: use none, token:P or prior:P with 0 <= P < 1")
    return m.group(1), float(m.group(2))


FUSERS: dict[str, type[Fuser]] = {}


def register_fuser(name: str) -> Callable[[type[Fuser]], type[Fuser]]:
    def deco(cls: type[Fuser]) -> type[Fuser]:
        FUSERS[name] = cls
        cls.fuser_name = name
        return cls

    return deco


def create_fuser(name: str, groups: list[Group], tasks: list[Any], cfg: FuserConfig) -> Fuser:
    if name not in FUSERS:
        raise EtfError(f"--fuser {name!r}: unknown (choose from {', '.join(sorted(FUSERS))})")
    return FUSERS[name](groups, tasks, cfg)


def canonical_token(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The class token, or the mean patch token when there is no prefix (CNNs)."""
    return x[:, 0] if layout.prefix else x[:, layout.prefix :].mean(dim=1)


class Fuser(nn.Module):
    """Base: training-time token/prior dropping, then ``fuse``; one output per task.

    ``forward`` returns ``{task name: representation}``: (B, out_dim) for fusers shared by
    all tasks, (B, Q, out_dim) for per-query fusers (Q-Face).
    """

    fuser_name = ""

    def __init__(self, groups: list[Group], tasks: list[Any], cfg: FuserConfig) -> None:
        super().__init__()
        #: an auxiliary training loss a fuser may set during a training forward; fit adds it
        self.aux_loss: torch.Tensor | None = None
        if not groups:
            raise EtfError("a fuser needs at least one prior")
        self.groups, self.cfg = groups, cfg
        self.task_names = [t.name for t in tasks]
        self.num_priors = max(g.prior for g in groups) + 1
        self.mask_kind, self.mask_p = parse_mask(cfg.mask)
        # the canonical representation: the last layer of the first prior
        self.canonical = max((i for i, g in enumerate(groups) if g.prior == 0), key=lambda i: groups[i].layer)

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    def fuse(self, tokens: list[torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, tokens: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.training and self.mask_p > 0:
            tokens = self._drop(tokens)
        out = self.fuse([t.float() for t in tokens])
        return out if isinstance(out, dict) else dict.fromkeys(self.task_names, out)

    def _drop(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        b = tokens[0].shape[0]
        if self.mask_kind == "prior":
            keep_prior = torch.rand(b, self.num_priors, device=tokens[0].device) >= self.mask_p
            return [t * keep_prior[:, g.prior, None, None].to(t.dtype) for t, g in zip(tokens, self.groups)]
        return [t * (torch.rand(t.shape[:2], device=t.device) >= self.mask_p)[..., None].to(t.dtype) for t in tokens]


class Block(nn.Module):
    """Pre-norm transformer block whose attention can report its weights."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)
        self.attention: torch.Tensor | None = None
        self.keep_attention = False

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``allowed`` (B, 1, S, S): True where a query may attend to a key."""
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.keep_attention:
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
            attn = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            self.attention = attn.detach()
            y = attn @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, s, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


class PriorTokens(nn.Module):
    """Per-group LayerNorm + Linear to a common width, plus a learnable source embedding."""

    def __init__(self, groups: list[Group], dim: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(g.dim), nn.Linear(g.dim, dim)) for g in groups)
        self.embed = nn.Parameter(torch.zeros(len(groups), dim))
        nn.init.trunc_normal_(self.embed, std=0.02)

    def forward(self, tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, dim) projected tokens and the (B, S) mask of present (non-zero) tokens."""
        seq = [p(t) + self.embed[i] for i, (p, t) in enumerate(zip(self.proj, tokens))]
        present = [(t != 0).any(dim=-1) for t in tokens]
        return torch.cat(seq, dim=1), torch.cat(present, dim=1)


@register_fuser("etfuser")
class ETFuser(Fuser):
    """Learned ensemble token over all priors' tokens, gated into the canonical representation."""

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

    def ensemble_token(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        x, present = self.tokens_in(tokens)
        b = x.shape[0]
        x = torch.cat([self.ensemble.expand(b, -1, -1), x], dim=1)
        present = torch.cat([present.new_ones(b, 1), present], dim=1)
        allowed = self.structure()[None] & present[:, None, :]
        allowed = allowed | torch.eye(x.shape[1], dtype=torch.bool, device=x.device)  # no empty rows
        allowed = allowed[:, None]
        for blk in self.blocks:
            x = blk(x, allowed)
        return self.norm(x[:, 0])

    def fuse(self, tokens):
        c = canonical_token(tokens[self.canonical], self.groups[self.canonical].layout)
        return self.canonical_norm(c) + self.gate * self.out(self.ensemble_token(tokens))

    def attention_shares(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """(B, priors): how the ensemble token's last-block attention splits over the priors."""
        last = self.blocks[-1]
        last.keep_attention = True
        try:
            self.ensemble_token(tokens)
            row = last.attention[:, :, 0].mean(dim=1)  # (B, S), heads averaged
        finally:
            last.keep_attention, last.attention = False, None
        onehot = F.one_hot(self.owner.clamp(min=0), self.num_priors).float() * (self.owner >= 0)[:, None]
        return row @ onehot


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


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def flops_per_sample(model: nn.Module, tokens: list[torch.Tensor]) -> int:
    """Forward FLOPs of ``model`` on one sample (multiply-add = 2), measured by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model([t[:1].float() for t in tokens])
    model.train(was)
    return int(counter.get_total_flops())
