"""The ``etf`` command line: click commands that parse, call the pipeline, and print."""

from __future__ import annotations

import warnings

import click

from etf.errors import EtfError


class _Group(click.Group):
    """Turns :class:`EtfError` into one ``Error: ...`` line and exit status 1, and Ctrl-C into
    one line and the shell's status for it, 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EtfError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted: what finished is kept; run the same command again to resume.", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="etf")
def main() -> None:
    """ET-Fuser: learn an ensemble token over frozen face encoders, from a token cache."""
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings meant for the user (e.g. skipped malformed annotations) as one line, no source."""
    return f"Warning: {message}\n"


def _register() -> None:
    """Every command module is light (heavy libraries load inside the commands)."""
    from etf.cli import ablate, cache, data, explain, extract, fit, predict

    for module in (extract, fit, predict, explain, ablate, cache, data):
        main.add_command(module.command)


_register()
