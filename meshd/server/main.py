"""``meshd``: the control plane daemon's command line."""

from __future__ import annotations

import click

from meshd import __version__
from meshd.console import run_cli
from meshd.server.serve import serve_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshd")
def meshd_cli() -> None:
    """The meshd control plane: the mesh's certificate authority."""


meshd_cli.add_command(serve_cmd)


def main() -> None:
    """Console-script entry point."""
    run_cli(meshd_cli, "meshd")
