"""What transparent redirection captures and leaves alone: the validated specification.

:class:`RedirectSpec` is built once at the edge (command-line flags, the agent's config file)
and is the only input :mod:`meshd.redirect` accepts. Exclusions that keep a host reachable
and the mesh from looping (SSH, the agent's own ports, both proxy ports) are always added;
Consul's ports are excluded by default.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from meshd.errors import MeshdError

Family = Literal[4, 6]
Ipv6Mode = Literal["redirect", "refuse"]

SSH_PORT = 22
#: Consul server RPC, Serf LAN/WAN, HTTP, HTTPS, gRPC and DNS.
CONSUL_PORTS = (8300, 8301, 8302, 8500, 8501, 8502, 8600)
#: The agent's admin and metrics listeners.
AGENT_PORTS = (15000, 15020)
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class RedirectSpecError(MeshdError):
    """A redirect specification that cannot be installed safely; the message says why."""


def _ports(name: str, ports: Iterable[int]) -> None:
    for port in ports:
        if not 1 <= port <= 65535:
            raise RedirectSpecError(f"redirect: {name}: port {port} is not in 1-65535")


@dataclass(frozen=True)
class RedirectSpec:
    """What to capture and what to leave alone; validated on construction.

    Attributes:
        proxy_uid: the UID the agent and its proxies run as; its traffic is never captured
            (except its dials to a meshed port of this very host, which go to the inbound
            proxy like any remote caller's).
        outbound_port: where the outbound proxy listens.
        inbound_port: where the inbound proxy listens.
        inbound_ports: meshed service ports whose incoming TCP is captured.
        exclude_uids: further UIDs whose outgoing traffic is left alone.
        exclude_inbound_ports: incoming ports never captured (SSH and the agent's ports are
            always added).
        exclude_outbound_ports: destination ports never captured; Consul's by default (SSH,
            the agent's ports and both proxy ports are always added).
        exclude_outbound_cidrs: destination networks never captured (IPv4 and IPv6 mixed).
        agent_ports: the agent's own listeners (admin, metrics).
        ipv6: ``redirect`` IPv6 like IPv4, or ``refuse`` it with a TCP reset.
    """

    proxy_uid: int
    outbound_port: int = 15001
    inbound_port: int = 15006
    inbound_ports: tuple[int, ...] = ()
    exclude_uids: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = CONSUL_PORTS
    exclude_outbound_cidrs: tuple[str, ...] = ()
    agent_ports: tuple[int, ...] = AGENT_PORTS
    ipv6: Ipv6Mode = "redirect"
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for uid in (self.proxy_uid, *self.exclude_uids):
            if not 0 <= uid < 2**32 - 1:
                raise RedirectSpecError(f"redirect: uid {uid} is not a valid user id")
        _ports("outbound_port", (self.outbound_port,))
        _ports("inbound_port", (self.inbound_port,))
        _ports("inbound_ports", self.inbound_ports)
        _ports("exclude_inbound_ports", self.exclude_inbound_ports)
        _ports("exclude_outbound_ports", self.exclude_outbound_ports)
        _ports("agent_ports", self.agent_ports)
        if self.outbound_port == self.inbound_port:
            raise RedirectSpecError("redirect: outbound_port and inbound_port must differ")
        if self.ipv6 not in ("redirect", "refuse"):
            raise RedirectSpecError(f"redirect: ipv6: {self.ipv6!r} is not redirect|refuse")
        clash = set(self.inbound_ports) & (set(self.inbound_excludes) | set(self.outbound_excludes))
        if clash:
            raise RedirectSpecError(
                f"redirect: inbound_ports: {sorted(clash)} are excluded ports "
                "(SSH, Consul, the agent's or listed exclusions) and cannot be captured"
            )
        object.__setattr__(self, "_networks", _networks(self.exclude_outbound_cidrs))

    @property
    def inbound_excludes(self) -> tuple[int, ...]:
        """Incoming ports never captured, sorted: the listed ones, SSH and the agent's."""
        return _merge(self.exclude_inbound_ports, self._own_ports)

    @property
    def outbound_excludes(self) -> tuple[int, ...]:
        """Destination ports never captured, sorted: the listed ones, SSH and the agent's."""
        return _merge(self.exclude_outbound_ports, self._own_ports)

    @property
    def capture_ports(self) -> tuple[int, ...]:
        """Meshed service ports captured inbound, sorted and unique."""
        return _merge(self.inbound_ports, ())

    @property
    def excluded_uids(self) -> tuple[int, ...]:
        """UIDs (besides the proxy's) whose traffic is left alone, sorted and unique."""
        return tuple(sorted(set(self.exclude_uids) - {self.proxy_uid}))

    def excluded_cidrs(self, family: Family) -> tuple[str, ...]:
        """The excluded networks of *family*, canonical and sorted."""
        return tuple(str(net) for net in sorted(n for n in self._networks if n.version == family))

    @property
    def _own_ports(self) -> tuple[int, ...]:
        return (SSH_PORT, self.outbound_port, self.inbound_port, *self.agent_ports)


def _merge(ports: Iterable[int], more: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted({*ports, *more}))


def _networks(
    cidrs: Iterable[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for cidr in cidrs:
        try:
            net = ipaddress.ip_network(cidr, strict=True)
        except ValueError as exc:
            raise RedirectSpecError(f"redirect: exclude_outbound_cidrs: {exc}") from exc
        if net.prefixlen == 0:
            # iptables-save drops "-d 0.0.0.0/0": the rules could never match what was asked.
            raise RedirectSpecError(
                f"redirect: exclude_outbound_cidrs: {cidr} excludes every destination;"
                " to capture nothing, set [redirect] enabled = false"
            )
        if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_IPV4_MAPPED):
            raise RedirectSpecError(
                f"redirect: exclude_outbound_cidrs: {cidr} is IPv4-mapped, and IPv4 traffic"
                " never meets the IPv6 rules: give the IPv4 network"
            )
        networks.append(net)
    return tuple(networks)
