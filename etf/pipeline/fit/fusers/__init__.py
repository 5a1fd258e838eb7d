"""Fusers: cached prior tokens to a task representation. One registry, ``create_fuser``.

Each fuser module registers its classes with :func:`register_fuser` when imported;
:data:`FUSER_MODULES` says which module defines which name, so that a name is known (and
the command line can list and check it) without importing torch, and a module is imported
only when one of its fusers is built. ``base`` holds the ``Fuser`` base class, ``layers``
the shared building blocks; ``etfuser`` (ET-Fuser), ``baselines`` (``linear``, ``mean``,
``concat``), ``qface`` (``qface``, ``etfuser+qface``) and ``fra`` the fusers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from etf.errors import EtfError
from etf.pipeline.fit.config import FuserConfig

#: every fuser name and the module (under this package) that registers it
FUSER_MODULES: dict[str, str] = {
    "etfuser": "etfuser",
    "linear": "baselines",
    "mean": "baselines",
    "concat": "baselines",
    "qface": "qface",
    "etfuser+qface": "qface",
    "fra": "fra",
}

#: name -> class of every fuser registered so far (modules register on import)
FUSERS: dict[str, type] = {}


def register_fuser(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        FUSERS[name] = cls
        cls.fuser_name = name
        return cls

    return deco


def fuser_names() -> list[str]:
    """Every known fuser name, sorted."""
    return sorted({*FUSER_MODULES, *FUSERS})


def check_fuser(name: str, flag: str = "--fuser") -> str:
    if name not in FUSER_MODULES and name not in FUSERS:
        raise EtfError(f"{flag} {name!r}: unknown fuser (choose from {', '.join(fuser_names())})")
    return name


def fuser_class(name: str) -> type:
    """The class registered as ``name``, importing its module on first use."""
    check_fuser(name)
    if name not in FUSERS:
        importlib.import_module(f"{__name__}.{FUSER_MODULES[name]}")
    return FUSERS[name]


def create_fuser(name: str, groups: list[Any], tasks: list[Any], cfg: FuserConfig) -> Any:
    return fuser_class(name)(groups, tasks, cfg)
