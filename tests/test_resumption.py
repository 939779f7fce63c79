"""TLS 1.3 session resumption between the proxies, and identity on every connection.

Real handshakes over loopback sockets, through the proxies' own functions: the outbound
proxy's ``_secure`` (session offered from its cache, peer verified) against the inbound
proxy's ``_terminate_tls`` (ticket issued, client verified), with SVIDs from our CA.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent import inbound, outbound
from agent.accesslog import JsonLog
from agent.metrics import AgentMetrics
from agent.proxycore import ProxyDeps
from agent.pump import Connection
from agent.tlsconn import TLSConnection, abort_socket, handshake
from agent.tlscontexts import CertifiedKey, TLSContexts
from agent.tlssessions import SessionCache
from meshd.dataplane import DataPlaneView, ViewCache, build_view
from meshd.peer import PeerRejected, PeerVerifier, verify_peer
from meshd.snapshot import Endpoint, LocalService, make_snapshot
from meshd.trustbundle import BundleRoot, RootState, TrustBundle
from tests.plugins.pki import MeshCa, make_mesh_ca

TIMEOUT = 10.0


class Credentials:
    """A credential source (the certifier's interface) whose certificates we can renew."""

    def __init__(self, ca: MeshCa, directory: Path, ttl: dt.timedelta) -> None:
        self._ca, self._dir, self._ttl = ca, directory, ttl
        self._current: dict[str, CertifiedKey] = {}

    def renew(self, service: str) -> CertifiedKey:
        chain, key = self._ca.issue(service, ttl=self._ttl)
        leaf = x509.load_pem_x509_certificate(chain)
        key_path = self._dir / f"{service}-{leaf.serial_number}.key"
        key_path.write_bytes(key)
        key_path.chmod(0o600)
        self._current[service] = CertifiedKey(
            service,
            chain,
            key_path,
            leaf.not_valid_before_utc.timestamp(),
            leaf.not_valid_after_utc.timestamp(),
            leaf.serial_number,
        )
        return self._current[service]

    def current(self, service: str) -> CertifiedKey | None:
        return self._current.get(service)


@dataclass
class Proxy:
    """One host's proxy dependencies and view (one local service)."""

    deps: ProxyDeps
    creds: Credentials
    local: LocalService
    view: DataPlaneView
    clock_offset: dt.timedelta = field(default=dt.timedelta(0))

    def use_bundle(self, bundle: TrustBundle) -> None:
        self.view = view_for(self.local, bundle)

    def client_ctx(self) -> ssl.SSLContext:
        assert self.view.bundle is not None
        ctx = self.deps.tls.context("client", self.local.name, self.view.bundle)
        assert ctx is not None
        return ctx

    def handshakes(self, direction: str, resumed: str) -> float:
        return float(self.deps.metrics.tls_handshakes.labels(direction, resumed)._value.get())

    def failures(self, direction: str, stage: str) -> float:
        return float(self.deps.metrics.tls_failures.labels(direction, stage)._value.get())


def view_for(local: LocalService, bundle: TrustBundle) -> DataPlaneView:
    snapshot = make_snapshot(
        version=1, created_at=0.0, local_services=(local,), trust_bundle_raw=bundle.to_json()
    )
    return build_view(snapshot)


def with_signing_ca(ca: MeshCa) -> TrustBundle:
    """The bundle as published: roots plus the public signing CA (3.11 sees only the leaf)."""
    return replace(ca.bundle, intermediates=(ca.signing.cert,))


def make_proxy(
    ca: MeshCa, tmp: Path, local: LocalService, ttl: dt.timedelta = dt.timedelta(hours=1)
) -> Proxy:
    creds = Credentials(ca, tmp, ttl)
    creds.renew(local.name)
    proxy = Proxy(
        ProxyDeps(
            view=lambda: None,
            tls=TLSContexts(creds),
            metrics=AgentMetrics(),
            log=JsonLog(io.StringIO()),
        ),  # fmt: skip
        creds,
        local,
        view_for(local, with_signing_ca(ca)),
    )
    proxy.deps.wall_clock = lambda: dt.datetime.now(dt.UTC) + proxy.clock_offset
    return proxy


@dataclass
class Outcome:
    """What each side of one connection ended with."""

    client: TLSConnection | str
    server: tuple[Connection, str] | str
    greeting: bytes = b""


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def endpoint_of(listener: socket.socket) -> Endpoint:
    host, port = listener.getsockname()[:2]
    return Endpoint(host, port, node="n1", service_id="x-1")


async def read_to_eof(tls: Connection) -> bytes:
    buf, out = memoryview(bytearray(4096)), bytearray()
    while n := await tls.recv_into(buf):
        out += buf[:n]
        if len(out) > 1 << 16:
            raise AssertionError("more data than the test ever sends")
    return bytes(out)


async def connect_once(
    listener: socket.socket, client: Proxy, server: Proxy, service: str
) -> Outcome:
    """One connection: outbound ``_secure`` → inbound ``_terminate_tls``; the server greets."""
    raw_c = socket.create_connection(listener.getsockname()[:2])
    raw_s, _ = listener.accept()
    out = Outcome("", "")

    async def serve() -> None:
        res = await inbound._terminate_tls(server.deps, server.view, server.local, raw_s)
        out.server = res
        if isinstance(res, str):
            abort_socket(raw_s)
            return
        tls, source = res
        with contextlib.suppress(OSError, ssl.SSLError):  # the client may refuse us
            await tls.send_all(f"hello {source}, this is {server.local.name}".encode())
            await tls.send_eof()
            await read_to_eof(tls)
        tls.close()

    async def dial() -> None:
        res = await outbound._secure(
            client.deps, client.view, service, raw_c, client.client_ctx(), endpoint_of(listener)
        )
        out.client = res
        if isinstance(res, str):
            return
        try:
            out.greeting = await read_to_eof(res)  # takes in the ticket on the way
            await res.send_eof()
        except (OSError, ssl.SSLError):  # the server refused us after its handshake
            res.abort()
        res.close()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(dial)
    return out


def ok(out: Outcome) -> tuple[TLSConnection, TLSConnection, str]:
    assert isinstance(out.client, TLSConnection), out.client
    assert not isinstance(out.server, str), out.server
    server, source = out.server
    assert isinstance(server, TLSConnection)
    return out.client, server, source


def leaf_uri(der: bytes) -> str:
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    return str(san.value.get_values_for_type(x509.UniformResourceIdentifier)[0])


@pytest.fixture
def web(mesh_ca: MeshCa, tmp_path: Path) -> Proxy:
    return make_proxy(mesh_ca, tmp_path, LocalService("web", "web-1", 8080, upstreams=("api",)))


@pytest.fixture
def api(mesh_ca: MeshCa, tmp_path: Path) -> Proxy:
    return make_proxy(mesh_ca, tmp_path, LocalService("api", "api-1", 9090))


# ------------------------------------------------------------------------------ resumption


async def test_second_connection_resumes_and_carries_the_verified_identity(
    listener: socket.socket, web: Proxy, api: Proxy
) -> None:
    first = await connect_once(listener, web, api, "api")
    c1, s1, source1 = ok(first)
    assert not c1.session_reused and not s1.session_reused
    assert first.greeting == b"hello web, this is api" and source1 == "web"

    second = await connect_once(listener, web, api, "api")
    c2, s2, source2 = ok(second)
    assert c2.session_reused and s2.session_reused
    # The resumed session still carries both leaves, and both sides verified them again.
    assert c2.peer_chain_der()[0] == c1.peer_chain_der()[0]
    assert leaf_uri(c2.peer_chain_der()[0]).endswith("/svc/api")
    assert s2.peer_chain_der()[0] == s1.peer_chain_der()[0]
    assert leaf_uri(s2.peer_chain_der()[0]).endswith("/svc/web")
    assert source2 == "web" and second.greeting == b"hello web, this is api"
    assert web.handshakes("outbound", "no") == 1 and web.handshakes("outbound", "yes") == 1
    assert api.handshakes("inbound", "no") == 1 and api.handshakes("inbound", "yes") == 1
    # verify ran on every connection (the second time from the verifier's memory).
    assert (web.deps.peers.misses, web.deps.peers.hits) == (1, 1)
    assert (api.deps.peers.misses, api.deps.peers.hits) == (1, 1)


async def test_concurrent_connections_all_resume_from_one_session(
    listener: socket.socket, web: Proxy, api: Proxy
) -> None:
    ok(await connect_once(listener, web, api, "api"))
    outcomes: list[Outcome] = []

    async def one() -> None:
        outcomes.append(await connect_once(listener, web, api, "api"))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    pairs = [ok(out) for out in outcomes]
    assert len(pairs) == 20
    assert all(c.session_reused and s.session_reused and src == "web" for c, s, src in pairs)
    assert all(out.greeting == b"hello web, this is api" for out in outcomes)
    assert web.handshakes("outbound", "yes") == 20


async def test_session_is_not_offered_past_the_servers_certificate(
    listener: socket.socket, web: Proxy, api: Proxy
) -> None:
    c1, _, _ = ok(await connect_once(listener, web, api, "api"))
    ctx, key = web.client_ctx(), endpoint_of(listener)
    now = dt.datetime.now(dt.UTC)
    assert web.deps.sessions.session_for(ctx, "api", (key.address, key.port), now) is not None
    not_after = x509.load_der_x509_certificate(c1.peer_chain_der()[0]).not_valid_after_utc
    later = not_after + dt.timedelta(seconds=1)
    assert web.deps.sessions.session_for(ctx, "api", (key.address, key.port), later) is None
    assert len(web.deps.sessions) == 0


async def test_server_refuses_a_resumed_client_whose_certificate_expired(
    listener: socket.socket, web: Proxy, api: Proxy
) -> None:
    ok(await connect_once(listener, web, api, "api"))
    # OpenSSL would accept the ticket (its lifetime is 2 h, on the real clock); our check
    # on the server, at a time after the client's leaf expired, must not.
    api.clock_offset = dt.timedelta(hours=2)
    out = await connect_once(listener, web, api, "api")
    assert isinstance(out.server, str) and "expired" in out.server
    assert api.handshakes("inbound", "yes") == 1
    assert api.failures("inbound", "peer_identity") == 1


# ------------------------------------------------------------------------- invalidation


async def test_renewed_client_certificate_is_not_resumed(
    listener: socket.socket, web: Proxy, api: Proxy
) -> None:
    _, s1, _ = ok(await connect_once(listener, web, api, "api"))
    old_ctx = web.client_ctx()
    old_session = web.deps.sessions.session_for(
        old_ctx, "api", (endpoint_of(listener).address, endpoint_of(listener).port),
        dt.datetime.now(dt.UTC),
    )  # fmt: skip
    assert old_session is not None
    web.creds.renew("web")
    assert web.client_ctx() is not old_ctx

    c2, s2, source = ok(await connect_once(listener, web, api, "api"))
    assert not c2.session_reused and not s2.session_reused
    assert s2.peer_chain_der()[0] != s1.peer_chain_der()[0]  # the server saw the renewed leaf
    assert source == "web"
    # Python refuses the old session with the new context anyway.
    with pytest.raises(ValueError, match="different SSLContext"):
        web.client_ctx().wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), session=old_session)
    # ... and the session from the new handshake resumes.
    c3, _, _ = ok(await connect_once(listener, web, api, "api"))
    assert c3.session_reused


