"""What both proxies share: their dependencies, timeouts and the end-of-connection record.

Design note. A proxy handler reads the current :class:`~meshd.dataplane.DataPlaneView` once
when a connection arrives and keeps it for the connection's life: new connections use the
newest snapshot, open ones keep theirs (DESIGN "Data plane"). Everything per-connection is
decided from that view before any I/O: where to go, with which identity, and whether it is
allowed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from agent.accesslog import JsonLog
from agent.metrics import AgentMetrics
from agent.origdst import OriginalDestinationError, original_destination
from agent.pump import PumpFunction, PumpResult, pump
from agent.sockowner import SocketOwners
from agent.tlsconn import TLSConnection
from agent.tlscontexts import TLSContexts
from agent.tlssessions import SessionCache
from agent.warmpool import WarmPool
from meshd.admission import ConnectionLimits, Ticket, source_of
from meshd.balancer import RoundRobin
from meshd.config.agent import ProxyConfig
from meshd.dataplane import DataPlaneView
from meshd.golden import service_label
from meshd.peer import PeerRole, PeerVerifier, VerifiedPeer
from meshd.trustbundle import TrustBundle


@dataclass(frozen=True)
class ProxyTimeouts:
    """Timeouts in seconds for the proxies."""

    connect: float = 2.0
    handshake: float = 5.0
    first_byte: float = 10.0
    idle: float = 3600.0
    # How long the inbound proxy keeps a ``meshd/1`` connection that has not been put to
    # use (a warm connection); above the outbound pool's largest idle_timeout.
    unused: float = 120.0


@dataclass(frozen=True)
class ProxyLimits:
    """The connection limits of the two proxies (docs/adr/013)."""

    inbound: ConnectionLimits
    outbound: ConnectionLimits

    @classmethod
    def of(cls, settings: ProxyConfig) -> ProxyLimits:
        """The limits under ``[proxy]`` *settings*; only the inbound proxy's are per source."""
        return cls(
            inbound=ConnectionLimits(
                settings.max_connections,
                settings.max_unverified_per_source,
                settings.max_failures_per_source or None,
            ),
            outbound=ConnectionLimits(settings.max_connections),
        )


@dataclass
class ProxyDeps:
    """Everything a proxy handler needs; one instance per agent.

    Attributes:
        view: returns the current view, or None before the first snapshot.
        tls: mTLS contexts for local services.
        metrics: the agent's metrics.
        log: access log and events.
        timeouts: the proxies' timeouts.
        balancer: endpoint choice for the outbound proxy.
        wall_clock: "now" for certificate validity (injectable for tests).
        on_unknown_destination: told about original destinations the snapshot cannot map,
            so the agent can discover them on demand.
        sessions: the outbound proxy's TLS sessions, to resume instead of a full handshake.
        peers: peer verification with a memory of chains that passed (both proxies).
        pump: copies the bytes of established connections: :func:`agent.pump.pump`, or
            ``PumpEngine.pump`` of a running epoll engine (``[proxy] engine``).
        warm: the outbound proxy's warm connections (refilled only while its ``serve``
            runs; otherwise every take misses).
        limits: how many connections each proxy admits (``[proxy] max_connections``,
            ``max_unverified_per_source``).
        owners: who opened an intercepted connection (when services name their users).
    """

    view: Callable[[], DataPlaneView | None]
    tls: TLSContexts
    metrics: AgentMetrics
    log: JsonLog
    timeouts: ProxyTimeouts = field(default_factory=ProxyTimeouts)
    balancer: RoundRobin = field(default_factory=RoundRobin)
    wall_clock: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(dt.UTC))
    on_unknown_destination: Callable[[str, int], None] = field(default=lambda _a, _p: None)
    sessions: SessionCache = field(default_factory=SessionCache)
    peers: PeerVerifier = field(default_factory=PeerVerifier)
    pump: PumpFunction = pump
    warm: WarmPool = field(default_factory=WarmPool)
    limits: ProxyLimits = field(default_factory=lambda: ProxyLimits.of(ProxyConfig()))
    owners: SocketOwners = field(default_factory=SocketOwners)


