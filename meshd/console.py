"""Running a click command so that operators see one line, never a traceback.

Every console script (``meshd``, ``meshd-agent``, ``meshctl``) calls :func:`run_cli`.
Errors we raise on purpose derive from :class:`~meshd.errors.MeshdError`; their message is
printed as ``<prog>: error: <message>`` on stderr with exit status 1. Interrupts exit 130.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import click

from meshd.errors import MeshdError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def one_line(message: str) -> str:
    """Fold a message onto one line, so multi-line causes never break log parsers."""
    return " ".join(message.split())


def run_cli(command: click.Command, prog_name: str) -> None:
    """Run *command*, translating :class:`MeshdError` into a one-line error and exit 1."""
    try:
        # Without standalone mode, click returns ctx.exit()'s code instead of exiting.
        code = command.main(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except MeshdError as exc:
        click.echo(f"{prog_name}: error: {one_line(str(exc))}", err=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except BaseExceptionGroup as group:  # raised inside a trio nursery
        _exit_for_group(group, prog_name)
    sys.exit(code if isinstance(code, int) else 0)


def _exit_for_group(group: BaseExceptionGroup[BaseException], prog_name: str) -> None:
    """Report a group of errors we raise on purpose like one of them; re-raise any other
    group (a bug: its traceback is what we need to see)."""
    leaves = list(_leaves(group))
    if any(isinstance(e, KeyboardInterrupt | click.exceptions.Abort) for e in leaves):
        sys.exit(EXIT_INTERRUPTED)
    if not all(isinstance(e, MeshdError | click.ClickException) for e in leaves):
        raise group
    first = leaves[0]
    if isinstance(first, click.ClickException):
        first.show()
        sys.exit(first.exit_code)
    click.echo(f"{prog_name}: error: {one_line(str(first))}", err=True)
    sys.exit(EXIT_ERROR)


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
