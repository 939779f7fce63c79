"""Warm connections and the ``meshd/1`` preamble (docs/adr/010), through the real proxies.

Real sockets on loopback, real mTLS with SVIDs from our CA, and the agent's own handlers:
an application client → ``outbound._to_mesh_service`` (with its :class:`WarmPool` serving)
→ ``inbound.handle_inbound`` → a real application server that counts the connections it
is given. Only the original-destination lookup (iptables) is left out.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from agent import inbound, outbound
from agent.carrier import GO, MESH_ALPN
from agent.inbound import OpenConnections
from agent.tlsconn import TLSConnection, handshake
from agent.warmpool import WarmPool
from meshd.dataplane import DataPlaneView, build_view
from meshd.intentions import Action, IntentionsDocument, SourceIntention, render_document
from meshd.snapshot import Endpoint, LocalService, UpstreamSet, make_snapshot
from meshd.trustbundle import TrustBundle
from tests.plugins.pki import MeshCa
from tests.test_resumption import Proxy, make_proxy

TIMEOUT = 15.0


@dataclass
class App:
    """The application behind the inbound proxy: replies ``api:`` + what it read."""

    port: int = 0
    accepted: int = 0
    resets: int = 0
    received: list[bytes] = field(default_factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        with listener:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    self.accepted += 1
                    nursery.start_soon(self._one, trio.SocketStream(sock))

    async def _one(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = bytearray()
            try:
                while chunk := await stream.receive_some(65536):
                    data += chunk
                await stream.send_all(b"api:" + data)
            except trio.BrokenResourceError:
                self.resets += 1
            self.received.append(bytes(data))


@dataclass
class Mesh2:
    """web (outbound) → api (inbound) → App, with knobs on both sides."""

    web: Proxy
    api: Proxy
    app: App
    warm: WarmPool
    conns: OpenConnections
    api_view: DataPlaneView
    outbound_port: int = 0
    inbound_port: int = 0
    errors: list[str] = field(default_factory=list)

    def allow(self, allowed: bool) -> None:
        self.api_view = api_view(self.api, self.app.port, allowed=allowed)

    async def call(self, payload: bytes) -> bytes:
        """One application connection through the mesh: send, half-close, read to EOF."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.outbound_port)
        async with stream:
            await stream.send_all(payload)
            await stream.send_eof()
            out = bytearray()
            with contextlib.suppress(trio.BrokenResourceError):
                while chunk := await stream.receive_some(65536):
                    out += chunk
            return bytes(out)

    def count(self, outcome: str) -> float:
        return float(self.web.deps.metrics.warm_connections.labels(outcome)._value.get())

    def api_count(self, outcome: str) -> float:
        return float(self.api.deps.metrics.warm_connections.labels(outcome)._value.get())

    async def until(self, what: str, predicate: Callable[[], bool]) -> None:
        with trio.move_on_after(TIMEOUT) as waited:
            while not predicate():
                await trio.sleep(0.01)
        if waited.cancelled_caught:
            raise AssertionError(f"timed out waiting for: {what}")


def api_view(api: Proxy, app_port: int, *, allowed: bool = True) -> DataPlaneView:
    assert api.view.bundle is not None
    local = LocalService("api", "api-1", app_port)
    action = Action.ALLOW if allowed else Action.DENY
    doc = IntentionsDocument("api", (SourceIntention("web", action=action),))
    snapshot = make_snapshot(
        version=1,
        created_at=time.time(),
        local_services=(local,),
        intentions_raw={"api": render_document(doc)},
        trust_bundle_raw=api.view.bundle.to_json(),
    )
    return build_view(snapshot)


def web_view(web: Proxy, inbound_port: int) -> DataPlaneView:
    assert web.view.bundle is not None
    endpoint = Endpoint("127.0.0.1", inbound_port, node="n2", service_id="api-1")
    snapshot = make_snapshot(
        version=1,
        created_at=time.time(),
        local_services=(LocalService("web", "web-1", 8080, upstreams=("api",)),),
        upstreams=(UpstreamSet("api", (endpoint,)),),
        trust_bundle_raw=web.view.bundle.to_json(),
    )
    return build_view(snapshot)


