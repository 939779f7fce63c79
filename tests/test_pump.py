"""The byte pump and TLS connections over real loopback sockets and real mutual TLS.

Topology of most tests (the data plane with both proxies, in one process):

    app ──tcp──▶ [outbound: PlainConnection ⇄ TLSConnection] ══mTLS══▶
                 [inbound: TLSConnection ⇄ PlainConnection] ──tcp──▶ upstream

The app and upstream ends use trio's own SocketStream, not our code. The tests that take
``any_pump`` run twice: with :func:`agent.pump.pump` (trio) and with the epoll engine
(:class:`agent.epollpump.PumpEngine`); tests/test_epollpump.py has the engine's own.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
import trustme

from agent.epollpump import PumpEngine
from agent.pump import Connection, PlainConnection, PumpFunction, PumpResult, pump
from agent.tlsconn import TLSConnection, TLSHandshakeError, handshake

TIMEOUT = 20.0
BOTH_TLS_VERSIONS = pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)


@dataclass
class Pki:
    server_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext
    ca: trustme.CA


def _contexts(ca: trustme.CA, *, max_version: ssl.TLSVersion | None = None) -> Pki:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.verify_mode = ssl.CERT_REQUIRED
    ca.issue_cert("inbound.test").configure_cert(server)
    ca.configure_trust(server)
    client = ssl.create_default_context()
    client.check_hostname = False  # mesh peers are checked by SPIFFE ID, not DNS name
    ca.issue_cert("outbound.test").configure_cert(client)
    ca.configure_trust(client)
    if max_version is not None:
        server.maximum_version = client.maximum_version = max_version
    return Pki(server, client, ca)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return _contexts(trustme.CA())


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0), backlog=512)
    yield sock
    sock.close()


@contextmanager
def running_engine() -> Iterator[PumpEngine]:
    """A running epoll engine; on exit it must hold no connection and stop promptly."""
    eng = PumpEngine()
    eng.start()
    yield eng
    assert len(eng) == 0, "connections left in the engine after the test"
    eng.request_stop()
    deadline = time.monotonic() + 5
    while eng.thread_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not eng.thread_alive(), "engine thread did not stop"
    eng.close()


@pytest.fixture(params=["trio", "epoll"])
def any_pump(request: pytest.FixtureRequest) -> Iterator[PumpFunction]:
    """Each pump implementation: trio's, then the epoll engine's."""
    if request.param == "trio":
        yield pump
        return
    with running_engine() as engine:
        yield engine.pump


def tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A connected loopback pair: (connecting end, accepted end)."""
    client = socket.create_connection(listener.getsockname()[:2])
    server, _ = listener.accept()
    return client, server


def stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def tls_pair(
    listener: socket.socket, pki: Pki, *, timeout: float = TIMEOUT
) -> tuple[TLSConnection, TLSConnection]:
    """(client, server) TLS connections after a concurrent handshake."""
    raw_c, raw_s = tcp_pair(listener)
    out: dict[str, TLSConnection] = {}

    async def side(name: str, sock: socket.socket, server_side: bool) -> None:
        ctx = pki.server_ctx if server_side else pki.client_ctx
        host = None if server_side else "inbound.test"
        out[name] = await handshake(
            sock, ctx, server_side=server_side, server_hostname=host, timeout=timeout
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "c", raw_c, False)
        nursery.start_soon(side, "s", raw_s, True)
    return out["c"], out["s"]


@dataclass
class MeshPath:
    app: trio.SocketStream
    upstream: trio.SocketStream
    results: dict[str, PumpResult] = field(default_factory=dict)


@asynccontextmanager
async def open_mesh_path(
    listener: socket.socket,
    pki: Pki,
    *,
    idle_timeout: float = TIMEOUT,
    pump_fn: PumpFunction = pump,
) -> AsyncIterator[MeshPath]:
    """Both proxies pumping with ``pump_fn``; on exit, waits for both pumps (the body must
    end the streams)."""
    app, outbound_in = tcp_pair(listener)
    tls_out, tls_in = await tls_pair(listener, pki)
    inbound_out, upstream = tcp_pair(listener)
    path = MeshPath(stream(app), stream(upstream))

    async def run(name: str, a: Connection, b: Connection) -> None:
        path.results[name] = await pump_fn(a, b, idle_timeout=idle_timeout)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "outbound", PlainConnection(outbound_in), tls_out)
            nursery.start_soon(run, "inbound", tls_in, PlainConnection(inbound_out))
            yield path
    finally:
        await path.app.aclose()
        await path.upstream.aclose()


