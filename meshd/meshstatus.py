"""The state of a mesh as one value, and what in it needs an operator (``meshctl status``).

Sans-IO: the caller reads Consul (catalog, health, KV) and passes what it found; this module
summarises it and names the problems. Each problem is one line saying what is wrong and
what it breaks, so that ``meshctl status`` can exit non-zero with a reason a person can act
on, and a script can alert on the exit code alone.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from meshd.consul import ServiceInstance
from meshd.intentions import IntentionsDocument, InvalidDocument
from meshd.meshconfig import LoadedMeshConfig
from meshd.registry import (
    AGENT_SERVICE,
    META_PROTOCOL,
    META_PROXY_PORT,
    META_VERSION,
    SERVER_SERVICE,
)
from meshd.trustbundle import RootState, TrustBundle

ROOT_EXPIRY_WARNING = dt.timedelta(days=30)
LISTED = 5  # nodes or services named in one problem line; the rest are counted


@dataclass(frozen=True)
class ServiceSummary:
    """One service's instances by health, and how many a meshd agent registered."""

    name: str
    instances: int
    passing: int
    warning: int
    critical: int
    meshed: int
    protocols: tuple[str, ...]
    not_passing_nodes: tuple[str, ...]


@dataclass(frozen=True)
class RootSummary:
    """One root of the trust bundle."""

    id: str
    state: str
    not_after: dt.datetime


@dataclass(frozen=True)
class MeshStatus:
    """Everything ``meshctl status`` shows, and the problems found in it."""

    datacenter: str
    leader: str
    servers: ServiceSummary
    agents: ServiceSummary
    agent_versions: Mapping[str, int]
    services: tuple[ServiceSummary, ...]
    trust_domain: str | None
    roots: tuple[RootSummary, ...]
    mesh_config: LoadedMeshConfig
    intentions: int
    invalid_intentions: tuple[str, ...]
    problems: tuple[str, ...]


def summarize_service(name: str, instances: Iterable[ServiceInstance]) -> ServiceSummary:
    """*name*'s instances (every one, each with its health) counted."""
    found = list(instances)
    status = Counter(i.status for i in found)
    return ServiceSummary(
        name=name,
        instances=len(found),
        passing=status["passing"],
        warning=status["warning"],
        critical=status["critical"],
        meshed=sum(1 for i in found if META_PROXY_PORT in i.meta),
        protocols=tuple(sorted({i.meta[META_PROTOCOL] for i in found if META_PROTOCOL in i.meta})),
        not_passing_nodes=tuple(sorted({i.node for i in found if i.status != "passing"})),
    )


def mesh_status(
    *,
    datacenter: str,
    leader: str,
    instances: Mapping[str, Sequence[ServiceInstance]],
    bundle: TrustBundle | None,
    bundle_error: str | None,
    mesh_config: LoadedMeshConfig,
    intentions: Mapping[str, IntentionsDocument | InvalidDocument],
    now: dt.datetime,
) -> MeshStatus:
    """The mesh as read from Consul, with its problems.

    Args:
        datacenter: the datacenter the reads were made in.
        leader: the Consul leader's address (empty: no leader).
        instances: every service of the catalog with all of its instances.
        bundle: the trust bundle, or None when it is absent or unreadable.
        bundle_error: why there is no bundle (shown as a problem).
        mesh_config: the mesh config document as the agents load it.
        intentions: the intentions documents by destination, as the agents load them.
        now: the time certificate validity is judged at.
    """
    servers = summarize_service(SERVER_SERVICE, instances.get(SERVER_SERVICE, ()))
    agents = summarize_service(AGENT_SERVICE, instances.get(AGENT_SERVICE, ()))
    versions = Counter(i.meta.get(META_VERSION, "?") for i in instances.get(AGENT_SERVICE, ()))
    services = tuple(
        summarize_service(name, found)
        for name, found in sorted(instances.items())
        if name not in (SERVER_SERVICE, AGENT_SERVICE)
    )
    roots = tuple(
        RootSummary(r.id, r.state.value, r.cert.not_valid_after_utc)
        for r in (bundle.roots if bundle is not None else ())
    )
    invalid = sorted(
        (doc for doc in intentions.values() if isinstance(doc, InvalidDocument)),
        key=lambda doc: doc.destination,
    )
    problems = [
        *_control_plane_problems(leader, servers, agents),
        *_trust_problems(bundle, bundle_error, now),
        *_document_problems(mesh_config, invalid),
        *_service_problems(services),
    ]
    return MeshStatus(
        datacenter=datacenter,
        leader=leader,
        servers=servers,
        agents=agents,
        agent_versions=dict(sorted(versions.items())),
        services=services,
        trust_domain=bundle.trust_domain if bundle is not None else None,
        roots=roots,
        mesh_config=mesh_config,
        intentions=len(intentions) - len(invalid),
        invalid_intentions=tuple(doc.destination for doc in invalid),
        problems=tuple(problems),
    )


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown if len(names) <= LISTED else f"{shown} and {len(names) - LISTED} more"


def _control_plane_problems(
    leader: str, servers: ServiceSummary, agents: ServiceSummary
) -> list[str]:
    problems = []
    if not leader:
        problems.append("Consul has no leader: the catalog and KV cannot change")
    if servers.passing == 0:
        problems.append(
            f"no meshd server is passing its checks ({servers.instances} registered): agents"
            " can neither get nor renew certificates"
        )
    elif servers.passing < servers.instances:
        down = servers.instances - servers.passing
        problems.append(
            f"{down} of {servers.instances} meshd servers not passing, on"
            f" {_listed(servers.not_passing_nodes)}"
        )
    if agents.passing < agents.instances:
        down = agents.instances - agents.passing
        problems.append(
            f"{down} of {agents.instances} agents not passing, on"
            f" {_listed(agents.not_passing_nodes)}: their hosts' services get no new"
            " snapshots or certificates"
        )
    return problems


def _trust_problems(bundle: TrustBundle | None, error: str | None, now: dt.datetime) -> list[str]:
    if bundle is None:
        return [f"no usable trust bundle: {error}; no mTLS connection can be verified"]
    problems = []
    for root in bundle.roots:
        if root.state == RootState.RETIRED:
            continue
        left = root.cert.not_valid_after_utc - now
        if left <= dt.timedelta(0):
            problems.append(f"root {root.id[:16]} ({root.state.value}) has expired")
        elif left < ROOT_EXPIRY_WARNING:
            problems.append(
                f"root {root.id[:16]} ({root.state.value}) expires in {left.days} days:"
                " rotate the CA (meshctl ca rotate)"
            )
    return problems


def _document_problems(
    mesh_config: LoadedMeshConfig, invalid: Sequence[InvalidDocument]
) -> list[str]:
    problems = []
    if mesh_config.error is not None:
        problems.append(f"{mesh_config.error}; agents fail closed (default deny, strict mTLS)")
    for doc in invalid:
        problems.append(
            f"intentions for {doc.destination} are invalid ({doc.reason}): every connection"
            " to it is denied"
        )
    return problems


def _service_problems(services: Sequence[ServiceSummary]) -> list[str]:
    down = [s.name for s in services if s.meshed and s.passing == 0]
    if not down:
        return []
    return [f"meshed services with no passing instance: {_listed(down)}"]