async def test_new_trust_bundle_is_not_resumed(
    listener: socket.socket, web: Proxy, api: Proxy, mesh_ca: MeshCa
) -> None:
    ok(await connect_once(listener, web, api, "api"))
    # Rotation step 1: a new root is published next to the active one.
    incoming = make_mesh_ca(mesh_ca.trust_domain)
    rotated = replace(
        with_signing_ca(mesh_ca),
        roots=(*mesh_ca.bundle.roots, BundleRoot(incoming.root.cert, RootState.ROTATING_IN)),
    )
    web.use_bundle(rotated)
    c2, _, _ = ok(await connect_once(listener, web, api, "api"))
    assert not c2.session_reused
    api.use_bundle(rotated)
    c3, s3, _ = ok(await connect_once(listener, web, api, "api"))
    assert not c3.session_reused and not s3.session_reused  # the server's new context
    c4, _, _ = ok(await connect_once(listener, web, api, "api"))
    assert c4.session_reused


async def test_servers_new_context_cannot_open_an_old_ticket(
    listener: socket.socket, web: Proxy, api: Proxy
) -> None:
    """Even a client that offers an old session gets a full handshake from a new context."""
    ok(await connect_once(listener, web, api, "api"))
    ctx = web.client_ctx()
    key = (endpoint_of(listener).address, endpoint_of(listener).port)
    session = web.deps.sessions.session_for(ctx, "api", key, dt.datetime.now(dt.UTC))
    assert session is not None
    api.creds.renew("api")  # the inbound proxy's certificate renewed: a new server context
    assert api.view.bundle is not None
    server_ctx = api.deps.tls.context("server", "api", api.view.bundle)
    assert server_ctx is not None

    raw_c = socket.create_connection(listener.getsockname()[:2])
    raw_s, _ = listener.accept()
    done: dict[str, TLSConnection] = {}

    async def side(name: str, sock: socket.socket, server_side: bool) -> None:
        done[name] = await handshake(
            sock,
            server_ctx if server_side else ctx,
            server_side=server_side,
            server_hostname=None if server_side else "api",
            timeout=TIMEOUT,
            session=None if server_side else session,
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "c", raw_c, False)
        nursery.start_soon(side, "s", raw_s, True)
    assert not done["c"].session_reused and not done["s"].session_reused
    for conn in done.values():
        conn.abort()


