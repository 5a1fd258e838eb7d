"""``etf data list``."""

from __future__ import annotations

import click

from etf.data.base import list_datasets


@click.group("data")
def command() -> None:
    """Dataset formats: what is known and how it is laid out."""


@command.command("list")
def list_() -> None:
    """Dataset formats with their default task, metric and expected layout."""
    for a in list_datasets():
        opts = ", ".join(f"{k}={v.default}" for k, v in a.options.items())
        click.echo(f"{a.name:<12} {a.description}")
        click.echo(f"{'':<12} task: {', '.join(a.tasks) or '(give --task)'}; metric: {a.metric or '-'}" + (f"; options: {opts}" if opts else ""))
        click.echo(f"{'':<12} layout: {a.layout}")
