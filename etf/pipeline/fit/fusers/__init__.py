"""Fusers: cached prior tokens to a task representation. One registry, ``create_fuser``.

``base`` holds the registry, ``FuserConfig`` and the ``Fuser`` base class; ``layers`` the
shared building blocks. Each fuser module registers itself on import: ``etfuser``
(ET-Fuser), ``baselines`` (``linear``, ``mean``, ``concat``), ``qface`` (``qface``,
``etfuser+qface``) and ``fra``.
"""

from etf.pipeline.fit.fusers import baselines, etfuser, fra, qface  # noqa: F401  (register)
from etf.pipeline.fit.fusers.base import (
    FUSERS,
    Fuser,
    FuserConfig,
    count_parameters,
    create_fuser,
    flops_per_sample,
    parse_aux,
    parse_mask,
    register_fuser,
)

__all__ = [
    "FUSERS",
    "Fuser",
    "FuserConfig",
    "count_parameters",
    "create_fuser",
    "flops_per_sample",
    "parse_aux",
    "parse_mask",
    "register_fuser",
]
