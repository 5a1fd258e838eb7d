"""Start-up time of commands that compute nothing, against the interpreter and torch's import.

    python bench/startup.py [--repeat 5]

Each command runs in a fresh process ``--repeat`` times; the median wall time is printed
beside two baselines measured in the same run: a bare ``python -c pass`` (the floor) and
``python -c "import torch"`` (what every command paid when the CLI imported the pipeline at
module level). Also measured: building the first optimiser in a fresh process after torch
is imported, which imports torch._dynamo (torch's optimisers do so on first use; torch has
no switch to avoid it), a one-off cost of every ``etf fit`` process and grid worker.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

OPTIMISER = """
import time, torch
model = torch.nn.Linear(8, 2)
t = time.perf_counter()
torch.optim.AdamW(model.parameters())
print(time.perf_counter() - t)
"""


def wall(args: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()
        floor = wall([PY, "-c", "pass"], args.repeat)
        torch_import = wall([PY, "-c", "import torch"], args.repeat)
        etf = [PY, "-m", "etf.cli"]
        rows = [
            ("etf --help", etf + ["--help"]),
            ("etf fit --help", etf + ["fit", "--help"]),
            ("etf ablate --help", etf + ["ablate", "--help"]),
            ("etf data list", etf + ["data", "list"]),
            ("etf cache ls (empty cache)", etf + ["cache", "ls", str(cache)]),
        ]
        print(
            f"python -c pass: {floor:.3f} s; python -c 'import torch': {torch_import:.3f} s (median of {args.repeat})"
        )
        print(f"{'command':<30} {'seconds':>8} {'/ import torch':>15}")
        for name, cmd in rows:
            t = wall(cmd, args.repeat)
            print(f"{name:<30} {t:>8.3f} {t / torch_import:>15.2f}")
        first = [float(subprocess.run([PY, "-c", OPTIMISER], capture_output=True, text=True, check=True).stdout)]
        first += [float(subprocess.run([PY, "-c", OPTIMISER], capture_output=True, text=True, check=True).stdout)]
        print(f"first AdamW() in a fresh process (imports torch._dynamo): {statistics.median(first):.2f} s")


if __name__ == "__main__":
    main()
