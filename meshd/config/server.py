"""``/etc/meshd/meshd.toml``: the control plane's configuration.

Leaf certificate lifetimes are bounded: at least 1 h, because agents renew at 50-70 % of
the lifetime with jitter and must survive clock skew and a short meshd outage; at most
30 days (720 h), because short-lived leaves are what make revocation unnecessary.
``leaf_ttl`` (the lifetime of every leaf meshd issues) must not exceed ``max_leaf_ttl``;
a lifetime a caller asks for is ignored.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

from meshd.config import fields
from meshd.config.common import ConsulConfig, LogConfig, parse_consul, parse_log
from meshd.config.document import Table, parse_toml, read_toml
from meshd.config.fields import HostPort

HOUR = 3600.0
MIN_LEAF_TTL = HOUR
MAX_LEAF_TTL = 720 * HOUR
DEFAULT_LISTEN = HostPort("0.0.0.0", 8555)  # noqa: S104 - a server listens on all addresses
#: The most connections the CA's HTTPS server holds at once (meshd.server.http), and the
#: default of how many one source may hold; a cap per source above the first caps nothing.
MAX_CONNECTIONS = 256
MAX_CONNECTIONS_PER_SOURCE = 32

_server_name = fields.matching(
    r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?",
    "a server name (letters, digits, '_', '.', '-'; 1-128 characters)",
)


@dataclass(frozen=True)
class ServerSection:
    """``[server]``: where meshd listens and how others reach it.

    Attributes:
        listen: the HTTPS API's address.
        advertise_address: the address registered in Consul; ``""`` lets Consul use the
            node's address (the default when ``listen`` is a wildcard such as 0.0.0.0).
        name: this instance's name (the Consul service id suffix); the host name by default.
        max_connections_per_source: connections one source (an IPv4 address, an IPv6 /64)
            may hold open at once, so that one host cannot take every connection slot.
    """

    listen: HostPort = DEFAULT_LISTEN
    advertise_address: str = ""
    name: str = field(default_factory=socket.gethostname)
    max_connections_per_source: int = MAX_CONNECTIONS_PER_SOURCE


@dataclass(frozen=True)
class CAConfig:
    """``[ca]``: the certificate authority. Durations are in seconds.

    Attributes:
        dir: where the CA keeps its keys (0700) and state.
        leaf_ttl: the lifetime of issued leaf certificates.
        max_leaf_ttl: the bound on ``leaf_ttl``, checked when the file is loaded.
        csr_rate_per_minute: signing requests accepted per minute from one client address
            (one token bucket per address, burst at most 10).
    """

    dir: Path = Path("/var/lib/meshd/ca")
    leaf_ttl: float = 24 * HOUR
    max_leaf_ttl: float = 72 * HOUR
    csr_rate_per_minute: int = 60


@dataclass(frozen=True)
class ServerConfig:
    """The whole of ``meshd.toml``, validated; every section has defaults."""

    server: ServerSection = field(default_factory=ServerSection)
    ca: CAConfig = field(default_factory=CAConfig)
    consul: ConsulConfig = field(default_factory=ConsulConfig)
    log: LogConfig = field(default_factory=LogConfig)


def load_server_config(path: str | Path, *, missing_ok: bool = False) -> ServerConfig:
    """Read and validate ``meshd.toml``.

    Args:
        path: the file, usually ``/etc/meshd/meshd.toml``.
        missing_ok: return the defaults if the file does not exist.

    Returns:
        The initialized configuration.

    Raises:
        ConfigError: the file is missing (unless *missing_ok*), unreadable, not TOML, or
            holds an unknown key or an invalid value.
    """
    if missing_ok and not Path(path).exists():
        return ServerConfig()
    return _server_config(read_toml(path))


def parse_server_config(text: str, *, file: str = "meshd.toml") -> ServerConfig:
    """Validate ``meshd.toml`` content given as text (relative paths: the working folder).

    Args:
        text: the TOML document.
        file: how to name the document in errors.

    Returns:
        The initialized configuration.

    Raises:
        ConfigError: as :func:`load_server_config`.
    """
    return _server_config(parse_toml(text, file=file, base=Path.cwd()))


def _server_config(root: Table) -> ServerConfig:
    root.only("server", "ca", "consul", "log")
    return ServerConfig(
        server=_server(root.table("server")),
        ca=_ca(root.table("ca")),
        consul=parse_consul(root.table("consul")),
        log=parse_log(root.table("log")),
    )


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _server(table: Table) -> ServerSection:
    table.only("listen", "advertise_address", "name", "max_connections_per_source")
    default = ServerSection()
    listen = table.get("listen", fields.host_port, default.listen)
    advertise = "" if _is_wildcard(listen.host) else listen.host
    advertise = table.get("advertise_address", fields.host, advertise)
    if _is_wildcard(advertise):
        raise table.error("advertise_address", f"cannot advertise a wildcard, got {advertise!r}")
    return ServerSection(
        listen=listen,
        advertise_address=advertise,
        name=table.get("name", _server_name, default.name),
        max_connections_per_source=table.get(
            "max_connections_per_source",
            fields.integer(1, MAX_CONNECTIONS),
            default.max_connections_per_source,
        ),
    )


def _ca(table: Table) -> CAConfig:
    table.only("dir", "leaf_ttl", "max_leaf_ttl", "csr_rate_per_minute")
    default = CAConfig()
    ttl = fields.duration(MIN_LEAF_TTL, MAX_LEAF_TTL)
    config = CAConfig(
        dir=table.get("dir", fields.path(table.base), default.dir),
        leaf_ttl=table.get("leaf_ttl", ttl, default.leaf_ttl),
        max_leaf_ttl=table.get("max_leaf_ttl", ttl, default.max_leaf_ttl),
        csr_rate_per_minute=table.get(
            "csr_rate_per_minute", fields.integer(1, 100_000), default.csr_rate_per_minute
        ),
    )
    if config.leaf_ttl > config.max_leaf_ttl:
        # A default lifetime above the cap contradicts itself; say so rather than guess.
        leaf, cap = table.data.get("leaf_ttl", "24h"), table.data.get("max_leaf_ttl", "72h")
        raise table.error("leaf_ttl", f"{leaf!r} exceeds ca.max_leaf_ttl ({cap!r})")
    return config
