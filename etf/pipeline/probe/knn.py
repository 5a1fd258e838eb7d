"""k-nearest-neighbour probe, as dinov2's ``eval/knn.py``.

Features are L2-normalised and compared by cosine similarity; each query's ``max(ks)``
nearest training samples are weighted by a softmax of their similarities over the
temperature ``T`` (0.07), and for each k the first k of them vote: the class with the most
weight wins (dinov2's ``probas_for_k``), or, for real-valued and binary targets, the
weighted mean of their labels (each label over the neighbours that have it).

Queries go in chunks whose similarity rows fit ``budget`` entries: memory is
O(chunk x N_train), never N x N.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07
#: similarity entries per chunk of queries (256 MiB of float32)
BUDGET = 1 << 26


@torch.no_grad()
def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    ks: tuple[int, ...],
    classes: int | None,
    train_m: np.ndarray | None = None,
    temperature: float = TEMPERATURE,
    device: torch.device | str = "cpu",
    budget: int = BUDGET,
) -> dict[int, np.ndarray]:
    """Per k in ``ks`` (each at most the training samples), the predictions for ``query_x``:
    with ``classes`` the winning class index of ``train_y`` (N,) as (Q, 1); else the weighted
    mean of ``train_y`` (N, c) over the neighbours where ``train_m`` (N, c) marks a label,
    as (Q, c) (NaN where no neighbour has it)."""
    device = torch.device(device)
    train = F.normalize(torch.from_numpy(train_x).float().to(device), dim=1)
    y = torch.from_numpy(np.asarray(train_y)).to(device)
    if classes is None:
        y = y.float().reshape(len(train), -1)
        m = (torch.ones_like(y) if train_m is None else torch.from_numpy(train_m).to(device).float()).reshape(y.shape)
    else:
        y = y.long().reshape(-1)
    top = max(ks)
    chunk = max(1, budget // max(1, len(train)))
    out: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    for start in range(0, len(query_x), chunk):
        q = F.normalize(torch.from_numpy(query_x[start : start + chunk]).float().to(device), dim=1)
        sims, idx = (q @ train.T).topk(top, dim=1)
        weights = torch.softmax(sims / temperature, dim=1)
        for k in ks:
            w, nb = weights[:, :k], idx[:, :k]
            if classes is not None:
                votes = torch.zeros(len(q), classes, device=device).scatter_add_(1, y[nb], w)
                out[k].append(votes.argmax(dim=1, keepdim=True).float().cpu().numpy())
            else:
                wm = w[..., None] * m[nb]
                mean = (wm * y[nb]).sum(dim=1) / wm.sum(dim=1)  # 0/0: no neighbour has the label
                out[k].append(mean.cpu().numpy())
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}
