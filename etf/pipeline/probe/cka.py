"""Debiased linear CKA between priors' representations of the same samples (Kornblith et
al. 2019, with the unbiased HSIC estimator of Song et al. 2012), and its interval.

CKA is computed from centred Gram matrices of a seeded subset of at most ``samples``
samples (memory ``samples``², whatever N is); 1 means the two priors' representations are
the same up to rotation and scale, 0 that they share no linear structure. The interval comes
from half-samples drawn without replacement (B of them): a half-sample's estimate varies
about as much around the full estimate as the full estimate does around the truth (the
finite-population factor 1 - m/n is 1/2), and without replacement no sample is its own
neighbour, which would bias the debiased estimator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: samples CKA is computed on at most; half-samples drawn for the interval
SAMPLES, HALVES = 2000, 100


def gram(x: torch.Tensor) -> torch.Tensor:
    """Linear kernel of features centred over the samples: the product in the features'
    precision, the sums of CKA in float64."""
    x = x - x.double().mean(dim=0, keepdim=True).to(x.dtype)
    return (x @ x.T).double()


def _hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Unbiased HSIC (Song et al. 2012) of (B, n, n) Grams, up to a factor common to every
    pair (it cancels in CKA)."""
    n = k.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    k, l = k.masked_fill(eye, 0), l.masked_fill(eye, 0)  # noqa: E741
    kl = (k * l).sum(dim=(-2, -1))
    ks, ls = k.sum(dim=(-2, -1)), l.sum(dim=(-2, -1))
    k1l = (k.sum(dim=-1) * l.sum(dim=-1)).sum(dim=-1)
    return kl + ks * ls / ((n - 1) * (n - 2)) - 2 * k1l / (n - 2)


def cka_gram(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Debiased CKA of (..., n, n) Gram matrices (n >= 4)."""
    return _hsic(k, l) / torch.sqrt(_hsic(k, k) * _hsic(l, l))


@dataclass(frozen=True)
class CKA:
    """One pair's CKA and its 95% half-sample interval, over ``samples`` samples."""

    value: float
    low: float
    high: float
    samples: int


def pairwise_cka(
    features: dict[str, np.ndarray],
    seed: int = 0,
    samples: int = SAMPLES,
    halves: int = HALVES,
    device: torch.device | str = "cpu",
) -> dict[tuple[str, str], CKA]:
    """Debiased linear CKA of every pair of priors (features of the same samples, in the
    same order), each with its interval."""
    names = list(features)
    n = len(next(iter(features.values())))
    rng = np.random.default_rng([seed, 0xC4A])
    rows = np.sort(rng.choice(n, size=min(n, samples), replace=False))
    m = len(rows)
    grams = {p: gram(torch.from_numpy(features[p][rows]).to(device)) for p in names}
    eye = torch.eye(m, dtype=torch.bool, device=device)
    for p in names:
        grams[p].masked_fill_(eye, 0)
    # each half-sample as a 0/1 row: its HSIC terms are quadratic forms of the full Grams (the
    # estimator needs no re-centring: it is invariant to shifting the features)
    s = torch.zeros(halves, m, dtype=torch.float64, device=device)
    for r in range(halves):
        s[r, torch.from_numpy(rng.choice(m, m // 2, replace=False)).to(device)] = 1
    ks = {p: s @ grams[p] for p in names}
    rows_sum = {p: grams[p].sum(dim=1) for p in names}

    def terms(n: int, kl: torch.Tensor, k: torch.Tensor, l: torch.Tensor, k1l: torch.Tensor) -> torch.Tensor:  # noqa: E741
        return kl + k * l / ((n - 1) * (n - 2)) - 2 * k1l / (n - 2)

    def hsic(a: str, b: str) -> tuple[float, torch.Tensor]:
        """The pair's HSIC (:func:`_hsic`) over all ``m`` samples, and over each half-sample."""
        both = grams[a] * grams[b]
        ra, rb = rows_sum[a], rows_sum[b]
        whole = terms(m, both.sum(), ra.sum(), rb.sum(), (ra * rb).sum())
        n = m // 2
        half = terms(n, ((s @ both) * s).sum(dim=1), (ks[a] * s).sum(dim=1), (ks[b] * s).sum(dim=1),
                     (s * ks[a] * ks[b]).sum(dim=1))  # fmt: skip
        return float(whole), half

    own = {p: hsic(p, p) for p in names}
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            whole, half = hsic(a, b)
            value = whole / np.sqrt(own[a][0] * own[b][0])
            values = (half / torch.sqrt(own[a][1] * own[b][1])).cpu().numpy()
            low, high = value + np.percentile(values - values.mean(), [2.5, 97.5])
            out[(a, b)] = CKA(float(value), float(low), float(high), m)
    return out
