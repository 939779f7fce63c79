"""The inbound proxy: connections to meshed service ports, verified and authorized.

Flow for one connection: original destination → the local service on that port → peek the
first bytes: a TLS record (0x16) is terminated with the service's certificate and the peer's
SPIFFE identity verified; plaintext is refused in ``strict`` mode and treated as an
anonymous peer in ``permissive`` mode → ``authorize(policy, peer, service)`` → dial the
application over loopback (so meshed applications must listen on it, or on all
addresses) → pump. Refusals are resets: the application receives zero bytes.

Open connections are tracked in :class:`OpenConnections` so that, when intentions change,
the agent can close the ones the new policy denies.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field

import trio

from agent.netio import connect_tcp, peek
from agent.proxycore import ProxyDeps, destination_or_reject, finish, peer_of, reject
from agent.pump import Connection, PlainConnection
from agent.tlsconn import TLSHandshakeError, handshake
from meshd.dataplane import DataPlaneView
from meshd.meshconfig import MTLSMode
from meshd.peer import PeerRejected
from meshd.snapshot import LocalService

DIRECTION = "inbound"
TLS_HANDSHAKE_RECORD = 0x16


@dataclass
class OpenConnection:
    """One authorized, flowing inbound connection."""

    source: str | None
    destination: str
    scope: trio.CancelScope


@dataclass
class OpenConnections:
    """The inbound connections currently flowing, for re-authorization on policy change."""

    by_id: dict[int, OpenConnection] = field(default_factory=dict)

    def add(self, entry: OpenConnection) -> None:
        self.by_id[id(entry)] = entry

    def remove(self, entry: OpenConnection) -> None:
        self.by_id.pop(id(entry), None)

    def close_denied(self, view: DataPlaneView) -> int:
        """Cancel every open connection that *view*'s policy no longer allows.

        Returns:
            How many were closed.
        """
        closed = 0
        for entry in list(self.by_id.values()):
            if not view.authorize(entry.source, entry.destination).allowed:
                entry.scope.cancel()
                closed += 1
        return closed

    def __len__(self) -> int:
        return len(self.by_id)


async def handle_inbound(deps: ProxyDeps, conns: OpenConnections, conn: socket.socket) -> None:
    """Serve one connection to a meshed port; owns and always closes *conn*."""
    started = trio.current_time()
    client = peer_of(conn)
    found = destination_or_reject(deps, conn, direction=DIRECTION, client=client, started=started)
    if found is None:
        return
    address, port = found
    view = deps.view()
    local = view.snapshot.local_service_on(port) if view is not None else None
    if view is None or local is None:
        reject(
            deps,
            conn,
            direction=DIRECTION,
            source=client,
            destination=f"{address}:{port}",
            started=started,
            outcome="not_meshed",
        )
        return
    accepted = await _accept(deps, view, local, conn, client)
    if isinstance(accepted, str):
        reject(
            deps,
            conn,
            direction=DIRECTION,
            source=client,
            destination=local.name,
            started=started,
            outcome="refused",
            reason=accepted,
        )
        return
    downstream, source = accepted
    await _forward(deps, view, conns, downstream, source, local, (address, port), started, client)


async def _accept(
    deps: ProxyDeps, view: DataPlaneView, local: LocalService, conn: socket.socket, client: str
) -> tuple[Connection, str | None] | str:
    """Terminate TLS (or admit plaintext) and authorize; the reason on refusal."""
    try:
        first = await peek(conn, 1, timeout=deps.timeouts.first_byte)
    except (OSError, trio.TooSlowError) as exc:
        return f"no first byte: {exc or 'timed out'}"
    if first and first[0] == TLS_HANDSHAKE_RECORD:
        verified = await _terminate_tls(deps, view, local, conn)
        if isinstance(verified, str):
            return verified
        downstream, source = verified
    elif view.mesh.mtls_mode == MTLSMode.STRICT:
        deps.metrics.plaintext_inbound.labels(local.name, "refused").inc()
        return "plaintext refused: mTLS mode is strict"
    else:
        deps.metrics.plaintext_inbound.labels(local.name, "admitted").inc()
        deps.log.event("plaintext_admitted", level="warning", destination=local.name, client=client)
        downstream, source = PlainConnection(conn), None
    decision = view.authorize(source, local.name)
    if not decision.allowed:
        deps.metrics.authz_denied.labels(source or "anonymous", local.name).inc()
        downstream.abort()
        return f"denied: {decision.reason}"
    return downstream, source


async def _terminate_tls(
    deps: ProxyDeps, view: DataPlaneView, local: LocalService, conn: socket.socket
) -> tuple[Connection, str] | str:
    if view.bundle is None:
        return f"no trust bundle: {view.bundle_error}"
    ctx: ssl.SSLContext | None = deps.tls.context("server", local.name, view.bundle)
    if ctx is None:
        return f"no valid certificate for {local.name}"
    try:
        tls = await handshake(conn, ctx, server_side=True, timeout=deps.timeouts.handshake)
    except TLSHandshakeError as exc:
        deps.metrics.tls_failures.labels(DIRECTION, "handshake").inc()
        return str(exc)
    deps.metrics.tls_handshakes.labels(DIRECTION, "yes" if tls.session_reused else "no").inc()
    try:
        # Every connection, resumed ones too: a ticket brings back the leaf of the first
        # handshake, verified here again against the current bundle and clock.
        peer = deps.peers.verify(
            tls.peer_chain_der(),
            view.bundle,
            role="client",
            trust_domain=view.bundle.trust_domain,
            expected_service=None,
            now=deps.wall_clock(),
        )
    except PeerRejected as exc:
        tls.abort()
        deps.metrics.tls_failures.labels(DIRECTION, "peer_identity").inc()
        return str(exc)
    return tls, peer.identity.service


async def _forward(
    deps: ProxyDeps,
    view: DataPlaneView,
    conns: OpenConnections,
    downstream: Connection,
    source: str | None,
    local: LocalService,
    target: tuple[str, int],
    started: float,
    client: str,
) -> None:
    # Over loopback: the proxy's own dials to a meshed port of this host are redirected
    # again (that is how local callers reach the inbound proxy); loopback never is.
    loopback = "::1" if ":" in target[0] else "127.0.0.1"
    try:
        app = await connect_tcp(loopback, target[1], timeout=deps.timeouts.connect)
    except (OSError, trio.TooSlowError) as exc:
        downstream.abort()
        finish(
            deps,
            direction=DIRECTION,
            source=source or "anonymous",
            destination=local.name,
            started=started,
            outcome="app_unreachable",
            reason=str(exc) or "timed out",
        )
        return
    entry = OpenConnection(source, local.name, trio.CancelScope())
    conns.add(entry)
    result = None
    try:
        with entry.scope:
            result = await deps.pump(
                downstream, PlainConnection(app), idle_timeout=deps.timeouts.idle
            )
    finally:
        conns.remove(entry)
    outcome = "closed_by_policy" if entry.scope.cancelled_caught else "closed"
    finish(
        deps,
        direction=DIRECTION,
        source=source or "anonymous",
        destination=local.name,
        started=started,
        outcome=outcome,
        result=result,
        client=client,
    )
