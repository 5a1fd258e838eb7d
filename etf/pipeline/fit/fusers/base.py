"""The fuser base class: cached prior tokens to a task representation.

Every fuser reads the same cached token groups (one layer of one prior each), so they compare on equal terms.
Tokens that are exactly zero are missing (skipped samples, dropped priors) and are never
attended to; training-time masking (``token:P``, ``prior:P``) uses that same rule by
zeroing tokens, so a prior zeroed at test time is handled as it was in training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from etf.cache.features import Group
from etf.cache.tokens import TokenLayout
from etf.errors import EtfError
from etf.pipeline.fit.config import FuserConfig, parse_aux, parse_mask


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
