"""Running a click command so that operators see one line, never a traceback.

Every console script (``meshd``, ``meshd-agent``, ``meshctl``) calls :func:`run_cli`.
Errors we raise on purpose derive from :class:`~meshd.errors.MeshdError`; their message is
printed as ``<prog>: error: <message>`` on stderr with exit status 1. Interrupts exit 130.
"""

from __future__ import annotations

import sys

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
    sys.exit(code if isinstance(code, int) else 0)
