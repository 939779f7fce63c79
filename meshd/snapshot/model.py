"""The immutable, versioned configuration snapshot the agent's proxies read.

A :class:`Snapshot` is everything the data plane needs from Consul at one moment: which
services this host serves, the passing endpoints of the services it calls, the raw mesh
config, intentions and trust bundle documents (compiled elsewhere), and the address map the
outbound proxy uses to turn an intercepted original destination into a service name.

Snapshots are plain frozen values: a change is a new snapshot with a higher ``version``.
Build them with :func:`make_snapshot`, which derives the address map so that it can never
disagree with the endpoints it indexes.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Protocol = Literal["tcp", "http"]
_EMPTY_META: Mapping[str, str] = types.MappingProxyType({})


def frozen_map(value: Mapping[str, str]) -> Mapping[str, str]:
    """A read-only copy of *value*, with keys sorted so equal maps print alike."""
    return types.MappingProxyType(dict(sorted(value.items())))


@dataclass(frozen=True)
class LocalService:
    """A service this host serves (one file in ``services.d/``).

    Attributes:
        name: the Consul service name (also the SPIFFE service of its certificate).
        service_id: the instance id registered in Consul.
        port: the port the application listens on; the inbound proxy forwards here.
        protocol: ``tcp`` (L4) or ``http`` (L7).
        upstreams: service names the application declares it calls.
        uid: the uid the application runs as (``[service] user``), or None if not said.
    """

    name: str
    service_id: str
    port: int
    protocol: Protocol = "tcp"
    upstreams: tuple[str, ...] = ()
    uid: int | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"local service name {self.name!r} must be non-empty without '/'")
        if not 0 < self.port < 65536:
            raise ValueError(f"local service {self.name}: port {self.port} not in 1..65535")
        if self.protocol not in ("tcp", "http"):
            raise ValueError(f"local service {self.name}: protocol {self.protocol!r}")
        if self.uid is not None and not 0 <= self.uid < 2**32 - 1:
            raise ValueError(f"local service {self.name}: uid {self.uid} is not a user id")
        object.__setattr__(self, "upstreams", tuple(sorted(set(self.upstreams))))


@dataclass(frozen=True)
class Endpoint:
    """One passing instance of an upstream service.

    Attributes:
        address: IP address the instance is reached at (service address, else node's).
        port: the service port; the remote inbound proxy captures it.
        node: Consul node name.
        service_id: Consul service instance id.
        meta: service meta (read-only).
    """

    address: str
    port: int
    node: str
    service_id: str
    meta: Mapping[str, str] = field(default_factory=lambda: _EMPTY_META, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", frozen_map(self.meta))

    def sort_key(self) -> tuple[str, int, str, str]:
        """Canonical order, so Consul's response order never creates a new version."""
        return (self.address, self.port, self.service_id, self.node)


@dataclass(frozen=True)
class UpstreamSet:
    """The passing endpoints of one watched service, as of Consul index ``index``."""

    service: str
    endpoints: tuple[Endpoint, ...]
    index: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", tuple(sorted(self.endpoints, key=Endpoint.sort_key)))


@dataclass(frozen=True)
class Snapshot:
    """One published configuration; never mutated. Build with :func:`make_snapshot`.

    Attributes:
        version: strictly increases with each published change (also across restarts,
            because the reducer continues from the persisted snapshot's version).
        created_at: wall-clock time (Unix seconds) the snapshot was built.
        local_services: what this host serves, sorted by name.
        upstreams: service name to its endpoints, for every watched service.
        mesh_config_raw: the ``config/mesh`` KV document, or None when absent.
        intentions_raw: destination service name to its raw intentions document.
        trust_bundle_raw: the trust bundle KV document, or None when absent.
        address_map: ``(ip, port)`` of every endpoint to its service name; an address that
            two services claim is left out (ambiguous, so the proxy treats it as unknown).
    """

    version: int
    created_at: float
    local_services: tuple[LocalService, ...]
    upstreams: Mapping[str, UpstreamSet]
    mesh_config_raw: bytes | None
    intentions_raw: Mapping[str, bytes]
    trust_bundle_raw: bytes | None
    address_map: Mapping[tuple[str, int], str] = field(hash=False)

    def service_for(self, address: str, port: int) -> str | None:
        """The mesh service an original destination belongs to, or None if unknown."""
        return self.address_map.get((address, port))

    def endpoints(self, service: str) -> tuple[Endpoint, ...]:
        """The passing endpoints of *service* (empty if not watched or none pass)."""
        upstream = self.upstreams.get(service)
        return upstream.endpoints if upstream is not None else ()

    def local_service_on(self, port: int) -> LocalService | None:
        """The local service listening on *port*, if any (for the inbound proxy)."""
        return next((s for s in self.local_services if s.port == port), None)

    def same_content(self, other: Snapshot) -> bool:
        """True if *other* carries the same configuration (versions, time, indexes aside)."""
        return _content(self) == _content(other)


def _content(snapshot: Snapshot) -> object:
    upstreams = {name: u.endpoints for name, u in snapshot.upstreams.items()}
    return (
        snapshot.local_services,
        upstreams,
        snapshot.mesh_config_raw,
        dict(snapshot.intentions_raw),
        snapshot.trust_bundle_raw,
    )


def build_address_map(upstreams: Iterable[UpstreamSet]) -> Mapping[tuple[str, int], str]:
    """Index every endpoint by ``(address, port)``; drop addresses claimed by two services."""
    owners: dict[tuple[str, int], set[str]] = {}
    for upstream in upstreams:
        for endpoint in upstream.endpoints:
            owners.setdefault((endpoint.address, endpoint.port), set()).add(upstream.service)
    return types.MappingProxyType(
        {key: next(iter(names)) for key, names in sorted(owners.items()) if len(names) == 1}
    )


def make_snapshot(
    *,
    version: int,
    created_at: float,
    local_services: Iterable[LocalService] = (),
    upstreams: Iterable[UpstreamSet] = (),
    mesh_config_raw: bytes | None = None,
    intentions_raw: Mapping[str, bytes] | None = None,
    trust_bundle_raw: bytes | None = None,
) -> Snapshot:
    """Build a :class:`Snapshot` in canonical form, deriving its address map.

    Raises:
        ValueError: two local services share a name, or two upstream sets a service.
    """
    locals_sorted = tuple(sorted(local_services, key=lambda s: s.name))
    if len({s.name for s in locals_sorted}) != len(locals_sorted):
        raise ValueError("local services: a service name appears twice")
    upstream_list = sorted(upstreams, key=lambda u: u.service)
    if len({u.service for u in upstream_list}) != len(upstream_list):
        raise ValueError("upstreams: a service appears twice")
    return Snapshot(
        version=version,
        created_at=created_at,
        local_services=locals_sorted,
        upstreams=types.MappingProxyType({u.service: u for u in upstream_list}),
        mesh_config_raw=mesh_config_raw,
        intentions_raw=types.MappingProxyType(dict(sorted((intentions_raw or {}).items()))),
        trust_bundle_raw=trust_bundle_raw,
        address_map=build_address_map(upstream_list),
    )
