"""The outbound proxy: intercepted application connections, carried over mutual TLS.

Flow for one connection: original destination (SO_ORIGINAL_DST) → mesh service via the
snapshot's address map → local identity to present → endpoints in balanced order, retrying
the connect on the next one → a warm connection to the first choice if the pool has one
(docs/adr/010), else an mTLS handshake with SNI = service → verify the peer is that service
(before any application byte) → ``GO`` if the peer speaks ``meshd/1`` → pump.

A destination the snapshot does not know follows the mesh's outbound policy: ``allow-any``
dials it directly (the proxy's own uid is excluded from redirection, so this is not looped),
``registry-only`` refuses. Either way the agent is told, so it can discover the service.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import socket
import ssl

import trio

from agent.carrier import send_go, speaks_carrier
from agent.netio import connect_tcp
from agent.proxycore import (
    ProxyDeps,
    admit,
    destination_or_reject,
    finish,
    peer_of,
    reject,
    verify_now,
)
from agent.pump import PlainConnection
from agent.sockowner import Owner
from agent.tlsconn import TLSConnection, TLSHandshakeError, handshake
from agent.warmpool import EndpointKey
from meshd.dataplane import DataPlaneView
from meshd.meshconfig import OutboundPolicy
from meshd.peer import PeerRejected
from meshd.snapshot import Endpoint, LocalService

DIRECTION = "outbound"
# A connect that fails with these says this host is out of descriptors, buffers, memory or
# source ports: it counts against no endpoint (outlier ejection, ADR 012).
LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)
TICKET_WAIT_S = 0.5
FIRST_READ = 16384  # one TLS record's worth


async def handle_outbound(deps: ProxyDeps, conn: socket.socket) -> None:
    """Serve one intercepted connection; owns and always closes *conn*."""
    started = trio.current_time()
    client = peer_of(conn)
    limits = deps.limits.outbound
    ticket = admit(deps, limits, conn, direction=DIRECTION, client=client, now=started)
    if ticket is None:
        return
    try:
        await _serve_outbound(deps, conn, client, started)
    finally:
        limits.release(ticket)


async def _serve_outbound(
    deps: ProxyDeps, conn: socket.socket, client: str, started: float
) -> None:
    found = destination_or_reject(deps, conn, direction=DIRECTION, client=client, started=started)
    if found is None:
        return
    address, port = found
    view = deps.view()
    target = f"{address}:{port}"
    if view is None:
        reject(
            deps,
            conn,
            direction=DIRECTION,
            source=client,
            destination=target,
            started=started,
            outcome="no_snapshot",
        )
        return
    service = view.snapshot.service_for(address, port)
    if service is None:
        deps.on_unknown_destination(address, port)
        await _unknown_destination(deps, view, conn, address, port, started)
        return
    await _to_mesh_service(deps, view, conn, service, started, target=(address, port))


async def _unknown_destination(
    deps: ProxyDeps,
    view: DataPlaneView,
    conn: socket.socket,
    address: str,
    port: int,
    started: float,
) -> None:
    target = f"{address}:{port}"
    source = peer_of(conn)
    if view.mesh.outbound_policy != OutboundPolicy.ALLOW_ANY:
        reject(
            deps,
            conn,
            direction=DIRECTION,
            source=source,
            destination=target,
            started=started,
            outcome="refused_registry_only",
        )
        return
    try:
        upstream = await connect_tcp(address, port, timeout=deps.timeouts.connect)
    except (OSError, trio.TooSlowError) as exc:
        reject(
            deps,
            conn,
            direction=DIRECTION,
            source=source,
            destination=target,
            started=started,
            outcome="connect_failed",
            reason=str(exc) or type(exc).__name__,
        )
        return
    result = await deps.pump(
        PlainConnection(conn), PlainConnection(upstream), idle_timeout=deps.timeouts.idle
    )
    finish(
        deps,
        direction=DIRECTION,
        source=source,
        destination=target,
        started=started,
        outcome="passthrough",
        result=result,
        passthrough=True,
    )


async def _to_mesh_service(
    deps: ProxyDeps,
    view: DataPlaneView,
    conn: socket.socket,
    service: str,
    started: float,
    *,
    target: tuple[str, int] | None = None,
) -> None:
    """Carry *conn* (intercepted on its way to *target*, an address of *service*) over mTLS.

    *target* is needed only to tell which user opened *conn* (``[service] user``); benches
    and tests that feed connections directly may leave it out.
    """
    client = peer_of(conn)
    owner: Owner | None = None
    if view.identifies_by_user:
        owner = _owner(deps, conn, target)
    local = (
        owner.reason
        if owner is not None and owner.uid is None
        else view.source_identity(service, None if owner is None else owner.uid)
    )
    reason = _cannot_dial(view, local)
    ctx: ssl.SSLContext | None = None
    if reason is None and isinstance(local, LocalService) and view.bundle is not None:
        ctx = deps.tls.context("client", local.name, view.bundle)
        reason = None if ctx is not None else f"no valid certificate for {local.name}"
    if reason is not None or ctx is None or not isinstance(local, LocalService):
        uid = {} if owner is None else {"uid": owner.uid}
        reject(
            deps,
            conn,
            direction=DIRECTION,
            source=client,
            destination=service,
            started=started,
            outcome="refused",
            reason=reason,
            **uid,
        )
        return
    # What the application already sent goes in the same record as GO (or first, for an
    # older peer): the far proxy then has the request with its GO, with no wait for ours.
    try:
        first = _available(conn)
    except OSError as exc:
        reject(deps, conn, direction=DIRECTION, source=local.name, destination=service,
               started=started, outcome="reset", reason=str(exc))  # fmt: skip
        return
    upstream = await _dial(deps, view, service, ctx, first)
    if isinstance(upstream, str):
        reject(
            deps,
            conn,
            direction=DIRECTION,
            source=local.name,
            destination=service,
            started=started,
            outcome="upstream_failed",
            reason=upstream,
        )
        return
    result = await deps.pump(PlainConnection(conn), upstream, idle_timeout=deps.timeouts.idle)
    if first:
        result = dataclasses.replace(result, bytes_a_to_b=result.bytes_a_to_b + len(first))
    finish(
        deps,
        direction=DIRECTION,
        source=local.name,
        destination=service,
        started=started,
        outcome="closed",
        result=result,
        client=client,
        **({} if owner is None else {"uid": owner.uid}),
    )


def _available(conn: socket.socket) -> bytes:
    """What the client has sent so far, without waiting (b"" for nothing, or at EOF, which
    the pump then reads again)."""
    try:
        return conn.recv(FIRST_READ, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


def _cannot_dial(view: DataPlaneView, identity: LocalService | str) -> str | None:
    if view.bundle is None:
        return f"no trust bundle: {view.bundle_error}"
    if isinstance(identity, str):
        return identity
    return None


def _owner(deps: ProxyDeps, conn: socket.socket, target: tuple[str, int] | None) -> Owner:
    """Who opened the application's end of *conn*, which it addressed to *target*."""
    if target is None:
        return Owner(None, "the connection's original destination is not known")
    try:
        peer = conn.getpeername()[:2]
    except OSError as exc:
        return Owner(None, f"the client is gone: {exc.strerror or exc}")
    return deps.owners.owner((peer[0], peer[1]), target)