async def receive_all(s: trio.SocketStream, limit: int = 64 << 20) -> bytes:
    """Read until EOF (bounded)."""
    got = bytearray()
    while chunk := await s.receive_some(65536):
        got += chunk
        assert len(got) <= limit
    return bytes(got)


async def echo_until_eof(s: trio.SocketStream) -> int:
    """Echo everything back, then half-close; returns bytes echoed."""
    total = 0
    while chunk := await s.receive_some(65536):
        await s.send_all(chunk)
        total += len(chunk)
    await s.send_eof()
    return total


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_round_trips_then_clean_close(
    listener: socket.socket, pki: Pki, any_pump: PumpFunction
) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            open_mesh_path(listener, pki, pump_fn=any_pump) as path,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(echo_until_eof, path.upstream)
            for i in range(50):
                msg = b"request %d " % i * 10
                await path.app.send_all(msg)
                got = b""
                while len(got) < len(msg):
                    got += await path.app.receive_some(65536)
                assert got == msg
            await path.app.send_eof()
            assert await path.app.receive_some(1) == b""
    sent = sum(len(b"request %d " % i * 10) for i in range(50))
    for result in path.results.values():
        assert result.outcome == "closed", result
        assert (result.bytes_a_to_b, result.bytes_b_to_a) == (sent, sent)
        assert result.duration > 0


