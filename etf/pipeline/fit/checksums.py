"""SHA-256s of a run's files, written at publication and checked by every reader of the run.

``SHA256SUMS`` is in ``sha256sum``'s format, so ``sha256sum -c SHA256SUMS`` inside a run
directory checks it without etf. A model multiplied by a constant, or a config edited by hand,
is then refused with one line instead of predicting something else silently.
"""

from __future__ import annotations

from pathlib import Path

from etf.errors import EtfError
from etf.utils import atomic_path, sha256_file

SUMS = "SHA256SUMS"
#: the files predict, explain and ablate's report read back; summed once a run's files are all
#: written, before it is published
RUN_FILES = ("config.json", "stores.json", "metrics.json", "model.safetensors", "predictions.csv")


def write_sums(out: Path) -> None:
    """Record the SHA-256 of each of :data:`RUN_FILES` in ``out`` (the run's staging folder)."""
    lines = [f"{sha256_file(Path(out) / name)}  {name}\n" for name in RUN_FILES]
    with atomic_path(Path(out) / SUMS) as tmp:
        tmp.write_text("".join(lines))


def sums_problem(run: Path) -> str | None:
    """What is wrong with the run's files against their recorded SHA-256s, or None. A run
    fitted before runs carried checksums (no ``SHA256SUMS``) has nothing to check against."""
    path = Path(run) / SUMS
    if not path.exists():
        return None
    recorded: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        recorded[name] = digest
    for name in RUN_FILES:
        if name not in recorded:
            return f"{SUMS} records no SHA-256 for {name}"
        if not (Path(run) / name).exists():
            return f"{name} is missing"
        if sha256_file(Path(run) / name) != recorded[name]:
            return f"{name} does not match its SHA-256 in {SUMS} (changed since the fit)"
    return None


def check_sums(run: Path) -> None:
    """Refuse a run whose files changed since it was fitted."""
    problem = sums_problem(run)
    if problem:
        raise EtfError(f"--run {run}: {problem}; fit it again")