def proxy_deps(
    settings: ProxyConfig,
    *,
    view: Callable[[], DataPlaneView | None],
    tls: TLSContexts,
    metrics: AgentMetrics,
    log: JsonLog,
    on_unknown_destination: Callable[[str, int], None],
    pump: PumpFunction,
) -> ProxyDeps:
    """The proxies' dependencies under ``[proxy]`` *settings*: the agent's and each worker's.

    The warm pool counts into *metrics*; it is refilled only while its ``serve`` runs.
    """
    warm = WarmPool(
        per_endpoint=settings.warm_connections,
        idle_timeout=settings.warm_idle_timeout,
        count=lambda outcome: metrics.warm_connections.labels(outcome).inc(),
    )
    metrics.warm_idle.set_function(lambda: warm.idle_count)
    return ProxyDeps(
        view=view,
        tls=tls,
        metrics=metrics,
        log=log,
        timeouts=ProxyTimeouts(connect=settings.connect_timeout, idle=settings.idle_timeout),
        on_unknown_destination=on_unknown_destination,
        pump=pump,
        warm=warm,
        limits=ProxyLimits.of(settings),
    )


def verify_now(
    deps: ProxyDeps,
    bundle: TrustBundle,
    tls: TLSConnection,
    *,
    role: PeerRole,
    expected_service: str | None,
) -> VerifiedPeer:
    """The peer of *tls*, verified against *bundle* at the current wall-clock time.

    Every connection, resumed or warm ones too (docs/adr/008, 010); the verifier's memory
    makes a repeat cost microseconds.

    Raises:
        PeerRejected: the chain, identity or validity does not hold.
    """
    return deps.peers.verify(
        tls.peer_chain_der(),
        bundle,
        role=role,
        trust_domain=bundle.trust_domain,
        expected_service=expected_service,
        now=deps.wall_clock(),
    )


def peer_of(sock: socket.socket) -> str:
    """``address:port`` of the socket's peer, or ``"?"`` once it is gone."""
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


def refuse(sock: socket.socket) -> None:
    """Close *sock* with a reset: the client sees its connection refused outright."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def admit(
    deps: ProxyDeps,
    limits: ConnectionLimits,
    conn: socket.socket,
    *,
    direction: str,
    client: str,
    now: float,
) -> Ticket | None:
    """A ticket for *conn* from *client* (``address:port``) under *limits* at trio time
    *now*; None after resetting a connection over a limit.

    Refusals are counted, and logged at most once per limit every 10 s with how many there
    were: no access-log line each, so that a flood cannot flood the log.
    """
    source = source_of(client)
    decision = limits.admit(source, now)
    if isinstance(decision, Ticket):
        return decision
    refuse(conn)
    deps.metrics.connections_refused.labels(direction, decision.limit).inc()
    if decision.report:
        where = {"source": source} if decision.limit != "max_connections" else {}
        deps.log.event(
            "connection_limit_reached",
            level="warning",
            direction=direction,
            limit=decision.limit,
            value=getattr(limits, decision.limit),
            refused=decision.report,
            **where,
        )
    return None


def reject(deps: ProxyDeps, conn: socket.socket, **record: Any) -> None:
    """Refuse *conn* (reset) and record it: :func:`refuse` then :func:`finish`."""
    refuse(conn)
    finish(deps, **record)


def destination_or_reject(
    deps: ProxyDeps, conn: socket.socket, *, direction: str, client: str, started: float
) -> tuple[str, int] | None:
    """The connection's original destination; None after rejecting one that has none."""
    try:
        return original_destination(conn)
    except OriginalDestinationError as exc:
        reject(
            deps,
            conn,
            direction=direction,
            source=client,
            destination="?",
            started=started,
            outcome="no_original_destination",
            reason=str(exc),
        )
        return None


def finish(
    deps: ProxyDeps,
    *,
    direction: str,
    source: str,
    destination: str,
    started: float,
    outcome: str,
    result: PumpResult | None = None,
    **fields: object,
) -> None:
    """Record one finished (or refused) connection: metrics and one access-log line."""
    duration = trio.current_time() - started
    sent = result.bytes_a_to_b if result else 0
    received = result.bytes_b_to_a if result else 0
    if result is not None:
        outcome = result.outcome
        if result.detail:
            fields["detail"] = result.detail
    m = deps.metrics
    # Labels stay bounded: an address (with its ephemeral port) is in the log line only.
    service = service_label(destination)
    m.connections.labels(direction, service_label(source), service, outcome).inc()
    m.duration.labels(direction).observe(duration)
    if sent:
        m.bytes.labels(direction, service, "to_upstream").inc(sent)
    if received:
        m.bytes.labels(direction, service, "to_downstream").inc(received)
    deps.log.access(
        direction=direction,
        source=source,
        destination=destination,
        outcome=outcome,
        bytes_sent=sent,
        bytes_received=received,
        duration_s=round(duration, 6),
        **fields,
    )
