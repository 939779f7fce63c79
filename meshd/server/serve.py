"""``meshd serve --config /etc/meshd/meshd.toml``: the thin driver of :func:`serve_meshd`.

Configuration becomes initialized values here, once: the Consul settings (the ACL token is
read from the configured file, never taken from argv), the signing authority from the CA
directory, and the serve options. systemd is told READY=1 once the API accepts connections
and STOPPING=1 on the way out.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import click
import trio

from meshd.config import ServerConfig, load_server_config
from meshd.consul.client import open_consul
from meshd.consul.settings import ConsulSettings
from meshd.sdnotify import notify
from meshd.server.ca import SigningAuthority
from meshd.server.daemon import ServeOptions, serve_meshd

DEFAULT_CONFIG = Path("/etc/meshd/meshd.toml")


async def run_server(config: ServerConfig, config_path: Path) -> None:
    """Run meshd as configured until cancelled.

    Raises:
        MeshdError: the CA cannot be loaded, Consul is unreachable, or no bundle exists.
    """
    authority = SigningAuthority.from_dir(
        config.ca.dir, ttl_s=config.ca.leaf_ttl, max_ttl_s=config.ca.max_leaf_ttl
    )
    options = ServeOptions(
        name=config.server.name,
        listen_host=config.server.listen.host,
        listen_port=config.server.listen.port,
        advertise_address=config.server.advertise_address,
        kv_prefix=config.consul.kv_prefix,
        csr_rate_per_minute=config.ca.csr_rate_per_minute,
        max_connections_per_source=config.server.max_connections_per_source,
        ca_dir=config.ca.dir,
    )
    async with (
        open_consul(ConsulSettings.from_config(config.consul, file=str(config_path))) as consul,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(serve_meshd, consul, authority, options)
        notify("READY=1")
        # SIGTERM (systemd stop) ends the server cleanly: it deregisters from Consul first.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                notify("STOPPING=1")
                nursery.cancel_scope.cancel()
                break


@click.command("serve")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The meshd.toml file.",
)
def serve_cmd(config_path: Path) -> None:
    """Run the control plane: the CA's HTTPS API."""
    config = load_server_config(config_path)
    logging.basicConfig(level=config.log.level.upper(), format="%(message)s")
    # httpx logs every request (to Consul: each blocking query) as plain text at INFO; the
    # control plane's log is one JSON line per event of its own.
    for library in ("httpx", "httpcore"):
        logging.getLogger(library).setLevel(logging.WARNING)
    try:
        trio.run(run_server, config, config_path)
    finally:
        notify("STOPPING=1")