async def _dial(
    deps: ProxyDeps, view: DataPlaneView, service: str, ctx: ssl.SSLContext, first: bytes
) -> TLSConnection | str:
    """Connect and verify an endpoint of *service*, trying the next when a connect, a
    handshake or the peer check fails (no application byte has gone out then), while the
    destination's retry budget allows (ADR 012).

    The balancer's first choice is served from the warm pool when it has a connection
    (docs/adr/010); the pool is then topped up in the background.

    Returns the verified connection, ready for the rest of the application's bytes: ``GO``
    (on ``meshd/1``) and *first* are sent. Or the reason every attempt failed.
    """
    endpoints = view.snapshot.endpoints(service)
    now = trio.current_time()
    order: tuple[Endpoint, ...] = deps.balancer.attempt_order(
        service, endpoints, now=now, key=_endpoint_key
    )
    if not order:
        return f"no healthy endpoint for {service}"
    budget = deps.balancer.retries
    budget.connection(service, now)
    last = ""
    for attempt, endpoint in enumerate(order):
        key = _endpoint_key(endpoint)
        if attempt:
            if not budget.allow_retry(service, trio.current_time()):
                deps.metrics.retries_refused.labels(service).inc()
                last = f"{last}; no retry: the retry budget for {service} is spent"
                break
            deps.metrics.connect_retries.labels(service).inc()
        else:
            warm = await _take_warm(deps, view, service, ctx, key, first)
            if warm is not None:
                _replenish(deps, service, ctx, endpoint)
                return warm
        sock = await _connect(deps, service, endpoint)
        if isinstance(sock, str):
            last = sock
            continue
        tls = await _secure(deps, view, service, sock, ctx, endpoint)
        if isinstance(tls, str):
            last = tls  # no application byte went out yet: the next endpoint may serve
            continue
        try:
            await _begin(tls, first)
        except BaseException as exc:
            tls.abort()
            if not isinstance(exc, OSError):
                raise
            return f"{endpoint.address}:{endpoint.port}: closed before use: {exc}"
        if speaks_carrier(tls):  # never warm up a peer from before meshd/1: it would dial
            _replenish(deps, service, ctx, endpoint)
        return tls
    return last


