"""Resuming a fit from its last complete epoch.

At the end of every epoch each model of a fit writes its whole training state (weights,
optimiser, schedule, loss scaler, torch RNG stream, history, best state so far, early-stop
and divergence flags) to ``.<run>.resume/state.pt`` beside its run directory, atomically.
The batches of an epoch are drawn from ``(seed, epoch)`` alone, so a fit that restores this
state and goes on from the next epoch computes what an uninterrupted one would, bit for bit
on a CPU. The folder is removed once the fit has ended (the run published or the model
diverged). A killed fit run again with the same command picks it up; a state written for
other settings or data (its fingerprint differs) is ignored and overwritten.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import torch

from etf.utils import atomic_path, spec_hash

STATE = "state.pt"


def resume_dir(out: Path) -> Path:
    """Where the training state of the run ``out`` is kept while it is being fitted."""
    out = Path(out)
    return out.with_name(f".{out.name}.resume")


def fingerprint(config: dict[str, Any], dataset_key: str, stores: list[dict[str, Any]]) -> str:
    """What a saved state is valid for: every setting but the progress bar, the dataset and the
    stores read."""
    settings = {k: v for k, v in config.items() if k != "progress"}
    return spec_hash({"config": settings, "dataset": dataset_key, "stores": [s["spec_hash"] for s in stores]})


def save(out: Path, key: str, epoch: int, state: dict[str, Any]) -> None:
    """The state of the run ``out`` after ``epoch`` complete epochs."""
    folder = resume_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # torch.save turns a failed write (a full disk) into a RuntimeError; a file's write does not
    torch.save({"fingerprint": key, "epoch": epoch, "state": state}, buffer)
    with atomic_path(folder / STATE) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load(out: Path, key: str) -> tuple[int, dict[str, Any]] | None:
    """(complete epochs, state) saved for the run ``out`` with fingerprint ``key``, or None."""
    path = resume_dir(out) / STATE
    if not path.exists():
        return None
    try:
        # etf's own file, in the run's hidden folder; it holds NumPy arrays (val predictions) too
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # unreadable (a disk error): the fit starts over, as without one
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != key:
        return None
    return int(saved["epoch"]), saved["state"]


def clear(out: Path) -> None:
    """Remove the run's saved state: its fit has ended."""
    shutil.rmtree(resume_dir(out), ignore_errors=True)
