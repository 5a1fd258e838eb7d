"""Frozen-feature probes of each prior alone, and how much the priors overlap, from the cache.

One file per protocol, as dinov2's ``eval/``: :mod:`.knn` (cosine, temperature-weighted
votes), :mod:`.logreg` (L2, C swept on val), :mod:`.cka` (debiased linear CKA); :mod:`.run`
reads the pooled features and runs them, :mod:`.report` writes tables, plots and JSON.
"""

from etf.pipeline.probe.run import METHODS, ProbeConfig, run_probe

__all__ = ["METHODS", "ProbeConfig", "run_probe"]