async def _listen(handler: object, nursery: trio.Nursery) -> int:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(64)

    async def loop() -> None:
        with listener:
            while True:
                sock, _ = await listener.accept()
                raw = socket.socket(fileno=sock.detach())
                raw.setblocking(False)
                nursery.start_soon(handler, raw)  # type: ignore[arg-type]

    nursery.start_soon(loop)
    return int(listener.getsockname()[1])


@contextlib.asynccontextmanager
async def running(
    mesh_ca: MeshCa, tmp_path: Path, *, per_endpoint: int = 2, idle_timeout: float = 30.0
) -> AsyncIterator[Mesh2]:
    web = make_proxy(mesh_ca, tmp_path, LocalService("web", "web-1", 8080, upstreams=("api",)))
    api = make_proxy(mesh_ca, tmp_path, LocalService("api", "api-1", 9090))
    app = App()
    warm = WarmPool(
        per_endpoint=per_endpoint,
        idle_timeout=idle_timeout,
        count=lambda outcome: web.deps.metrics.warm_connections.labels(outcome).inc(),
    )
    web.deps.warm = warm
    async with trio.open_nursery() as nursery:
        await nursery.start(app.serve)
        mesh = Mesh2(web, api, app, warm, OpenConnections(), api_view(api, app.port))
        api.deps.view = lambda: mesh.api_view

        async def serve_in(sock: socket.socket) -> None:
            await inbound.handle_inbound(api.deps, mesh.conns, sock, target=("127.0.0.1", app.port))

        mesh.inbound_port = await _listen(serve_in, nursery)
        view = web_view(web, mesh.inbound_port)
        web.deps.view = lambda: view

        async def serve_out(sock: socket.socket) -> None:
            await outbound._to_mesh_service(web.deps, view, sock, "api", trio.current_time())

        mesh.outbound_port = await _listen(serve_out, nursery)
        await nursery.start(warm.serve)
        try:
            yield mesh
        finally:
            nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------------- the pool