# ----------------------------------------------------------------- identity, every time


async def test_resumed_connection_presenting_another_service_is_refused(
    listener: socket.socket, web: Proxy, mesh_ca: MeshCa, tmp_path: Path
) -> None:
    db = make_proxy(mesh_ca, tmp_path, LocalService("db", "db-1", 5432))
    web.local = LocalService("web", "web-1", 8080, upstreams=("api", "db"))
    first = ok(await connect_once(listener, web, db, "db"))[0]
    # The endpoint is now listed for "api" (e.g. a stale catalog entry), and the cache hands
    # the db session to it: the resumed connection must still be refused before any byte.
    ctx, key = web.client_ctx(), (endpoint_of(listener).address, endpoint_of(listener).port)
    db_leaf = x509.load_der_x509_certificate(first.peer_chain_der()[0])
    web.deps.sessions.connected(
        ctx, "api", key, first.ssl_object, db_leaf.not_valid_after_utc, dt.datetime.now(dt.UTC)
    )
    assert web.deps.sessions.session_for(ctx, "api", key, dt.datetime.now(dt.UTC)) is not None

    out = await connect_once(listener, web, db, "api")
    assert isinstance(out.client, str) and "not service 'api'" in out.client
    assert web.handshakes("outbound", "yes") == 1  # it was resumed, and still refused
    assert web.failures("outbound", "peer_identity") == 1
    assert web.deps.peers.hits == 1  # the verifier's memory does not skip the service check
    assert web.deps.sessions.session_for(ctx, "api", key, dt.datetime.now(dt.UTC)) is None
    assert out.greeting == b""