async def _begin(tls: TLSConnection, first: bytes) -> None:
    """Put *tls* to use: ``GO`` with *first* in one record on ``meshd/1``, else *first*."""
    if speaks_carrier(tls):
        await send_go(tls, first)
    elif first:
        await tls.send_all(first)


async def _take_warm(
    deps: ProxyDeps,
    view: DataPlaneView,
    service: str,
    ctx: ssl.SSLContext,
    key: EndpointKey,
    first: bytes,
) -> TLSConnection | None:
    """A warm connection to *key*, peer re-verified now, put to use with *first*; None on a
    miss (or if it failed before anything was sent: *first* is then sent on another)."""
    assert view.bundle is not None  # _cannot_dial checked it
    tls = deps.warm.take(ctx, service, key)
    if tls is None:
        return None
    try:
        # Same context, so same bundle as at its handshake; this re-checks validity now.
        verify_now(deps, view.bundle, tls, role="server", expected_service=service)
        await send_go(tls, first)
    except BaseException as exc:
        tls.abort()
        if not isinstance(exc, PeerRejected | OSError):
            raise
        return None
    return tls


def _replenish(deps: ProxyDeps, service: str, ctx: ssl.SSLContext, endpoint: Endpoint) -> None:
    """Top up the warm connections to *endpoint* (in the background)."""
    deps.warm.replenish(
        ctx,
        service,
        (endpoint.address, endpoint.port),
        functools.partial(_open_warm, deps, service, ctx, endpoint),
    )


async def _open_warm(
    deps: ProxyDeps, service: str, ctx: ssl.SSLContext, endpoint: Endpoint
) -> TLSConnection | None:
    """One new verified connection for the warm pool, made with the current view."""
    view = deps.view()
    if view is None or view.bundle is None:
        return None
    sock = await _connect(deps, service, endpoint)
    if isinstance(sock, str):
        return None
    tls = await _secure(deps, view, service, sock, ctx, endpoint)
    if isinstance(tls, str):
        return None
    # The server's session ticket follows its handshake: take it in now, so that the next
    # connection to this endpoint resumes (nobody reads a warm connection until it is used).
    try:
        with trio.move_on_after(TICKET_WAIT_S):
            await tls.wait_readable()
    except BaseException:  # the pool is shutting down
        tls.close()
        raise
    if not tls.still_idle():
        tls.close()
        return None
    return tls


