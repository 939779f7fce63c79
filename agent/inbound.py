"""The inbound proxy: connections to meshed service ports, verified and authorized.

Flow for one connection: original destination → the local service on that port → peek the
first bytes: a TLS record (0x16) is terminated with the service's certificate and the peer's
SPIFFE identity verified; plaintext is refused in ``strict`` mode and treated as an
anonymous peer in ``permissive`` mode → on ALPN ``meshd/1``, wait for the ``GO`` preamble
and decide everything afresh (docs/adr/010) → ``authorize(policy, peer, service)`` → dial the
application over loopback (so meshed applications must listen on it, or on all
addresses) → pump. Refusals are resets: the application receives zero bytes.

Open connections are tracked in :class:`OpenConnections` so that, when intentions change,
the agent can close the ones the new policy denies.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import trio

from agent.carrier import CarrierError, CarrierUnused, receive_go, speaks_carrier
from agent.netio import connect_tcp, peek
from agent.proxycore import (
    ProxyDeps,
    admit,
    destination_or_reject,
    finish,
    peer_of,
    reject,
    verify_now,
)
from agent.pump import Connection, PlainConnection
from agent.tlsconn import (
    TLSConnection,
    TLSHandshakeError,
    abort_socket,
    handshake,
    send_all_raw,
)
from meshd.admission import Ticket
from meshd.dataplane import DataPlaneView
from meshd.meshconfig import MTLSMode
from meshd.peer import PeerRejected, VerifiedPeer
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
    """The inbound connections currently flowing, for re-authorization on policy change,
    and the ``meshd/1`` connections still waiting to be used, for the drain."""

    by_id: dict[int, OpenConnection] = field(default_factory=dict)
    _waiting: set[trio.CancelScope] = field(default_factory=set)
    _stopped_waiting: bool = False

    @contextlib.contextmanager
    def waiting(self) -> Iterator[trio.CancelScope]:
        """A scope for waiting on a connection's first use; cancelled by :meth:`stop_waiting`."""
        scope = trio.CancelScope()
        if self._stopped_waiting:
            scope.cancel()
        self._waiting.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._waiting.discard(scope)

    @property
    def waiting_count(self) -> int:
        """Connections waiting for their first use."""
        return len(self._waiting)

    def stop_waiting(self) -> None:
        """Close every connection not yet in use, now and from now on (the drain)."""
        self._stopped_waiting = True
        for scope in self._waiting:
            scope.cancel()

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


async def handle_inbound(
    deps: ProxyDeps,
    conns: OpenConnections,
    conn: socket.socket,
    *,
    target: tuple[str, int] | None = None,
) -> None:
    """Serve one connection to a meshed port; owns and always closes *conn*.

    Admission under ``deps.limits.inbound`` first, then the original destination: read
    from the redirected socket, or *target* where it is known without iptables (the
    benchmark and in-process tests).
    """
    started = trio.current_time()
    client = peer_of(conn)
    limits = deps.limits.inbound
    ticket = admit(deps, limits, conn, direction=DIRECTION, client=client, now=started)
    if ticket is None:
        return
    try:
        found = target or destination_or_reject(
            deps, conn, direction=DIRECTION, client=client, started=started
        )
        if found is not None:
            await _serve_inbound(
                deps, conns, conn, found, client=client, started=started, ticket=ticket
            )
    finally:
        limits.release(ticket)


async def _serve_inbound(
    deps: ProxyDeps,
    conns: OpenConnections,
    conn: socket.socket,
    target: tuple[str, int],
    *,
    client: str,
    started: float,
    ticket: Ticket,
) -> None:
    """Serve one connection whose original destination is *target*; always closes *conn*.

    *ticket* (admitted under ``deps.limits.inbound``) is marked verified once the peer's
    identity is (or plaintext is admitted); the caller releases it.
    """
    address, port = target
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
        if isinstance(accepted, PeerFailure):
            deps.limits.inbound.failed(ticket, trio.current_time())
        _refuse(deps, conn, client, local.name, started, accepted)
        return
    downstream, source = accepted
    deps.limits.inbound.verified(ticket)
    early = b""
    if isinstance(downstream, TLSConnection) and speaks_carrier(downstream):
        used = await _wait_for_use(deps, conns, downstream, port)
        if used is None:
            return
        if isinstance(used, str):
            downstream.abort()
            _refuse(deps, conn, client, local.name, started, used)
            return
        view, local, early = used
    else:
        # The first byte and the handshake may have taken seconds: decide on the snapshot
        # in force now, not the one the connection arrived under (a deny written since
        # must hold for it too; close_denied only sees connections already flowing).
        current = deps.view()
        now_local = current.snapshot.local_service_on(port) if current is not None else None
        if current is None or now_local is None:
            downstream.abort()
            _refuse(deps, conn, client, local.name, started, "port no longer meshed")
            return
        view, local = current, now_local
    decision = view.authorize(source, local.name)
    if not decision.allowed:
        deps.metrics.authz_denied.labels(source or "anonymous", local.name).inc()
        downstream.abort()
        _refuse(
            deps, conn, client, local.name, started, f"denied: {decision.reason}",
            source=source or "anonymous",
        )  # fmt: skip
        return
    await _forward(
        deps, view, conns, downstream, source, local, (address, port), started, client, early
    )


