"""A killed fit resumes from its last complete epoch, with the result of an uninterrupted one.

The fit to kill runs as a real ``etf fit`` process; it is killed once its saved state says a
given number of epochs are complete. Same seed on a CPU: the model and the predictions are
bit for bit those of a fit that was never interrupted (on CUDA too, where the kernels used
are deterministic; these tests fit on the CPU, ``--device cpu``, on any machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from etf.pipeline.fit.resume import STATE, resume_dir
from tests.synthetic import xor_cache

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4
#: every fit of these tests is a process of its own with one thread: bit-for-bit equality
#: holds for one thread count (a test run may have changed the thread count of its own process)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def xor(tmp_path_factory):
    _, spec, cache = xor_cache(tmp_path_factory.mktemp("resume"), n=160)
    return spec, cache


def _args(xor, out: Path) -> list[str]:
    spec, cache = xor
    return ["fit", "--data", spec, "--cache", str(cache), "--encoders", "A,B", "--task", "classify:label",
            "--fuser", "etfuser", "--epochs", str(EPOCHS), "--batch-size", "8", "--schedule", "periodic:2",
            "--early-stop", "3", "--out", str(out), "--no-progress", "--device", "cpu"]  # fmt: skip


def _fit(xor, out: Path, *args: str) -> str:
    """``etf fit`` to the end in a process of its own; what it printed."""
    cmd = [sys.executable, "-m", "etf.cli", *_args(xor, out), *args]
    res = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def uninterrupted(xor, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    _fit(xor, out)
    assert not resume_dir(out).exists(), "the saved state goes once the run is published"
    return out


def _saved_epoch(out: Path) -> int:
    """Complete epochs in the saved state (0: none yet or being replaced)."""
    try:
        return torch.load(resume_dir(out) / STATE, weights_only=False)["epoch"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


def _kill_after(xor, out: Path, epochs: int, sig: int, mid_epoch: bool) -> int:
    """Start ``etf fit``, wait until ``epochs`` epochs are saved, then send ``sig``: at once (at
    the epoch boundary) or half an epoch later (mid-epoch). The complete epochs it left."""
    proc = subprocess.Popen([sys.executable, "-m", "etf.cli", *_args(xor, out)], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        seen: dict[int, float] = {}
        while (epoch := _saved_epoch(out)) < epochs:
            assert proc.poll() is None, f"the fit ended before it could be killed: {proc.stdout.read()}"
            seen.setdefault(epoch, time.monotonic())
            time.sleep(0.005)
        if mid_epoch and len(seen) > 1:
            time.sleep((time.monotonic() - seen[max(seen)]) / 2)  # half the last epoch's length
        proc.send_signal(sig)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 143), output
    assert not out.exists(), "nothing is published by a killed fit"
    return _saved_epoch(out)


@pytest.mark.parametrize(
    ("sig", "epochs", "mid_epoch"),
    [(signal.SIGKILL, 1, False), (signal.SIGTERM, 2, True)],
    ids=["kill-9-at-an-epoch-boundary", "sigterm-mid-epoch"],
)
def test_a_killed_fit_resumes_bit_for_bit(xor, uninterrupted, tmp_path, sig, epochs, mid_epoch):
    out = tmp_path / "run"
    done = _kill_after(xor, out, epochs, sig, mid_epoch)
    assert epochs <= done < EPOCHS
    output = _fit(xor, out)  # the same command again
    assert f"resumed after epoch {done}" in output
    assert json.loads((out / "metrics.json").read_text())["resumed_after_epoch"] == done
    for name in ("model.safetensors", "predictions.csv"):
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    keep = ("epoch", "lr", "train_loss", "selection_score")  # the history, but for the speed measured
    history = [
        [line.split(",")[: len(keep)] for line in (run / "history.csv").read_text().splitlines()]
        for run in (out, uninterrupted)
    ]
    assert history[0] == history[1]
    assert not resume_dir(out).exists()


def test_a_saved_state_of_other_settings_is_not_resumed(xor, uninterrupted, tmp_path):
    out = tmp_path / "run"
    _kill_after(xor, out, 1, signal.SIGKILL, False)
    output = _fit(xor, out, "--batch-size", "16")  # the last --batch-size wins
    assert "resumed" not in output
    assert "resumed_after_epoch" not in json.loads((out / "metrics.json").read_text())
