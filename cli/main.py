"""``meshctl``: the operator's command line.

Sub-command groups live in their own modules and are registered here. ``CONSUL_HTTP_ADDR``,
``CONSUL_HTTP_TOKEN`` and ``CONSUL_CACERT`` are honoured as the consul CLI does.
"""

from __future__ import annotations

import click

from cli.ca import ca as ca_cli
from cli.check import check as check_cli
from cli.config_cmd import config as config_cli
from cli.intention import intention as intention_cli
from cli.proxy import proxy as proxy_cli
from cli.stat import stat as stat_cli
from cli.status import services as services_cli
from cli.status import status as status_cli
from cli.token import token_cli
from meshd import __version__
from meshd.console import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshctl")
def meshctl() -> None:
    """Operate a meshd service mesh: status, check, services, stat, proxy snapshot, CA,
    tokens, intentions, mesh config."""


meshctl.add_command(token_cli)
meshctl.add_command(intention_cli)
meshctl.add_command(config_cli)
meshctl.add_command(ca_cli)
meshctl.add_command(status_cli)
meshctl.add_command(check_cli)
meshctl.add_command(services_cli)
meshctl.add_command(stat_cli)
meshctl.add_command(proxy_cli)


def main() -> None:
    """Console-script entry point."""
    run_cli(meshctl, "meshctl")