# ----------------------------------------------------------------- the verifier's memory


def leaf_der(ca: MeshCa, service: str) -> tuple[bytes, ...]:
    leaf = x509.load_pem_x509_certificate(ca.issue(service)[0])
    return (leaf.public_bytes(Encoding.DER),)


def test_peer_verifier_remembers_successes_only(mesh_ca: MeshCa) -> None:
    bundle = with_signing_ca(mesh_ca)
    der = leaf_der(mesh_ca, "api")
    peers = PeerVerifier(max_entries=2)
    now = dt.datetime.now(dt.UTC)
    td = bundle.trust_domain

    def check(chain: tuple[bytes, ...], service: str, at: dt.datetime = now) -> str:
        got = peers.verify(chain, bundle, role="server", trust_domain=td,
                           expected_service=service, now=at)  # fmt: skip
        return got.identity.service

    assert check(der, "api") == check(der, "api") == "api"
    assert (peers.misses, peers.hits) == (1, 1)
    with pytest.raises(PeerRejected, match="not service 'db'"):
        check(der, "db")
    assert peers.hits == 2
    # A failure is never remembered: a chain from a foreign CA is rejected on every call.
    foreign = leaf_der(make_mesh_ca(mesh_ca.trust_domain), "api")
    for _ in range(2):
        with pytest.raises(PeerRejected, match="no valid chain"):
            check(foreign, "api")
    assert len(peers) == 1 and peers.misses == 3
    # Past the window the entry is verified afresh, with the precise reason.
    with pytest.raises(PeerRejected, match="expired"):
        check(der, "api", now + dt.timedelta(hours=2))
    assert len(peers) == 0