class PeerFailure(str):
    """A refusal the peer caused by its TLS: a failed handshake or peer verification. It
    counts against the peer's source address (``[proxy] max_failures_per_source``)."""

    __slots__ = ()


def _refuse(
    deps: ProxyDeps,
    conn: socket.socket,
    client: str,
    service: str,
    started: float,
    reason: str,
    *,
    source: str | None = None,
) -> None:
    """Reset *conn* and record it; *source*: the caller's verified identity (or
    ``anonymous``) when it got that far, else the record names only its address."""
    reject(
        deps,
        conn,
        direction=DIRECTION,
        source=source or client,
        destination=service,
        started=started,
        outcome="refused",
        reason=reason,
        client=client,
    )


async def _accept(
    deps: ProxyDeps, view: DataPlaneView, local: LocalService, conn: socket.socket, client: str
) -> tuple[Connection, str | None] | str:
    """Terminate TLS and verify the peer (or admit plaintext); the reason on refusal."""
    try:
        first = await peek(conn, 1, timeout=deps.timeouts.first_byte)
    except (OSError, trio.TooSlowError) as exc:
        return f"no first byte: {exc or 'timed out'}"
    if first and first[0] == TLS_HANDSHAKE_RECORD:
        return await _terminate_tls(deps, view, local, conn)
    if view.mesh.mtls_mode == MTLSMode.STRICT:
        deps.metrics.plaintext_inbound.labels(local.name, "refused").inc()
        return "plaintext refused: mTLS mode is strict"
    deps.metrics.plaintext_inbound.labels(local.name, "admitted").inc()
    deps.log.event("plaintext_admitted", level="warning", destination=local.name, client=client)
    return PlainConnection(conn), None


async def _wait_for_use(
    deps: ProxyDeps, conns: OpenConnections, tls: TLSConnection, port: int
) -> tuple[DataPlaneView, LocalService, bytes] | str | None:
    """Hold a ``meshd/1`` connection until its ``GO`` (docs/adr/010).

    Everything is decided afresh after it, as if the connection had just arrived: the
    view, the local service on *port*, the peer's certificate against the current bundle
    and clock. Returns those with the application bytes that came with ``GO``; a reason
    to refuse; or None for a warm connection that was closed unused (counted, not logged).
    """
    early: bytes | None = None
    try:
        with conns.waiting() as scope:
            early = await receive_go(tls, timeout=deps.timeouts.unused)
    except CarrierUnused:
        pass
    except CarrierError as exc:
        tls.abort()
        return str(exc)
    except BaseException:  # cancelled: the agent is stopping
        tls.abort()
        raise
    if early is None or scope.cancelled_caught:
        deps.metrics.warm_connections.labels("inbound_unused").inc()
        tls.abort()
        return None
    view = deps.view()
    local = view.snapshot.local_service_on(port) if view is not None else None
    if view is None or local is None:
        return f"port {port} is no longer a meshed service"
    verified = _verify_client(deps, view, tls)
    if isinstance(verified, str):
        return verified
    return view, local, early


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
        return PeerFailure(exc)
    deps.metrics.tls_handshakes.labels(DIRECTION, "yes" if tls.session_reused else "no").inc()
    verified = _verify_client(deps, view, tls)
    if isinstance(verified, str):
        return verified
    return tls, verified.identity.service


def _verify_client(deps: ProxyDeps, view: DataPlaneView, tls: TLSConnection) -> VerifiedPeer | str:
    """The client, verified against *view*'s bundle now; or why it is refused.

    A refusal aborts *tls*. Every connection is verified, resumed ones too: a ticket brings
    back the leaf of the first handshake, checked here again against the current bundle
    and clock.
    """
    if view.bundle is None:
        tls.abort()
        return f"no trust bundle: {view.bundle_error}"
    try:
        peer = verify_now(deps, view.bundle, tls, role="client", expected_service=None)
    except PeerRejected as exc:
        tls.abort()
        deps.metrics.tls_failures.labels(DIRECTION, "peer_identity").inc()
        return PeerFailure(exc)
    return peer


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
    early: bytes = b"",
) -> None:
    # Over loopback: the proxy's own dials to a meshed port of this host are redirected
    # again (that is how local callers reach the inbound proxy); loopback never is.
    loopback = "::1" if ":" in target[0] else "127.0.0.1"
    try:
        app = await connect_tcp(loopback, target[1], timeout=deps.timeouts.connect)
        if early:  # application bytes that arrived with GO
            try:
                await send_all_raw(app, early)
            except OSError:
                abort_socket(app)
                raise
    except BaseException as exc:
        downstream.abort()
        if not isinstance(exc, OSError | trio.TooSlowError):
            raise
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
    # A snapshot published while the application was being dialled found no entry to
    # close: from here on close_denied sees this one, and this check sees that snapshot.
    latest = deps.view()
    if latest is not view and (latest is None or not latest.authorize(source, local.name).allowed):
        entry.scope.cancel()
    result = None
    try:
        with entry.scope:
            result = await deps.pump(
                downstream, PlainConnection(app), idle_timeout=deps.timeouts.idle
            )
    finally:
        conns.remove(entry)
    if early and result is not None:  # sent to the application before the pump began
        result = replace(result, bytes_a_to_b=result.bytes_a_to_b + len(early))
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
