"""The ``etf`` command line: click commands that parse, call the pipeline, and print."""

from __future__ import annotations

import errno
import signal
import warnings

import click

from etf.errors import EtfError

#: errors of the storage, not of etf: a full disk or quota, a file over its size limit, a
#: read-only or failing file system
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program runs so that it unwinds as for Ctrl-C: finished work
    is committed, worker processes are stopped, nothing is left behind."""


def _terminate(signum: int, frame) -> None:
    raise Terminated()


class _Group(click.Group):
    """Turns :class:`EtfError` and a storage error (a full disk) into one ``Error: ...`` line and
    exit status 1, and Ctrl-C or SIGTERM into one line and the shell's status for them, 130 or 143.
    Every write that a later command trusts is atomic, so a failed one leaves nothing it would read."""

    def invoke(self, ctx: click.Context):
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            return super().invoke(ctx)
        except EtfError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            if e.errno not in _STORAGE_ERRORS:
                raise
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}; fix that and run the same command again") from None
        except KeyboardInterrupt as e:
            click.echo("\nInterrupted: what finished is kept; run the same command again to resume.", err=True)
            ctx.exit(143 if isinstance(e, Terminated) else 130)
        finally:
            signal.signal(signal.SIGTERM, previous)


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
    from etf.cli import ablate, cache, data, explain, export, extract, fit, predict, probe

    for module in (extract, fit, predict, export, explain, probe, ablate, cache, data):
        main.add_command(module.command)


_register()
