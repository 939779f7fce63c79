"""The outbound proxy's dial under failing endpoints: retries, their budget, ejection.

Real sockets on loopback and the outbound proxy's own ``_dial`` with a web proxy's real
dependencies (metrics, balancer, TLS contexts from our CA). "Down" endpoints are loopback
ports nobody listens on (the kernel refuses them at once); a live one is the agent's real
inbound proxy in front of an application, so a dial that gets through ends verified.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import trio

from agent import outbound
from meshd.balancer import RETRY_MIN_PER_S, RETRY_RATIO, RETRY_WINDOW_S
from meshd.dataplane import DataPlaneView, build_view
from meshd.snapshot import Endpoint, LocalService, UpstreamSet, make_snapshot
from tests.plugins.pki import MeshCa
from tests.test_resumption import Proxy, make_proxy
from tests.test_warm import _listen, running

RESERVE = RETRY_MIN_PER_S * RETRY_WINDOW_S


def refused_port() -> int:
    """A loopback port that refuses connections (bound a moment ago, closed, not listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def view_with(web: Proxy, ports: list[int]) -> DataPlaneView:
    assert web.view.bundle is not None
    endpoints = tuple(
        Endpoint("127.0.0.1", port, node=f"n{i}", service_id=f"api-{i}")
        for i, port in enumerate(ports)
    )
    snapshot = make_snapshot(
        version=1,
        created_at=time.time(),
        local_services=(LocalService("web", "web-1", 8080, upstreams=("api",)),),
        upstreams=(UpstreamSet("api", endpoints),),
        trust_bundle_raw=web.view.bundle.to_json(),
    )
    return build_view(snapshot)


async def dial_many(web: Proxy, view: DataPlaneView, calls: int) -> tuple[int, list[str]]:
    """*calls* dials of api through web's outbound path, one after another: how many made
    a connection (each closed at once), and why the others failed."""
    ctx = web.client_ctx()
    with trio.fail_after(30):
        results = [await outbound._dial(web.deps, view, "api", ctx, b"") for _ in range(calls)]
    failed = [r for r in results if isinstance(r, str)]
    for conn in results:
        if not isinstance(conn, str):
            conn.abort()
    return len(results) - len(failed), failed


def counter(web: Proxy, name: str) -> float:
    return float(getattr(web.deps.metrics, name).labels("api")._value.get())


async def test_a_retry_storm_is_capped_by_the_retry_budget(mesh_ca: MeshCa, tmp_path: Path) -> None:
    """SECURITY-TESTS F: every endpoint down; attempts <= requests x (1 + budget) + reserve."""
    web = make_proxy(mesh_ca, tmp_path, LocalService("web", "web-1", 8080, upstreams=("api",)))
    view = view_with(web, [refused_port() for _ in range(3)])
    ctx = web.client_ctx()
    calls = 1000  # all within one budget window (refusals are immediate)
    outcomes = []
    with trio.fail_after(30):
        for _ in range(calls):
            outcomes.append(await outbound._dial(web.deps, view, "api", ctx, b""))
    assert all(isinstance(o, str) and "Connection refused" in o for o in outcomes)
    retries, refused = counter(web, "connect_retries"), counter(web, "retries_refused")
    spent = [o for o in outcomes if "retry budget for api is spent" in str(o)]
    # Without a budget: 2 retries per call (3 endpoints), 2000 retries.
    assert retries <= RETRY_RATIO * calls + RESERVE
    assert retries >= RETRY_RATIO * calls  # the budget is used, not withheld
    assert len(spent) == refused > 0
    attempts = calls + retries
    assert attempts <= calls * (1 + RETRY_RATIO) + RESERVE


async def test_retries_still_reach_a_live_endpoint_and_the_dead_ones_are_ejected(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    async with running(mesh_ca, tmp_path, per_endpoint=0) as mesh:
        web = mesh.web
        view = view_with(web, [refused_port(), refused_port(), mesh.inbound_port])
        live, failed = await dial_many(web, view, 30)
        # Each dead endpoint fails twice and is ejected; from then on the live one comes
        # first in every order, and no connection needs a retry.
        assert live == 30, failed
        assert counter(web, "endpoint_ejections") == 2
        assert counter(web, "connect_retries") <= 4
        assert counter(web, "retries_refused") == 0


async def test_an_endpoint_that_resets_after_accept_is_retried_around_and_ejected(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    """An endpoint that accepts TCP and resets before the handshake ends (an inbound proxy
    over its max_connections, an address now used by another host): each call that meets
    it goes on to the next endpoint (no application byte has gone out), and it is
    ejected like an endpoint that refuses connects."""

    async def reset_at_once(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    async with running(mesh_ca, tmp_path, per_endpoint=0) as mesh, trio.open_nursery() as n:
        web = mesh.web
        view = view_with(web, [await _listen(reset_at_once, n), mesh.inbound_port])
        live, failed = await dial_many(web, view, 10)
        assert live == 10, failed
        assert counter(web, "endpoint_ejections") == 1
        assert counter(web, "connect_retries") <= 2  # until the resetting one is ejected
        n.cancel_scope.cancel()


@contextlib.contextmanager
def out_of_descriptors() -> Iterator[None]:
    """This process can open no new descriptor (a real ``EMFILE``) until the block ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)  # every number below it is in use
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_host_out_of_descriptors_ejects_no_endpoint(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    """EMFILE on the outbound connect is this host's problem: every attempt fails, but no
    endpoint is blamed (ejected), and once descriptors are back the same endpoint serves."""
    async with running(mesh_ca, tmp_path, per_endpoint=0) as mesh:
        web = mesh.web
        view = view_with(web, [mesh.inbound_port, refused_port()])
        ctx = web.client_ctx()
        with out_of_descriptors():
            results = [await outbound._dial(web.deps, view, "api", ctx, b"") for _ in range(5)]
        assert all(isinstance(r, str) and "(on this host)" in r for r in results), results
        assert "Too many open files" in str(results[0])
        assert counter(web, "endpoint_ejections") == 0
        assert web.deps.balancer.outliers.ejected_now(trio.current_time()) == []
        with trio.fail_after(10):
            conn = await outbound._dial(web.deps, view, "api", ctx, b"")
        assert not isinstance(conn, str), conn
        conn.abort()
