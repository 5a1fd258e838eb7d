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

The related systems over the same cache, built from the parts here (``Block``,
``PriorTokens``), live beside this module and register themselves on import: ``qface`` and
``etfuser+qface`` (``fusers_qface``), ``fra`` (``fusers_fra``). ``--aux recon:W`` adds the
patch-level reconstruction objective to ``etfuser`` (``TokenReconstruction``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

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
    #: Q-Face label queries: ``label`` gives a multi-label task one query per label, ``task`` one per task
    queries: str = "label"
    #: FRA: number of facial-mask embeddings (regions) and the heatmap softmax temperature
    regions: int = 8
    temperature: float = 0.1
    #: auxiliary objective: ``none``, ``recon:W`` (ET-Fuser fusers) or ``sinkhorn:W`` (fra)
    aux: str = "none"
    #: fraction of the present prior tokens that ``recon`` hides
    recon_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.attn not in ("full", "intra"):
            raise EtfError(f"--attn {self.attn!r}: use full or intra")
        parse_mask(self.mask)
        parse_aux(self.aux)
        if self.dim % self.heads:
            raise EtfError(f"--dim {self.dim} is not divisible by --heads {self.heads}")
        if self.queries not in ("label", "task"):
            raise EtfError(f"--queries {self.queries!r}: use label or task")
        if self.regions < 1 or self.temperature <= 0:
            raise EtfError(
                f"--regions {self.regions} / --temperature {self.temperature}: need at least one region and a positive temperature"
            )
        if not 0 < self.recon_ratio < 1:
            raise EtfError(f"--recon-ratio {self.recon_ratio}: must be in (0, 1)")


def parse_mask(mask: str) -> tuple[str, float]:
    """``none``, ``token:P`` or ``prior:P`` (0 <= P < 1)."""
    if mask == "none":
        return "none", 0.0
    m = re.fullmatch(r"(token|prior):([0-9.]+)", mask)
    if not m or not 0.0 <= float(m.group(2)) < 1.0:
        raise EtfError(f"--mask {mask!r}: use none, token:P or prior:P with 0 <= P < 1")
    return m.group(1), float(m.group(2))


def parse_aux(aux: str) -> tuple[str, float]:
    """``none``, ``recon:W`` or ``sinkhorn:W`` (W > 0, the loss weight)."""
    if aux == "none":
        return "none", 0.0
    m = re.fullmatch(r"(recon|sinkhorn):([0-9.eE+-]+)", aux)
    try:
        weight = float(m.group(2)) if m else -1.0
    except ValueError:
        weight = -1.0
    if weight <= 0:
        raise EtfError(f"--aux {aux!r}: use none, recon:W or sinkhorn:W with a weight W > 0")
    return m.group(1), weight


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
    all tasks, (B, Q, out_dim) for per-query fusers (Q-Face, one query per label).
    """

    fuser_name = ""
    #: the ``--aux`` objectives this fuser implements
    aux_kinds: tuple[str, ...] = ()

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
        self.aux_kind, self.aux_weight = parse_aux(cfg.aux)
        if self.aux_kind != "none" and self.aux_kind not in self.aux_kinds:
            offered = " or ".join(f"{k}:W" for k in self.aux_kinds) or "no auxiliary objective"
            raise EtfError(f"--aux {cfg.aux}: the {self.fuser_name} fuser offers {offered}")
        # the canonical representation: the last layer of the first prior
        self.canonical = max((i for i, g in enumerate(groups) if g.prior == 0), key=lambda i: groups[i].layer)

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    def fuse(self, tokens: list[torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, tokens: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        self.aux_loss = None
        if self.training and self.mask_p > 0:
            tokens = self._drop(tokens)
        out = self.fuse([t.float() for t in tokens])
        return out if isinstance(out, dict) else dict.fromkeys(self.task_names, out)

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


# the related systems register themselves in FUSERS (they build on the classes above)
from etf.pipeline import fusers_fra, fusers_qface  # noqa: E402, F401