async def test_after_one_use_the_next_connections_take_warm_ones(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    async with running(mesh_ca, tmp_path) as m:
        assert await m.call(b"one") == b"api:one"
        await m.until("two warm", lambda: m.warm.idle_count == 2)
        assert m.app.accepted == 1  # a warm connection reaches no application
        for n in range(5):
            assert await m.call(b"n%d" % n) == b"api:n%d" % n
            await m.until("refilled", lambda: m.warm.idle_count == 2)
        assert m.count("hit") == 5 and m.count("miss") == 1
        assert m.app.accepted == 6 and m.app.received == [b"one"] + [b"n%d" % n for n in range(5)]
        # Every connection was verified on both sides: 1 + 2 + 5 refills = 8 handshakes.
        handshakes = m.web.handshakes("outbound", "no") + m.web.handshakes("outbound", "yes")
        assert handshakes == 8
        assert m.warm.idle_count == 2 and m.app.resets == 0


async def test_policy_is_decided_when_a_warm_connection_is_used_not_when_opened(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    async with running(mesh_ca, tmp_path) as m:
        assert await m.call(b"allowed") == b"api:allowed"
        await m.until("warm", lambda: m.warm.idle_count == 2)
        m.allow(False)  # intentions change while two connections sit warm
        assert await m.call(b"now denied") == b""
        assert m.app.accepted == 1 and m.app.received == [b"allowed"]
        assert m.api.deps.metrics.authz_denied.labels("web", "api")._value.get() == 1
        m.allow(True)
        await m.until("refilled", lambda: m.warm.idle_count == 2)
        assert await m.call(b"again") == b"api:again"


async def test_warm_connections_expire_unused_and_the_inbound_side_never_dials_them(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    async with running(mesh_ca, tmp_path, idle_timeout=0.3) as m:
        assert await m.call(b"x") == b"api:x"
        await m.until("warm", lambda: m.warm.idle_count == 2)
        await m.until("expired", lambda: m.count("expired") == 2)
        await m.until("inbound saw them unused", lambda: m.api_count("inbound_unused") == 2)
        assert m.warm.idle_count == 0 and m.app.accepted == 1 and m.app.resets == 0
        # The key was used > idle_timeout ago: it is forgotten, nothing is reopened.
        await trio.sleep(1.2)
        assert m.warm.idle_count == 0 and m.count("expired") == 2


async def test_a_warm_connection_the_peer_closed_is_skipped_and_a_fresh_one_used(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    async with running(mesh_ca, tmp_path, per_endpoint=1) as m:
        assert await m.call(b"a") == b"api:a"
        await m.until("warm", lambda: m.warm.idle_count == 1)
        m.conns.stop_waiting()  # the inbound side drains: closes what waits for use
        await m.until("closed", lambda: m.api_count("inbound_unused") == 1)
        await trio.sleep(0.05)  # let the FIN arrive
        m.conns = OpenConnections()  # a restarted inbound proxy
        assert await m.call(b"b") == b"api:b"
        assert m.count("closed_by_peer") == 1 and m.count("hit") == 0
        assert m.app.received == [b"a", b"b"]


async def test_a_renewed_certificate_leaves_the_old_warm_connections_unused(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    async with running(mesh_ca, tmp_path, per_endpoint=1) as m:
        assert await m.call(b"a") == b"api:a"
        await m.until("warm", lambda: m.warm.idle_count == 1)
        m.web.creds.renew("web")  # a new client context from now on
        assert await m.call(b"b") == b"api:b"
        assert m.count("hit") == 0
        # The old connection was closed when the key moved to the new context.
        await m.until("closed", lambda: m.api_count("inbound_unused") == 1)
        await m.until("warm again", lambda: m.warm.idle_count == 1)
        assert await m.call(b"c") == b"api:c"
        assert m.count("hit") == 1


async def test_disabled_pool_opens_nothing_ahead(mesh_ca: MeshCa, tmp_path: Path) -> None:
    async with running(mesh_ca, tmp_path, per_endpoint=0) as m:
        for n in range(3):
            assert await m.call(b"%d" % n) == b"api:%d" % n
        await trio.sleep(0.2)
        assert m.warm.idle_count == 0 and m.count("hit") == 0 and m.count("miss") == 0
        assert m.web.handshakes("outbound", "no") + m.web.handshakes("outbound", "yes") == 3


# ------------------------------------------------------------------------ mixed versions


def _without_alpn(proxy: Proxy, role: str) -> None:
    """Make *proxy*'s contexts behave like an agent from before meshd/1 (no ALPN)."""
    original = proxy.deps.tls.context

    def context(r: str, service: str, bundle: TrustBundle) -> ssl.SSLContext | None:
        ctx = original(r, service, bundle)  # type: ignore[arg-type]
        if ctx is not None and r == role:
            ctx.set_alpn_protocols([])
        return ctx

    proxy.deps.tls.context = context  # type: ignore[method-assign,assignment]


async def test_an_old_inbound_peer_gets_no_preamble_and_no_warm_connections(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    async with running(mesh_ca, tmp_path) as m:
        _without_alpn(m.api, "server")
        for n in range(3):
            assert await m.call(b"%d" % n) == b"api:%d" % n
        await trio.sleep(0.2)
        # Nothing is opened ahead to a peer that would dial its application at once, and
        # no GO reached the application.
        assert m.warm.idle_count == 0 and m.count("peer_without_meshd_1") == 0
        assert m.app.accepted == 3 and m.app.received == [b"0", b"1", b"2"]


async def test_an_old_outbound_peer_is_served_at_once(mesh_ca: MeshCa, tmp_path: Path) -> None:
    async with running(mesh_ca, tmp_path, per_endpoint=0) as m:
        _without_alpn(m.web, "client")
        assert await m.call(b"old") == b"api:old"
        assert m.app.received == [b"old"]


# ------------------------------------------------------------------------ hostile peers


async def _raw_client(m: Mesh2) -> TLSConnection:
    ctx = m.web.client_ctx()
    sock = socket.create_connection(("127.0.0.1", m.inbound_port))
    sock.setblocking(False)
    tls = await handshake(sock, ctx, server_side=False, server_hostname="api", timeout=TIMEOUT)
    assert tls.alpn == MESH_ALPN
    return tls


async def test_a_peer_that_breaks_the_preamble_is_refused_before_the_application(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    async with running(mesh_ca, tmp_path) as m:
        tls = await _raw_client(m)
        await tls.send_all(b"GET / HTTP/1.1\r\n\r\n")
        buf = memoryview(bytearray(100))
        with trio.fail_after(TIMEOUT), pytest.raises(OSError):
            while await tls.recv_into(buf):
                pass
        tls.close()
        assert m.app.accepted == 0


async def test_application_bytes_sent_with_the_preamble_arrive_first_and_intact(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    async with running(mesh_ca, tmp_path) as m:
        tls = await _raw_client(m)
        payload = bytes(range(256)) * 300
        await tls.send_all(GO + payload)  # one write: the preamble and data share records
        await tls.send_eof()
        buf, out = memoryview(bytearray(65536)), bytearray()
        with trio.fail_after(TIMEOUT):
            while n := await tls.recv_into(buf):
                out += buf[:n]
        tls.close()
        assert bytes(out) == b"api:" + payload
        assert m.app.received == [payload]


async def test_a_drained_inbound_side_closes_connections_waiting_for_use(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    async with running(mesh_ca, tmp_path) as m:
        tls = await _raw_client(m)
        await m.until("waiting", lambda: m.conns.waiting_count == 1)
        m.conns.stop_waiting()
        buf = memoryview(bytearray(100))
        with trio.fail_after(TIMEOUT):
            with contextlib.suppress(OSError):
                assert await tls.recv_into(buf) == 0
        tls.close()
        assert m.api_count("inbound_unused") == 1 and m.app.accepted == 0


async def test_still_idle_absorbs_session_tickets_and_sees_a_close(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    async with running(mesh_ca, tmp_path) as m:
        tls = await _raw_client(m)
        await trio.sleep(0.1)  # the server's session ticket arrives
        assert tls.still_idle() and tls.still_idle()
        m.conns.stop_waiting()
        await m.until("closed", lambda: m.api_count("inbound_unused") == 1)
        await trio.sleep(0.05)
        assert not tls.still_idle()
        tls.close()


async def test_a_deny_published_while_a_connection_handshakes_holds_for_it(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    """A caller connects while it is allowed, and finishes its handshake (without meshd/1,
    like an older agent) only after a deny was published and the agent closed what the deny
    covers: the inbound proxy decides on the policy in force at that point, so the
    application receives nothing."""
    async with running(mesh_ca, tmp_path, per_endpoint=0) as m:
        _without_alpn(m.web, "client")
        sock = socket.create_connection(("127.0.0.1", m.inbound_port))
        sock.setblocking(False)
        await trio.sleep(0.3)  # the inbound proxy has it, under the allowing view
        m.allow(False)
        assert m.conns.close_denied(m.api_view) == 0  # nothing flowing yet to close
        tls = await handshake(
            sock, m.web.client_ctx(), server_side=False, server_hostname="api", timeout=TIMEOUT
        )
        reply = bytearray()
        with contextlib.suppress(OSError):
            await tls.send_all(b"after-deny")
            await tls.send_eof()
            buf = memoryview(bytearray(4096))
            while n := await tls.recv_into(buf):
                reply += buf[:n]
        tls.abort()
        await trio.sleep(0.2)
        assert m.app.received == [] and m.app.accepted == 0
        assert reply == b""
        assert m.api.deps.metrics.authz_denied.labels("web", "api")._value.get() == 1
