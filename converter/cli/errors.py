"""One ordered table maps exceptions to one-line messages and exit statuses."""
from __future__ import annotations

import errno
import sys

import click

from ..errors import QckptError
from ..settings import debug as debug_from_env


def _describe(exc: BaseException) -> str | None:
    """The one-line message for a failure we expect from bad input, or None for a bug."""
    if isinstance(exc, QckptError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"disk full while writing {exc.filename or 'output'}"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
    if isinstance(exc, OSError):
        return str(exc)
    return None


def run_guarded(call, debug: bool | None = False):
    """Run `call`; print `error: ...` and exit 1 for known failures; re-raise bugs and Click's own exits."""
    show_trace = bool(debug) or debug_from_env()
    try:
        return call()
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - classified below; unknown ones re-raise
        message = _describe(exc)
        if message is None or show_trace:
            raise
        click.echo(f"error: {' '.join(message.split())}", err=True)
        sys.exit(1)
