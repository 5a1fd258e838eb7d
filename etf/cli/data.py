"""``etf data list`` and ``etf data check``."""

from __future__ import annotations

import click

from etf.data.base import list_datasets, load_dataset
from etf.data.check import check_dataset

TASK_WIDTH = 72


def short_task(task: str) -> str:
    """A long column list shown as its first and last columns and a count."""
    kind, _, rest = task.partition(":")
    names = rest.split(",")
    if len(task) <= TASK_WIDTH or len(names) < 3:
        return task
    return f"{kind}:{names[0]},...,{names[-1]} ({len(names)} columns)"


@click.group("data")
def command() -> None:
    """Dataset formats: what is known, how it is laid out, and whether a copy is sound."""


@command.command("list")
def list_() -> None:
    """Dataset formats with their default task, metric and expected layout."""
    for a in list_datasets():
        opts = ", ".join(f"{k}={v.default}" for k, v in a.options.items())
        tasks = ", ".join(short_task(t) for t in a.tasks) or "(give --task)"
        click.echo(f"{a.name:<12} {a.description}")
        click.echo(f"{'':<12} task: {tasks}; metric: {a.metric or '-'}" + (f"; options: {opts}" if opts else ""))
        click.echo(f"{'':<12} layout: {a.layout}")


@command.command("check")
@click.argument("spec", metavar="SPEC")
@click.option("--crop", default=None, help="Check with this crop (none, bbox[:margin], align5[:size]).")
@click.option("--images/--no-images", default=True, show_default=True, help="Open every image file's header.")
@click.option("--workers", default=8, show_default=True, help="Threads for the image check.")
def check(spec: str, crop: str | None, images: bool, workers: int) -> None:
    """Counts per split and class, label sanity, missing and unreadable images of SPEC.

    SPEC is what --data takes (FORMAT:PATH[?key=value&...]). Exits with status 1 when it
    finds a problem, so it can gate a pipeline before an expensive extraction.
    """
    dataset = load_dataset(spec, require_files=False, crop=crop)
    report = check_dataset(dataset, images=images, workers=workers)
    click.echo(report.text())
    if not report.ok:
        raise SystemExit(1)