def test_peer_verifier_misses_on_a_new_bundle_and_stays_bounded(mesh_ca: MeshCa) -> None:
    bundle = with_signing_ca(mesh_ca)
    peers = PeerVerifier(max_entries=2)
    now = dt.datetime.now(dt.UTC)
    chains = [leaf_der(mesh_ca, name) for name in ("a", "b", "c")]
    for chain in chains:
        peers.verify(chain, bundle, role="client", trust_domain=bundle.trust_domain,
                     expected_service=None, now=now)  # fmt: skip
    assert len(peers) == 2
    # The same chain against a bundle that no longer trusts its root: refused, not recalled.
    other = make_mesh_ca(mesh_ca.trust_domain)
    with pytest.raises(PeerRejected, match="no valid chain"):
        peers.verify(chains[-1], other.bundle, role="client", trust_domain=bundle.trust_domain,
                     expected_service=None, now=now)  # fmt: skip
    # ... and verify_peer itself agrees with the memory on the original bundle.
    identity = verify_peer(chains[-1], bundle, role="client", trust_domain=bundle.trust_domain,
                           expected_service=None, now=now)  # fmt: skip
    assert identity.service == "c"


def test_session_cache_is_bounded() -> None:
    with pytest.raises(ValueError):
        SessionCache(max_entries=0)


def test_a_snapshot_with_the_same_bundle_keeps_the_tls_contexts(tmp_path: Path) -> None:
    """Warm connections and session tickets belong to an SSLContext, and TLSContexts keys
    contexts by the bundle object. Every snapshot parsed the bundle anew, so any endpoint
    or health change in Consul threw away every warm connection and ticket (seen as
    warm-pool misses in the lab). The same bundle bytes now keep the same object."""
    ca, other = make_mesh_ca(), make_mesh_ca()
    creds = Credentials(ca, tmp_path, dt.timedelta(hours=1))
    creds.renew("web")
    contexts = TLSContexts(creds)
    cache = ViewCache()

    def view(version: int, bundle: TrustBundle) -> DataPlaneView:
        raw = bundle.to_json()
        return cache.view_for(
            make_snapshot(version=version, created_at=version, trust_bundle_raw=raw)
        )

    first = view(1, ca.bundle)
    assert first.bundle is not None
    ctx = contexts.context("client", "web", first.bundle)
    second = view(2, ca.bundle)  # another snapshot, the same bundle
    assert second.bundle is first.bundle
    assert contexts.context("client", "web", second.bundle) is ctx
    third = view(3, other.bundle)  # a new root: new bundle, new context
    assert third.bundle is not None and third.bundle is not first.bundle
    assert contexts.context("client", "web", third.bundle) is not ctx
