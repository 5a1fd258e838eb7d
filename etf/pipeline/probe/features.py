"""Each prior's pooled representation of the samples, read block by block from its store.

The probes read what the fuser reads: each prior's pooled token by its own pooling (a ViT's
class token, a CNN's map mean; :func:`etf.cache.tokens.resolve_pool`), or an override such
as the patch mean. Only one block of tokens is in memory at a time; the result is one
(N, D) float32 matrix per prior.
"""

from __future__ import annotations

import numpy as np
import torch

from etf.cache.features import PriorSet, rows_between
from etf.cache.tokens import pool_tokens, resolve_pool

#: tokens read per block (bytes), whatever N is
BLOCK_BYTES = 64 << 20


def pooled_features(priors: PriorSet, rows: np.ndarray, pool: str | None = None) -> dict[str, np.ndarray]:
    """Per prior (its last layer), the pooled features of sorted ``rows`` as (len(rows), D)
    float32; ``pool`` overrides each prior's own pooling where its tokens allow it."""
    step = priors.block_rows * max(1, BLOCK_BYTES // max(1, priors.row_bytes() * priors.block_rows))
    groups = {g.name: (k, g) for k, g in enumerate(priors.groups)}  # the last group of a prior: its last layer
    parts: dict[str, list[np.ndarray]] = {name: [] for name in groups}
    n = len(priors.dataset)
    for start in range(0, n, step):
        stop = min(n, start + step)
        sel = rows_between(rows, start, stop)
        if not len(sel):
            continue
        block = priors.read_block(start, stop)
        local = torch.from_numpy(sel - start)
        for name, (k, g) in groups.items():
            x = block[k][local].float()
            parts[name].append(pool_tokens(x, g.layout, resolve_pool(g.layout, pool)).numpy())
    return {name: np.concatenate(p) if p else np.zeros((0, 0), np.float32) for name, p in parts.items()}
