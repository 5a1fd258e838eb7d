"""The ``etf`` command line: click commands that parse, call the pipeline, and print."""

from __future__ import annotations

import warnings

import click

from etf.errors import EtfError


class _Group(click.Group):
    """Turns :class:`EtfError` into one ``Error: ...`` line and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EtfError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="etf")
def main() -> None:
    """ET-Fuser: learn an ensemble token over frozen face encoders, from a token cache."""
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings meant for the user (e.g. skipped malformed annotations) as one line, no source."""
    return f"Warning: {message}\n"


def _register() -> None:
    from etf.cli import ablate, cache, data, extract, fit, predict

    for module in (extract, fit, predict, ablate, cache, data):
        main.add_command(module.command)
    from etf.cli import explain

    main.add_command(explain.command)


_register()
