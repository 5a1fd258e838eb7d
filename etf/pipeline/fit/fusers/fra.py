"""FRA (Facial Region Awareness) as a fuser over frozen tokens.

K learnable facial-mask embeddings are compared by cosine similarity with a per-token
projection of every prior token; a softmax over tokens (temperature ``temperature``) turns
each into a heatmap, and heatmap-weighted pooling of the projected tokens gives K region
embeddings. The global embedding (the mean token) and the region embeddings are mixed by a
two-layer MLP into the representation the (linear) heads read; in FRA that non-linearity
is the trained backbone's, which here is frozen.

``--aux sinkhorn:W`` adds FRA's deep-clustering view of the mask embeddings: each token's
soft assignment over the regions is pulled towards a balanced assignment computed by
Sinkhorn-Knopp over the batch (every region receives an equal share of the tokens), so the
regions cannot collapse onto one.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from etf.cache.features import Group
from etf.pipeline.fit.config import FuserConfig
from etf.pipeline.fit.fusers import register_fuser
from etf.pipeline.fit.fusers.base import Fuser
from etf.pipeline.fit.fusers.layers import PriorTokens

SINKHORN_EPS = 0.05  # SwAV's entropy regularisation of the balanced assignment
SINKHORN_ITERS = 10  # more than SwAV's 3: token batches are small and skewed


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = SINKHORN_EPS, iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """(N, K) similarities to an (N, K) assignment whose rows sum to 1 and whose columns
    share the N rows equally (Sinkhorn-Knopp as in SwAV, in the log domain so that sharp
    scores cannot underflow)."""
    n, k = scores.shape
    log_q = scores / eps
    for _ in range(iters):
        log_q = log_q - log_q.logsumexp(dim=0, keepdim=True) + math.log(n / k)
        log_q = log_q - log_q.logsumexp(dim=1, keepdim=True)
    return log_q.exp()


@register_fuser("fra")
class FRAFuser(Fuser):
    """Heatmaps of K facial-mask embeddings over the tokens; global + region embeddings."""

    no_weight_decay: ClassVar[tuple[str, ...]] = ("masks",)

    aux_kinds = ("sinkhorn",)

    def __init__(self, groups: list[Group], tasks: list[Any], cfg: FuserConfig) -> None:
        super().__init__(groups, tasks, cfg)
        cfg = self.cfg  # resolved: unset settings filled
        d, k = cfg.dim, cfg.regions
        self.tokens_in = PriorTokens(groups, d)
        self.key = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))  # FRA's per-pixel projection
        self.masks = nn.Parameter(torch.randn(k, d))
        hidden = int(d * cfg.mlp_ratio)
        self.mix = nn.Sequential(
            nn.LayerNorm((k + 1) * d),
            nn.Linear((k + 1) * d, hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(hidden, d),
        )

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    def similarities(self, tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected tokens (B, S, d), cosine similarities (B, K, S) of mask embeddings and
        token projections, and the (B, S) mask of present tokens."""
        x, present = self.tokens_in(tokens)
        cos = F.normalize(self.masks, dim=-1) @ F.normalize(self.key(x), dim=-1).transpose(1, 2)
        return x, cos, present

    def _heatmaps(self, cos: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        logits = (cos / self.cfg.temperature).masked_fill(~present[:, None], float("-inf"))
        return logits.softmax(dim=-1).nan_to_num(0.0)  # a sample without tokens has no heatmap

    def heatmaps(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """(B, K, S) per-region distributions over the tokens (each sums to 1)."""
        _, cos, present = self.similarities(tokens)
        return self._heatmaps(cos, present)

    def fuse(self, tokens):
        x, cos, present = self.similarities(tokens)
        regions = self._heatmaps(cos, present) @ x
        weights = present.to(x.dtype)
        glob = (x * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp(min=1)
        if self.training and self.aux_kind == "sinkhorn":
            self.aux_loss = self.aux_weight * self.balance_loss(cos, present)
        return self.mix(torch.cat([glob[:, None], regions], dim=1).flatten(1))

    def balance_loss(self, cos: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each present token's region assignment (softmax over regions at
        ``temperature``) against the balanced Sinkhorn assignment of the batch's tokens."""
        scores = cos.transpose(1, 2)[present]  # (N, K)
        if not len(scores):
            return cos.sum() * 0
        target = sinkhorn(scores.detach())
        return -(target * F.log_softmax(scores / self.cfg.temperature, dim=-1)).sum(dim=-1).mean()

    @torch.no_grad()
    def attention_maps(self, tokens):
        heat = self.heatmaps(tokens)
        return {f"region{k + 1}": heat[:, k] for k in range(heat.shape[1])}
