"""``meshd-agent``: the per-host agent's command line."""

from __future__ import annotations

import click

from agent.check_cli import check_cmd
from agent.redirect_cli import redirect_cli
from agent.run_cli import run_cmd
from meshd import __version__
from meshd.console import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshd-agent")
def agent_cli() -> None:
    """Register local services in Consul, intercept their traffic and carry it over mTLS."""


agent_cli.add_command(redirect_cli)
agent_cli.add_command(run_cmd)
agent_cli.add_command(check_cmd)


def main() -> None:
    """Console-script entry point."""
    run_cli(agent_cli, "meshd-agent")
