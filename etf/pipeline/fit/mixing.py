"""What a joint fit over several datasets is configured by, importable without torch.

A joint fit (``etf fit --data A --data B``) trains one fuser and every dataset's task heads
(:mod:`etf.pipeline.fit.joint`). This module holds the parts the command line needs before
any heavy library loads: the joint settings (:class:`JointConfig`), how tasks are assigned
to datasets (``--task 2=multilabel:AU1,AU2``), how steps draw on the datasets (``--mix``)
and how ``--max-memory`` is shared among them.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from etf.errors import EtfError

MIXES = "balanced, proportional or temperature:T (T > 0)"


@dataclass
class JointConfig:
    """The settings only a joint fit has; recorded in its config.json under ``joint``.

    ``mix``: how steps draw on the datasets (:func:`mix_probabilities`); ``task_weights``:
    per-task loss weights (default 1); ``uncertainty``: learned per-task log-variances
    (Kendall et al., 2018); ``steps_per_epoch``: None for a pass over the largest train
    split; ``select``: a task name whose protocol metric picks the epoch, or None for the
    aggregate over every task (:mod:`etf.pipeline.fit.joint`).
    """

    mix: str = "proportional"
    task_weights: dict[str, float] = field(default_factory=dict)
    uncertainty: bool = False
    steps_per_epoch: int | None = None
    select: str | None = None

    def __post_init__(self) -> None:
        parse_mix(self.mix)
        for name, w in self.task_weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise EtfError(f"--task-weight {name}={w}: the weight must be a finite number >= 0")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise EtfError(f"--steps-per-epoch {self.steps_per_epoch}: must be at least 1")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_mix(mix: str) -> float:
    """The temperature of ``--mix``: ``proportional`` is T = 1, ``balanced`` T = inf."""
    if mix == "balanced":
        return math.inf
    if mix == "proportional":
        return 1.0
    m = re.fullmatch(r"temperature:([0-9.eE+-]+)", mix)
    try:
        t = float(m.group(1)) if m else -1.0
    except ValueError:
        t = -1.0
    if not t > 0:
        raise EtfError(f"--mix {mix!r}: use {MIXES}")
    return t


def mix_probabilities(mix: str, sizes: list[int]) -> np.ndarray:
    """Per dataset, the share of training steps drawn from it: ``p_k ∝ n_k^(1/T)`` for the
    train-split sizes ``n_k`` (T = 1 proportional, T -> inf balanced; the convention of
    multilingual sampling, where T > 1 flattens towards small datasets)."""
    t = parse_mix(mix)
    n = np.asarray(sizes, dtype=np.float64)
    w = np.ones_like(n) if math.isinf(t) else n ** (1.0 / t)
    return w / w.sum()


def step_plan(probabilities: np.ndarray, steps: int, seed: int, epoch: int) -> np.ndarray:
    """The dataset of each of an epoch's ``steps``: each dataset's count is its share of the
    steps rounded by largest remainder (at least one step for a dataset with a positive
    share, where there are steps enough), in a seeded random order per epoch. Exact counts
    rather than independent draws: an epoch holds the mix it was asked for."""
    exact = probabilities * steps
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: steps - counts.sum()]] += 1
    for k in np.nonzero((counts == 0) & (probabilities > 0))[0]:
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[k] += 1
    plan = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng([seed, epoch]).permutation(plan)


def memory_shares(needs: list[int], budget: int) -> list[int]:
    """Split ``budget`` bytes among datasets that need ``needs`` bytes in memory: max-min
    fair (water-filling). Datasets needing less than an equal share get what they need (and
    load into memory); the rest is split equally among the others (which stream)."""
    shares = [0] * len(needs)
    left, remaining = budget, sorted(range(len(needs)), key=lambda k: needs[k])
    while remaining:
        equal = left // len(remaining)
        k = remaining.pop(0)
        shares[k] = min(needs[k], equal)
        left -= shares[k]
    return shares


def dataset_labels(names: list[str]) -> list[str]:
    """How a joint fit names its datasets (metrics.json, summaries, ``--task NAME=``): the
    dataset's format name where unique among the ``--data``, else the name and its position
    (``csv1``, ``csv2``)."""
    return [n if names.count(n) == 1 else f"{n}{k + 1}" for k, n in enumerate(names)]


_PREFIXED = re.compile(r"([^:=?]+)=(.+)")


def split_prefix(value: str) -> tuple[str | None, str]:
    """``2=classify:x`` -> (``2``, ``classify:x``); ``classify:x`` -> (None, ``classify:x``)."""
    m = _PREFIXED.fullmatch(value)
    return (m.group(1), m.group(2)) if m else (None, value)


def which_dataset(prefix: str, labels: list[str], flag: str, value: str) -> int:
    """The index of the dataset a ``--task``/``--test-split`` prefix names: its 1-based
    position among the ``--data`` or its label."""
    if prefix.isdigit() and 1 <= int(prefix) <= len(labels):
        return int(prefix) - 1
    if prefix in labels:
        return labels.index(prefix)
    raise EtfError(
        f"{flag} {value!r}: {prefix!r} names no dataset; use a position 1..{len(labels)} or a name "
        f"({', '.join(labels)})"
    )


def assign(values: list[str], labels: list[str], flag: str) -> list[list[str]]:
    """Per dataset, the ``flag`` values given to it (``K=VALUE`` or ``NAME=VALUE``). With one
    dataset an unprefixed value is its own; with several, every value must say whose it is."""
    out: list[list[str]] = [[] for _ in labels]
    for value in values:
        prefix, rest = split_prefix(value)
        if prefix is None:
            if len(labels) > 1:
                raise EtfError(
                    f"{flag} {value!r}: with several --data, say which dataset it is for: "
                    f"1={value} (by position) or {labels[0]}={value} (by name)"
                )
            out[0].append(rest)
        else:
            out[which_dataset(prefix, labels, flag, value)].append(rest)
    return out


def parse_task_weights(values: list[str]) -> dict[str, float]:
    """``--task-weight NAME=W`` values to a mapping (task names are checked by the fit)."""
    out: dict[str, float] = {}
    for value in values:
        name, sep, w = value.partition("=")
        try:
            weight = float(w) if sep and name else -1.0
        except ValueError:
            weight = -1.0
        if not (math.isfinite(weight) and weight >= 0):
            raise EtfError(f"--task-weight {value!r}: use NAME=W with a task name and a weight W >= 0")
        if name in out:
            raise EtfError(f"--task-weight {value!r}: task {name!r} is weighted twice")
        out[name] = weight
    return out