async def test_8mib_both_ways_at_once_intact(
    listener: socket.socket, pki: Pki, any_pump: PumpFunction
) -> None:
    payload = os.urandom(8 << 20)

    async def send_then_eof(s: trio.SocketStream) -> None:
        for i in range(0, len(payload), 100_000):  # odd size: chunks straddle TLS records
            await s.send_all(payload[i : i + 100_000])
        await s.send_eof()

    with trio.fail_after(TIMEOUT):
        async with (
            open_mesh_path(listener, pki, pump_fn=any_pump) as path,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(echo_until_eof, path.upstream)
            nursery.start_soon(send_then_eof, path.app)
            echoed = await receive_all(path.app)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert path.results["inbound"].bytes_b_to_a == len(payload)
    assert {r.outcome for r in path.results.values()} == {"closed"}


@BOTH_TLS_VERSIONS
async def test_client_half_close_still_gets_response(
    listener: socket.socket, version: ssl.TLSVersion, any_pump: PumpFunction
) -> None:
    pki = _contexts(trustme.CA(), max_version=version)
    with trio.fail_after(TIMEOUT):
        async with open_mesh_path(listener, pki, pump_fn=any_pump) as path:
            await path.app.send_all(b"whole request")
            await path.app.send_eof()  # FIN -> close_notify -> FIN
            assert await receive_all(path.upstream) == b"whole request"
            await trio.sleep(0.05)  # let the response sit in the proxies' buffers
            await path.upstream.send_all(b"response " * 10_000)
            await path.upstream.send_eof()
            assert await receive_all(path.app) == b"response " * 10_000
    assert {r.outcome for r in path.results.values()} == {"closed"}
    assert path.results["inbound"].bytes_b_to_a == len(b"response " * 10_000)


@BOTH_TLS_VERSIONS
async def test_server_half_close_still_gets_request(
    listener: socket.socket, version: ssl.TLSVersion, any_pump: PumpFunction
) -> None:
    pki = _contexts(trustme.CA(), max_version=version)
    with trio.fail_after(TIMEOUT):
        async with open_mesh_path(listener, pki, pump_fn=any_pump) as path:
            await path.upstream.send_all(b"banner")
            await path.upstream.send_eof()
            assert await receive_all(path.app) == b"banner"
            await path.app.send_all(b"late data " * 10_000)
            await path.app.send_eof()
            assert await receive_all(path.upstream) == b"late data " * 10_000
    assert {r.outcome for r in path.results.values()} == {"closed"}


@BOTH_TLS_VERSIONS
async def test_tls_send_eof_keeps_received_records(
    listener: socket.socket, version: ssl.TLSVersion
) -> None:
    """close_notify while the peer's records are in flight or buffered loses none of them.

    With ssl.SSLSocket.unwrap() this fails with APPLICATION_DATA_AFTER_CLOSE_NOTIFY.
    """
    client, server = await tls_pair(listener, _contexts(trustme.CA(), max_version=version))
    assert client.version() == version.name.replace("v1_", "v1.")
    buf = memoryview(bytearray(65536))
    with trio.fail_after(TIMEOUT):
        for i in range(3):  # three records, all in the client's socket before it reads
            await server.send_all(b"record %d;" % i)
        await trio.sleep(0.05)
        got = bytearray(buf[: await client.recv_into(buf[:9])])  # one record; rest buffered
        await client.send_eof()
        assert await server.recv_into(buf) == 0  # the client's close_notify, as EOF
        await server.send_all(b"after eof;")
        await server.send_eof()
        while n := await client.recv_into(buf):
            got += buf[:n]
    assert bytes(got) == b"record 0;record 1;record 2;after eof;"
    for conn in (client, server):
        conn.close()


async def test_idle_timeout_fires_and_resets_both_ends(
    listener: socket.socket, pki: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    # Jump only after 50 ms of real idleness, so loopback bytes still in flight (a busy
    # host may defer delivery to ksoftirqd) are never mistaken for silence.
    autojump_clock.autojump_threshold = 0.05
    async with open_mesh_path(listener, pki, idle_timeout=30) as path:
        await trio.sleep(20)
        await path.app.send_all(b"activity")  # pushes the timeout out
        assert await path.upstream.receive_some(100) == b"activity"
        sent_at = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):
            await path.app.receive_some(100)  # RST when the outbound pump gives up
        fired_after = trio.current_time() - sent_at
    assert 30 <= fired_after <= 30 * 1.25 + 1
    assert {r.outcome for r in path.results.values()} == {"idle_timeout"}
    assert path.results["outbound"].bytes_a_to_b == len(b"activity")


def reset(s: trio.SocketStream) -> None:
    s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    s.socket.close()  # linger 0: RST


@pytest.mark.parametrize("side", ["app", "upstream"])
async def test_reset_is_reported_and_propagated(
    listener: socket.socket, pki: Pki, side: str, any_pump: PumpFunction
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_mesh_path(listener, pki, pump_fn=any_pump) as path:
            await path.app.send_all(b"partial")
            assert await path.upstream.receive_some(100) == b"partial"
            await path.upstream.send_all(b"partial reply")
            assert await path.app.receive_some(100) == b"partial reply"
            resetter, other = (
                (path.app, path.upstream) if side == "app" else (path.upstream, path.app)
            )
            reset(resetter)
            with pytest.raises(trio.BrokenResourceError):  # RST, not a clean EOF
                while await other.receive_some(100):
                    pass
    # The proxy that saw the RST resets its TLS leg (no close_notify), so the other proxy
    # reports a reset too, and resets its own plaintext side.
    assert {r.outcome for r in path.results.values()} == {"reset"}, path.results
    assert path.results["outbound"].bytes_a_to_b == len(b"partial")
    assert path.results["inbound"].bytes_b_to_a == len(b"partial reply")


async def test_wrong_server_ca_fails_handshake_on_both_sides(
    listener: socket.socket, pki: Pki
) -> None:
    stranger = _contexts(trustme.CA())  # a client that trusts another CA
    raw_c, raw_s = tcp_pair(listener)
    errors: list[BaseException] = []

    async def side(sock: socket.socket, ctx: ssl.SSLContext, server_side: bool) -> None:
        with pytest.raises(TLSHandshakeError) as info:
            await handshake(sock, ctx, server_side=server_side, timeout=TIMEOUT)
        errors.append(info.value)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, raw_c, stranger.client_ctx, False)
        nursery.start_soon(side, raw_s, pki.server_ctx, True)
    assert any("CERTIFICATE_VERIFY_FAILED" in str(e) for e in errors), errors
    assert raw_c.fileno() == raw_s.fileno() == -1  # both sockets closed by handshake()


async def test_client_cert_from_wrong_ca_refused_before_bytes(
    listener: socket.socket, pki: Pki
) -> None:
    other = trustme.CA()
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    other.issue_cert("intruder.test").configure_cert(client_ctx)
    pki.ca.configure_trust(client_ctx)  # trusts the real server...
    raw_c, raw_s = tcp_pair(listener)

    async def server() -> None:
        with pytest.raises(TLSHandshakeError, match="CERTIFICATE_VERIFY_FAILED: unable to get"):
            await handshake(raw_s, pki.server_ctx, server_side=True, timeout=TIMEOUT)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            # TLS 1.3: the client is done before the server has judged the client's cert;
            # the refusal shows on the client's first read, and the server has delivered nothing.
            conn = await handshake(raw_c, client_ctx, server_side=False, timeout=TIMEOUT)
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await conn.send_all(b"must not be delivered")
                await conn.recv_into(memoryview(bytearray(100)))
            conn.close()


async def test_handshake_times_out_on_a_silent_peer(
    listener: socket.socket, pki: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    autojump_clock.autojump_threshold = 0.05  # see test_idle_timeout_fires...
    raw_c, raw_s = tcp_pair(listener)
    with pytest.raises(TLSHandshakeError, match="timed out after 5"):
        await handshake(raw_c, pki.client_ctx, server_side=False, timeout=5)
    assert trio.current_time() == pytest.approx(5)
    raw_s.close()


async def test_200_concurrent_connections_and_no_fd_leak(
    listener: socket.socket, pki: Pki, any_pump: PumpFunction
) -> None:
    before = open_fds()
    outcomes: list[str] = []

    async def one(i: int) -> None:
        async with (
            open_mesh_path(listener, pki, pump_fn=any_pump) as path,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(echo_until_eof, path.upstream)
            msg = b"conn %d " % i * 50
            await path.app.send_all(msg)
            await path.app.send_eof()
            assert await receive_all(path.app) == msg
        outcomes.extend(r.outcome for r in path.results.values())

    with trio.fail_after(TIMEOUT * 2):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
    assert outcomes == ["closed"] * 400
    assert open_fds() - before == set()


async def test_failures_leak_no_fds(listener: socket.socket, pki: Pki) -> None:
    await test_reset_is_reported_and_propagated(listener, pki, "app", pump)  # lazy fds
    before = open_fds()
    for _ in range(3):
        await test_reset_is_reported_and_propagated(listener, pki, "app", pump)
        await test_reset_is_reported_and_propagated(listener, pki, "upstream", pump)
        await test_wrong_server_ca_fails_handshake_on_both_sides(listener, pki)
        await test_client_cert_from_wrong_ca_refused_before_bytes(listener, pki)
    assert open_fds() - before == set()


async def test_plain_to_plain_over_ipv6(any_pump: PumpFunction) -> None:
    """The permissive-mode shape (plaintext both sides), on ::1."""
    try:
        v6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with v6:
        app, a = tcp_pair(v6)
        b, upstream = tcp_pair(v6)
        app_s, up_s = stream(app), stream(upstream)
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    result = await any_pump(
                        PlainConnection(a), PlainConnection(b), idle_timeout=TIMEOUT
                    )
                    assert (result.outcome, result.bytes_a_to_b, result.bytes_b_to_a) == (
                        "closed", 5, 8,
                    )  # fmt: skip

                nursery.start_soon(run)
                await app_s.send_all(b"hello")
                await app_s.send_eof()
                assert await receive_all(up_s) == b"hello"
                await up_s.send_all(b"response")
                await up_s.send_eof()
                assert await receive_all(app_s) == b"response"
        await app_s.aclose()
        await up_s.aclose()
