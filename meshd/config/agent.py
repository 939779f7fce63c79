"""``/etc/meshd/agent.toml``: the per-host agent's configuration."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from meshd.config import fields
from meshd.config.common import ConsulConfig, LogConfig, parse_consul, parse_log
from meshd.config.document import Table, parse_toml, read_toml

IPv6Mode = Literal["redirect", "refuse"]
PumpEngineName = Literal["trio", "epoll"]

HOUR = 3600.0
MAX_UID = 2**32 - 2  # 2**32 - 1 is (uid_t)-1, "no user"

_node_name = fields.matching(
    r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?",
    "a node name (letters, digits, '_', '.', '-'; 1-128 characters)",
)
_datacenter = fields.matching(
    r"[a-z0-9](?:[a-z0-9_-]{0,62})?", "a datacenter name like 'dc1' (lowercase, 1-63)"
)


@dataclass(frozen=True)
class NodeConfig:
    """``[agent]``: who this host is and where the agent keeps its files.

    Attributes:
        node_name: the Consul node name; defaults to the host name at load time.
        datacenter: the Consul datacenter.
        state_dir: keys, certificates and the last-known-good snapshot (0700).
        services_dir: one ``*.toml`` per local service.
        bootstrap_token_file: the token that entitles this host to its first certificates.
    """

    node_name: str = field(default_factory=socket.gethostname)
    datacenter: str = "dc1"
    state_dir: Path = Path("/var/lib/meshd")
    services_dir: Path = Path("/etc/meshd/services.d")
    bootstrap_token_file: Path = Path("/etc/meshd/bootstrap.token")


@dataclass(frozen=True)
class ControlPlaneConfig:
    """``[meshd]``: where the control plane is.

    Attributes:
        addresses: ``https://host:port`` URLs; empty means discover service ``meshd`` in Consul.
    """

    addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProxyConfig:
    """``[proxy]``: the transparent proxies. Durations are in seconds.

    Attributes:
        outbound_port: where redirected outbound connections arrive.
        inbound_port: where redirected inbound connections arrive.
        admin_port: metrics, health and the admin endpoint, on loopback only.
        metrics_port: ``/metrics`` alone, for Prometheus on other hosts (the port the agent
            registers in Consul); 0 turns it off.
        metrics_address: where the metrics port listens; ``""`` for every address.
        user: the user the proxy runs as; its connections are never redirected.
        idle_timeout: close a connection with no bytes either way for this long.
        connect_timeout: give up connecting to one endpoint after this long.
        drain_timeout: on shutdown, how long open connections may finish.
        engine: what copies the bytes of established connections: ``trio`` tasks, or
            ``epoll``, a dedicated epoll thread (docs/adr/003-fast-tls-pump.md).
        close_denied: close open inbound connections that a changed policy now denies.
        warm_connections: connections per recently used endpoint that the outbound proxy
            opens and verifies ahead of need (0 turns it off; docs/adr/010).
        warm_idle_timeout: close a warm connection not used for this long, and stop
            keeping an endpoint warm that was not used for this long.
        workers: processes that run the proxies on the same listening sockets: the agent
            and ``workers - 1`` data-path workers (docs/adr/011). Each is one more core
            for the data path and ~40 MB more memory.
        max_connections: connections each proxy holds at once, per process, from accept
            to close; the next is reset (docs/adr/013).
        max_unverified_per_source: connections into the inbound proxy from one source
            address that have not yet shown a verified identity, per process; the next
            from that source is reset (docs/adr/013).
        max_failures_per_source: failed TLS handshakes or peer verifications at the inbound
            proxy from one source address within 10 s, per process; once reached, that
            source's connections are reset on arrival until its 10 s window ends
            (docs/adr/013). 0 turns it off.
    """

    outbound_port: int = 15001
    inbound_port: int = 15006
    admin_port: int = 15000
    metrics_port: int = 15020
    metrics_address: str = ""
    user: str = "meshd"
    idle_timeout: float = HOUR
    connect_timeout: float = 2.0
    drain_timeout: float = 30.0
    engine: PumpEngineName = "epoll"
    close_denied: bool = True
    warm_connections: int = 2
    warm_idle_timeout: float = 30.0
    workers: int = 1
    max_connections: int = 10_000
    max_unverified_per_source: int = 1_000
    max_failures_per_source: int = 100


@dataclass(frozen=True)
class RedirectConfig:
    """``[redirect]``: the iptables interception, in addition to the built-in exclusions.

    Lists are sorted and free of duplicates, so equal settings render equal rules.

    Attributes:
        enabled: install redirect rules at all.
        exclude_inbound_ports: local ports reached directly, never through the proxy.
        exclude_outbound_ports: destination ports never redirected.
        exclude_outbound_cidrs: destination networks never redirected.
        exclude_uids: users whose outbound connections are never redirected.
        ipv6: ``redirect`` IPv6 like IPv4, or ``refuse`` it (never silently bypass).
        check_interval: how often the running agent compares the installed rules with
            what it applied, and re-applies them where another tool flushed or edited them.
    """

    enabled: bool = True
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[fields.Network, ...] = ()
    exclude_uids: tuple[int, ...] = ()
    ipv6: IPv6Mode = "redirect"
    check_interval: float = 10.0


@dataclass(frozen=True)
class AgentConfig:
    """The whole of ``agent.toml``, validated; every section has defaults."""

    agent: NodeConfig = field(default_factory=NodeConfig)
    consul: ConsulConfig = field(default_factory=ConsulConfig)
    meshd: ControlPlaneConfig = field(default_factory=ControlPlaneConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    redirect: RedirectConfig = field(default_factory=RedirectConfig)
    log: LogConfig = field(default_factory=LogConfig)


def load_agent_config(path: str | Path, *, missing_ok: bool = False) -> AgentConfig:
    """Read and validate ``agent.toml``.

    Args:
        path: the file, usually ``/etc/meshd/agent.toml``.
        missing_ok: return the defaults if the file does not exist.

    Returns:
        The initialized configuration.

    Raises:
        ConfigError: the file is missing (unless *missing_ok*), unreadable, not TOML, or
            holds an unknown key or an invalid value.
    """
    if missing_ok and not Path(path).exists():
        return AgentConfig()
    return _agent_config(read_toml(path))


def parse_agent_config(text: str, *, file: str = "agent.toml") -> AgentConfig:
    """Validate ``agent.toml`` content given as text (relative paths: the working folder).

    Args:
        text: the TOML document.
        file: how to name the document in errors.

    Returns:
        The initialized configuration.

    Raises:
        ConfigError: as :func:`load_agent_config`.
    """
    return _agent_config(parse_toml(text, file=file, base=Path.cwd()))


def _agent_config(root: Table) -> AgentConfig:
    root.only("agent", "consul", "meshd", "proxy", "redirect", "log")
    control = root.table("meshd")
    control.only("addresses")
    return AgentConfig(
        agent=_node(root.table("agent")),
        consul=parse_consul(root.table("consul")),
        meshd=ControlPlaneConfig(addresses=control.get("addresses", _addresses, ())),
        proxy=_proxy(root.table("proxy")),
        redirect=_redirect(root.table("redirect")),
        log=parse_log(root.table("log")),
    )


def _addresses(value: object) -> tuple[str, ...]:
    urls = fields.list_of(fields.url("https", require_port=True))(value)
    for index, url in enumerate(urls):
        if url in urls[:index]:
            raise fields.Invalid(f"duplicate address {url!r}", suffix=f"[{index}]")
    return urls


def _node(table: Table) -> NodeConfig:
    table.only("node_name", "datacenter", "state_dir", "services_dir", "bootstrap_token_file")
    path = fields.path(table.base)
    default = NodeConfig()
    return NodeConfig(
        node_name=table.get("node_name", _node_name, default.node_name),
        datacenter=table.get("datacenter", _datacenter, default.datacenter),
        state_dir=table.get("state_dir", path, default.state_dir),
        services_dir=table.get("services_dir", path, default.services_dir),
        bootstrap_token_file=table.get("bootstrap_token_file", path, default.bootstrap_token_file),
    )


WARM = ("warm_connections", "warm_idle_timeout")
LIMITS = ("max_connections", "max_unverified_per_source", "max_failures_per_source")
MAX_WORKERS = 64
MAX_CONNECTIONS = 1_000_000


def _proxy(table: Table) -> ProxyConfig:
    ports = ("outbound_port", "inbound_port", "admin_port", "metrics_port")
    timeouts = ("idle_timeout", "connect_timeout", "drain_timeout")
    table.only(*ports, "metrics_address", "user", *timeouts, "engine", "close_denied", *WARM,
               "workers", *LIMITS)  # fmt: skip
    d = ProxyConfig()
    max_connections, per_source = _connection_limits(table, d)
    config = ProxyConfig(
        outbound_port=table.get("outbound_port", fields.port, d.outbound_port),
        inbound_port=table.get("inbound_port", fields.port, d.inbound_port),
        admin_port=table.get("admin_port", fields.port, d.admin_port),
        metrics_port=table.get("metrics_port", fields.integer(0, 65535), d.metrics_port),
        metrics_address=table.get("metrics_address", _any_or_host, d.metrics_address),
        user=table.get("user", fields.user, d.user),
        idle_timeout=table.get("idle_timeout", fields.duration(1, 7 * 24 * HOUR), d.idle_timeout),
        connect_timeout=table.get("connect_timeout", fields.duration(0.01, 60), d.connect_timeout),
        drain_timeout=table.get("drain_timeout", fields.duration(0, HOUR), d.drain_timeout),
        engine=table.get("engine", fields.choice(*get_args(PumpEngineName)), d.engine),
        close_denied=table.get("close_denied", fields.boolean, d.close_denied),
        warm_connections=table.get("warm_connections", fields.integer(0, 16), d.warm_connections),
        # Below the inbound proxy's 120 s wait for first use, so it never closes one first.
        warm_idle_timeout=table.get(
            "warm_idle_timeout", fields.duration(1, 60), d.warm_idle_timeout
        ),
        workers=table.get("workers", fields.integer(1, MAX_WORKERS), d.workers),
        max_connections=max_connections,
        max_unverified_per_source=per_source,
        max_failures_per_source=table.get(
            "max_failures_per_source", fields.integer(0, MAX_CONNECTIONS), d.max_failures_per_source
        ),
    )
    # The listeners share the host's port space: a clash would fail at bind time, far from
    # the line that caused it. (A metrics port of 0 is no listener.)
    for index, name in enumerate(ports):
        for earlier in ports[:index]:
            if getattr(config, name) == getattr(config, earlier) != 0:
                value = getattr(config, name)
                raise table.error(name, f"same port as {table.key(earlier)} ({value})")
    return config


def _any_or_host(value: object) -> str:
    return "" if value == "" else fields.host(value)


def _connection_limits(table: Table, d: ProxyConfig) -> tuple[int, int]:
    """``max_connections`` and ``max_unverified_per_source``; the latter's default follows
    a lower ``max_connections`` down, a value set above it is an error."""
    count = fields.integer(1, MAX_CONNECTIONS)
    max_connections = table.get("max_connections", count, d.max_connections)
    if "max_unverified_per_source" not in table.data:
        return max_connections, min(d.max_unverified_per_source, max_connections)
    per_source = table.require("max_unverified_per_source", count)
    if per_source > max_connections:
        raise table.error(
            "max_unverified_per_source",
            f"above {table.key('max_connections')} ({max_connections}): it could never apply",
        )
    return max_connections, per_source


def _sorted_unique_networks(value: object) -> tuple[fields.Network, ...]:
    networks = set(fields.list_of(fields.network)(value))
    return tuple(sorted(networks, key=lambda n: (n.version, n.network_address, n.prefixlen)))


def _sorted_unique(item: fields.Convert[int]) -> fields.Convert[tuple[int, ...]]:
    def convert(value: object) -> tuple[int, ...]:
        return tuple(sorted(set(fields.list_of(item)(value))))

    return convert


def _redirect(table: Table) -> RedirectConfig:
    table.only(
        "enabled",
        "exclude_inbound_ports",
        "exclude_outbound_ports",
        "exclude_outbound_cidrs",
        "exclude_uids",
        "ipv6",
        "check_interval",
    )
    ports = _sorted_unique(fields.port)
    uids = _sorted_unique(fields.integer(0, MAX_UID))
    return RedirectConfig(
        enabled=table.get("enabled", fields.boolean, True),
        exclude_inbound_ports=table.get("exclude_inbound_ports", ports, ()),
        exclude_outbound_ports=table.get("exclude_outbound_ports", ports, ()),
        exclude_outbound_cidrs=table.get("exclude_outbound_cidrs", _sorted_unique_networks, ()),
        exclude_uids=table.get("exclude_uids", uids, ()),
        ipv6=table.get("ipv6", fields.choice(*get_args(IPv6Mode)), "redirect"),
        check_interval=table.get("check_interval", fields.duration(1, 3600), 10.0),
    )