def _endpoint_key(endpoint: Endpoint) -> EndpointKey:
    return (endpoint.address, endpoint.port)


async def _connect(deps: ProxyDeps, service: str, endpoint: Endpoint) -> socket.socket | str:
    """TCP to *endpoint*; the reason on failure, told to the balancer's outlier ejection
    (what the connect of a warm connection finds counts too, what this host lacks does
    not). Success is told once the peer is verified (:func:`_secure`)."""
    try:
        return await connect_tcp(endpoint.address, endpoint.port, timeout=deps.timeouts.connect)
    except (OSError, trio.TooSlowError) as exc:
        if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
            # This host ran out of something: it says nothing about the endpoint.
            return f"connect {endpoint.address}:{endpoint.port}: {exc.strerror} (on this host)"
        reason = f"connect {endpoint.address}:{endpoint.port}: {exc or 'timed out'}"
        return _endpoint_failed(deps, service, endpoint, reason)


def _endpoint_failed(deps: ProxyDeps, service: str, endpoint: Endpoint, reason: str) -> str:
    """Tell outlier ejection that *endpoint* failed a connect or the handshake and peer
    check after it; *reason*."""
    key = _endpoint_key(endpoint)
    ejection = deps.balancer.outliers.failed(key, trio.current_time())
    if ejection is not None:
        deps.metrics.endpoint_ejections.labels(service).inc()
        deps.log.event(
            "endpoint_ejected",
            level="warning",
            destination=service,
            endpoint=f"{endpoint.address}:{endpoint.port}",
            seconds=ejection.seconds,
            failures=ejection.failures,
            reason=reason,
        )
    return reason


async def _secure(
    deps: ProxyDeps,
    view: DataPlaneView,
    service: str,
    sock: socket.socket,
    ctx: ssl.SSLContext,
    endpoint: Endpoint,
) -> TLSConnection | str:
    assert view.bundle is not None  # _cannot_dial checked it
    key = (endpoint.address, endpoint.port)
    # A session from this very context, if a ticket is at hand: resumption skips the
    # certificate exchange and signatures, never the peer check below (docs/adr/008).
    session = deps.sessions.session_for(ctx, service, key, deps.wall_clock())
    try:
        tls = await handshake(
            sock,
            ctx,
            server_side=False,
            server_hostname=service,
            timeout=deps.timeouts.handshake,
            session=session,
        )
    except TLSHandshakeError as exc:
        deps.sessions.forget(service, key)
        deps.metrics.tls_failures.labels(DIRECTION, "handshake").inc()
        return _endpoint_failed(deps, service, endpoint, str(exc))
    deps.metrics.tls_handshakes.labels(DIRECTION, "yes" if tls.session_reused else "no").inc()
    try:
        verified = verify_now(deps, view.bundle, tls, role="server", expected_service=service)
    except PeerRejected as exc:
        # Nothing was written yet: the application's bytes never reach the wrong peer.
        tls.abort()
        deps.sessions.forget(service, key)
        deps.metrics.tls_failures.labels(DIRECTION, "peer_identity").inc()
        reason = f"{endpoint.address}:{endpoint.port}: peer identity rejected: {exc}"
        # Said even when a retry then serves the caller: an endpoint that presents another
        # identity is a catalog entry that lies (or an impostor) and wants a look.
        deps.log.event("upstream_identity_rejected", level="warning", destination=service,
                       endpoint=f"{endpoint.address}:{endpoint.port}", reason=str(exc))  # fmt: skip
        return _endpoint_failed(deps, service, endpoint, reason)
    deps.balancer.outliers.succeeded(key)
    tls.harvest_ticket = deps.sessions.connected(
        ctx, service, key, tls.ssl_object, verified.valid_until, deps.wall_clock()
    )
    return tls
