"""The fuser registry and base class: cached prior tokens to a task representation.

``create_fuser(name, groups, tasks, cfg)`` builds any registered fuser; every fuser reads
the same cached token groups (one layer of one prior each), so they compare on equal terms.
Tokens that are exactly zero are missing (skipped samples, dropped priors) and are never
attended to; training-time masking (``token:P``, ``prior:P``) uses that same rule by
zeroing tokens, so a prior zeroed at test time is handled as it was in training.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
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
